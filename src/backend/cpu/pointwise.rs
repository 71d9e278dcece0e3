//! Row-wise and element-wise CPU kernels.

use super::CpuTensor;
use crate::backend::AdamWStep;
use rayon::prelude::*;

/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 16;

/// `f(a_i, b_i)` for every element, in parallel chunks.
pub fn zip_apply(a: &mut [f32], b: &[f32], f: impl Fn(&mut f32, &f32) + Sync) {
    a.par_chunks_mut(4096)
        .zip(b.par_chunks(4096))
        .for_each(|(ac, bc)| ac.iter_mut().zip(bc).for_each(|(x, y)| f(x, y)));
}

fn norm_weight(w: f32, unit_offset: bool) -> f32 {
    if unit_offset {
        1.0 + w
    } else {
        w
    }
}

/// See `Backend::rmsnorm`.
pub fn rmsnorm(x: &CpuTensor, w: &[f32], eps: f32, unit_offset: bool) -> (CpuTensor, CpuTensor) {
    let n = x.cols;
    let mut y = vec![0.0f32; x.data.len()];
    let mut r = vec![0.0f32; x.rows];
    y.par_chunks_mut(n * ROWS_PER_TASK)
        .zip(r.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.data.par_chunks(n * ROWS_PER_TASK))
        .for_each(|((yc, rc), xc)| {
            for ((yr, rr), xr) in yc.chunks_mut(n).zip(rc.iter_mut()).zip(xc.chunks(n)) {
                let ms = xr.iter().map(|&a| a * a).sum::<f32>() / n as f32;
                *rr = 1.0 / (ms + eps).sqrt();
                for ((o, &a), &wi) in yr.iter_mut().zip(xr).zip(w) {
                    *o = a * *rr * norm_weight(wi, unit_offset);
                }
            }
        });
    (
        CpuTensor {
            rows: x.rows,
            cols: n,
            data: y,
        },
        CpuTensor {
            rows: x.rows,
            cols: 1,
            data: r,
        },
    )
}

/// See `Backend::rmsnorm_backward`.
pub fn rmsnorm_backward(
    dy: &CpuTensor,
    x: &CpuTensor,
    w: &[f32],
    r: &[f32],
    unit_offset: bool,
) -> CpuTensor {
    let n = x.cols;
    let mut dx = vec![0.0f32; x.data.len()];
    dx.par_chunks_mut(n)
        .zip(dy.data.par_chunks(n))
        .zip(x.data.par_chunks(n))
        .zip(r.par_iter())
        .for_each(|(((dxr, dyr), xr), &rr)| {
            let dot: f32 = dyr
                .iter()
                .zip(xr)
                .zip(w)
                .map(|((&d, &a), &wi)| d * norm_weight(wi, unit_offset) * a)
                .sum();
            let c = rr * rr * rr * dot / n as f32;
            for (((o, &d), &a), &wi) in dxr.iter_mut().zip(dyr).zip(xr).zip(w) {
                *o = rr * norm_weight(wi, unit_offset) * d - c * a;
            }
        });
    CpuTensor {
        rows: x.rows,
        cols: n,
        data: dx,
    }
}

/// See `Backend::rope`.
pub fn rope(
    x: &mut CpuTensor,
    positions: &[i32],
    inv_freq: &[f32],
    head_dim: usize,
    inverse: bool,
) {
    let half = head_dim / 2;
    let sign = if inverse { -1.0f64 } else { 1.0 };
    x.data
        .par_chunks_mut(x.cols)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            // Angles in f64: pos·f reaches 1e5 radians for long contexts, where f32 loses digits.
            let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let (s, c) = (pos as f64 * f as f64).sin_cos();
                    ((sign * s) as f32, c as f32)
                })
                .unzip();
            for head in row.chunks_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        });
}

/// See `Backend::adamw`.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamWStep) {
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let step_size = (h.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p *= decay;
        *m = h.beta1 * *m + (1.0 - h.beta1) * g;
        *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
        // torch: p -= (lr/bc1) · m / (sqrt(v)/sqrt(bc2) + eps)
        *p -= step_size * *m / (v.sqrt() / bc2_sqrt + h.eps);
    }
}
