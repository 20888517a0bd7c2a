//! `kernelvisor install`: writes a Jupyter kernelspec (`kernel.json` plus
//! logos) whose argv launches this very binary as the kernel supervisor.
//!
//! The logic is split into pure functions (flag/env interpretation, name and
//! `KEY=VALUE` validation, building `kernel.json`) and a thin effectful shell
//! ([`run`]) that runs the chosen Python and writes files, so the former can be
//! unit-tested without touching the machine.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use clap::ArgGroup;
use serde_json::{json, Value};

/// Default kernelspec name (the directory under `kernels/`).
pub const DEFAULT_NAME: &str = "kernelvisor";

/// Default name shown in Jupyter's kernel picker.
pub const DEFAULT_DISPLAY_NAME: &str = "Python 3 (kernelvisor)";

/// Kernelspec name of `--backend trio` (beside the asyncio one, which it leaves alone).
pub const TRIO_NAME: &str = "kernelvisor-trio";

/// Display name of `--backend trio`.
pub const TRIO_DISPLAY_NAME: &str = "Python 3 (kernelvisor, trio)";

/// Logos copied into every kernelspec. Embedded so that an installed binary
/// does not need the source checkout.
const LOGOS: [(&str, &[u8]); 3] = [
    (
        "logo-32x32.png",
        include_bytes!("../kernelspec/logo-32x32.png"),
    ),
    (
        "logo-64x64.png",
        include_bytes!("../kernelspec/logo-64x64.png"),
    ),
    ("logo-svg.svg", include_bytes!("../kernelspec/logo-svg.svg")),
];

/// One interpreter run that proves the worker package is importable and
/// reports the version (for `--python-version`), `sys.prefix` (for
/// `--sys-prefix`) and whether debugpy is importable (the debugger).
const CHECK_SCRIPT: &str = "import kernelvisor, platform, json, importlib.util; \
     print(json.dumps({'version': platform.python_version(), 'prefix': __import__('sys').prefix, \
     'debugger': importlib.util.find_spec('debugpy') is not None}))";

/// Prepended to [`CHECK_SCRIPT`] for `--backend trio`: its workers need trio.
const TRIO_CHECK: &str = "import trio; ";

/// Used only for `--sys-prefix --no-check`, where importing the worker must not
/// be required.
const PREFIX_SCRIPT: &str = "import sys; print(sys.prefix)";

pub use crate::backend::Backend;

/// Arguments of `kernelvisor install`.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("location").args(["user", "sys_prefix", "prefix"])))]
pub struct InstallArgs {
    /// Install for the current user (the default): into $JUPYTER_DATA_DIR, else
    /// $XDG_DATA_HOME/jupyter or ~/.local/share/jupyter (~/Library/Jupyter on macOS).
    #[arg(long)]
    pub user: bool,

    /// Install into the chosen Python's sys.prefix (its virtualenv or conda env):
    /// SYS_PREFIX/share/jupyter/kernels/NAME.
    #[arg(long)]
    pub sys_prefix: bool,

    /// Install into DIR/share/jupyter/kernels/NAME.
    #[arg(long, value_name = "DIR")]
    pub prefix: Option<PathBuf>,

    /// Kernelspec name: ASCII letters, digits, '-', '_' and '.' only; lowercased,
    /// as jupyter_client does. [default: kernelvisor; with --backend trio:
    /// kernelvisor-trio]
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Name shown in Jupyter's kernel picker. [default: "Python 3 (kernelvisor)"; with
    /// --backend trio: "Python 3 (kernelvisor, trio)"]
    #[arg(long, value_name = "TEXT")]
    pub display_name: Option<String>,

    /// Python interpreter for the workers (default: the python3 beside this binary, as in
    /// the environment kernelvisor's wheel was installed into; else python3 on PATH). Recorded as an
    /// absolute path without resolving symlinks, so a virtualenv's python stays in
    /// its virtualenv.
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,

    /// Environment variable for the kernel, recorded in kernel.json (repeatable; the
    /// last value of a repeated KEY wins). Also applied to the install-time check.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,

    /// Event loop of the workers' main thread. `trio` writes a second kernelspec,
    /// kernelvisor-trio ("Python 3 (kernelvisor, trio)"), whose kernel runs cells in trio;
    /// the asyncio one is left alone (run `install` once per backend to have both). The
    /// check then also requires trio (`pip install 'kernelvisor[trio]'`).
    #[arg(long, value_enum, value_name = "BACKEND", default_value_t = Backend::Asyncio)]
    pub backend: Backend,

