//! How a worker ended, in words for the user: the cause, and its last words on stderr.

use std::process::ExitStatus;

/// Says how a worker ended: "killed by SIGSEGV (signal 11)", "exit code 3".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        // The name from nix's signal table ("signal" for a number it does not know).
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("signal");
        let hint = if sig == nix::sys::signal::Signal::SIGKILL as i32 {
            " — by someone else, e.g. the system's out-of-memory killer"
        } else {
            ""
        };
        format!("killed by {name} (signal {sig}){hint}")
    } else {
        format!("exit code {}", status.code().unwrap_or(-1))
    }
}

/// First and last line of the worker's crash report (worker_py/kernelvisor/crash.py): the
/// crashing thread's frames from its cell down, as IPython shows a traceback.
const REPORT_BEGIN: &str =
    "kernelvisor: the crashing thread, from its cell (most recent call last):";
const REPORT_END: &str = "kernelvisor: end of the crash report";

/// The part of a dead worker's stderr worth showing, the user's code first:
///
/// - the worker's crash report, if it wrote one (the cell's line, then the frames below);
/// - then, after a "Details" line, faulthandler's dump ("Fatal Python error", and the
///   stack of the crashing thread, most recent call first) — without the threads that
///   run no cell (kernelvisor's own and libraries'), which stay in the kernel's log;
/// - with neither, the last few lines.
pub fn last_words(tail: &[String]) -> Vec<String> {
    let report = report_span(tail);
    let dump_end = report.map_or(tail.len(), |(begin, _)| begin);
    let fatal = tail[..dump_end]
        .iter()
        .rposition(|l| l.starts_with("Fatal Python error"));
    let mut words = Vec::new();
    if let Some((begin, end)) = report {
        words.extend_from_slice(&tail[begin + 1..end]);
    }
    let Some(fatal) = fatal else {
        if words.is_empty() {
            let start = tail.len().saturating_sub(20);
            return tail[start..].to_vec();
        }
        return words;
    };
    let dump = Dump::parse(&tail[fatal..dump_end]);
    let (shown, hidden): (Vec<&Block>, Vec<&Block>) = dump
        .threads
        .iter()
        .partition(|b| b.current || b.runs_a_cell());
    if !words.is_empty() {
        words.push(String::new());
    }
    let note = match hidden.len() {
        0 => String::new(),
        1 => "; one other thread's stack is in the kernel's log (--log-level debug)".into(),
        n => format!("; {n} other threads' stacks are in the kernel's log (--log-level debug)"),
    };
    words.push(format!(
        "Details (faulthandler, most recent call first{note}):"
    ));
    words.push(dump.error.to_string());
    // The crashing thread first.
    let (current, others): (Vec<&Block>, Vec<&Block>) = shown.iter().partition(|b| b.current);
    for block in current.into_iter().chain(others) {
        words.extend(block.lines.iter().map(|l| l.to_string()));
    }
    words
}

/// Where the last complete crash report lies in `tail`: (its first line, its last line).
fn report_span(tail: &[String]) -> Option<(usize, usize)> {
    let begin = tail.iter().rposition(|l| l == REPORT_BEGIN)?;
    let end = begin + tail[begin..].iter().position(|l| l == REPORT_END)?;
    Some((begin, end))
}

/// faulthandler's dump, as it writes it: the error line, then one block per thread.
struct Dump<'a> {
    error: &'a str,
    threads: Vec<Block<'a>>,
}

/// One thread's stack in the dump: its header line and its frames.
struct Block<'a> {
    lines: Vec<&'a str>,
    /// The thread that crashed ("Current thread …", or "Stack …" for a single-thread dump).
    current: bool,
}

impl Block<'_> {
    /// Whether one of its frames is a cell's (`…/kernelvisor_<pid>/<hash>.py`).
    fn runs_a_cell(&self) -> bool {
        self.lines.iter().any(|l| is_cell_frame(l))
    }
}

impl<'a> Dump<'a> {
    /// Parses from the "Fatal Python error" line on; lines that are not part of a
    /// thread's stack ("Extension modules: …", anything after) are left out.
    fn parse(lines: &'a [String]) -> Self {
        let error = lines.first().map_or("", String::as_str);
        let mut threads: Vec<Block<'a>> = Vec::new();
        let mut open = false;
        for line in lines.iter().skip(1).map(String::as_str) {
            let current = line.starts_with("Current thread ") || line.starts_with("Stack (");
            if current || line.starts_with("Thread ") {
                threads.push(Block {
                    lines: vec![line],
                    current,
                });
                open = true;
            } else if open && line.starts_with("  ") {
                if let Some(block) = threads.last_mut() {
                    block.lines.push(line);
                }
            } else {
                open = false;
            }
        }
        Dump { error, threads }
    }
}

