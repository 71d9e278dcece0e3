//! Causal grouped-query attention on the CPU, one (sequence, head) score matrix at a time.
//!
//! Forward, per head with scale c = 1/sqrt(head_dim):
//!   S = c·Q·Kᵀ (masked: j > i or another segment → −∞), lse_i = log Σ_j exp S_ij,
//!   P = exp(S − lse), O = P·V.
//! Backward, with D_i = Σ_d dO_id·O_id:
//!   dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − D), dQ = c·dS·K, dK = c·dSᵀ·Q.
//! Query heads h share KV head h / (heads / kv_heads); their dK and dV add up.

use super::gemm::{gemm, MatRef};
use super::CpuTensor;
use crate::backend::AttentionShape;
use crate::error::{Error, Result};
use gemm::Parallelism;
use rayon::prelude::*;

pub fn check_shapes(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    segments: &[i32],
    s: AttentionShape,
) -> Result<()> {
    let tokens = s.batch * s.seq;
    let ok = s.num_kv_heads > 0
        && s.num_heads % s.num_kv_heads == 0
        && (q.rows, q.cols) == (tokens, s.num_heads * s.head_dim)
        && (k.rows, k.cols) == (tokens, s.num_kv_heads * s.head_dim)
        && (v.rows, v.cols) == (k.rows, k.cols)
        && segments.len() == tokens;
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "attention shapes: q [{}, {}], k [{}, {}], v [{}, {}], {} segment ids for {s:?}",
            q.rows,
            q.cols,
            k.rows,
            k.cols,
            v.rows,
            v.cols,
            segments.len()
        )))
    }
}

/// Per-sequence views into the packed row-major tensors.
struct HeadViews<'a> {
    s: AttentionShape,
    seq_start: usize,
    segments: &'a [i32],
}

impl<'a> HeadViews<'a> {
    fn new(s: AttentionShape, b: usize, segments: &'a [i32]) -> Self {
        let seq_start = b * s.seq;
        HeadViews {
            s,
            seq_start,
            segments: &segments[seq_start..seq_start + s.seq],
        }
    }

    /// Head `h` of a `[tokens, heads·head_dim]` tensor, restricted to this sequence: `[seq, head_dim]`.
    fn head<'t>(&self, t: &'t CpuTensor, h: usize) -> MatRef<'t> {
        let d = self.s.head_dim;
        MatRef::strided(
            &t.data[self.seq_start * t.cols + h * d..],
            self.s.seq,
            d,
            t.cols,
        )
    }

    fn visible(&self, i: usize, j: usize) -> bool {
        j <= i && self.segments[i] == self.segments[j]
    }

    /// P = softmax(c·Q·Kᵀ) with the mask applied, and the log-sum-exp of each row (if not given).
    fn probabilities(&self, q: MatRef, k: MatRef, lse: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
        let n = self.s.seq;
        let c = 1.0 / (self.s.head_dim as f32).sqrt();
        let mut p = vec![0.0f32; n * n];
        gemm(q, k.t(), c, &mut p, n, false, Parallelism::None);
        let mut lse_out = vec![0.0f32; n];
        for i in 0..n {
            let row = &mut p[i * n..(i + 1) * n];
            let l = match lse {
                Some(l) => l[i],
                None => {
                    let max = (0..=i)
                        .filter(|&j| self.visible(i, j))
                        .map(|j| row[j])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = (0..=i)
                        .filter(|&j| self.visible(i, j))
                        .map(|j| (row[j] - max).exp())
                        .sum();
                    max + sum.ln()
                }
            };
            lse_out[i] = l;
            for (j, x) in row.iter_mut().enumerate() {
                *x = if self.visible(i, j) {
                    (*x - l).exp()
                } else {
                    0.0
                };
            }
        }
        (p, lse_out)
    }
}

fn scatter_head(dst: &mut CpuTensor, src: &[f32], row0: usize, rows: usize, col0: usize) {
    let w = src.len() / rows;
    for r in 0..rows {
        let start = (row0 + r) * dst.cols + col0;
        dst.data[start..start + w].copy_from_slice(&src[r * w..(r + 1) * w]);
    }
}

