//! How an `execute_request` is to run, decided by the supervisor when it arrives: its run
//! mode (async-kernel's first-line comments, `silent`, cell tags), and what an error in it
//! does to the queue (`stop_on_error`, the `raises-exception` / `stop-on-error` tags), and
//! its `timeout=` and `snapshot` tags; and whether it takes an execution count.

use std::borrow::Cow;
use std::time::Duration;

use serde::Deserialize;

use crate::install::Backend;

/// Where a cell runs (async-kernel's run modes, plus kernelvisor's `# process`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One at a time, in the order of its queue (the main shell's or a subshell's).
    Queue,
    /// At once, as a concurrent task on the main worker's event loop.
    Task,
    /// At once, in another thread of the main worker.
    Thread {
        /// The thread to run in (the same name, the same thread); `None`: a pooled one.
        name: Option<String>,
        /// The event loop of a thread created for it; `None`: the worker's.
        backend: Option<Backend>,
    },
    /// In a worker borrowed from the pool.
    Process,
}

/// The cell tags the supervisor acts on (from the request's `metadata.tags`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tags {
    /// `raises-exception`: an error is expected, and does not abort the queue.
    pub raises_exception: bool,
    /// `stop-on-error` (`=true`) or `stop-on-error=false`: overrides `stop_on_error`.
    pub stop_on_error: Option<bool>,
    /// `timeout=SECONDS`: interrupt the cell once it has run this long.
    pub timeout: Option<Duration>,
    /// `snapshot`: fork a snapshot right before this cell, whatever the burst rule says
    /// (a crash in it then costs exactly this cell, even in a fast Run All).
    pub snapshot: bool,
}

/// Everything the supervisor decides about an execute request.
#[derive(Debug, Clone, PartialEq)]
pub struct CellPlan {
    /// Where it runs.
    pub mode: Mode,
    /// `silent` from the content.
    pub silent: bool,
    /// `stop_on_error` from the content (default true).
    pub stop_on_error: bool,
    /// Its tags.
    pub tags: Tags,
    /// Its first line is `%undo`: no snapshot is taken before it (it rolls back to the
    /// one before).
    pub undo: bool,
    /// It takes the next execution count: stored in history (`store_history`, default
    /// `!silent`), not `silent`, and not blank (IPython counts no blank cell).
    pub takes_count: bool,
}

impl CellPlan {
    /// The plan of an `execute_request`, from its content and metadata frames.
    /// Unparseable content runs in the queue, as a plain cell would.
    pub fn parse(content: &[u8], metadata: &[u8]) -> CellPlan {
        #[derive(Deserialize)]
        struct Content<'a> {
            #[serde(borrow, default)]
            code: Cow<'a, str>,
            #[serde(default)]
            silent: bool,
            #[serde(default = "yes")]
            stop_on_error: bool,
            store_history: Option<bool>,
        }
        fn yes() -> bool {
            true
        }
        let content = is_object(content)
            .then(|| serde_json::from_slice::<Content>(content).ok())
            .flatten()
            .unwrap_or(Content {
                code: Cow::Borrowed(""),
                silent: false,
                stop_on_error: true,
                store_history: None,
            });
        let tag_list = tag_list(metadata);
        let tags = parse_tags(&tag_list);
        let mode = first_line_mode(&content.code)
            .or_else(|| content.silent.then_some(Mode::Task))
            .or_else(|| tag_list.iter().find_map(|t| mode_named(t, "")))
            .unwrap_or(Mode::Queue);
        let undo = content
            .code
            .trim_start()
            .lines()
            .next()
            .is_some_and(|l| l.split_whitespace().next() == Some("%undo"));
        let stored = content.store_history.unwrap_or(!content.silent);
        CellPlan {
            mode,
            silent: content.silent,
            stop_on_error: content.stop_on_error,
            tags,
            undo,
            takes_count: stored && !content.silent && !is_blank(&content.code),
        }
    }

    /// Whether an error in this cell aborts the cells queued behind it.
    pub fn abort_on_error(&self) -> bool {
        !self.silent
            && self
                .tags
                .stop_on_error
                .unwrap_or(!self.tags.raises_exception && self.stop_on_error)
    }
}

