//! What the end-to-end tests share: the test guests (built once per test
//! binary), and a [`Host`] that runs the real `wasmproc` binary on port 0,
//! reads the bound address from its log, and stops it with a real signal.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long anything in these tests may take before it counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the guest components once and returns the folder holding them.
pub fn guests() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(root().join("guests/build.sh"))
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env_remove("CARGO_TARGET_DIR")
                .status()
                .expect("run guests/build.sh");
            assert!(status.success(), "building the test guests failed");
            root().join("guests/target/wasm32-wasip2/release")
        })
        .clone()
}

/// The path of the built guest `name` (`hello`, `testbed`, `not-http`).
pub fn guest(name: &str) -> String {
    guests().join(format!("{name}.wasm")).display().to_string()
}

/// Replaces `{hello}`, `{testbed}`, `{testworker}`, `{testclock}`,
/// `{testkv}`, `{kvworker}`, `{testbed3}` with the paths of the built guests.
pub fn expand(formation: &str) -> String {
    [
        "hello",
        "testbed",
        "testworker",
        "testclock",
        "testkv",
        "kvworker",
        "testbed3",
    ]
    .iter()
    .fold(formation.to_string(), |text, name| {
        text.replace(&format!("{{{name}}}"), &guest(name))
    })
}

/// A compile cache shared by the tests, so each guest compiles once.
pub fn shared_cache() -> PathBuf {
    root().join("target/wasmproc-test-cache")
}

/// The wasmproc binary under test.
pub fn wasmproc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wasmproc"))
}

/// A running `wasmproc run`.
pub struct Host {
    child: Option<Child>,
    /// Where it serves HTTP, read from its `listening on` log line (empty
    /// without web process types).
    pub addr: String,
    /// Where its admin API listens.
    pub admin: String,
    lines: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

fn capture(stream: impl std::io::Read + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    });
}

impl Host {
    /// Writes `formation` (with `{hello}`, `{testbed}` replaced by guest
    /// paths) into a fresh folder and runs it with the shared cache.
    pub fn start(formation: &str) -> Host {
        Self::start_with(formation, &shared_cache(), &[])
    }