    /// Skip checking that the Python can import the worker package (for packaging,
    /// where the interpreter may not exist yet). kernel.json then carries no
    /// --python-version, and the kernel reports the version once a worker is up.
    #[arg(long)]
    pub no_check: bool,

    /// Declare transport encryption in the spec (`metadata.supported_encryption`), so that
    /// a client with `transport_encryption` "auto" or "required" provisions CurveZMQ keys.
    #[arg(long, value_enum, value_name = "MECHANISM")]
    pub encryption: Option<crate::curve::Encryption>,
}

/// Where the kernelspec goes, as chosen by the mutually exclusive flags.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    User,
    SysPrefix,
    Prefix(PathBuf),
}

impl InstallArgs {
    /// The kernelspec name: `--name`, else the backend's default.
    pub fn name(&self) -> &str {
        match (&self.name, self.backend) {
            (Some(name), _) => name,
            (None, Backend::Asyncio) => DEFAULT_NAME,
            (None, Backend::Trio) => TRIO_NAME,
        }
    }

    /// The display name: `--display-name`, else the backend's default.
    pub fn display_name(&self) -> &str {
        match (&self.display_name, self.backend) {
            (Some(text), _) => text,
            (None, Backend::Asyncio) => DEFAULT_DISPLAY_NAME,
            (None, Backend::Trio) => TRIO_DISPLAY_NAME,
        }
    }

    fn location(&self) -> Location {
        // clap's group guarantees at most one of these; none means --user.
        match (&self.prefix, self.sys_prefix) {
            (Some(dir), _) => Location::Prefix(dir.clone()),
            (None, true) => Location::SysPrefix,
            (None, false) => Location::User,
        }
    }
}

/// What the install-time check learned about the interpreter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PythonInfo {
    /// `platform.python_version()`, e.g. `3.12.1`.
    version: String,
    /// `sys.prefix`.
    prefix: PathBuf,
    /// debugpy is importable: the kernel has a debugger.
    debugger: bool,
}

/// Resolved, already-stringified inputs of `kernel.json`.
#[derive(Debug, Clone)]
struct SpecInputs<'a> {
    exe: &'a str,
    python: &'a str,
    python_version: Option<&'a str>,
    debugger: bool,
    display_name: &'a str,
    env: &'a [(String, String)],
    backend: Backend,
    encryption: Option<crate::curve::Encryption>,
}

/// Writes the kernelspec; prints where.
///
/// Returns the kernelspec directory written (`.../kernels/NAME`). An existing
/// kernelspec of the same name is overwritten.
pub fn run(args: &InstallArgs) -> Result<PathBuf> {
    if args.encryption.is_some() && !crate::curve::available() {
        bail!("--encryption curve: this kernelvisor's libzmq was built without CURVE");
    }
    let cwd = std::env::current_dir().context("cannot determine the current directory")?;
    let exe = std::env::current_exe().context("cannot locate the running kernelvisor binary")?;
    // Without --python: the environment this binary was pip-installed into, else PATH.
    let python = match (args.python.as_deref(), python_beside(&exe)) {
        (None, Some(beside)) => beside,
        (arg, _) => resolve_python(arg, std::env::var_os("PATH").as_deref(), &cwd)?,
    };

    let info = if args.no_check {
        if !python.exists() {
            // Legitimate when packaging for a target layout; worth a note otherwise.
            tracing::warn!(python = %python.display(), "python does not exist (--no-check)");
        }
        None
    } else {
        Some(check_python(&python, &args.env, args.backend)?)
    };

    let jupyter_dir = match args.location() {
        Location::User => absolutize(
            &cwd,
            &user_jupyter_dir(|k| std::env::var_os(k), cfg!(target_os = "macos"))?,
        ),
        Location::SysPrefix => {
            let prefix = match &info {
                Some(info) => info.prefix.clone(),
                None => query_sys_prefix(&python, &args.env)?,
            };
            prefix_jupyter_dir(&prefix)
        }
        Location::Prefix(dir) => prefix_jupyter_dir(&absolutize(&cwd, &dir)),
    };
    let name = args.name();
    let dir = kernel_dir(&jupyter_dir, name);

    let spec = kernel_json(&SpecInputs {
        exe: utf8(&exe, "the kernelvisor binary path")?,
        python: utf8(&python, "the python path")?,
        python_version: info.as_ref().map(|i| i.version.as_str()),
        debugger: info.as_ref().is_some_and(|i| i.debugger),
        display_name: args.display_name(),
        env: &args.env,
        backend: args.backend,
        encryption: args.encryption,
    });

    if dir.join("kernel.json").exists() {
        eprintln!(
            "Replacing existing kernelspec {} in {}",
            name,
            dir.display()
        );
    }
    write_kernelspec(&dir, &spec)?;
    println!("Installed kernelspec {} in {}", name, dir.display());
    Ok(dir)
}