/// Blank as IPython sees a cell (`not cell or cell.isspace()`): Python's whitespace is
/// Unicode's plus the four separators U+001C..U+001F.
fn is_blank(code: &str) -> bool {
    code.chars()
        .all(|c| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Whether `content` is (at least starts as) a JSON object: serde would also read a struct
/// from an array (`["x"]`), which the worker reads as no content at all.
fn is_object(content: &[u8]) -> bool {
    content.trim_ascii_start().first() == Some(&b'{')
}

/// The content of the `execute_input` for an `execute_request` whose content is
/// `content`: its `code` as the client sent it (not re-encoded) and `count`. `None` if the
/// content has no string `code` (the worker then reports the cell's error).
pub fn execute_input(content: &[u8], count: u64) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Content<'a> {
        #[serde(borrow)]
        code: &'a serde_json::value::RawValue,
    }
    if !is_object(content) {
        return None;
    }
    let code = serde_json::from_slice::<Content>(content).ok()?.code.get();
    // A string, and one the plan can read too (not a lone surrogate's escape, which Python
    // reads and serde does not): both see the same content.
    serde_json::from_str::<Cow<str>>(code).ok()?;
    let mut out = Vec::with_capacity(code.len() + 40);
    out.extend_from_slice(b"{\"code\":");
    out.extend_from_slice(code.as_bytes());
    out.extend_from_slice(format!(",\"execution_count\":{count}}}").as_bytes());
    Some(out)
}

