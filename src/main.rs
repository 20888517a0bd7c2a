//! kernelvisor: a Jupyter kernel for Python whose kernel process is this small
//! supervisor; Python code runs in CPython worker subprocesses that may crash, hang or be
//! killed without taking the kernel down.
//!
//! `kernelvisor -f CONNECTION_FILE` runs the kernel (what kernel.json launches);
//! `kernelvisor install` writes the kernelspec.

mod admission;
mod backend;
mod cell_plan;
mod connection;
mod curve;
mod digests;
mod exit;
mod flow;
mod handover;
mod header;
mod heartbeat;
mod install;
mod iopub;
mod ipc;
mod ipc_ops;
mod kernel;
mod kernel_info;
mod msg_type;
mod outbox;
mod pool;
mod proctree;
mod signals;
mod signer;
mod snapshot;
mod sockets;
mod tasks;
mod timings;
mod wire;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A crash-proof Jupyter kernel for Python: a Rust supervisor owns the sockets,
/// CPython workers run the code.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Log filter (error, warn, info, debug, trace, or `target=level` directives such as
    /// `warn,kernelvisor::kernel=debug`); also `KERNELVISOR_LOG`. Logs go to stderr.
    #[arg(
        long,
        global = true,
        value_name = "LEVEL",
        env = "KERNELVISOR_LOG",
        default_value = "warn"
    )]
    log_level: String,
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
    /// The event loop of the workers' main thread (trio is passed to every worker as
    /// `--backend trio`; `kernelvisor install --backend trio` writes a spec that sets it).
    #[arg(long, value_enum, default_value_t = backend::Backend::Asyncio)]
    backend: backend::Backend,
    /// Forked snapshots of the main worker at cell boundaries, so that a crash costs only
    /// the cell: `on` or `off` (switched at run time by `%snapshot on|off`).
    #[arg(
        long,
        value_name = "on|off",
        env = "KERNELVISOR_SNAPSHOTS",
        default_value = "on",
        value_parser = parse_on_off
    )]
    snapshots: bool,
    /// Private memory a snapshot may hold (e.g. 2G) before it is dropped. Default: half
    /// the memory limit, or no budget without one.
    #[arg(long, value_name = "SIZE", env = "KERNELVISOR_SNAPSHOT_MEMORY", value_parser = parse_size)]
    snapshot_memory: Option<u64>,
    /// The workers' Python has debugpy (recorded by `kernelvisor install`), so `kernel_info`
    /// advertises the debugger before the first worker says so itself.
    #[arg(long)]
    debugger: bool,
    /// `MAX_IDLE_POOL_INSTANCES`: idle workers kept at most; a worker that becomes idle
    /// when this many already are is retired at once.
    #[arg(
        long,
        value_name = "N",
        env = "KERNELVISOR_MAX_IDLE_POOL_INSTANCES",
        default_value_t = 2
    )]
    max_idle_pool_instances: usize,
    /// `IDLE_WORKER_SHUTDOWN_DURATION`: idle workers older than this many seconds are
    /// retired (0: never), down to `--warm-workers`.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "KERNELVISOR_IDLE_WORKER_SHUTDOWN_DURATION",
        default_value_t = 60.0
    )]
    idle_worker_shutdown_duration: f64,
    /// Idle workers always kept ready (IPython imported), so that a worker is there at once
    /// for a crash without a snapshot or a `# process` cell (at most
    /// `--max-idle-pool-instances`). Default: 0 with a template (it forks one in
    /// milliseconds, and a spare would cost its own pages), 1 without.
    #[arg(long, value_name = "N", env = "KERNELVISOR_WARM_WORKERS")]
    warm_workers: Option<usize>,
    /// Fork workers from a template process (imports done once, pages shared by every
    /// worker) instead of starting each from scratch: `on` or `off`. Off with uvloop.
    #[arg(
        long,
        value_name = "on|off",
        env = "KERNELVISOR_TEMPLATE",
        default_value = "on",
        value_parser = parse_on_off
    )]
    template: bool,
    /// Resident memory a worker may use (e.g. 4G, 512M); above it the worker is killed and
    /// the cell gets an "out of memory" error. Default: no limit.
    #[arg(long, value_name = "SIZE", env = "KERNELVISOR_MEMORY_LIMIT", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Kill a busy worker that has not answered the supervisor for this many seconds (a
    /// deadlock in C code holding the GIL). 0: never (long C calls are legitimate).
    #[arg(
        long,
        value_name = "SECONDS",
        env = "KERNELVISOR_UNRESPONSIVE_TIMEOUT",
        default_value_t = 0.0
    )]
    unresponsive_timeout: f64,
    /// Kill the worker if an interrupted cell is still running after this many seconds.
    /// 0: wait for a second interrupt (which always kills).
    #[arg(
        long,
        value_name = "SECONDS",
        env = "KERNELVISOR_INTERRUPT_GRACE",
        default_value_t = 0.0
    )]
    interrupt_grace: f64,
    /// Arguments kernelvisor does not know, e.g. the files `jupyter run` appends: logged and
    /// ignored, as ipykernel ignores them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    ignored: Vec<String>,
}

