//! The worker pool: which worker holds the namespace, which are warm and idle, which are
//! starting — and the idle policy of async-kernel's `Caller.to_thread` pool, applied to
//! processes:
//!
//! - when a worker becomes idle it is retired at once if the number of idle workers
//!   already equals `max_idle` (`MAX_IDLE_POOL_INSTANCES`);
//! - if `idle_shutdown` (`IDLE_WORKER_SHUTDOWN_DURATION`) is non-zero, workers idle for
//!   longer than that are retired by a periodic reaper,
//!
//! except that `warm` workers are always kept ready (IPython imported), so that a crash or a
//! borrowed worker costs a swap, not a Python start-up.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::worker::{Frames, WorkerId};

/// The pool settings.
#[derive(Debug, Clone, Copy)]
pub struct PoolPolicy {
    /// `MAX_IDLE_POOL_INSTANCES`: idle workers kept at most.
    pub max_idle: usize,
    /// `IDLE_WORKER_SHUTDOWN_DURATION`: idle workers older than this are retired (zero:
    /// never).
    pub idle_shutdown: Duration,
    /// Idle workers kept ready whatever their age (at most `max_idle`).
    pub warm: usize,
}

/// A connected worker.
#[derive(Debug)]
pub struct Worker {
    /// Its id.
    pub id: WorkerId,
    /// Its process id.
    pub pid: u32,
    /// The `main` connection: cells, comms, shutdown.
    pub main: mpsc::UnboundedSender<Frames>,
    /// The `aux` connection: introspection and `input_reply`, answered while a cell runs.
    pub aux: mpsc::UnboundedSender<Frames>,
}

impl Worker {
    /// Sends on `main`. A closed channel means the worker is gone; its exit event cleans up.
    pub fn send_main(&self, frames: Frames) {
        let _ = self.main.send(frames);
    }

    /// Sends on `aux`.
    pub fn send_aux(&self, frames: Frames) {
        let _ = self.aux.send(frames);
    }

    /// Asks the worker to exit, on both connections: a busy worker reads only `aux`.
    pub fn shutdown(&self) {
        let bye = Bytes::from_static(br#"{"op":"shutdown"}"#);
        self.send_aux(vec![bye.clone()]);
        self.send_main(vec![bye]);
    }
}

#[derive(Debug)]
struct Starting {
    pid: u32,
    aux: Option<mpsc::UnboundedSender<Frames>>,
}

/// What happened to a worker that said hello.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// It now holds the namespace.
    Main,
    /// It waits in the idle pool.
    Idle,
    /// The pool was full: it was asked to exit.
    Retired,
    /// We did not start it (or it never opened `aux`): ignored.
    Unknown,
}

/// Worker bookkeeping; spawning and messaging are the kernel's.
#[derive(Debug)]
pub struct Pool {
    policy: PoolPolicy,
    main: Option<Worker>,
    idle: VecDeque<(Worker, Instant)>,
    starting: HashMap<WorkerId, Starting>,
    /// Workers lent out to run `# process` cells.
    borrowed: HashMap<WorkerId, Worker>,
    /// Workers asked to exit, not yet gone: id → pid.
    retiring: HashMap<WorkerId, u32>,
}

impl Pool {
    /// An empty pool.
    pub fn new(policy: PoolPolicy) -> Self {
        Pool {
            policy,
            main: None,
            idle: VecDeque::new(),
            starting: HashMap::new(),
            borrowed: HashMap::new(),
            retiring: HashMap::new(),
        }
    }

    /// The worker holding the namespace, if one is up.
    pub fn main(&self) -> Option<&Worker> {
        self.main.as_ref()
    }

    /// Records a spawned process.
    pub fn started(&mut self, id: WorkerId, pid: u32) {
        self.starting.insert(id, Starting { pid, aux: None });
    }

    /// A worker opened its `aux` connection.
    pub fn aux_connected(&mut self, id: WorkerId, aux: mpsc::UnboundedSender<Frames>) -> bool {
        match self.starting.get_mut(&id) {
            Some(s) => {
                s.aux = Some(aux);
                true
            }
            None => false,
        }
    }

    /// A worker said hello on `main`: it becomes the main worker if there is none,
    /// otherwise it joins the idle pool (or is retired if that is full).
    pub fn ready(&mut self, id: WorkerId, main: mpsc::UnboundedSender<Frames>) -> Placement {
        let Some(Starting {
            pid,
            aux: Some(aux),
        }) = self.starting.remove(&id)
        else {
            return Placement::Unknown;
        };
        let worker = Worker { id, pid, main, aux };
        if self.main.is_none() {
            self.main = Some(worker);
            return Placement::Main;
        }
        self.make_idle(worker)
    }

