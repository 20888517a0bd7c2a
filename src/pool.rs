//! The worker pool: one [`WorkerSlot`] per worker process (its role, connections, and
//! everything the kernel tracks of it), and the idle policy of async-kernel's
//! `Caller.to_thread` pool, applied to processes:
//!
//! - when a worker becomes idle it is retired at once if the number of idle workers
//!   already equals `max_idle` (`MAX_IDLE_POOL_INSTANCES`);
//! - if `idle_shutdown` (`IDLE_WORKER_SHUTDOWN_DURATION`) is non-zero, workers idle for
//!   longer than that are retired by a periodic reaper,
//!
//! except that `warm` workers are always kept ready (IPython imported), so that a crash or a
//! borrowed worker costs a swap, not a Python start-up.
//!
//! Workers are forked from the **template**, when there is one: a process that imported
//! everything a worker needs and never runs user code. Its pages are shared by every
//! worker forked from it. It is a slot of its own role; the forks it was asked for count
//! as starting workers until they connect.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::ipc_ops::{Hello, ToWorker};
use crate::snapshot::SnapshotState;
use crate::worker::{Frames, Proc, Stderr, TemplateLink, WorkerId};

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
    /// Fork workers from a template process instead of spawning each.
    pub template: bool,
}

/// What a worker is for, now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerRole {
    /// Started, not yet ready (no `main` hello). An heir (a promoted snapshot) becomes
    /// the main worker when ready; others join the idle pool.
    Starting {
        /// It is a promoted snapshot taking over the namespace.
        heir: bool,
    },
    /// It holds the namespace.
    Main,
    /// Ready in the pool, since then.
    Idle(Instant),
    /// Lent out to run a `# process` cell.
    Borrowed,
    /// Asked to exit, not yet gone.
    Retiring,
    /// The template workers are forked from; `ready` once its link is up.
    Template {
        /// Its link is up: it can fork.
        ready: bool,
    },
}

/// One worker process and everything the kernel tracks of it.
#[derive(Debug)]
pub struct WorkerSlot {
    /// Its id.
    pub id: WorkerId,
    /// Its process (signals go through it).
    pub proc: Proc,
    /// What it is for.
    pub role: WorkerRole,
    /// The `main` connection: cells, comms, shutdown, snapshots.
    main: Option<mpsc::UnboundedSender<Frames>>,
    /// The `aux` connection: introspection and `input_reply`, answered while a cell runs.
    aux: Option<mpsc::UnboundedSender<Frames>>,
    /// Why the supervisor killed it, for its crash report.
    pub kill_reason: Option<KillReason>,
    /// The execution count of the last non-silent cell it was given (`execute_input`).
    pub execution_count: Option<u64>,
    /// Its `main` connection has ended (everything it sent is handled).
    pub drained: bool,
    /// It exited, and waits for `main` to drain before its death is handled.
    pub exit: Option<(ExitStatus, Vec<String>, Instant)>,
    /// When it last sent anything (liveness of a busy main worker).
    pub last_heard: Instant,
    /// Its snapshots (the main worker's).
    pub snapshots: SnapshotState,
    /// The template's link (`fork` requests).
    template: Option<TemplateLink>,
    /// Output credit of its requests (flow.rs).
    pub flows: std::sync::Arc<crate::flow::Flows>,
    /// Its `main` hello, with the connection, when it came before the `aux` one: the two
    /// connections are read by tasks of their own, so either hello may be handled first.
    /// The worker is placed once `aux` is there too.
    pub early_main: Option<(Hello, mpsc::UnboundedSender<Frames>)>,
}

/// Why the supervisor killed a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillReason {
    /// A crash-like kill: the text is the cause shown to the user.
    Crash(String),
    /// `%undo`: the namespace goes back to its snapshot on purpose.
    Undo,
}

impl WorkerSlot {
    /// Starting, and its `aux` connection has not said hello yet.
    pub fn awaiting_aux(&self) -> bool {
        matches!(self.role, WorkerRole::Starting { .. }) && self.aux.is_none()
    }

    /// Sends on `main`. A closed channel means the worker is gone; its exit event cleans up.
    pub fn send_main(&self, frames: Frames) {
        if let Some(tx) = &self.main {
            let _ = tx.send(frames);
        }
    }

