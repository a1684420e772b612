//! End-to-end tests of the compile cache as a trust boundary (disk →
//! engine): an entry swapped in from another component, or corrupted, is
//! refused with a warning naming it, compiled again and rewritten, and the
//! right code serves; a cache directory others could write refuses the
//! start; a fresh one is private.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DEADLINE, Host, wasmproc};

const HELLO: &str =
    "[http]\nlisten = \"127.0.0.1:0\"\n[process.web]\nkind = \"web\"\ncomponent = \"{hello}\"\n";
const TESTBED: &str =
    "[http]\nlisten = \"127.0.0.1:0\"\n[process.web]\nkind = \"web\"\ncomponent = \"{testbed}\"\n";

/// The entries in the cache directory `cache`.
fn entries(cache: &Path) -> BTreeSet<PathBuf> {
    let Ok(listing) = std::fs::read_dir(cache) else {
        return BTreeSet::new();
    };
    listing
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs `formation` once with `cache` so that it compiles its one
/// component, stops it, and returns the entry that appeared.
fn fill(formation: &str, cache: &Path) -> PathBuf {
    let before = entries(cache);
    let mut host = Host::start_with(formation, cache, &[]);
    host.wait_for_log("`web` compiled in");
    assert!(host.terminate().success());
    let new: Vec<PathBuf> = entries(cache).difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one new cache entry: {new:?}");
    new[0].clone()
}

/// Runs `command` to its end (failing the test after [`DEADLINE`]);
/// returns its exit code and stderr.
fn finish(mut command: Command) -> (Option<i32>, String) {
    let out = tempfile::tempdir().unwrap();
    let stderr = out.path().join("stderr");
    let mut child = command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {DEADLINE:?}:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&stderr).unwrap())
}

#[test]
fn an_entry_copied_from_another_component_is_refused_and_the_right_component_serves() {
    let cache = tempfile::tempdir().unwrap();
    let hello = fill(HELLO, cache.path());
    let testbed = fill(TESTBED, cache.path());
    std::fs::copy(&testbed, &hello).unwrap();

    let mut host = Host::start_with(HELLO, cache.path(), &[]);
    let warning = host.wait_for_log("refusing compile cache entry");
    assert!(
        warning.contains(&format!("`{}`", hello.display()))
            && warning.contains("written for another component or engine"),
        "{warning}"
    );
    host.wait_for_log("`web` compiled in");
    let reply = host.get("/");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "Hello from wasmproc\n")
    );
}

#[test]
fn a_corrupted_entry_is_refused_compiled_again_and_the_host_keeps_serving() {
    let cache = tempfile::tempdir().unwrap();
    let hello = fill(HELLO, cache.path());
    let mut bytes = std::fs::read(&hello).unwrap();
    let middle = bytes.len() / 2;
    let end = (middle + 4096).min(bytes.len());
    bytes[middle..end].fill(0xCC); // int3
    std::fs::write(&hello, &bytes).unwrap();

    let mut host = Host::start_with(HELLO, cache.path(), &[]);
    let warning = host.wait_for_log("refusing compile cache entry");
    assert!(
        warning.contains(&format!("`{}`", hello.display()))
            && warning.contains("do not match the SHA-256 recorded"),
        "{warning}"
    );
    host.wait_for_log("`web` compiled in");
    for _ in 0..3 {
        let reply = host.get("/");
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "Hello from wasmproc\n")
        );
    }
    assert!(host.terminate().success(), "{:?}", host.log());

    let mut again = Host::start_with(HELLO, cache.path(), &[]);
    again.wait_for_log("`web` loaded from the compile cache");
    assert_eq!(again.count("refusing compile cache entry"), 0, "rewritten");
    assert_eq!(again.get("/").body, "Hello from wasmproc\n");
}

#[test]
fn a_cache_directory_others_can_write_refuses_check_and_run_with_exit_2() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let formation = root.path().join("formation.toml");
    std::fs::write(&formation, common::expand(HELLO)).unwrap();

    for verb in ["check", "run"] {
        let mut command = wasmproc();
        command
            .arg(verb)
            .arg("--cache-dir")
            .arg(&cache)
            .arg(&formation);
        let (code, stderr) = finish(command);
        assert_eq!(code, Some(2), "{verb}: {stderr}");
        let dir = cache.display();
        assert!(
            stderr.contains(&format!(
                "error: the compile cache directory `{dir}` is writable by group or others (mode 0777)"
            )) && stderr.contains(&format!(
                "run `chmod go-w {dir}` or pick another `--cache-dir`"
            )),
            "{verb}: {stderr}"
        );
    }
    assert!(entries(&cache).is_empty(), "nothing was written to it");
}

#[test]
fn a_fresh_cache_directory_is_created_private() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("fresh").join("cache");
    let mut host = Host::start_with(HELLO, &cache, &[]);
    host.wait_for_log("`web` compiled in");
    assert_eq!(mode(&cache), 0o700);
    let written = entries(&cache);
    assert_eq!(written.len(), 1, "{written:?}");
    for entry in written {
        assert_eq!(mode(&entry), 0o600, "{}", entry.display());
    }
}

#[test]
fn a_cache_directory_that_cannot_be_created_only_costs_a_compile() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let cache = file.join("cache");
    let mut host = Host::start_with(HELLO, &cache, &[]);
    let warning = host.wait_for_log("cannot use the compile cache directory");
    assert!(
        warning.contains(&format!("`{}`", cache.display())),
        "{warning}"
    );
    host.wait_for_log("`web` compiled in");
    assert_eq!(host.get("/").body, "Hello from wasmproc\n");
}
