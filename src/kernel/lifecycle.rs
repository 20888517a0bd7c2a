//! Starting and stopping worker processes, and backing off when they cannot start.
//!
//! With a template (the default), the supervisor spawns one process that imports everything
//! a worker needs and never runs user code, and asks it to fork each worker: workers share
//! its pages, and a new one is up in milliseconds. Its start failures are the workers'.

use tracing::{debug, error, warn};

use super::*;
use crate::admission::Token;
use crate::ipc_ops::ToWorker;
use crate::pool::WorkerRole;

/// Failed starts in a row after which requests are answered with the cause instead of
/// waiting for a worker.
const FAILURES_BEFORE_REFUSING: u32 = 2;

/// The back-off after the first failed start; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The longest wait between two attempts to start a worker that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a worker forked by the template may take to connect.
const FORK_PATIENCE: Duration = Duration::from_secs(20);

impl Kernel {
    /// Starts workers until the pool has its main worker and warm spares, and the template
    /// they are forked from. A missing main worker starts at once; spares (and a template
    /// replacing a dead one) only while no cell runs or waits, so that warming them never
    /// competes with a cell for the CPU. The watchdog
    /// tick calls this too, so spares follow within a tick of the kernel going quiet.
    /// While workers fail to start, attempts back off exponentially.
    pub(super) fn refill_pool(&mut self) {
        for id in self.pool.abandon_forks(Instant::now(), FORK_PATIENCE) {
            self.admission.forget(id);
            self.note_start_failure(format!(
                "the worker forked from the template did not connect within {FORK_PATIENCE:?}"
            ));
        }
        if self.exiting || self.next_spawn_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let missing = self.pool.missing();
        let quiet = !self.main_busy() && self.lanes.is_quiet();
        let no_main = self.pool.main().is_none() && !self.awaiting_heir();
        let allowed = if self.spawn_failures > 0 {
            // One attempt at a time until one succeeds.
            usize::from(!self.pool.any_starting()).min(missing)
        } else if no_main {
            // One at a time: a second worker starting beside the first would not be ready
            // sooner, and would slow the first down.
            usize::from(!self.pool.any_starting()).min(missing)
        } else if quiet {
            missing
        } else {
            0
        };
        for _ in 0..allowed {
            self.spawn_worker();
        }
        // A template that died is replaced before a worker is needed of it.
        let template_missing = self.pool.forks_from_template() && self.pool.template().is_none();
        if allowed == 0 && template_missing && (quiet || no_main) {
            self.spawn_process(true);
        }
    }

    /// Starts one worker: forked by the template when it is ready; none while it is
    /// starting (its readiness refills the pool); the template first if there is none.
    pub(super) fn spawn_worker(&mut self) {
        if !self.pool.forks_from_template() {
            return self.spawn_process(false);
        }
        match self.pool.template().map(|t| t.role) {
            Some(WorkerRole::Template { ready: true }) => self.fork_worker(),
            Some(_) => {}
            None => self.spawn_process(true),
        }
    }

    /// Asks the template to fork a worker; its stderr pipe goes with the request.
    fn fork_worker(&mut self) {
        self.next_worker += 1;
        let id = self.next_worker;
        let (token, fd, stderr) = match self.token_and_stderr(id) {
            Ok(p) => p,
            Err(e) => return self.note_start_failure(format!("cannot fork a worker: {e}")),
        };
        let op = ToWorker::Fork {
            worker_id: id,
            token: token.as_str(),
        }
        .message();
        // Known before the request leaves: the worker may connect before we look again.
        let parent = match self.forks_reaper() {
            worker::Reaper::Template(_) => self.pool.template().map_or(0, |t| t.pid()),
            _ => std::process::id(),
        };
        self.admission.expect_fork(id, token, parent);
        self.pool.fork_requested(id, Some(stderr));
        if !self.pool.template_link().is_some_and(|l| l.send(op, fd)) {
            // Its exit event follows (and spawns another).
            self.pool.fork_arrived(id);
            self.admission.forget(id);
        }
    }

    /// A worker forked by the template connected its first link: the supervisor, its
    /// parent now, takes charge of it.
    pub(super) fn fork_connected(&mut self, id: WorkerId, pid: u32) {
        if self.exiting {
            return; // refused: it gets end of file, and dies with us anyway
        }
        if let Some(Some(stderr)) = self.pool.fork_arrived(id) {
            debug!(worker = id, pid, "forked worker connected");
            let events = self.events_tx.clone();
            let proc = worker::adopt(
                id,
                pid,
                worker::LastWords::Pipe(stderr),
                self.forks_reaper(),
                events,
                &self.tasks,
            );
            self.pool.started(id, proc, false);
        }
    }