    /// Sends on `aux`.
    pub fn send_aux(&self, frames: Frames) {
        if let Some(tx) = &self.aux {
            let _ = tx.send(frames);
        }
    }

    /// Asks the worker to exit, on both connections: a busy worker reads only `aux`. The
    /// template exits when its link closes.
    pub fn shutdown(&mut self) {
        self.send_aux(ToWorker::Shutdown.message());
        self.send_main(ToWorker::Shutdown.message());
        self.template = None;
    }

    /// Sends its process a signal (never after it was reaped).
    pub fn signal(&self, sig: Signal) {
        self.proc.signal(sig);
    }

    /// Whether its `main` connection is up (so its end must be drained).
    pub fn has_main(&self) -> bool {
        self.main.is_some()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }
}

/// What happened to a worker that said hello on `main`.
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

/// A fork asked of the template: when, and its stderr (read from the start).
#[derive(Debug)]
struct Fork {
    at: Instant,
    stderr: Option<Stderr>,
}

/// Every worker, by id; spawning and messaging are the kernel's.
#[derive(Debug)]
pub struct Pool {
    policy: PoolPolicy,
    slots: HashMap<WorkerId, WorkerSlot>,
    main: Option<WorkerId>,
    /// Forks asked of the template, not connected yet.
    forking: HashMap<WorkerId, Fork>,
}

impl Pool {
    /// An empty pool.
    pub fn new(policy: PoolPolicy) -> Self {
        Pool {
            policy,
            slots: HashMap::new(),
            main: None,
            forking: HashMap::new(),
        }
    }

    /// The worker holding the namespace, if one is up.
    pub fn main(&self) -> Option<&WorkerSlot> {
        self.main.and_then(|id| self.slots.get(&id))
    }

    /// The worker holding the namespace, to change its state.
    pub fn main_mut(&mut self) -> Option<&mut WorkerSlot> {
        self.main.and_then(|id| self.slots.get_mut(&id))
    }

    /// Any worker, by id.
    pub fn get(&self, id: WorkerId) -> Option<&WorkerSlot> {
        self.slots.get(&id)
    }

    /// Any worker, by id, to change its state.
    pub fn get_mut(&mut self, id: WorkerId) -> Option<&mut WorkerSlot> {
        self.slots.get_mut(&id)
    }

    /// A lent worker, by id.
    pub fn borrowed(&self, id: WorkerId) -> Option<&WorkerSlot> {
        self.get(id).filter(|w| w.role == WorkerRole::Borrowed)
    }

    /// Every worker.
    pub fn all(&self) -> impl Iterator<Item = &WorkerSlot> {
        self.slots.values()
    }

    /// Records a spawned (or promoted, or forked) process.
    pub fn started(&mut self, id: WorkerId, proc: Proc, heir: bool) {
        self.insert(id, proc, WorkerRole::Starting { heir });
    }

    /// Records the spawned template.
    pub fn started_template(&mut self, id: WorkerId, proc: Proc) {
        self.insert(id, proc, WorkerRole::Template { ready: false });
    }

    fn insert(&mut self, id: WorkerId, proc: Proc, role: WorkerRole) {
        let slot = WorkerSlot {
            id,
            proc,
            role,
            main: None,
            aux: None,
            kill_reason: None,
            execution_count: None,
            drained: false,
            exit: None,
            last_heard: Instant::now(),
            snapshots: SnapshotState::default(),
            template: None,
            flows: crate::flow::Flows::new(),
            early_main: None,
        };
        self.slots.insert(id, slot);
    }

    /// Whether workers are forked from a template.
    pub fn forks_from_template(&self) -> bool {
        self.policy.template
    }

    /// The template, if one is up or starting.
    pub fn template(&self) -> Option<&WorkerSlot> {
        self.slots
            .values()
            .find(|w| matches!(w.role, WorkerRole::Template { .. }))
    }

    /// The template connected its link: it can fork. False if `id` is no template.
    pub fn template_ready(&mut self, id: WorkerId, link: TemplateLink) -> bool {
        match self.slots.get_mut(&id) {
            Some(w) if w.role == (WorkerRole::Template { ready: false }) => {
                w.role = WorkerRole::Template { ready: true };
                w.template = Some(link);
                true
            }
            _ => false,
        }
    }

