//! The output projection kept in host memory, brought to the device a chunk of rows at a time
//! as the loss reads it (`lm_head_cross_entropy` goes over the vocabulary in chunks).
//!
//! A queue holds the copies on their way: starting it queues the first few chunks, and taking a
//! chunk queues the one that many further, so the device holds at most `ahead + 1` chunks of the
//! head instead of the whole (1.5 GiB on Gemma 7B). A pass starts the queue beside its last
//! layers (`Backend::bring_to_device`), so that the first chunks' copies overlap them; the loss
//! takes the rest while it computes. Each chunk is a fresh pool buffer freed in stream order after
//! the products that read it; a copy waits for the compute queued before it, so a buffer that
//! reuses a freed chunk's memory is written only after that chunk's products ran.

use super::device::Gpu;
use super::host_table::HostTable;
use super::offload::Offload;
use super::tensor::Arrival;
use crate::error::Result;
use std::collections::VecDeque;

/// Rows of the head in one chunk (the loss's vocabulary chunk): 32 MiB of bf16 at hidden 4096,
/// and 8192 × 4096 f32 logits (128 MiB) for 8192 rows of tokens. Its products keep inner and
/// outer dimensions of 4096 (full speed); the chunk and the logits are device memory at the
/// step's peak (the loss, where every kept activation is alive).
pub const HEAD_CHUNK_ROWS: usize = 4096;

/// Bytes of chunks queued ahead of the one being read (rounded down to whole chunks, at least
/// one): three chunks at hidden 4096, ~2 ms of copies, while a chunk's products take ~1 ms at
/// 8192 tokens and its copy ~0.7 ms.
const HEAD_AHEAD_BYTES: usize = 96 << 20;

/// What the device memory account calls a chunk's buffer.
const CHUNK_PURPOSE: &str = "a chunk of the LM head on the device";

/// The chunks of a `[rows, cols]` host table on their way to the device, in row order.
#[derive(Debug)]
pub struct HeadChunks {
    rows: usize,
    cols: usize,
    /// Chunks queued ahead of the one being read.
    ahead: usize,
    /// The first row of the next chunk to queue.
    next_copy: usize,
    /// The first row of each queued chunk and its copy, oldest first.
    queued: VecDeque<(usize, Arrival<u16>)>,
}

/// One chunk: its first row, its row count and its device copy (the compute stream waits for the
/// copy when it is first read).
pub(super) struct HeadChunk {
    pub first_row: usize,
    pub rows: usize,
    pub copy: Arrival<u16>,
}

impl HeadChunks {
    /// Starts bringing over the first chunks of `table` (`[rows, cols]` bf16).
    pub(super) fn start(
        offload: &Offload,
        gpu: &Gpu,
        table: &HostTable,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let chunk_bytes = HEAD_CHUNK_ROWS * cols.max(1) * std::mem::size_of::<u16>();
        let mut q = HeadChunks {
            rows,
            cols,
            ahead: (HEAD_AHEAD_BYTES / chunk_bytes).max(1),
            next_copy: 0,
            queued: VecDeque::new(),
        };
        for _ in 0..q.ahead {
            q.queue_next(offload, gpu, table)?;
        }
        Ok(q)
    }

    /// The next chunk in row order (None after the last), queueing the copy of the chunk
    /// `ahead` further.
    pub(super) fn next(
        &mut self,
        offload: &Offload,
        gpu: &Gpu,
        table: &HostTable,
    ) -> Result<Option<HeadChunk>> {
        let Some((first_row, copy)) = self.queued.pop_front() else {
            return Ok(None);
        };
        self.queue_next(offload, gpu, table)?;
        Ok(Some(HeadChunk {
            first_row,
            rows: HEAD_CHUNK_ROWS.min(self.rows - first_row),
            copy,
        }))
    }

    fn queue_next(&mut self, offload: &Offload, gpu: &Gpu, table: &HostTable) -> Result<()> {
        if self.next_copy >= self.rows {
            return Ok(());
        }
        let first = self.next_copy;
        let end = (first + HEAD_CHUNK_ROWS).min(self.rows);
        let copy = offload.fetch_table(
            gpu,
            table,
            first * self.cols..end * self.cols,
            CHUNK_PURPOSE,
        )?;
        self.queued.push_back((first, copy));
        self.next_copy = end;
        Ok(())
    }
}
