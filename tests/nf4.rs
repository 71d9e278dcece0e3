//! NF4 with double quantization (src/quant): error bound of a round trip, packing order, the
//! double quantization of absmax, row-range dequantization, bad input, and bit-exactness against
//! bitsandbytes on the fixture written by tests/fixtures/make_nf4_fixture.py.
//!
//! The error bound (see src/quant/nf4.rs): a value x in a block with absmax M, whose absmax sits in
//! a nested group with scale D, comes back within
//!     (G/2)·M + (H/2)·D        (+ f32 rounding)
//! where G = 0.3038 is the widest gap between adjacent NF4 values (nearest-value rounding is off by
//! at most half a gap, scaled by M) and H = 0.9/64 the widest gap of the 8-bit dynamic map (the
//! absmax itself is off by at most H/2·D, and |NF4 value| ≤ 1 carries that over unchanged).

mod common;

use std::path::{Path, PathBuf};

use finetune::io::safetensors::SafetensorsFile;
use finetune::quant::bnb::{is_bnb_4bit, read_nf4, read_quant_state};
use finetune::quant::nf4::{
    dynamic_map, nf4_code, Absmax, DoubleQuant, Nf4Tensor, BLOCK, DYNAMIC_MAX_GAP, NESTED_BLOCK,
    NF4_CODE, NF4_MAX_GAP, NF4_ZERO_CODE,
};
use finetune::rng::Rng;
use finetune::Error;

use common::bnb::{write_raw, RawTensors};

/// Weight-like values: N(0, 0.02²) with a few outliers ×12, as in the fixture script.
fn weights(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let v = rng.normal() * 0.02;
            if rng.uniform(0.0, 1.0) < 0.002 {
                v * 12.0
            } else {
                v
            }
        })
        .collect()
}

fn absmax_of(values: &[f32]) -> Vec<f32> {
    values
        .chunks(BLOCK)
        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// Per-value bound and measured error of quantize + dequantize.
#[test]
fn round_trip_error_within_nf4_bound() {
    let eps = f32::EPSILON;
    for (seed, rows, cols) in [(1, 64, 128), (2, 37, 91), (3, 300, 260)] {
        let w = weights(seed, rows * cols);
        let m = absmax_of(&w);

        // Plain absmax: |x - x'| ≤ (G/2)·M, and the code is a nearest one.
        let plain = Nf4Tensor::quantize_plain(&w, rows, cols).unwrap();
        let back = plain.dequantize();
        let mut worst_plain = 0.0f32;
        for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
            let mb = m[i / BLOCK];
            let bound = NF4_MAX_GAP / 2.0 * mb + 4.0 * eps * mb;
            assert!(
                (x - y).abs() <= bound,
                "plain {rows}x{cols} [{i}]: {x} -> {y}, bound {bound}"
            );
            worst_plain = worst_plain.max((x - y).abs() / mb);
            let s = x / mb;
            let chosen = (s - NF4_CODE[plain.code(i) as usize]).abs();
            let best = NF4_CODE
                .iter()
                .map(|c| (s - c).abs())
                .fold(f32::MAX, f32::min);
            assert!(chosen <= best + 2.0 * eps, "[{i}] not a nearest code");
        }

        // Double quantization: |x - x'| ≤ (G/2)·M + (H/2)·D (+ rounding).
        let q = Nf4Tensor::quantize(&w, rows, cols).unwrap();
        assert_eq!(
            q.packed(),
            plain.packed(),
            "codes do not depend on absmax storage"
        );
        let Absmax::Double(dq) = q.absmax() else {
            panic!("quantize double-quantizes")
        };
        let back = q.dequantize();
        let (mut worst, mut worst_ratio) = (0.0f32, 0.0f32);
        for (i, (&x, &y)) in w.iter().zip(&back).enumerate() {
            let (mb, d) = (m[i / BLOCK], dq.nested_absmax()[i / BLOCK / NESTED_BLOCK]);
            let bound = NF4_MAX_GAP / 2.0 * mb
                + DYNAMIC_MAX_GAP / 2.0 * d
                + 4.0 * eps * (mb + d + dq.offset().abs());
            let err = (x - y).abs();
            assert!(
                err <= bound,
                "{rows}x{cols} [{i}]: {x} -> {y}, error {err} > bound {bound}"
            );
            worst = worst.max(err / mb);
            worst_ratio = worst_ratio.max(err / bound);
        }
        let rms = (w
            .iter()
            .zip(&back)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            / w.len() as f32)
            .sqrt();
        let w_rms = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
        eprintln!(
            "{rows}x{cols}: max |x-x'|/M plain {worst_plain:.4}, double {worst:.4} \
             (G/2 = {:.4}); max error/bound {worst_ratio:.3}; rms error {rms:.3e} = {:.3} of rms(x)",
            NF4_MAX_GAP / 2.0,
            rms / w_rms
        );
    }
}

