//! Causal grouped-query attention on the CPU, one (sequence, head) score matrix at a time.
//!
//! Forward, per head with scale c = 1/sqrt(head_dim):
//!   S = c·Q·Kᵀ (masked: j > i or another segment → −∞), lse_i = log Σ_j exp S_ij,
//!   P = exp(S − lse), O = P·V.
//! Backward, with D_i = Σ_d dO_id·O_id:
//!   dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − D), dQ = c·dS·K, dK = c·dSᵀ·Q.
//! Query heads h share KV head h / (heads / kv_heads); their dK and dV add up.
//!
//! Rows are taken in blocks of [`BLOCK`] queries: queries i0..i1 see only keys 0..i1, so every
//! product of a block is restricted to that prefix and the masked upper triangle is never computed.

use super::gemm::{gemm, MatRef};
use super::pointwise::{exp, max, sum_exp};
use super::pool::{Buffer, BufferPool};
use super::CpuTensor;
use crate::backend::AttentionShape;
use gemm::Parallelism;
use rayon::prelude::*;

/// Queries per block of the causal score matrix.
const BLOCK: usize = 32;

/// The query blocks `(i0, i1)` of a sequence of `n` tokens.
fn blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(BLOCK)
        .map(move |i0| (i0, (i0 + BLOCK).min(n)))
}

/// Per-sequence views into the packed row-major tensors.
struct HeadViews<'a> {
    s: AttentionShape,
    seq_start: usize,
    segments: &'a [i32],
    buffers: &'a BufferPool,
}

impl<'a> HeadViews<'a> {
    fn new(s: AttentionShape, b: usize, segments: &'a [i32], buffers: &'a BufferPool) -> Self {
        let seq_start = b * s.seq;
        HeadViews {
            s,
            seq_start,
            segments: &segments[seq_start..seq_start + s.seq],
            buffers,
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

    /// P = softmax(c·Q·Kᵀ) with the mask applied, and the log-sum-exp of each row (if not given).
    /// Entries above the diagonal are 0.
    fn probabilities(&self, q: MatRef, k: MatRef, lse: Option<&[f32]>) -> (Buffer, Vec<f32>) {
        let n = self.s.seq;
        let c = 1.0 / (self.s.head_dim as f32).sqrt();
        let mut p = self.buffers.zeroed(n * n);
        let mut lse_out = vec![0.0f32; n];
        for (i0, i1) in blocks(n) {
            let scores = &mut p[i0 * n..];
            gemm(
                q.rows(i0, i1),
                k.rows(0, i1).t(),
                c,
                scores,
                n,
                false,
                Parallelism::None,
            );
            for i in i0..i1 {
                let row = &mut p[i * n..i * n + i1];
                let (visible, masked) = row.split_at_mut(i + 1);
                masked.fill(0.0);
                lse_out[i] = self.softmax_row(i, visible, lse.map(|l| l[i]));
            }
        }
        (p, lse_out)
    }

    /// Scores `row = S_i,0..=i` of query i → probabilities `e^(S − lse)`, keys of other segments
    /// masked to 0. Returns lse, computed as `max + ln Σ e^(S − max)` unless given.
    fn softmax_row(&self, i: usize, row: &mut [f32], lse: Option<f32>) -> f32 {
        let seg = self.segments[i];
        for (x, &sj) in row.iter_mut().zip(self.segments) {
            if sj != seg {
                *x = f32::NEG_INFINITY;
            }
        }
        let l = lse.unwrap_or_else(|| {
            let m = max(row);
            m + (sum_exp(row, m) as f32).ln()
        });
        for x in row.iter_mut() {
            *x = exp(*x - l);
        }
        l
    }
}

/// `D_i = Σ_x a_ix·b_ix` for every row.
fn row_dots(a: MatRef, b: MatRef) -> Vec<f32> {
    (0..a.rows)
        .map(|i| {
            let ar = &a.data[i * a.row_stride..i * a.row_stride + a.cols];
            let br = &b.data[i * b.row_stride..i * b.row_stride + b.cols];
            ar.iter().zip(br).map(|(x, y)| x * y).sum()
        })
        .collect()
}

fn scatter_head(dst: &mut CpuTensor, src: &[f32], row0: usize, rows: usize, col0: usize) {
    let w = src.len() / rows;
    for r in 0..rows {
        let start = (row0 + r) * dst.cols + col0;
        dst.data[start..start + w].copy_from_slice(&src[r * w..(r + 1) * w]);
    }
}

/// The output and the log-sum-exp of every score row; each head's pieces are written over the
/// two results, so every element is set.
pub fn forward(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    segments: &[i32],
    s: AttentionShape,
    buffers: &BufferPool,
) -> (CpuTensor, CpuTensor) {
    let group = s.num_heads / s.num_kv_heads;
    let (n, d) = (s.seq, s.head_dim);
    let heads: Vec<(usize, usize, Buffer, Vec<f32>)> = (0..s.batch * s.num_heads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / s.num_heads, task % s.num_heads);
            let views = HeadViews::new(s, b, segments, buffers);
            let (p, lse) = views.probabilities(views.head(q, h), views.head(k, h / group), None);
            let mut o = buffers.uninit(n * d);
            let vh = views.head(v, h / group);
            for (i0, i1) in blocks(n) {
                let pb = MatRef::strided(&p[i0 * n..], i1 - i0, i1, n);
                let ob = &mut o[i0 * d..];
                gemm(pb, vh.rows(0, i1), 1.0, ob, d, false, Parallelism::None);
            }
            (b, h, o, lse)
        })
        .collect();
    let tokens = s.batch * n;
    let uninit = |cols| CpuTensor::uninit(buffers, tokens, cols);
    let (mut out, mut lse_all) = (uninit(s.num_heads * d), uninit(s.num_heads));
    for (b, h, o, lse) in heads {
        scatter_head(&mut out, &o, b * n, n, h * d);
        scatter_head(&mut lse_all, &lse, b * n, n, h);
    }
    (out, lse_all)
}

