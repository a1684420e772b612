//! The `wasmproc` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use wasmproc::client::{self, AdminClient};
use wasmproc::engine::CompileCache;
use wasmproc::formation::{Formation, FormationErrors};
use wasmproc::run::{self, Refused};
use wasmproc::telemetry::{self, LogFormat};

/// mimalloc rather than the system allocator: a request allocates a few
/// dozen small blocks (hyper, wasi-http's resources), many freed on another
/// thread than the one that allocated them, which is glibc malloc's slow
/// path; mimalloc's thread-local free lists roughly halve their cost (8% of
/// a reused instance's request, counted by `bench/instructions.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run WASI 0.2 components as 12-factor processes: many isolated, limited
/// instances per process type, in one host.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, such as `info`, `debug` or `info,guest=warn`.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a formation until SIGTERM or SIGINT.
    Run(FormationArgs),
    /// Validate a formation and compile its components, without serving.
    Check(FormationArgs),
    /// Build and serve a formation, then rebuild and redeploy a type
    /// whenever a file in the formation's folder changes.
    Dev(DevArgs),
    /// Enqueue a message onto a queue of a running host.
    Enqueue(EnqueueArgs),
    /// List or replay the dead letters of a queue of a running host.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Read and write the `wasi:keyvalue` buckets of a running host.
    Kv {
        #[command(subcommand)]
        action: KvAction,
    },
    /// Show the process types of a running host.
    Ps {
        #[command(flatten)]
        host: HostArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a one-time link that opens a running host's dashboard.
    Ui {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Change the scale of process types: `web=16`, `web+2`, `mailer-1`.
    Scale {
        #[command(flatten)]
        host: HostArgs,
        /// Changes, applied together or not at all.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Swap in a new component for a process type, without dropping work.
    Deploy {
        #[command(flatten)]
        host: HostArgs,
        /// The process type.
        process: String,
        /// The new component file.
        component: PathBuf,
    },
}

/// How the CLI finds a running host.
#[derive(Args)]
struct HostArgs {
    /// The running host's formation (its admin address is read from
    /// `.wasmproc/admin.addr` beside it).
    #[arg(long, short = 'f', default_value = "formation.toml")]
    formation: PathBuf,
    /// The admin API address (`127.0.0.1:PORT`), instead of `--formation`.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
}

impl HostArgs {
    fn client(&self) -> anyhow::Result<AdminClient> {
        AdminClient::find(self.admin.as_deref(), &self.formation)
    }
}

#[derive(Args)]
struct EnqueueArgs {
    #[command(flatten)]
    host: HostArgs,
    /// The queue.
    queue: String,
    /// The message body; `-` or absent reads standard input.
    body: Option<String>,
    /// Read the body from this file.
    #[arg(long, conflicts_with = "body")]
    file: Option<PathBuf>,
    /// The body's media type.
    #[arg(long)]
    content_type: Option<String>,
    /// Deliver no earlier than this, such as `30s` or `1m 30s`.
    #[arg(long)]
    delay: Option<String>,
    /// An idempotency key: enqueuing again with the same key (within a
    /// day) answers with the first message's id instead of adding another,
    /// so a command that failed with an unknown outcome can be run again.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the dead letters of a queue, one JSON object per line.
    List {
        #[command(flatten)]
        host: HostArgs,
        /// The queue.
        queue: String,
    },
    /// Move dead letters back onto their queue as new first attempts.
    Replay {
        #[command(flatten)]
        host: HostArgs,
        /// The queue.
        queue: String,
        /// Message ids; none replays them all.
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KvAction {
    /// Print the value of a key (exit 1 if there is none).
    Get {
        #[command(flatten)]
        host: HostArgs,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// Set a key's value.
    Set {
        #[command(flatten)]
        host: HostArgs,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The value; `-` or absent reads standard input.
        value: Option<String>,
    },
    /// Remove a key.
    Delete {
        #[command(flatten)]
        host: HostArgs,
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// Print every key of a bucket, one per line.
    List {
        #[command(flatten)]
        host: HostArgs,
        /// The bucket.
        bucket: String,
    },
}

#[derive(Args)]
struct DevArgs {
    /// The formation file.
    formation: PathBuf,
    /// Where compiled components are cached [default: .wasmproc/cache beside the formation].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
struct FormationArgs {
    /// The formation file.
    formation: PathBuf,
    /// Run each process type's `build` command first.
    #[arg(long)]
    build: bool,
    /// Where compiled components are cached [default: .wasmproc/cache beside the formation].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

/// Sets `RUST_LIB_BACKTRACE=0` unless it is set, so that `RUST_BACKTRACE=1`
/// (common in container images) keeps backtraces for panics but no error
/// captures one. wasmproc never prints an error's backtrace, and wasmtime 48
/// makes an error each time a WASI 0.3 store is dropped with a guest fiber
/// still parked — with backtraces captured, a fresh 0.3 instance per request
/// loses up to a third of its throughput (`bench/README.md`).
fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in `main`, before any other thread
        // exists, so nothing can read the environment meanwhile.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RUST_LIB_BACKTRACE", "0");
        }
    }
}

fn main() -> ExitCode {
    quiet_library_backtraces();
    let cli = Cli::parse();
    // Kept until the end: dropping it flushes the last spans.
    let _telemetry = match telemetry::init(cli.log_format, &cli.log_level) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(errors) = e.downcast_ref::<FormationErrors>() {
                eprintln!("{errors}");
                ExitCode::from(2)
            } else if e.downcast_ref::<Refused>().is_some() {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => serve_or_check(args, true),
        Command::Check(args) => serve_or_check(args, false),
        Command::Dev(args) => {
            let formation = Formation::load(&args.formation, |name| std::env::var(name).ok())?;
            run::build(&formation)?;
            let cache = CompileCache::new(
                args.cache_dir
                    .clone()
                    .unwrap_or_else(|| run::default_cache_dir(&formation)),
            );
            runtime()?.block_on(run::dev(formation, cache))
        }
        Command::Enqueue(args) => runtime()?.block_on(enqueue(args)),
        Command::Dlq { action } => runtime()?.block_on(dlq(action)),
        Command::Kv { action } => runtime()?.block_on(kv(action)),
        Command::Ps { host, json } => runtime()?.block_on(async {
            let rows = host.client()?.ps().await?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                print!("{}", client::ps_table(&rows));
            }
            Ok(())
        }),
        Command::Ui { host } => runtime()?.block_on(async {
            let link = host.client()?.dashboard_link().await?;
            println!("{link}");
            eprintln!("(works once, within 15 minutes)");
            Ok(())
        }),
        Command::Scale { host, changes } => runtime()?.block_on(async {
            for (name, n) in host.client()?.scale(&changes).await? {
                println!("{name}={n}");
            }
            Ok(())
        }),
        Command::Deploy {
            host,
            process,
            component,
        } => runtime()?.block_on(async {
            let bytes = read(&component)?;
            let generation = host.client()?.deploy(&process, bytes).await?;
            println!(
                "deployed `{}` to `{process}` (generation {generation})",
                component.display()
            );
            Ok(())
        }),
    }
}

/// `wasmproc run` (`serve`) or `wasmproc check`.
fn serve_or_check(args: FormationArgs, serve: bool) -> anyhow::Result<()> {
    let formation = Formation::load(&args.formation, |name| std::env::var(name).ok())?;
    if args.build {
        run::build(&formation)?;
    }
    let cache = CompileCache::new(
        args.cache_dir
            .clone()
            .unwrap_or_else(|| run::default_cache_dir(&formation)),
    );
    if serve {
        return runtime()?.block_on(run::run(formation, cache));
    }
    run::prepare(&formation, &cache, &run::Backing::default())?;
    let names: Vec<String> = formation
        .processes
        .iter()
        .map(|p| format!("{} ({}, scale {})", p.name, p.kind(), p.scale))
        .collect();
    println!("{}: ok: {}", formation.path.display(), names.join(", "));
    Ok(())
}

/// Reads a file the user named, with a message that names it.
fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read `{}`: {e}", path.display()))
}

async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let body = match &args.file {
        Some(file) => read(file)?,
        None => value_or_stdin(args.body.as_deref())?,
    };
    let options = client::EnqueueOptions {
        content_type: args.content_type.as_deref(),
        delay: args.delay.as_deref(),
        key: args.key.as_deref(),
    };
    let enqueued = args
        .host
        .client()?
        .enqueue(&args.queue, body, &options)
        .await?;
    if enqueued.duplicate {
        eprintln!(
            "already enqueued with key `{}`: nothing added",
            args.key.as_deref().unwrap_or_default()
        );
    }
    println!("{}", enqueued.id);
    Ok(())
}

/// The body of a command: `value`, or standard input when it is `-` or absent.
fn value_or_stdin(value: Option<&str>) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    match value {
        Some(value) if value != "-" => Ok(value.as_bytes().to_vec()),
        _ => {
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body)?;
            Ok(body)
        }
    }
}

