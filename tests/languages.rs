//! End-to-end tests of guests written in JavaScript and Python: the
//! examples in `examples/javascript` and `examples/python`, built from npm
//! and PyPI by their formation's `build` command, run by the real binary.
//! Each example is built once per test binary (`common::example`).

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::{Host, wasmproc};

/// A MiB of bytes that are not all alike, so an echo that dropped or
/// reordered a chunk would show.
fn mebibyte() -> Vec<u8> {
    (0..1 << 20).map(|i: u32| b'a' + (i % 23) as u8).collect()
}

/// GET `/`, a 1 MiB echo and `/env` (the formation's `env` and `config`).
fn serves_get_echo_and_env(host: &Host, greeting: &str) {
    let hello = host.get("/");
    assert_eq!((hello.status, hello.body.as_str()), (200, greeting));
    let body = mebibyte();
    let echo = host.request("POST", "/echo", None, Some(&body));
    assert_eq!(echo.status, 200);
    assert!(
        echo.body.as_bytes() == body.as_slice(),
        "the echo differs: {} bytes back",
        echo.body.len()
    );
    let env = host.get("/env");
    assert_eq!(
        (env.status, env.body.as_str()),
        (200, "Hello, from the formation's config\n")
    );
}

#[test]
fn the_javascript_example_serves_get_a_1_mib_echo_and_its_env_and_config() {
    let host = Host::start_example("javascript", &[]);
    serves_get_echo_and_env(&host, "Hello from JavaScript\n");
}

#[test]
fn the_python_example_serves_and_its_worker_gets_what_the_web_type_enqueued() {
    let mut host = Host::start_example("python", &[]);
    serves_get_echo_and_env(&host, "Hello from Python\n");
    let enqueued = host.request("POST", "/jobs", None, Some(b"resize cat.png"));
    assert_eq!(enqueued.status, 202, "{enqueued:?}");
    let id = enqueued.body.trim().strip_prefix("enqueued ").unwrap();
    let line = host.wait_for_log(&format!("job {id} (attempt 1) from `jobs`: resize cat.png"));
    assert!(line.contains("instance=worker."), "{line}");
}

/// A formation serving the JavaScript example's component with `reuse`.
fn javascript_with_reuse(reuse: u32) -> String {
    let component = common::example("javascript").join("build/web.wasm");
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[process.web]\nkind = \"web\"\ncomponent = \"{}\"\nscale = 2\nreuse = {reuse}\nlimits = {{ memory = \"64MiB\" }}\n",
        component.display()
    )
}

#[test]
fn a_fetch_event_guest_given_reuse_retires_each_instance_after_one_request() {
    let mut host = Host::start(&javascript_with_reuse(8));
    let warning = host.wait_for_log("is a componentize-js fetch-event guest");
    assert!(
        warning.contains("each instance is retired after its first request")
            && warning.contains("`reuse = 8` is treated as 1"),
        "{warning}"
    );
    let failed: Vec<_> = (0..200)
        .map(|_| host.get("/"))
        .filter(|reply| (reply.status, reply.body.as_str()) != (200, "Hello from JavaScript\n"))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 failed: {failed:?}",
        failed.len()
    );
    assert_eq!(host.count("instance discarded"), 0);

    // `check` says so too, without serving.
    let out = wasmproc()
        .args(["check", "--cache-dir"])
        .arg(common::shared_cache())
        .arg(host.dir().join("formation.toml"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("`reuse = 8` is treated as 1"), "{said}");
}

