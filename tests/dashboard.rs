//! The dashboard, driven in a real headless Chromium as an operator would:
//! open the login link `wasmproc ui` printed, watch the numbers move, press
//! the buttons, and check that `wasmproc ps` and the host's log agree. Also
//! what a browser without a session sees, what a session may reach, and
//! what a hostile page and a listener on other local ports get (nothing).
//!
//! Needs `chromium` (Debian's package; `.ci/run` installs it). Screenshots
//! go to `target/dashboard/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Host;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

const DEADLINE: Duration = Duration::from_secs(30);

const FORMATION: &str = r#"
[http]
listen = "127.0.0.1:0"

[process.web]
kind = "web"
component = "{testbed}"
enqueue = ["jobs"]

[process.jobs]
kind = "worker"
component = "{testworker}"
queue = "jobs"
retry = { attempts = 1 }
"#;

fn browser() -> Browser {
    let options = LaunchOptions::default_builder()
        .headless(true)
        // Chromium's sandbox needs user namespaces, which CI containers
        // running as root lack; the pages are the test's own.
        .sandbox(false)
        .window_size(Some((1280, 900)))
        .idle_browser_timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    Browser::new(options).expect("cannot start chromium (apt-get install chromium)")
}

/// A one-time login link, from `wasmproc ui`; the host never logs one.
fn login_link(host: &mut Host) -> String {
    host.wait_for_log("dashboard: http://");
    let (code, stdout, stderr) = host.cli(&["ui"]);
    assert_eq!(code, 0, "{stderr}");
    let link = stdout.trim().to_string();
    assert!(link.contains("/ui/login?code="), "{link}");
    assert!(
        !host.log().iter().any(|l| l.contains("code=")),
        "a login code in the log:\n{}",
        host.log().join("\n")
    );
    link
}

