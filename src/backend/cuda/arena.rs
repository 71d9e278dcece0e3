//! One block of device memory for the allocations of recorded work. Left to the driver, a
//! graph's allocations are backed by memory of their own (allocation nodes from the graph
//! memory pool), which held ~22 % more than the same pass queued op by op allocates at most
//! (bench/NOTES.md). Instead the recording runs twice. The first capture, with ordinary
//! allocations, notes each allocation's size and lifetime (a [`Trace`]); from the whole trace a
//! [`Plan`] gives each allocation its offset in one block, no two allocations alive at the same
//! time overlapping; then the block is allocated and the kept capture, which allocates the same
//! sizes in the same order, is handed those offsets. A replay's allocations are the planned
//! places, reused in stream order as the pass reuses memory.
//!
//! Knowing every lifetime in advance, the plan does better than an allocator that must answer
//! each request as it comes: it places the largest allocations first, each in the tightest gap
//! left by those already placed that overlap it in time ("greedy by size"), and keeps the
//! first-fit placement in allocation order instead when that needs the smaller block.

use super::lock;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// Every place starts at a multiple of this many bytes (as device allocations do), so products
/// see the operand alignments they were planned with.
pub const ALIGN: usize = 256;

/// The most allocations the greedy placement plans: it compares each allocation with those
/// placed before it that started earlier, so its time grows with the square of their number
/// (~0.1 s for 20,000 here, ~0.7 s for 50,000), and a very long sequence's step makes hundreds
/// of thousands (its MLP chunks). Longer traces get first fit.
const GREEDY_MAX_ALLOCATIONS: usize = 50_000;

/// `bytes` as the arena places them: at least 1, rounded up to [`ALIGN`].
fn placed_bytes(bytes: usize) -> usize {
    bytes.max(1).next_multiple_of(ALIGN)
}

/// First-fit places of byte ranges in a block, freed ranges merged with their neighbours.
#[derive(Debug, Default)]
struct FirstFit {
    /// Free ranges below `end`, sorted, neither overlapping nor touching.
    free: Vec<Range<usize>>,
    /// The block's size so far: the end of the highest range ever placed.
    end: usize,
}

impl FirstFit {
    /// The offset of a new range of `bytes` (a multiple of [`ALIGN`]).
    fn place(&mut self, bytes: usize) -> usize {
        if let Some(i) = self.free.iter().position(|r| r.len() >= bytes) {
            let at = self.free[i].start;
            self.free[i].start += bytes;
            if self.free[i].is_empty() {
                self.free.remove(i);
            }
            return at;
        }
        // The last free range, if it ends the block, is extended instead of left behind.
        let at = match self.free.last() {
            Some(r) if r.end == self.end => self.free.pop().expect("just seen").start,
            _ => self.end,
        };
        self.end = at + bytes;
        at
    }

    /// Frees the range of `bytes` placed at `at`.
    fn release(&mut self, at: usize, bytes: usize) {
        let range = at..at + bytes;
        let i = self.free.partition_point(|r| r.end <= range.start);
        self.free.insert(i, range);
        // Merge with the next range, then with the previous one.
        if i + 1 < self.free.len() && self.free[i].end == self.free[i + 1].start {
            self.free[i].end = self.free.remove(i + 1).end;
        }
        if i > 0 && self.free[i - 1].end == self.free[i].start {
            self.free[i - 1].end = self.free.remove(i).end;
        }
    }
}

/// The allocations of one capture, in the order they were made: size (placed bytes) and
/// lifetime, in ticks of a clock that advances at every allocation and release.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    sizes: Vec<usize>,
    lifetimes: Vec<Range<u64>>,
    clock: u64,
}

impl Trace {
    /// Notes an allocation of `bytes`; returns its index.
    fn allocate(&mut self, bytes: usize) -> usize {
        self.clock += 1;
        self.sizes.push(placed_bytes(bytes));
        // Until released, it lives to the end.
        self.lifetimes.push(self.clock..u64::MAX);
        self.sizes.len() - 1
    }

    /// How many allocations are not released.
    fn unreleased(&self) -> usize {
        self.lifetimes.iter().filter(|l| l.end == u64::MAX).count()
    }

    /// Notes the release of allocation `index`.
    fn release(&mut self, index: usize) {
        self.clock += 1;
        self.lifetimes[index].end = self.clock;
    }

