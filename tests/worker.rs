//! End-to-end tests of worker and clock process types and the queues: the
//! real `wasmproc` binary, the test guests, a real `redis-server`.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::{Host, RedisServer, request};

/// A web type that may enqueue onto `jobs`, and a worker consuming it.
fn web_and_worker(queue_table: &str, worker_extra: &str) -> String {
    format!(
        r#"
[http]
listen = "127.0.0.1:0"
{queue_table}

[process.web]
kind = "web"
component = "{{testbed}}"
enqueue = ["jobs"]

[process.jobs]
kind = "worker"
component = "{{testworker}}"
queue = "jobs"
scale = 2
limits = {{ timeout = "1s" }}
retry = {{ attempts = 3, backoff = "50ms..200ms" }}
{worker_extra}
"#
    )
}

#[test]
fn a_web_request_hands_work_to_a_worker() {
    let mut host = Host::start(&web_and_worker("", ""));
    let reply = host.get("/enqueue?queue=jobs&body=ok:w1");
    assert_eq!(reply.status, 200);
    assert!(reply.body.starts_with("enqueued "), "{}", reply.body);
    let line = host.wait_for_log("processed w1 attempt=1");
    assert!(line.contains("instance=jobs."), "{line}");
    assert!(line.contains("queue=jobs"), "{line}");
}

#[test]
fn a_guest_may_only_enqueue_onto_the_queues_its_type_lists() {
    let mut host = Host::start(&web_and_worker("", ""));
    let reply = host.get("/enqueue?queue=other&body=x");
    assert_eq!(reply.body, "error: EnqueueError::UnknownQueue(\"other\")\n");
    host.wait_for_log("enqueue denied: `other` is not in the process type's `enqueue` list");
}

#[test]
fn a_retry_result_redelivers_until_the_worker_succeeds() {
    let mut host = Host::start(&web_and_worker("", ""));
    assert_eq!(host.enqueue("jobs", "retry:r1:3").status, 202);
    host.wait_for_log("processed r1 attempt=3");
    assert_eq!(host.count("retry requested"), 2, "{:?}", host.log());
}

#[test]
fn a_trap_fails_the_delivery_and_the_message_comes_back() {
    let mut host = Host::start(&web_and_worker("", ""));
    assert_eq!(host.enqueue("jobs", "trap-once:t1").status, 202);
    let failed = host.wait_for_log("message failed (trap); instance discarded; redelivery in");
    assert!(
        failed.contains("attempt=1") && failed.contains("instance=jobs."),
        "{failed}"
    );
    host.wait_for_log("processed t1 attempt=2");
}

#[test]
fn dead_letters_are_listed_up_to_a_limit_and_a_bad_limit_is_a_clear_error() {
    let host = Host::start(&web_and_worker("", ""));
    for tag in ["l1", "l2", "l3"] {
        assert_eq!(host.enqueue("jobs", &format!("reject:{tag}")).status, 202);
    }
    host.wait_until("three dead letters", |log| {
        log.iter()
            .filter(|l| l.contains("message rejected: dead-lettered"))
            .count()
            == 3
    });
    let two = host.admin_request("GET", "/queues/jobs/dead-letters?limit=2", None);
    assert_eq!(two.status, 200, "{two:?}");
    let letters: Vec<serde_json::Value> = serde_json::from_str(&two.body).unwrap();
    assert_eq!(letters.len(), 2);
    let bad = host.admin_request("GET", "/queues/jobs/dead-letters?limit=many", None);
    assert_eq!(bad.status, 400, "{bad:?}");
    let error: serde_json::Value = serde_json::from_str(&bad.body).unwrap();
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("limit"), "{message}");
}

#[test]
fn rejected_and_exhausted_messages_are_dead_lettered_listed_and_replayed() {
    let mut host = Host::start(&web_and_worker("", ""));
    assert_eq!(host.enqueue("jobs", "reject:x1").status, 202);
    assert_eq!(host.enqueue("jobs", "trap:x2").status, 202);
    host.wait_for_log("message rejected: dead-lettered");
    host.wait_for_log("message failed (trap); instance discarded; dead-lettered");

    let (code, stdout, stderr) = host.cli(&["dlq", "list", "jobs"]);
    assert_eq!(code, 0, "{stderr}");
    let letters: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 2, "{stdout}");
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"rejected: bad message x1"), "{reasons:?}");
    assert!(
        reasons.contains(&"trap on the last attempt (3)"),
        "{reasons:?}"
    );
    let trap = letters.iter().find(|l| l["body"] == "trap:x2").unwrap();
    assert_eq!(trap["attempts"], 3);

    // Replay the trap message only: it comes back as a first attempt.
    let id = trap["id"].as_str().unwrap();
    let (code, stdout, stderr) = host.cli(&["dlq", "replay", "jobs", id]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("replayed 1 message"), "{stdout}");
    host.wait_until(
        "the replayed message is delivered again as attempt 1",
        |log| {
            log.iter()
                .filter(|l| l.contains("message failed (trap)") && l.contains("attempt=1"))
                .count()
                == 2
        },
    );
}

