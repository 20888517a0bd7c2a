//! Every task and thread the supervisor starts, tracked, as tokio's mini-redis tracks its
//! connection handlers: one stop signal that every long-lived task listens to (a
//! [`CancellationToken`]), a [`TaskTracker`] that knows when they have all ended, and a
//! name for each, so that at exit a task or thread that does not finish in time is named
//! in the log instead of hanging the kernel's exit.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// The supervisor's tasks and threads: cheap to clone, shared by whoever starts one.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
    live: Arc<Mutex<Live>>,
}

/// The names of the tasks and threads still running.
#[derive(Debug, Default)]
struct Live {
    next: u64,
    names: BTreeMap<u64, String>,
}

/// Takes its task's name off the live list when dropped: when the task ends, or is
/// dropped unfinished.
struct Entry {
    live: Arc<Mutex<Live>>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        lock(&self.live).names.remove(&self.id);
    }
}

fn lock(live: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    // A panic elsewhere never leaves the map half-changed: keep using it.
    live.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tasks {
    /// A fresh set: nothing running, the stop signal not given.
    pub fn new() -> Self {
        Self::default()
    }

    fn enter(&self, name: String) -> Entry {
        let mut live = lock(&self.live);
        live.next += 1;
        let id = live.next;
        live.names.insert(id, name);
        Entry {
            live: self.live.clone(),
            id,
        }
    }

    /// Starts a task that ends by itself; if it can outlive the stop signal, it must
    /// watch [`Self::stopped`].
    pub fn spawn<F>(&self, name: impl Into<String>, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let entry = self.enter(name.into());
        self.tracker.spawn(async move {
            let _entry = entry;
            task.await
        })
    }

    /// Starts a task that is dropped at the stop signal if it is still running then
    /// (readers, writers, timers): `None` if it was.
    pub fn spawn_until_stopped<F>(
        &self,
        name: impl Into<String>,
        task: F,
    ) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let stop = self.stop.clone();
        self.spawn(name, async move {
            tokio::select! {
                out = task => Some(out),
                () = stop.cancelled() => None,
            }
        })
    }

    /// Starts a thread; [`Thread::join`] waits for it, bounded. The thread blocks every
    /// signal, as libzmq's own threads do, so that signals (SIGINT, SIGCHLD) reach the
    /// runtime's thread and never interrupt a blocking call here (`zmq_proxy` returns on
    /// EINTR: the heartbeat would stop).
    pub fn thread(
        &self,
        name: &str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Thread> {
        let entry = self.enter(format!("{name} thread"));
        let (done_tx, done) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = nix::sys::signal::pthread_sigmask(
                    nix::sys::signal::SigmaskHow::SIG_BLOCK,
                    Some(&nix::sys::signal::SigSet::all()),
                    None,
                ) {
                    tracing::warn!("cannot block signals in a thread: {e}");
                }
                body();
                drop(entry);
                drop(done_tx); // the joiner's receive ends here
            })?;
        Ok(Thread {
            name: name.to_string(),
            done,
        })
    }

    /// Resolves once the stop signal is given.
    pub fn stopped(&self) -> WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    /// Gives the stop signal.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits at most `limit` for every task started so far (and any they start) to end;
    /// returns the names of those still running after it.
    pub async fn wait(&self, limit: Duration) -> Vec<String> {
        self.tracker.close();
        if tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        self.still_running()
    }

    /// The names of the tasks and threads still running.
    pub fn still_running(&self) -> Vec<String> {
        lock(&self.live).names.values().cloned().collect()
    }
}

/// A thread started by [`Tasks::thread`].
#[derive(Debug)]
pub struct Thread {
    name: String,
    done: mpsc::Receiver<()>,
}

impl Thread {
    /// Waits at most `limit` for the thread to end; `false` (logged) if it did not. A
    /// thread left running then ends with the process.
    pub fn join(self, limit: Duration) -> bool {
        match self.done.recv_timeout(limit) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(thread = %self.name, ?limit, "a thread did not finish in time at exit");
                false
            }
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_block_every_signal() {
        use nix::sys::signal::{SigSet, Signal};
        let tasks = Tasks::new();
        let (tx, rx) = mpsc::channel();
        let thread = tasks
            .thread("mask", move || {
                let mask = SigSet::thread_get_mask().unwrap();
                tx.send(
                    [Signal::SIGINT, Signal::SIGCHLD, Signal::SIGTERM].map(|s| mask.contains(s)),
                )
                .unwrap();
            })
            .unwrap();
        assert_eq!(rx.recv().unwrap(), [true; 3]);
        assert!(!SigSet::thread_get_mask().unwrap().contains(Signal::SIGCHLD));
        drop(thread);
    }

    #[tokio::test]
    async fn tasks_end_at_the_stop_signal_or_are_named() {
        let tasks = Tasks::new();
        let stopped = tasks.spawn_until_stopped("reader", std::future::pending::<()>());
        let listens = tasks.spawn("listener", tasks.stopped());
        let finished = tasks.spawn("quick", async { 7 });
        assert_eq!(finished.await.unwrap(), 7);
        let wedged = tasks.spawn("wedged", std::future::pending::<()>());
        let mut names = tasks.still_running();
        names.sort();
        assert_eq!(names, ["listener", "reader", "wedged"]);
        tasks.stop();
        let left = tasks.wait(Duration::from_millis(100)).await;
        assert_eq!(
            left,
            ["wedged"],
            "only the task that ignores the signal is left"
        );
        assert_eq!(stopped.await.unwrap(), None);
        listens.await.unwrap();
        wedged.abort();
        assert!(wedged.await.unwrap_err().is_cancelled());
        assert!(
            tasks.still_running().is_empty(),
            "an aborted task is off the list"
        );
        assert!(tasks.wait(Duration::from_millis(100)).await.is_empty());
    }

    #[test]
    fn threads_are_joined_with_a_bound() {
        let tasks = Tasks::new();
        let quick = tasks.thread("quick", || {}).unwrap();
        assert!(quick.join(Duration::from_secs(10)));
        let (release, wait) = mpsc::channel::<()>();
        let slow = tasks
            .thread("slow", move || {
                let _ = wait.recv();
            })
            .unwrap();
        assert_eq!(tasks.still_running(), ["slow thread"]);
        assert!(!slow.join(Duration::from_millis(20)), "bounded");
        drop(release);
    }
}
