//! The `kernel_info_reply`, answered by the supervisor without asking a worker.

use serde_json::{json, Value};

use crate::header::PROTOCOL_VERSION;

/// `language_info` for a CPython version, as a worker would describe it.
pub fn language_info(python_version: &str) -> Value {
    json!({
        "name": "python",
        "version": python_version,
        "mimetype": "text/x-python",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "pygments_lexer": "ipython3",
        "nbconvert_exporter": "python",
        "file_extension": ".py",
    })
}

/// The reply content, given the workers' `language_info` and whether they have debugpy.
pub fn reply_content(language_info: &Value, debugger: bool) -> Vec<u8> {
    // JEP 91: create/delete/list_subshell_request and `subshell_id` in headers; protocol 5.5:
    // `debug_request` (the legacy `debugger` flag says the same).
    let mut features = vec!["kernel subshells"];
    if debugger {
        features.insert(0, "debugger");
    }
    let version = language_info["version"].as_str().unwrap_or("3");
    let short: String = version.split('.').take(2).collect::<Vec<_>>().join(".");
    json!({
        "status": "ok",
        "protocol_version": PROTOCOL_VERSION,
        "implementation": "kernelvisor",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": language_info,
        "banner": format!(
            "Python {version} | kernelvisor {} — IPython in crash-isolated worker processes",
            env!("CARGO_PKG_VERSION")
        ),
        "help_links": [
            {"text": "Python Reference", "url": format!("https://docs.python.org/{short}")},
            {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
        ],
        "debugger": debugger,
        "supported_features": features,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_has_what_clients_read() {
        let v: Value =
            serde_json::from_slice(&reply_content(&language_info("3.11.7"), false)).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["implementation"], "kernelvisor");
        assert_eq!(v["language_info"]["version"], "3.11.7");
        assert_eq!(v["help_links"][0]["url"], "https://docs.python.org/3.11");
        assert_eq!(v["supported_features"], json!(["kernel subshells"]));
        assert_eq!(v["debugger"], false);
    }

    #[test]
    fn debugger_is_advertised_both_ways() {
        let v: Value =
            serde_json::from_slice(&reply_content(&language_info("3.12.1"), true)).unwrap();
        assert_eq!(v["debugger"], true);
        assert_eq!(
            v["supported_features"],
            json!(["debugger", "kernel subshells"])
        );
    }
}
