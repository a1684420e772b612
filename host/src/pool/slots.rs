//! The slot bookkeeping of a pool: which slots exist, which are idle, which
//! must go when their unit ends, and which instance each idle slot keeps.
//!
//! Pure (no wasm, no async, no locks of its own), so every rule below is
//! unit-tested on its own; the pool holds it under one mutex and pairs it
//! with a semaphore that has one permit per idle slot.
//!
//! Rules:
//! - slots are numbered from 1 and named `TYPE.N`; a new slot takes the
//!   lowest free number, so after a scale-down and up the names are reused;
//! - idle slots are kept with the lowest numbers on top: a lightly loaded
//!   pool keeps using the same few (warm) slots;
//! - scaling down drops idle slots at once, highest numbers first; a slot
//!   that is busy is counted as *retiring* and dropped when its unit ends,
//!   so no unit in flight is cut short; scaling up cancels pending
//!   retirements before it adds slots;
//! - **an instance is retired** (dropped, never reused) when its unit
//!   failed, when it has served `reuse` units, or when a deploy made its
//!   generation old: a slot hands out only an instance of the current
//!   generation ([`Slot::take_warm`]) and keeps one only after a success
//!   that leaves it under `reuse` ([`Slot::keep`]).

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;

/// A live instance kept in a slot: what it serves, how many units it has
/// served, and the deployment it was created from.
pub(crate) struct Warm<I> {
    /// The instance (in the pool: its store and exports).
    pub(crate) instance: I,
    /// Units it has run to success.
    pub(crate) served: u32,
    /// The deployment's generation it was created from.
    pub(crate) generation: u64,
}

impl<I> Warm<I> {
    /// A new instance of `generation` that has served nothing yet.
    pub(crate) fn new(instance: I, generation: u64) -> Self {
        Warm {
            instance,
            served: 0,
            generation,
        }
    }
}

/// One of the pool's places to run a unit; slot `k` runs instance `TYPE.k`.
pub(crate) struct Slot<I> {
    number: u32,
    name: Arc<str>,
    warm: Option<Warm<I>>,
}

impl<I> Slot<I> {
    /// The instance name (`web.3`).
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether the slot keeps a live instance.
    pub(crate) fn is_warm(&self) -> bool {
        self.warm.is_some()
    }

    /// The kept instance, if it is of `generation`. An instance of an older
    /// generation is dropped here: a deploy retired it.
    pub(crate) fn take_warm(&mut self, generation: u64) -> Option<Warm<I>> {
        self.warm
            .take()
            .filter(|warm| warm.generation == generation)
    }

    /// Keeps `warm` after a unit it ran to success, unless it has now served
    /// `reuse` units, in which case it is retired. Returns whether it was kept.
    pub(crate) fn keep(&mut self, mut warm: Warm<I>, reuse: NonZeroU32) -> bool {
        warm.served += 1;
        if warm.served < reuse.get() {
            self.warm = Some(warm);
            true
        } else {
            false
        }
    }

    /// Puts an instance created ahead of any unit into this slot.
    pub(crate) fn prepare(&mut self, warm: Warm<I>) {
        self.warm = Some(warm);
    }

    /// Moves the slot out of `self`, leaving it without an instance (for a
    /// holder that gives its slot back from `Drop`).
    pub(crate) fn take(&mut self) -> Slot<I> {
        Slot {
            number: self.number,
            name: self.name.clone(),
            warm: self.warm.take(),
        }
    }
}

/// What became of a slot given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Returned {
    /// It is idle again: one more permit.
    Idle,
    /// A scale-down was waiting for it: it is gone.
    Retired,
}

/// The slots of one pool.
pub(crate) struct Slots<I> {
    /// The process type's name, the prefix of slot names.
    prefix: Arc<str>,
    /// The number of slots asked for.
    target: u32,
    /// Busy slots to drop when their unit ends (a scale-down in progress).
    retiring: u32,
    /// The numbers of the slots that exist and are not retiring.
    numbers: BTreeSet<u32>,
    /// Idle slots; the last one is used next.
    idle: Vec<Slot<I>>,
}

