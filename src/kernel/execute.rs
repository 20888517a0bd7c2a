//! Execute scheduling: each `execute_request` gets a plan (run mode, tags), waits in its
//! lane (or for a borrowed worker, for `# process` cells), and is handed to a worker when
//! it may start; when it finishes, its lane moves on (or is aborted after an error).

use tracing::{debug, info, warn};

use super::*;
use crate::backend::Backend;
use crate::cell_plan::{CellPlan, Mode};
use crate::ipc_ops::{After, Count, RunMode, ToWorker};
use crate::msg_type::MsgType;
use lanes::{Kind, LaneId};

/// A request handed to a worker, waiting for its reply.
#[derive(Debug)]
pub(super) struct Pending {
    pub channel: Channel,
    pub identities: Vec<Bytes>,
    pub header: Bytes,
    pub msg_type: MsgType,
    pub worker: WorkerId,
    /// Runs in a worker lent from the pool (a `# process` cell), not in the main one.
    pub borrowed: bool,
    /// Its cell waits in `input()` (an `input_reply` goes to its worker).
    pub awaiting_input: bool,
    /// For an execute request: its lane, interrupts and timeout.
    pub exec: Option<Execution>,
}

/// What the supervisor tracks of a running execute request.
#[derive(Debug)]
pub(super) struct Execution {
    /// The lane whose queue an error aborts (`None`: a `# process` cell aborts nothing).
    pub lane: Option<LaneId>,
    /// It is its lane's running cell (a queue cell), not a task/thread cell beside it.
    pub holds_lane: bool,
    /// An error reply aborts its lane's queue (decided here, from the request and tags).
    pub abort_on_error: bool,
    /// Its `timeout=` tag.
    pub timeout: Option<Duration>,
    /// When it was sent to the worker.
    pub started: Instant,
    /// When an interrupt (signal) first reached it.
    pub interrupted: Option<Instant>,
    /// When its `timeout=` tag made us send it the `interrupt` op.
    pub timed_out: Option<Instant>,
    /// The execution count it was given (`takes_count`: its own; else only the number the
    /// next counted cell would take).
    pub count: Count,
}

impl Execution {
    pub(super) fn new(
        lane: Option<LaneId>,
        holds_lane: bool,
        plan: &CellPlan,
        count: Count,
    ) -> Self {
        Execution {
            abort_on_error: lane.is_some() && plan.abort_on_error(),
            lane,
            holds_lane,
            timeout: plan.tags.timeout,
            started: Instant::now(),
            interrupted: None,
            timed_out: None,
            count,
        }
    }
}

/// An execute request waiting for its turn (or for a worker), with its plan.
#[derive(Debug)]
pub(super) struct Queued {
    pub msg: Incoming,
    pub plan: CellPlan,
    /// Arrival order: what waited for a worker is sent in it.
    pub seq: u64,
    /// The number it was given when it was sent ahead to a worker that died before
    /// starting it (kernel/ahead.rs): it keeps it.
    pub count: Option<Count>,
}

/// Where a cell runs in its worker (IPC.md "Run modes"): its mode (`None`: `queue`), and for
/// a `thread` cell the thread's name and event loop.
pub(super) type RunIn<'a> = (Option<RunMode>, Option<&'a str>, Option<Backend>);

/// The `request` op of an `execute_request`: its id, its number, where it runs, and what it
/// waits for if it is sent ahead (ahead.rs).
pub(super) fn execute_op(
    id: u64,
    count: Count,
    run: RunIn<'_>,
    after: Option<After>,
) -> ToWorker<'_> {
    let (mode, thread, backend) = run;
    ToWorker::Request {
        id,
        channel: Channel::Shell.name(),
        msg_type: MsgType::ExecuteRequest.as_str(),
        mode,
        thread,
        backend,
        count: Some(count),
        after,
    }
}

impl Kernel {
    pub(super) fn register(
        &mut self,
        channel: Channel,
        msg: &Incoming,
        worker: WorkerId,
        exec: Option<Execution>,
    ) -> u64 {
        self.next_request += 1;
        let id = self.next_request;
        self.pending.insert(
            id,
            Pending {
                channel,
                identities: msg.identities.clone(),
                header: msg.header_bytes.clone(),
                msg_type: MsgType::parse(&msg.header.msg_type),
                worker,
                borrowed: self.pool.borrowed(worker).is_some(),
                awaiting_input: false,
                exec,
            },
        );
        id
    }