pub fn forward(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    segments: &[i32],
    s: AttentionShape,
) -> (CpuTensor, CpuTensor) {
    let group = s.num_heads / s.num_kv_heads;
    let (n, d) = (s.seq, s.head_dim);
    let blocks: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = (0..s.batch * s.num_heads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / s.num_heads, task % s.num_heads);
            let views = HeadViews::new(s, b, segments);
            let (p, lse) = views.probabilities(views.head(q, h), views.head(k, h / group), None);
            let mut o = vec![0.0f32; n * d];
            gemm(
                MatRef::new(&p, n, n),
                views.head(v, h / group),
                1.0,
                &mut o,
                d,
                false,
                Parallelism::None,
            );
            (b, h, o, lse)
        })
        .collect();
    let tokens = s.batch * n;
    let mut out = CpuTensor {
        rows: tokens,
        cols: s.num_heads * d,
        data: vec![0.0; tokens * s.num_heads * d],
    };
    let mut lse_all = CpuTensor {
        rows: tokens,
        cols: s.num_heads,
        data: vec![0.0; tokens * s.num_heads],
    };
    for (b, h, o, lse) in blocks {
        scatter_head(&mut out, &o, b * n, n, h * d);
        scatter_head(&mut lse_all, &lse, b * n, n, h);
    }
    (out, lse_all)
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    out: &CpuTensor,
    lse: &CpuTensor,
    d_out: &CpuTensor,
    segments: &[i32],
    s: AttentionShape,
) -> (CpuTensor, CpuTensor, CpuTensor) {
    let group = s.num_heads / s.num_kv_heads;
    let (n, d) = (s.seq, s.head_dim);
    let c = 1.0 / (d as f32).sqrt();
    // One task per (sequence, KV head): it owns dK and dV of that head, and dQ of its query heads.
    type Grads = (usize, usize, Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
    let blocks: Vec<Grads> = (0..s.batch * s.num_kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, g) = (task / s.num_kv_heads, task % s.num_kv_heads);
            let views = HeadViews::new(s, b, segments);
            let (kg, vg) = (views.head(k, g), views.head(v, g));
            let mut dk = vec![0.0f32; n * d];
            let mut dv = vec![0.0f32; n * d];
            let mut dqs = Vec::with_capacity(group);
            for h in g * group..(g + 1) * group {
                let lse_h: Vec<f32> = (0..n)
                    .map(|i| lse.data[(b * n + i) * s.num_heads + h])
                    .collect();
                let qh = views.head(q, h);
                let (doh, oh) = (views.head(d_out, h), views.head(out, h));
                let (p, _) = views.probabilities(qh, kg, Some(&lse_h));
                let pm = MatRef::new(&p, n, n);
                gemm(pm.t(), doh, 1.0, &mut dv, d, true, Parallelism::None);
                let mut ds = vec![0.0f32; n * n];
                gemm(doh, vg.t(), 1.0, &mut ds, n, false, Parallelism::None);
                for i in 0..n {
                    let di: f32 = (0..d)
                        .map(|x| doh.data[i * doh.row_stride + x] * oh.data[i * oh.row_stride + x])
                        .sum();
                    for j in 0..n {
                        ds[i * n + j] = p[i * n + j] * (ds[i * n + j] - di);
                    }
                }
                let dsm = MatRef::new(&ds, n, n);
                let mut dq = vec![0.0f32; n * d];
                gemm(dsm, kg, c, &mut dq, d, false, Parallelism::None);
                gemm(dsm.t(), qh, c, &mut dk, d, true, Parallelism::None);
                dqs.push(dq);
            }
            (b, g, dqs, dk, dv)
        })
        .collect();
    let tokens = s.batch * n;
    let zeros = |cols: usize| CpuTensor {
        rows: tokens,
        cols,
        data: vec![0.0; tokens * cols],
    };
    let (mut dq, mut dk, mut dv) = (zeros(q.cols), zeros(k.cols), zeros(v.cols));
    for (b, g, dqs, dkg, dvg) in blocks {
        for (i, dqh) in dqs.iter().enumerate() {
            scatter_head(&mut dq, dqh, b * n, n, (g * group + i) * d);
        }
        scatter_head(&mut dk, &dkg, b * n, n, g * d);
        scatter_head(&mut dv, &dvg, b * n, n, g * d);
    }
    (dq, dk, dv)
}