/// The `tags` of a request's metadata (`{}`, the common case, is not parsed).
fn tag_list(metadata: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct Metadata {
        #[serde(default)]
        tags: Vec<serde_json::Value>,
    }
    if metadata.trim_ascii() == b"{}" {
        return Vec::new();
    }
    serde_json::from_slice::<Metadata>(metadata)
        .map(|m| {
            m.tags
                .into_iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_tags(tags: &[String]) -> Tags {
    let mut out = Tags::default();
    for tag in tags {
        let tag = tag.trim();
        let (key, value) = match tag.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (tag, None),
        };
        match (key, value) {
            ("raises-exception", None) => out.raises_exception = true,
            ("snapshot", None) => out.snapshot = true,
            ("stop-on-error", None) => out.stop_on_error = Some(true),
            ("stop-on-error", Some(v)) => {
                if let Some(b) = parse_bool(v) {
                    out.stop_on_error = Some(b);
                }
            }
            ("timeout", Some(v)) => {
                if let Some(d) = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                {
                    out.timeout = Some(d);
                }
            }
            _ => {}
        }
    }
    out
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// The mode a first line selects: `# task`, `##thread name='w' backend=trio`, …
fn first_line_mode(code: &str) -> Option<Mode> {
    let first = code.lines().next().unwrap_or("").trim();
    if !(first.starts_with("# ") || first.starts_with("##")) {
        return None;
    }
    let rest = first.trim_start_matches(['#', ' ', '\t']);
    let (word, options) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    mode_named(word, options)
}

/// The mode called `word`, with `# thread`'s options from `options`.
fn mode_named(word: &str, options: &str) -> Option<Mode> {
    match word {
        "queue" => Some(Mode::Queue),
        "task" => Some(Mode::Task),
        "process" => Some(Mode::Process),
        "thread" => {
            let mut name = None;
            let mut backend = None;
            for (key, value) in options_of(options) {
                match key {
                    "name" if !value.is_empty() => name = Some(value),
                    "backend" => {
                        backend = match value.as_str() {
                            "trio" => Some(Backend::Trio),
                            "asyncio" => Some(Backend::Asyncio),
                            _ => backend,
                        }
                    }
                    _ => {}
                }
            }
            Some(Mode::Thread { name, backend })
        }
        _ => None,
    }
}

/// `key=value` pairs; a value may be quoted with `'` or `"` (then it may hold spaces).
fn options_of(text: &str) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim();
        let after = &rest[eq + 1..];
        let (value, next) = match after.chars().next() {
            Some(q @ ('\'' | '"')) => match after[1..].find(q) {
                Some(end) => (&after[1..1 + end], &after[end + 2..]),
                None => (&after[1..], ""),
            },
            _ => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        // A key is the last word before `=` (so stray words are skipped).
        let key = key.rsplit(char::is_whitespace).next().unwrap_or(key);
        out.push((key, value.to_owned()));
        rest = next.trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(content: serde_json::Value, metadata: serde_json::Value) -> CellPlan {
        CellPlan::parse(
            content.to_string().as_bytes(),
            metadata.to_string().as_bytes(),
        )
    }

    fn mode(code: &str) -> Mode {
        plan(json!({"code": code}), json!({})).mode
    }

    fn thread(name: Option<&str>, backend: Option<Backend>) -> Mode {
        Mode::Thread {
            name: name.map(str::to_owned),
            backend,
        }
    }

    #[test]
    fn first_line_modes() {
        assert_eq!(mode("# process\nx = 1"), Mode::Process);
        assert_eq!(mode("##process"), Mode::Process);
        assert_eq!(mode("  #  process  \n"), Mode::Process);
        assert_eq!(mode("# processing\n"), Mode::Queue);
        assert_eq!(mode("x = 1 # process"), Mode::Queue);
        assert_eq!(mode("#process"), Mode::Queue, "needs `# ` or `##`");
        assert_eq!(mode("# task\nawait x"), Mode::Task);
        assert_eq!(mode("## task"), Mode::Task);
        assert_eq!(mode("# queue"), Mode::Queue);
        assert_eq!(mode("# Task"), Mode::Queue, "names are lower case");
        assert_eq!(mode("x = 1\n# task"), Mode::Queue, "first line only");
        assert_eq!(mode(""), Mode::Queue);
    }

    #[test]
    fn thread_options() {
        assert_eq!(mode("# thread"), thread(None, None));
        assert_eq!(mode("# thread name='w'"), thread(Some("w"), None));
        assert_eq!(
            mode("# thread name='my worker' backend=trio"),
            thread(Some("my worker"), Some(Backend::Trio))
        );
        assert_eq!(
            mode(r#"# thread backend=asyncio name="x y""#),
            thread(Some("x y"), Some(Backend::Asyncio))
        );
        assert_eq!(mode("# thread name=plain"), thread(Some("plain"), None));
        assert_eq!(
            mode("# thread backend=curio name=''"),
            thread(None, None),
            "unknown backend and empty name are ignored"
        );
        assert_eq!(mode("# thread name='open"), thread(Some("open"), None));
    }

    #[test]
    fn silent_and_tags_select_modes() {
        let p = |content, tags: &[&str]| plan(content, json!({ "tags": tags })).mode;
        assert_eq!(p(json!({"code": "1", "silent": true}), &[]), Mode::Task);
        assert_eq!(
            p(json!({"code": "# queue", "silent": true}), &[]),
            Mode::Queue,
            "the first line wins"
        );
        assert_eq!(p(json!({"code": "1"}), &["thread"]), thread(None, None));
        assert_eq!(p(json!({"code": "1"}), &["x", "process"]), Mode::Process);
        assert_eq!(p(json!({"code": "# task"}), &["process"]), Mode::Task);
        assert_eq!(p(json!({"code": "1"}), &["processing"]), Mode::Queue);
        assert_eq!(CellPlan::parse(b"not json", b"{}").mode, Mode::Queue);
        assert_eq!(
            CellPlan::parse(br#"{"code":"1"}"#, b"not json").mode,
            Mode::Queue
        );
    }

    #[test]
    fn tags() {
        let t = |tags: serde_json::Value| plan(json!({"code": "1"}), json!({ "tags": tags })).tags;
        assert_eq!(t(json!([])), Tags::default());
        assert!(t(json!(["raises-exception"])).raises_exception);
        assert_eq!(t(json!(["stop-on-error"])).stop_on_error, Some(true));
        assert_eq!(t(json!(["stop-on-error=false"])).stop_on_error, Some(false));
        assert_eq!(t(json!(["stop-on-error=True"])).stop_on_error, Some(true));
        assert_eq!(t(json!(["stop-on-error=maybe"])).stop_on_error, None);
        assert_eq!(
            t(json!(["timeout=1.5"])).timeout,
            Some(Duration::from_millis(1500))
        );
        for bad in [
            "timeout=0",
            "timeout=-1",
            "timeout=x",
            "timeout=inf",
            "timeout",
        ] {
            assert_eq!(t(json!([bad])).timeout, None, "{bad}");
        }
        assert!(t(json!([1, null, "raises-exception"])).raises_exception);
        assert!(t(json!(["snapshot"])).snapshot);
        assert!(!t(json!(["snapshot=yes", "snapshots"])).snapshot);
        assert_eq!(t(json!("not a list")), Tags::default());
    }

    #[test]
    fn abort_on_error() {
        let a = |content: serde_json::Value, tags: &[&str]| {
            plan(content, json!({ "tags": tags })).abort_on_error()
        };
        let code = json!({"code": "1/0"});
        assert!(a(code.clone(), &[]));
        assert!(!a(json!({"code": "1/0", "stop_on_error": false}), &[]));
        assert!(!a(
            json!({"code": "1/0", "silent": true}),
            &["stop-on-error"]
        ));
        assert!(!a(code.clone(), &["raises-exception"]));
        assert!(!a(code.clone(), &["stop-on-error=false"]));
        assert!(a(code.clone(), &["raises-exception", "stop-on-error"]));
        assert!(a(
            json!({"code": "1/0", "stop_on_error": false}),
            &["stop-on-error=true"]
        ));
        assert!(CellPlan::parse(br#"{"code":"1"}"#, b"{}").abort_on_error());
    }
    #[test]
    fn which_cells_take_a_count() {
        let takes = |content: &str| CellPlan::parse(content.as_bytes(), b"{}").takes_count;
        assert!(takes(r#"{"code":"1"}"#));
        assert!(!takes(r#"{"code":"1","store_history":false}"#));
        assert!(!takes(r#"{"code":"1","silent":true}"#));
        assert!(!takes(r#"{"code":"1","silent":true,"store_history":true}"#));
        assert!(!takes(r#"{"code":""}"#));
        assert!(
            !takes(r#"{"code":" \n\t\u001c\u3000"}"#),
            "Python's isspace"
        );
        assert!(
            takes(r#"{"code":" \u200b"}"#),
            "a zero-width space is not a space"
        );
        assert!(!takes("not json"));
        assert!(!takes(r#"["1"]"#), "an array is no content");
    }

    #[test]
    fn execute_input_keeps_the_code_as_sent() {
        let content = br#"{"silent":false,"code":"print(\"\u00e9\")\n","store_history":true}"#;
        let input = execute_input(content, 7).unwrap();
        assert_eq!(
            input,
            br#"{"code":"print(\"\u00e9\")\n","execution_count":7}"#.to_vec()
        );
        let value: serde_json::Value = serde_json::from_slice(&input).unwrap();
        assert_eq!(value["code"], "print(\"é\")\n");
        assert_eq!(execute_input(br#"{"code":5}"#, 1), None);
        assert_eq!(execute_input(b"{}", 1), None);
        assert_eq!(execute_input(br#"["x"]"#, 1), None, "not an object");
        assert_eq!(
            execute_input(br#"{"code":"\ude01"}"#, 1),
            None,
            "a lone surrogate"
        );
    }
}
