//! End-to-end tests of outbound HTTP from guests: the real `wasmproc run`,
//! the testbed guest's `/fetch` and `/fanout`, and HTTP servers the tests
//! run on loopback. What they assert is what a guest, a bystander and the
//! operator see: the guest's error code, other types' 200s, the log line,
//! the host's file descriptors.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{DEADLINE, Host};

/// An HTTP server on 127.0.0.1 that reads each request and answers `200
/// ok` — at once, or, while held, only when released.
struct Server {
    port: u16,
    accepted: Arc<AtomicUsize>,
    released: Arc<(Mutex<bool>, Condvar)>,
}

impl Server {
    fn answering() -> Server {
        Self::start(true)
    }

    fn holding() -> Server {
        Self::start(false)
    }

    fn start(released: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let released = Arc::new((Mutex::new(released), Condvar::new()));
        let (count, gate) = (accepted.clone(), released.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                std::thread::spawn(move || answer(stream, &gate));
            }
        });
        Server {
            port,
            accepted,
            released,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Answers every held request, and from now on answers at once.
    fn release(&self) {
        let (released, wake) = &*self.released;
        *released.lock().unwrap() = true;
        wake.notify_all();
    }

    /// Waits until `n` connections have been accepted.
    fn wait_for(&self, n: usize) {
        let start = Instant::now();
        while self.accepted() < n {
            assert!(
                start.elapsed() < DEADLINE,
                "{} connections, not {n}, within {DEADLINE:?}",
                self.accepted()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn answer(mut stream: TcpStream, gate: &(Mutex<bool>, Condvar)) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (released, wake) = gate;
    let mut open = released.lock().unwrap();
    while !*open {
        open = wake.wait(open).unwrap();
    }
    drop(open);
    let _ =
        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
}

/// The host's open file descriptors.
fn open_fds(host: &Host) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", host.pid()))
        .unwrap()
        .count()
}

fn fetch(host: &Host, url: &str, on: Option<&str>) -> String {
    host.request("GET", &format!("/fetch?url={url}"), on, None)
        .body
}

#[test]
fn a_name_that_resolves_to_loopback_is_denied_while_the_address_itself_is_allowed() {
    let server = Server::answering();
    let port = server.port;
    let mut host = Host::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{{testbed}}"
allow_outbound = ["localhost:{port}", "127.0.0.1:{port}"]
"#
    ));

    let denied = fetch(&host, &format!("http://localhost:{port}/"), None);
    assert_eq!(denied, "error: ErrorCode::HttpRequestDenied\n");
    let line = host.wait_for_log("outbound request denied");
    assert!(line.contains("instance=web.1"), "{line}");
    assert!(
        line.contains(&format!("authority=localhost:{port}")),
        "{line}"
    );
    assert!(
        line.contains("resolves to") && line.contains("a loopback address"),
        "{line}"
    );
    assert_eq!(server.accepted(), 0, "the denied request never connected");

    let allowed = fetch(&host, &format!("http://127.0.0.1:{port}/"), None);
    assert_eq!(allowed, "status 200\n");
    assert_eq!(server.accepted(), 1);
}

#[test]
fn a_guest_does_not_reach_the_hosts_admin_api() {
    let mut host = Host::start(
        r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{testbed}"
routes = ["/"]
allow_outbound = ["127.0.0.1"]

[process.wild]
kind = "web"
component = "{testbed}"
routes = ["wild.test/"]
allow_outbound = ["*:*"]

[process.open]
kind = "web"
component = "{testbed}"
routes = ["open.test/"]
allow_outbound = ["127.0.0.1:*"]
"#,
    );
    let admin = host.admin.clone();
    assert!(admin.starts_with("127.0.0.1:"), "{admin}");
    let url = format!("http://{admin}/");

    // `127.0.0.1` alone allows port 80 only.
    assert_eq!(
        fetch(&host, &url, None),
        "error: ErrorCode::HttpRequestDenied\n"
    );
    let line = host.wait_for_log("allows port 80 only");
    assert!(line.contains("instance=web.1"), "{line}");

    // Any host on any port still means public hosts only.
    assert_eq!(
        fetch(&host, &url, Some("wild.test")),
        "error: ErrorCode::HttpRequestDenied\n"
    );
    let line = host.wait_for_log("a loopback address; only a rule naming the address");
    assert!(line.contains("instance=wild.1"), "{line}");
    assert_eq!(
        fetch(&host, "http://localhost:1/", Some("wild.test")),
        "error: ErrorCode::HttpRequestDenied\n"
    );

    // Even a rule naming the address and every port stops at the host's
    // own listeners: the admin API and the HTTP front.
    for listener in [&admin, &host.addr.clone()] {
        assert_eq!(
            fetch(&host, &format!("http://{listener}/"), Some("open.test")),
            "error: ErrorCode::HttpRequestDenied\n"
        );
        let line = host.wait_for_log(&format!("is the host's own listener {listener}"));
        assert!(line.contains("instance=open.1"), "{line}");
    }
}

