//! End-to-end tests of run-time control: `wasmproc ps`, `scale`, `deploy`,
//! SIGHUP reload, autoscaling, metrics and health.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use common::{Host, Reply, request, wasmproc};

fn ps(host: &Host) -> Vec<serde_json::Value> {
    let (code, stdout, stderr) = host.cli(&["ps", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["name"] == name).unwrap()
}

/// Steady load from `threads` clients until stopped; returns every reply.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Reply>>>,
}

impl Load {
    fn start(addr: &str, path: &str, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let (addr, path, stop) = (addr.to_string(), path.to_string(), stop.clone());
                std::thread::spawn(move || {
                    let mut replies = Vec::new();
                    // Bounded: a client makes at most 2,000 requests.
                    while !stop.load(Ordering::Relaxed) && replies.len() < 2000 {
                        replies.push(request(&addr, "GET", &path, None, None));
                    }
                    replies
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Vec<Reply> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

fn web(component: &str, extra: &str) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[process.web]\nkind = \"web\"\ncomponent = \"{{{component}}}\"\n{extra}\n"
    )
}

#[test]
fn ps_and_scale_change_instances_at_once_without_failing_requests() {
    let mut host = Host::start(&web("testbed", "scale = 2\nbacklog = 1000"));
    let rows = ps(&host);
    assert_eq!(
        (
            row(&rows, "web")["scale"].as_u64(),
            row(&rows, "web")["kind"].as_str()
        ),
        (Some(2), Some("web"))
    );

    let load = Load::start(&host.addr, "/sleep?ms=20", 10);
    host.wait_until("load running", |log| {
        log.iter().filter(|l| l.contains("sleeping 20 ms")).count() > 10
    });
    let (code, stdout, stderr) = host.cli(&["scale", "web=8"]);
    assert_eq!((code, stdout.as_str()), (0, "web=8\n"), "{stderr}");
    host.wait_for_log("scaled `web` from 2 to 8 (admin API)");
    host.wait_until("instance web.8 busy", |log| {
        log.iter().any(|l| l.contains("instance=web.8"))
    });
    let (code, _, stderr) = host.cli(&["scale", "web-7"]);
    assert_eq!(code, 0, "{stderr}");
    host.wait_for_log("scaled `web` from 8 to 1 (admin API)");
    let sleeping = |log: &[String]| log.iter().filter(|l| l.contains("sleeping 20 ms")).count();
    let before = sleeping(&host.log());
    host.wait_until("load goes on at scale 1", |log| {
        sleeping(log) >= before + 30
    });
    let replies = load.finish();
    assert!(replies.len() >= 40, "{} replies", replies.len());
    let failed: Vec<_> = replies.iter().filter(|r| r.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        replies.len(),
        failed.first()
    );
    assert_eq!(row(&ps(&host), "web")["scale"], 1);

    let (code, _, stderr) = host.cli(&["scale", "web=0"]);
    assert_eq!(
        (code, stderr.trim()),
        (
            1,
            "error: `web` is not a worker: only workers may scale to zero"
        )
    );
    let (code, _, stderr) = host.cli(&["scale", "nope=3"]);
    assert_eq!(
        (code, stderr.trim()),
        (1, "error: unknown process type `nope`")
    );
    let (code, _, stderr) = host.cli(&["scale", "web=5000"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("the instance pool holds 1024"), "{stderr}");
}

#[test]
fn deploy_swaps_the_component_under_load_without_failing_requests() {
    let mut host = Host::start(&web("hello", "scale = 4\nbacklog = 1000"));
    assert_eq!(host.get("/").body, "Hello from wasmproc\n");
    let load = Load::start(&host.addr, "/", 4);
    host.wait_until("load running", |_| true);
    let (code, stdout, stderr) = host.cli(&["deploy", "web", &common::guest("testbed")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(generation 2)"), "{stdout}");
    host.wait_for_log("deployed a new component to `web` (generation 2");
    // Let the new version serve under load for a while.
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(300) {
        assert_eq!(host.get("/").status, 200);
    }
    let replies = load.finish();
    assert!(
        replies.iter().all(|r| r.status == 200),
        "a request failed during the swap"
    );
    assert!(replies.iter().any(|r| r.body == "Hello from wasmproc\n"));
    assert!(replies.iter().any(|r| r.body == "testbed ok\n"));
    assert_eq!(
        host.get("/").body,
        "testbed ok\n",
        "the new version answers afterwards"
    );
}

#[test]
fn a_bad_artifact_is_refused_and_the_old_one_keeps_serving() {
    let host = Host::start(&web("hello", ""));
    let (code, _, stderr) = host.cli(&["deploy", "web", &common::guest("not-http")]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("does not fit `web`") && stderr.contains("wasi:http/incoming-handler"),
        "{stderr}"
    );
    let junk = host.dir().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").unwrap();
    let (code, _, stderr) = host.cli(&["deploy", "web", junk.to_str().unwrap()]);
    assert_eq!(
        (code, stderr.trim()),
        (
            1,
            "error: the artifact is not a WebAssembly file (expected a WASI 0.2 component)"
        )
    );
    assert_eq!(host.get("/").body, "Hello from wasmproc\n");
    assert_eq!(row(&ps(&host), "web")["generation"], 1);
}

#[test]
fn sighup_reloads_changed_components_and_scales() {
    let mut host = Host::start(&web("hello", "scale = 2"));
    let formation = host.dir().join("formation.toml");
    std::fs::write(&formation, common::expand(&web("testbed", "scale = 3"))).unwrap();
    let pid = host.pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    host.wait_for_log("deployed a new component to `web` (generation 2");
    host.wait_for_log("reload: scaled `web` from 2 to 3");
    assert_eq!(host.get("/").body, "testbed ok\n");
}

fn worker(scale: &str) -> String {
    format!(
        "[process.jobs]\nkind = \"worker\"\ncomponent = \"{{testworker}}\"\nqueue = \"jobs\"\nscale = {scale}\nlimits = {{ timeout = \"5s\" }}\n"
    )
}

#[test]
fn a_worker_autoscales_up_when_its_queue_fills_and_back_after_the_cooldown() {
    let mut host = Host::start(&worker("{ min = 1, max = 4, cooldown = \"2s\" }"));
    for i in 0..40 {
        assert_eq!(host.enqueue("jobs", &format!("sleep:a{i}:100")).status, 202);
    }
    let up = host.wait_for_log("autoscale `jobs` up from 1 to 4 (queue depth");
    assert!(up.contains("old=1") && up.contains("new=4"), "{up}");
    host.wait_until("every message processed", |log| {
        (0..40).all(|i| log.iter().any(|l| l.contains(&format!("processed a{i} "))))
    });
    host.wait_for_log("autoscale `jobs` down from 4 to 1 (queue depth 0");
}

#[test]
fn a_worker_at_zero_is_woken_by_the_first_message() {
    let mut host = Host::start(&worker("{ min = 0, max = 2, cooldown = \"1s\" }"));
    assert_eq!(row(&ps(&host), "jobs")["scale"], 0);
    assert_eq!(host.enqueue("jobs", "ok:wake").status, 202);
    host.wait_for_log("autoscale `jobs` up from 0 to 1");
    host.wait_for_log("processed wake attempt=1");
    host.wait_for_log("autoscale `jobs` down from 1 to 0");
}

/// The value of the metric line starting with `name{` whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && labels.iter().all(|lab| l.contains(lab))
                || *l == name
        })
        .or_else(|| text.lines().find(|l| l.starts_with(&format!("{name} "))))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} {labels:?} in:\n{text}"))
}

#[test]
fn metrics_health_and_readiness() {
    let host = Host::start(&web("testbed", "scale = 2\nbacklog = 0"));
    for _ in 0..3 {
        assert_eq!(host.get("/").status, 200);
    }
    assert_eq!(host.get("/trap").status, 500);
    let text = host.metrics();
    let web = "process=\"web\"";
    assert_eq!(metric(&text, "wasmproc_units_started_total", &[web]), 4.0);
    assert_eq!(metric(&text, "wasmproc_units_succeeded_total", &[web]), 3.0);
    assert_eq!(
        metric(
            &text,
            "wasmproc_units_failed_total",
            &[web, "reason=\"trap\""]
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "wasmproc_unit_duration_seconds_count", &[web]),
        4.0
    );
    assert_eq!(metric(&text, "wasmproc_instantiations_total", &[web]), 4.0);
    assert_eq!(metric(&text, "wasmproc_instances", &[web]), 2.0);
    assert_eq!(
        metric(&text, "wasmproc_requests_rejected_total", &[web]),
        0.0
    );
    assert!(
        metric(&text, "wasmproc_compile_cache_hits_total", &[])
            + metric(&text, "wasmproc_compile_cache_misses_total", &[])
            >= 1.0
    );
    assert!(
        text.contains("# TYPE wasmproc_unit_duration_seconds histogram"),
        "{text}"
    );

    assert_eq!(
        request(&host.admin, "GET", "/healthz", None, None).status,
        200
    );
    let ready = request(&host.admin, "GET", "/readyz", None, None);
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
}

#[test]
fn with_a_token_the_admin_api_refuses_requests_without_it() {
    let host = Host::start_with(
        &web("hello", "[admin]\nlisten = \"127.0.0.1:0\""),
        &common::shared_cache(),
        &[("WASMPROC_ADMIN_TOKEN", "s3cret")],
    );
    let refused = request(&host.admin, "GET", "/ps", None, None);
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (401, r#"{"error":"missing or wrong bearer token"}"#)
    );
    assert_eq!(
        request(&host.admin, "GET", "/healthz", None, None).status,
        200,
        "probes need no token"
    );
    let out = wasmproc()
        .args(["ps", "--formation"])
        .arg(host.dir().join("formation.toml"))
        .env("WASMPROC_ADMIN_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("TYPE "), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("web "), "{table}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

/// A regression guard, not a timing: 1,000 live instances of the hello
/// component must cost under 100 MiB of RSS (measured: about 24 MiB).
#[test]
fn a_thousand_live_instances_stay_under_a_memory_bound() {
    let mut host = Host::start(&web(
        "hello",
        "scale = 1\nreuse = 1000\nlimits = { memory = \"4MiB\" }",
    ));
    let before = rss_kib(host.pid());
    let (code, _, stderr) = host.cli(&["scale", "web=1000"]);
    assert_eq!(code, 0, "{stderr}");
    host.wait_for_log("999 `web` instances live in");
    let grown = rss_kib(host.pid()).saturating_sub(before);
    assert!(
        grown < 100 * 1024,
        "1,000 live instances took {} MiB",
        grown / 1024
    );
    assert_eq!(row(&ps(&host), "web")["warm"], 1000);
    assert_eq!(host.get("/").body, "Hello from wasmproc\n");
}
