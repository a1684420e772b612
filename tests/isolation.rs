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
