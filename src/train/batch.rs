//! A batch of token sequences as the trainer takes it, in host memory.

use crate::backend::{Backend, IGNORE_LABEL};
use crate::error::{Error, Result};
use crate::model::decoder::DeviceBatch;

/// `batch_size` rows of `seq_len` tokens, flattened row by row.
///
/// `labels[t]` is the token that should follow position t (already shifted), or
/// [`IGNORE_LABEL`] for no loss there. `positions` restart and `segments` change where packed
/// examples meet, so attention never crosses from one example into another.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub positions: Vec<i32>,
    pub segments: Vec<i32>,
}

impl Batch {
    /// A batch of unpacked rows: positions 0..seq_len, one segment a row.
    pub fn new(
        batch_size: usize,
        seq_len: usize,
        input_ids: Vec<i32>,
        labels: Vec<i32>,
    ) -> Result<Self> {
        let n = batch_size * seq_len;
        if batch_size == 0 || seq_len == 0 || input_ids.len() != n || labels.len() != n {
            return Err(Error::InvalidArgument(format!(
                "a batch of {batch_size} x {seq_len} needs {n} token ids and labels, got {} and {}",
                input_ids.len(),
                labels.len()
            )));
        }
        Ok(Batch {
            batch_size,
            seq_len,
            input_ids,
            labels,
            positions: (0..n).map(|t| (t % seq_len) as i32).collect(),
            segments: vec![0; n],
        })
    }

    /// Causal language modelling on whole sequences: each row is padded to the longest (pad id 0,
    /// no loss), and the label of position i is token i+1.
    pub fn from_sequences(seqs: &[Vec<i32>]) -> Result<Self> {
        let seq_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * seq_len);
        let mut labels = Vec::with_capacity(seqs.len() * seq_len);
        for s in seqs {
            for i in 0..seq_len {
                ids.push(s.get(i).copied().unwrap_or(0));
                labels.push(s.get(i + 1).copied().unwrap_or(IGNORE_LABEL));
            }
        }
        Self::new(seqs.len(), seq_len, ids, labels)
    }

    /// Rank `rank`'s share of the rows when `world_size` ranks split this batch: contiguous
    /// rows, the counts differing by at most one. None
    /// when the share is empty (fewer rows than ranks).
    pub fn share(&self, rank: usize, world_size: usize) -> Option<Batch> {
        let (start, end) = (
            rank * self.batch_size / world_size,
            (rank + 1) * self.batch_size / world_size,
        );
        if start == end {
            return None;
        }
        let span = start * self.seq_len..end * self.seq_len;
        Some(Batch {
            batch_size: end - start,
            seq_len: self.seq_len,
            input_ids: self.input_ids[span.clone()].to_vec(),
            labels: self.labels[span.clone()].to_vec(),
            positions: self.positions[span.clone()].to_vec(),
            segments: self.segments[span].to_vec(),
        })
    }

    /// Rows with a label.
    pub fn labelled(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_LABEL).count()
    }

    /// Checks every id and label against the vocabulary, naming the first bad one.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let n = self.batch_size * self.seq_len;
        if [
            self.input_ids.len(),
            self.labels.len(),
            self.positions.len(),
            self.segments.len(),
        ]
        .iter()
        .any(|&l| l != n)
        {
            return Err(Error::InvalidArgument(format!(
                "batch of {} x {}: input_ids, labels, positions and segments must each hold {n} values",
                self.batch_size, self.seq_len
            )));
        }
        let in_vocab = |x: i32| x >= 0 && (x as usize) < vocab;
        if let Some(t) = self.input_ids.iter().position(|&x| !in_vocab(x)) {
            return Err(Error::InvalidArgument(format!(
                "token id {} at position {t} is outside the vocabulary of {vocab} tokens",
                self.input_ids[t]
            )));
        }
        if let Some(t) = self
            .labels
            .iter()
            .position(|&x| x != IGNORE_LABEL && !in_vocab(x))
        {
            return Err(Error::InvalidArgument(format!(
                "label {} at position {t} is outside the vocabulary of {vocab} tokens (use {IGNORE_LABEL} for no loss)",
                self.labels[t]
            )));
        }
        if let Some(t) = self.positions.iter().position(|&p| p < 0) {
            return Err(Error::InvalidArgument(format!(
                "negative position at row {t}"
            )));
        }
        Ok(())
    }

    /// Validates the batch and writes it into `dst`, a batch of the same shape already on the
    /// backend (its buffers stay where they are).
    pub fn write_into<B: Backend>(
        &self,
        backend: &B,
        vocab: usize,
        dst: &mut DeviceBatch<B>,
    ) -> Result<()> {
        self.validate(vocab)?;
        if (dst.batch, dst.seq) != (self.batch_size, self.seq_len) {
            return Err(Error::InvalidArgument(format!(
                "a batch of {} x {} cannot be written over one of {} x {}",
                self.batch_size, self.seq_len, dst.batch, dst.seq
            )));
        }
        backend.write_ints(&mut dst.ids, &self.input_ids)?;
        backend.write_ints(&mut dst.labels, &self.labels)?;
        backend.write_ints(&mut dst.positions, &self.positions)?;
        backend.write_ints(&mut dst.segments, &self.segments)?;
        dst.labelled = self.labelled();
        Ok(())
    }

    /// Validates and copies the batch to a backend.
    pub fn upload<B: Backend>(&self, backend: &B, vocab: usize) -> Result<DeviceBatch<B>> {
        self.validate(vocab)?;
        Ok(DeviceBatch {
            batch: self.batch_size,
            seq: self.seq_len,
            ids: backend.upload_ints(&self.input_ids)?,
            labels: backend.upload_ints(&self.labels)?,
            positions: backend.upload_ints(&self.positions)?,
            segments: backend.upload_ints(&self.segments)?,
            labelled: self.labelled(),
        })
    }
}
