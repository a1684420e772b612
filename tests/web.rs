//! End-to-end tests of web process types: the real `wasmproc run`, real
//! HTTP, the test guests in guests/.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::{Host, request, wasmproc};

fn testbed(extra: &str) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[process.testbed]\nkind = \"web\"\ncomponent = \"{{testbed}}\"\n{extra}\n"
    )
}

#[test]
fn routes_by_longest_prefix_and_by_host() {
    let host = Host::start(
        r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{hello}"
routes = ["/"]
env = { GREETING = "Root" }

[process.api]
kind = "web"
component = "{hello}"
routes = ["/api"]
env = { GREETING = "Api" }

[process.admin]
kind = "web"
component = "{hello}"
routes = ["admin.example.com/"]
env = { GREETING = "Admin" }
"#,
    );
    let body = |path: &str, h: Option<&str>| {
        let reply = host.request("GET", path, h, None);
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        reply.body
    };
    assert_eq!(body("/", None), "Root from wasmproc\n");
    assert_eq!(body("/api", None), "Api from wasmproc\n");
    assert_eq!(body("/api/users?x=1", None), "Api from wasmproc\n");
    assert_eq!(body("/apiary", None), "Root from wasmproc\n");
    assert_eq!(
        body("/", Some("admin.example.com")),
        "Admin from wasmproc\n"
    );
    assert_eq!(
        body("/api", Some("ADMIN.example.com:8080")),
        "Admin from wasmproc\n"
    );
}

#[test]
fn a_path_no_route_matches_gets_404_from_the_host() {
    let host = Host::start(
        "[http]\nlisten = \"127.0.0.1:0\"\n[process.api]\nkind = \"web\"\ncomponent = \"{hello}\"\nroutes = [\"/api\"]\n",
    );
    let reply = host.get("/elsewhere");
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, "no process type serves `/elsewhere`\n");
    assert_eq!(host.get("/api").status, 200);
}

#[test]
fn beyond_scale_and_backlog_requests_get_503_with_retry_after() {
    let host = Host::start(&testbed("scale = 1\nbacklog = 1"));
    let addr = host.addr.clone();
    let replies: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || request(&addr, "GET", "/sleep?ms=1500", None, None))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        ok, 2,
        "one running and one waiting in the backlog: {replies:?}"
    );
    assert_eq!(busy.len(), 2, "{replies:?}");
    for reply in busy {
        assert_eq!(reply.retry_after.as_deref(), Some("1"));
        assert_eq!(reply.body, "`testbed` is at capacity, retry later\n");
    }
}