/// Evaluates `script` in the page and returns its value as a string
/// (empty for null or undefined).
fn eval(tab: &Tab, script: &str) -> String {
    let value = tab.evaluate(script, false).unwrap().value;
    match value {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The text of the first element matching `selector`, or empty.
fn text(tab: &Tab, selector: &str) -> String {
    eval(
        tab,
        &format!(
            "(document.querySelector({}) || {{}}).textContent",
            serde_json::json!(selector)
        ),
    )
}

/// Polls until `check` holds of the text at `selector`.
fn wait_for_text(tab: &Tab, selector: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let value = text(tab, selector);
        if check(&value) {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: `{selector}` is `{value}` after {DEADLINE:?} (the page's error line: `{}`)",
            text(tab, "#error")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn number(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

fn click(tab: &Tab, selector: &str) {
    tab.wait_for_element(selector).unwrap().click().unwrap();
}

fn screenshot(tab: &Tab, name: &str) {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    let dir = common::root().join("target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The scale of `name` as `wasmproc ps --json` reports it.
fn scale_of(host: &Host, name: &str) -> u64 {
    let (code, stdout, stderr) = host.cli(&["ps", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(stdout.trim()).unwrap();
    let row = rows.iter().find(|r| r["name"] == name).unwrap();
    row["scale"].as_u64().unwrap()
}

fn wait_for_scale(host: &Host, name: &str, want: u64) {
    let start = Instant::now();
    while scale_of(host, name) != want {
        assert!(
            start.elapsed() < DEADLINE,
            "`{name}` is not at scale {want} within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_dashboard_shows_the_host_live_and_its_buttons_change_it() {
    let mut host = Host::start(FORMATION);
    let link = login_link(&mut host);
    let browser = browser();
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&link)
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    // The login link leaves the address bar at once.
    assert!(tab.get_url().ends_with("/ui"), "{}", tab.get_url());
    wait_for_text(&tab, "#live", "the event stream", |t| t == "live");

    // Traffic shows up in the web card's counter.
    let units = "[data-process=web] [data-field=units]";
    let before = number(&wait_for_text(&tab, units, "a first snapshot", |t| {
        !t.is_empty()
    }));
    for i in 0..20 {
        assert_eq!(host.get(&format!("/?n={i}")).status, 200);
    }
    wait_for_text(&tab, units, "20 requests", |t| number(t) >= before + 20);

    // The + button scales the type, as `wasmproc ps` confirms.
    assert_eq!(scale_of(&host, "web"), 1);
    click(&tab, "[data-process=web] [data-action=scale-up]");
    wait_for_scale(&host, "web", 2);
    wait_for_text(
        &tab,
        "[data-process=web] [data-field=scale]",
        "the new scale",
        |t| t == "2",
    );
    click(&tab, "[data-process=web] [data-action=scale-down]");
    wait_for_scale(&host, "web", 1);

    // A rejected message and a trapping one become dead letters on the
    // page; their rows show the guest's reason as text; replay sends them
    // back to the worker.
    for body in ["reject:d1", "trap:d2"] {
        assert_eq!(host.enqueue("jobs", body).status, 202);
    }
    let letters = "[data-queue=jobs] [data-field=dead-letters]";
    wait_for_text(&tab, letters, "two dead letters", |t| t == "2");
    click(&tab, "[data-queue=jobs] [data-action=show-letters]");
    wait_for_text(&tab, "#letters tbody", "the dead letters' rows", |t| {
        t.contains("reject:d1") && t.contains("bad message d1") && t.contains("trap:d2")
    });
    screenshot(&tab, "dashboard");

    let handled = |host: &Host| {
        common::metric(
            &host.metrics(),
            "wasmproc_units_started_total",
            &["process=\"jobs\""],
        )
    };
    let units_before = handled(&host);
    click(&tab, "[data-letter] [data-action=replay-one]");
    host.wait_for_log("replayed=1");
    host.wait_until("the worker sees the replayed letter again", |_| {
        handled(&host) > units_before
    });
    wait_for_text(&tab, letters, "the letter dead again", |t| t == "2");
    click(&tab, "[data-queue=jobs] [data-action=replay-all]");
    host.wait_until("the worker sees the replayed letters again", |_| {
        handled(&host) >= units_before + 3.0
    });
    wait_for_text(&tab, letters, "the letters rejected again", |t| t == "2");

    // The trap is among the last failures, with the instance it ended.
    wait_for_text(&tab, "#failures", "the last failures", |t| {
        t.contains("trap") && t.contains("jobs.")
    });
    drop(tab);
    host.terminate();
}

/// A page served from another local port, which also records every
/// request it gets: same-site to the admin API (a port is not a site), so
/// the browser would send it the admin origin's cookies, if there were any.
struct Foreign {
    addr: String,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Foreign {
    fn serve(page: String) -> Foreign {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (stopping, seen) = (stop.clone(), heads.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                // A connection of its own: the browser opens spare
                // connections that never send a request.
                let (page, seen) = (page.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(DEADLINE));
                    let mut head = [0u8; 8192];
                    let n = stream.read(&mut head).unwrap_or(0);
                    if n > 0 {
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head[..n]).into_owned());
                        let _ = write!(
                            stream,
                            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                            page.len()
                        );
                    }
                });
            }
        });
        Foreign {
            addr,
            heads,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The text a user sees on the page (not what hidden elements hold).
fn visible(tab: &Tab) -> String {
    eval(tab, "document.body.innerText")
}

#[test]
fn a_session_is_the_dashboards_alone_and_reaches_only_what_it_shows() {
    let mut host = Host::start(FORMATION);
    let browser = browser();
    let tab = browser.new_tab().unwrap();

    // Without a session the page says how to get in, and shows nothing.
    tab.navigate_to(&format!("http://{}/ui", host.admin))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    let start = Instant::now();
    while !visible(&tab).contains("needs a login link") {
        assert!(start.elapsed() < DEADLINE, "{}", visible(&tab));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!visible(&tab).contains("Process types"));

    // The operator logs in.
    let link = login_link(&mut host);
    tab.navigate_to(&link)
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    wait_for_text(&tab, "#live", "the event stream", |t| t == "live");
    let session = eval(&tab, "localStorage.getItem('wasmproc-session')");
    assert_eq!(session.len(), 64, "{session}");

    // A hostile page on another local port posts to /scale and loads an
    // image from its own port: the scale stays, and no request that port
    // gets carries the session.
    let page = format!(
        r#"<!doctype html><title>hostile</title><p id="done"></p><img src="/pixel"><script>
        fetch("http://{admin}/scale", {{method: "POST", mode: "no-cors", credentials: "include", body: "web=3"}})
          .then(() => document.getElementById("done").textContent = "sent",
                () => document.getElementById("done").textContent = "failed");
        </script>"#,
        admin = host.admin
    );
    let foreign = Foreign::serve(page);
    tab.navigate_to(&format!("http://{}/", foreign.addr))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    wait_for_text(&tab, "#done", "the hostile fetch", |t| !t.is_empty());
    assert_eq!(scale_of(&host, "web"), 1);
    let heads = foreign.heads.lock().unwrap().clone();
    assert!(heads.len() >= 2, "{heads:?}");
    assert!(
        heads.iter().all(|h| !h.contains(&session)),
        "another port saw the session: {heads:?}"
    );

    // The session reaches what the dashboard shows and does, nothing more.
    let admin = host.admin.clone();
    let with = |method: &str, path: &str| {
        common::request_with(
            &admin,
            method,
            path,
            &[("x-wasmproc-session", &session)],
            None,
        )
        .status
    };
    assert_eq!(with("GET", "/ps"), 200);
    assert_eq!(with("GET", "/queues/jobs/dead-letters"), 200);
    assert_eq!(with("POST", "/queues/jobs/messages"), 403);
    assert_eq!(with("POST", "/deploy/web"), 403);
    assert_eq!(with("POST", "/ui/link"), 403);
    assert_eq!(with("GET", "/kv/any/key"), 403);

    // The operator's own tab still works, then logs out: the page locks,
    // and the session is refused from then on.
    tab.navigate_to(&format!("http://{}/ui", host.admin))
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    wait_for_text(&tab, "#live", "the event stream", |t| t == "live");
    click(&tab, "[data-process=web] [data-action=scale-up]");
    wait_for_scale(&host, "web", 2);
    click(&tab, "#logout");
    wait_for_text(&tab, "#live", "the logout", |t| t == "logged out");
    assert!(visible(&tab).contains("needs a login link"));
    host.wait_for_log("dashboard: a browser logged out");
    assert_eq!(with("GET", "/ps"), 401);

    // A used login link does not log in a second browser.
    let other = browser.new_context().unwrap().new_tab().unwrap();
    other
        .navigate_to(&link)
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    let body = text(&other, "body");
    assert!(body.contains("was used or has expired"), "{body}");
    drop(foreign);
    host.terminate();
}
