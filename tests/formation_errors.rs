//! One invalid formation per mistake under tests/ui/, each with the exact
//! message `wasmproc check` must print beside it (`NAME.stderr`). The
//! repository path is written `$ROOT` in the snapshots.
//!
//! To accept new output after a deliberate change of wording:
//! `BLESS=1 cargo test --test formation_errors`, then review the diff.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::Path;

#[test]
fn every_invalid_formation_gets_its_exact_error_and_exit_code_2() {
    common::guests(); // tests/ui/not-http.toml points at a built guest
    let root = common::root();
    let ui = root.join("tests/ui");
    let bless = std::env::var_os("BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&ui)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "tests/ui has too few cases");
    let mut failures = Vec::new();
    for case in &cases {
        let out = common::wasmproc()
            .arg("check")
            .arg("--cache-dir")
            .arg(common::shared_cache())
            .arg(case.strip_prefix(&root).unwrap())
            .current_dir(&root)
            .output()
            .unwrap();
        let name = case.file_name().unwrap().to_string_lossy();
        if out.status.code() != Some(2) {
            failures.push(format!("{name}: exit {:?}, expected 2", out.status.code()));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.contains(": ok") {
            failures.push(format!("{name}: reported ok: {stdout}"));
        }
        let stderr =
            String::from_utf8_lossy(&out.stderr).replace(&root.display().to_string(), "$ROOT");
        let expected_path = case.with_extension("stderr");
        if bless {
            std::fs::write(&expected_path, &stderr).unwrap();
            continue;
        }
        let expected = read(&expected_path);
        if stderr != expected {
            failures.push(format!(
                "{name}: stderr differs\n--- expected ({})\n{expected}--- actual\n{stderr}",
                expected_path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|_| format!("<missing {}>", path.display()))
}