#[test]
fn the_enqueue_command_feeds_a_running_host() {
    let mut host = Host::start(&web_and_worker("[queue]\nmax_message = \"16B\"", ""));
    let (code, stdout, stderr) = host.cli(&["enqueue", "jobs", "ok:cli1"]);
    assert_eq!(code, 0, "{stderr}");
    let id = stdout.trim().to_string();
    host.wait_for_log(&format!("processed cli1 attempt=1 id={id} "));

    let (code, _, stderr) = host.cli(&["enqueue", "jobs", "ok:this-body-is-too-large"]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: message of 17 bytes is larger than the limit of 16 bytes"
    );
    let unknown = host.enqueue("nope", "x");
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (404, r#"{"error":"unknown queue `nope`"}"#)
    );
}

#[test]
fn every_accepted_message_survives_kill_9_of_the_host() {
    let host = Host::start(&web_and_worker("", ""));
    let total = 30;
    for i in 0..total {
        assert_eq!(host.enqueue("jobs", &format!("sleep:k{i}:100")).status, 202);
    }
    let mut host = host;
    host.wait_for_log("processed k");
    host.kill9();
    let before = host.log();
    let dir = host.into_dir();
    let path = dir.path().join("formation.toml");
    let again = Host::restart_in(dir, &path);
    again.wait_until("every message processed after the restart", |log| {
        (0..total).all(|i| {
            let tag = format!("processed k{i} ");
            before.iter().chain(log.iter()).any(|l| l.contains(&tag))
        })
    });
}

#[test]
fn two_hosts_share_a_redis_queue_and_one_finishes_what_a_dead_one_leased() {
    let redis = RedisServer::start();
    let formation = web_and_worker(
        &format!("[queue]\nbackend = \"redis\"\nurl = \"{}\"", redis.url),
        "",
    );
    let a = Host::start(&formation);
    let mut b = Host::start(&formation);
    let total = 12;
    for i in 0..total {
        assert_eq!(a.enqueue("jobs", &format!("sleep:m{i}:300")).status, 202);
    }
    // Once B holds leases, kill it: its messages must be reclaimed by A.
    b.wait_for_log("sleeping m");
    b.kill9();
    let died_with = b.log();
    a.wait_until(
        "A finishes every message, including B's leased ones",
        |log| {
            (0..total).all(|i| {
                let tag = format!("processed m{i} ");
                log.iter().chain(died_with.iter()).any(|l| l.contains(&tag))
            })
        },
    );
    let reclaimed = a.count("reclaimed a lease left by another consumer");
    let started_on_b: Vec<_> = died_with
        .iter()
        .filter(|l| l.contains("sleeping m"))
        .collect();
    let finished_on_b = died_with
        .iter()
        .filter(|l| l.contains("processed m"))
        .count();
    assert!(
        reclaimed >= started_on_b.len() - finished_on_b,
        "A reclaimed {reclaimed}, B left {} unfinished",
        started_on_b.len() - finished_on_b
    );
}

fn clock(extra: &str) -> String {
    format!(
        "[process.tick]\nkind = \"clock\"\ncomponent = \"{{testclock}}\"\nschedule = \"* * * * * *\"\nlimits = {{ timeout = \"5s\" }}\n{extra}\n"
    )
}

#[test]
fn a_clock_ticks_on_its_schedule() {
    let host = Host::start(&clock(""));
    host.wait_until("three ticks", |log| {
        log.iter()
            .filter(|l| l.contains("tick tick scheduled="))
            .count()
            >= 3
    });
    let times: Vec<u64> = host
        .log()
        .iter()
        .filter_map(|l| l.split("tick tick scheduled=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    for pair in times.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            1000,
            "every second, on the second: {times:?}"
        );
    }
    assert!(times.iter().all(|t| t % 1000 == 0), "{times:?}");
    assert!(
        host.log()
            .iter()
            .any(|l| l.contains("tick tick") && l.contains("instance=tick.1"))
    );
}

#[test]
fn a_tick_is_skipped_while_the_previous_one_runs() {
    let mut host = Host::start(&clock("env = { SLEEP_MS = \"2500\" }"));
    let skipped = host.wait_for_log("tick skipped: the previous tick of `tick` is still running");
    assert!(skipped.contains("scheduled="), "{skipped}");
    host.wait_until("a tick after the long one", |log| {
        log.iter()
            .filter(|l| l.contains("tick tick scheduled="))
            .count()
            >= 2
    });
}

#[test]
fn a_worker_only_formation_needs_no_http_port() {
    let formation =
        "[process.jobs]\nkind = \"worker\"\ncomponent = \"{testworker}\"\nqueue = \"jobs\"\n";
    let mut host = Host::start(formation);
    assert!(host.addr.is_empty());
    assert!(!host.admin.is_empty());
    assert_eq!(host.enqueue("jobs", "ok:solo").status, 202);
    host.wait_for_log("processed solo attempt=1");
    let health = request(&host.admin, "GET", "/healthz", None, None);
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert!(host.terminate().success());
}