    /// Like [`Host::start`], with a given cache and extra environment.
    pub fn start_with(formation: &str, cache: &Path, env: &[(&str, &str)]) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("formation.toml");
        std::fs::write(&path, expand(formation)).unwrap();
        Self::spawn(dir, &path, cache, env)
    }

    /// Like [`Host::start`], with the host allowed at most `limit` open
    /// files (through `prlimit`, which then runs it in its own process).
    pub fn start_with_open_files(formation: &str, limit: u32) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("formation.toml");
        std::fs::write(&path, expand(formation)).unwrap();
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={limit}:{limit}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_wasmproc"));
        Self::spawn_command(command, "run", dir, &path, &shared_cache(), &[])
    }

    fn spawn(dir: tempfile::TempDir, path: &Path, cache: &Path, env: &[(&str, &str)]) -> Host {
        Self::spawn_command(wasmproc(), "run", dir, path, cache, env)
    }

    /// `wasmproc dev` on the formation at `path` in `dir`, with the shared
    /// cache and `env`.
    pub fn start_dev(dir: tempfile::TempDir, path: &Path, env: &[(&str, &str)]) -> Host {
        Self::spawn_command(wasmproc(), "dev", dir, path, &shared_cache(), env)
    }

    fn spawn_command(
        mut command: Command,
        verb: &str,
        dir: tempfile::TempDir,
        path: &Path,
        cache: &Path,
        env: &[(&str, &str)],
    ) -> Host {
        command
            .arg(verb)
            .arg("--cache-dir")
            .arg(cache)
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        capture(child.stdout.take().unwrap(), lines.clone());
        capture(child.stderr.take().unwrap(), lines.clone());
        let mut host = Host {
            child: Some(child),
            addr: String::new(),
            admin: String::new(),
            lines,
            dir,
        };
        host.wait_for_log("ready: ");
        let address = |log: &[String], marker: &str| {
            log.iter()
                .find_map(|l| l.split(marker).nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_default()
                .to_string()
        };
        let log = host.log();
        host.addr = address(&log, "listening on http://");
        host.admin = address(&log, "admin API on http://");
        host
    }

    /// Every line logged so far (stdout and stderr).
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle` and returns it. Fails the
    /// test, showing the log, if none appears within [`DEADLINE`] or the
    /// process exits first.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // Give the reader threads a moment to drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                    return line;
                }
                panic!(
                    "wasmproc exited ({status}) before logging `{needle}`:\n{}",
                    self.log().join("\n")
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no log line with `{needle}` within {DEADLINE:?}:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a request; returns status, `Retry-After` (if any) and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        host: Option<&str>,
        body: Option<&[u8]>,
    ) -> Reply {
        request(&self.addr, method, path, host, body)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None, None)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "wasmproc did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The folder holding the formation file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a request got back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: String,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(DEADLINE))
        .max_idle_connections(0)
        .build()
        .into()
}

/// Sends one request to `addr` (`IP:PORT`).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    host: Option<&str>,
    body: Option<&[u8]>,
) -> Reply {
    let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
    request_with(addr, method, path, &headers, body)
}

/// Sends one request to `addr` with `headers`.
pub fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let agent = agent();
    let url = format!("http://{addr}{path}");
    let mut builder = http::Request::builder().method(method).uri(&url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = match body {
        Some(body) => agent.run(builder.body(body.to_vec()).unwrap()),
        None => agent.run(builder.body(()).unwrap()),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.into_body().read_to_string().unwrap_or_default();
    Reply {
        status,
        retry_after,
        body,
    }
}

/// A `redis-server` on a free loopback port, stopped on drop.
pub struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one; fails the test if `redis-server` is not installed
    /// (`.ci/run` installs it).
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            port,
            _dir: dir,
        }
    }

    /// Runs `redis-cli ARGS…` against this server; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("redis-cli comes with redis-server");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Host {
    /// Sends SIGKILL (no chance to clean up) and waits for the process.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Runs `formation` again in the same folder (same queue data), with
    /// the shared compile cache.
    pub fn restart_in(dir: tempfile::TempDir, formation_file: &Path) -> Host {
        Self::spawn(dir, formation_file, &shared_cache(), &[])
    }

    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `check(log)` holds, failing with the log after [`DEADLINE`].
    pub fn wait_until(&self, what: &str, check: impl Fn(&[String]) -> bool) {
        let start = Instant::now();
        loop {
            if check(&self.log()) {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: not within {DEADLINE:?}:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Gives up the folder (to restart a host in it after this one is gone).
    pub fn into_dir(mut self) -> tempfile::TempDir {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// The admin API: POST a message; returns status and body.
    pub fn enqueue(&self, queue: &str, body: &str) -> Reply {
        self.admin_request(
            "POST",
            &format!("/queues/{queue}/messages"),
            Some(body.as_bytes()),
        )
    }

    /// The token the host wrote beside its formation at start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir().join(".wasmproc/admin.token")).unwrap()
    }

    /// A request to the admin API, with the host's token.
    pub fn admin_request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        self.admin_request_with(method, path, &[], body)
    }

    /// A request to the admin API with `headers`, and the host's token.
    pub fn admin_request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let bearer = format!("Bearer {}", self.admin_token());
        let mut all = vec![("authorization", bearer.as_str())];
        all.extend_from_slice(headers);
        request_with(&self.admin, method, path, &all, body)
    }

    /// `GET /metrics` on the admin API.
    pub fn metrics(&self) -> String {
        self.admin_request("GET", "/metrics", None).body
    }
}

/// Runs `examples/NAME/build.sh` once per test binary (a build script
/// leaves an up-to-date component alone, so later binaries pay little),
/// compiles the example into the shared cache, and returns its folder.
pub fn example(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let folder = root().join("examples").join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|b| b == name) {
        let status = Command::new(folder.join("build.sh"))
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("run the example's build.sh");
        assert!(status.success(), "building examples/{name} failed");
        // Compile its components into the shared cache once, here, under
        // the lock: hosts that several tests start at once would each
        // compile 12-18 MiB components at the same time otherwise, on a
        // machine's few cores, and outlast their deadlines.
        let out = wasmproc()
            .arg("check")
            .arg("--cache-dir")
            .arg(shared_cache())
            .arg(folder.join("formation.toml"))
            .env("PORT", "0")
            .output()
            .expect("run wasmproc check");
        assert!(
            out.status.success(),
            "wasmproc check examples/{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        built.push(name.to_string());
    }
    folder
}

impl Host {
    /// Runs the formation file of `examples/NAME` (built first, see
    /// [`example`]) as it is, with `PORT=0`: a copy of it in a fresh folder,
    /// beside a link to the example's `build/` folder, so its relative paths
    /// hold and its queue and admin files stay out of the source tree.
    pub fn start_example(name: &str, env: &[(&str, &str)]) -> Host {
        let folder = example(name);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("formation.toml");
        std::fs::copy(folder.join("formation.toml"), &path).unwrap();
        std::os::unix::fs::symlink(folder.join("build"), dir.path().join("build")).unwrap();
        let mut env = env.to_vec();
        env.push(("PORT", "0"));
        Self::spawn(dir, &path, &shared_cache(), &env)
    }
}

impl Host {
    /// The process id of the running host.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Host {
    /// Runs `wasmproc ARGS… --formation F` against this host; returns the
    /// exit code, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = wasmproc()
            .args(args)
            .arg("--formation")
            .arg(self.dir().join("formation.toml"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The value of the Prometheus series `name` with all of `labels` in
/// `text`; 0 when the series does not exist (a counter never touched).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && labels.iter().all(|lab| l.contains(lab))
                || l.starts_with(&format!("{name} "))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
