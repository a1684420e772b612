//! wasmproc's own sender of outbound HTTP requests: connect to an address
//! the policy has already vetted, TLS for `https`, one HTTP/1.1 request.
//!
//! wasi-http's default sender resolves the host name itself, which would
//! reopen the window the policy closes: a name checked at one resolution
//! could lead elsewhere at the next (DNS rebinding). This sender never
//! resolves: it is handed socket addresses and connects to one of them.
//!
//! Invariants:
//! - every phase has a deadline: resolution, connection and the TLS and
//!   HTTP handshakes share the connect timeout; then the first byte of the
//!   response and each later wait for body bytes have their own;
//! - one connection per request (no pool), so the permits handed in count
//!   open connections; they are released when both the response body and
//!   the connection's I/O future are done (or dropped);
//! - the request goes out in origin form (path and query only), with the
//!   `Host` header wasi-http set from the authority.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use super::rules::{Host, Target};

/// How long resolving, connecting and the TLS handshake may take together,
/// unless the guest's request options say otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the response's head may take to arrive once the request is
/// sent, unless the guest's request options say otherwise.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a read of the response body may wait for the next bytes,
/// unless the guest's request options say otherwise.
pub const DEFAULT_BETWEEN_BYTES_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest any of these timeouts may be, whatever a guest asks for.
pub const MAX_OUTBOUND_TIMEOUT: Duration = Duration::from_secs(3600);

/// The future wasi-http runs to drive a connection after the response head.
pub(super) type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// The slots one connection holds: one of its instance's, one of its
/// type's. Dropping it frees both.
pub(super) struct Permits {
    pub(super) _instance: OwnedSemaphorePermit,
    pub(super) _process: OwnedSemaphorePermit,
}

/// The timeouts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timeouts {
    pub(super) connect: Duration,
    pub(super) first_byte: Duration,
    pub(super) between_bytes: Duration,
}

impl Timeouts {
    /// The guest's options where it set them, the defaults elsewhere, each
    /// at most [`MAX_OUTBOUND_TIMEOUT`].
    pub(super) fn new(options: Option<&RequestOptions>) -> Timeouts {
        let pick = |chosen: Option<Duration>, default: Duration| {
            chosen.unwrap_or(default).min(MAX_OUTBOUND_TIMEOUT)
        };
        Timeouts {
            connect: pick(
                options.and_then(|o| o.connect_timeout),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            first_byte: pick(
                options.and_then(|o| o.first_byte_timeout),
                DEFAULT_FIRST_BYTE_TIMEOUT,
            ),
            between_bytes: pick(
                options.and_then(|o| o.between_bytes_timeout),
                DEFAULT_BETWEEN_BYTES_TIMEOUT,
            ),
        }
    }
}

/// A byte stream hyper can drive: plain TCP or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// How to reach the server of one request.
pub(super) struct Connection<'a> {
    /// The host and port the request names, and whether it is `https`.
    pub(super) target: &'a Target,
    /// Where the target is, all vetted by the policy; tried in order.
    pub(super) addresses: &'a [SocketAddr],
    /// The TLS client settings, for `https`.
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    /// The request's timeouts.
    pub(super) timeouts: Timeouts,
    /// When connecting (with TLS) must be done.
    pub(super) deadline: Instant,
}

/// Sends `request` over a new connection. Returns the response and the
/// future that drives the rest of the connection, as
/// `WasiHttpHooks::send_request` must; both hold `permits`.
pub(super) async fn send(
    mut request: http::Request<WasiBody>,
    to: Connection<'_>,
    permits: Permits,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let Connection {
        target,
        addresses,
        tls,
        timeouts,
        deadline,
    } = to;
    let tcp = connect(addresses, deadline).await?;
    let stream: Box<dyn Stream> = if target.tls {
        let config = tls.ok_or(Error::ConfigurationError)?;
        Box::new(handshake_tls(config, tcp, &target.host, deadline).await?)
    } else {
        Box::new(tcp)
    };
    let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
    let (mut sender, conn) = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| Error::ConnectionTimeout)??;

    // The URI still holds the scheme and authority; a request to an origin
    // server carries only the path and query.
    let mut origin = http::uri::Parts::default();
    origin.path_and_query = Some(
        request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    *request.uri_mut() = http::Uri::from_parts(origin).map_err(|_| Error::HttpRequestUriInvalid)?;

    // Drive the connection while waiting for the response's head: hyper's
    // connection future does the reading and writing.
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let response = {
        let response = tokio::time::timeout(timeouts.first_byte, sender.send_request(request));
        tokio::pin!(response);
        loop {
            tokio::select! {
                biased;
                response = &mut response => break response,
                ended = &mut conn, if !conn_done => {
                    conn_done = true;
                    ended?;
                }
            }
        }
    };
    // No second request on this connection: it closes once the body is read.
    drop(sender);
    let response = response.map_err(|_| Error::ConnectionReadTimeout)??;

    let permits = Arc::new(permits);
    let response = response.map(|incoming| {
        ResponseBody {
            incoming,
            between_bytes: timeouts.between_bytes,
            idle: None,
            permits: Some(permits.clone()),
        }
        .boxed_unsync()
    });
    let io: IoFuture = Box::new(async move {
        let _permits = permits;
        if !conn_done {
            conn.await?;
        }
        Ok(())
    });
    Ok((response, io))
}

