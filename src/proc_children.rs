//! A process's children, from `/proc/PID/task/*/children` (Linux).

/// The pids of `pid`'s children (empty if `/proc` cannot tell).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_a_spawned_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let kids = super::children(std::process::id());
        assert!(kids.contains(&child.id()), "{kids:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!super::children(std::process::id()).contains(&child.id()));
    }
}
