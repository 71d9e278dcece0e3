//! Recycled f32 buffers for the CPU backend.
//!
//! A training step allocates and frees the same few activation shapes layer after layer. Freed to
//! the C library, a large buffer goes back to the operating system (glibc unmaps allocations above
//! its mmap threshold) and its next use faults fresh zero pages in, one 4 KiB page at a time. The
//! pool keeps freed buffers of at least [`MIN_POOLED_VALUES`] values and hands them out again.
//!
//! Bound: the pool's spare buffers plus the pooled buffers in use never exceed the most pooled
//! memory that was in use at once (its high-water mark), so recycling does not raise the peak a
//! step needs; a spare is dropped, oldest first, when a buffer of another size had to be freshly
//! allocated. Spares are freed with the backend.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Buffers smaller than this (64 KiB) come from the allocator directly: the lock would cost more
/// than it saves.
pub const MIN_POOLED_VALUES: usize = 16 * 1024;

/// A spare buffer is reused for a request of `len` values when its capacity is at most
/// `len + len / REUSE_SLACK`, so a large spare is not spent on a small request.
const REUSE_SLACK: usize = 4;

/// The spare buffers of one backend; clones share them.
#[derive(Clone, Default)]
pub struct BufferPool {
    shared: Arc<Mutex<Spares>>,
}

#[derive(Default)]
struct Spares {
    /// Oldest first.
    buffers: Vec<Vec<f32>>,
    /// Capacity (in values) of `buffers`.
    spare: usize,
    /// Capacity of the pooled buffers in use.
    live: usize,
    /// The most `live` has been.
    high_water: usize,
}

impl BufferPool {
    /// A buffer of `len` values whose contents are unspecified (the caller overwrites them all):
    /// a recycled buffer keeps its old values. Debug builds fill it with NaN, so a test that
    /// reads a value nobody wrote fails.
    pub fn uninit(&self, len: usize) -> Buffer {
        let mut b = self.take(len);
        if cfg!(debug_assertions) {
            b.fill(f32::NAN);
        }
        b
    }

    /// A buffer of `len` values, recycled when one fits.
    fn take(&self, len: usize) -> Buffer {
        if len < MIN_POOLED_VALUES {
            return Buffer::unpooled(vec![0.0; len]);
        }
        let mut s = self.lock();
        let best = s
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| (len..=len + len / REUSE_SLACK).contains(&b.capacity()))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let mut values = match best {
            Some(i) => {
                let b = s.buffers.remove(i);
                s.spare -= b.capacity();
                b
            }
            None => vec![0.0; len],
        };
        values.resize(len, 0.0);
        s.live += values.capacity();
        s.high_water = s.high_water.max(s.live);
        Buffer {
            counted: values.capacity(),
            values,
            pool: Arc::downgrade(&self.shared),
        }
    }

    /// A buffer of `len` zeros.
    pub fn zeroed(&self, len: usize) -> Buffer {
        let mut b = self.take(len);
        b.fill(0.0);
        b
    }

    /// A buffer holding a copy of `values`.
    pub fn copy_of(&self, values: &[f32]) -> Buffer {
        let mut b = self.take(values.len());
        b.copy_from_slice(values);
        b
    }

    fn lock(&self) -> MutexGuard<'_, Spares> {
        lock(&self.shared)
    }
}

/// The spares stay consistent whatever a panicking holder did (each update is a few integer
/// operations), so a poisoned lock is taken over.
fn lock(m: &Mutex<Spares>) -> MutexGuard<'_, Spares> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Spares {
    /// Takes back a buffer that was counted as `counted` values in use.
    fn give(&mut self, values: Vec<f32>, counted: usize) {
        self.live -= counted;
        self.spare += values.capacity();
        self.buffers.push(values);
        while self.spare + self.live > self.high_water {
            let oldest = self.buffers.remove(0);
            self.spare -= oldest.capacity();
        }
    }
}

/// The values of a CPU tensor: a `Vec<f32>` that goes back to its pool when dropped.
#[derive(Debug, Default)]
pub struct Buffer {
    values: Vec<f32>,
    /// Capacity counted as in use by the pool when the buffer was handed out.
    counted: usize,
    /// Empty for a buffer from the allocator.
    pool: Weak<Mutex<Spares>>,
}