async fn kv(action: KvAction) -> anyhow::Result<()> {
    use std::io::Write as _;
    match action {
        KvAction::Get { host, bucket, key } => match host.client()?.kv_get(&bucket, &key).await? {
            Some(value) => std::io::stdout().write_all(&value)?,
            None => anyhow::bail!("no key `{key}` in `{bucket}`"),
        },
        KvAction::Set {
            host,
            bucket,
            key,
            value,
        } => {
            let value = value_or_stdin(value.as_deref())?;
            host.client()?.kv_set(&bucket, &key, value).await?;
        }
        KvAction::Delete { host, bucket, key } => host.client()?.kv_delete(&bucket, &key).await?,
        KvAction::List { host, bucket } => {
            for key in host.client()?.kv_list(&bucket).await? {
                println!("{key}");
            }
        }
    }
    Ok(())
}

async fn dlq(action: DlqAction) -> anyhow::Result<()> {
    match action {
        DlqAction::List { host, queue } => {
            for letter in host.client()?.dead_letters(&queue).await? {
                println!("{letter}");
            }
        }
        DlqAction::Replay { host, queue, ids } => {
            let n = host.client()?.replay(&queue, &ids).await?;
            println!("replayed {n} message{}", if n == 1 { "" } else { "s" });
        }
    }
    Ok(())
}