impl<I> Slots<I> {
    /// No slots yet, for the process type `prefix`.
    pub(crate) fn new(prefix: &str) -> Self {
        Slots {
            prefix: prefix.into(),
            target: 0,
            retiring: 0,
            numbers: BTreeSet::new(),
            idle: Vec::new(),
        }
    }

    /// The number of slots asked for.
    pub(crate) fn target(&self) -> u32 {
        self.target
    }

    /// Whether a scale-down waits for busy slots to end.
    pub(crate) fn shrinking(&self) -> bool {
        self.retiring > 0
    }

    /// Idle slots that keep a live instance.
    pub(crate) fn warm(&self) -> usize {
        self.idle.iter().filter(|slot| slot.is_warm()).count()
    }

    /// Sets the number of slots. A scale-up adds idle slots and returns how
    /// many (the caller adds as many permits). A scale-down calls
    /// `take_free` once per slot to remove: `true` means the caller took an
    /// idle slot's permit, and the highest-numbered idle slot is dropped
    /// now; `false` means every slot is busy, and one retires when its unit
    /// ends.
    pub(crate) fn scale_to(&mut self, target: u32, mut take_free: impl FnMut() -> bool) -> u32 {
        let old = self.target;
        self.target = target;
        if target <= old {
            for _ in target..old {
                if take_free() {
                    if let Some(i) = (0..self.idle.len()).max_by_key(|&i| self.idle[i].number) {
                        let slot = self.idle.remove(i);
                        self.numbers.remove(&slot.number);
                    }
                } else {
                    self.retiring += 1;
                }
            }
            return 0;
        }
        // Slots still retiring are still here: keep them instead.
        let kept = (target - old).min(self.retiring);
        self.retiring -= kept;
        let added = target - old - kept;
        let mut number = 0;
        for _ in 0..added {
            number = (number + 1..)
                .find(|n| !self.numbers.contains(n))
                .unwrap_or(u32::MAX);
            self.numbers.insert(number);
            self.idle.push(Slot {
                number,
                name: format!("{}.{number}", self.prefix).into(),
                warm: None,
            });
        }
        self.idle.sort_by_key(|slot| Reverse(slot.number));
        added
    }

    /// Takes the next idle slot (the caller holds its permit).
    pub(crate) fn take(&mut self) -> Option<Slot<I>> {
        self.idle.pop()
    }

    /// Takes up to `max` idle slots that keep no instance (to create their
    /// instances ahead of units; the caller holds their permits).
    pub(crate) fn take_cold(&mut self, max: usize) -> Vec<Slot<I>> {
        self.idle
            .extract_if(.., |slot| !slot.is_warm())
            .take(max)
            .collect()
    }