#[test]
fn connections_beyond_the_instance_cap_fail_at_once_and_descriptors_stay_bounded() {
    let server = Server::holding();
    let port = server.port;
    let mut host = Host::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{{testbed}}"
routes = ["/"]
limits = {{ connections = 4, timeout = "60s" }}
allow_outbound = ["127.0.0.1:{port}"]

[process.other]
kind = "web"
component = "{{testbed}}"
routes = ["other.test/"]
"#
    ));
    assert_eq!(
        host.request("GET", "/", Some("other.test"), None).status,
        200
    );
    let before = open_fds(&host);

    let addr = host.addr.clone();
    let flood = std::thread::spawn(move || {
        common::request(
            &addr,
            "GET",
            &format!("/fanout?url=http://127.0.0.1:{port}/&n=200"),
            None,
            None,
        )
    });
    server.wait_for(4);
    host.wait_for_log("outbound request refused");
    let during = open_fds(&host);
    for _ in 0..5 {
        let other = host.request("GET", "/", Some("other.test"), None);
        assert_eq!((other.status, other.body.as_str()), (200, "testbed ok\n"));
    }
    eprintln!("host fds: {before} before the flood, {during} during it");
    assert!(
        during <= before + 4 + 4,
        "{during} fds during the flood, {before} before"
    );

    server.release();
    let flood = flood.join().unwrap();
    assert_eq!(
        flood.body,
        "error: ErrorCode::ConnectionLimitReached x196\nstatus 200 x4\n"
    );
    assert_eq!(server.accepted(), 4, "refused requests never connected");

    // 196 refusals in a burst: a few lines, then the count of the rest.
    let refused = host.count("outbound request refused");
    assert!((1..=5).contains(&refused), "{refused} lines");
    let line = host.wait_for_log("outbound warnings of this instance were suppressed");
    assert!(line.contains("instance=web.1"), "{line}");
    let line = host.wait_for_log("outbound request refused");
    assert!(line.contains("`limits.connections`"), "{line}");
}

#[test]
fn the_type_cap_is_shared_by_every_instance_of_the_type() {
    let server = Server::holding();
    let port = server.port;
    let host = Host::start(&format!(
        r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{{testbed}}"
scale = 2
limits = {{ connections = 16, type_connections = 4, timeout = "60s" }}
allow_outbound = ["127.0.0.1:{port}"]
"#
    ));
    let fanouts: Vec<_> = (0..2)
        .map(|_| {
            let addr = host.addr.clone();
            std::thread::spawn(move || {
                common::request(
                    &addr,
                    "GET",
                    &format!("/fanout?url=http://127.0.0.1:{port}/&n=3"),
                    None,
                    None,
                )
                .body
            })
        })
        .collect();
    server.wait_for(4);
    host.wait_until("both refusals are logged", |log| {
        log.iter()
            .filter(|l| l.contains("`limits.type_connections`"))
            .count()
            == 2
    });
    server.release();
    let mut counts = (0, 0);
    for body in fanouts.into_iter().map(|f| f.join().unwrap()) {
        for line in body.lines() {
            let (outcome, count) = line.rsplit_once(" x").unwrap();
            let count: usize = count.parse().unwrap();
            match outcome {
                "status 200" => counts.0 += count,
                "error: ErrorCode::ConnectionLimitReached" => counts.1 += count,
                other => panic!("unexpected outcome `{other}`"),
            }
        }
    }
    assert_eq!(counts, (4, 2));
    assert_eq!(server.accepted(), 4);
}