    /// An `execute_request` arrived: refuse it if it names an unknown subshell, else
    /// queue it or run it by its plan.
    pub(super) async fn execute_request(&mut self, msg: Incoming) {
        let lane = LaneId::of(msg.header.subshell_id.as_deref());
        if !self.lanes.exists(&lane) {
            let id = msg.header.subshell_id.clone().unwrap_or_default();
            warn!(subshell_id = %id, "execute_request for an unknown subshell");
            let evalue = format!("no subshell with id {id:?} (it was deleted, or never created)");
            self.refuse(Channel::Shell, &msg, "UnknownSubshellError", evalue)
                .await;
            return;
        }
        if let Some(why) = self.start_failure.clone() {
            if self.pool.main().is_none() {
                self.refuse(Channel::Shell, &msg, "WorkerStartFailed", why)
                    .await;
                return;
            }
        }
        let plan = CellPlan::parse(&msg.content, &msg.metadata);
        self.next_arrival += 1;
        let queued = Queued {
            msg,
            plan,
            seq: self.next_arrival,
            count: None,
        };
        match queued.plan.mode {
            Mode::Process => {
                self.process_queue.push_back(queued);
                self.dispatch_process();
            }
            Mode::Queue | Mode::Task | Mode::Thread { .. } => {
                let kind = match queued.plan.mode {
                    Mode::Queue => Kind::Queue,
                    _ => Kind::Beside,
                };
                if self.lanes.push(&lane, kind, queued).is_err() {
                    unreachable!("the lane exists");
                }
                self.dispatch_execute();
            }
        }
    }

    /// Sends the main worker what may start now (see [`lanes`]), in arrival order across
    /// lanes, so cells that waited for a worker start as they would have on a ready one.
    /// A snapshot is taken first when the policy says so (see [`crate::snapshot`]).
    pub(super) fn dispatch_execute(&mut self) {
        if self.pool.main().is_none() || self.debug.replaying() {
            return;
        }
        while let Some((lane, _)) = self.lanes.first_ready(|q| q.seq) {
            let (kind, queued) = self.lanes.pop_front(&lane).expect("a ready front");
            self.maybe_snapshot(&snapshots::Before::Cell(&queued.plan));
            let holds_lane = kind == Kind::Queue;
            let id = self.start_execute(lane.clone(), queued, holds_lane);
            if holds_lane {
                self.lanes.start(&lane, id);
            }
        }
        self.send_ahead();
    }

    /// Hands one execute request to the main worker, with its run mode; returns its id.
    fn start_execute(&mut self, lane: LaneId, queued: Queued, holds_lane: bool) -> u64 {
        let Queued {
            msg, plan, count, ..
        } = queued;
        let wid = self.pool.main().map(|w| w.id).expect("a main worker");
        let count = count.unwrap_or_else(|| self.take_count(&plan));
        let exec = Execution::new(Some(lane.clone()), holds_lane, &plan, count);
        if self.quiet_since.take().is_some() {
            let now = Instant::now();
            self.busy_since = Some(now);
            // Liveness is measured from when the worker became busy.
            if let Some(w) = self.pool.main_mut() {
                w.last_heard = now;
            }
        }
        let id = self.register(Channel::Shell, &msg, wid, Some(exec));
        self.cell_starts(wid, &msg, &plan, count);
        let subshell_thread;
        let (mode, thread, backend) = match (&plan.mode, &lane) {
            (Mode::Task, _) => (Some(RunMode::Task), None, None),
            (Mode::Thread { name, backend }, _) => {
                (Some(RunMode::Thread), name.as_deref(), *backend)
            }
            (_, LaneId::Subshell(sub)) => {
                subshell_thread = subshells::thread_name(sub);
                (Some(RunMode::Thread), Some(subshell_thread.as_str()), None)
            }
            (_, LaneId::Main) => (None, None, None),
        };
        let ctrl = execute_op(id, count, (mode, thread, backend), None);
        let frames = request_frames(ctrl.frame(), &msg);
        if let Some(w) = self.pool.main_mut() {
            w.snapshots.touch();
            if mode == Some(RunMode::Thread) {
                // `aux` is read by a worker thread: a cell blocking the main thread (which
                // reads `main`) must not hold up cells that run elsewhere.
                w.send_aux(frames);
            } else {
                w.send_main(frames);
            }
        }
        if crate::timings::enabled() {
            let sent = crate::timings::now();
            crate::timings::record("exec", &[&id, &msg.header.msg_id, &msg.received, &sent]);
        }
        id
    }

