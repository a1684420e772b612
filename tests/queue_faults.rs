//! What an operator meets on a bad day with the queues, reproduced against
//! the real binary (and a real `redis-server`): a Redis that lost its data,
//! an enqueue Redis did not confirm, entries written by something else,
//! huge delays, short retries, `kill -9`, a queue full of large messages,
//! clocks on several hosts, names and values from the CLI, idempotency
//! keys, large replays.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{DEADLINE, Host, RedisServer, metric};

/// A web type that may enqueue onto `queue`, and a worker consuming it.
fn formation(queue_table: &str, queue: &str) -> String {
    format!(
        r#"
[http]
listen = "127.0.0.1:0"
{queue_table}

[process.web]
kind = "web"
component = "{{testbed}}"
enqueue = ["{queue}"]

[process.jobs]
kind = "worker"
component = "{{testworker}}"
queue = "{queue}"
scale = 2
limits = {{ timeout = "1s" }}
retry = {{ attempts = 5, backoff = "50ms..200ms" }}
"#
    )
}

fn redis_table(redis: &RedisServer) -> String {
    format!("[queue]\nbackend = \"redis\"\nurl = \"{}\"", redis.url)
}

/// The number after `at=` in a line the test worker logged.
fn at(line: &str) -> u64 {
    line.split(" at=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `at=` in {line}"))
}