/// Value 2k goes to the high nibble of byte k, value 2k+1 to the low one.
#[test]
fn packing_order_and_padding() {
    // Block 0 holds NF4[0], NF4[1], ..., NF4[15], NF4[0], ... (absmax 1); block 1 the same
    // sequence backwards times 0.5 (absmax 0.5).
    let mut w: Vec<f32> = (0..BLOCK).map(|j| NF4_CODE[j % 16]).collect();
    w.extend((0..BLOCK).map(|j| NF4_CODE[15 - j % 16] * 0.5));
    let q = Nf4Tensor::quantize_plain(&w, 2, BLOCK).unwrap();
    assert_eq!(
        &q.packed()[..8],
        &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]
    );
    assert_eq!(&q.packed()[32..36], &[0xfe, 0xdc, 0xba, 0x98]);
    assert_eq!(q.absmax(), &Absmax::Plain(vec![1.0, 0.5]));
    for i in 0..w.len() {
        let expected = if i < BLOCK { i % 16 } else { 15 - i % 16 };
        assert_eq!(q.code(i) as usize, expected, "value {i}");
    }
    assert_eq!(q.dequantize(), w, "code values round-trip exactly");

    // 3x3 = 9 values: 5 bytes, the last low nibble is the code of 0.0.
    let w = [1.0, -1.0, 0.0, 0.5, -0.5, 0.25, 0.1, -0.1, 1.0];
    let q = Nf4Tensor::quantize_plain(&w, 3, 3).unwrap();
    assert_eq!(q.packed().len(), 5);
    assert_eq!(q.packed()[0], 0xf0);
    assert_eq!(q.packed()[4], 0xf0 | NF4_ZERO_CODE);

    // An all-zero block stores the code of 0.0 and comes back as +0.0.
    let mut w = vec![0.0f32; 2 * BLOCK];
    w[BLOCK] = 3.0;
    let q = Nf4Tensor::quantize(&w, 1, 2 * BLOCK).unwrap();
    assert!(q.packed()[..BLOCK / 2].iter().all(|&b| b == 0x77));
    let back = q.dequantize();
    assert!(back[..BLOCK].iter().all(|v| v.to_bits() == 0));
    assert_eq!(back[BLOCK], 3.0);
}

#[test]
fn double_quant_round_trip() {
    let mut rng = Rng::new(7);
    // 600 values: groups of 256, 256 and 88.
    let absmax: Vec<f32> = (0..600).map(|_| rng.uniform(0.005, 0.3)).collect();
    let dq = DoubleQuant::quantize(&absmax).unwrap();
    let mean = absmax.iter().map(|&v| f64::from(v)).sum::<f64>() / 600.0;
    assert_eq!(dq.offset(), mean as f32);
    assert_eq!(dq.codes().len(), 600);
    assert_eq!(dq.nested_absmax().len(), 3);
    for (g, group) in absmax.chunks(NESTED_BLOCK).enumerate() {
        let d = group
            .iter()
            .fold(0.0f32, |a, &m| a.max((m - dq.offset()).abs()));
        assert_eq!(dq.nested_absmax()[g], d, "nested absmax of group {g}");
    }
    let back = dq.dequantize();
    let mut worst = 0.0f32;
    for (b, (&m, &y)) in absmax.iter().zip(&back).enumerate() {
        let d = dq.nested_absmax()[b / NESTED_BLOCK];
        let bound = DYNAMIC_MAX_GAP / 2.0 * d + 4.0 * f32::EPSILON * (d + dq.offset());
        assert!(
            (m - y).abs() <= bound,
            "absmax[{b}] {m} -> {y}, bound {bound}"
        );
        worst = worst.max((m - y).abs() / d);
        // The stored code is a nearest map value to (m - offset) / D.
        let t = (m - dq.offset()) / d;
        let chosen = (t - dq.map()[dq.codes()[b] as usize]).abs();
        let best = dq
            .map()
            .iter()
            .map(|c| (t - c).abs())
            .fold(f32::MAX, f32::min);
        assert!(
            chosen <= best + 2.0 * f32::EPSILON,
            "absmax[{b}]: not a nearest code"
        );
    }
    eprintln!(
        "double quant: max |M - M'|/D = {worst:.5} (H/2 = {:.5})",
        DYNAMIC_MAX_GAP / 2.0
    );

    // Equal absmax values: nothing to quantize around the mean, and they come back exactly.
    let dq = DoubleQuant::quantize(&[0.125; 300]).unwrap();
    assert_eq!(dq.nested_absmax(), &[0.0, 0.0]);
    assert_eq!(dq.dequantize(), vec![0.125; 300]);
}