fn main() -> ExitCode {
    // First thing, before any thread or start-up work: SIGINT, SIGTERM and SIGCHLD are
    // blocked in every thread, and the kernel reads them from a signalfd (signals.rs): a
    // client's SIGINT to our process group while we start waits, and no handler ever
    // interrupts a system call.
    let held = signals::hold();
    // Then the process that launched us: a parent that dies while we start is noticed
    // (see `die_with_parent`).
    let parent = nix::unistd::getppid();
    let cli = Cli::parse();
    let result = init_logging(&cli.log_level).and_then(|()| match cli.command {
        Some(Command::Install(args)) => {
            // Not a kernel: Ctrl-C stops it.
            signals::let_in()?;
            install::run(&args).map(|_| ())
        }
        None => {
            if let Err(e) = held {
                tracing::warn!(error = %e, "cannot block the kernel's signals");
            }
            run_kernel(cli.run, parent)
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernelvisor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr through `tracing`, for the kernel run and `install` alike. `level` is
/// a list of `target=level` directives and a default level (`warn,kernelvisor=debug`):
/// `Targets`, not `EnvFilter`, whose span and field filters would bring a regex engine
/// into every kernel's memory for directives nobody gives.
fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter: Targets = level
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?;
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: Jupyter servers capture stderr into log files.
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(fmt).with(filter).init();
    Ok(())
}

fn run_kernel(args: RunArgs, parent: nix::unistd::Pid) -> anyhow::Result<()> {
    if !args.ignored.is_empty() {
        tracing::warn!(arguments = ?args.ignored, "ignoring arguments kernelvisor does not know");
    }
    let Some(path) = args.connection_file else {
        anyhow::bail!("no connection file: run `kernelvisor -f CONNECTION_FILE` (see --help)");
    };
    let connection = connection::ConnectionInfo::load(&path)?;
    die_with_parent(parent)?;
    become_subreaper()?;
    let template = args.template && std::env::var("KERNELVISOR_UVLOOP").as_deref() != Ok("1");
    let config = kernel::KernelConfig {
        connection,
        connection_file: std::path::absolute(&path).unwrap_or(path),
        python: args.python,
        python_version: args.python_version,
        pool: pool::PoolPolicy {
            max_idle: args.max_idle_pool_instances,
            idle_shutdown: seconds(
                args.idle_worker_shutdown_duration,
                "--idle-worker-shutdown-duration",
            )?
            .unwrap_or_default(),
            warm: args.warm_workers.unwrap_or(usize::from(!template)),
            template,
        },
        memory_limit: args.memory_limit,
        unresponsive_timeout: seconds(args.unresponsive_timeout, "--unresponsive-timeout")?,
        interrupt_grace: seconds(args.interrupt_grace, "--interrupt-grace")?,
        backend: args.backend,
        debugger: args.debugger,
        snapshots: snapshot::SnapshotConfig {
            enabled: args.snapshots,
            memory_budget: args.snapshot_memory.or(args.memory_limit.map(|l| l / 2)),
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(kernel::run(config))?;
    // Every task was stopped and waited for (bounded, in `kernel::run`): nothing should be
    // left, and nothing left may hold up the exit.
    let ending = std::time::Instant::now();
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    tracing::debug!(elapsed = ?ending.elapsed(), "runtime shut down");
    Ok(())
}

/// A duration option: `None` for zero (off); an error for negative or non-finite values.
fn seconds(value: f64, flag: &str) -> anyhow::Result<Option<std::time::Duration>> {
    if !value.is_finite() || value < 0.0 {
        anyhow::bail!("{flag} must be a non-negative number of seconds, not {value}");
    }
    Ok((value > 0.0).then(|| std::time::Duration::from_secs_f64(value)))
}

/// Parses a memory size: plain bytes, or with a K/M/G/T suffix (powers of 1024,
/// optional `B`/`iB`), e.g. `512M`, `4G`, `1.5GiB`.
fn parse_size(text: &str) -> Result<u64, String> {
    let upper = text.trim().to_ascii_uppercase();
    let t = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (num, shift) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512M or 4G"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{text:?}: the size must be positive"));
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

/// `on`/`off` (also `true`/`false`, `1`/`0`).
fn parse_on_off(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{text:?}: expected on or off")),
    }
}

/// Makes the supervisor a child subreaper: a snapshot, forked by a worker, is reparented
/// to us when that worker dies, so that we can promote it (and reap it).
fn become_subreaper() -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| anyhow::anyhow!("cannot become a child subreaper: {e}"))?;
    Ok(())
}

/// Asks Linux for SIGTERM when the process that launched us dies, so an orphaned kernel
/// shuts down (and takes its workers with it) instead of lingering. `parent` is the parent
/// read first thing in `main`: if it is gone already (it died while we started, before the
/// request took effect), this fails and the kernel stops at once.
fn die_with_parent(parent: nix::unistd::Pid) -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use anyhow::Context as _;
        use nix::sys::signal::Signal;
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
            .context("cannot ask for a signal at the parent's death (PR_SET_PDEATHSIG)")?;
        // Gone before that: nobody will send the signal. (Raising it would not stop us
        // either: SIGTERM is blocked until the kernel reads it, signals.rs.)
        anyhow::ensure!(
            nix::unistd::getppid() == parent,
            "the process that started the kernel (pid {parent}) has exited: stopping"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = parent;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2kb"), Ok(2048));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(seconds(0.0, "x").unwrap(), None);
        assert_eq!(
            seconds(1.5, "x").unwrap(),
            Some(std::time::Duration::from_millis(1500))
        );
        assert!(seconds(-1.0, "x").is_err());
        assert!(seconds(f64::NAN, "x").is_err());
    }

    #[test]
    fn unknown_trailing_arguments_are_ignored() {
        // `jupyter run --kernel kernelvisor file.py` appends the file to the kernel's argv.
        let cli =
            Cli::try_parse_from(["kernelvisor", "-f", "c.json", "--debugger", "file.py"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.connection_file, Some(PathBuf::from("c.json")));
        assert!(cli.run.debugger);
        assert_eq!(cli.run.ignored, ["file.py"]);
        let cli = Cli::try_parse_from(["kernelvisor", "-f", "c.json", "--x=1", "a"]).unwrap();
        assert_eq!(cli.run.ignored, ["--x=1", "a"]);
        let cli = Cli::try_parse_from(["kernelvisor", "install", "--user"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Install(_))));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
