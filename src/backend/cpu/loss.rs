//! The LM head fused with cross-entropy, a chunk of labelled rows at a time.
//!
//! For a row with hidden state h, logits z = W·h, label y:
//!   loss = lse(z) − z_y,   dz = softmax(z) − onehot(y),   dh = Wᵀ·dz.
//! Only rows with a label are multiplied at all, and only `CHUNK × vocab` logits exist at once.

use super::gemm::{gemm, parallelism, MatRef};
use super::pointwise::{exp, max, sum_exp};
use super::pool::BufferPool;
use super::CpuTensor;
use crate::backend::IGNORE_LABEL;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Rows per chunk: 256 × 49152 logits are 48 MiB.
const CHUNK: usize = 256;

pub fn lm_head_cross_entropy(
    h: &CpuTensor,
    w: &CpuTensor,
    labels: &[i32],
    scale: f32,
    row_loss: &mut [f32],
    threads: usize,
    buffers: &BufferPool,
) -> Result<CpuTensor> {
    let (d, vocab) = (h.cols, w.rows);
    let mut labelled = Vec::new();
    for (t, &y) in labels.iter().enumerate() {
        if y == IGNORE_LABEL {
            continue;
        }
        if y < 0 || y as usize >= vocab {
            return Err(Error::InvalidArgument(format!(
                "label {y} at position {t} is outside the vocabulary of {vocab} tokens (use {IGNORE_LABEL} for no loss)"
            )));
        }
        labelled.push(t);
    }
    // Rows without a label get a zero gradient.
    let mut dh = CpuTensor::zeros(buffers, h.rows, d);
    row_loss.fill(0.0);
    let wv = MatRef::new(&w.data, vocab, d);
    // One set of chunk buffers for every chunk (each is overwritten before it is read).
    let most = labelled.len().min(CHUNK);
    let (mut hc, mut z, mut dhc) = (
        buffers.uninit(most * d),
        buffers.uninit(most * vocab),
        buffers.uninit(most * d),
    );
    for rows in labelled.chunks(CHUNK) {
        let m = rows.len();
        let (hc, z, dhc) = (&mut hc[..m * d], &mut z[..m * vocab], &mut dhc[..m * d]);
        for (dst, &t) in hc.chunks_mut(d).zip(rows) {
            dst.copy_from_slice(&h.data[t * d..(t + 1) * d]);
        }
        gemm(
            MatRef::new(hc, m, d),
            wv.t(),
            1.0,
            z,
            vocab,
            false,
            parallelism(m, vocab, d, threads),
        );
        // z ← (softmax(z) − onehot(y)) · scale, row by row; the loss of each row comes back.
        let losses: Vec<f32> = z
            .par_chunks_mut(vocab)
            .zip(rows.par_iter())
            .map(|(zr, &t)| softmax_gradient(zr, labels[t] as usize, scale))
            .collect();
        for (&t, loss) in rows.iter().zip(losses) {
            row_loss[t] = loss;
        }
        gemm(
            MatRef::new(z, m, vocab),
            wv,
            1.0,
            dhc,
            d,
            false,
            parallelism(m, d, vocab, threads),
        );
        for (src, &t) in dhc.chunks(d).zip(rows) {
            dh.data[t * d..(t + 1) * d].copy_from_slice(src);
        }
    }
    Ok(dh)
}

/// Turns the logits `z` of one row into `(softmax(z) − onehot(y)) · scale` in place and
/// returns that row's loss `lse(z) − z_y`, with `lse(z) = max + ln Σ e^(z − max)`.
fn softmax_gradient(z: &mut [f32], y: usize, scale: f32) -> f32 {
    let m = max(z);
    let lse = m as f64 + sum_exp(z, m).ln();
    let loss = (lse - z[y] as f64) as f32;
    let lse = lse as f32;
    for x in z.iter_mut() {
        *x = exp(*x - lse) * scale;
    }
    z[y] -= scale;
    loss
}