#[test]
fn row_ranges_match_the_whole_matrix() {
    // 91 columns: rows start inside bytes and inside blocks.
    let (rows, cols) = (37, 91);
    let q = Nf4Tensor::quantize(&weights(11, rows * cols), rows, cols).unwrap();
    let whole = q.dequantize();
    for range in [0..1, 1..2, 3..10, 17..37, 0..37, 36..37, 5..5] {
        let part = q.dequantize_rows(range.clone()).unwrap();
        assert_eq!(
            part,
            whole[range.start * cols..range.end * cols],
            "rows {range:?}"
        );
    }
    let err = q.dequantize_rows(30..38).unwrap_err().to_string();
    assert!(
        err.contains("row range 30..38 is outside the 37 rows"),
        "{err}"
    );
    let mut out = vec![0.0; 5];
    let err = q
        .dequantize_rows_into(0..1, &mut out)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("need an output of 91 values, found 5"),
        "{err}"
    );

    // Large enough for several parallel chunks.
    let (rows, cols) = (520, 300);
    let q = Nf4Tensor::quantize(&weights(12, rows * cols), rows, cols).unwrap();
    let whole = q.dequantize();
    let part = q.dequantize_rows(101..419).unwrap();
    assert_eq!(part, whole[101 * cols..419 * cols]);
}