/// A connection to the first of `addresses` that accepts one.
async fn connect(addresses: &[SocketAddr], deadline: Instant) -> Result<TcpStream, Error> {
    let mut last = None;
    for address in addresses {
        match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                // Only latency is at stake if this fails.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => return Err(Error::ConnectionTimeout),
        }
    }
    Err(last.map_or(Error::DestinationNotFound, connect_error))
}

fn connect_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
        io::ErrorKind::TimedOut => Error::ConnectionTimeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            Error::DestinationIpUnroutable
        }
        _ => Error::Connect(e),
    }
}

/// The TLS client settings every outbound connection shares: the Mozilla
/// roots of `webpki-roots`, the `ring` provider, HTTP/1.1 by ALPN. `None`
/// if they cannot be built (then `https` requests fail, plain ones work).
pub(super) fn tls_config() -> Option<Arc<rustls::ClientConfig>> {
    static CONFIG: OnceLock<Option<Arc<rustls::ClientConfig>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            match rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
            {
                Ok(builder) => {
                    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
                    config.alpn_protocols = vec![b"http/1.1".to_vec()];
                    Some(Arc::new(config))
                }
                Err(e) => {
                    tracing::error!("outbound https is unavailable: cannot configure TLS: {e}");
                    None
                }
            }
        })
        .clone()
}

async fn handshake_tls(
    config: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    host: &Host,
    deadline: Instant,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Error> {
    let name = match host {
        Host::Name(name) => {
            rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| Error::DnsError {
                rcode: Some("not a valid TLS server name".to_string()),
                info_code: None,
            })?
        }
        Host::Ip(ip) => rustls::pki_types::ServerName::from(*ip),
    };
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(tls_error(e)),
        Err(_) => Err(Error::ConnectionTimeout),
    }
}

fn tls_error(e: io::Error) -> Error {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => Error::TlsCertificateError,
        Some(rustls::Error::AlertReceived(alert)) => Error::TlsAlertReceived {
            alert_id: Some(u8::from(*alert)),
            alert_message: Some(format!("{alert:?}")),
        },
        _ => Error::Tls(e),
    }
}

/// A response body that fails when the server goes quiet for longer than
/// the between-bytes timeout while the guest waits, and that holds the
/// connection's permits until it ends.
struct ResponseBody {
    incoming: hyper::body::Incoming,
    between_bytes: Duration,
    /// Set while the guest waits for bytes that have not come.
    idle: Option<Pin<Box<Sleep>>>,
    /// Dropped at the end of the body; the I/O future holds the others.
    permits: Option<Arc<Permits>>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                this.idle = None;
                this.permits = None;
                Poll::Ready(end.map(|failed| failed.map_err(Error::from)))
            }
            Poll::Pending => {
                let between_bytes = this.between_bytes;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(between_bytes)));
                if idle.as_mut().poll(cx).is_ready() {
                    this.idle = None;
                    this.permits = None;
                    return Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_default_and_are_capped() {
        let defaults = Timeouts::new(None);
        assert_eq!(defaults.connect, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(defaults.first_byte, DEFAULT_FIRST_BYTE_TIMEOUT);
        assert_eq!(defaults.between_bytes, DEFAULT_BETWEEN_BYTES_TIMEOUT);
        let options = RequestOptions {
            connect_timeout: Some(Duration::from_millis(5)),
            first_byte_timeout: Some(Duration::MAX),
            between_bytes_timeout: None,
        };
        let chosen = Timeouts::new(Some(&options));
        assert_eq!(chosen.connect, Duration::from_millis(5));
        assert_eq!(chosen.first_byte, MAX_OUTBOUND_TIMEOUT);
        assert_eq!(chosen.between_bytes, DEFAULT_BETWEEN_BYTES_TIMEOUT);
    }

    #[test]
    fn tls_settings_build_with_the_bundled_roots() {
        let config = tls_config().expect("a TLS configuration");
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
    }
}
