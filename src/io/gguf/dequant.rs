//! Dequantization of ggml blocks to f32, one function per block type, each with its formula.
//! Block layouts follow ggml's `block_*` structs; `d`, `m`, `dmin` are f16 scales.

use half::{bf16, f16};
use rayon::prelude::*;

use super::types::GgmlType;

/// Blocks converted per parallel task.
const BLOCKS_PER_TASK: usize = 1024;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Converts `bytes` (whole blocks of `ty`) into `out`, whose length is the number of values.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    assert_eq!(bytes.len() / ts * bs, out.len(), "whole blocks of {ty}");
    let block: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => f32_block,
        GgmlType::F16 => f16_block,
        GgmlType::BF16 => bf16_block,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
    };
    out.par_chunks_mut(bs * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(ts * BLOCKS_PER_TASK))
        .for_each(|(o, b)| {
            o.chunks_exact_mut(bs)
                .zip(b.chunks_exact(ts))
                .for_each(|(o, b)| block(b, o))
        });
}

/// y = x (little-endian f32).
fn f32_block(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

/// y = f16 x.
fn f16_block(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

/// y = bf16 x (the upper half of an f32).
fn bf16_block(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// block_q4_0 { d; qs[16] }: y[j] = d·((qs[j] & 15) − 8), y[j+16] = d·((qs[j] >> 4) − 8).
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * ((q & 15) as f32 - 8.0);
        y[j + 16] = d * ((q >> 4) as f32 - 8.0);
    }
}

/// block_q4_1 { d; m; qs[16] }: y[j] = d·(qs[j] & 15) + m, y[j+16] = d·(qs[j] >> 4) + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = d * (q & 15) as f32 + m;
        y[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// The 5-bit values of a Q5 block: low nibbles from `qs`, fifth bits from the u32 `qh`
/// (bit j for value j, bit j+16 for value j+16).
fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut v = [0u8; 32];
    for (j, &q) in qs.iter().enumerate() {
        v[j] = (q & 15) | ((((h >> j) & 1) as u8) << 4);
        v[j + 16] = (q >> 4) | ((((h >> (j + 16)) & 1) as u8) << 4);
    }
    v
}

/// block_q5_0 { d; qh[4]; qs[16] }: y[i] = d·(q[i] − 16) with q the 5-bit value.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, q) in y.iter_mut().zip(q5_values(&b[2..6], &b[6..22])) {
        *y = d * (q as f32 - 16.0);
    }
}

/// block_q5_1 { d; m; qh[4]; qs[16] }: y[i] = d·q[i] + m with q the 5-bit value.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (y, q) in y.iter_mut().zip(q5_values(&b[4..8], &b[8..24])) {
        *y = d * q as f32 + m;
    }
}

/// block_q8_0 { d; qs[32] as i8 }: y[i] = d·qs[i].
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = d * (q as i8) as f32;
    }
}

/// The 6-bit (scale, min) of sub-block `j` (0..8) from the 12 packed bytes of a K-quant block:
/// j < 4: sc = s[j] & 63, m = s[j+4] & 63;
/// j ≥ 4: sc = (s[j+4] & 15) | (s[j−4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// block_q4_K { d; dmin; scales[12]; qs[128] }: 8 sub-blocks of 32; sub-block s has
/// (sc, m) = scale_min_k4(s) and y = d·sc·q − dmin·m, where the 64 values of each pair of
/// sub-blocks (2k, 2k+1) take the low then the high nibbles of qs[32k..32k+32].
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for k in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let q = &qs[32 * k..32 * k + 32];
        let out = &mut y[64 * k..64 * k + 64];
        for l in 0..32 {
            out[l] = d * sc1 * (q[l] & 15) as f32 - dmin * m1;
            out[l + 32] = d * sc2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// block_q5_K { d; dmin; scales[12]; qh[32]; qs[128] }: as Q4_K with a fifth bit: value l of
/// sub-block s adds 16 when bit s of qh[l] is set.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for k in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let q = &qs[32 * k..32 * k + 32];
        let out = &mut y[64 * k..64 * k + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * k)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * k + 1)) & 1) << 4;
            out[l] = d * sc1 * ((q[l] & 15) | h1) as f32 - dmin * m1;
            out[l + 32] = d * sc2 * ((q[l] >> 4) | h2) as f32 - dmin * m2;
        }
    }
}