    /// The most bytes alive at once: no plan's block can be smaller.
    fn live_peak(&self) -> usize {
        let mut events: Vec<(u64, isize)> = Vec::with_capacity(2 * self.sizes.len());
        for (life, &bytes) in self.lifetimes.iter().zip(&self.sizes) {
            events.push((life.start, bytes as isize));
            events.push((life.end, -(bytes as isize)));
        }
        events.sort_unstable();
        let (mut live, mut peak) = (0isize, 0isize);
        for (_, delta) in events {
            live += delta;
            peak = peak.max(live);
        }
        peak as usize
    }

    /// Offsets in allocation order as a first-fit allocator answering each request as it comes
    /// would give them.
    fn first_fit(&self) -> Vec<usize> {
        let mut events: Vec<(u64, usize)> = Vec::with_capacity(2 * self.sizes.len());
        for (i, life) in self.lifetimes.iter().enumerate() {
            events.push((life.start, i));
            if life.end != u64::MAX {
                events.push((life.end, i));
            }
        }
        events.sort_unstable();
        let mut fit = FirstFit::default();
        let mut offsets = vec![0; self.sizes.len()];
        for (t, i) in events {
            if t == self.lifetimes[i].start {
                offsets[i] = fit.place(self.sizes[i]);
            } else {
                fit.release(offsets[i], self.sizes[i]);
            }
        }
        offsets
    }

    /// Offsets in allocation order, placed largest first (ties: earliest first), each at the
    /// start of the smallest gap that holds it between the allocations already placed that
    /// are alive at the same time, or above them all when no gap does.
    fn greedy_by_size(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.sizes.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(self.sizes[i]), i));
        // Placed allocations, sorted by the start of their lifetime: (index, offset).
        let mut placed: Vec<(usize, usize)> = Vec::with_capacity(order.len());
        let mut offsets = vec![0; self.sizes.len()];
        let mut overlapping: Vec<Range<usize>> = Vec::new();
        for i in order {
            let (life, bytes) = (&self.lifetimes[i], self.sizes[i]);
            // Those alive during `life`: started before it ends and ending after it starts.
            let started = placed.partition_point(|&(j, _)| self.lifetimes[j].start < life.end);
            overlapping.clear();
            overlapping.extend(
                placed[..started]
                    .iter()
                    .filter(|&&(j, _)| self.lifetimes[j].end > life.start)
                    .map(|&(j, at)| at..at + self.sizes[j]),
            );
            overlapping.sort_unstable_by_key(|r| r.start);
            let (mut best, mut top) = (None::<Range<usize>>, 0);
            for r in &overlapping {
                if r.start >= top + bytes && best.as_ref().is_none_or(|b| r.start - top < b.len()) {
                    best = Some(top..r.start);
                }
                top = top.max(r.end);
            }
            offsets[i] = best.map_or(top, |gap| gap.start);
            let at = placed.partition_point(|&(j, _)| self.lifetimes[j].start < life.start);
            placed.insert(at, (i, offsets[i]));
        }
        offsets
    }

    /// The plan of the two placements that needs the smaller block; first fit alone past
    /// [`GREEDY_MAX_ALLOCATIONS`].
    pub fn plan(&self) -> Plan {
        let size = |offsets: &[usize]| {
            offsets
                .iter()
                .zip(&self.sizes)
                .map(|(at, bytes)| at + bytes)
                .max()
                .unwrap_or(0)
        };
        let mut offsets = self.first_fit();
        if self.sizes.len() <= GREEDY_MAX_ALLOCATIONS {
            let greedy = self.greedy_by_size();
            if size(&greedy) <= size(&offsets) {
                offsets = greedy;
            }
        }
        Plan {
            size: size(&offsets),
            offsets,
            trace: self.clone(),
        }
    }
}

/// Where each allocation of a traced capture goes in one block.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The capture planned for.
    trace: Trace,
    /// Per allocation, in the order made.
    offsets: Vec<usize>,
    /// The bytes the block needs.
    size: usize,
}

impl Plan {
    /// The bytes the block needs.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The most bytes the capture had alive at once: what the block holds beyond it is the
    /// placement's loss.
    pub fn live_peak(&self) -> usize {
        self.trace.live_peak()
    }

    /// How many allocations the capture made.
    pub fn allocations(&self) -> usize {
        self.trace.sizes.len()
    }
}