#[test]
fn a_trap_a_loop_and_a_memory_bomb_fail_alone_while_others_are_served() {
    let mut host = Host::start(&testbed(
        "scale = 4\nlimits = { memory = \"32MiB\", timeout = \"2s\" }",
    ));
    let addr = host.addr.clone();
    let bad: Vec<_> = ["/trap", "/loop", "/memory"]
        .into_iter()
        .map(|path| {
            let addr = addr.clone();
            std::thread::spawn(move || (path, request(&addr, "GET", path, None, None)))
        })
        .collect();
    // Meanwhile the fourth slot keeps serving good requests.
    let good = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            (0..20)
                .map(|_| request(&addr, "GET", "/", None, None))
                .collect::<Vec<_>>()
        })
    };
    for thread in bad {
        let (path, reply) = thread.join().unwrap();
        match path {
            "/trap" => {
                assert_eq!(reply.status, 500, "{reply:?}");
                assert_eq!(reply.body, "`testbed` failed (trap)\n");
            }
            "/loop" => {
                assert_eq!(reply.status, 504, "{reply:?}");
                assert_eq!(reply.body, "`testbed` did not answer within 2s\n");
            }
            _ => {
                assert_eq!(reply.status, 500, "{reply:?}");
                assert_eq!(reply.body, "`testbed` exceeded its memory limit\n");
            }
        }
    }
    for reply in good.join().unwrap() {
        assert_eq!((reply.status, reply.body.as_str()), (200, "testbed ok\n"));
    }
    for reason in ["trap", "timeout", "memory"] {
        let line = host.wait_for_log(&format!("request failed ({reason}); instance discarded"));
        assert!(line.contains("instance=testbed."), "{line}");
    }
    // The guest's panic message reaches the log, tagged with its instance.
    let line = host.wait_for_log("testbed was asked to trap");
    assert!(
        line.contains("instance=testbed.") && line.contains("stream=\"stderr\""),
        "{line}"
    );
    // And the pool still serves afterwards.
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn a_guest_waiting_on_the_host_past_its_timeout_is_stopped() {
    // Epoch interruption only fires in wasm code: a guest asleep in a host
    // call is stopped by the host-side timer, set up once the call waits.
    // Without it the guest would sleep ten minutes, past the client's deadline.
    let mut host = Host::start(&testbed("limits = { timeout = \"1s\" }"));
    let reply = host.get("/sleep?ms=600000");
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(reply.body, "`testbed` did not answer within 1s\n");
    host.wait_for_log("request failed (timeout); instance discarded");
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn a_fuel_budget_stops_a_spinning_guest() {
    let host = Host::start(&testbed("limits = { fuel = 50_000_000 }"));
    let reply = host.get("/loop");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (500, "`testbed` ran out of fuel\n")
    );
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn reuse_1_gives_every_request_a_fresh_instance() {
    let host = Host::start(&testbed("scale = 1"));
    for _ in 0..3 {
        assert_eq!(
            host.get("/counter").body,
            "1\n",
            "state leaked between requests"
        );
    }
}

#[test]
fn reuse_n_keeps_an_instance_warm_for_n_requests() {
    let host = Host::start(&testbed("scale = 1\nreuse = 3"));
    let counts: Vec<_> = (0..5).map(|_| host.get("/counter").body).collect();
    assert_eq!(counts, ["1\n", "2\n", "3\n", "1\n", "2\n"]);
}

#[test]
fn a_failed_instance_is_not_reused() {
    let host = Host::start(&testbed("scale = 1\nreuse = 100"));
    assert_eq!(host.get("/counter").body, "1\n");
    assert_eq!(host.get("/counter").body, "2\n");
    assert_eq!(host.get("/trap").status, 500);
    assert_eq!(
        host.get("/counter").body,
        "1\n",
        "a fresh instance after the trap"
    );
}

#[test]
fn the_sandbox_hides_the_host_environment_files_and_network() {
    let cache = common::shared_cache();
    let target = Host::start(
        "[http]\nlisten = \"127.0.0.1:0\"\n[process.web]\nkind = \"web\"\ncomponent = \"{hello}\"\n",
    );
    let mut host = Host::start_with(
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n\n\
             [process.closed]\nkind = \"web\"\ncomponent = \"{{testbed}}\"\nroutes = [\"/\"]\nenv = {{ FOO = \"bar\" }}\n\n\
             [process.open]\nkind = \"web\"\ncomponent = \"{{testbed}}\"\nroutes = [\"open.test/\"]\nallow_outbound = [\"{}\"]\n",
            target.addr
        ),
        &cache,
        &[("SECRET", "hunter2")],
    );
    assert_eq!(host.get("/env?name=SECRET").body, "unset\n");
    assert_eq!(host.get("/env?name=FOO").body, "bar\n");
    assert_eq!(host.get("/env?name=WASMPROC_INSTANCE").body, "closed.1\n");
    let env = host.get("/env").body;
    let mut names: Vec<_> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    names.sort();
    assert_eq!(names, ["FOO", "WASMPROC_INSTANCE", "WASMPROC_PROCESS"]);

    let file = host.get("/file?path=/etc/passwd").body;
    assert!(file.starts_with("denied:"), "{file}");

    let url = format!("/fetch?url=http://{}/", target.addr);
    assert_eq!(host.get(&url).body, "error: ErrorCode::HttpRequestDenied\n");
    let line = host.wait_for_log("outbound request denied");
    assert!(line.contains("instance=closed.1"), "{line}");

    let allowed = host.request("GET", &url, Some("open.test"), None);
    assert_eq!(allowed.body, "status 200\n");
}

#[test]
fn guest_stdout_and_stderr_are_logged_with_the_instance_name() {
    let mut host = Host::start(&testbed(""));
    assert_eq!(host.get("/log?msg=marker-7f3a").body, "logged\n");
    let out = host.wait_for_log("marker-7f3a");
    assert!(
        out.contains("instance=testbed.1") && out.contains("stream=\"stdout\""),
        "{out}"
    );
    let err = host.wait_for_log("marker-7f3a on stderr");
    assert!(err.contains("stream=\"stderr\""), "{err}");
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let mut host = Host::start(&testbed(""));
    let addr = host.addr.clone();
    let in_flight = std::thread::spawn(move || request(&addr, "GET", "/sleep?ms=1000", None, None));
    host.wait_for_log("sleeping 1000 ms");
    let status = host.terminate();
    let reply = in_flight.join().unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "slept 1000\n"));
    assert!(status.success(), "exit status {status}");
    assert!(host.log().iter().any(|l| l.contains("SIGTERM received")));
    assert!(
        host.log().last().is_some_and(|l| l.ends_with("stopped")),
        "{:?}",
        host.log()
    );
}

#[test]
fn a_second_start_loads_components_from_the_compile_cache() {
    let cache = tempfile::tempdir().unwrap();
    let formation = "[http]\nlisten = \"127.0.0.1:0\"\n[process.web]\nkind = \"web\"\ncomponent = \"{hello}\"\n";
    let mut first = Host::start_with(formation, cache.path(), &[]);
    first.wait_for_log("`web` compiled in");
    assert!(first.terminate().success());
    let mut second = Host::start_with(formation, cache.path(), &[]);
    second.wait_for_log("`web` loaded from the compile cache");
    assert_eq!(second.get("/").body, "Hello from wasmproc\n");
}