/// block_q6_K { ql[128]; qh[64]; scales[16] as i8; d }: 16 sub-blocks of 16, y = d·sc·(q − 32)
/// with q 6 bits: in each half n (128 values; ql += 64n, qh += 32n, sc += 8n) and l < 32,
/// q(l)    = ql[l] & 15    | (qh[l] >> 0 & 3) << 4, scale sc[l/16]
/// q(l+32) = ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4, scale sc[l/16 + 2]
/// q(l+64) = ql[l] >> 4    | (qh[l] >> 4 & 3) << 4, scale sc[l/16 + 4]
/// q(l+96) = ql[l+32] >> 4 | (qh[l] >> 6 & 3) << 4, scale sc[l/16 + 6]
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let out = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 15) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (part, q) in q.into_iter().enumerate() {
                let s = sc[is + 2 * part] as i8 as f32;
                out[l + 32 * part] = d * s * (q as i32 - 32) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ty: GgmlType, block: &[u8]) -> Vec<f32> {
        assert_eq!(block.len(), ty.type_size());
        let mut y = vec![f32::NAN; ty.block_size()];
        dequantize(ty, block, &mut y);
        y
    }

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// 16 bytes whose low nibbles count up and high nibbles count down.
    fn nibbles() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    #[test]
    fn q4_0_block() {
        let b = [&h(0.5)[..], &nibbles()].concat();
        let y = run(GgmlType::Q4_0, &b);
        assert_eq!((y[0], y[15], y[16], y[31]), (-4.0, 3.5, 3.5, -4.0));
    }

    #[test]
    fn q4_1_block() {
        let b = [&h(0.25)[..], &h(-1.0), &nibbles()].concat();
        let y = run(GgmlType::Q4_1, &b);
        assert_eq!((y[0], y[15], y[16], y[31]), (-1.0, 2.75, 2.75, -1.0));
    }

    #[test]
    fn q5_blocks_take_the_fifth_bit_from_qh() {
        // Fifth bit set for every odd value index.
        let qh = 0xAAAA_AAAAu32.to_le_bytes();
        let qs: Vec<u8> = (0..16u8).map(|j| j | (j << 4)).collect();
        let y = run(GgmlType::Q5_0, &[&h(1.0)[..], &qh, &qs].concat());
        assert_eq!(
            (y[0], y[1], y[2], y[17], y[31]),
            (-16.0, 1.0, -14.0, 1.0, 15.0)
        );
        let y = run(GgmlType::Q5_1, &[&h(2.0)[..], &h(0.5), &qh, &qs].concat());
        assert_eq!((y[0], y[1], y[16], y[31]), (0.5, 34.5, 0.5, 62.5));
    }

    #[test]
    fn q8_0_block() {
        let qs: Vec<u8> = (0..32).map(|i| (i as i8 - 16) as u8).collect();
        let y = run(GgmlType::Q8_0, &[&h(0.5)[..], &qs].concat());
        assert_eq!((y[0], y[16], y[31]), (-8.0, 0.0, 7.5));
    }

    /// Packed K-quant scales: sub-block j has scale j+1 and min j, except scale 40 for j = 7,
    /// whose upper two bits go to the top of byte 3.
    fn k_scales() -> [u8; 12] {
        [
            1,
            2,
            3,
            4 | 0x80,
            0,
            1,
            2,
            3,
            5 | 4 << 4,
            6 | 5 << 4,
            7 | 6 << 4,
            8 | 7 << 4,
        ]
    }

    #[test]
    fn q4_k_block() {
        let b = [&h(1.0)[..], &h(1.0), &k_scales(), &[0x21; 128]].concat();
        let y = run(GgmlType::Q4K, &b);
        // y = d·sc·q − dmin·m; low nibbles (1) in even sub-blocks, high (2) in odd ones.
        assert_eq!(
            (y[0], y[32], y[192], y[224], y[255]),
            (1.0, 3.0, 1.0, 73.0, 73.0)
        );
    }

    #[test]
    fn q5_k_block() {
        let mut qh = [0u8; 32];
        qh[0] = 0xFF;
        let b = [&h(1.0)[..], &h(1.0), &k_scales(), &qh, &[0x21; 128]].concat();
        let y = run(GgmlType::Q5K, &b);
        assert_eq!(
            (y[0], y[1], y[32], y[33], y[224]),
            (17.0, 1.0, 35.0, 3.0, 713.0)
        );
    }

    #[test]
    fn q6_k_block() {
        let scales: Vec<u8> = (0..16).map(|i| (i as i8 - 4) as u8).collect();
        // Upper bits 0, 1, 2, 3 for the four quarter-rows of each half.
        let b = [&[0x21u8; 128][..], &[0xE4; 64], &scales, &h(1.0)].concat();
        let y = run(GgmlType::Q6K, &b);
        assert_eq!(
            (y[0], y[16], y[32], y[64], y[96], y[128], y[255]),
            (124.0, 93.0, 30.0, 0.0, 36.0, -124.0, 198.0)
        );
    }

    #[test]
    fn float_blocks() {
        assert_eq!(run(GgmlType::F32, &(-1.25f32).to_le_bytes()), [-1.25]);
        assert_eq!(run(GgmlType::F16, &h(3.5)), [3.5]);
        assert_eq!(
            run(GgmlType::BF16, &bf16::from_f32(-2.0).to_le_bytes()),
            [-2.0]
        );
    }
}