/// A block and the plan its places are handed out by.
#[derive(Debug)]
struct Block {
    base: u64,
    plan: Plan,
    /// Whether the allocations so far have the planned sizes and lifetimes.
    follows_plan: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// The allocations so far.
    trace: Trace,
    /// Set when the places are handed out in a block.
    block: Option<Block>,
}

/// The places of one recording's allocations. The first capture's are only traced (its
/// allocations are ordinary); the kept capture's are handed out in a block as planned, and
/// traced too, to check that they come in the planned order and sizes and are released when
/// planned (else places alive at once could overlap).
#[derive(Debug)]
pub struct Arena {
    inner: Mutex<Inner>,
}

impl Arena {
    /// An arena that traces the allocations of a first capture.
    pub fn tracing() -> Arc<Self> {
        Arc::new(Arena {
            inner: Mutex::default(),
        })
    }

    /// An arena handing out the places of `plan` in the block at device address `base`.
    pub fn in_block(base: u64, plan: Plan) -> Arc<Self> {
        let block = Block {
            base,
            plan,
            follows_plan: true,
        };
        Arc::new(Arena {
            inner: Mutex::new(Inner {
                block: Some(block),
                ..Inner::default()
            }),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// A new allocation of `bytes`: its key (passed back to [`Arena::release`]) and, when the
    /// arena places in a block, its device address, `None` once the allocations differ from
    /// the plan's (the recording differs from its first capture).
    pub fn place(&self, bytes: usize) -> (usize, Option<Option<u64>>) {
        let inner = &mut *self.inner();
        let i = inner.trace.allocate(bytes);
        let Some(block) = &mut inner.block else {
            return (i, None);
        };
        let planned = &block.plan.trace;
        block.follows_plan &= planned.sizes.get(i) == Some(&inner.trace.sizes[i])
            && planned.lifetimes[i].start == inner.trace.lifetimes[i].start;
        let address = block.base + block.plan.offsets.get(i).copied().unwrap_or(0) as u64;
        (i, Some(block.follows_plan.then_some(address)))
    }

    /// Releases the allocation `key` of [`Arena::place`].
    pub fn release(&self, key: usize) {
        let inner = &mut *self.inner();
        inner.trace.release(key);
        if let Some(block) = &mut inner.block {
            let planned = block.plan.trace.lifetimes.get(key).map(|l| l.end);
            block.follows_plan &= planned == Some(inner.trace.lifetimes[key].end);
        }
    }

    /// The plan of the allocations traced so far.
    pub fn plan(&self) -> Plan {
        self.inner().trace.plan()
    }

    /// Whether every allocation so far came and went as planned (true when not in a block).
    pub fn follows_plan(&self) -> bool {
        self.inner().block.as_ref().is_none_or(|b| b.follows_plan)
    }

    /// How many of its allocations are still held.
    pub fn live(&self) -> usize {
        self.inner().trace.unreleased()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn first_fit_reuses_freed_ranges_and_merges_them() {
        let mut f = FirstFit::default();
        let (a, b, c) = (f.place(256), f.place(1024), f.place(256));
        assert_eq!((a, b, c, f.end), (0, 256, 1280, 1536));
        f.release(b, 1024);
        // Fits in b's hole: first fit.
        assert_eq!(f.place(512), 256);
        // Does not fit in what is left of the hole (512): goes to the end.
        assert_eq!(f.place(768), 1536);
        // a, the 512 bytes placed in b's hole and the rest of the hole merge: 0..1280.
        f.release(a, 256);
        f.release(256, 512);
        assert_eq!(f.free, vec![0..1280]);
        // A free range ending the block grows instead of being skipped.
        f.release(1536, 768);
        assert_eq!(f.place(4096), 1536);
    }

    /// Every pair of allocations alive at the same time lies apart in the block of `size`.
    fn assert_disjoint(trace: &Trace, offsets: &[usize], size: usize) {
        let placed: Vec<_> = (0..offsets.len())
            .map(|i| (&trace.lifetimes[i], offsets[i]..offsets[i] + trace.sizes[i]))
            .collect();
        for (i, (li, ri)) in placed.iter().enumerate() {
            assert!(ri.end <= size, "allocation {i} ends past the block");
            assert_eq!(ri.start % ALIGN, 0);
            for (j, (lj, rj)) in placed[..i].iter().enumerate() {
                let together = li.start < lj.end && lj.start < li.end;
                let apart = ri.end <= rj.start || rj.end <= ri.start;
                assert!(!together || apart, "allocations {j} and {i} overlap");
            }
        }
    }

    #[test]
    fn placing_largest_first_fills_the_hole_first_fit_leaves() {
        // a and d live long; b's hole between them (256 bytes) is too small for c, so first
        // fit puts c above them.
        let mut t = Trace::default();
        let a = t.allocate(256);
        let b = t.allocate(256);
        let d = t.allocate(256);
        t.release(b);
        let c = t.allocate(512);
        for i in [c, d, a] {
            t.release(i);
        }
        assert_eq!(t.first_fit(), vec![0, 256, 512, 768]);
        // Largest first: c at 0, a above it, b (gone before c came) in c's place, d on top.
        let plan = t.plan();
        assert_eq!(plan.offsets, vec![512, 0, 768, 0]);
        assert_eq!(
            (plan.size(), plan.live_peak(), plan.allocations()),
            (1024, 1024, 4)
        );
    }

    #[test]
    fn very_long_traces_are_placed_first_fit() {
        let mut t = Trace::default();
        let keep = t.allocate(256);
        for i in 0..GREEDY_MAX_ALLOCATIONS {
            let a = t.allocate(256 * (1 + i % 7));
            t.release(a);
        }
        t.release(keep);
        assert_eq!(t.plan().offsets, t.first_fit());
    }

    #[test]
    fn plans_of_random_passes_never_overlap_live_allocations() {
        let mut rng = Rng::new(7);
        for pass in 0..40 {
            let mut t = Trace::default();
            let mut alive: Vec<usize> = Vec::new();
            for _ in 0..300 {
                if !alive.is_empty() && rng.next_u64() % 3 == 0 {
                    let k = (rng.next_u64() as usize) % alive.len();
                    t.release(alive.swap_remove(k));
                } else {
                    // Mostly small, now and then large, like activations and their copies.
                    let scale = [64, 4096, 1 << 20][(rng.next_u64() % 3) as usize];
                    alive.push(t.allocate(1 + (rng.next_u64() as usize) % scale));
                }
            }
            // Some stay alive to the end of the pass.
            let (greedy, first_fit, plan) = (t.greedy_by_size(), t.first_fit(), t.plan());
            let size = |o: &[usize]| (0..o.len()).map(|i| o[i] + t.sizes[i]).max().unwrap();
            assert_disjoint(&t, &greedy, size(&greedy));
            assert_disjoint(&t, &first_fit, size(&first_fit));
            assert_disjoint(&t, &plan.offsets, plan.size());
            assert_eq!(
                plan.size(),
                size(&greedy).min(size(&first_fit)),
                "pass {pass}"
            );
            assert!(plan.size() >= t.live_peak());
        }
    }

    #[test]
    fn the_kept_capture_gets_the_planned_places_while_it_follows_the_plan() {
        let first = Arena::tracing();
        let (a, _) = first.place(1000);
        let (b, _) = first.place(300);
        first.release(a);
        let (c, _) = first.place(700);
        first.release(b);
        first.release(c);
        assert_eq!(first.live(), 0);
        let plan = first.plan();
        let offsets = plan.offsets.clone();
        // The same allocations: the planned addresses.
        let kept = Arena::in_block(1 << 20, plan.clone());
        let address = |(_, a): (usize, Option<Option<u64>>)| a.expect("in a block");
        let a = kept.place(1000);
        assert_eq!(address(a), Some((1 << 20) + offsets[0] as u64));
        kept.place(300);
        kept.release(a.0);
        assert_eq!(
            address(kept.place(700)),
            Some((1 << 20) + offsets[2] as u64)
        );
        assert!(kept.follows_plan());
        // Released later than planned: the places can no longer be trusted.
        let late = Arena::in_block(0, plan.clone());
        let (a, _) = late.place(1000);
        let _b = late.place(300);
        late.place(700);
        late.release(a);
        assert!(!late.follows_plan());
        // Another size: no address.
        let other = Arena::in_block(0, plan);
        assert_eq!(address(other.place(1000)), Some(offsets[0] as u64));
        assert_eq!(address(other.place(2000)), None);
    }
}