impl Buffer {
    /// A buffer that is freed, not recycled, when dropped.
    pub fn unpooled(values: Vec<f32>) -> Self {
        Buffer {
            values,
            counted: 0,
            pool: Weak::new(),
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            lock(&pool).give(std::mem::take(&mut self.values), self.counted);
        }
    }
}

impl Clone for Buffer {
    /// A copy from the same pool.
    fn clone(&self) -> Self {
        match self.pool.upgrade() {
            Some(shared) => BufferPool { shared }.copy_of(&self.values),
            None => Buffer::unpooled(self.values.clone()),
        }
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Self) -> bool {
        self.values == other.values
    }
}

impl Deref for Buffer {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.values
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.values
    }
}

impl<'a> IntoIterator for &'a Buffer {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.values.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: usize = MIN_POOLED_VALUES;

    #[test]
    fn a_freed_buffer_is_handed_out_again_with_its_storage() {
        let pool = BufferPool::default();
        let mut a = pool.uninit(2 * N);
        a[0] = 7.0;
        let addr = a.as_ptr();
        drop(a);
        assert_eq!(pool.lock().spare, 2 * N);
        let b = pool.take(2 * N - 5);
        assert_eq!((b.as_ptr(), b.len(), b[0]), (addr, 2 * N - 5, 7.0));
        assert_eq!(pool.lock().spare, 0);
        let z = {
            drop(b);
            pool.zeroed(2 * N)
        };
        assert!(z.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn uninit_buffers_are_poisoned_in_debug_builds() {
        let pool = BufferPool::default();
        for len in [3, 2 * N] {
            let b = pool.uninit(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.iter().all(|x| x.is_nan()), cfg!(debug_assertions));
        }
    }

    #[test]
    fn a_spare_much_larger_than_the_request_is_kept_for_later() {
        let pool = BufferPool::default();
        drop(pool.uninit(4 * N));
        let small = pool.uninit(N);
        assert_eq!(pool.lock().spare, 4 * N, "the large spare stays");
        drop(small);
    }

    #[test]
    fn spares_never_take_the_pool_past_its_high_water_mark() {
        let pool = BufferPool::default();
        let (a, b) = (pool.uninit(3 * N), pool.uninit(3 * N));
        drop((a, b));
        assert_eq!(pool.lock().spare, 6 * N);
        // A request no spare fits: a fresh buffer, so 6N spare + 2N live > 6N high water; the
        // oldest spare goes when the new buffer comes back.
        let c = pool.uninit(N * 2);
        drop(c);
        assert_eq!(pool.lock().spare, 3 * N + 2 * N);
    }

    #[test]
    fn threads_taking_and_returning_buffers_keep_the_account() {
        let pool = BufferPool::default();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let pool = &pool;
                scope.spawn(move || {
                    for i in 0..200 {
                        let len = N * (1 + (i + t) % 3) + i;
                        let mut b = pool.uninit(len);
                        b[len - 1] = t as f32;
                        let kept = (i % 5 == 0).then(|| pool.zeroed(len / 2 + N));
                        assert_eq!(b[len - 1], t as f32);
                        drop((b, kept));
                    }
                });
            }
        });
        let s = pool.lock();
        assert_eq!(s.live, 0, "every buffer came back");
        assert_eq!(s.spare, s.buffers.iter().map(Vec::capacity).sum::<usize>());
        assert!(
            s.spare <= s.high_water,
            "{} spare > {}",
            s.spare,
            s.high_water
        );
    }

    #[test]
    fn small_and_orphaned_buffers_are_plain_allocations() {
        let pool = BufferPool::default();
        drop(pool.uninit(N - 1));
        assert_eq!(pool.lock().spare, 0);
        let kept = pool.copy_of(&vec![1.5; N]);
        let twin = kept.clone();
        assert_eq!(kept, twin);
        drop(pool);
        drop(kept); // the pool is gone: freed, not recycled
        assert_eq!(twin[N - 1], 1.5);
    }
}
