//! Encoding f32 values into the tensor types GGUF export writes.

use half::{bf16, f16};

use super::types::GgmlType;

/// Whether [`quantize`] can produce `ty`.
pub fn can_encode(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    )
}

/// Encodes `values` (a multiple of the block size) as `ty`, which must satisfy [`can_encode`].
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => values.chunks_exact(32).flat_map(q8_0_block).collect(),
        other => unreachable!("no encoder for {other}"),
    }
}

/// block_q8_0 of 32 values, as ggml's reference quantizer: d = max|x| / 127,
/// qs[i] = round(x[i] / d) (0 when d = 0), stored as { f16 d; i8 qs[32] }.
fn q8_0_block(x: &[f32]) -> [u8; 34] {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut out = [0u8; 34];
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        *o = (v * inv).round() as i8 as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::dequant::dequantize;

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 30.0) / 7.0)
            .collect();
        let bytes = quantize(GgmlType::Q8_0, &x);
        assert_eq!(bytes.len(), 2 * 34);
        let mut y = vec![0.0; 64];
        dequantize(GgmlType::Q8_0, &bytes, &mut y);
        for (block_x, block_y) in x.chunks(32).zip(y.chunks(32)) {
            let step = block_x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            for (a, b) in block_x.iter().zip(block_y) {
                assert!((a - b).abs() <= 0.5 * step + 1e-3 * a.abs(), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn zero_block_stays_zero() {
        let bytes = quantize(GgmlType::Q8_0, &[0.0; 32]);
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn float_types_round_trip() {
        let x = [1.0f32, -2.5, 0.099975586, 65504.0];
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let mut y = [0.0; 4];
            dequantize(ty, &quantize(ty, &x), &mut y);
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= a.abs() / 128.0, "{ty}: {a} vs {b}");
            }
        }
    }
}
