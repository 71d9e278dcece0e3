//! Deterministic random numbers: a counter-based hash for masks (any element can be regenerated
//! from `(seed, index)` alone) and a small stream generator for initialisation.

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

/// A standard normal value for element `index` of the stream `seed` (Box–Muller on two hashes),
/// so large tensors can be filled in parallel and in any order.
pub fn normal_at(seed: u64, index: u64) -> f32 {
    let u1 = ((hash(seed, 2 * index) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (hash(seed, 2 * index + 1) >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
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