    /// A cell's execution count: the supervisor alone numbers cells, in the order it
    /// sends them, whichever worker runs them.
    pub(super) fn take_count(&mut self, plan: &CellPlan) -> Count {
        let number = self.last_count.map_or(1, |n| n + 1);
        if plan.takes_count {
            self.last_count = Some(number);
        }
        Count {
            number,
            takes_count: plan.takes_count,
        }
    }

    /// A cell starts in worker `wid`: the worker's count is the cell's (unless silent),
    /// and `busy` and its `execute_input` are published, before anything the worker sends
    /// for it. The one place where a cell starts, whichever way it came (at once, sent
    /// ahead, a `# process` cell).
    pub(super) fn cell_starts(
        &mut self,
        wid: WorkerId,
        msg: &Incoming,
        plan: &CellPlan,
        count: Count,
    ) {
        self.publish_status(&msg.header_bytes, "busy");
        if !plan.silent {
            if let Some(w) = self.pool.get_mut(wid) {
                w.execution_count = Some(count.number);
            }
            if let Some(content) = crate::cell_plan::execute_input(&msg.content, count.number) {
                let input =
                    self.outbox
                        .iopub("execute_input", &msg.header_bytes, b"{}", &content, &[]);
                self.iopub.send(input);
            }
        }
    }

    /// Runs waiting `# process` cells, each in a worker borrowed from the idle pool; starts
    /// a worker when none is idle (and none is on its way).
    pub(super) fn dispatch_process(&mut self) {
        while !self.process_queue.is_empty() {
            let Some(wid) = self.pool.borrow().map(|w| w.id) else {
                if !self.pool.any_starting() {
                    self.spawn_worker();
                }
                return;
            };
            let Queued { msg, plan, .. } = self.process_queue.pop_front().expect("not empty");
            // It shares the main namespace's numbering.
            let count = self.take_count(&plan);
            let exec = Execution::new(None, false, &plan, count);
            let id = self.register(Channel::Shell, &msg, wid, Some(exec));
            info!(
                worker = wid,
                "running a `# process` cell in a borrowed worker"
            );
            self.cell_starts(wid, &msg, &plan, count);
            if let Some(w) = self.pool.borrowed(wid) {
                let ctrl = execute_op(id, count, (None, None, None), None);
                w.send_main(request_frames(ctrl.frame(), &msg));
            }
        }
    }

    /// An execute request of the main worker finished: free its lane, abort the lane's
    /// queue after an error if its plan says so, then run what may run now.
    pub(super) async fn execute_done(&mut self, id: u64, exec: Execution, failed: bool) {
        let aborts = failed && exec.abort_on_error;
        let mut dropped_ahead = None;
        if let (true, Some(lane)) = (exec.holds_lane, &exec.lane) {
            if !self.lanes.finish(lane, id) {
                debug!(id, ?lane, "a cell of a deleted subshell finished");
            } else if *lane == LaneId::Main {
                dropped_ahead = self.ahead_after(aborts);
            }
        }
        if aborts {
            if let Some(lane) = &exec.lane {
                let mut queued: Vec<Queued> = dropped_ahead.into_iter().collect();
                queued.extend(self.lanes.drain(lane));
                self.abort(queued).await;
            }
        }
        if !self.main_busy() {
            let now = Instant::now();
            self.quiet_since = Some(now);
            if let (Some(since), Some(w)) = (self.busy_since.take(), self.pool.main_mut()) {
                w.snapshots.was_busy(now.duration_since(since));
            }
            // Due at once (after a long cell): before the next cell, which may be here
            // already, not when the timer's turn comes.
            if let Some(at) = self.idle_snapshot_at().filter(|at| *at <= now) {
                self.idle_snapshot(at);
            }
        }
        self.dispatch_execute();
    }

    /// The execute requests running in worker `wid` (the main one), with their request ids
    /// (a cell sent ahead among them: it is in the worker, not started for the client).
    pub(super) fn main_executions(
        &mut self,
        wid: WorkerId,
    ) -> impl Iterator<Item = (u64, &mut Execution)> {
        self.pending
            .iter_mut()
            .filter(move |(_, p)| p.worker == wid && !p.borrowed)
            .filter_map(|(id, p)| Some((*id, p.exec.as_mut()?)))
    }

    /// Whether an execute request is running in the main worker.
    pub(super) fn main_busy(&self) -> bool {
        self.main_busy_besides(0)
    }

    /// Whether an execute request other than `id` runs in the main worker (request ids
    /// start at 1: `0` excepts none).
    pub(super) fn main_busy_besides(&self, id: u64) -> bool {
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            return false;
        };
        self.pending
            .iter()
            .any(|(k, p)| *k != id && p.worker == wid && !p.borrowed && p.exec.is_some())
    }
}
