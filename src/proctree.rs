//! A worker's process tree, as `/proc` shows it: the worker and its descendants, their
//! resident memory, and a check against the memory limit (`--memory-limit`), which
//! covers what a cell started (a subprocess, a `multiprocessing` pool) as well as the
//! worker itself.
//!
//! Resident memory is summed over the tree. Pages that processes share (a forked child
//! shares its parent's memory until either writes to it) would be counted once per
//! process that way, so a sum over the limit is checked again with the proportional set
//! size (`Pss` in `/proc/PID/smaps_rollup`, where each shared page is split between its
//! sharers) before anything is killed: the costlier read happens only near the limit.

use std::fs;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// One process of a worker's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
    /// Its resident memory, in bytes.
    pub rss: u64,
}

/// A tree over the memory limit: what to say, and what to kill.
#[derive(Debug)]
pub struct OverLimit {
    /// Memory the tree uses, in bytes (shared pages counted once where the kernel says).
    pub used: u64,
    /// The process using the most.
    pub largest: Member,
    /// The worker's descendants (they do not die with it: kill them too).
    pub descendants: Vec<u32>,
    /// The limit, in bytes.
    pub limit: u64,
}

impl OverLimit {
    /// The crash report's cause: which process, how much, and what the limit is.
    pub fn reason(&self) -> String {
        let mib = |b: u64| b >> 20;
        let who = format!(
            "pid {} ({}), {} MiB",
            self.largest.pid,
            self.largest.comm,
            mib(self.largest.rss)
        );
        match self.descendants.len() {
            0 => format!(
                "killed: out of memory (the worker, {who} of resident memory; the limit is {} MiB)",
                mib(self.limit)
            ),
            n => format!(
                "killed: out of memory (the worker and its {n} subprocess{} reached {} MiB; the limit is {} MiB; the largest: {who}; all were killed)",
                if n == 1 { "" } else { "es" },
                mib(self.used),
                mib(self.limit)
            ),
        }
    }

    /// Sends SIGKILL to the descendants (the worker itself is killed by its owner).
    pub fn kill_descendants(&self) {
        for &pid in &self.descendants {
            if let Ok(pid) = i32::try_from(pid) {
                // It may have exited meanwhile: nothing to do then.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Checks the tree of `root` against `limit` bytes, leaving out the subtrees of `skip`
/// (the worker's snapshot, counted on its own); `None` while it is within it (or gone).
pub fn over_limit(root: u32, limit: u64, skip: &[u32]) -> Option<OverLimit> {
    let tree = tree(root, skip);
    let resident: u64 = tree.iter().map(|m| m.rss).sum();
    if resident <= limit {
        return None;
    }
    let used = if tree.len() > 1 {
        // Proportional set sizes never add up to more than the resident sizes. A process
        // without one (no smaps_rollup, or not ours to read) counts its resident size; one
        // that has exited since counts nothing.
        tree.iter()
            .map(|m| pss(m.pid).or_else(|| rss(m.pid)).unwrap_or(0))
            .sum()
    } else {
        resident
    };
    if used <= limit {
        return None;
    }
    let largest = tree.iter().max_by_key(|m| m.rss)?.clone();
    Some(OverLimit {
        used,
        largest,
        descendants: tree.iter().skip(1).map(|m| m.pid).collect(),
        limit,
    })
}

/// Resident memory of `root`'s tree, without the subtrees of `skip`.
pub fn resident(root: u32, skip: &[u32]) -> u64 {
    tree(root, skip).iter().map(|m| m.rss).sum()
}

/// `root` and its descendants (root first), with their memory, leaving out the subtrees of
/// `skip`; empty once it is gone.
pub fn tree(root: u32, skip: &[u32]) -> Vec<Member> {
    let mut members = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        if skip.contains(&pid) {
            continue;
        }
        let Some(member) = member(pid) else {
            continue;
        };
        members.push(member);
        // A pid that is its own ancestor cannot happen, but a bound costs nothing.
        if members.len() < 10_000 {
            queue.extend(children(pid));
        }
    }
    members
}

fn member(pid: u32) -> Option<Member> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(Member {
        pid,
        comm: comm.trim_end().to_string(),
        rss: rss(pid)?,
    })
}

/// The children of `pid`: each of its threads lists those it started
/// (`/proc/PID/task/TID/children`); where the kernel has no such file, a scan of `/proc`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut listed = false;
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            listed = true;
            found.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    if !listed {
        return children_by_scan(pid);
    }
    found
}

fn children_by_scan(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| parent(child) == Some(pid))
        .collect()
}