#[test]
fn a_memory_limit_below_the_components_initial_memory_is_refused_at_limits_memory() {
    let component = common::example("python").join("build/web.wasm");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("formation.toml");
    std::fs::write(
        &path,
        format!(
            "[process.web]\nkind = \"web\"\ncomponent = \"{}\"\nlimits = {{ timeout = \"5s\", memory = \"8MiB\" }}\n",
            component.display()
        ),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = wasmproc()
        .args(["check", "--cache-dir"])
        .arg(cache.path())
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("`limits.memory` is 8 MiB, but `"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let line = "limits = { timeout = \"5s\", memory = \"8MiB\" }";
    let column = line.find("\"8MiB\"").unwrap() + 1;
    assert!(
        lines[at].contains(&format!("formation.toml:4:{column}: "))
            && lines[at].contains(" MiB of linear memory: expected more than "),
        "{stderr}"
    );
    // The caret stands under the value of `memory`.
    assert_eq!(
        lines[at + 3],
        format!("  | {}{}", " ".repeat(column - 1), "^".repeat(6)),
        "{stderr}"
    );
    // Refused from the binary: nothing compiled, no cache entry.
    assert!(
        !stdout.contains("compil") && !stderr.contains("compil"),
        "{stdout}{stderr}"
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn a_cold_start_compiles_every_type_at_once_and_says_how_big_and_how_long() {
    let cache = tempfile::tempdir().unwrap();
    let folder = common::example("python");
    let out = wasmproc()
        .args(["check", "--cache-dir"])
        .arg(cache.path())
        .arg(folder.join("formation.toml"))
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{log}");
    let lines: Vec<&str> = log.lines().collect();
    let position = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{log}"))
    };
    for name in ["web", "worker"] {
        let started = position(&format!("compiling `{name}` ("));
        assert!(
            lines[started].contains(" MiB): not in the compile cache"),
            "{}",
            lines[started]
        );
    }
    // Both started before either was done: they compile in parallel.
    let last_start = position("compiling `web` (").max(position("compiling `worker` ("));
    let first_done = position("`web` compiled in ").min(position("`worker` compiled in "));
    assert!(last_start < first_done, "{log}");
    assert!(log.contains(": ok: "), "{log}");
}

#[test]
fn the_language_examples_build_and_check() {
    for example in ["javascript", "python"] {
        let out = wasmproc()
            .args(["check", "--build", "--cache-dir"])
            .arg(common::shared_cache())
            .arg(common::example(example).join("formation.toml"))
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

/// A copy of `examples/javascript` in a fresh folder laid out like the
/// repository (beside a link to `wit/`), sharing the example's installed
/// `node_modules` and its built component, whose sources are made older so
/// the first build has nothing to do.
fn javascript_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let source = common::example("javascript");
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("examples/javascript");
    std::fs::create_dir_all(copy.join("wit")).unwrap();
    std::fs::create_dir_all(copy.join("build")).unwrap();
    let files = [
        "formation.toml",
        "build.sh",
        "web.js",
        "package.json",
        "package-lock.json",
        "wit/web.wit",
    ];
    for file in files {
        std::fs::copy(source.join(file), copy.join(file)).unwrap();
    }
    let aged = std::process::Command::new("touch")
        .args(["-d", "1 minute ago"])
        .args(files.map(|f| copy.join(f)))
        .status()
        .unwrap();
    assert!(aged.success());
    std::fs::copy(source.join("build/web.wasm"), copy.join("build/web.wasm")).unwrap();
    std::os::unix::fs::symlink(source.join("node_modules"), copy.join("node_modules")).unwrap();
    std::os::unix::fs::symlink(common::root().join("wit"), tmp.path().join("wit")).unwrap();
    (tmp, copy)
}

#[test]
fn wasmproc_dev_rebuilds_and_swaps_in_an_edit_without_a_failed_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (tmp, copy) = javascript_copy();
    let mut host = Host::start_dev(tmp, &copy.join("formation.toml"), &[("PORT", "0")]);
    host.wait_for_log("watching `");
    assert_eq!(host.get("/").body, "Hello from JavaScript\n");

    // Requests keep coming while the guest is rebuilt and swapped in.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, addr) = (stop.clone(), host.addr.clone());
        std::thread::spawn(move || {
            let mut replies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                replies.push(common::request(&addr, "GET", "/", None, None));
            }
            replies
        })
    };
    let source = copy.join("web.js");
    let edited = std::fs::read_to_string(&source)
        .unwrap()
        .replace("Hello from JavaScript", "Hello again from JavaScript");
    let saved = std::time::Instant::now();
    std::fs::write(&source, edited).unwrap();
    // A cold build and compile of a 12 MiB component on a busy machine.
    let patience = std::time::Duration::from_secs(300);
    while host.get("/").body != "Hello again from JavaScript\n" {
        assert!(saved.elapsed() < patience, "{}", host.log().join("\n"));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    println!(
        "from save to the new answer: {} ms",
        saved.elapsed().as_millis()
    );
    stop.store(true, Ordering::Relaxed);
    let replies = client.join().unwrap();
    let failed: Vec<_> = replies
        .iter()
        .filter(|r| {
            r.status != 200
                || !["Hello from JavaScript\n", "Hello again from JavaScript\n"]
                    .contains(&r.body.as_str())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        replies.len()
    );
    host.wait_for_log("deployed a new component to `web`");

    // A source that does not build: the compiler's errors are printed, and
    // the last good component keeps serving.
    std::fs::write(&source, "addEventListener('fetch', (event) => {\n").unwrap();
    let line = host.wait_for_log("the build command of `web` failed");
    assert!(
        line.contains("the running components keep serving"),
        "{line}"
    );
    host.wait_for_log("failed to parse JS source");
    let reply = host.get("/");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "Hello again from JavaScript\n")
    );
}

#[test]
fn a_deploy_refuses_a_fetch_event_guest_for_reuse_and_a_component_larger_than_the_limit() {
    let host = Host::start(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[process.warm]\nkind = \"web\"\ncomponent = \"{hello}\"\nroutes = [\"/\"]\nreuse = 4\n\n[process.small]\nkind = \"web\"\ncomponent = \"{hello}\"\nroutes = [\"/small\"]\nlimits = { memory = \"8MiB\" }\n",
    );
    let javascript = common::example("javascript").join("build/web.wasm");
    let javascript = javascript.to_str().unwrap();
    let (code, _, stderr) = host.cli(&["deploy", "warm", javascript]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the artifact is a componentize-js fetch-event guest")
            && stderr.contains("`warm` reuses each instance for 4 requests: set `reuse = 1`"),
        "{stderr}"
    );
    let (code, _, stderr) = host.cli(&["deploy", "small", javascript]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("`limits.memory` is 8 MiB, but the artifact starts with 9.1 MiB"),
        "{stderr}"
    );
    assert_eq!(host.get("/").body, "Hello from wasmproc\n");
    assert_eq!(host.get("/small").body, "Hello from wasmproc\n");
}