#[test]
fn rejects_bad_input() {
    let mut w = weights(5, 64);
    w[37] = f32::NAN;
    let err = Nf4Tensor::quantize(&w, 2, 32).unwrap_err().to_string();
    assert!(err.contains("row 1, column 5 is NaN"), "{err}");
    let err = Nf4Tensor::quantize(&w[..10], 2, 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2x32 matrix got 10 values"), "{err}");
    let err = Nf4Tensor::quantize(&[], 0, 32).unwrap_err().to_string();
    assert!(err.contains("at least one value"), "{err}");
    let err = Nf4Tensor::from_parts(2, 32, vec![0; 31], Absmax::Plain(vec![1.0]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("packs into 32 bytes, found 31"), "{err}");
    let err = Nf4Tensor::from_parts(2, 33, vec![0; 33], Absmax::Plain(vec![1.0]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 2 blocks of 64, but 1 absmax values"),
        "{err}"
    );
    let err = DoubleQuant::from_parts(vec![0; 257], vec![1.0], 0.1, dynamic_map())
        .unwrap_err()
        .to_string();
    assert!(err.contains("need 2 nested absmax values"), "{err}");
}

// ---- bitsandbytes fixture --------------------------------------------------------------------

const FIXTURE_PREFIXES: [&str; 3] = ["a", "b", "c"];

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4_bnb.safetensors")
}

/// The fixture, or None (with a message) when it has not been generated.
fn fixture() -> Option<SafetensorsFile> {
    let path = fixture_path();
    if !path.exists() {
        eprintln!(
            "SKIP: {} is absent; run tests/fixtures/make_nf4_fixture.py (torch + bitsandbytes) to make it",
            path.display()
        );
        return None;
    }
    Some(SafetensorsFile::open(&path).unwrap())
}

fn u8s(file: &SafetensorsFile, name: &str) -> Vec<u8> {
    file.raw_bytes(name).unwrap().to_vec()
}

fn f32s(file: &SafetensorsFile, name: &str) -> Vec<f32> {
    file.read_f32(name).unwrap()
}

fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// bitsandbytes' native CPU `quantize_blockwise` (csrc/cpu_ops.cpp), which the fixture's nested
/// codes come from: a table of 65536 steps over [-1, 1], each holding the code whose midpoint
/// interval contains the step's value, indexed by `(t + 1) · 0.5 · 65535 + 0.5` truncated.
fn bnb_cpu_lut_codes(absmax: &[f32], offset: f32, map: &[f32; 256], fused: bool) -> Vec<u8> {
    let mid: Vec<f32> = map.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
    let mut lut = vec![0u8; 65536];
    let mut k = 0;
    for (i, entry) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / 65535.0;
        while k < 255 && mid[k] < val {
            k += 1;
        }
        *entry = k as u8;
    }
    let mut codes = Vec::new();
    for group in absmax.chunks(NESTED_BLOCK) {
        let d = group.iter().fold(0.0f32, |a, &m| a.max((m - offset).abs()));
        let inv = 1.0 / d;
        for &m in group {
            let t = ((m - offset) * inv).clamp(-1.0, 1.0);
            let h = (t + 1.0) * 0.5;
            let idx = if fused {
                h.mul_add(65535.0, 0.5)
            } else {
                h * 65535.0 + 0.5
            };
            codes.push(lut[idx as u16 as usize]);
        }
    }
    codes
}

/// The reader rebuilds bitsandbytes' tensors and dequantizes them to exactly its values.
#[test]
fn bnb_fixture_reads_and_dequantizes_exactly() {
    let Some(file) = fixture() else { return };
    for p in FIXTURE_PREFIXES {
        let weight = format!("{p}.weight");
        assert!(is_bnb_4bit(&file, &weight));
        assert!(!is_bnb_4bit(&file, &format!("{p}.input")));
        let state = read_quant_state(&file, &weight).unwrap();
        let input = file.info(&format!("{p}.input")).unwrap();
        assert_eq!(state.shape[..], input.shape[..], "{p}");
        assert!(state.nested_offset.is_some());
        let q = read_nf4(&file, &weight).unwrap();
        assert_eq!(q.shape(), state.shape);
        assert_eq!(q.packed(), file.raw_bytes(&weight).unwrap());
        let expected = f32s(&file, &format!("{p}.dequant"));
        let got = q.dequantize();
        let differing = got
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        eprintln!(
            "{p} {:?}: {} values dequantized, {differing} differ bitwise from bitsandbytes",
            q.shape(),
            got.len()
        );
        assert_eq!(differing, 0, "{p}: dequantization is not bit-exact");
        // The row-range path agrees with the whole.
        let rows = q.rows();
        let part = q.dequantize_rows(rows / 3..rows - 1).unwrap();
        assert_eq!(part, got[rows / 3 * q.cols()..(rows - 1) * q.cols()]);
    }
}

/// Quantizing bitsandbytes' input reproduces its tensors.
#[test]
fn bnb_fixture_quantizes_like_bitsandbytes() {
    let Some(file) = fixture() else { return };
    let bnb_map: [f32; 256] = f32s(&file, "a.weight.nested_quant_map").try_into().unwrap();

    // The dynamic map is bitsandbytes' to the bit, in all three weights.
    let ours = dynamic_map();
    for p in FIXTURE_PREFIXES {
        let theirs = f32s(&file, &format!("{p}.weight.nested_quant_map"));
        let differing = (0..256)
            .filter(|&i| ours[i].to_bits() != theirs[i].to_bits())
            .count();
        assert_eq!(differing, 0, "{p}: {differing} dynamic-map entries differ");
    }
    eprintln!("dynamic map: 256 of 256 entries bit-identical to bitsandbytes'");

    for p in FIXTURE_PREFIXES {
        let weight = format!("{p}.weight");
        let state = read_quant_state(&file, &weight).unwrap();
        let [rows, cols] = state.shape;
        let input = f32s(&file, &format!("{p}.input"));

        // First level: packed codes and f32 absmax exactly.
        let plain = Nf4Tensor::quantize_plain(&input, rows, cols).unwrap();
        let bnb_packed = u8s(&file, &weight);
        let bytes_differing = plain
            .packed()
            .iter()
            .zip(&bnb_packed)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(plain.packed().len(), bnb_packed.len());
        let Absmax::Plain(absmax) = plain.absmax() else {
            unreachable!()
        };
        let bnb_absmax = f32s(&file, &format!("{p}.absmax_f32"));
        let absmax_differing = absmax
            .iter()
            .zip(&bnb_absmax)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();

        // Second level with bitsandbytes' offset and map: nested absmax exactly; codes exactly
        // as bitsandbytes' CPU lookup table gives them, and otherwise only where the table rounds
        // differently from the nearest value.
        let bnb_offset = state.nested_offset.unwrap();
        let dq = DoubleQuant::quantize_with(absmax, bnb_offset, &bnb_map).unwrap();
        let bnb_nested = f32s(&file, &format!("{weight}.nested_absmax"));
        assert_eq!(
            dq.nested_absmax()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            bnb_nested.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{p}: nested absmax"
        );
        let bnb_codes = u8s(&file, &format!("{weight}.absmax"));
        let lut_plain = bnb_cpu_lut_codes(absmax, bnb_offset, &bnb_map, false);
        let lut_fused = bnb_cpu_lut_codes(absmax, bnb_offset, &bnb_map, true);
        assert!(
            lut_plain == bnb_codes || lut_fused == bnb_codes,
            "{p}: the CPU lookup-table model does not reproduce bitsandbytes' codes"
        );
        let mut nearest_differing = 0;
        for (b, (&ours, &theirs)) in dq.codes().iter().zip(&bnb_codes).enumerate() {
            if ours != theirs {
                nearest_differing += 1;
                assert_eq!(
                    ours.abs_diff(theirs),
                    1,
                    "{p} absmax[{b}]: codes not adjacent"
                );
                let d = dq.nested_absmax()[b / NESTED_BLOCK];
                let t = (absmax[b] - bnb_offset) * (1.0 / d);
                let (lo, hi) = (ours.min(theirs) as usize, ours.max(theirs) as usize);
                let mid = 0.5 * (bnb_map[lo] + bnb_map[hi]);
                assert!(
                    (t - mid).abs() <= 2.0 / 65535.0,
                    "{p} absmax[{b}]: {t} is far from {mid}"
                );
            }
        }

        // Our own offset (mean in f64) against torch's f32 mean.
        let ours = Nf4Tensor::quantize(&input, rows, cols).unwrap();
        let Absmax::Double(our_dq) = ours.absmax() else {
            unreachable!()
        };
        let offset_ulps = ulps(our_dq.offset(), bnb_offset);

        // Whole pipeline with our offset and map against bitsandbytes' dequantization.
        let expected = f32s(&file, &format!("{p}.dequant"));
        let got = ours.dequantize();
        let (mut max_diff, mut exact) = (0.0f32, 0);
        for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
            let m = bnb_absmax[i / BLOCK];
            max_diff = max_diff.max((a - b).abs() / m);
            exact += usize::from(a.to_bits() == b.to_bits());
        }
        eprintln!(
            "{p} {rows}x{cols}: packed bytes differing {bytes_differing}/{}, f32 absmax differing \
             {absmax_differing}/{}, nested absmax exact ({}), absmax codes differing from the CPU \
             table 0, from nearest rounding {nearest_differing}/{}; our offset {} vs torch {} \
             ({offset_ulps} ulp); our full round trip: {exact}/{} values bit-identical to \
             bitsandbytes', max |diff|/M {max_diff:.2e}",
            bnb_packed.len(),
            bnb_absmax.len(),
            bnb_nested.len(),
            bnb_codes.len(),
            our_dq.offset(),
            bnb_offset,
            got.len()
        );
        assert_eq!(bytes_differing, 0, "{p}: packed codes");
        assert_eq!(absmax_differing, 0, "{p}: f32 absmax");
        assert!(
            offset_ulps <= 1,
            "{p}: offset {offset_ulps} ulp from torch's mean"
        );
        // Codes may differ where bitsandbytes' CPU table rounds away from the nearest value (each
        // such absmax then moves by one map step) and the offset and map may differ by an ulp.
        assert!(
            max_diff <= 2.0 * DYNAMIC_MAX_GAP,
            "{p}: max |diff|/M {max_diff}"
        );
    }
}