/// Whether a faulthandler frame line (`  File "…", line N in f`) is in a cell's code.
fn is_cell_frame(line: &str) -> bool {
    let Some(path) = line
        .trim_start()
        .strip_prefix("File \"")
        .and_then(|rest| rest.split('"').next())
    else {
        return false;
    };
    let mut parts = path.rsplit('/');
    let (Some(file), Some(dir)) = (parts.next(), parts.next()) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    file.strip_suffix(".py").is_some_and(digits)
        && dir.strip_prefix("kernelvisor_").is_some_and(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGSEGV)),
            "killed by SIGSEGV (signal 11)"
        );
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert!(describe_exit(ExitStatus::from_raw(libc::SIGKILL)).contains("out-of-memory"));
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    /// What a worker writes when a cell segfaults: faulthandler's dump (a kernelvisor
    /// thread, a user thread started by a cell, the crashing thread), then its report.
    const CRASH: &str = r#"kernelvisor-worker[7] INFO log line
Fatal Python error: Segmentation fault

Thread 0x00007f1 (most recent call first):
  File "/venv/kernelvisor/capture.py", line 86 in _loop
  File "/usr/lib/python3.11/threading.py", line 982 in run

Thread 0x00007f2 (most recent call first):
  File "/tmp/kernelvisor_521/1234.py", line 2 in spin
  File "/usr/lib/python3.11/threading.py", line 982 in run

Current thread 0x00007f3 (most recent call first):
  File "/usr/lib/python3.11/ctypes/__init__.py", line 519 in string_at
  File "/tmp/kernelvisor_521/3364649552.py", line 3 in <module>
  File "/venv/IPython/core/interactiveshell.py", line 3823 in run_code

Extension modules: numpy.core._multiarray_umath (total: 1)
kernelvisor: the crashing thread, from its cell (most recent call last):
Cell In[2], line 3
      2 y = 2
----> 3 ctypes.string_at(0)
kernelvisor: end of the crash report"#;

    #[test]
    fn the_cells_line_comes_first_then_the_details() {
        let words = last_words(&lines(CRASH));
        assert_eq!(words[0], "Cell In[2], line 3");
        assert_eq!(words[2], "----> 3 ctypes.string_at(0)");
        assert_eq!(words[3], "");
        assert_eq!(
            words[4],
            "Details (faulthandler, most recent call first; one other thread's stack is in \
             the kernel's log (--log-level debug)):"
        );
        assert_eq!(words[5], "Fatal Python error: Segmentation fault");
        // The crashing thread first, then a thread that runs a cell; not kernelvisor's own.
        assert_eq!(
            words[6],
            "Current thread 0x00007f3 (most recent call first):"
        );
        assert!(words[7].contains("line 519 in string_at"));
        assert_eq!(words[10], "Thread 0x00007f2 (most recent call first):");
        assert_eq!(words.len(), 13, "{words:#?}");
        assert!(!words.iter().any(|w| w.contains("capture.py")));
        assert!(!words.iter().any(|w| w.contains("Extension modules")));
    }

    #[test]
    fn without_a_report_the_crashing_thread_comes_first() {
        let text = CRASH.split("kernelvisor: the crashing").next().unwrap();
        let words = last_words(&lines(text));
        assert!(words[0].starts_with("Details (faulthandler"), "{words:#?}");
        assert_eq!(words[1], "Fatal Python error: Segmentation fault");
        assert_eq!(
            words[2],
            "Current thread 0x00007f3 (most recent call first):"
        );
    }

    #[test]
    fn a_single_thread_dump_and_plain_exits() {
        let words = last_words(&lines(
            "Fatal Python error: Aborted\n\nStack (most recent call first):\n  File \"x.py\", line 1 in f",
        ));
        assert_eq!(
            words[1..],
            [
                "Fatal Python error: Aborted",
                "Stack (most recent call first):",
                "  File \"x.py\", line 1 in f"
            ]
        );
        assert_eq!(words[0], "Details (faulthandler, most recent call first):");
        let many: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        assert_eq!(last_words(&many).len(), 20);
        assert_eq!(last_words(&many)[0], "30");
    }

    #[test]
    fn cell_frames() {
        assert!(is_cell_frame(
            r#"  File "/tmp/kernelvisor_521/3364649552.py", line 3 in <module>"#
        ));
        assert!(!is_cell_frame(
            r#"  File "/tmp/kernelvisor_x/3364649552.py", line 3 in f"#
        ));
        assert!(!is_cell_frame(
            r#"  File "/venv/kernelvisor/worker.py", line 3 in f"#
        ));
        assert!(!is_cell_frame("  <no Python frame>"));
    }
}