    /// Who reaps the workers the template forks: the supervisor (they are reparented to
    /// it), or the template itself if a previous supervisor handed it over.
    fn forks_reaper(&self) -> worker::Reaper {
        match (&self.handed_over, self.pool.template()) {
            (Some((id, reports)), Some(t)) if t.id == *id => {
                worker::Reaper::Template(reports.clone())
            }
            _ => worker::Reaper::Supervisor,
        }
    }

    /// A new worker's secret, and the stderr pipe it is forked with (the write end to
    /// send, the supervisor's reader of it).
    fn token_and_stderr(
        &self,
        id: WorkerId,
    ) -> std::io::Result<(Token, std::os::fd::OwnedFd, worker::Stderr)> {
        let token = Token::random()?;
        let (fd, stderr) = worker::Stderr::pipe(id, &self.tasks)?;
        Ok((token, fd, stderr))
    }

    /// At start: takes over the template that the previous supervisor of this kernel
    /// handed over at a restart, if one waits and can serve us ([`crate::handover`]).
    /// Its first worker is then a fork away, instead of a Python start-up.
    pub(super) fn take_over_template(&mut self) {
        if !self.pool.forks_from_template() {
            return;
        }
        let name = self.handover_name();
        let id = self.next_worker + 1;
        let (token, fd, stderr) = match self.token_and_stderr(id) {
            Ok(p) => p,
            Err(e) => return warn!(error = %e, "cannot look for a handed-over template"),
        };
        let (cwd, env) = crate::handover::Offer::inherited();
        let offer = crate::handover::Offer {
            worker_id: id,
            token: token.as_str(),
            path: &self.worker_cfg.socket_path,
            supervisor_pid: std::process::id(),
            python: &self.worker_cfg.python,
            backend: self.worker_cfg.backend,
            cwd,
            env,
            ipc_version: crate::ipc_ops::IPC_VERSION,
        };
        // Blocking, but short: a refused connection when nothing waits; else the template
        // checks the offer (it stats the files it imported) and answers. The template
        // connects only after this returns (one thread runs the kernel), so it is
        // expected by then.
        match crate::handover::look_for(&name, &offer, std::os::fd::AsFd::as_fd(&fd)) {
            crate::handover::Found::Nothing => {}
            crate::handover::Found::Refused(why) => {
                info!(reason = %why, "the template handed over at the restart cannot serve this kernel; starting a new one");
            }
            crate::handover::Found::Adopted { pid } => {
                self.next_worker = id;
                self.admission.expect(id, pid, token);
                let proc = worker::adopt(
                    id,
                    pid,
                    worker::LastWords::Pipe(stderr),
                    worker::Reaper::Unknown,
                    self.events_tx.clone(),
                    &self.tasks,
                );
                self.pool.started_template(id, proc);
                self.handed_over = Some((id, worker::ExitReports::default()));
                info!(
                    worker = id,
                    pid, "took over the template handed over at the restart"
                );
            }
        }
    }

    /// Where a template handed over at a restart waits for this kernel's next supervisor.
    pub(super) fn handover_name(&self) -> String {
        crate::handover::rendezvous_name(
            self.cfg.connection.key.as_bytes(),
            &self.cfg.connection_file,
        )
    }

    /// The template could not fork worker `id`.
    pub(super) fn fork_failed(&mut self, id: WorkerId, reason: &str) {
        if self.pool.fork_arrived(id).is_some() {
            self.admission.forget(id);
            error!(worker = id, reason, "the template could not fork a worker");
            self.note_start_failure(format!("the template could not fork a worker: {reason}"));
        }
    }

    /// The template exited: before it was ready, that is a failed start (its Python cannot
    /// start); after, forks it was asked for will not come, and a new one is started.
    pub(super) fn template_exited(
        &mut self,
        id: WorkerId,
        ready: bool,
        status: std::process::ExitStatus,
        tail: &[String],
    ) {
        for fork in self.pool.abandon_forks(Instant::now(), Duration::ZERO) {
            self.admission.forget(fork);
        }
        if ready {
            warn!(worker = id, %status, "the template exited; starting another");
        } else {
            self.start_failed(id, status, tail);
        }
        self.dispatch_process();
        self.refill_pool();
    }