    /// The ready template's link.
    pub fn template_link(&self) -> Option<&TemplateLink> {
        self.template().and_then(|w| w.template.as_ref())
    }

    /// Worker `id` was asked of the template: it counts as starting until it connects.
    pub fn fork_requested(&mut self, id: WorkerId, stderr: Option<Stderr>) {
        let at = Instant::now();
        self.forking.insert(id, Fork { at, stderr });
    }

    /// Worker `id`, a fork, connected: its stderr (`None`: it is no fork we wait for).
    pub fn fork_arrived(&mut self, id: WorkerId) -> Option<Option<Stderr>> {
        self.forking.remove(&id).map(|f| f.stderr)
    }

    /// Forgets forks that will not come (the template died or refused, or they took
    /// longer than `patience`); returns their ids.
    pub fn abandon_forks(&mut self, now: Instant, patience: Duration) -> Vec<WorkerId> {
        let late: Vec<WorkerId> = self
            .forking
            .iter()
            .filter(|(_, f)| now.duration_since(f.at) >= patience)
            .map(|(id, _)| *id)
            .collect();
        for id in &late {
            self.forking.remove(id);
        }
        late
    }

    /// Whether an heir is on its way to take over the namespace.
    pub fn heir_starting(&self) -> bool {
        self.slots
            .values()
            .any(|w| w.role == WorkerRole::Starting { heir: true })
    }

    /// A worker opened its `aux` connection.
    pub fn aux_connected(&mut self, id: WorkerId, aux: mpsc::UnboundedSender<Frames>) -> bool {
        match self.slots.get_mut(&id) {
            Some(w) if matches!(w.role, WorkerRole::Starting { .. }) => {
                w.aux = Some(aux);
                true
            }
            _ => false,
        }
    }

    /// A worker said hello on `main`: an heir, or the first worker while there is no
    /// main one and no heir coming, becomes the main worker; others join the idle pool
    /// (or are retired if that is full).
    pub fn ready(&mut self, id: WorkerId, main: mpsc::UnboundedSender<Frames>) -> Placement {
        let heir_coming = self.heir_starting();
        let Some(w) = self.slots.get_mut(&id) else {
            return Placement::Unknown;
        };
        let WorkerRole::Starting { heir } = w.role else {
            return Placement::Unknown;
        };
        if w.aux.is_none() {
            return Placement::Unknown;
        }
        w.main = Some(main);
        w.last_heard = Instant::now();
        if heir || (self.main.is_none() && !heir_coming) {
            w.role = WorkerRole::Main;
            self.main = Some(id);
            return Placement::Main;
        }
        self.make_idle(id)
    }

    /// Puts a worker into the idle pool, or retires it if the pool already holds
    /// `max_idle` workers.
    fn make_idle(&mut self, id: WorkerId) -> Placement {
        if self.idle_ids().len() >= self.policy.max_idle {
            self.retire(id);
            Placement::Retired
        } else {
            if let Some(w) = self.slots.get_mut(&id) {
                w.role = WorkerRole::Idle(Instant::now());
            }
            Placement::Idle
        }
    }

    fn retire(&mut self, id: WorkerId) {
        if let Some(w) = self.slots.get_mut(&id) {
            w.shutdown();
            w.role = WorkerRole::Retiring;
        }
    }

    /// Idle workers, longest idle first.
    fn idle_ids(&self) -> Vec<(Instant, WorkerId)> {
        let mut idle: Vec<(Instant, WorkerId)> = self
            .slots
            .values()
            .filter_map(|w| match w.role {
                WorkerRole::Idle(since) => Some((since, w.id)),
                _ => None,
            })
            .collect();
        idle.sort_unstable();
        idle
    }

    /// Lends the most recently idle worker out (for a `# process` cell).
    pub fn borrow(&mut self) -> Option<&WorkerSlot> {
        let (_, id) = self.idle_ids().pop()?;
        let w = self.slots.get_mut(&id)?;
        w.role = WorkerRole::Borrowed;
        Some(w)
    }

