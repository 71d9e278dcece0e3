//! Row-wise and element-wise CPU kernels.

use super::CpuTensor;
use crate::backend::{AdamWConstants, AdamWStep};
use crate::model::config::Activation;
use rayon::prelude::*;

/// Rows handed to one rayon task.
const ROWS_PER_TASK: usize = 16;

/// `e^x` in f32 without a libm call, so that loops over it vectorize.
///
/// `e^x = 2^n · e^r` with `n = round(x·log2 e)` and `r = x − n·ln 2` (ln 2 split in two so that
/// `r` is exact), `|r| ≤ ln2/2`; `e^r` comes from Cephes' expf polynomial (about 1 ulp). Below
/// −87.3 (the end of the normal range) the result is 0, above 88 it saturates to +∞ (the true
/// value exceeds 1.6e38 there); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 pushes the fraction bits out: it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LO: f32 = -87.3;
    const HI: f32 = 88.0;
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n built from its exponent bits; n is in [−126, 127] after the clamp.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        er * two_n
    }
}

/// `Σ_i e^(x_i − shift)`, accumulated in f64 over four independent lanes so that it vectorizes.
pub fn sum_exp(xs: &[f32], shift: f32) -> f64 {
    let mut lanes = [0.0f64; 4];
    let chunks = xs.chunks_exact(4);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| exp(x - shift) as f64)
        .sum();
    for c in chunks {
        for (acc, &x) in lanes.iter_mut().zip(c) {
            *acc += exp(x - shift) as f64;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// The largest element (−∞ for an empty slice).
pub fn max(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `f(a_i, b_i)` for every element, in parallel chunks.
pub fn zip_apply(a: &mut [f32], b: &[f32], f: impl Fn(&mut f32, &f32) + Sync) {
    a.par_chunks_mut(4096)
        .zip(b.par_chunks(4096))
        .for_each(|(ac, bc)| ac.iter_mut().zip(bc).for_each(|(x, y)| f(x, y)));
}

/// σ(g) = 1/(1 + e^−g).
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

/// `h ← act(g)·h` (h holds u on entry). Silu goes through the vectorizable [`exp`]; other
/// activations use the model's definitions.
pub fn gated_activation(h: &mut [f32], g: &[f32], act: Activation) {
    match act {
        Activation::Silu => zip_apply(h, g, |h, &g| *h *= g * sigmoid(g)),
        _ => zip_apply(h, g, |h, &g| *h *= act.value(g)),
    }
}

/// The inputs of [`gated_activation_backward`].
pub struct GatedInputs<'a> {
    pub dh: &'a [f32],
    pub g: &'a [f32],
    pub u: &'a [f32],
}

/// `(dg, du) = (dh·u·act'(g), dh·act(g))` in one pass, written over `dg` and `du`;
/// silu' = σ(g)·(1 + g·(1 − σ(g))).
pub fn gated_activation_backward(x: GatedInputs, act: Activation, dg: &mut [f32], du: &mut [f32]) {
    match act {
        Activation::Silu => gated_backward_with(x, dg, du, |g| {
            let s = sigmoid(g);
            (g * s, s * (1.0 + g * (1.0 - s)))
        }),
        _ => gated_backward_with(x, dg, du, |g| (act.value(g), act.derivative(g))),
    }
}

/// [`gated_activation_backward`] with `f(g) = (act(g), act'(g))`.
fn gated_backward_with(
    GatedInputs { dh, g, u }: GatedInputs,
    dg: &mut [f32],
    du: &mut [f32],
    f: impl Fn(f32) -> (f32, f32) + Sync,
) {
    const CHUNK: usize = 4096;
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            dh.par_chunks(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(u.par_chunks(CHUNK)),
        )
        .for_each(|((dgc, duc), ((dhc, gc), uc))| {
            let outs = dgc.iter_mut().zip(duc.iter_mut());
            for ((dg, du), ((&dh, &g), &u)) in outs.zip(dhc.iter().zip(gc).zip(uc)) {
                let (a, da) = f(g);
                *dg = dh * u * da;
                *du = dh * a;
            }
        });
}

fn norm_weight(w: f32, unit_offset: bool) -> f32 {
    if unit_offset {
        1.0 + w
    } else {
        w
    }
}

/// See `Backend::rmsnorm`; `y` and `r` are written over.
pub fn rmsnorm(
    x: &CpuTensor,
    w: &[f32],
    eps: f32,
    unit_offset: bool,
    y: &mut [f32],
    r: &mut [f32],
) {
    let n = x.cols;
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
}

/// See `Backend::rmsnorm_backward`: rows of `n` values of `dy`, `x` and `dx` (one scale of `r`
/// each); `dx` is added into when `accumulate`, else written over.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    n: usize,
    w: &[f32],
    r: &[f32],
    unit_offset: bool,
    accumulate: bool,
    dx: &mut [f32],
) {
    dx.par_chunks_mut(n)
        .zip(dy.par_chunks(n))
        .zip(x.par_chunks(n))
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
                let g = rr * norm_weight(wi, unit_offset) * d - c * a;
                *o = if accumulate { *o + g } else { g };
            }
        });
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
    let c = AdamWConstants::of(h);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * h.grad_scale;
        *p *= c.decay;
        *m = h.beta1 * *m + (1.0 - h.beta1) * g;
        *v = h.beta2 * *v + (1.0 - h.beta2) * g * g;
        // torch: p -= (lr/bc1) · m / (sqrt(v)/sqrt(bc2) + eps)
        *p -= c.step_size * *m / (v.sqrt() / c.bc2_sqrt + h.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_two_ulp() {
        let mut worst = 0.0f32;
        for i in -873_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / (want * f32::EPSILON));
        }
        assert!(worst <= 2.0, "relative error {worst} ulp");
    }

    #[test]
    fn exp_limits() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }
}