/// The same inputs quantized by bitsandbytes' CUDA kernels (tests/fixtures/nf4_bnb_cuda.safetensors,
/// made on an H200 with `make_nf4_fixture.py --cuda`): the path real checkpoints come from. Its
/// 8-bit codes are the nearest ones, as ours; it differs from ours only in all-zero NF4 blocks
/// (CUDA computes 0·(1/0) = NaN there and stores code 0, value -1·0 = -0.0; we store code 7, 0.0)
/// and in the offset, torch's f32 mean (here on the GPU), which may be an ulp from our f64 mean.
#[test]
fn bnb_cuda_fixture_matches_nearest_rounding() {
    let Some(cpu) = fixture() else { return };
    let path = fixture_path().with_file_name("nf4_bnb_cuda.safetensors");
    if !path.exists() {
        eprintln!(
            "SKIP: {} is absent (make_nf4_fixture.py --cuda makes it)",
            path.display()
        );
        return;
    }
    let cuda = SafetensorsFile::open(&path).unwrap();
    for p in FIXTURE_PREFIXES {
        let weight = format!("{p}.weight");
        let state = read_quant_state(&cuda, &weight).unwrap();
        let [rows, cols] = state.shape;
        let input = f32s(&cpu, &format!("{p}.input"));

        let plain = Nf4Tensor::quantize_plain(&input, rows, cols).unwrap();
        let cuda_packed = u8s(&cuda, &weight);
        let mut zero_block_bytes = 0;
        for (k, (&ours, &theirs)) in plain.packed().iter().zip(&cuda_packed).enumerate() {
            let block =
                &input[k / (BLOCK / 2) * BLOCK..((k / (BLOCK / 2) + 1) * BLOCK).min(input.len())];
            if block.iter().all(|&v| v == 0.0) {
                assert_eq!(
                    (ours, theirs),
                    (0x77, 0x00),
                    "{p} byte {k} of an all-zero block"
                );
                zero_block_bytes += 1;
            } else {
                assert_eq!(ours, theirs, "{p}: packed byte {k}");
            }
        }
        let Absmax::Plain(absmax) = plain.absmax() else {
            unreachable!()
        };
        let cuda_absmax = f32s(&cuda, &format!("{p}.absmax_f32"));
        assert_eq!(absmax, &cuda_absmax, "{p}: f32 absmax");

        let offset = state.nested_offset.unwrap();
        let map: [f32; 256] = f32s(&cuda, &format!("{weight}.nested_quant_map"))
            .try_into()
            .unwrap();
        assert_eq!(map, dynamic_map(), "{p}: the CUDA run's map");
        let dq = DoubleQuant::quantize_with(absmax, offset, &map).unwrap();
        assert_eq!(
            dq.codes(),
            u8s(&cuda, &format!("{weight}.absmax")),
            "{p}: absmax codes"
        );
        let nested = f32s(&cuda, &format!("{weight}.nested_absmax"));
        assert_eq!(dq.nested_absmax(), &nested[..], "{p}: nested absmax");

        let ours = Nf4Tensor::quantize(&input, rows, cols).unwrap();
        let Absmax::Double(our_dq) = ours.absmax() else {
            unreachable!()
        };
        let offset_ulps = ulps(our_dq.offset(), offset);
        assert!(
            offset_ulps <= 1,
            "{p}: offset {offset_ulps} ulp from CUDA torch's mean"
        );
        eprintln!(
            "{p} CUDA: packed bytes equal except the {zero_block_bytes} of the all-zero block; \
             absmax codes {n}/{n} and nested absmax equal; offset: ours {} vs CUDA {offset} \
             ({offset_ulps} ulp)",
            our_dq.offset(),
            n = dq.codes().len()
        );
    }
    // The reader reproduces the CUDA dequantization kernel's values.
    let q = read_nf4(&cuda, "c.weight").unwrap();
    let expected = f32s(&cuda, "c.dequant");
    let got = q.dequantize();
    assert!(
        got.iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "c: dequantization differs from bitsandbytes' CUDA kernel"
    );
}