/// The queue depth `wasmproc ps --json` reports for `process`.
fn depth(host: &Host, process: &str) -> u64 {
    let (code, stdout, stderr) = host.cli(&["ps", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(stdout.trim()).unwrap();
    let row = rows.iter().find(|r| r["name"] == process).unwrap();
    row["queue_depth"].as_u64().unwrap()
}

#[test]
fn a_redis_that_lost_its_data_gets_its_consumer_group_back() {
    let redis = RedisServer::start();
    let mut host = Host::start(&formation(&redis_table(&redis), "jobs"));
    assert_eq!(host.enqueue("jobs", "ok:before").status, 202);
    host.wait_for_log("processed before ");
    redis.cli(&["FLUSHALL"]);
    host.wait_for_log("the consumer group of queue `jobs` is gone");
    assert_eq!(host.enqueue("jobs", "ok:after").status, 202);
    host.wait_for_log("processed after ");
    assert_eq!(host.count("cannot lease messages"), 0, "{:?}", host.log());
}

#[test]
fn an_enqueue_redis_did_not_confirm_says_so_and_a_keyed_retry_adds_nothing() {
    let redis = RedisServer::start();
    let mut host = Host::start(&formation(&redis_table(&redis), "jobs"));
    let send = |host: &Host| {
        host.admin_request_with(
            "POST",
            "/queues/jobs/messages",
            &[("idempotency-key", "order-7")],
            Some(b"ok:u1"),
        )
    };
    // A first message, so Redis knows the host's scripts.
    assert_eq!(host.enqueue("jobs", "ok:warm").status, 202);
    host.wait_for_log("processed warm ");
    // Redis holds every write for 4 s: longer than the host waits for it.
    redis.cli(&["CLIENT", "PAUSE", "4000", "WRITE"]);
    let unconfirmed = send(&host);
    assert_eq!(unconfirmed.status, 504, "{}", unconfirmed.body);
    assert!(
        unconfirmed
            .body
            .contains("the message may or may not have been enqueued"),
        "{}",
        unconfirmed.body
    );
    // It was enqueued after all, once Redis went on.
    host.wait_for_log("processed u1 ");
    // The client sends it again with the same key: nothing is added.
    let again = send(&host);
    assert_eq!(again.status, 200, "{}", again.body);
    let again: serde_json::Value = serde_json::from_str(&again.body).unwrap();
    assert_eq!(again["duplicate"], true);
    let line = host
        .log()
        .into_iter()
        .find(|l| l.contains("processed u1 "))
        .unwrap();
    assert!(
        line.contains(&format!("id={} ", again["id"].as_str().unwrap())),
        "{line} / {again}"
    );
    assert_eq!(host.enqueue("jobs", "ok:sentinel").status, 202);
    host.wait_for_log("processed sentinel ");
    assert_eq!(host.count("processed u1 "), 1);
}

#[test]
fn a_malformed_stream_entry_is_dead_lettered_with_a_log_line() {
    let redis = RedisServer::start();
    let mut host = Host::start(&formation(&redis_table(&redis), "jobs"));
    let entry = redis.cli(&["XADD", "wasmproc:q:jobs", "*", "foo", "bar"]);
    let entry = entry.trim();
    let line = host.wait_for_log("dead-lettered a malformed stream entry");
    assert!(
        line.contains(&format!("`{entry}`: it has no `mid` field")),
        "{line}"
    );
    let (code, stdout, stderr) = host.cli(&["dlq", "list", "jobs"]);
    assert_eq!(code, 0, "{stderr}");
    let letter: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(letter["id"], entry);
    assert_eq!(letter["body"], "foo=bar\n");
    // The queue goes on.
    assert_eq!(host.enqueue("jobs", "ok:next").status, 202);
    host.wait_for_log("processed next ");
    let pending = redis.cli(&["XPENDING", "wasmproc:q:jobs", "wasmproc"]);
    assert!(
        pending.starts_with("0\n"),
        "nothing stays pending: {pending}"
    );
}

#[test]
fn huge_delays_are_refused_with_the_limit_never_delivered_at_once() {
    let host = Host::start(&formation("", "jobs"));
    for delay in ["600000000years", "1year"] {
        let reply = host.admin_request(
            "POST",
            &format!("/queues/jobs/messages?delay={delay}"),
            Some(b"ok:never"),
        );
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert_eq!(
            reply.body,
            format!(
                r#"{{"error":"a delay of {delay} is longer than the limit of 30days (`[queue] max_delay`)"}}"#
            )
        );
    }
    let guest = host.get("/enqueue?queue=jobs&body=ok:never&delay=18446744073709551615");
    assert_eq!(
        guest.body,
        "error: EnqueueError::DelayTooLong(2592000000)\n"
    );
    assert_eq!(depth(&host, "jobs"), 0);
}

#[test]
fn a_retry_beyond_the_maximum_delay_is_capped_with_a_log_line() {
    let mut host = Host::start(&formation("[queue]\nmax_delay = \"2s\"", "jobs"));
    let sent = Instant::now();
    assert_eq!(
        host.enqueue("jobs", &format!("retry:huge:2:{}", u64::MAX))
            .status,
        202
    );
    let capped = host.wait_for_log("capped at `[queue] max_delay` (2s)");
    assert!(capped.contains("attempt=1"), "{capped}");
    host.wait_for_log("processed huge attempt=2");
    assert!(sent.elapsed() >= Duration::from_secs(2));
}

#[test]
fn a_short_retry_delay_is_kept_not_rounded_up_to_a_poll() {
    let mut host = Host::start(&formation("", "jobs"));
    assert_eq!(host.enqueue("jobs", "retry:fast:4:50").status, 202);
    let done = host.wait_for_log("processed fast attempt=4");
    let mut times: Vec<u64> = host
        .log()
        .iter()
        .filter(|l| l.contains("retrying fast attempt="))
        .map(|l| at(l))
        .collect();
    times.push(at(&done));
    assert_eq!(times.len(), 4, "{:?}", host.log());
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|&g| g >= 50), "never early: {gaps:?}");
    // An idle worker used to look every 250 ms: three redeliveries took
    // 750 ms or more. Woken when each comes due, they take about 150 ms.
    assert!(gaps.iter().sum::<u64>() < 500, "{gaps:?}");
}

#[test]
fn after_kill_9_a_redelivery_counts_the_interrupted_attempt() {
    let mut host = Host::start(&formation("", "jobs"));
    assert_eq!(host.enqueue("jobs", "sleep:c1:800").status, 202);
    host.wait_for_log("sleeping c1");
    host.kill9();
    let before = host.log();
    let dir = host.into_dir();
    let path = dir.path().join("formation.toml");
    let mut again = Host::restart_in(dir, &path);
    // Its lease (3 s) expires, then it comes back as the second attempt.
    again.wait_for_log("processed c1 attempt=2");
    assert!(
        !before
            .iter()
            .chain(again.log().iter())
            .any(|l| l.contains("processed c1 attempt=1")),
        "{before:?}"
    );
}

