//! kernelvisor: a Jupyter kernel for Python whose kernel process is this small
//! supervisor; Python code runs in CPython worker subprocesses that may crash, hang or be
//! killed without taking the kernel down.
//!
//! `kernelvisor -f CONNECTION_FILE` runs the kernel (what kernel.json launches);
//! `kernelvisor install` writes the kernelspec.

mod connection;
mod header;
mod heartbeat;
mod install;
mod iopub;
mod ipc;
mod kernel;
mod kernel_info;
mod outbox;
mod signer;
mod wire;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// A crash-proof Jupyter kernel for Python: a Rust supervisor owns the sockets,
/// CPython workers run the code.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the Jupyter kernelspec.
    Install(install::InstallArgs),
}

/// Running the kernel.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The connection file written by the Jupyter client.
    #[arg(short = 'f', long = "connection-file", value_name = "CONNECTION_FILE")]
    connection_file: Option<PathBuf>,
    /// The Python that runs the workers (it must have the `kernelvisor` package).
    #[arg(
        long,
        value_name = "PATH",
        env = "KERNELVISOR_PYTHON",
        default_value = "python3"
    )]
    python: PathBuf,
    /// The workers' Python version, recorded at install so `kernel_info` needs no worker.
    #[arg(long, value_name = "X.Y.Z")]
    python_version: Option<String>,
    /// The workers' event-loop backend.
    #[arg(long, value_enum, default_value_t = install::Backend::Asyncio)]
    backend: install::Backend,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); also
    /// `KERNELVISOR_LOG`.
    #[arg(
        long,
        value_name = "LEVEL",
        env = "KERNELVISOR_LOG",
        default_value = "warn"
    )]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Install(args)) => install::run(&args).map(|_| ()),
        None => run_kernel(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernelvisor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_kernel(args: RunArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Some(path) = args.connection_file else {
        anyhow::bail!("no connection file: run `kernelvisor -f CONNECTION_FILE` (see --help)");
    };
    let connection = connection::ConnectionInfo::load(&path)?;
    die_with_parent();
    let config = kernel::KernelConfig {
        connection,
        python: args.python,
        python_version: args.python_version,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(kernel::run(config))?;
    // Workers are gone and sockets flushed; do not wait for stray blocking tasks.
    runtime.shutdown_background();
    Ok(())
}

/// Asks Linux for SIGTERM when the process that launched us dies, so an orphaned kernel
/// shuts down (and takes its workers with it) instead of lingering.
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain prctl/getppid syscalls.
    unsafe {
        let parent = libc::getppid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        if libc::getppid() != parent {
            // The parent died before the prctl took effect.
            libc::raise(libc::SIGTERM);
        }
    }
}