/// clap value parser for `--name`: the rule of jupyter_client
/// (`^[a-z0-9._-]+$`, case-insensitive), lowercased as it lowercases names
/// on install and lookup, and never `.`/`..` (which would escape `kernels/`).
fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the kernel name must not be empty".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{c:?} is not allowed: kernel names may contain only ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("{s:?} is not a usable kernel name"));
    }
    Ok(s.to_ascii_lowercase())
}

/// clap value parser for `--env KEY=VALUE`; splits at the first `=`, so the
/// value may contain `=` and may be empty.
fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err("expected KEY=VALUE (no '=' found)".into());
    };
    if key.is_empty() {
        return Err("expected KEY=VALUE (the KEY before '=' is empty)".into());
    }
    // A NUL cannot be passed to a process environment at all.
    if s.contains('\0') {
        return Err("environment variables cannot contain NUL bytes".into());
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// The per-user Jupyter data dir, as jupyter_core's `jupyter_data_dir()`
/// computes it. `var` reads the environment (injected for tests); empty
/// variables count as unset.
fn user_jupyter_dir(var: impl Fn(&str) -> Option<OsString>, macos: bool) -> Result<PathBuf> {
    let get = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = get("JUPYTER_DATA_DIR") {
        return Ok(dir);
    }
    let home = || {
        get("HOME").context(
            "cannot locate the Jupyter data directory: $HOME is not set \
             (set $JUPYTER_DATA_DIR, or use --prefix DIR)",
        )
    };
    if macos {
        return Ok(home()?.join("Library").join("Jupyter"));
    }
    let data_home = match get("XDG_DATA_HOME") {
        Some(dir) => dir,
        None => home()?.join(".local").join("share"),
    };
    Ok(data_home.join("jupyter"))
}

/// `PREFIX/share/jupyter`, the data dir of an installation prefix.
fn prefix_jupyter_dir(prefix: &Path) -> PathBuf {
    prefix.join("share").join("jupyter")
}

/// `JUPYTER_DATA/kernels/NAME`.
fn kernel_dir(jupyter_dir: &Path, name: &str) -> PathBuf {
    jupyter_dir.join("kernels").join(name)
}

/// Makes `p` absolute against `cwd` without touching the filesystem: no
/// symlink resolution (a venv's `bin/python` is a symlink out of the venv) and
/// `..` kept, since it cannot be folded safely across symlinks.
fn absolutize(cwd: &Path, p: &Path) -> PathBuf {
    // `components()` drops `.` segments, so `./venv/bin/python` comes out clean.
    cwd.join(p).components().collect()
}

/// The interpreter to record: `--python` made absolute, or looked up on PATH
/// when it is a bare command name (the default being `python3`).
fn resolve_python(arg: Option<&Path>, path_var: Option<&OsStr>, cwd: &Path) -> Result<PathBuf> {
    let arg = arg.unwrap_or(Path::new("python3"));
    if arg.components().count() > 1 || arg.is_absolute() {
        return Ok(absolutize(cwd, arg));
    }
    find_on_path(arg, path_var, cwd).with_context(|| {
        format!(
            "`{}` was not found on PATH; pass the interpreter with --python /path/to/python",
            arg.display()
        )
    })
}

/// The Python of the environment whose `bin/` holds `exe` (installing kernelvisor's wheel
/// puts the binary beside the env's `python3`), if there is one.
fn python_beside(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    ["python3", "python"]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

/// First executable `name` in the `PATH`-style list `path_var`, made absolute.
fn find_on_path(name: &Path, path_var: Option<&OsStr>, cwd: &Path) -> Option<PathBuf> {
    std::env::split_paths(path_var?)
        // An empty PATH entry means the current directory.
        .map(|dir| absolutize(cwd, &dir.join(name)))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

/// Runs the import check; the error names the interpreter and says how to fix it.
fn check_python(python: &Path, env: &[(String, String)], backend: Backend) -> Result<PythonInfo> {
    let script = match backend {
        Backend::Asyncio => CHECK_SCRIPT.to_owned(),
        Backend::Trio => format!("{TRIO_CHECK}{CHECK_SCRIPT}"),
    };
    let out = run_python(python, &script, env)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if backend == Backend::Trio && stderr.contains("No module named 'trio'") {
            bail!(
                "{py} cannot import trio, which --backend trio needs: install it with \
                 `{py} -m pip install 'kernelvisor[trio]'` (or `trio`), or choose another \
                 interpreter with --python.",
                py = python.display(),
            );
        }
        bail!(
            "{py} cannot import the kernelvisor worker package ({status}):\n{tail}\n\
             Install it into that interpreter, e.g. `{py} -m pip install .` in a \
             kernelvisor checkout (or the wheel it builds), or choose another one with --python \
             (--no-check skips this check, e.g. when packaging).",
            py = python.display(),
            status = out.status,
            tail = indent(&tail_lines(&stderr, 6)),
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let info = parse_check_output(&stdout)
        .with_context(|| format!("unexpected output from {}", python.display()))?;
    tracing::debug!(python = %python.display(), version = %info.version, prefix = %info.prefix.display(), "python check passed");
    Ok(info)
}

/// `sys.prefix` of `python`, for `--sys-prefix --no-check`.
fn query_sys_prefix(python: &Path, env: &[(String, String)]) -> Result<PathBuf> {
    let out = run_python(python, PREFIX_SCRIPT, env)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let prefix = last_line(&stdout);
    if !out.status.success() || prefix.is_empty() {
        bail!(
            "{} could not report its sys.prefix ({}):\n{}",
            python.display(),
            out.status,
            indent(&tail_lines(&String::from_utf8_lossy(&out.stderr), 6)),
        );
    }
    Ok(PathBuf::from(prefix))
}

fn run_python(python: &Path, code: &str, env: &[(String, String)]) -> Result<std::process::Output> {
    Command::new(python)
        .arg("-c")
        .arg(code)
        .envs(env.iter().map(|(k, v)| (k, v)))
        // `python -c` puts the cwd on sys.path; run from `/` so a `kernelvisor/`
        // source directory under the cwd cannot make the check pass spuriously.
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => anyhow!("{} does not exist", python.display()),
            _ => anyhow!(e),
        })
        .with_context(|| format!("cannot run the python interpreter {}", python.display()))
}

/// Parses the check script's JSON line (the last non-empty one, in case
/// importing the worker printed anything).
fn parse_check_output(stdout: &str) -> Result<PythonInfo> {
    let line = last_line(stdout);
    let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .with_context(|| format!("missing {k:?} in {line:?}"))
    };
    Ok(PythonInfo {
        version: field("version")?.to_owned(),
        prefix: PathBuf::from(field("prefix")?),
        debugger: v.get("debugger").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The `kernel.json` document. `--python-version` (and `--debugger`) let the supervisor
/// answer `kernel_info` before its first worker is up; `--backend` is recorded only
/// when it is not the default, so plain specs stay plain. `metadata.debugger` is what
/// JupyterLab reads to offer its debugger: true when the check found debugpy.
fn kernel_json(s: &SpecInputs<'_>) -> Value {
    let mut argv = vec![s.exe, "-f", "{connection_file}", "--python", s.python];
    if let Some(version) = s.python_version {
        argv.extend(["--python-version", version]);
    }
    if s.debugger {
        argv.push("--debugger");
    }
    if s.backend != Backend::default() {
        argv.extend(["--backend", s.backend.as_str()]);
    }
    // A JSON object cannot repeat keys; the last --env for a key wins.
    let env: serde_json::Map<String, Value> = s
        .env
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut spec = json!({
        "argv": argv,
        "display_name": s.display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": env,
        "metadata": {
            "debugger": s.debugger,
            "kernelvisor": { "version": env!("CARGO_PKG_VERSION") },
        },
        "kernel_protocol_version": "5.4",
    });
    if let Some(encryption) = s.encryption {
        spec["metadata"]["supported_encryption"] = json!(encryption.as_str());
    }
    spec
}

/// Writes the logos, then `kernel.json`: Jupyter only lists directories that
/// have a `kernel.json`, so an install that fails midway leaves no broken spec.
fn write_kernelspec(dir: &Path, spec: &Value) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in LOGOS {
        write_atomic(&dir.join(name), bytes)?;
    }
    let mut text = serde_json::to_string_pretty(spec).context("cannot serialize kernel.json")?;
    text.push('\n');
    write_atomic(&dir.join("kernel.json"), text.as_bytes())
}

/// Write-then-rename, so a concurrently starting Jupyter never reads a
/// half-written file. (`fs::write` rather than a `tempfile`, whose 0600 mode
/// would hide a `--sys-prefix` spec from other users.)
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn utf8<'a>(path: &'a Path, what: &str) -> Result<&'a str> {
    path.to_str().with_context(|| {
        format!(
            "{what} {} is not valid UTF-8, which kernel.json cannot record",
            path.display()
        )
    })
}

fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// The last `n` non-empty lines (a traceback's tail names the actual error).
fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.len() {
        0 => "(no error output)".to_owned(),
        len => lines[len.saturating_sub(n)..].join("\n"),
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: InstallArgs,
    }

    fn parse(argv: &[&str]) -> Result<InstallArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("install").chain(argv.iter().copied())).map(|c| c.args)
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.location(), Location::User);
        assert_eq!(a.name(), "kernelvisor");
        assert_eq!(a.display_name(), "Python 3 (kernelvisor)");
        assert_eq!(a.backend, Backend::Asyncio);
        assert!(a.python.is_none() && a.env.is_empty() && !a.no_check);
    }

    #[test]
    fn location_flags() {
        assert_eq!(parse(&["--user"]).unwrap().location(), Location::User);
        assert_eq!(
            parse(&["--sys-prefix"]).unwrap().location(),
            Location::SysPrefix
        );
        assert_eq!(
            parse(&["--prefix", "/opt/x"]).unwrap().location(),
            Location::Prefix("/opt/x".into())
        );
        for bad in [
            &["--user", "--sys-prefix"][..],
            &["--user", "--prefix", "/x"],
            &["--sys-prefix", "--prefix", "/x"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn other_flags() {
        let a = parse(&[
            "--name",
            "My.Kernel-1_x",
            "--display-name",
            "Py",
            "--python",
            "/p/python",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--env",
            "C=",
            "--backend",
            "trio",
            "--no-check",
        ])
        .unwrap();
        assert_eq!(a.name(), "my.kernel-1_x");
        assert_eq!(a.display_name(), "Py");
        assert_eq!(a.python.as_deref(), Some(Path::new("/p/python")));
        assert_eq!(
            a.env,
            [("A", "1"), ("B", "x=y"), ("C", "")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(a.backend, Backend::Trio);
        assert!(a.no_check);
        assert!(parse(&["--backend", "curio"]).is_err());
    }

    #[test]
    fn trio_has_its_own_kernelspec_name() {
        let a = parse(&["--backend", "trio"]).unwrap();
        assert_eq!(a.name(), "kernelvisor-trio");
        assert_eq!(a.display_name(), "Python 3 (kernelvisor, trio)");
        let a = parse(&["--backend", "trio", "--name", "T", "--display-name", "D"]).unwrap();
        assert_eq!((a.name(), a.display_name()), ("t", "D"));
    }

    #[test]
    fn names() {
        assert_eq!(parse_name("kernelvisor").unwrap(), "kernelvisor");
        assert_eq!(parse_name("Py3.12-dev_X").unwrap(), "py3.12-dev_x");
        assert_eq!(parse_name("...").unwrap(), "...");
        for bad in ["", ".", "..", "a/b", "../x", "a b", "ké", "a\\b", "a:b"] {
            assert!(parse_name(bad).is_err(), "{bad:?} should be rejected");
        }
        let err = parse(&["--name", "bad/name"]).unwrap_err().to_string();
        assert!(err.contains("'/' is not allowed"), "{err}");
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env_pair("K=V").unwrap(), ("K".into(), "V".into()));
        assert_eq!(parse_env_pair("K==").unwrap(), ("K".into(), "=".into()));
        assert_eq!(parse_env_pair("K=").unwrap(), ("K".into(), String::new()));
        assert!(parse_env_pair("K").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_env_pair("=V").unwrap_err().contains("empty"));
        assert!(parse_env_pair("K=a\0b").is_err());
        let err = parse(&["--env", "NOPE"]).unwrap_err().to_string();
        assert!(err.contains("NOPE") && err.contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn user_dir() {
        let dir = |vars, mac| user_jupyter_dir(env_of(vars), mac).unwrap();
        let all = &[
            ("JUPYTER_DATA_DIR", "/j"),
            ("XDG_DATA_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(dir(all, false), Path::new("/j"));
        assert_eq!(dir(all, true), Path::new("/j"));
        let xdg = &[
            ("JUPYTER_DATA_DIR", ""),
            ("XDG_DATA_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(dir(xdg, false), Path::new("/x/jupyter"));
        assert_eq!(dir(xdg, true), Path::new("/h/Library/Jupyter"));
        let home = &[("HOME", "/h")];
        assert_eq!(dir(home, false), Path::new("/h/.local/share/jupyter"));
        assert!(user_jupyter_dir(env_of(&[]), false).is_err());
        assert!(user_jupyter_dir(env_of(&[("XDG_DATA_HOME", "/x")]), true).is_err());
    }

    #[test]
    fn target_dirs() {
        assert_eq!(
            kernel_dir(&prefix_jupyter_dir(Path::new("/venv")), "kv"),
            Path::new("/venv/share/jupyter/kernels/kv")
        );
        assert_eq!(
            kernel_dir(Path::new("/h/j"), "kv"),
            Path::new("/h/j/kernels/kv")
        );
    }

    #[test]
    fn absolute_paths_keep_symlinks_and_dotdot() {
        let cwd = Path::new("/w/proj");
        assert_eq!(
            absolutize(cwd, Path::new("./venv/bin/python")),
            Path::new("/w/proj/venv/bin/python")
        );
        assert_eq!(
            absolutize(cwd, Path::new("../v/./python")),
            Path::new("/w/proj/../v/python")
        );
        assert_eq!(
            absolutize(cwd, Path::new("/abs/python")),
            Path::new("/abs/python")
        );
        // Explicit paths are not looked up on PATH nor required to exist.
        let p = resolve_python(Some(Path::new("venv/bin/python")), None, cwd).unwrap();
        assert_eq!(p, Path::new("/w/proj/venv/bin/python"));
    }

    #[cfg(unix)]
    #[test]
    fn path_lookup() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        // Not executable: skipped, like a shell would.
        fs::write(a.join("python3"), "").unwrap();
        fs::write(b.join("python3"), "").unwrap();
        fs::set_permissions(b.join("python3"), fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        let found = resolve_python(None, Some(&path), Path::new("/")).unwrap();
        assert_eq!(found, b.join("python3"));
        let found =
            resolve_python(Some(Path::new("python3")), Some(&path), Path::new("/")).unwrap();
        assert_eq!(found, b.join("python3"));
        let err =
            resolve_python(Some(Path::new("python9")), Some(&path), Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("python9"), "{err:#}");
        assert!(resolve_python(None, None, Path::new("/")).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn python_beside_the_binary() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let exe = tmp.path().join("kernelvisor");
        assert_eq!(python_beside(&exe), None);
        fs::write(tmp.path().join("python"), "").unwrap();
        fs::set_permissions(tmp.path().join("python"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(python_beside(&exe), Some(tmp.path().join("python")));
        fs::write(tmp.path().join("python3"), "").unwrap();
        fs::set_permissions(
            tmp.path().join("python3"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(python_beside(&exe), Some(tmp.path().join("python3")));
    }

    #[test]
    fn check_output() {
        let info =
            parse_check_output("noise\n{\"version\": \"3.12.1\", \"prefix\": \"/venv\"}\n\n")
                .unwrap();
        assert_eq!(
            info,
            PythonInfo {
                version: "3.12.1".into(),
                prefix: "/venv".into(),
                debugger: false,
            }
        );
        let info = parse_check_output(
            "{\"version\": \"3.12.1\", \"prefix\": \"/venv\", \"debugger\": true}",
        )
        .unwrap();
        assert!(info.debugger);
        assert!(parse_check_output("").is_err());
        assert!(parse_check_output("{\"version\": \"3.12.1\"}").is_err());
        assert!(parse_check_output("{\"version\": \"\", \"prefix\": \"/v\"}").is_err());
    }

    fn inputs<'a>(env: &'a [(String, String)]) -> SpecInputs<'a> {
        SpecInputs {
            exe: "/bin/kernelvisor",
            python: "/venv/bin/python",
            python_version: Some("3.12.1"),
            debugger: false,
            display_name: "Python 3 (kernelvisor)",
            env,
            backend: Backend::Asyncio,
            encryption: None,
        }
    }

    #[test]
    fn kernel_json_shape() {
        let env = [("A".to_owned(), "1".to_owned())];
        let v = kernel_json(&inputs(&env));
        assert_eq!(
            v,
            json!({
                "argv": ["/bin/kernelvisor", "-f", "{connection_file}", "--python", "/venv/bin/python",
                         "--python-version", "3.12.1"],
                "display_name": "Python 3 (kernelvisor)",
                "language": "python",
                "interrupt_mode": "signal",
                "env": {"A": "1"},
                "metadata": {"debugger": false, "kernelvisor": {"version": env!("CARGO_PKG_VERSION")}},
                "kernel_protocol_version": "5.4",
            })
        );
    }

    #[test]
    fn kernel_json_variants() {
        let env = [
            ("A".to_owned(), "1".to_owned()),
            ("A".to_owned(), "2".to_owned()),
        ];
        let v = kernel_json(&SpecInputs {
            python_version: None,
            backend: Backend::Trio,
            ..inputs(&env)
        });
        assert_eq!(
            v["argv"],
            json!([
                "/bin/kernelvisor",
                "-f",
                "{connection_file}",
                "--python",
                "/venv/bin/python",
                "--backend",
                "trio"
            ])
        );
        assert_eq!(v["env"], json!({"A": "2"}));
        let v = kernel_json(&inputs(&[]));
        assert_eq!(v["env"], json!({}));
        // debugpy found by the check: JupyterLab's flag, and the supervisor's.
        let v = kernel_json(&SpecInputs {
            debugger: true,
            ..inputs(&[])
        });
        assert_eq!(v["metadata"]["debugger"], json!(true));
        assert_eq!(v["argv"].as_array().unwrap().last().unwrap(), "--debugger");
        let v = kernel_json(&SpecInputs {
            encryption: Some(crate::curve::Encryption::Curve),
            ..inputs(&[])
        });
        assert_eq!(v["metadata"]["supported_encryption"], json!("curve"));
    }

    #[test]
    fn install_into_prefix_without_check() {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = tmp.path().to_str().unwrap();
        let args = parse(&[
            "--prefix",
            prefix,
            "--no-check",
            "--python",
            "/nonexistent/bin/python",
            "--name",
            "KV-Test",
            "--display-name",
            "KV",
            "--env",
            "X=1",
        ])
        .unwrap();
        let dir = run(&args).unwrap();
        assert_eq!(dir, tmp.path().join("share/jupyter/kernels/kv-test"));

        let text = fs::read_to_string(dir.join("kernel.json")).unwrap();
        assert!(
            text.ends_with("}\n") && text.contains("\n  \"argv\""),
            "pretty + newline: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            v["argv"],
            json!([
                exe.to_str().unwrap(),
                "-f",
                "{connection_file}",
                "--python",
                "/nonexistent/bin/python"
            ])
        );
        assert_eq!(v["display_name"], "KV");
        assert_eq!(v["env"], json!({"X": "1"}));
        for (name, bytes) in LOGOS {
            assert_eq!(fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        }
        assert!(fs::read(dir.join("logo-64x64.png"))
            .unwrap()
            .starts_with(b"\x89PNG\r\n\x1a\n"));

        // Re-installing overwrites in place.
        let args = parse(&[
            "--prefix",
            prefix,
            "--no-check",
            "--python",
            "/p",
            "--name",
            "kv-test",
        ])
        .unwrap();
        assert_eq!(run(&args).unwrap(), dir);
        let v: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("kernel.json")).unwrap()).unwrap();
        assert_eq!(v["display_name"], "Python 3 (kernelvisor)");
        assert_eq!(v["env"], json!({}));
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 4, "{leftovers:?}");
    }

    #[test]
    fn trio_install_sits_beside_the_asyncio_one() {
        let tmp = tempfile::tempdir().unwrap();
        let prefix = tmp.path().to_str().unwrap();
        let common = ["--prefix", prefix, "--no-check", "--python", "/p/python"];
        let asyncio = run(&parse(&common).unwrap()).unwrap();
        let trio_args: Vec<&str> = common
            .iter()
            .copied()
            .chain(["--backend", "trio"])
            .collect();
        let trio = run(&parse(&trio_args).unwrap()).unwrap();
        assert_eq!(
            asyncio,
            tmp.path().join("share/jupyter/kernels/kernelvisor")
        );
        assert_eq!(
            trio,
            tmp.path().join("share/jupyter/kernels/kernelvisor-trio")
        );
        let spec = |dir: &Path| -> Value {
            serde_json::from_str(&fs::read_to_string(dir.join("kernel.json")).unwrap()).unwrap()
        };
        let (a, t) = (spec(&asyncio), spec(&trio));
        assert_eq!(a["display_name"], "Python 3 (kernelvisor)");
        assert_eq!(t["display_name"], "Python 3 (kernelvisor, trio)");
        let argv = |v: &Value| -> Vec<String> {
            v["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect()
        };
        assert!(!argv(&a).contains(&"--backend".to_owned()));
        assert!(argv(&t).ends_with(&["--backend".to_owned(), "trio".to_owned()]));
    }

    /// Fake interpreters are shell scripts; writing an executable while another
    /// test thread forks can make exec fail with ETXTBSY, so serialize.
    #[cfg(unix)]
    static SPAWN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[cfg(unix)]
    fn fake_python(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("python");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[cfg(unix)]
    #[test]
    fn install_with_check_into_sys_prefix() {
        let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let venv = tmp.path().join("venv");
        // Also proves that --env reaches the check.
        let py = fake_python(
            tmp.path(),
            r#"printf '{"version": "3.12.1", "prefix": "%s"}\n' "$FAKE_PREFIX""#,
        );
        let env_arg = format!("FAKE_PREFIX={}", venv.display());
        let args = parse(&[
            "--sys-prefix",
            "--python",
            py.to_str().unwrap(),
            "--env",
            &env_arg,
        ])
        .unwrap();
        let dir = run(&args).unwrap();
        assert_eq!(dir, venv.join("share/jupyter/kernels/kernelvisor"));
        let v: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("kernel.json")).unwrap()).unwrap();
        let argv = v["argv"].as_array().unwrap();
        assert_eq!(
            argv[3..],
            [
                json!("--python"),
                json!(py.to_str().unwrap()),
                json!("--python-version"),
                json!("3.12.1")
            ]
        );
    }

    #[cfg(unix)]
    #[test]
    fn sys_prefix_without_check_queries_python() {
        let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let py = fake_python(
            tmp.path(),
            &format!("echo '{}'", tmp.path().join("env").display()),
        );
        let args = parse(&[
            "--sys-prefix",
            "--no-check",
            "--python",
            py.to_str().unwrap(),
        ])
        .unwrap();
        let dir = run(&args).unwrap();
        assert_eq!(
            dir,
            tmp.path().join("env/share/jupyter/kernels/kernelvisor")
        );
        let v: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("kernel.json")).unwrap()).unwrap();
        assert_eq!(
            v["argv"].as_array().unwrap().len(),
            5,
            "no --python-version without the check"
        );
    }

    #[cfg(unix)]
    #[test]
    fn trio_check_needs_trio() {
        let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        // A python that has kernelvisor but not trio.
        let py = fake_python(
            tmp.path(),
            r#"case "$2" in *"import trio"*) echo "ModuleNotFoundError: No module named 'trio'" >&2; exit 1;; esac
printf '{"version": "3.12.1", "prefix": "/v"}\n'"#,
        );
        let prefix = tmp.path().join("out");
        let base = [
            "--prefix",
            prefix.to_str().unwrap(),
            "--python",
            py.to_str().unwrap(),
        ];
        run(&parse(&base).unwrap()).unwrap();
        let trio: Vec<&str> = base.iter().copied().chain(["--backend", "trio"]).collect();
        let err = format!("{:#}", run(&parse(&trio).unwrap()).unwrap_err());
        assert!(
            err.contains("cannot import trio") && err.contains("kernelvisor[trio]"),
            "{err}"
        );
        assert!(!prefix
            .join("share/jupyter/kernels/kernelvisor-trio")
            .exists());
    }

    #[cfg(unix)]
    #[test]
    fn failed_check_explains() {
        let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let py = fake_python(
            tmp.path(),
            "echo 'Traceback (most recent call last):' >&2\n\
             echo \"ModuleNotFoundError: No module named 'kernelvisor'\" >&2\nexit 1",
        );
        let prefix = tmp.path().join("out");
        let args = parse(&[
            "--prefix",
            prefix.to_str().unwrap(),
            "--python",
            py.to_str().unwrap(),
        ])
        .unwrap();
        let err = format!("{:#}", run(&args).unwrap_err());
        assert!(err.contains(py.to_str().unwrap()), "{err}");
        assert!(err.contains("No module named 'kernelvisor'"), "{err}");
        assert!(
            err.contains("pip install .") && err.contains("--no-check"),
            "{err}"
        );
        assert!(!prefix.exists(), "nothing written when the check fails");

        let missing = tmp.path().join("nope/python");
        let args = parse(&[
            "--prefix",
            prefix.to_str().unwrap(),
            "--python",
            missing.to_str().unwrap(),
        ])
        .unwrap();
        let err = format!("{:#}", run(&args).unwrap_err());
        assert!(
            err.contains("does not exist") && err.contains(missing.to_str().unwrap()),
            "{err}"
        );
    }
}