#[test]
fn after_kill_9_acknowledged_messages_stay_acknowledged() {
    let host = Host::start(&formation("", "jobs"));
    let total = 20;
    for i in 0..total {
        assert_eq!(host.enqueue("jobs", &format!("ok:d{i}")).status, 202);
    }
    host.wait_until("every message processed", |log| {
        (0..total).all(|i| log.iter().any(|l| l.contains(&format!("processed d{i} "))))
    });
    // Acks become durable within 10 ms of the last one; nothing a test can
    // watch marks that moment, so give it ten times as long.
    std::thread::sleep(Duration::from_millis(100));
    let mut host = host;
    host.kill9();
    let dir = host.into_dir();
    let path = dir.path().join("formation.toml");
    let mut again = Host::restart_in(dir, &path);
    assert_eq!(depth(&again, "jobs"), 0, "acknowledged messages came back");
    assert_eq!(again.enqueue("jobs", "ok:sentinel").status, 202);
    again.wait_for_log("processed sentinel ");
    assert_eq!(again.count("processed d"), 0, "{:?}", again.log());
}

#[test]
fn a_queue_is_bounded_by_bytes_and_reports_them() {
    let host = Host::start(&formation(
        "[queue]\nmax_message = \"256KiB\"\nmax_bytes = \"1MiB\"",
        "jobs",
    ));
    // Delayed messages of 200,000 bytes from a guest: five fit in 1 MiB.
    let mut accepted = 0;
    loop {
        let reply = host.get("/enqueue?queue=jobs&body=ok:big&size=200000&delay=3600000");
        if reply.body.starts_with("enqueued ") {
            accepted += 1;
            assert!(accepted < 10, "the queue never filled up");
            continue;
        }
        assert_eq!(reply.body, "error: EnqueueError::QueueFull\n");
        break;
    }
    assert_eq!(accepted, 5);
    let full = host.admin_request(
        "POST",
        "/queues/jobs/messages?delay=1h",
        Some(&[b'x'; 200_000]),
    );
    assert_eq!(full.status, 503, "{}", full.body);
    assert_eq!(full.retry_after.as_deref(), Some("5"));
    assert_eq!(
        full.body,
        r#"{"error":"queue `jobs` is full: it may hold 1048576 bytes of messages (`[queue] max_bytes`); try again once its workers have caught up"}"#
    );
    // A small message still fits.
    assert_eq!(host.enqueue("jobs", "ok:small").status, 202);
    host.wait_until("depth and bytes in /metrics", |_| {
        let text = host.metrics();
        let bytes = metric(&text, "wasmproc_queue_bytes", &["process=\"jobs\""]);
        metric(&text, "wasmproc_queue_depth", &["process=\"jobs\""]) == 5.0
            && (1_000_000.0..=1_048_576.0).contains(&bytes)
    });
}

#[test]
fn two_hosts_on_one_redis_run_each_clock_firing_once() {
    let redis = RedisServer::start();
    let formation = format!(
        "{}\n\n[process.tick]\nkind = \"clock\"\ncomponent = \"{{testclock}}\"\nschedule = \"* * * * * *\"\n",
        redis_table(&redis)
    );
    let a = Host::start(&formation);
    let b = Host::start(&formation);
    let both_up = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let firings = || {
        let mut runs: BTreeMap<u64, usize> = BTreeMap::new();
        for line in a.log().iter().chain(b.log().iter()) {
            if let Some(rest) = line.split("tick tick scheduled=").nth(1) {
                let at: u64 = rest.split_whitespace().next().unwrap().parse().unwrap();
                *runs.entry(at).or_default() += 1;
            }
        }
        runs
    };
    let start = Instant::now();
    while firings().range(both_up..).count() < 4 {
        assert!(start.elapsed() < DEADLINE, "too few ticks: {:?}", firings());
        std::thread::sleep(Duration::from_millis(50));
    }
    let runs = firings();
    assert!(
        runs.values().all(|&n| n == 1),
        "a firing ran on both hosts: {runs:?}"
    );
}

