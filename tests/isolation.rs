//! End-to-end tests of what one client or one guest can do to everyone
//! else: each attack, and what a bystander sees while it lasts.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Host, request};

#[test]
fn running_out_of_descriptors_pauses_accepting_logs_once_and_recovers() {
    // Few enough descriptors that idle connections use them all up.
    let mut host = Host::start_with_open_files(
        "[http]\nlisten = \"127.0.0.1:0\"\n[process.web]\nkind = \"web\"\ncomponent = \"{hello}\"\n",
        64,
    );
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&host.admin).unwrap())
        .collect();
    host.wait_for_log("admin API: cannot accept connections");
    // Held for a second: a loop that spins would fail thousands of times.
    std::thread::sleep(Duration::from_secs(1));
    drop(idle);
    let recovered = host.wait_for_log("admin API: accepting connections again after");
    let failures: u64 = recovered
        .split("after ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in `{recovered}`"));
    assert!(
        failures < 100,
        "{failures} failed accepts in about a second: the loop did not pause"
    );
    // One warning per burst, not per failure (closing the idle connections
    // frees descriptors one at a time, so a few short bursts may follow).
    let warnings = host.count("cannot accept connections");
    assert!(
        warnings < 10,
        "{warnings} warnings:\n{}",
        host.log().join("\n")
    );
    // Both listeners answer again.
    let start = Instant::now();
    loop {
        let reply = request(&host.admin, "GET", "/healthz", None, None);
        if reply.status == 200 {
            break;
        }
        assert!(start.elapsed() < common::DEADLINE);
    }
    assert_eq!(host.get("/").status, 200);
    assert!(host.terminate().success());
}

/// A web type `testbed` (the test guest) and a bystander `hello`, with
/// `extra` lines in `[http]` and in the testbed table.
fn attacked(http: &str, testbed: &str) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n{http}\n\n[process.testbed]\nkind = \"web\"\ncomponent = \"{{testbed}}\"\nroutes = [\"/\"]\n{testbed}\n\n[process.hello]\nkind = \"web\"\ncomponent = \"{{hello}}\"\nroutes = [\"/hello\"]\n"
    )
}

/// Sends `head` (and nothing more) on a new connection.
fn open_with(addr: &str, head: &[u8]) -> TcpStream {
    use std::io::Write as _;
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head).unwrap();
    stream
}

/// Reads until the peer closes the connection (or the deadline passes);
/// returns what it sent.
fn read_to_close(stream: &mut TcpStream) -> String {
    use std::io::Read as _;
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut seen = Vec::new();
    let _ = stream.read_to_end(&mut seen);
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn a_slow_upload_gets_408_and_frees_its_instance() {
    use std::io::Write as _;
    let host = Host::start(&attacked(
        "min_body_rate = \"1KiB\"",
        "scale = 1\nbacklog = 0",
    ));
    // One byte a second of a 1,000-byte body: far below 1 KiB/s.
    let mut slow = open_with(
        &host.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\ncontent-length: 1000\r\n\r\n",
    );
    let started = Instant::now();
    let answer = loop {
        if slow.write_all(b"x").is_err() {
            break read_to_close(&mut slow);
        }
        slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 512];
        use std::io::Read as _;
        if let Ok(n) = slow.read(&mut buf)
            && n > 0
        {
            break String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        assert!(
            started.elapsed() < common::DEADLINE,
            "no answer to the slow upload"
        );
    };
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("request body arrived too slowly"),
        "{answer}"
    );
    // The only instance is free again at once.
    assert_eq!(host.get("/").status, 200);
    assert_eq!(host.count("crash-looping"), 0);
}