    /// A lent worker (reset since) becomes idle again — or is retired, by the policy.
    pub fn give_back(&mut self, id: WorkerId) -> Option<Placement> {
        self.borrowed(id)?;
        Some(self.make_idle(id))
    }

    /// Whether a worker is starting (it will join the idle pool, or become main).
    pub fn any_starting(&self) -> bool {
        !self.forking.is_empty()
            || self
                .slots
                .values()
                .any(|w| matches!(w.role, WorkerRole::Starting { .. }))
    }

    /// Promotes the most recently idle worker to main (its memory is the warmest), if
    /// there is no main worker.
    pub fn promote_idle(&mut self) -> Option<&WorkerSlot> {
        if self.main.is_none() {
            let (_, id) = self.idle_ids().pop()?;
            if let Some(w) = self.slots.get_mut(&id) {
                w.role = WorkerRole::Main;
                w.last_heard = Instant::now();
            }
            self.main = Some(id);
        }
        self.main()
    }

    /// Removes a dead worker and returns its slot (its role says what it was).
    pub fn remove(&mut self, id: WorkerId) -> Option<WorkerSlot> {
        if self.main == Some(id) {
            self.main = None;
        }
        self.slots.remove(&id)
    }

    /// How many more workers to start so that `warm` are idle or on their way (and one
    /// is main, or an heir is coming). The template is not one of them.
    pub fn missing(&self) -> usize {
        let want = 1 + self.policy.warm.min(self.policy.max_idle);
        let have = self.forking.len()
            + self
                .slots
                .values()
                .filter(|w| {
                    matches!(
                        w.role,
                        WorkerRole::Main | WorkerRole::Idle(_) | WorkerRole::Starting { .. }
                    )
                })
                .count();
        want.saturating_sub(have)
    }

    /// Retires idle workers idle longer than `idle_shutdown`, keeping `warm` of them;
    /// returns the ids retired.
    pub fn reap(&mut self, now: Instant) -> Vec<WorkerId> {
        let limit = self.policy.idle_shutdown;
        if limit.is_zero() {
            return Vec::new();
        }
        let idle = self.idle_ids();
        let spare = idle.len().saturating_sub(self.policy.warm);
        let reaped: Vec<WorkerId> = idle
            .into_iter()
            .take(spare)
            .take_while(|(since, _)| now.duration_since(*since) > limit)
            .map(|(_, id)| id)
            .collect();
        for id in &reaped {
            self.retire(*id);
        }
        reaped
    }

    /// Asks every connected worker to exit.
    pub fn shutdown_all(&mut self) {
        self.main = None;
        let ids: Vec<WorkerId> = self.slots.keys().copied().collect();
        for id in ids {
            self.retire(id);
        }
    }