/// The tensors [`backward`] reads: the forward's inputs and results and the output gradient.
pub struct BackwardInputs<'a> {
    pub q: &'a CpuTensor,
    pub k: &'a CpuTensor,
    pub v: &'a CpuTensor,
    pub out: &'a CpuTensor,
    pub lse: &'a CpuTensor,
    pub d_out: &'a CpuTensor,
}

/// `(dq, dk, dv)`; as in [`forward`], the heads' pieces cover the three results.
pub fn backward(
    x: BackwardInputs,
    segments: &[i32],
    s: AttentionShape,
    buffers: &BufferPool,
) -> (CpuTensor, CpuTensor, CpuTensor) {
    let BackwardInputs {
        q,
        k,
        v,
        out,
        lse,
        d_out,
    } = x;
    let group = s.num_heads / s.num_kv_heads;
    let (n, d) = (s.seq, s.head_dim);
    let c = 1.0 / (d as f32).sqrt();
    // One task per (sequence, KV head): it owns dK and dV of that head, and dQ of its query heads.
    type Grads = (usize, usize, Vec<Buffer>, Buffer, Buffer);
    let grads: Vec<Grads> = (0..s.batch * s.num_kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, g) = (task / s.num_kv_heads, task % s.num_kv_heads);
            let views = HeadViews::new(s, b, segments, buffers);
            let (kg, vg) = (views.head(k, g), views.head(v, g));
            let mut dk = buffers.zeroed(n * d);
            let mut dv = buffers.zeroed(n * d);
            let mut dqs = Vec::with_capacity(group);
            for h in g * group..(g + 1) * group {
                let lse_h: Vec<f32> = (0..n)
                    .map(|i| lse.data[(b * n + i) * s.num_heads + h])
                    .collect();
                let qh = views.head(q, h);
                let (doh, oh) = (views.head(d_out, h), views.head(out, h));
                let (p, _) = views.probabilities(qh, kg, Some(&lse_h));
                let di = row_dots(doh, oh);
                let mut dq = buffers.uninit(n * d);
                let mut ds = buffers.zeroed(n * n);
                for (i0, i1) in blocks(n) {
                    let (pb, dob) = (
                        MatRef::strided(&p[i0 * n..], i1 - i0, i1, n),
                        doh.rows(i0, i1),
                    );
                    gemm(pb.t(), dob, 1.0, &mut dv, d, true, Parallelism::None);
                    let dsb = &mut ds[i0 * n..];
                    gemm(
                        dob,
                        vg.rows(0, i1).t(),
                        1.0,
                        dsb,
                        n,
                        false,
                        Parallelism::None,
                    );
                    // dS = P ∘ (dP − D); P is 0 above the diagonal, so dS is too.
                    for i in i0..i1 {
                        let (pr, dsr) = (&p[i * n..i * n + i1], &mut ds[i * n..i * n + i1]);
                        for (x, &pij) in dsr.iter_mut().zip(pr) {
                            *x = pij * (*x - di[i]);
                        }
                    }
                    let dsb = MatRef::strided(&ds[i0 * n..], i1 - i0, i1, n);
                    gemm(
                        dsb,
                        kg.rows(0, i1),
                        c,
                        &mut dq[i0 * d..],
                        d,
                        false,
                        Parallelism::None,
                    );
                    let dkb = &mut dk[..i1 * d];
                    gemm(dsb.t(), qh.rows(i0, i1), c, dkb, d, true, Parallelism::None);
                }
                dqs.push(dq);
            }
            (b, g, dqs, dk, dv)
        })
        .collect();
    let tokens = s.batch * n;
    let uninit = |cols| CpuTensor::uninit(buffers, tokens, cols);
    let (mut dq, mut dk, mut dv) = (uninit(q.cols), uninit(k.cols), uninit(v.cols));
    for (b, g, dqs, dkg, dvg) in grads {
        for (i, dqh) in dqs.iter().enumerate() {
            scatter_head(&mut dq, dqh, b * n, n, (g * group + i) * d);
        }
        scatter_head(&mut dk, &dkg, b * n, n, g * d);
        scatter_head(&mut dv, &dvg, b * n, n, g * d);
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Three query blocks (the last one partial), two query heads per KV head, and a second
    /// sequence that packs two segments.
    const S: AttentionShape = AttentionShape {
        batch: 2,
        seq: 2 * BLOCK + 7,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
    };

    fn random(rows: usize, cols: usize, rng: &mut Rng) -> CpuTensor {
        let data = (0..rows * cols).map(|_| rng.normal()).collect();
        CpuTensor::new(rows, cols, data)
    }

    fn segments() -> Vec<i32> {
        let mut seg = vec![0; S.batch * S.seq];
        seg[S.seq + 40..].fill(1);
        seg
    }

    fn at(t: &CpuTensor, row: usize, head: usize) -> &[f32] {
        let d = S.head_dim;
        &t.data[row * t.cols + head * d..row * t.cols + (head + 1) * d]
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Straight from the formulas in the module comment, one (sequence, head, query) at a time:
    /// returns (out, lse, dq, dk, dv).
    #[allow(clippy::type_complexity)]
    fn reference(
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        d_out: &CpuTensor,
        seg: &[i32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (n, d, group) = (S.seq, S.head_dim, S.num_heads / S.num_kv_heads);
        let c = 1.0 / (d as f32).sqrt();
        let mut out = vec![0.0; q.data.len()];
        let mut lse = vec![0.0; S.batch * n * S.num_heads];
        let (mut dq, mut dk, mut dv) = (
            out.clone(),
            vec![0.0; k.data.len()],
            vec![0.0; k.data.len()],
        );
        for b in 0..S.batch {
            for h in 0..S.num_heads {
                let g = h / group;
                for i in b * n..(b + 1) * n {
                    let keys: Vec<usize> = (b * n..=i).filter(|&j| seg[j] == seg[i]).collect();
                    let s: Vec<f32> = keys
                        .iter()
                        .map(|&j| c * dot(at(q, i, h), at(k, j, g)))
                        .collect();
                    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let l = m + s.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
                    lse[i * S.num_heads + h] = l;
                    let p: Vec<f32> = s.iter().map(|x| (x - l).exp()).collect();
                    let o = i * q.cols + h * d;
                    for (&j, &pj) in keys.iter().zip(&p) {
                        for x in 0..d {
                            out[o + x] += pj * at(v, j, g)[x];
                        }
                    }
                    let di = dot(at(d_out, i, h), &out[o..o + d]);
                    for (&j, &pj) in keys.iter().zip(&p) {
                        let ds = pj * (dot(at(d_out, i, h), at(v, j, g)) - di);
                        let kv = j * k.cols + g * d;
                        for x in 0..d {
                            dv[kv + x] += pj * at(d_out, i, h)[x];
                            dq[o + x] += c * ds * at(k, j, g)[x];
                            dk[kv + x] += c * ds * at(q, i, h)[x];
                        }
                    }
                }
            }
        }
        (out, lse, dq, dk, dv)
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn blocked_attention_matches_the_formulas() {
        let mut rng = Rng::new(1);
        let tokens = S.batch * S.seq;
        let q = random(tokens, S.num_heads * S.head_dim, &mut rng);
        let k = random(tokens, S.num_kv_heads * S.head_dim, &mut rng);
        let v = random(tokens, S.num_kv_heads * S.head_dim, &mut rng);
        let d_out = random(tokens, S.num_heads * S.head_dim, &mut rng);
        let seg = segments();
        let buffers = BufferPool::default();
        let (out, lse) = forward(&q, &k, &v, &seg, S, &buffers);
        let inputs = BackwardInputs {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: &lse,
            d_out: &d_out,
        };
        let (dq, dk, dv) = backward(inputs, &seg, S, &buffers);
        let want = reference(&q, &k, &v, &d_out, &seg);
        assert_close(&out.data, &want.0, "out");
        assert_close(&lse.data, &want.1, "lse");
        assert_close(&dq.data, &want.2, "dq");
        assert_close(&dk.data, &want.3, "dk");
        assert_close(&dv.data, &want.4, "dv");
    }
}