    /// Spawns a worker process (a Python start-up), or the template.
    fn spawn_process(&mut self, template: bool) {
        self.next_worker += 1;
        let id = self.next_worker;
        let spawned = Token::random().and_then(|token| {
            let events = self.events_tx.clone();
            let proc = worker::spawn(&self.worker_cfg, id, &token, template, events, &self.tasks)?;
            Ok((token, proc))
        });
        match spawned {
            Ok((token, proc)) => {
                self.admission.expect(id, proc.pid, token);
                if template {
                    self.pool.started_template(id, proc);
                } else {
                    self.pool.started(id, proc, false);
                }
            }
            Err(e) => {
                let why = format!(
                    "cannot start the worker's Python {}: {e}",
                    self.worker_cfg.python.display()
                );
                error!(python = %self.worker_cfg.python.display(), error = %e, "cannot start a worker");
                self.note_start_failure(why);
            }
        }
    }

    /// A worker exited before it was ready: its Python cannot start (a wrong `--python`,
    /// no `kernelvisor` package, …). Back off, and once it keeps failing, answer what waits
    /// with the cause.
    pub(super) fn start_failed(
        &mut self,
        id: WorkerId,
        status: std::process::ExitStatus,
        tail: &[String],
    ) {
        let words: Vec<&str> = tail
            .iter()
            .map(String::as_str)
            .filter(|l| !l.trim().is_empty())
            .collect();
        let last = words
            .iter()
            .rev()
            .take(3)
            .rev()
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        let why = format!(
            "the worker's Python ({}) exited before it was ready ({}){}",
            self.worker_cfg.python.display(),
            crate::exit::describe_exit(status),
            if last.is_empty() {
                String::new()
            } else {
                format!(":\n{last}")
            }
        );
        debug!(worker = id, "{why}");
        self.note_start_failure(why);
    }

    fn note_start_failure(&mut self, why: String) {
        self.spawn_failures += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << self.spawn_failures.min(8).saturating_sub(1))
            .min(MAX_BACKOFF);
        self.next_spawn_at = Some(Instant::now() + backoff);
        if self.spawn_failures == FAILURES_BEFORE_REFUSING {
            // Logged once per run of failures, not per attempt.
            warn!(retry_in = ?backoff, "workers cannot start: {why}");
        }
        if self.spawn_failures >= FAILURES_BEFORE_REFUSING {
            self.start_failure = Some(why);
            self.refuse_waiting();
        }
    }

    /// Queues answers, for everything waiting for a worker, with the reason none can
    /// start (sent by [`Self::send_refusals`]).
    fn refuse_waiting(&mut self) {
        let Some(why) = self.start_failure.clone() else {
            return;
        };
        let mut waiting: Vec<(Channel, Incoming)> = self.waiting_for_worker.drain(..).collect();
        waiting.extend(
            self.lanes
                .reset_all()
                .into_iter()
                .map(|q| (Channel::Shell, q.msg)),
        );
        waiting.extend(
            self.process_queue
                .drain(..)
                .map(|q| (Channel::Shell, q.msg)),
        );
        self.refusals
            .extend(waiting.into_iter().map(|(c, m)| (c, m, why.clone())));
    }

    /// Sends the refusals queued by [`Self::refuse_waiting`]; `kernel_info` requests that
    /// waited for a worker's Python version are answered without it.
    pub(super) async fn send_refusals(&mut self) {
        if self.start_failure.is_some() && self.language_info.is_none() {
            self.language_info = Some(kernel_info::language_info(""));
            for (channel, msg) in std::mem::take(&mut self.deferred_kernel_info) {
                self.kernel_info(channel, msg).await;
            }
        }
        for (channel, msg, why) in std::mem::take(&mut self.refusals) {
            self.refuse(channel, &msg, "WorkerStartFailed", why).await;
        }
    }

    /// Reaps children the supervisor did not spawn as workers but was given as a child
    /// subreaper: processes orphaned by a dead worker (its older snapshots, subprocesses
    /// a cell started). Workers are reaped by their own tasks; only the rest is waited
    /// for here, and only once exited (never blocking).
    pub(super) fn reap_strays(&mut self) {
        self.strays_reaped_at = Some(Instant::now());
        let ours: std::collections::HashSet<u32> = self.pool.all().map(|w| w.pid()).collect();
        for pid in crate::proctree::children(std::process::id()) {
            if ours.contains(&pid) {
                continue;
            }
            let target = nix::unistd::Pid::from_raw(pid as i32);
            match nix::sys::wait::waitpid(target, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => {}
                Ok(status) => debug!(pid, ?status, "reaped an orphan of a worker"),
            }
        }
    }
}
