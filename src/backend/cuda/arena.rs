//! One block of device memory for the allocations of recorded work. Left to the driver, a
//! graph's allocations are backed by memory of their own (allocation nodes from the graph
//! memory pool), which held ~22 % more than the same pass queued op by op allocates at most
//! (bench/NOTES.md). Instead the recording runs twice: a first capture, with ordinary
//! allocations, plans where each allocation would go in one block (first fit over the ranges
//! freed so far, in the order the pass allocates and frees: the order the graph runs them in);
//! then the block is allocated and the kept capture hands out those places. A replay's
//! allocations are the planned places, reused in stream order as the pass reuses memory.

use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Every place starts at a multiple of this many bytes (as device allocations do), so products
/// see the operand alignments they were planned with.
pub const ALIGN: usize = 256;

/// First-fit places of byte ranges in a block, freed ranges merged with their neighbours.
#[derive(Debug, Default)]
pub struct Placement {
    /// Free ranges below `end`, sorted, neither overlapping nor touching.
    free: Vec<Range<usize>>,
    /// The block's size so far: the end of the highest range ever placed.
    end: usize,
    /// Ranges placed and not released.
    live: usize,
}

impl Placement {
    /// The offset of a new range of `bytes` (rounded up to [`ALIGN`]).
    pub fn place(&mut self, bytes: usize) -> usize {
        let bytes = bytes.max(1).next_multiple_of(ALIGN);
        self.live += 1;
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
    pub fn release(&mut self, at: usize, bytes: usize) {
        let range = at..at + bytes.max(1).next_multiple_of(ALIGN);
        self.live -= 1;
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

    /// The bytes the block needs for every range placed so far.
    pub fn size(&self) -> usize {
        self.end
    }

    /// How many ranges are placed and not released.
    pub fn live(&self) -> usize {
        self.live
    }
}

/// The places of one recording's allocations: being planned (`block` None: allocations are
/// ordinary, their places only noted) or handed out in the block at `block`.
#[derive(Debug)]
pub struct Arena {
    placement: Mutex<Placement>,
    block: Option<(u64, usize)>,
}

impl Arena {
    /// An arena whose places are only planned.
    pub fn planning() -> Arc<Self> {
        Arc::new(Arena {
            placement: Mutex::default(),
            block: None,
        })
    }

    /// An arena handing out places in the block of `bytes` at device address `base`.
    pub fn in_block(base: u64, bytes: usize) -> Arc<Self> {
        Arc::new(Arena {
            placement: Mutex::default(),
            block: Some((base, bytes)),
        })
    }

    /// The offset of a new range of `bytes`, and its device address when the arena has a
    /// block; `None` for the address when the block is too small (the recording differs from
    /// its plan).
    pub fn place(&self, bytes: usize) -> (usize, Option<Option<u64>>) {
        let mut p = self.placement.lock().unwrap_or_else(|e| e.into_inner());
        let at = p.place(bytes);
        let address = self
            .block
            .map(|(base, size)| (p.size() <= size).then_some(base + at as u64));
        (at, address)
    }

    pub fn release(&self, at: usize, bytes: usize) {
        self.placement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(at, bytes);
    }

    /// The bytes a block needs for the places planned so far.
    pub fn size(&self) -> usize {
        self.placement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .size()
    }

    /// How many of its allocations are still held.
    pub fn live(&self) -> usize {
        self.placement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ranges_are_reused_first_fit_and_merged() {
        let mut p = Placement::default();
        let a = p.place(100); // rounded to 256
        let b = p.place(1000); // 1024
        let c = p.place(256);
        assert_eq!((a, b, c, p.size()), (0, 256, 1280, 1536));
        p.release(b, 1000);
        // Fits in b's hole: first fit.
        assert_eq!(p.place(512), 256);
        // Does not fit in what is left of the hole (512): goes to the end.
        assert_eq!(p.place(600), 1536);
        assert_eq!(p.size(), 1536 + 768);
        // a, the 512 bytes placed in b's hole and the rest of the hole merge: 0..1280.
        p.release(a, 100);
        p.release(256, 512);
        assert_eq!(p.free, vec![0..1280]);
        assert_eq!(p.place(700), 0);
    }

    #[test]
    fn a_free_range_at_the_end_grows_instead_of_being_skipped() {
        let mut p = Placement::default();
        let a = p.place(256);
        let b = p.place(256);
        p.release(b, 256);
        // b's range ends the block: a larger request extends it rather than starting after it.
        assert_eq!(p.place(1024), b);
        assert_eq!(p.size(), a + 256 + 1024);
    }

    #[test]
    fn releasing_everything_leaves_one_range() {
        let mut p = Placement::default();
        let places: Vec<usize> = (1..20).map(|i| p.place(i * 300)).collect();
        for (i, at) in places.iter().enumerate().rev().step_by(2) {
            p.release(*at, (i + 1) * 300);
        }
        for (i, at) in places.iter().enumerate().skip(1).step_by(2) {
            p.release(*at, (i + 1) * 300);
        }
        assert_eq!(p.free, vec![0..p.size()]);
        assert_eq!(p.live(), 0);
    }
}
