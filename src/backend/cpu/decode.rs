//! Attention of the newest positions of one sequence over its KV cache (incremental decoding).
//!
//! With m queries and n keys, query i is at position p_i = n − m + i; per head h (KV head
//! g = h / (heads / kv_heads)) and scale c = 1/sqrt(head_dim):
//!   S = c·Q_h·K_gᵀ with S_ij = −∞ for j > p_i,  lse_i = log Σ_j exp S_ij,  O_h = exp(S − lse)·V_g.

use super::gemm::{gemm, MatRef};
use super::CpuTensor;
use crate::error::{Error, Result};
use gemm::Parallelism;
use rayon::prelude::*;

pub fn check_shapes(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    (heads, kv_heads, d): (usize, usize, usize),
) -> Result<()> {
    let ok = kv_heads > 0
        && heads % kv_heads == 0
        && q.cols == heads * d
        && k.cols == kv_heads * d
        && (v.rows, v.cols) == (k.rows, k.cols)
        && q.rows <= k.rows;
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "decode attention shapes: q [{}, {}], k [{}, {}], v [{}, {}] for {heads} heads / {kv_heads} KV heads of {d}",
            q.rows, q.cols, k.rows, k.cols, v.rows, v.cols
        )))
    }
}

pub fn attention(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    (heads, kv_heads, d): (usize, usize, usize),
) -> (CpuTensor, CpuTensor) {
    let (m, n) = (q.rows, k.rows);
    let group = heads / kv_heads;
    let c = 1.0 / (d as f32).sqrt();
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let qh = MatRef::strided(&q.data[h * d..], m, d, q.cols);
            let kg = MatRef::strided(&k.data[g * d..], n, d, k.cols);
            let vg = MatRef::strided(&v.data[g * d..], n, d, v.cols);
            let mut s = vec![0.0f32; m * n];
            gemm(qh, kg.t(), c, &mut s, n, false, Parallelism::None);
            let mut lse = vec![0.0f32; m];
            for (i, row) in s.chunks_mut(n).enumerate() {
                let visible = n - m + i + 1;
                let max = row[..visible]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row[..visible].iter().map(|&x| (x - max).exp()).sum();
                lse[i] = max + sum.ln();
                row[..visible]
                    .iter_mut()
                    .for_each(|x| *x = (*x - lse[i]).exp());
                row[visible..].fill(0.0);
            }
            let mut o = vec![0.0f32; m * d];
            gemm(
                MatRef::new(&s, m, n),
                vg,
                1.0,
                &mut o,
                d,
                false,
                Parallelism::None,
            );
            (o, lse)
        })
        .collect();
    let mut out = CpuTensor::new(m, heads * d, vec![0.0; m * heads * d]);
    let mut lse_all = CpuTensor::new(m, heads, vec![0.0; m * heads]);
    for (h, (o, lse)) in per_head.iter().enumerate() {
        for i in 0..m {
            out.data[i * heads * d + h * d..i * heads * d + (h + 1) * d]
                .copy_from_slice(&o[i * d..(i + 1) * d]);
            lse_all.data[i * heads + h] = lse[i];
        }
    }
    (out, lse_all)
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::{CpuBackend, CpuTensor};
    use crate::backend::{AttentionShape, Backend};
    use crate::rng::Rng;

    fn random(rows: usize, cols: usize, rng: &mut Rng) -> CpuTensor {
        CpuTensor::new(rows, cols, (0..rows * cols).map(|_| rng.normal()).collect())
    }

    #[test]
    fn decoding_matches_full_causal_attention() {
        let be = CpuBackend::new(2).unwrap();
        let mut rng = Rng::new(3);
        let (n, heads, kv, d) = (7, 4, 2, 8);
        let (q, k, v) = (
            random(n, heads * d, &mut rng),
            random(n, kv * d, &mut rng),
            random(n, kv * d, &mut rng),
        );
        let shape = AttentionShape {
            batch: 1,
            seq: n,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: d,
        };
        let (full, full_lse) = be.attention(&q, &k, &v, &vec![0; n], shape).unwrap();
        // All queries at once, then only the last two over the whole cache.
        let (all, all_lse) = be.attention_decode(&q, &k, &v, (heads, kv, d)).unwrap();
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
        };
        assert!(close(&all.data, &full.data) && close(&all_lse.data, &full_lse.data));
        let last = CpuTensor::new(2, q.cols, q.data[(n - 2) * q.cols..].to_vec());
        let (tail, _) = be.attention_decode(&last, &k, &v, (heads, kv, d)).unwrap();
        assert!(close(&tail.data, &full.data[(n - 2) * q.cols..]));
    }
}
