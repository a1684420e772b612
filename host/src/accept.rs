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
//! - every accepted socket has `TCP_NODELAY` set: answers are written whole,
//!   and Nagle's algorithm would only delay their last segment.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long the loop waits after an accept failed for want of resources.
pub const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Whether an accept error means the process or machine is out of a
/// resource (descriptors, kernel memory), rather than one connection failing.
fn is_exhaustion(error: &std::io::Error) -> bool {
    error.kind() == ErrorKind::OutOfMemory
        || matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
}

/// Accepts connections on `listener` and hands each to `each`, until
/// `shutdown` resolves. `what` names the listener in the log.
pub async fn accept_until(
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
    what: &str,
    mut each: impl FnMut(TcpStream, SocketAddr),
) {
    let mut shutdown = std::pin::pin!(shutdown);
    // Failures in the current burst of resource exhaustion.
    let mut exhausted: u64 = 0;
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
                each(stream, peer);
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