#[test]
fn names_with_dashes_and_underscores_and_spaced_delays_work_from_the_cli() {
    let mut host = Host::start(&formation("", "my-jobs_1"));
    let (code, stdout, stderr) =
        host.cli(&["enqueue", "my-jobs_1", "ok:later", "--delay", "1m 30s"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.trim().is_empty());
    let (code, _, stderr) = host.cli(&["enqueue", "my-jobs_1", "ok:now"]);
    assert_eq!(code, 0, "{stderr}");
    host.wait_for_log("processed now ");
    assert_eq!(
        host.count("processed later "),
        0,
        "delivered before its delay"
    );
    assert_eq!(depth(&host, "jobs"), 1);

    let (code, _, stderr) = host.cli(&["enqueue", "my-jobs_1", "x", "--delay", "soon"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid `delay`"), "{stderr}");

    let (code, _, stderr) = host.cli(&["enqueue", "my-jobs_1", "reject:r1"]);
    assert_eq!(code, 0, "{stderr}");
    host.wait_for_log("message rejected: dead-lettered");
    let (code, stdout, stderr) = host.cli(&["dlq", "list", "my-jobs_1"]);
    assert_eq!(code, 0, "{stderr}");
    let letter: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (code, stdout, stderr) =
        host.cli(&["dlq", "replay", "my-jobs_1", letter["id"].as_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "replayed 1 message");
    host.wait_until("the replayed message is rejected again", |log| {
        log.iter()
            .filter(|l| l.contains("message rejected: dead-lettered"))
            .count()
            == 2
    });
}

#[test]
fn an_idempotency_key_enqueues_once_through_the_api_and_the_cli() {
    let mut host = Host::start(&formation("", "jobs"));
    let send = || {
        host.admin_request_with(
            "POST",
            "/queues/jobs/messages",
            &[("idempotency-key", "order-42")],
            Some(b"ok:k1"),
        )
    };
    let first = send();
    assert_eq!(first.status, 202, "{}", first.body);
    let first: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    let second = send();
    assert_eq!(second.status, 200, "{}", second.body);
    let second: serde_json::Value = serde_json::from_str(&second.body).unwrap();
    assert_eq!(
        second,
        serde_json::json!({ "id": first["id"], "queue": "jobs", "duplicate": true })
    );

    let cli = |host: &Host| host.cli(&["enqueue", "jobs", "ok:k2", "--key", "order-43"]);
    let (code, id, stderr) = cli(&host);
    assert_eq!((code, stderr.as_str()), (0, ""));
    let (code, again, stderr) = cli(&host);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again, id);
    assert_eq!(
        stderr.trim(),
        "already enqueued with key `order-43`: nothing added"
    );
    let long = "k".repeat(300);
    let refused = host.cli(&["enqueue", "jobs", "ok:k3", "--key", &long]);
    assert_eq!(refused.0, 1);
    assert!(
        refused
            .2
            .contains("invalid idempotency key: expected 1 to 256 bytes, got 300"),
        "{}",
        refused.2
    );

    assert_eq!(host.enqueue("jobs", "ok:sentinel").status, 202);
    host.wait_for_log("processed sentinel ");
    host.wait_for_log("processed k1 ");
    host.wait_for_log("processed k2 ");
    assert_eq!(host.count("processed k1 "), 1);
    assert_eq!(host.count("processed k2 "), 1);
}

#[test]
fn a_replay_of_many_ids_moves_them_all() {
    let host = Host::start(&formation("", "jobs"));
    let total = 300;
    for i in 0..total {
        assert_eq!(host.enqueue("jobs", &format!("reject:x{i}")).status, 202);
    }
    let rejected = |n: usize| {
        move |log: &[String]| {
            log.iter()
                .filter(|l| l.contains("message rejected: dead-lettered"))
                .count()
                == n
        }
    };
    host.wait_until("every message dead-lettered", rejected(total));
    let (code, stdout, stderr) = host.cli(&["dlq", "list", "jobs"]);
    assert_eq!(code, 0, "{stderr}");
    let ids: Vec<String> = stdout
        .lines()
        .map(|l| {
            let letter: serde_json::Value = serde_json::from_str(l).unwrap();
            letter["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), total);
    let mut args = vec!["dlq", "replay", "jobs"];
    args.extend(ids.iter().map(String::as_str));
    let (code, stdout, stderr) = host.cli(&args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), format!("replayed {total} messages"));
    host.wait_until("every replayed message rejected again", rejected(2 * total));
}
