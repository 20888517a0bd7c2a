//! Execute lanes: the main shell's and one per subshell (JEP 91). Each lane is a FIFO
//! that runs at most one queue cell at a time; lanes run beside each other.
//!
//! Task and thread cells wait in their lane too, but only for the cells queued before
//! them to start, never for the running one: a `# task` cell sent while a cell runs starts
//! at once, and one of a "Run All" starts beside the queue cell just before it, once the
//! cells above it have defined what it uses.
//!
//! A lane may also hold one queue cell *sent ahead* (kernel/ahead.rs): already in the
//! worker, it starts there when the running one finishes. Until it starts, it is the front
//! of its lane: what comes after it waits for it, task and thread cells included.
//!
//! Pure bookkeeping, generic over what waits in a lane, so it is tested without a kernel.

use std::collections::VecDeque;

/// Which lane an execute request belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LaneId {
    /// The main shell (requests without a `subshell_id`).
    Main,
    /// The subshell with this id.
    Subshell(String),
}

impl LaneId {
    /// The lane a request's header names.
    pub fn of(subshell_id: Option<&str>) -> LaneId {
        match subshell_id {
            None => LaneId::Main,
            Some(id) => LaneId::Subshell(id.to_owned()),
        }
    }
}

/// Whether a waiting item holds its lane while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A queue cell: it waits for the running one, and later ones wait for it.
    Queue,
    /// A task or thread cell: it starts once it reaches the front, beside the running one.
    Beside,
}

/// One FIFO, the request id of its running queue cell, and the queue cell sent ahead.
#[derive(Debug)]
struct Lane<T> {
    queue: VecDeque<(Kind, T)>,
    running: Option<u64>,
    ahead: Option<(u64, T)>,
}

impl<T> Lane<T> {
    fn new() -> Self {
        Lane {
            queue: VecDeque::new(),
            running: None,
            ahead: None,
        }
    }

    /// The front item, if it may start now (nothing may pass a cell sent ahead).
    fn ready(&self) -> Option<&(Kind, T)> {
        if self.ahead.is_some() {
            return None;
        }
        self.queue
            .front()
            .filter(|(kind, _)| *kind == Kind::Beside || self.running.is_none())
    }
}

/// The main lane and the subshells' lanes, in creation order.
#[derive(Debug)]
pub struct Lanes<T> {
    main: Lane<T>,
    subshells: Vec<(String, Lane<T>)>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            main: Lane::new(),
            subshells: Vec::new(),
        }
    }
}