    /// Puts a worker into the idle pool, or retires it if the pool already holds
    /// `max_idle` workers.
    fn make_idle(&mut self, worker: Worker) -> Placement {
        if self.idle.len() >= self.policy.max_idle {
            self.retire(worker);
            Placement::Retired
        } else {
            self.idle.push_back((worker, Instant::now()));
            Placement::Idle
        }
    }

    fn retire(&mut self, worker: Worker) {
        worker.shutdown();
        self.retiring.insert(worker.id, worker.pid);
    }

    /// Lends the most recently idle worker out (for a `# process` cell).
    pub fn borrow(&mut self) -> Option<&Worker> {
        let (worker, _) = self.idle.pop_back()?;
        let id = worker.id;
        self.borrowed.insert(id, worker);
        self.borrowed.get(&id)
    }

    /// A lent worker, by id.
    pub fn borrowed(&self, id: WorkerId) -> Option<&Worker> {
        self.borrowed.get(&id)
    }

    /// A lent worker (reset since) becomes idle again — or is retired, by the policy.
    pub fn give_back(&mut self, id: WorkerId) -> Option<Placement> {
        let worker = self.borrowed.remove(&id)?;
        Some(self.make_idle(worker))
    }

    /// Whether a worker is starting (it will join the idle pool, or become main).
    pub fn any_starting(&self) -> bool {
        !self.starting.is_empty()
    }

    /// Promotes the longest-ready idle worker to main, if any.
    pub fn promote_idle(&mut self) -> Option<&Worker> {
        if self.main.is_none() {
            // Most recently idle first: its memory is the warmest.
            self.main = self.idle.pop_back().map(|(w, _)| w);
        }
        self.main.as_ref()
    }

    /// Removes a dead worker; says whether it was the main one.
    pub fn remove(&mut self, id: WorkerId) -> Option<Role> {
        if self.main.as_ref().is_some_and(|w| w.id == id) {
            self.main = None;
            return Some(Role::Main);
        }
        if let Some(i) = self.idle.iter().position(|(w, _)| w.id == id) {
            self.idle.remove(i);
            return Some(Role::Idle);
        }
        if self.starting.remove(&id).is_some() {
            return Some(Role::Starting);
        }
        if self.borrowed.remove(&id).is_some() {
            return Some(Role::Borrowed);
        }
        self.retiring.remove(&id).map(|_| Role::Retiring)
    }

    /// How many more workers to start so that `warm` are idle or on their way (and one
    /// is main).
    pub fn missing(&self) -> usize {
        let want = 1 + self.policy.warm.min(self.policy.max_idle);
        let have = usize::from(self.main.is_some()) + self.idle.len() + self.starting.len();
        want.saturating_sub(have)
    }

    /// Retires idle workers idle longer than `idle_shutdown`, keeping `warm` of them;
    /// returns the ids retired.
    pub fn reap(&mut self, now: Instant) -> Vec<WorkerId> {
        let limit = self.policy.idle_shutdown;
        if limit.is_zero() {
            return Vec::new();
        }
        let mut reaped = Vec::new();
        // Oldest idle first; stop at the warm floor.
        while self.idle.len() > self.policy.warm {
            match self.idle.front() {
                Some((_, since)) if now.duration_since(*since) > limit => {
                    let (w, _) = self.idle.pop_front().expect("front exists");
                    reaped.push(w.id);
                    self.retire(w);
                }
                _ => break,
            }
        }
        reaped
    }

    /// Every process we know of: id → pid.
    pub fn all_pids(&self) -> Vec<(WorkerId, u32)> {
        let mut out: Vec<(WorkerId, u32)> = self.main.iter().map(|w| (w.id, w.pid)).collect();
        out.extend(self.idle.iter().map(|(w, _)| (w.id, w.pid)));
        out.extend(self.starting.iter().map(|(id, s)| (*id, s.pid)));
        out.extend(self.borrowed.values().map(|w| (w.id, w.pid)));
        out.extend(self.retiring.iter().map(|(id, pid)| (*id, *pid)));
        out
    }

    /// Asks every connected worker to exit; returns every process still to wait for.
    pub fn shutdown_all(&mut self) -> Vec<(WorkerId, u32)> {
        if let Some(w) = self.main.take() {
            self.retire(w);
        }
        while let Some((w, _)) = self.idle.pop_front() {
            self.retire(w);
        }
        let lent: Vec<WorkerId> = self.borrowed.keys().copied().collect();
        for id in lent {
            if let Some(w) = self.borrowed.remove(&id) {
                self.retire(w);
            }
        }
        self.all_pids()
    }

