//! How a worker ended, in words for the user: the cause, and its last words on stderr.

use std::process::ExitStatus;

/// Says how a worker ended: "killed by SIGSEGV (signal 11)", "exit code 3".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGKILL => "SIGKILL",
            libc::SIGBUS => "SIGBUS",
            libc::SIGFPE => "SIGFPE",
            libc::SIGILL => "SIGILL",
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            _ => "signal",
        };
        let hint = if sig == libc::SIGKILL {
            " — by someone else, e.g. the system's out-of-memory killer"
        } else {
            ""
        };
        format!("killed by {name} (signal {sig}){hint}")
    } else {
        format!("exit code {}", status.code().unwrap_or(-1))
    }
}

/// The part of a dead worker's stderr worth showing: from the last fatal-error report
/// (faulthandler's "Fatal Python error" and the stacks after it) if there is one, else
/// the last few lines.
pub fn last_words(tail: &[String]) -> Vec<String> {
    let start = tail
        .iter()
        .rposition(|l| l.starts_with("Fatal Python error"))
        .unwrap_or(tail.len().saturating_sub(20));
    tail[start..].to_vec()
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

    #[test]
    fn last_words_start_at_the_fatal_error() {
        let tail: Vec<String> = [
            "log",
            "Fatal Python error: Segmentation fault",
            "",
            "  File x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            last_words(&tail)[0],
            "Fatal Python error: Segmentation fault"
        );
        let many: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        assert_eq!(last_words(&many).len(), 20);
    }
}
