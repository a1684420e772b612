//! The hook driven directly, against HTTP servers on loopback: what a guest
//! would get back from `outgoing-handler.handle`.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// A server on 127.0.0.1 that answers each request with `200 ok`, or holds
/// it open without answering.
struct Server {
    port: u16,
    accepted: Arc<AtomicUsize>,
    /// The head of every request received.
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Answer,
    Hold,
    /// Sends the head and half the body, then goes quiet.
    Stall,
    /// Writes a plain-HTTP answer as soon as it accepts, whatever it gets.
    Blurt,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Server {
        Self::start_with(behaviour, None).await
    }

    /// Like [`Server::start`], speaking TLS with `tls`'s certificate.
    async fn start_with(behaviour: Behaviour, tls: Option<Arc<rustls::ServerConfig>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, received) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let received = received.clone();
                match &tls {
                    None => drop(tokio::spawn(serve(stream, behaviour, received))),
                    Some(config) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                        tokio::spawn(async move {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, behaviour, received).await;
                            }
                        });
                    }
                }
            }
        });
        Server {
            port,
            accepted,
            heads,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    behaviour: Behaviour,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    if let Behaviour::Blurt = behaviour {
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        return;
    }
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    let reply: &[u8] = match behaviour {
        Behaviour::Answer => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        Behaviour::Hold => b"",
        Behaviour::Stall => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nok",
        Behaviour::Blurt => b"",
    };
    let _ = stream.write_all(reply).await;
    // Keep the connection until the client closes it.
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

fn policy(rules: &[&str], instance_limit: u32, type_limit: u32) -> TypeOutbound {
    let rules = rules.iter().map(|r| parse_rule(r).unwrap()).collect();
    TypeOutbound::with_rules("web", rules, instance_limit, type_limit)
}

fn instance(policy: &TypeOutbound, name: &str) -> Outbound {
    policy.for_instance(&Arc::from(name))
}

fn get(url: &str) -> http::Request<WasiBody> {
    let uri: http::Uri = url.parse().unwrap();
    let host = uri.authority().unwrap().to_string();
    http::Request::builder()
        .uri(uri)
        .header(http::header::HOST, host)
        .body(Empty::new().map_err(Error::from).boxed_unsync())
        .unwrap()
}

async fn send(
    outbound: &mut Outbound,
    url: &str,
    options: Option<RequestOptions>,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let future = outbound.send_request(get(url), options, Box::new(async { Ok(()) }));
    tokio::time::timeout(DEADLINE, Pin::from(future))
        .await
        .expect("the request ends in time")
}

/// Sends, drives the connection and reads the whole body.
async fn fetch(outbound: &mut Outbound, url: &str) -> Result<(u16, String), Error> {
    let (response, io) = send(outbound, url, None).await?;
    tokio::spawn(Pin::from(io));
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_literal_rule_reaches_its_loopback_address_and_sends_origin_form() {
    let server = Server::start(Behaviour::Answer).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 16, 256);
    let mut web = instance(&policy, "web.1");
    let (status, body) = fetch(&mut web, &format!("http://127.0.0.1:{port}/x?y=1"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(server.accepted(), 1);
    let head = server.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.starts_with("get /x?y=1 http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
        "{head}"
    );
    until("the connection closes", || web.open_connections() == 0).await;
    assert_eq!(policy.open_connections(), 0);
}

#[tokio::test]
async fn names_and_wildcards_never_reach_non_public_addresses() {
    let server = Server::start(Behaviour::Answer).await;
    let port = server.port;
    let policy = policy(
        &[
            &format!("localhost:{port}"),
            &format!("127.0.0.1:{port}"),
            "*:*",
        ],
        16,
        256,
    );
    let mut web = instance(&policy, "web.1");
    for url in [
        format!("http://localhost:{port}/"),
        format!("http://LOCALHOST.:{port}/"),
        // Resolvers read these as 127.0.0.1; only `*:*` matches them.
        format!("http://127.1:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://127.0.0.2:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://[::1]:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.0.0.1:8080/".to_string(),
    ] {
        let result = send(&mut web, &url, None).await;
        assert!(
            matches!(result, Err(Error::HttpRequestDenied)),
            "{url}: {:?}",
            result.map(|(r, _)| r.status())
        );
    }
    assert_eq!(server.accepted(), 0, "no denied request connects");
    assert_eq!(web.open_connections(), 0, "a denial holds no permit");
    let (status, _) = fetch(&mut web, &format!("http://127.0.0.1:{port}/"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_host_rule_without_a_port_allows_only_the_default_port() {
    let server = Server::start(Behaviour::Answer).await;
    let policy = policy(&["127.0.0.1"], 16, 256);
    let mut web = instance(&policy, "web.1");
    let result = send(
        &mut web,
        &format!("http://127.0.0.1:{}/", server.port),
        None,
    )
    .await;
    assert!(matches!(result, Err(Error::HttpRequestDenied)));
    assert_eq!(server.accepted(), 0);
}

#[tokio::test]
async fn the_instance_cap_refuses_at_once_and_frees_when_connections_close() {
    let server = Server::start(Behaviour::Hold).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 2, 256);
    let mut web = instance(&policy, "web.1");
    let url = format!("http://127.0.0.1:{port}/");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let future = web.send_request(get(&url), None, Box::new(async { Ok(()) }));
            tokio::spawn(Pin::from(future))
        })
        .collect();
    until("both connections are open", || server.accepted() == 2).await;
    assert_eq!(web.open_connections(), 2);
    assert_eq!(policy.open_connections(), 2);

    let refused = send(&mut web, &url, None).await;
    assert!(matches!(refused, Err(Error::ConnectionLimitReached)));
    assert_eq!(server.accepted(), 2, "the refused request never connected");

    // Another instance of the type has its own cap.
    let mut other = instance(&policy, "web.2");
    let other_request = other.send_request(get(&url), None, Box::new(async { Ok(()) }));
    let other_request = tokio::spawn(Pin::from(other_request));
    until("the other instance connects", || server.accepted() == 3).await;

    // Dropping a request (as dropping the guest's future does) frees its slot.
    for handle in held {
        handle.abort();
    }
    other_request.abort();
    until("the permits come back", || web.open_connections() == 0).await;
    until("the type's permits come back", || {
        policy.open_connections() == 0
    })
    .await;
}

#[tokio::test]
async fn the_type_cap_is_shared_by_its_instances() {
    let server = Server::start(Behaviour::Hold).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 16, 3);
    let url = format!("http://127.0.0.1:{port}/");
    let mut instances: Vec<_> = (1..=4)
        .map(|i| instance(&policy, &format!("web.{i}")))
        .collect();
    let mut held = Vec::new();
    for web in instances.iter_mut().take(3) {
        let future = web.send_request(get(&url), None, Box::new(async { Ok(()) }));
        held.push(tokio::spawn(Pin::from(future)));
    }
    let refused = send(&mut instances[3], &url, None).await;
    assert!(matches!(refused, Err(Error::ConnectionLimitReached)));
    assert_eq!(
        instances[3].open_connections(),
        0,
        "its own permit went back"
    );
    for handle in held {
        handle.abort();
    }
    until("the permits come back", || policy.open_connections() == 0).await;
}

#[tokio::test]
async fn a_permit_lives_until_the_body_and_the_connection_end() {
    let server = Server::start(Behaviour::Answer).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 1, 256);
    let mut web = instance(&policy, "web.1");
    let url = format!("http://127.0.0.1:{port}/");
    let (response, io) = send(&mut web, &url, None).await.unwrap();
    let io = tokio::spawn(Pin::from(io));
    assert_eq!(web.open_connections(), 1, "the body is unread");
    assert!(matches!(
        send(&mut web, &url, None).await,
        Err(Error::ConnectionLimitReached)
    ));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    tokio::time::timeout(DEADLINE, io)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(web.open_connections(), 0);
    assert_eq!(fetch(&mut web, &url).await.unwrap().0, 200);
}

#[tokio::test]
async fn a_server_that_goes_quiet_times_out_between_bytes() {
    let server = Server::start(Behaviour::Stall).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 16, 256);
    let mut web = instance(&policy, "web.1");
    let options = RequestOptions {
        between_bytes_timeout: Some(Duration::from_millis(200)),
        ..RequestOptions::default()
    };
    let (response, io) = send(
        &mut web,
        &format!("http://127.0.0.1:{port}/"),
        Some(options),
    )
    .await
    .unwrap();
    let io = tokio::spawn(Pin::from(io));
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "ok");
    let quiet = tokio::time::timeout(DEADLINE, body.frame()).await.unwrap();
    assert!(
        matches!(quiet, Some(Err(Error::ConnectionReadTimeout))),
        "{quiet:?}"
    );
    drop(body);
    io.abort();
    until("the permits come back", || web.open_connections() == 0).await;
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_at_the_first_byte() {
    let server = Server::start(Behaviour::Hold).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 16, 256);
    let mut web = instance(&policy, "web.1");
    let options = RequestOptions {
        first_byte_timeout: Some(Duration::from_millis(200)),
        ..RequestOptions::default()
    };
    let result = send(
        &mut web,
        &format!("http://127.0.0.1:{port}/"),
        Some(options),
    )
    .await;
    assert!(matches!(result, Err(Error::ConnectionReadTimeout)));
    assert_eq!(web.open_connections(), 0);
}