    /// A JSON description for `kernelvisor_info_request`.
    pub fn describe(&self, now: Instant) -> serde_json::Value {
        serde_json::json!({
            "main": self.main.as_ref().map(|w| serde_json::json!({"id": w.id, "pid": w.pid})),
            "idle": self.idle.iter().map(|(w, since)| serde_json::json!({
                "id": w.id, "pid": w.pid, "idle_seconds": now.duration_since(*since).as_secs_f64()
            })).collect::<Vec<_>>(),
            "starting": self.starting.iter().map(|(id, s)| serde_json::json!({"id": id, "pid": s.pid})).collect::<Vec<_>>(),
            "borrowed": self.borrowed.values().map(|w| serde_json::json!({"id": w.id, "pid": w.pid})).collect::<Vec<_>>(),
            "retiring": self.retiring.iter().map(|(id, pid)| serde_json::json!({"id": id, "pid": pid})).collect::<Vec<_>>(),
            "max_idle": self.policy.max_idle,
            "idle_shutdown_seconds": self.policy.idle_shutdown.as_secs_f64(),
            "warm": self.policy.warm,
        })
    }
}

/// What a removed worker was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It held the namespace.
    Main,
    /// It was idle in the pool.
    Idle,
    /// It had not said hello yet.
    Starting,
    /// It was lent out to run a `# process` cell.
    Borrowed,
    /// It had been asked to exit.
    Retiring,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chan() -> mpsc::UnboundedSender<Frames> {
        mpsc::unbounded_channel().0
    }

    fn connect(pool: &mut Pool, id: WorkerId) -> Placement {
        pool.started(id, 1000 + id as u32);
        assert!(pool.aux_connected(id, chan()));
        pool.ready(id, chan())
    }

    fn policy(max_idle: usize, secs: u64, warm: usize) -> PoolPolicy {
        PoolPolicy {
            max_idle,
            idle_shutdown: Duration::from_secs(secs),
            warm,
        }
    }

    #[test]
    fn first_is_main_then_idle_then_retired_when_full() {
        let mut pool = Pool::new(policy(2, 0, 1));
        assert_eq!(pool.missing(), 2);
        assert_eq!(connect(&mut pool, 1), Placement::Main);
        assert_eq!(connect(&mut pool, 2), Placement::Idle);
        assert_eq!(connect(&mut pool, 3), Placement::Idle);
        assert_eq!(
            connect(&mut pool, 4),
            Placement::Retired,
            "idle == max_idle"
        );
        assert_eq!(pool.remove(4), Some(Role::Retiring));
        assert_eq!(pool.missing(), 0);
    }

    #[test]
    fn crash_promotes_an_idle_worker() {
        let mut pool = Pool::new(policy(2, 0, 1));
        connect(&mut pool, 1);
        connect(&mut pool, 2);
        assert_eq!(pool.remove(1), Some(Role::Main));
        assert_eq!(pool.promote_idle().map(|w| w.id), Some(2));
        assert_eq!(pool.missing(), 1, "the warm spare is to be replaced");
    }

    #[test]
    fn hello_without_aux_or_unknown_is_ignored() {
        let mut pool = Pool::new(policy(2, 0, 1));
        assert_eq!(pool.ready(9, chan()), Placement::Unknown);
        pool.started(1, 5);
        assert_eq!(pool.ready(1, chan()), Placement::Unknown, "no aux yet");
    }

    #[test]
    fn reaper_keeps_the_warm_floor() {
        let mut pool = Pool::new(policy(5, 10, 1));
        for id in 1..=4 {
            connect(&mut pool, id);
        }
        let later = Instant::now() + Duration::from_secs(11);
        assert!(pool.reap(Instant::now()).is_empty(), "not idle long enough");
        assert_eq!(pool.reap(later), vec![2, 3], "oldest first, one stays warm");
        assert_eq!(pool.describe(later)["idle"].as_array().unwrap().len(), 1);
        let mut never = Pool::new(policy(5, 0, 0));
        connect(&mut never, 1);
        connect(&mut never, 2);
        assert!(never.reap(later).is_empty(), "zero duration: no reaper");
    }

    #[test]
    fn borrowed_workers_come_back_by_the_policy() {
        let mut pool = Pool::new(policy(1, 0, 1));
        connect(&mut pool, 1);
        connect(&mut pool, 2);
        assert_eq!(pool.borrow().map(|w| w.id), Some(2));
        assert!(pool.borrow().is_none(), "no idle worker left");
        connect(&mut pool, 3);
        assert_eq!(
            pool.give_back(2),
            Some(Placement::Retired),
            "idle == max_idle: retired"
        );
        assert_eq!(pool.borrow().map(|w| w.id), Some(3));
        assert_eq!(pool.give_back(3), Some(Placement::Idle));
        assert_eq!(pool.remove(2), Some(Role::Retiring));
    }

    #[test]
    fn zero_max_idle_means_no_spare() {
        let mut pool = Pool::new(policy(0, 0, 1));
        assert_eq!(pool.missing(), 1);
        connect(&mut pool, 1);
        assert_eq!(connect(&mut pool, 2), Placement::Retired);
    }
}
