//! Deterministic random numbers: a counter-based hash for masks (any element can be regenerated
//! from `(seed, index)` alone) and a small stream generator for initialisation.

use rayon::prelude::*;

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits for element `index` of the stream `seed`.
pub fn hash(seed: u64, index: u64) -> u64 {
    mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// A uniform value in [0, 1) for element `index` of the stream `seed` (24 random bits).
pub fn unit_f32(seed: u64, index: u64) -> f32 {
    (hash(seed, index) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Two independent standard normal values, pair `pair` of the stream `seed`: Box–Muller on one
/// hash, whose top 24 bits give u₁ ∈ (0, 1] and the next 24 u₂ ∈ [0, 1):
/// (r·cos 2πu₂, r·sin 2πu₂) with r = √(−2 ln u₁), so |value| ≤ √(48 ln 2) ≈ 5.8.
pub fn normal_pair(seed: u64, pair: u64) -> [f32; 2] {
    const UNIT: f32 = 1.0 / (1u64 << 24) as f32;
    let h = hash(seed, pair);
    let u1 = ((h >> 40) as f32 + 1.0) * UNIT;
    let u2 = ((h >> 16) & 0xff_ffff) as f32 * UNIT;
    let r = (-2.0 * u1.ln()).sqrt();
    let (sin, cos) = (std::f32::consts::TAU * u2).sin_cos();
    [r * cos, r * sin]
}

/// Fills `out` with `f(z)` for the stream `seed`'s standard normal values z (value i is element
/// i % 2 of [`normal_pair`] i / 2), in parallel: any part of a stream can be made in any order.
pub fn fill_normal(seed: u64, out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    // Values a task fills (even, so that pairs never straddle two tasks).
    const TASK: usize = 1 << 14;
    out.par_chunks_mut(TASK)
        .enumerate()
        .for_each(|(task, values)| {
            let first_pair = (task * TASK / 2) as u64;
            for (j, two) in values.chunks_mut(2).enumerate() {
                let z = normal_pair(seed, first_pair + j as u64);
                for (o, z) in two.iter_mut().zip(z) {
                    *o = f(z);
                }
            }
        });
}

/// Derives the seed of a named sub-stream, e.g. `derive(seed, &[layer, module])`.
pub fn derive(seed: u64, path: &[u64]) -> u64 {
    path.iter()
        .fold(mix(seed), |s, &p| mix(s ^ mix(p.wrapping_add(1))))
}

/// A sequential generator (SplitMix64), for initialisation and shuffling.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        lo + (hi - lo) * u
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_values_are_the_pairs_in_order() {
        // Long enough for several tasks, odd so that the last pair is cut.
        let mut out = vec![f32::NAN; 3 * (1 << 14) + 5];
        fill_normal(9, &mut out, |z| 2.0 * z + 1.0);
        for (i, &v) in out.iter().enumerate() {
            let z = normal_pair(9, (i / 2) as u64)[i % 2];
            assert_eq!(v.to_bits(), (2.0 * z + 1.0).to_bits(), "value {i}");
        }
        let mut again = vec![0.0; out.len()];
        fill_normal(9, &mut again, |z| 2.0 * z + 1.0);
        assert_eq!(out, again);
        let mut other = vec![0.0; out.len()];
        fill_normal(10, &mut other, |z| 2.0 * z + 1.0);
        assert!(out.iter().zip(&other).filter(|(a, b)| a == b).count() < 10);
    }

    #[test]
    fn normal_values_have_the_standard_moments() {
        let mut z = vec![0.0f32; 1 << 20];
        fill_normal(3, &mut z, |z| z);
        let n = z.len() as f64;
        let mean = z.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = z.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let kurtosis = z.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n / var.powi(2);
        let within_one = z.iter().filter(|x| x.abs() < 1.0).count() as f64 / n;
        // Standard errors at 2^20 values: mean 0.001, variance 0.0014, kurtosis ~0.005.
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.007, "variance {var}");
        assert!((kurtosis - 3.0).abs() < 0.05, "kurtosis {kurtosis}");
        assert!(
            (within_one - 0.682_689).abs() < 0.003,
            "P(|z| < 1) {within_one}"
        );
        // The two values of a pair are uncorrelated.
        let pairs = z.chunks(2).map(|p| p[0] as f64 * p[1] as f64).sum::<f64>() / (n / 2.0);
        assert!(pairs.abs() < 0.01, "pair correlation {pairs}");
        assert!(z.iter().all(|x| x.is_finite() && x.abs() < 5.8));
    }
}
