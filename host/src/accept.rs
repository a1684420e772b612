//! The accept loop every listener uses (the HTTP front and the admin API),
//! so a fix to how connections are taken in is made once.
//!
//! Invariants:
//! - an accept error never makes the loop spin: when the process or the
//!   machine is out of file descriptors (`EMFILE`, `ENFILE`) or of kernel
//!   memory (`ENOBUFS`, `ENOMEM`), the loop pauses for [`EXHAUSTED_PAUSE`]
//!   before it tries again, so the connections holding descriptors get to
//!   finish;
//! - such errors are logged once per burst: one warning when the first one
//!   comes, one line with the count when accepting works again;
//! - any other error concerns one connection (aborted before it was
//!   accepted, …) and is skipped at once;
//! - a listener holds at most its [`Connections`] bound open at once: one
//!   more is answered `503` with `Retry-After` (written without waiting, in
//!   one segment) and closed, and the log says so once per burst;
//! - every accepted socket has `TCP_NODELAY` set: answers are written whole,
//!   and Nagle's algorithm would only delay their last segment.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long the loop waits after an accept failed for want of resources.
pub const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// What a connection beyond the bound is told before it is closed.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";

/// A listener's bound on open connections: one permit per connection,
/// held by the connection's task until it ends.
pub struct Connections {
    permits: Arc<Semaphore>,
    max: u32,
}

impl Connections {
    /// At most `max` connections at once.
    pub fn new(max: u32) -> Self {
        Connections {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// Waits until every connection has closed, for at most `grace`;
    /// whether they all did.
    pub async fn all_closed(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.permits.acquire_many(self.max))
            .await
            .is_ok()
    }
}

/// Whether an accept error means the process or machine is out of a
/// resource (descriptors, kernel memory), rather than one connection failing.
fn is_exhaustion(error: &std::io::Error) -> bool {
    error.kind() == ErrorKind::OutOfMemory
        || matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
}

/// Accepts connections on `listener` and hands each, with its permit, to
/// `each`, until `shutdown` resolves; refuses those beyond `connections`.
/// `what` names the listener in the log.
pub async fn accept_until(
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
    what: &str,
    connections: &Connections,
    mut each: impl FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
) {
    let mut shutdown = std::pin::pin!(shutdown);
    // Failures in the current burst of resource exhaustion.
    let mut exhausted: u64 = 0;
    // Connections refused in the current burst of too many.
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                if exhausted > 0 {
                    tracing::info!(
                        "{what}: accepting connections again after {exhausted} failed for want of resources"
                    );
                    exhausted = 0;
                }
                let _ = stream.set_nodelay(true);
                match connections.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        if refused > 0 {
                            tracing::info!(
                                "{what}: below {} connections again after refusing {refused}",
                                connections.max
                            );
                            refused = 0;
                        }
                        each(stream, peer, permit);
                    }
                    Err(_) => {
                        if refused == 0 {
                            tracing::warn!(
                                "{what}: {} connections open, the most allowed: refusing new ones with 503",
                                connections.max
                            );
                        }
                        refused += 1;
                        // Best effort, never waiting: the socket is new, so
                        // its send buffer has room for these few bytes.
                        let _ = stream.try_write(TOO_MANY);
                    }
                }
            }
            Err(e) if is_exhaustion(&e) => {
                if exhausted == 0 {
                    tracing::warn!(
                        "{what}: cannot accept connections: {e}; retrying every {} ms until some close",
                        EXHAUSTED_PAUSE.as_millis()
                    );
                }
                exhausted += 1;
                tokio::select! {
                    () = tokio::time::sleep(EXHAUSTED_PAUSE) => {}
                    () = &mut shutdown => return,
                }
            }
            Err(e) => tracing::debug!("{what}: a connection failed before it was accepted: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_exhaustion_and_a_reset_is_not() {
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_exhaustion(&std::io::Error::from(
            ErrorKind::ConnectionAborted
        )));
    }
}