impl<T> Lanes<T> {
    /// Creates a subshell lane; returns its id (a UUID, as ipykernel's).
    pub fn create_subshell(&mut self) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.subshells.push((id.clone(), Lane::new()));
        id
    }

    /// Deletes a subshell lane; returns what waited in it (to abort), or `None` if there
    /// is no such subshell. Its running cell, if any, still replies.
    pub fn delete_subshell(&mut self, id: &str) -> Option<Vec<T>> {
        let i = self.subshells.iter().position(|(s, _)| s == id)?;
        let (_, lane) = self.subshells.remove(i);
        Some(lane.queue.into_iter().map(|(_, item)| item).collect())
    }

    /// The subshell ids, in creation order.
    pub fn subshell_ids(&self) -> Vec<String> {
        self.subshells.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Whether the lane exists (the main one always does).
    pub fn exists(&self, lane: &LaneId) -> bool {
        self.get(lane).is_some()
    }

    fn get(&self, lane: &LaneId) -> Option<&Lane<T>> {
        match lane {
            LaneId::Main => Some(&self.main),
            LaneId::Subshell(id) => self.subshells.iter().find(|(s, _)| s == id).map(|(_, l)| l),
        }
    }

    fn get_mut(&mut self, lane: &LaneId) -> Option<&mut Lane<T>> {
        match lane {
            LaneId::Main => Some(&mut self.main),
            LaneId::Subshell(id) => self
                .subshells
                .iter_mut()
                .find(|(s, _)| s == id)
                .map(|(_, l)| l),
        }
    }

    /// Adds an item at the back of its lane; gives it back if there is no such lane.
    pub fn push(&mut self, lane: &LaneId, kind: Kind, item: T) -> Result<(), T> {
        match self.get_mut(lane) {
            Some(l) => {
                l.queue.push_back((kind, item));
                Ok(())
            }
            None => Err(item),
        }
    }

    /// Among the lanes whose front item may start now, the one whose front item comes
    /// first by `key` (e.g. arrival order), with that key. Take the item with
    /// [`Lanes::pop_front`]; record a queue cell that runs with [`Lanes::start`].
    pub fn first_ready<K: Ord>(&self, key: impl Fn(&T) -> K) -> Option<(LaneId, K)> {
        let main = (LaneId::Main, &self.main);
        let subs = self
            .subshells
            .iter()
            .map(|(id, l)| (LaneId::Subshell(id.clone()), l));
        std::iter::once(main)
            .chain(subs)
            .filter_map(|(id, l)| l.ready().map(|(_, item)| (id, key(item))))
            .min_by(|a, b| a.1.cmp(&b.1))
    }

    /// Takes the front item of a lane, with its kind.
    pub fn pop_front(&mut self, lane: &LaneId) -> Option<(Kind, T)> {
        self.get_mut(lane)?.queue.pop_front()
    }

    /// The queue cell running in `lane`, if any.
    pub fn running(&self, lane: &LaneId) -> Option<u64> {
        self.get(lane)?.running
    }

    /// The front item of `lane`, if it is a queue cell waiting for the running one and
    /// none is ahead: what may be sent ahead.
    pub fn next_for_ahead(&self, lane: &LaneId) -> Option<&T> {
        let l = self.get(lane)?;
        if l.ahead.is_some() || l.running.is_none() {
            return None;
        }
        match l.queue.front()? {
            (Kind::Queue, item) => Some(item),
            (Kind::Beside, _) => None,
        }
    }

    /// Sends the front item ahead as request `id` (it must be [`Self::next_for_ahead`]);
    /// returns it.
    pub fn send_ahead(&mut self, lane: &LaneId, id: u64) -> Option<&mut T> {
        let l = self.get_mut(lane)?;
        let (_, item) = l.queue.pop_front()?;
        l.ahead = Some((id, item));
        l.ahead.as_mut().map(|(_, item)| item)
    }

    /// The cell sent ahead in `lane`: its request id.
    pub fn ahead_id(&self, lane: &LaneId) -> Option<u64> {
        self.get(lane)?.ahead.as_ref().map(|(id, _)| *id)
    }

    /// The cell sent ahead starts: it becomes the running cell. Returns it.
    pub fn start_ahead(&mut self, lane: &LaneId) -> Option<(u64, T)> {
        let l = self.get_mut(lane)?;
        let (id, item) = l.ahead.take()?;
        debug_assert!(
            l.running.is_none(),
            "it starts once the running one finished"
        );
        l.running = Some(id);
        Some((id, item))
    }

    /// The cell sent ahead will not run (aborted): taken out. Returns it.
    pub fn take_ahead(&mut self, lane: &LaneId) -> Option<(u64, T)> {
        self.get_mut(lane)?.ahead.take()
    }

    /// Records that queue cell `id` now runs in `lane`.
    pub fn start(&mut self, lane: &LaneId, id: u64) {
        if let Some(l) = self.get_mut(lane) {
            debug_assert!(l.running.is_none(), "a lane runs one queue cell at a time");
            l.running = Some(id);
        }
    }

    /// Queue cell `id` of `lane` finished; says whether it was that lane's running cell
    /// (a deleted subshell's last cell was not).
    pub fn finish(&mut self, lane: &LaneId, id: u64) -> bool {
        match self.get_mut(lane) {
            Some(l) if l.running == Some(id) => {
                l.running = None;
                true
            }
            _ => false,
        }
    }

    /// Empties a lane (to abort what waited; not a cell sent ahead).
    pub fn drain(&mut self, lane: &LaneId) -> Vec<T> {
        self.get_mut(lane)
            .map(|l| l.queue.drain(..).map(|(_, item)| item).collect())
            .unwrap_or_default()
    }

    /// Forgets every running cell (their worker died) and empties every lane, main lane
    /// first, each lane's cell sent ahead first; the subshells themselves stay.
    pub fn reset_all(&mut self) -> Vec<T> {
        let mut out: Vec<T> = Vec::new();
        let subs = self.subshells.iter_mut().map(|(_, l)| l);
        for lane in std::iter::once(&mut self.main).chain(subs) {
            lane.running = None;
            out.extend(lane.ahead.take().map(|(_, item)| item));
            out.extend(lane.queue.drain(..).map(|(_, item)| item));
        }
        out
    }

    /// Forgets every running cell (their worker died); what waits stays queued, a cell
    /// sent ahead (it did not start) back at the front.
    pub fn release_running(&mut self) {
        let subs = self.subshells.iter_mut().map(|(_, l)| l);
        for lane in std::iter::once(&mut self.main).chain(subs) {
            lane.running = None;
            if let Some((_, item)) = lane.ahead.take() {
                lane.queue.push_front((Kind::Queue, item));
            }
        }
    }

    /// Whether nothing runs or waits in any lane.
    pub fn is_quiet(&self) -> bool {
        std::iter::once(&self.main)
            .chain(self.subshells.iter().map(|(_, l)| l))
            .all(|l| l.running.is_none() && l.ahead.is_none() && l.queue.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<T: Ord + Copy> Lanes<T> {
        /// The next item that may start, smallest first.
        fn pop_ready(&mut self) -> Option<(LaneId, T)> {
            let (lane, _) = self.first_ready(|item| *item)?;
            let (_, item) = self.pop_front(&lane)?;
            Some((lane, item))
        }
    }

    const Q: Kind = Kind::Queue;
    const B: Kind = Kind::Beside;

    #[test]
    fn one_at_a_time_per_lane_lanes_side_by_side() {
        let mut lanes = Lanes::<&str>::default();
        let sub = LaneId::Subshell(lanes.create_subshell());
        lanes.push(&LaneId::Main, Q, "m1").unwrap();
        lanes.push(&LaneId::Main, Q, "m2").unwrap();
        lanes.push(&sub, Q, "s1").unwrap();
        assert_eq!(lanes.pop_ready(), Some((LaneId::Main, "m1")));
        lanes.start(&LaneId::Main, 1);
        assert_eq!(lanes.pop_ready(), Some((sub.clone(), "s1")), "beside m1");
        lanes.start(&sub, 2);
        assert_eq!(lanes.pop_ready(), None, "m2 waits for m1");
        assert_eq!(lanes.first_ready(|s| *s), None);
        assert!(!lanes.finish(&LaneId::Main, 2), "not the main lane's cell");
        assert!(lanes.finish(&LaneId::Main, 1));
        assert_eq!(lanes.pop_ready(), Some((LaneId::Main, "m2")));
        lanes.start(&LaneId::Main, 3);
        assert!(lanes.finish(&LaneId::Main, 3) && lanes.finish(&sub, 2));
        assert!(lanes.is_quiet());
    }

    #[test]
    fn beside_cells_wait_only_for_the_cells_before_them_to_start() {
        let mut lanes = Lanes::<u32>::default();
        let main = LaneId::Main;
        // Run All: setup, waiter, task, task, setter.
        for (kind, n) in [(Q, 1), (Q, 2), (B, 3), (B, 4), (Q, 5)] {
            lanes.push(&main, kind, n).unwrap();
        }
        assert_eq!(lanes.pop_ready(), Some((main.clone(), 1)));
        lanes.start(&main, 1);
        assert_eq!(
            lanes.pop_ready(),
            None,
            "the tasks are behind 2, which waits"
        );
        assert!(lanes.finish(&main, 1));
        assert_eq!(lanes.pop_ready(), Some((main.clone(), 2)));
        lanes.start(&main, 2);
        assert_eq!(lanes.pop_ready(), Some((main.clone(), 3)), "beside 2");
        assert_eq!(lanes.pop_ready(), Some((main.clone(), 4)));
        assert_eq!(lanes.pop_ready(), None, "5 waits for 2");
        // A task sent while a cell runs and nothing waits starts at once.
        let mut idle = Lanes::<u32>::default();
        idle.push(&main, Q, 1).unwrap();
        assert_eq!(idle.pop_ready(), Some((main.clone(), 1)));
        idle.start(&main, 1);
        idle.push(&main, B, 2).unwrap();
        assert_eq!(idle.pop_ready(), Some((main.clone(), 2)));
    }

    #[test]
    fn first_ready_is_the_earliest_head() {
        let mut lanes = Lanes::<u32>::default();
        let sub = LaneId::Subshell(lanes.create_subshell());
        lanes.push(&sub, Q, 1).unwrap();
        lanes.push(&LaneId::Main, Q, 2).unwrap();
        lanes.push(&sub, Q, 3).unwrap();
        assert_eq!(lanes.first_ready(|n| *n), Some((sub.clone(), 1)));
        assert_eq!(lanes.pop_front(&sub), Some((Q, 1)));
        lanes.start(&sub, 10);
        assert_eq!(
            lanes.first_ready(|n| *n),
            Some((LaneId::Main, 2)),
            "the subshell runs 1: its 3 waits"
        );
        assert_eq!(lanes.pop_front(&LaneId::of(Some("nope"))), None);
    }

    #[test]
    fn unknown_lanes_refuse() {
        let mut lanes = Lanes::<u8>::default();
        let ghost = LaneId::of(Some("nope"));
        assert!(!lanes.exists(&ghost) && lanes.exists(&LaneId::of(None)));
        assert_eq!(lanes.push(&ghost, Q, 7), Err(7));
        assert_eq!(lanes.delete_subshell("nope"), None);
        assert!(lanes.drain(&ghost).is_empty());
    }

    #[test]
    fn subshells_are_listed_in_creation_order_and_deleted_with_their_queue() {
        let mut lanes = Lanes::<u8>::default();
        let ids: Vec<String> = (0..3).map(|_| lanes.create_subshell()).collect();
        assert_eq!(lanes.subshell_ids(), ids);
        assert!(ids.iter().all(|id| uuid::Uuid::parse_str(id).is_ok()));
        let second = LaneId::Subshell(ids[1].clone());
        lanes.push(&second, Q, 1).unwrap();
        lanes.push(&second, B, 2).unwrap();
        lanes.push(&second, Q, 3).unwrap();
        assert_eq!(lanes.pop_ready(), Some((second.clone(), 1)));
        lanes.start(&second, 10);
        lanes.push(&second, Q, 4).unwrap();
        assert_eq!(lanes.pop_ready(), Some((second.clone(), 2)));
        assert_eq!(lanes.delete_subshell(&ids[1]), Some(vec![3, 4]));
        assert_eq!(lanes.subshell_ids(), vec![ids[0].clone(), ids[2].clone()]);
        assert!(!lanes.finish(&second, 10), "its lane is gone");
        assert!(lanes.is_quiet());
    }

    #[test]
    fn reset_all_keeps_the_subshells() {
        let mut lanes = Lanes::<u8>::default();
        let sub = LaneId::Subshell(lanes.create_subshell());
        for (lane, item) in [(&LaneId::Main, 1), (&sub, 2), (&LaneId::Main, 3)] {
            lanes.push(lane, Q, item).unwrap();
        }
        let (lane, _) = lanes.pop_ready().unwrap();
        lanes.start(&lane, 1);
        assert!(!lanes.is_quiet());
        assert_eq!(lanes.reset_all(), vec![3, 2], "main lane first");
        assert!(lanes.is_quiet() && lanes.exists(&sub));
        lanes.push(&LaneId::Main, Q, 4).unwrap();
        assert_eq!(
            lanes.pop_ready(),
            Some((LaneId::Main, 4)),
            "nothing runs any more"
        );
        assert_eq!(lanes.drain(&sub), Vec::<u8>::new());
    }

    #[test]
    fn a_cell_sent_ahead_holds_the_lane_until_it_starts() {
        let mut lanes: Lanes<u32> = Lanes::default();
        let main = LaneId::Main;
        for (kind, item) in [(Kind::Queue, 1), (Kind::Queue, 2), (Kind::Beside, 3)] {
            lanes.push(&main, kind, item).unwrap();
        }
        assert_eq!(
            lanes.next_for_ahead(&main),
            None,
            "nothing runs: nothing to be ahead of"
        );
        assert_eq!(lanes.pop_front(&main), Some((Kind::Queue, 1)));
        lanes.start(&main, 10);
        assert_eq!(lanes.next_for_ahead(&main), Some(&2));
        lanes.send_ahead(&main, 11);
        assert_eq!(lanes.ahead_id(&main), Some(11));
        assert_eq!(lanes.next_for_ahead(&main), None, "one ahead at a time");
        assert_eq!(
            lanes.pop_ready(),
            None,
            "the task cell waits for 2 to start"
        );
        assert!(lanes.finish(&main, 10));
        assert_eq!(lanes.start_ahead(&main), Some((11, 2)));
        assert_eq!(lanes.running(&main), Some(11));
        assert_eq!(lanes.pop_ready(), Some((main.clone(), 3)));
        assert!(!lanes.is_quiet());
    }

    #[test]
    fn a_dead_workers_cell_sent_ahead_goes_back_first() {
        let mut lanes: Lanes<u32> = Lanes::default();
        let main = LaneId::Main;
        lanes.push(&main, Kind::Queue, 1).unwrap();
        lanes.push(&main, Kind::Queue, 2).unwrap();
        lanes.push(&main, Kind::Queue, 3).unwrap();
        lanes.pop_front(&main);
        lanes.start(&main, 10);
        lanes.send_ahead(&main, 11);
        lanes.release_running();
        assert_eq!(lanes.pop_ready(), Some((main.clone(), 2)));
        lanes.start(&main, 12);
        lanes.send_ahead(&main, 13);
        assert_eq!(lanes.reset_all(), vec![3], "3 was ahead: it comes first");
    }
}
