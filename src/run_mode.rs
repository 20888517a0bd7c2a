//! Run modes of an execute request, read from the first line of its code.

use serde::Deserialize;

/// Where an execute request runs, from its code's first line (async-kernel's run-mode
/// comments: `# queue` (default), `# task`, `# thread …`, and kernelvisor's `# process`;
/// `##process` too). Only `process` changes anything in the supervisor so far.
#[derive(Debug, PartialEq, Eq)]
pub enum RunMode {
    /// The sequential queue of the main worker (also `# task`/`# thread` until the
    /// worker runs those concurrently).
    Queue,
    /// A worker borrowed from the pool.
    Process,
}

/// The run mode of an `execute_request` content (unparseable: the queue).
pub fn run_mode(content: &[u8]) -> RunMode {
    #[derive(Deserialize)]
    struct Code<'a> {
        #[serde(borrow)]
        code: std::borrow::Cow<'a, str>,
    }
    let Ok(Code { code }) = serde_json::from_slice::<Code>(content) else {
        return RunMode::Queue;
    };
    let first = code.lines().next().unwrap_or("").trim();
    let Some(comment) = first.strip_prefix('#') else {
        return RunMode::Queue;
    };
    match comment.trim_start_matches('#').split_whitespace().next() {
        Some("process") => RunMode::Process,
        _ => RunMode::Queue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_modes() {
        let mode = |code: &str| run_mode(json!({"code": code}).to_string().as_bytes());
        assert_eq!(mode("# process\nx = 1"), RunMode::Process);
        assert_eq!(mode("##process"), RunMode::Process);
        assert_eq!(mode("  #  process  \n"), RunMode::Process);
        assert_eq!(mode("# processing\n"), RunMode::Queue);
        assert_eq!(mode("x = 1 # process"), RunMode::Queue);
        assert_eq!(mode("# thread name='w'"), RunMode::Queue);
        assert_eq!(run_mode(b"not json"), RunMode::Queue);
    }
}