/// Field `n` of `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses): 0 is the state, 1 the parent.
fn stat_field<T: std::str::FromStr>(pid: u32, n: usize) -> Option<T> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(n)?.parse().ok()
}

/// The parent of `pid`.
pub fn parent(pid: u32) -> Option<u32> {
    stat_field(pid, 1)
}

/// Whether `pid` has not ended (a zombie has: it waits only to be reaped).
pub fn alive(pid: u32) -> bool {
    stat_field::<char>(pid, 0).is_some_and(|state| state != 'Z' && state != 'X')
}

/// Resident memory (`/proc/PID/statm`, in pages).
fn rss(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// Private memory (USS: `Private_Clean + Private_Dirty` of `/proc/PID/smaps_rollup`), in
/// bytes; `None` once it is gone.
pub fn uss(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: u64 = rollup
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Some(kib << 10)
}

/// Proportional set size (`/proc/PID/smaps_rollup`, Linux ≥ 4.14); `None` without it.
fn pss(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: u64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_zombie_is_not_alive() {
        assert!(alive(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stat_field::<char>(pid, 0) != Some('Z') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!alive(pid), "a zombie");
        assert_eq!(parent(pid), Some(std::process::id()));
        child.wait().unwrap();
        assert!(!alive(pid), "reaped");
    }

    #[test]
    fn a_child_is_in_the_tree_with_its_memory() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let me = std::process::id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let tree = tree(me, &[]);
            // Until it has exec'd, the child still bears this binary's name.
            if let Some(m) = tree
                .iter()
                .find(|m| m.pid == child.id() && m.comm == "sleep")
            {
                break m.clone();
            }
            assert!(Instant::now() < deadline, "child never listed: {tree:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(found.rss > 0);
        assert_eq!(tree(me, &[])[0].pid, me);
        let (mut scanned, mut listed) = (children_by_scan(me), children(me));
        scanned.sort_unstable();
        listed.sort_unstable();
        assert_eq!(scanned, listed);
        assert_eq!(parent(child.id()), Some(me));
        // Over a 1-byte limit, named by the largest process (this test binary).
        let over = over_limit(me, 1, &[]).expect("over a 1-byte limit");
        assert!(over.descendants.contains(&child.id()));
        assert_eq!(over.largest.pid, me);
        assert!(
            over.reason().contains(&format!("pid {me} (")),
            "{}",
            over.reason()
        );
        assert!(over_limit(me, u64::MAX, &[]).is_none());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn private_memory_of_this_process() {
        let own = uss(std::process::id()).unwrap();
        assert!(
            own > 1 << 20,
            "a test binary has more than 1 MiB of its own: {own}"
        );
        assert!(uss(u32::MAX).is_none());
    }

    #[test]
    fn proportional_size_is_at_most_resident_size() {
        let me = std::process::id();
        let (pss, rss) = (pss(me).expect("smaps_rollup"), rss(me).unwrap());
        assert!(rss > 1 << 20, "a test binary uses more than 1 MiB: {rss}");
        assert!(pss > 0 && pss <= rss, "pss {pss} rss {rss}");
        assert!(tree(u32::MAX, &[]).is_empty());
    }

    #[test]
    fn reasons_name_the_process() {
        let over = OverLimit {
            used: 900 << 20,
            largest: Member {
                pid: 42,
                comm: "python3".into(),
                rss: 800 << 20,
            },
            descendants: vec![42],
            limit: 300 << 20,
        };
        assert_eq!(
            over.reason(),
            "killed: out of memory (the worker and its 1 subprocess reached 900 MiB; the limit is 300 MiB; the largest: pid 42 (python3), 800 MiB; all were killed)"
        );
        let alone = OverLimit {
            descendants: vec![],
            ..over
        };
        assert_eq!(
            alone.reason(),
            "killed: out of memory (the worker, pid 42 (python3), 800 MiB of resident memory; the limit is 300 MiB)"
        );
    }
}