#[test]
fn request_bodies_over_the_limit_get_413() {
    let host = Host::start(&testbed("limits = { body = \"1KiB\" }"));
    let small = host.request("POST", "/echo", None, Some(b"ping"));
    assert_eq!((small.status, small.body.as_str()), (200, "ping"));
    let big = host.request("POST", "/echo", None, Some(&[b'x'; 2000]));
    assert_eq!(big.status, 413);
    assert_eq!(big.body, "request body is larger than 1024 bytes\n");
}

#[test]
fn large_bodies_stream_in_and_out_while_the_guest_runs() {
    // 4 MiB is far more than hyper or the guest's streams buffer: the
    // request body streams in while the guest reads it, and the answer
    // streams out while the guest still writes it.
    let host = Host::start(&testbed("limits = { body = \"8MiB\" }"));
    let body: Vec<u8> = (0..4usize << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let reply = host.request("POST", "/echo", None, Some(&body));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), body.len());
    assert!(
        reply.body.as_bytes() == body.as_slice(),
        "echoed body differs"
    );
}

#[test]
fn a_unit_whose_client_hangs_up_still_runs_to_its_end() {
    use std::io::Write as _;
    let mut host = Host::start(&testbed(""));
    let mut client = std::net::TcpStream::connect(&host.addr).unwrap();
    client
        .write_all(b"GET /sleep?ms=300 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    host.wait_for_log("sleeping 300 ms");
    drop(client);
    // The unit is not cut short: it ends (its answer has nowhere to go, so
    // the guest's write fails), it is counted, and its slot is free again.
    let ended = [
        "wasmproc_unit_duration_seconds_count{process=\"testbed\"} 1",
        "wasmproc_instances_busy{process=\"testbed\"} 0",
    ];
    let start = std::time::Instant::now();
    loop {
        let metrics = host.metrics();
        if ended.iter().all(|e| metrics.lines().any(|l| l == *e)) {
            break;
        }
        assert!(
            start.elapsed() < common::DEADLINE,
            "the unit never ended:\n{metrics}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(host.get("/whoami").status, 200);
}

#[test]
fn listen_reads_port_from_the_environment() {
    let formation = "[http]\nlisten = \"127.0.0.1:${PORT:-8080}\"\n[process.web]\nkind = \"web\"\ncomponent = \"{hello}\"\n";
    let host = Host::start_with(formation, &common::shared_cache(), &[("PORT", "0")]);
    assert!(!host.addr.ends_with(":8080"), "{}", host.addr);
    assert_eq!(host.get("/").status, 200);
}

#[test]
fn a_crash_looping_type_backs_off_says_so_and_recovers() {
    let mut host = Host::start(&testbed("scale = 1"));
    for _ in 0..pool_threshold() {
        assert_eq!(host.get("/trap").status, 500);
    }
    host.wait_for_log("process type `testbed` is crash-looping (5 failed units in a row)");
    assert_eq!(host.get("/").status, 200);
    host.wait_for_log("process type `testbed` recovered after 5 failed units in a row");
}

fn pool_threshold() -> u32 {
    wasmproc::pool::CRASH_LOOP_THRESHOLD
}

#[test]
fn check_validates_and_compiles_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("formation.toml");
    std::fs::write(
        &path,
        format!(
            "[process.web]\nkind = \"web\"\ncomponent = \"{}\"\nscale = 3\n",
            common::guest("hello")
        ),
    )
    .unwrap();
    let out = wasmproc().arg("check").arg(&path).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("formation.toml: ok: web (web, scale 3)"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_a_component_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.wasm");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let path = dir.path().join("formation.toml");
    std::fs::write(
        &path,
        "[process.a]\nkind = \"web\"\ncomponent = \"fifo.wasm\"\nroutes = [\"/a\"]\n\n[process.b]\nkind = \"web\"\ncomponent = \"/dev/zero\"\nroutes = [\"/b\"]\n",
    )
    .unwrap();
    // Neither blocks on the FIFO nor reads /dev/zero until memory runs out.
    let out = wasmproc().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fifo.wasm` is not a regular file")
            && stderr.contains("`/dev/zero` is not a regular file"),
        "{stderr}"
    );
}

#[test]
fn duplicate_or_empty_host_headers_get_400() {
    use std::io::{Read as _, Write as _};
    let host = Host::start(&testbed(""));
    for head in [
        "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
    ] {
        let mut stream = std::net::TcpStream::connect(&host.addr).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut seen = String::new();
        let _ = stream.read_to_string(&mut seen);
        assert!(seen.starts_with("HTTP/1.1 400"), "{head:?}: {seen}");
        assert!(
            seen.contains("expected exactly one non-empty Host header"),
            "{seen}"
        );
    }
}

#[test]
fn the_examples_build_and_check() {
    for example in [
        "examples/hello/formation.toml",
        "examples/shop/formation.toml",
    ] {
        let out = wasmproc()
            .args(["check", "--build", "--cache-dir"])
            .arg(common::shared_cache())
            .arg(common::root().join(example))
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{example}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(": ok: "), "{example}: {stdout}");
    }
}