    /// A JSON description for `kernelvisor_info_request`.
    pub fn describe(&self, now: Instant) -> serde_json::Value {
        let of = |pred: &dyn Fn(&WorkerRole) -> bool| {
            let mut ws: Vec<&WorkerSlot> = self.slots.values().filter(|w| pred(&w.role)).collect();
            ws.sort_by_key(|w| w.id);
            ws.into_iter()
                .map(|w| {
                    let mut v = serde_json::json!({"id": w.id, "pid": w.pid()});
                    if let WorkerRole::Idle(since) = w.role {
                        v["idle_seconds"] = now.duration_since(since).as_secs_f64().into();
                    }
                    v
                })
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "main": self.main().map(|w| serde_json::json!({"id": w.id, "pid": w.pid()})),
            "idle": of(&|r| matches!(r, WorkerRole::Idle(_))),
            "starting": of(&|r| matches!(r, WorkerRole::Starting { .. })),
            "borrowed": of(&|r| *r == WorkerRole::Borrowed),
            "retiring": of(&|r| *r == WorkerRole::Retiring),
            "template": self.template().map(|w| serde_json::json!({"id": w.id, "pid": w.pid()})),
            "forking": self.forking.len(),
            "max_idle": self.policy.max_idle,
            "idle_shutdown_seconds": self.policy.idle_shutdown.as_secs_f64(),
            "warm": self.policy.warm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chan() -> mpsc::UnboundedSender<Frames> {
        mpsc::unbounded_channel().0
    }

    fn start(pool: &mut Pool, id: WorkerId, heir: bool) {
        pool.started(id, Proc::detached(1000 + id as u32), heir);
    }

    fn connect(pool: &mut Pool, id: WorkerId) -> Placement {
        start(pool, id, false);
        assert!(pool.aux_connected(id, chan()));
        pool.ready(id, chan())
    }

    fn policy(max_idle: usize, secs: u64, warm: usize) -> PoolPolicy {
        PoolPolicy {
            max_idle,
            idle_shutdown: Duration::from_secs(secs),
            warm,
            template: false,
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
        assert_eq!(pool.remove(4).map(|w| w.role), Some(WorkerRole::Retiring));
        assert_eq!(pool.missing(), 0);
    }

    #[test]
    fn crash_promotes_an_idle_worker() {
        let mut pool = Pool::new(policy(2, 0, 1));
        connect(&mut pool, 1);
        connect(&mut pool, 2);
        assert_eq!(pool.remove(1).map(|w| w.role), Some(WorkerRole::Main));
        assert_eq!(pool.promote_idle().map(|w| w.id), Some(2));
        assert_eq!(pool.missing(), 1, "the warm spare is to be replaced");
    }

    #[test]
    fn an_heir_takes_the_namespace_and_spares_wait() {
        let mut pool = Pool::new(policy(2, 0, 1));
        connect(&mut pool, 1);
        pool.remove(1);
        start(&mut pool, 5, true);
        assert_eq!(pool.missing(), 1, "the heir counts as the main worker");
        assert_eq!(
            connect(&mut pool, 2),
            Placement::Idle,
            "a spare ready first does not take over"
        );
        assert!(pool.aux_connected(5, chan()));
        assert_eq!(pool.ready(5, chan()), Placement::Main);
        assert_eq!(pool.main().map(|w| w.id), Some(5));
    }

    #[test]
    fn hello_without_aux_or_unknown_is_ignored() {
        let mut pool = Pool::new(policy(2, 0, 1));
        assert_eq!(pool.ready(9, chan()), Placement::Unknown);
        start(&mut pool, 1, false);
        assert_eq!(pool.ready(1, chan()), Placement::Unknown, "no aux yet");
    }

    /// The kernel parks a `main` hello that comes first (workers.rs) while this says so.
    #[test]
    fn a_starting_worker_awaits_aux_until_it_connects() {
        let mut pool = Pool::new(policy(2, 0, 1));
        start(&mut pool, 1, false);
        assert!(pool.get(1).unwrap().awaiting_aux());
        assert!(pool.aux_connected(1, chan()));
        assert!(!pool.get(1).unwrap().awaiting_aux());
        assert_eq!(pool.ready(1, chan()), Placement::Main);
        assert!(!pool.get(1).unwrap().awaiting_aux(), "placed: not starting");
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
        assert_eq!(pool.remove(2).map(|w| w.role), Some(WorkerRole::Retiring));
    }

    #[test]
    fn forks_count_as_starting_and_the_template_does_not() {
        let mut pool = Pool::new(policy(2, 0, 1));
        pool.started_template(9, Proc::detached(9));
        assert_eq!(pool.missing(), 2, "the template is no worker");
        assert!(pool.template_link().is_none(), "not ready yet");
        pool.fork_requested(1, None);
        pool.fork_requested(2, None);
        assert_eq!(pool.missing(), 0);
        assert!(pool.any_starting());
        assert!(pool.fork_arrived(1).is_some());
        assert!(pool.fork_arrived(1).is_none(), "once");
        assert_eq!(connect(&mut pool, 1), Placement::Main);
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(pool.abandon_forks(later, Duration::from_secs(30)), vec![2]);
        assert_eq!(pool.missing(), 1);
        pool.shutdown_all();
        assert_eq!(pool.remove(9).map(|w| w.role), Some(WorkerRole::Retiring));
    }

    #[test]
    fn zero_max_idle_means_no_spare() {
        let mut pool = Pool::new(policy(0, 0, 1));
        assert_eq!(pool.missing(), 1);
        connect(&mut pool, 1);
        assert_eq!(connect(&mut pool, 2), Placement::Retired);
    }
}