/// A certificate authority, and a certificate for 127.0.0.1 it signed,
/// made with `openssl` for this test run (so they are valid now).
struct TestCertificates {
    authority: rustls::pki_types::CertificateDer<'static>,
    server: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl TestCertificates {
    fn make() -> TestCertificates {
        use rustls::pki_types::pem::PemObject as _;
        let dir = tempfile::tempdir().unwrap();
        let openssl = |command: &str| {
            let out = std::process::Command::new("openssl")
                .args(command.split_whitespace())
                .current_dir(dir.path())
                .output()
                .expect("openssl must be installed (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {command}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(&format!(
            "req -x509 {key} -days 2 -subj /CN=wasmproc-test-authority -keyout ca.key -out ca.pem"
        ));
        openssl(&format!(
            "req {key} -subj /CN=127.0.0.1 -keyout server.key -out server.csr"
        ));
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
             -extfile server.ext -out server.pem",
        );
        let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        TestCertificates {
            authority: rustls::pki_types::CertificateDer::from_pem_slice(&read("ca.pem")).unwrap(),
            server: rustls::pki_types::CertificateDer::from_pem_slice(&read("server.pem")).unwrap(),
            key: rustls::pki_types::PrivateKeyDer::from_pem_slice(&read("server.key")).unwrap(),
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.server.clone()], self.key.clone_key())
            .unwrap();
        Arc::new(config)
    }

    /// Client settings that trust this authority only.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.authority.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