// ---- malformed checkpoints ---------------------------------------------------------------------

/// The tensors of fixture weight `c` as raw entries named `x.weight...`.
fn fixture_weight_c(file: &SafetensorsFile) -> RawTensors {
    file.names()
        .filter(|n| n.starts_with("c.weight"))
        .map(|n| {
            let info = file.info(n).unwrap();
            (
                format!("x{}", &n[1..]),
                (
                    info.dtype.name().to_string(),
                    info.shape.clone(),
                    u8s(file, n),
                ),
            )
        })
        .collect()
}

fn json_state(tensors: &RawTensors) -> serde_json::Value {
    let bytes = &tensors["x.weight.quant_state.bitsandbytes__nf4"].2;
    serde_json::from_slice(bytes).unwrap()
}

fn set_json_state(tensors: &mut RawTensors, value: &serde_json::Value) {
    let bytes = value.to_string().into_bytes();
    let entry = tensors
        .get_mut("x.weight.quant_state.bitsandbytes__nf4")
        .unwrap();
    entry.1 = vec![bytes.len()];
    entry.2 = bytes;
}

#[test]
fn malformed_bnb_checkpoints_are_rejected_by_name() {
    let Some(file) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let good = fixture_weight_c(&file);
    let check = |name: &str, edit: &dyn Fn(&mut RawTensors), fragments: &[&str]| {
        let mut tensors = good.clone();
        edit(&mut tensors);
        let path = dir.path().join(format!("{name}.safetensors"));
        write_raw(&path, &tensors);
        let f = SafetensorsFile::open(&path).unwrap();
        let err = read_nf4(&f, "x.weight").unwrap_err();
        let message = err.to_string();
        for fragment in fragments {
            assert!(
                message.contains(fragment),
                "{name}: {message:?} lacks {fragment:?}"
            );
        }
        err
    };

    // The unmodified copy reads.
    let path = dir.path().join("good.safetensors");
    write_raw(&path, &good);
    read_nf4(&SafetensorsFile::open(&path).unwrap(), "x.weight").unwrap();

    let err = check(
        "no_absmax",
        &|t| {
            t.remove("x.weight.absmax");
        },
        &["missing tensor \"x.weight.absmax\""],
    );
    assert!(matches!(err, Error::MissingTensor { .. }));
    check(
        "no_state",
        &|t| {
            t.remove("x.weight.quant_state.bitsandbytes__nf4");
        },
        &["missing tensor \"x.weight.quant_state.bitsandbytes__nf4\""],
    );
    check(
        "no_nested_map",
        &|t| {
            t.remove("x.weight.nested_quant_map");
        },
        &["missing tensor \"x.weight.nested_quant_map\""],
    );
    check(
        "fp4",
        &|t| {
            let state = t.remove("x.weight.quant_state.bitsandbytes__nf4").unwrap();
            t.insert("x.weight.quant_state.bitsandbytes__fp4".into(), state);
        },
        &["\"x.weight\" is quantized to FP4", "only NF4 is supported"],
    );
    check(
        "short_packed",
        &|t| {
            let w = t.get_mut("x.weight").unwrap();
            w.2.pop();
            w.1 = vec![w.2.len(), 1];
        },
        &[
            "tensor \"x.weight\"",
            "holds 1270 bytes",
            "shape [33, 77]",
            "packs into 1271",
        ],
    );
    check(
        "absmax_count",
        &|t| {
            let a = t.get_mut("x.weight.absmax").unwrap();
            a.2.push(0);
            a.1 = vec![a.2.len()];
        },
        &[
            "tensor \"x.weight.absmax\"",
            "expected U8 [40]",
            "found U8 [41]",
        ],
    );
    check(
        "absmax_f32_when_nested",
        &|t| {
            let a = t.get_mut("x.weight.absmax").unwrap();
            a.0 = "F32".into();
            a.1 = vec![10];
        },
        &[
            "tensor \"x.weight.absmax\"",
            "expected U8 [40]",
            "found F32 [10]",
        ],
    );
    check(
        "nested_absmax_count",
        &|t| {
            let a = t.get_mut("x.weight.nested_absmax").unwrap();
            a.2.extend_from_slice(&1.0f32.to_le_bytes());
            a.1 = vec![2];
        },
        &[
            "tensor \"x.weight.nested_absmax\"",
            "expected F32 [1], found F32 [2]",
        ],
    );
    check(
        "quant_map",
        &|t| {
            let m = t.get_mut("x.weight.quant_map").unwrap();
            m.2[4 * 3..4 * 4].copy_from_slice(&(-0.4f32).to_le_bytes());
        },
        &[
            "tensor \"x.weight.quant_map\"",
            "not the NF4 code book: entry 3 is -0.4",
        ],
    );
    check(
        "nan_nested",
        &|t| {
            let m = t.get_mut("x.weight.nested_absmax").unwrap();
            m.2.copy_from_slice(&f32::NAN.to_le_bytes());
        },
        &["tensor \"x.weight.nested_absmax\"", "value 0 is NaN"],
    );
    let state = json_state(&good);
    for (name, key, value, fragments) in [
        (
            "blocksize",
            "blocksize",
            serde_json::json!(128),
            &["blocksize is 128; only 64"][..],
        ),
        (
            "quant_type",
            "quant_type",
            serde_json::json!("int4"),
            &["quant_type is \"int4\""][..],
        ),
        (
            "shape_3d",
            "shape",
            serde_json::json!([3, 11, 77]),
            &["shape is [3, 11, 77]"][..],
        ),
        (
            "nested_bs",
            "nested_blocksize",
            serde_json::json!(128),
            &["nested_blocksize is 128"][..],
        ),
        (
            "offset",
            "nested_offset",
            serde_json::json!("x"),
            &["\"nested_offset\" is not a finite"][..],
        ),
    ] {
        let mut edited = state.clone();
        edited[key] = value;
        let mut fragments = fragments.to_vec();
        fragments.push("tensor \"x.weight.quant_state.bitsandbytes__nf4\"");
        check(name, &|t| set_json_state(t, &edited), &fragments);
    }
    let mut edited = state.clone();
    edited.as_object_mut().unwrap().remove("shape");
    check(
        "no_shape",
        &|t| set_json_state(t, &edited),
        &["the quant state has no \"shape\""],
    );
    check(
        "not_json",
        &|t| {
            let s = t.get_mut("x.weight.quant_state.bitsandbytes__nf4").unwrap();
            s.2 = b"{oops".to_vec();
            s.1 = vec![5];
        },
        &["x.weight.quant_state.bitsandbytes__nf4", "not valid JSON"],
    );
    // Without double quantization: f32 absmax, no nested tensors, no nested_* fields.
    let mut plain_state = state.clone();
    for key in ["nested_offset", "nested_blocksize", "nested_dtype"] {
        plain_state.as_object_mut().unwrap().remove(key);
    }
    let absmax_f32 = file.raw_bytes("c.absmax_f32").unwrap().to_vec();
    let mut plain = good.clone();
    set_json_state(&mut plain, &plain_state);
    plain.remove("x.weight.nested_absmax");
    plain.remove("x.weight.nested_quant_map");
    plain.insert(
        "x.weight.absmax".into(),
        ("F32".into(), vec![40], absmax_f32),
    );
    let path = dir.path().join("plain.safetensors");
    write_raw(&path, &plain);
    let q = read_nf4(&SafetensorsFile::open(&path).unwrap(), "x.weight").unwrap();
    assert!(matches!(q.absmax(), Absmax::Plain(_)));
    let input = f32s(&file, "c.input");
    let expected = Nf4Tensor::quantize_plain(&input, 33, 77).unwrap();
    assert_eq!(
        q, expected,
        "plain-absmax checkpoint reads as quantize_plain makes it"
    );
    // A nested tensor left behind without nested_offset is inconsistent.
    let mut stray = plain.clone();
    stray.insert(
        "x.weight.nested_absmax".into(),
        good["x.weight.nested_absmax"].clone(),
    );
    let path = dir.path().join("stray.safetensors");
    write_raw(&path, &stray);
    let err = read_nf4(&SafetensorsFile::open(&path).unwrap(), "x.weight").unwrap_err();
    assert!(
        err.to_string()
            .contains("is present, but the quant state has no nested_offset"),
        "{err}"
    );
    // nf4_code is what both paths use.
    assert_eq!(nf4_code(0.0), NF4_ZERO_CODE);
}
