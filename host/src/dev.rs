//! `wasmproc dev`: the inner loop — edit, rebuild, redeploy — for a formation
//! being worked on.
//!
//! ## Design
//!
//! `wasmproc dev formation.toml` runs every `build` command once, then serves
//! the formation exactly as `wasmproc run` does, and watches the formation's
//! folder — where the `build` commands run, so where a type's sources are.
//! When something there changes, and the change has settled (two scans
//! [`SETTLE`] apart agree, so an editor's save in several writes is one
//! change), it runs the build commands again, each distinct one once, in the
//! formation's folder, and then redeploys through the path SIGHUP takes
//! ([`Control::reload`]): every type whose component file changed is
//! compiled, checked and swapped in by [`Control::deploy`], the admin API's
//! deploy. New units go to new instances while old ones finish theirs, so no
//! request fails during a swap, and nothing restarts.
//!
//! ## What is watched
//!
//! Files below the formation's folder, by modification time and size, found
//! by a scan every [`SCAN_INTERVAL`] (no inotify: it needs a dependency and
//! is missing on some filesystems a container mounts; a scan of a source
//! tree costs well under a millisecond per hundred files). Skipped:
//! - hidden entries (`.git`, `.wasmproc`, `.venv`) and dependency or
//!   output folders by name (`node_modules`, `target`, `__pycache__`);
//! - the build outputs: each type's component file and, when it lies in a
//!   folder of its own below the formation's (`build/`), that folder, since
//!   a build writes there;
//! - symbolic links (not followed).
//!
//! A scan looks at no more than [`MAX_FILES`] files: past that it warns
//! once and watches the files it saw.
//!
//! ## Failure
//!
//! A build that fails deploys nothing: the running components keep serving.
//! One log line says which command failed, and its output — the compiler's
//! errors — follows on stderr as the command wrote it. The next change tries
//! again. A component that builds but does not deploy (it does not compile,
//! lacks its kind's export, does not fit the pool) is refused the way a
//! SIGHUP reload refuses it: logged, and the old one keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::control::Control;
use crate::formation::Formation;

/// How often the formation's folder is scanned for changes.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(250);
/// How long a change must stay as it is before the build runs.
pub const SETTLE: Duration = Duration::from_millis(150);
/// The most files one scan looks at.
pub const MAX_FILES: usize = 20_000;

/// Folders never watched, by name: dependencies and build outputs.
const SKIPPED: &[&str] = &["node_modules", "target", "__pycache__"];

/// What a scan saw: each file's modification time and size.
type Snapshot = BTreeMap<PathBuf, (Option<SystemTime>, u64)>;

/// What is watched: the formation's folder, less the build outputs.
#[derive(Debug, Clone)]
struct Watched {
    root: PathBuf,
    outputs: Vec<PathBuf>,
}

impl Watched {
    fn of(formation: &Formation) -> Watched {
        let root = formation.dir.clone();
        let mut outputs = Vec::new();
        for process in &formation.processes {
            outputs.push(process.component.clone());
            if let Some(folder) = process.component.parent()
                && folder != root
                && folder.starts_with(&root)
            {
                outputs.push(folder.to_path_buf());
            }
        }
        Watched { root, outputs }
    }

    fn skipped(&self, path: &Path) -> bool {
        let hidden_or_named = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|name| name.starts_with('.') || SKIPPED.contains(&name));
        hidden_or_named || self.outputs.iter().any(|output| output == path)
    }

    /// Every watched file with its modification time and size. A file that
    /// vanishes during the scan is simply not in it.
    fn scan(&self) -> (Snapshot, bool) {
        let mut seen = Snapshot::new();
        let mut folders = vec![self.root.clone()];
        while let Some(folder) = folders.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if self.skipped(&path) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                if meta.is_dir() {
                    folders.push(path);
                } else if meta.is_file() {
                    if seen.len() >= MAX_FILES {
                        return (seen, true);
                    }
                    seen.insert(path, (meta.modified().ok(), meta.len()));
                }
            }
        }
        (seen, false)
    }
}

/// The first path whose entry differs between two scans, for the log.
fn first_change<'a>(before: &'a Snapshot, after: &'a Snapshot) -> Option<&'a Path> {
    after
        .iter()
        .find(|(path, stamp)| before.get(*path) != Some(stamp))
        .map(|(path, _)| path.as_path())
        .or_else(|| {
            before
                .keys()
                .find(|path| !after.contains_key(*path))
                .map(PathBuf::as_path)
        })
}