#[tokio::test]
async fn https_verifies_the_server_and_sends_the_request_over_tls() {
    let certificates = TestCertificates::make();
    let server = Server::start_with(Behaviour::Answer, Some(certificates.server_config())).await;
    let port = server.port;
    let url = format!("https://127.0.0.1:{port}/secure");
    let rules = vec![parse_rule(&format!("127.0.0.1:{port}")).unwrap()];

    let trusting = TypeOutbound::with_tls(
        "web",
        rules.clone(),
        16,
        256,
        Some(certificates.client_config()),
    );
    let mut web = instance(&trusting, "web.1");
    assert_eq!(
        fetch(&mut web, &url).await.unwrap(),
        (200, "ok".to_string())
    );
    let head = server.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.starts_with("get /secure http/1.1\r\n"), "{head}");

    // The bundled roots do not know the test authority.
    let bundled = TypeOutbound::with_rules("web", rules, 16, 256);
    let mut web = instance(&bundled, "web.1");
    let result = send(&mut web, &url, None).await;
    assert!(matches!(result, Err(Error::TlsCertificateError)));
}

#[tokio::test]
async fn https_to_a_server_without_tls_is_a_tls_error() {
    let server = Server::start(Behaviour::Blurt).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 16, 256);
    let mut web = instance(&policy, "web.1");
    let result = send(&mut web, &format!("https://127.0.0.1:{port}/"), None).await;
    assert!(matches!(result, Err(Error::Tls(_))));
    assert_eq!(web.open_connections(), 0);
}

#[tokio::test]
async fn the_tls_handshake_is_bounded_by_the_connect_timeout() {
    // Holds the TCP connection, never answers the TLS client hello.
    let server = Server::start(Behaviour::Hold).await;
    let port = server.port;
    let policy = policy(&[&format!("127.0.0.1:{port}")], 16, 256);
    let mut web = instance(&policy, "web.1");
    let options = RequestOptions {
        connect_timeout: Some(Duration::from_millis(200)),
        ..RequestOptions::default()
    };
    let result = send(
        &mut web,
        &format!("https://127.0.0.1:{port}/"),
        Some(options),
    )
    .await;
    assert!(matches!(result, Err(Error::ConnectionTimeout)));
    assert_eq!(server.accepted(), 1);
    assert_eq!(web.open_connections(), 0);
}

#[tokio::test]
async fn a_closed_port_is_connection_refused() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let policy = policy(&[&format!("127.0.0.1:{port}")], 16, 256);
    let mut web = instance(&policy, "web.1");
    let result = send(&mut web, &format!("http://127.0.0.1:{port}/"), None).await;
    assert!(matches!(result, Err(Error::ConnectionRefused)));
}

#[test]
fn denials_say_why_and_what_to_write() {
    let policy = policy(&["127.0.0.1", "api.example.com:8443"], 16, 256);
    let web = instance(&policy, "web.1");
    let target = |url: &str| Target::from_uri(&url.parse().unwrap()).unwrap();
    let why = |url: &str| web.route(&target(url)).unwrap_err().to_string();
    assert_eq!(
        why("http://127.0.0.1:9000/"),
        "`127.0.0.1:9000` is not in `allow_outbound`: `127.0.0.1` allows port 80 only \
         (write `127.0.0.1:9000` or `127.0.0.1:*` to allow more)"
    );
    assert_eq!(
        why("https://api.example.com/"),
        "`api.example.com:443` is not in `allow_outbound`: `api.example.com:8443` allows port 8443 only \
         (write `api.example.com:443` or `api.example.com:*` to allow more)"
    );
    assert_eq!(
        why("https://evil.example.com/"),
        "`evil.example.com:443` is not in `allow_outbound`"
    );
    let private = Denial::ResolvesPrivate {
        name: "localhost".to_string(),
        ip: "127.0.0.1".parse().unwrap(),
        class: AddressClass::Loopback,
        literal: "127.0.0.1:8080".to_string(),
    };
    assert_eq!(
        private.to_string(),
        "`localhost` resolves to 127.0.0.1, a loopback address; a name may only lead to \
         public addresses (to allow this one, name it: `127.0.0.1:8080`)"
    );
}
