//! The `wasmproc` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use wasmproc::engine::CompileCache;
use wasmproc::formation::{Formation, FormationErrors};
use wasmproc::run::{self, Refused};
use wasmproc::telemetry::{self, LogFormat};

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(cli.log_format, &cli.log_level) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
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

fn execute(command: Command) -> anyhow::Result<()> {
    let (args, serve) = match command {
        Command::Run(args) => (args, true),
        Command::Check(args) => (args, false),
    };
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(run::run(formation, cache))
    } else {
        run::prepare(&formation, &cache, None)?;
        let names: Vec<String> = formation
            .processes
            .iter()
            .map(|p| format!("{} ({}, scale {})", p.name, p.kind, p.scale))
            .collect();
        println!("{}: ok: {}", formation.path.display(), names.join(", "));
        Ok(())
    }
}