/// Scans on a blocking thread (a scan reads the disk).
async fn scan(watched: &Watched) -> Snapshot {
    let watched = watched.clone();
    let (snapshot, capped) = tokio::task::spawn_blocking(move || watched.scan())
        .await
        .unwrap_or_default();
    if capped {
        tracing::warn!(
            "`wasmproc dev` watches only the first {MAX_FILES} files below the formation's folder"
        );
    }
    snapshot
}

/// Watches `formation`'s folder until `stopped`, rebuilding and redeploying
/// on every settled change (see the module docs).
pub async fn watch(
    control: Arc<Control>,
    formation: Formation,
    mut stopped: watch::Receiver<bool>,
) {
    if formation.processes.iter().all(|p| p.build.is_none()) {
        tracing::warn!(
            "no process type has a `build` command: `wasmproc dev` has nothing to rebuild"
        );
        return;
    }
    let watched = Watched::of(&formation);
    tracing::info!(
        "watching `{}` for changes (builds run there on every save)",
        watched.root.display()
    );
    let mut last = scan(&watched).await;
    loop {
        tokio::select! {
            () = tokio::time::sleep(SCAN_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let mut now = scan(&watched).await;
        if now == last {
            continue;
        }
        // Let a save in several writes finish.
        loop {
            tokio::time::sleep(SETTLE).await;
            let again = scan(&watched).await;
            if again == now {
                break;
            }
            now = again;
        }
        let changed = first_change(&last, &now)
            .and_then(|path| path.strip_prefix(&watched.root).ok())
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        tracing::info!("`{changed}` changed: rebuilding");
        let started = Instant::now();
        if rebuild(&formation).await {
            tracing::info!(
                "rebuilt in {} ms; deploying what changed",
                started.elapsed().as_millis()
            );
            let control = control.clone();
            let path = formation.path.clone();
            let _ = tokio::task::spawn_blocking(move || control.reload(&path)).await;
        }
        // What the build itself wrote is not a change to rebuild for.
        last = scan(&watched).await;
    }
}

/// Runs each distinct `build` command once, in the formation's folder,
/// collecting its output; on a failure, logs the command and prints what
/// it wrote. Whether every command succeeded.
async fn rebuild(formation: &Formation) -> bool {
    let mut done = Vec::new();
    for process in &formation.processes {
        let Some(command) = &process.build else {
            continue;
        };
        if done.contains(&command) {
            continue;
        }
        done.push(command);
        let output = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(&formation.dir)
            .stdin(std::process::Stdio::null())
            .output()
            .await;
        match output {
            Ok(output) if output.status.success() => {}
            Ok(output) => {
                tracing::error!(
                    process = %process.name,
                    "the build command of `{}` failed ({}): {command}; the running components keep serving",
                    process.name,
                    output.status
                );
                use std::io::Write as _;
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(&output.stdout);
                let _ = stderr.write_all(&output.stderr);
                return false;
            }
            Err(e) => {
                tracing::error!(process = %process.name, "cannot run the build command of `{}`: {e}", process.name);
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_scan_skips_hidden_entries_dependencies_and_build_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for file in [
            "web.js",
            "src/lib.rs",
            "build/web.wasm",
            "build/wit/web.wit",
            "node_modules/x/index.js",
            ".venv/bin/python",
            "target/debug/x",
            "web/__pycache__/web.pyc",
            "out.wasm",
        ] {
            let path = root.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, file).unwrap();
        }
        let watched = Watched {
            root: root.to_path_buf(),
            outputs: vec![
                root.join("build/web.wasm"),
                root.join("build"),
                root.join("out.wasm"),
            ],
        };
        let (seen, capped) = watched.scan();
        let names: Vec<_> = seen
            .keys()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["src/lib.rs", "web.js"]);
        assert!(!capped);

        std::fs::write(root.join("web.js"), "changed, and longer").unwrap();
        let (after, _) = watched.scan();
        assert_eq!(
            first_change(&seen, &after),
            Some(root.join("web.js").as_path())
        );
        std::fs::remove_file(root.join("src/lib.rs")).unwrap();
        let (gone, _) = watched.scan();
        assert_eq!(
            first_change(&after, &gone),
            Some(root.join("src/lib.rs").as_path())
        );
    }
}