    /// Gives a slot back after its unit.
    pub(crate) fn give_back(&mut self, slot: Slot<I>) -> Returned {
        if self.retiring > 0 {
            self.retiring -= 1;
            self.numbers.remove(&slot.number);
            return Returned::Retired;
        }
        // Back on top: a warm slot is the next one used.
        self.idle.push(slot);
        Returned::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots of `prefix`, scaled to `n`.
    fn scaled<I>(prefix: &str, n: u32) -> Slots<I> {
        let mut slots = Slots::new(prefix);
        assert_eq!(slots.scale_to(n, || unreachable!()), n);
        slots
    }

    fn names<I>(slots: &Slots<I>) -> Vec<String> {
        slots
            .idle
            .iter()
            .rev()
            .map(|s| s.name.to_string())
            .collect()
    }

    #[test]
    fn scaling_up_adds_the_lowest_free_numbers_lowest_on_top() {
        let mut slots = scaled::<()>("web", 3);
        assert_eq!(names(&slots), ["web.1", "web.2", "web.3"]);
        let busy = slots.take().unwrap();
        assert_eq!(busy.name().as_ref(), "web.1");
        assert_eq!(slots.scale_to(4, || unreachable!()), 1);
        assert_eq!(names(&slots), ["web.2", "web.3", "web.4"]);
        assert_eq!(slots.give_back(busy), Returned::Idle);
        assert_eq!(slots.take().unwrap().name().as_ref(), "web.1");
    }

    #[test]
    fn scaling_down_drops_idle_slots_now_and_busy_ones_when_they_end() {
        let mut slots = scaled::<()>("web", 3);
        let one = slots.take().unwrap();
        let two = slots.take().unwrap();
        // Only web.3 is idle: the first removal takes it, the second must wait.
        let mut free = 1;
        let mut take_free = || {
            free -= 1;
            free >= 0
        };
        assert_eq!(slots.scale_to(1, &mut take_free), 0);
        assert!(names(&slots).is_empty());
        assert_eq!(slots.target(), 1);
        assert_eq!(slots.give_back(two), Returned::Retired);
        assert_eq!(slots.give_back(one), Returned::Idle);
        assert_eq!(names(&slots), ["web.1"]);
        // web.2 and web.3 are free numbers again.
        assert_eq!(slots.scale_to(3, || unreachable!()), 2);
        assert_eq!(names(&slots), ["web.1", "web.2", "web.3"]);
    }

    #[test]
    fn scaling_up_during_a_scale_down_keeps_the_retiring_slots() {
        let mut slots = scaled::<()>("w", 2);
        let a = slots.take().unwrap();
        let b = slots.take().unwrap();
        slots.scale_to(0, || false);
        // Both are retiring; scaling back to 2 adds nothing new.
        assert_eq!(slots.scale_to(2, || unreachable!()), 0);
        assert_eq!(slots.give_back(a), Returned::Idle);
        assert_eq!(slots.give_back(b), Returned::Idle);
        // The slot given back last is used next.
        assert_eq!(names(&slots), ["w.2", "w.1"]);
    }

    #[test]
    fn an_instance_is_retired_after_reuse_units() {
        let reuse = NonZeroU32::new(3).unwrap();
        let mut slot = scaled::<&str>("web", 1).take().unwrap();
        let mut warm = Warm::new("instance", 1);
        for unit in 1..=2 {
            assert!(slot.keep(warm, reuse), "kept after unit {unit}");
            warm = slot.take_warm(1).unwrap();
        }
        assert!(!slot.keep(warm, reuse), "retired after its third unit");
        assert!(slot.take_warm(1).is_none());
        // reuse = 1: never kept.
        assert!(!slot.keep(Warm::new("fresh", 1), NonZeroU32::MIN));
    }

    #[test]
    fn a_deploy_retires_instances_of_the_old_generation() {
        let mut slots = scaled::<&str>("web", 2);
        let mut slot = slots.take().unwrap();
        slot.prepare(Warm::new("old", 1));
        assert_eq!(slots.give_back(slot), Returned::Idle);
        assert_eq!(slots.warm(), 1);
        let mut slot = slots.take().unwrap();
        // Generation 2 was deployed meanwhile: the old instance is dropped.
        assert!(slot.take_warm(2).is_none());
        assert!(!slot.is_warm());
    }

    #[test]
    fn cold_slots_are_taken_for_instances_created_ahead() {
        let mut slots = scaled::<&str>("web", 3);
        let mut first = slots.take().unwrap();
        first.prepare(Warm::new("live", 1));
        slots.give_back(first);
        let cold = slots.take_cold(8);
        assert_eq!(cold.len(), 2);
        assert_eq!(slots.warm(), 1);
        for slot in cold {
            slots.give_back(slot);
        }
        assert_eq!(slots.idle.len(), 3);
    }
}