#[test]
fn a_connection_that_sends_no_head_is_closed_after_the_header_timeout() {
    let host = Host::start(&attacked("header_timeout = \"1s\"", ""));
    let mut partial = open_with(&host.addr, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    let mut silent = TcpStream::connect(&host.addr).unwrap();
    // Both are closed by the host (a read returns), long before the deadline.
    read_to_close(&mut partial);
    read_to_close(&mut silent);
    // A keep-alive connection that goes idle is closed the same way.
    let mut idle = open_with(&host.addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    let seen = read_to_close(&mut idle);
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert_eq!(host.get("/hello").status, 200);
}

#[test]
fn beyond_max_connections_new_connections_get_503_and_the_admin_api_still_answers() {
    let mut host = Host::start(&attacked("max_connections = 5", ""));
    let held: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(&host.addr).unwrap())
        .collect();
    let mut sixth = open_with(&host.addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    let seen = read_to_close(&mut sixth);
    assert!(seen.starts_with("HTTP/1.1 503"), "{seen}");
    assert!(seen.contains("too many connections"), "{seen}");
    host.wait_for_log("HTTP: 5 connections open, the most allowed");
    assert_eq!(
        request(&host.admin, "GET", "/healthz", None, None).status,
        200
    );
    drop(held);
    // Room again once they close.
    let start = Instant::now();
    while request_status(&host.addr, "/hello") != 200 {
        assert!(start.elapsed() < common::DEADLINE);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_admin_client_without_a_token_cannot_keep_a_connection() {
    let host = Host::start(&attacked("", ""));
    // Keep-alive requests, refused or probes: each answer closes its
    // connection, so such a client cannot sit on the admin API's few.
    for path in ["/ps", "/healthz", "/readyz"] {
        let head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let mut stream = open_with(&host.admin, head.as_bytes());
        let start = Instant::now();
        let seen = read_to_close(&mut stream);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{path}: held open"
        );
        assert!(seen.contains("connection: close"), "{path}: {seen}");
    }
    // With the token, the connection stays for the next request.
    let token = host.admin_token();
    let head = format!(
        "GET /ps HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\nGET /ps HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let mut stream = open_with(&host.admin, head.as_bytes());
    let seen = read_to_close(&mut stream);
    assert_eq!(seen.matches("HTTP/1.1 200").count(), 2, "{seen}");
}

/// The status of `GET path`, or 0 if the connection was refused or cut.
fn request_status(addr: &str, path: &str) -> u16 {
    use std::io::Write as _;
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return 0;
    };
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if stream.write_all(head.as_bytes()).is_err() {
        return 0;
    }
    read_to_close(&mut stream)
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn sigterm_closes_idle_connections_at_once_instead_of_waiting_the_grace() {
    // A grace longer than the test's deadline: waiting it out fails the test.
    let mut host = Host::start(&attacked("shutdown_grace = \"10m\"", ""));
    let _silent = TcpStream::connect(&host.addr).unwrap();
    let _partial = open_with(&host.addr, b"GET / HTTP/1.1\r\nHost: x\r\n");
    let mut idle = open_with(&host.addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    idle.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut buf = [0u8; 256];
    use std::io::Read as _;
    assert!(
        idle.read(&mut buf).unwrap() > 0,
        "the idle connection was answered"
    );
    assert!(host.terminate().success());
}

#[test]
fn a_chunked_body_over_the_limit_gets_413() {
    use std::io::Write as _;
    let host = Host::start(&attacked("", "limits = { body = \"1KiB\" }"));
    let mut stream = open_with(
        &host.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for _ in 0..4 {
        // 1 KiB chunks: the second one crosses the limit.
        let _ = stream.write_all(b"400\r\n");
        let _ = stream.write_all(&[b'a'; 1024]);
        let _ = stream.write_all(b"\r\n");
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let seen = read_to_close(&mut stream);
    assert!(seen.starts_with("HTTP/1.1 413"), "{seen}");
    assert!(
        seen.contains("request body is larger than 1024 bytes"),
        "{seen}"
    );
    assert_eq!(host.count("crash-looping"), 0);
}

#[test]
fn a_failure_after_the_answer_started_cuts_the_connection_and_is_logged() {
    let mut host = Host::start(&attacked("", ""));
    let mut stream = open_with(
        &host.addr,
        b"GET /partial?bytes=10000 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let seen = read_to_close(&mut stream);
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    // Chunked: a whole answer ends with the zero-length chunk; this one may not.
    assert!(
        !seen.ends_with("0\r\n\r\n"),
        "the cut answer looks whole:\n{seen}"
    );
    let line = host.wait_for_log("request failed after it answered (trap)");
    assert!(line.contains("instance=testbed."), "{line}");
}

#[test]
fn clients_that_hang_up_are_not_guest_failures() {
    use std::io::Write as _;
    let host = Host::start(&attacked("", "scale = 20"));
    for n in 1..=20 {
        let mut client = TcpStream::connect(&host.addr).unwrap();
        client
            .write_all(b"GET /sleep?ms=200&bytes=100000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // Hang up once the unit has started.
        host.wait_until("the unit started", |log| {
            log.iter().filter(|l| l.contains("sleeping 200 ms")).count() >= n
        });
        drop(client);
    }
    // Each guest writes its answer after its client left, fails to (and
    // traps), and is counted as the client's doing.
    let testbed = "process=\"testbed\"";
    let value = |text: &str, name: &str, reason: Option<&str>| {
        let reason = reason.map(|r| format!("reason=\"{r}\""));
        let mut labels = vec![testbed];
        labels.extend(reason.as_deref());
        common::metric(text, name, &labels)
    };
    host.wait_until("every started unit ended", |_| {
        let text = host.metrics();
        let started = value(&text, "wasmproc_units_started_total", None);
        started >= 20.0 && value(&text, "wasmproc_unit_duration_seconds_count", None) == started
    });
    let text = host.metrics();
    let started = value(&text, "wasmproc_units_started_total", None);
    let succeeded = value(&text, "wasmproc_units_succeeded_total", None);
    let client = value(&text, "wasmproc_units_failed_total", Some("client"));
    assert_eq!(
        value(&text, "wasmproc_units_failed_total", Some("trap")),
        0.0,
        "{text}"
    );
    assert!(client >= 1.0, "no unit failed for its client:\n{text}");
    assert_eq!(client + succeeded, started, "{text}");
    assert_eq!(host.count("crash-looping"), 0, "{:?}", host.log());
    // And the next request is served at once, not after a backoff.
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn with_reuse_an_instance_that_did_not_answer_is_discarded() {
    let host = Host::start(&attacked("", "scale = 1\nreuse = 100"));
    assert_eq!(host.get("/counter").body, "1\n");
    assert_eq!(host.get("/counter").body, "2\n");
    let reply = host.get("/noanswer");
    assert_eq!(reply.status, 500, "{reply:?}");
    assert_eq!(reply.body, "`testbed` returned without a response\n");
    // A fresh instance: its counter starts again.
    assert_eq!(host.get("/counter").body, "1\n");
    assert_eq!(host.get("/counter").body, "2\n");
}

/// The resident set size of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_guest_cannot_make_the_host_hold_unbounded_memory() {
    let mut host = Host::start(&attacked("", "scale = 4\nlimits = { memory = \"4MiB\" }"));
    assert_eq!(host.get("/hello").status, 200);
    let before = rss_kib(host.pid());
    let addr = host.addr.clone();
    // Four at once: thousands of header sets of 120 KiB, and of stdout handles.
    let bombs: Vec<_> = [
        "/fields?n=5000&kib=120",
        "/fields?n=5000&kib=120",
        "/streams?n=20000",
        "/streams?n=20000",
    ]
    .into_iter()
    .map(|path| {
        let addr = addr.clone();
        std::thread::spawn(move || request(&addr, "GET", path, None, None))
    })
    .collect();
    // A bystander keeps its 200s meanwhile.
    for _ in 0..20 {
        assert_eq!(host.get("/hello").status, 200);
    }
    for bomb in bombs {
        let reply = bomb.join().unwrap();
        assert_eq!(reply.status, 500, "{reply:?}");
        assert_eq!(
            reply.body,
            "`testbed` held more host resources than its limit\n"
        );
    }
    host.wait_for_log("request failed (resources); instance discarded");
    let grown = rss_kib(host.pid()).saturating_sub(before);
    // The README's worst case for one instance is 32 MiB; four of them.
    assert!(grown < 4 * 32 * 1024, "RSS grew by {grown} KiB");
    eprintln!("host RSS {before} KiB before the bombs, +{grown} KiB after");
}

#[test]
fn guest_output_is_one_line_per_newline_escaped_and_rate_limited() {
    let mut host = Host::start(&attacked("", "limits = { log_rate = 10 }"));
    // One line written in six pieces is one log line.
    assert_eq!(
        host.get("/print?parts=start%20a%20print%20,1,2,3,4,%0A")
            .status,
        200
    );
    let line = host.wait_for_log("start a print 1234");
    assert!(
        line.contains("instance=testbed.1") && line.contains("stream=\"stderr\""),
        "{line}"
    );
    // A carriage return cannot forge a line of the host's own.
    assert_eq!(host.get("/print?parts=fake%0DINFO%20forged%0A").status, 200);
    host.wait_for_log("fake\\u{d}INFO forged");
    // 1,000 lines at 10 a second: a burst of 100 gets through, the rest are counted.
    assert_eq!(host.get("/flood?n=1000").body, "printed 1000\n");
    let dropped = host.wait_for_log("lines dropped");
    let logged = host.count("flood line");
    assert!(logged <= 110, "{logged} flood lines logged");
    assert!(dropped.contains("instance=testbed."), "{dropped}");
}

#[test]
fn a_closed_stdout_does_not_stop_the_host() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let formation = dir.path().join("formation.toml");
    std::fs::write(
        &formation,
        common::expand(&format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n[process.testbed]\nkind = \"web\"\ncomponent = \"{{testbed}}\"\n"
        )),
    )
    .unwrap();
    // `head` reads the first lines of the log, then closes the pipe.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" run --cache-dir \"$1\" \"$2\" | head -n 3 >/dev/null")
        .arg(env!("CARGO_BIN_EXE_wasmproc"))
        .arg(common::shared_cache())
        .arg(&formation)
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while request_status(&addr, "/") != 200 {
        assert!(
            start.elapsed() < common::DEADLINE,
            "the host never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every request now logs into a closed pipe.
    for _ in 0..20 {
        assert_eq!(request_status(&addr, "/log?msg=into-the-void"), 200);
    }
    let _ = std::process::Command::new("pkill")
        .args(["-TERM", "-f", &formation.display().to_string()])
        .status();
    let _ = child.wait();
}

#[test]
fn web_pages_and_stale_tokens_cannot_drive_the_admin_api() {
    use std::os::unix::fs::PermissionsExt as _;
    let host = Host::start(&attacked("", "scale = 2"));
    let token_file = host.dir().join(".wasmproc/admin.token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
    let post = |headers: &[(&str, &str)]| {
        common::request_with(&host.admin, "POST", "/scale", headers, Some(b"testbed=7")).status
    };
    // A form a page posts (text/plain, its own Origin), with no token.
    assert_eq!(
        post(&[
            ("origin", "http://evil.example"),
            ("content-type", "text/plain")
        ]),
        403
    );
    // A DNS-rebinding page: its own name as Host, a matching Origin.
    let admin_port = host.admin.rsplit(':').next().unwrap().to_string();
    let rebound = format!("evil.example:{admin_port}");
    let origin = format!("http://{rebound}");
    assert_eq!(post(&[("host", &rebound), ("origin", &origin)]), 403);
    // No token, or a wrong one.
    assert_eq!(post(&[]), 401);
    assert_eq!(post(&[("authorization", "Bearer guess")]), 401);
    // Nothing changed; the CLI, with the host's own token, works.
    let (code, stdout, stderr) = host.cli(&["scale", "testbed=3"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "testbed=3");
}

#[test]
fn the_cli_sends_the_token_named_by_token_env_to_an_explicit_address() {
    let host = Host::start_with(
        &attacked("", "").replace(
            "[http]",
            "[admin]\ntoken_env = \"MY_ADMIN_TOKEN\"\n\n[http]",
        ),
        &common::shared_cache(),
        &[("MY_ADMIN_TOKEN", "operator-secret")],
    );
    let out = common::wasmproc()
        .args(["ps", "--admin", &host.admin, "--formation"])
        .arg(host.dir().join("formation.toml"))
        .env("MY_ADMIN_TOKEN", "operator-secret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = common::wasmproc()
        .args(["ps", "--admin", &host.admin])
        .env("WASMPROC_ADMIN_TOKEN", "not-it")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing or wrong bearer token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Seconds `process`'s guests slept under `limits.cpu`, from `/metrics`
/// (the series must be there, even at 0).
fn throttled(host: &Host, process: &str) -> f64 {
    let text = host.metrics();
    let series = format!("wasmproc_cpu_throttled_seconds_total{{process=\"{process}\"}}");
    assert!(text.contains(&series), "no {series} in\n{text}");
    common::metric(
        &text,
        "wasmproc_cpu_throttled_seconds_total",
        &[&format!("process=\"{process}\"")],
    )
}

#[test]
fn a_type_under_a_cpu_limit_sleeps_to_stay_within_it_while_others_answer() {
    // `testbed` may run wasm on a tenth of a core.
    let host = Host::start(&attacked(
        "",
        "scale = 4\nlimits = { timeout = \"1s\", cpu = 0.1 }",
    ));
    // Waiting is not computing: requests that mostly sleep are never held
    // back, however many ticks they span.
    for _ in 0..10 {
        assert_eq!(host.get("/sleep?ms=20").status, 200);
    }
    assert_eq!(throttled(&host, "testbed"), 0.0);

    // Short units add up: four clients asking for 300 µs of computing
    // each, for half a second. Unlimited, two cores serve thousands; a
    // tenth of a core (host calls aside) a few hundred.
    let spins: Vec<_> = (0..4)
        .map(|_| {
            let addr = host.addr.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_millis(500);
                let mut served = 0;
                while Instant::now() < until {
                    let reply = request(&addr, "GET", "/spin?us=300", None, None);
                    assert_eq!(reply.status, 200, "{reply:?}");
                    served += 1;
                }
                served
            })
        })
        .collect();
    let served: u32 = spins.into_iter().map(|s| s.join().unwrap()).sum();
    assert!(served < 1000, "{served} spins of 300 µs in half a second");
    assert!(throttled(&host, "testbed") > 0.0);

    // Two guests spin until their deadline, most of it asleep; the
    // bystander answers meanwhile and is never held back.
    let before = throttled(&host, "testbed");
    let spinning: Vec<_> = (0..2)
        .map(|_| {
            let addr = host.addr.clone();
            std::thread::spawn(move || request(&addr, "GET", "/loop", None, None))
        })
        .collect();
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(host.get("/hello").status, 200);
    }
    for spin in spinning {
        let reply = spin.join().unwrap();
        assert_eq!(reply.status, 504, "{reply:?}");
        assert_eq!(reply.body, "`testbed` did not answer within 1s\n");
    }
    // Two guests sharing a tenth of a core for a second compute a tenth
    // of a second between them: nearly two seconds asleep.
    let slept = throttled(&host, "testbed") - before;
    assert!(slept > 1.2, "slept {slept} s");
    assert_eq!(throttled(&host, "hello"), 0.0);
}

#[test]
fn a_guest_gets_at_most_a_mebibyte_of_randomness_per_call() {
    // More would cost the host tens of milliseconds of an executor thread.
    let host = Host::start(&attacked("", ""));
    let reply = host.get("/random?bytes=1048576");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "1048576 random bytes\n")
    );
    assert_eq!(host.get("/random?bytes=1048577").status, 500);
    assert_eq!(host.get("/hello").status, 200);
}
