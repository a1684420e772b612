//! End-to-end tests of WASI 0.3 web components (`wasi:http/service`), with
//! the test guest `testbed3`, beside WASI 0.2 ones in the same formation.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;

use common::{Host, request};

/// A 0.3 type `web3` on `/` and a 0.2 type `hello` on `/hello`, with
/// `extra` lines in the 0.3 type's table.
fn mixed(extra: &str) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[process.web3]\nkind = \"web\"\ncomponent = \"{{testbed3}}\"\nroutes = [\"/\"]\n{extra}\n\n[process.hello]\nkind = \"web\"\ncomponent = \"{{hello}}\"\nroutes = [\"/hello\"]\n"
    )
}

#[test]
fn a_wasi_03_component_serves_beside_a_wasi_02_one() {
    let host = Host::start(&mixed(""));
    assert_eq!(host.get("/").body, "testbed3 ok\n");
    assert_eq!(host.get("/hello").body, "Hello from wasmproc\n");
    assert_eq!(host.get("/whoami").body, "web3.1\n");
    assert_eq!(host.get("/sleep?ms=20").body, "slept 20\n");
}

#[test]
fn bodies_stream_both_ways_with_trailers() {
    let host = Host::start(&mixed("limits = { body = \"4MiB\" }"));
    let body: Vec<u8> = (0..(1 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
    let reply = request(&host.addr, "POST", "/echo", None, Some(&body));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body.as_bytes() == body.as_slice(), "the echo differs");
    // A client that accepts trailers gets the guest's.
    let mut stream = TcpStream::connect(&host.addr).unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        .unwrap();
    let mut seen = String::new();
    stream.read_to_string(&mut seen).unwrap();
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("x-echoed: 5"), "{seen}");
    // A body written in pieces, with the guest yielding between them.
    assert_eq!(host.get("/stream?n=64").body.len(), 64 * 1024);
}

#[test]
fn traps_and_timeouts_fail_alone() {
    let mut host = Host::start(&mixed("scale = 2\nlimits = { timeout = \"1s\" }"));
    let trap = host.get("/trap");
    assert_eq!(
        (trap.status, trap.body.as_str()),
        (500, "`web3` failed (trap)\n")
    );
    let spin = host.get("/loop");
    assert_eq!(spin.status, 504, "{spin:?}");
    let waits = host.get("/sleep?ms=5000");
    assert_eq!(waits.status, 504, "{waits:?}");
    host.wait_for_log("request failed (trap); instance discarded");
    host.wait_for_log("request failed (timeout); instance discarded");
    assert_eq!(host.get("/").status, 200);
    assert_eq!(host.get("/hello").status, 200);
}

#[test]
fn reuse_keeps_a_wasi_03_instance_warm() {
    let host = Host::start(&mixed("scale = 1\nreuse = 10"));
    assert_eq!(host.get("/counter").body, "1\n");
    assert_eq!(host.get("/counter").body, "2\n");
    assert_eq!(host.get("/counter").body, "3\n");
}

#[test]
fn a_deploy_swaps_a_wasi_02_component_for_a_wasi_03_one() {
    let host = Host::start(&mixed(""));
    assert_eq!(host.get("/hello").body, "Hello from wasmproc\n");
    let (code, stdout, stderr) = host.cli(&["deploy", "hello", &common::guest("testbed3")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("generation 2"), "{stdout}");
    // The 0.3 component now answers the 0.2 type's route (testbed3 does
    // not know `/hello`).
    assert_eq!(host.get("/hello").body, "testbed3: no such path\n");
}

#[test]
fn one_instance_serves_concurrency_requests_at_once() {
    // One instance, eight seats, 2 s to answer: eight requests that each
    // wait 1 s all succeed only if they run side by side.
    let host = Host::start(&mixed(
        "scale = 1\nconcurrency = 8\nbacklog = 0\nlimits = { timeout = \"2s\" }",
    ));
    let addr = host.addr.clone();
    let replies: Vec<_> = (0..8)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || request(&addr, "GET", "/whoami?ms=1000", None, None))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for reply in &replies {
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "web3.1\n"),
            "{replies:?}"
        );
    }
    // A ninth at once finds every seat taken and no backlog: 503.
    let busy: Vec<_> = (0..9)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || request(&addr, "GET", "/whoami?ms=500", None, None))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap().status)
        .collect();
    assert_eq!(busy.iter().filter(|s| **s == 200).count(), 8, "{busy:?}");
    assert_eq!(busy.iter().filter(|s| **s == 503).count(), 1, "{busy:?}");
}

#[test]
fn a_trap_fails_the_requests_in_flight_on_its_instance_and_only_those() {
    let mut host = Host::start(&mixed("scale = 1\nconcurrency = 8"));
    let addr = host.addr.clone();
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || request(&addr, "GET", "/sleep?ms=3000", None, None))
        })
        .collect();
    host.wait_until("four requests in flight", |_| {
        common::metric(
            &host.metrics(),
            "wasmproc_instances_busy",
            &["process=\"web3\""],
        ) >= 4.0
    });
    assert_eq!(host.get("/trap").status, 500);
    for thread in waiting {
        let reply = thread.join().unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (500, "`web3` failed (trap)\n")
        );
    }
    host.wait_for_log("instance failed (trap) with 5 requests in flight");
    // A fresh instance serves the next; the other type never noticed.
    assert_eq!(host.get("/counter").body, "1\n");
    assert_eq!(host.get("/hello").status, 200);
}
