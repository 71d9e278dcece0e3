//! Every GGUF tensor type this library reads, checked against the real consumer, llama.cpp
//! (prebuilt, driven through node-llama-cpp 3.21.1 by tests/llamacpp/interop.mjs).
//!
//! For each type T a tiny random llama model (hidden 256, so that rows fill whole K-quant blocks)
//! is written as GGUF with every matrix (embedding, projections, LM head) stored as T and the norm
//! weights as F32. This library loads the file (src/io/gguf/dequant.rs turns T into f32) and
//! llama.cpp loads the same file; both score the same token sequences, and at every position the
//! two logit vectors must agree. Since the bytes are the same, any difference in how a block is
//! read (a scale, an offset, a bit or nibble order) shows up as a large difference in the logits,
//! while llama.cpp's own rounding (activations quantized to 8 bits in its quantized dot products,
//! F16 KV cache) stays within about 2% (see [`max_rel_diff`]). The embedding is read by
//! llama.cpp's row dequantization (`get_rows`), every other matrix by its dot products, so both
//! of llama.cpp's code paths for each type take part.
//!
//! The quantized blocks come from the simple encoders below (test-only: they need to produce
//! valid blocks that use every field and bit, not good approximations; e.g. the 6-bit K-quant
//! scales and mins span 0..=63, Q4_0/Q5_0 scales and Q6_K sub-block scales take both signs);
//! F32, F16, BF16 and Q8_0 use the library's own encoder (src/io/gguf/quant.rs), which GGUF
//! export uses. The test also checks that this library decodes the blocks back to the weights
//! they were made from: agreement with llama.cpp on blocks that decode to something else (all
//! zeros, say) would prove little.
//!
//! Skips, saying why, without node-llama-cpp (tests/llamacpp/setup.sh installs it).

mod common;

use common::llamacpp::{interop_dir, llama_cpp};
use finetune::api::{Device, Model, ModelParams};
use finetune::backend::IGNORE_LABEL;
use finetune::io::gguf::config::metadata;
use finetune::io::gguf::dequant::dequantize;
use finetune::io::gguf::names::{permute_rows, spec_permutation, tensor_name, Direction};
use finetune::io::gguf::quant::{can_encode, quantize};
use finetune::io::gguf::writer::{write_gguf, TensorEntry};
use finetune::io::gguf::{GgmlType, MetaValue, ValueType};
use finetune::model::config::{Family, ModelConfig};
use finetune::model::presets::tiny;
use finetune::model::weights::{random_weights, tensor_specs, Slot};
use finetune::rng::Rng;
use finetune::train::batch::Batch;
use half::f16;
use serde_json::json;
use std::path::Path;

/// Sequences scored per type, and their length.
const SEQUENCES: usize = 4;
const SEQ_LEN: usize = 40;

/// Largest accepted relative difference between the two logit vectors at any position (see
/// [`compare`]); the mean over positions must stay within half of it.
///
/// What remains when both sides decode alike is llama.cpp's arithmetic: its CPU products take
/// quantized weights with activations quantized to 8 bits (Q8_0 blocks of 32 for the 32-value
/// types, Q8_K blocks of 256 for K-quants), F16 weights with F16 activations, BF16 with BF16, and
/// its KV cache is F16. Measured (x86-64, AVX2): at most 0.0005 for F32, 0.0008 for F16, 0.0042
/// for BF16, 0.016 for the 32-value types and 0.022 for K-quants. A decoding error is far larger:
/// every single-line mistake tried in dequant.rs (a wrong offset, bit, nibble order, scale index
/// or field order, in each type) gave 0.48 or more, mostly above 1.
fn max_rel_diff(ty: GgmlType) -> f32 {
    match ty {
        GgmlType::F32 | GgmlType::F16 => 0.005,
        GgmlType::BF16 => 0.02,
        _ => 0.08,
    }
}

/// Where the two arg-max tokens differ (at most one position in 10), the largest accepted gap
/// between the two tokens' logits (in our logits): a swap of near-ties only. Logits have a
/// standard deviation of about 4 (see [`LM_HEAD_SCALE`]); measured gaps are below 0.2.
const MAX_TIE_GAP: f32 = 0.5;

/// A llama model whose every matrix row fills whole blocks of every type: rows of 256 or 512
/// values (K-quant blocks hold 256), 4 query heads and 2 KV heads of 64, vocabulary 256.
fn config() -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..tiny(Family::Llama)
    }
}

/// The LM head is multiplied by this so that logits have a standard deviation of about 4:
/// arg-max tokens then stand apart from the runner-up and a wrong decoding changes them.
const LM_HEAD_SCALE: f32 = 4.0;

// ---------------------------------------------------------------------------------------------
// Test-only encoders of ggml blocks (layouts of ggml's block_* structs; see dequant.rs).
// ---------------------------------------------------------------------------------------------

/// `x` rounded to f16, as a stored scale is.
fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The value of largest magnitude, with its sign.
fn signed_max(x: &[f32]) -> f32 {
    x.iter()
        .copied()
        .fold(0.0, |a, v| if v.abs() > a.abs() { v } else { a })
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// `v` rounded into `0..=max`.
fn level(v: f32, max: u8) -> u8 {
    v.round().clamp(0.0, max as f32) as u8
}

/// 32 values of 4 bits: value j in the low nibble of byte j, value j+16 in its high nibble.
fn pack_nibbles(q: &[u8; 32], out: &mut Vec<u8>) {
    out.extend((0..16).map(|j| (q[j] & 15) | (q[j + 16] & 15) << 4));
}

/// The fifth bits of 32 values of 5 bits: bit j of a little-endian u32 for value j.
fn pack_fifth_bits(q: &[u8; 32], out: &mut Vec<u8>) {
    let h = (0..32).fold(0u32, |h, j| h | (((q[j] >> 4) & 1) as u32) << j);
    out.extend(h.to_le_bytes());
}

/// block_q4_0 { d; qs[16] }: value = d·(q − 8). d = m / −8 for the value m of largest magnitude
/// (so d takes either sign), as ggml does.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let d = f16r(signed_max(x) / -8.0);
    let q: [u8; 32] = std::array::from_fn(|i| level(x[i] * inv(d) + 8.0, 15));
    out.extend(f16b(d));
    pack_nibbles(&q, out);
}

/// block_q4_1 { d; m; qs[16] }: value = d·q + m, m the minimum.
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (lo, hi) = min_max(x);
    let (d, m) = (f16r((hi - lo) / 15.0), f16r(lo));
    let q: [u8; 32] = std::array::from_fn(|i| level((x[i] - m) * inv(d), 15));
    out.extend(f16b(d));
    out.extend(f16b(m));
    pack_nibbles(&q, out);
}

/// block_q5_0 { d; qh[4]; qs[16] }: value = d·(q − 16), d = m / −16.
fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let d = f16r(signed_max(x) / -16.0);
    let q: [u8; 32] = std::array::from_fn(|i| level(x[i] * inv(d) + 16.0, 31));
    out.extend(f16b(d));
    pack_fifth_bits(&q, out);
    pack_nibbles(&q, out);
}

/// block_q5_1 { d; m; qh[4]; qs[16] }: value = d·q + m.
fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (lo, hi) = min_max(x);
    let (d, m) = (f16r((hi - lo) / 31.0), f16r(lo));
    let q: [u8; 32] = std::array::from_fn(|i| level((x[i] - m) * inv(d), 31));
    out.extend(f16b(d));
    out.extend(f16b(m));
    pack_fifth_bits(&q, out);
    pack_nibbles(&q, out);
}

/// The 12 bytes holding 8 six-bit scales and mins of a Q4_K/Q5_K block: bytes 0..4 hold scales
/// 0..4 and bytes 4..8 mins 0..4 in their low 6 bits; bytes 8..12 hold the low nibbles of scale
/// (low) and min (high) 4..8, whose top two bits go to the top of bytes 0..4 (scales) and 4..8
/// (mins).
fn pack_k_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        s[j + 4] = m[j] | (m[j + 4] >> 4) << 6;
        s[j + 8] = (sc[j + 4] & 15) | (m[j + 4] & 15) << 4;
    }
    s
}

/// A Q4_K or Q5_K block's fields for levels `0..=nmax`: (d, dmin, scales, mins, q[256]) with
/// value i = d·sc[s]·q[i] − dmin·m[s] for its sub-block s = i / 32.
fn k_fields(x: &[f32], nmax: u8) -> (f32, f32, [u8; 8], [u8; 8], [u8; 256]) {
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for (s, sub) in x.chunks_exact(32).enumerate() {
        let (lo, hi) = min_max(sub);
        let lo = lo.min(0.0);
        scale[s] = (hi - lo) / nmax as f32;
        min[s] = -lo;
    }
    let d = f16r(scale.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let dmin = f16r(min.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
    let sc: [u8; 8] = std::array::from_fn(|s| level(scale[s] * inv(d), 63));
    let m: [u8; 8] = std::array::from_fn(|s| level(min[s] * inv(dmin), 63));
    let q: [u8; 256] = std::array::from_fn(|i| {
        let s = i / 32;
        level((x[i] + dmin * m[s] as f32) * inv(d * sc[s] as f32), nmax)
    });
    (d, dmin, sc, m, q)
}

/// The 4-bit parts of a K block: the 64 values of sub-blocks 2k and 2k+1 take the low then the
/// high nibbles of bytes 32k..32k+32.
fn pack_k_nibbles(q: &[u8; 256], out: &mut Vec<u8>) {
    for k in 0..4 {
        out.extend((0..32).map(|l| (q[64 * k + l] & 15) | (q[64 * k + 32 + l] & 15) << 4));
    }
}

/// block_q4_K { d; dmin; scales[12]; qs[128] }.
fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, sc, m, q) = k_fields(x, 15);
    out.extend(f16b(d));
    out.extend(f16b(dmin));
    out.extend(pack_k_scales(&sc, &m));
    pack_k_nibbles(&q, out);
}

/// block_q5_K { d; dmin; scales[12]; qh[32]; qs[128] }: the fifth bit of value l of sub-block s
/// is bit s of qh[l].
fn q5_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, sc, m, q) = k_fields(x, 31);
    out.extend(f16b(d));
    out.extend(f16b(dmin));
    out.extend(pack_k_scales(&sc, &m));
    let mut qh = [0u8; 32];
    for (i, &v) in q.iter().enumerate() {
        qh[i % 32] |= ((v >> 4) & 1) << (i / 32);
    }
    out.extend(qh);
    pack_k_nibbles(&q, out);
}

/// block_q6_K { ql[128]; qh[64]; scales[16] as i8; d }: value i = d·sc[i/16]·(q[i] − 32) with
/// q of 6 bits. Sub-block scales are m / −32 for the value m of largest magnitude, so they take
/// either sign. Value i = 128n + 32p + l (half n, quarter p, l < 32) keeps its low 4 bits in
/// ql[64n + l + 32(p & 1)] (low nibble for p < 2, high for p ≥ 2) and its top 2 bits in bits
/// 2p, 2p+1 of qh[32n + l].
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|s| signed_max(&x[16 * s..16 * s + 16]) / -32.0);
    let d = f16r(scale.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0);
    let sc: [i8; 16] =
        std::array::from_fn(|s| (scale[s] * inv(d)).round().clamp(-128.0, 127.0) as i8);
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (i, &v) in x.iter().enumerate() {
        let q = level(v * inv(d * sc[i / 16] as f32) + 32.0, 63);
        let (n, p, l) = (i / 128, i % 128 / 32, i % 32);
        ql[64 * n + l + 32 * (p & 1)] |= (q & 15) << (4 * (p >> 1));
        qh[32 * n + l] |= (q >> 4) << (2 * p);
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|s| s as u8));
    out.extend(f16b(d));
}

/// `values` (whole rows of whole blocks) encoded as `ty`.
fn encode(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    if can_encode(ty) {
        return quantize(ty, values);
    }
    let block: fn(&[f32], &mut Vec<u8>) = match ty {
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        other => unreachable!("{other} is encoded by the library"),
    };
    let mut out = Vec::with_capacity(values.len() / ty.block_size() * ty.type_size());
    for x in values.chunks_exact(ty.block_size()) {
        block(x, &mut out);
    }
    assert_eq!(out.len(), values.len() / ty.block_size() * ty.type_size());
    out
}

// ---------------------------------------------------------------------------------------------
// The model file.
// ---------------------------------------------------------------------------------------------

/// A byte-level BPE vocabulary of 256 tokens without merges ("gpt2", as llama.cpp names it): the
/// least llama.cpp needs to load a model.
fn vocabulary() -> Vec<(String, MetaValue)> {
    // GPT-2's byte-to-character map: printable bytes stand for themselves, the others for
    // U+0100 onwards.
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    let tokens: Vec<String> = (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect();
    let n = tokens.len();
    vec![
        (
            "tokenizer.ggml.model".into(),
            MetaValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            MetaValue::String("default".into()),
        ),
        ("tokenizer.ggml.tokens".into(), MetaValue::strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(ValueType::I32, vec![MetaValue::I32(1); n]),
        ),
        (
            "tokenizer.ggml.merges".into(),
            MetaValue::strings(Vec::<String>::new()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(1)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(false),
        ),
    ]
}

/// Writes the model as GGUF with every matrix as `ty` and returns the relative RMS difference,
/// over all matrices, between the weights and this library's decoding of their blocks.
fn write_model(path: &Path, cfg: &ModelConfig, ty: GgmlType) -> f32 {
    let specs = tensor_specs(cfg);
    let mut weights = random_weights(cfg, 11);
    let values: Vec<Vec<f32>> = specs
        .iter()
        .map(|spec| {
            let mut v = weights(spec);
            if spec.slot == Slot::LmHead {
                v.iter_mut().for_each(|x| *x *= LM_HEAD_SCALE);
            }
            match spec_permutation(cfg, spec) {
                Some((heads, cols)) => permute_rows(&v, heads, cols, Direction::HfToGguf),
                None => v,
            }
        })
        .collect();
    let entries: Vec<TensorEntry> = specs
        .iter()
        .map(|s| {
            let vector = s.file_shape().len() == 1;
            let stored = if vector { GgmlType::F32 } else { ty };
            assert_eq!(s.cols % stored.block_size(), 0, "{}", s.name);
            TensorEntry::new(
                tensor_name(s.slot),
                s.cols,
                (!vector).then_some(s.rows),
                stored,
            )
        })
        .collect();
    let mut meta = metadata(cfg, &format!("random-{ty}")).unwrap();
    meta.push(("general.file_type".into(), MetaValue::U32(ty.file_type())));
    meta.extend(vocabulary());
    let (mut err2, mut norm2) = (0f64, 0f64);
    write_gguf(path, &meta, &entries, |i| {
        let bytes = encode(entries[i].ggml_type, &values[i]);
        if entries[i].ggml_type == ty {
            let mut back = vec![0.0; values[i].len()];
            dequantize(ty, &bytes, &mut back);
            for (a, b) in values[i].iter().zip(&back) {
                err2 += ((a - b) as f64).powi(2);
                norm2 += (*a as f64).powi(2);
            }
        }
        Ok(bytes)
    })
    .unwrap();
    (err2 / norm2).sqrt() as f32
}

/// The largest relative RMS error of decoding a type's blocks of normal weights that still
/// counts as a working encoder (4 bits per value: about 0.1).
fn max_encoding_error(ty: GgmlType) -> f32 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1e-3,
        GgmlType::BF16 => 5e-3,
        GgmlType::Q8_0 => 0.02,
        _ => 0.2,
    }
}

// ---------------------------------------------------------------------------------------------
// The comparison.
// ---------------------------------------------------------------------------------------------

/// How far apart the two sides' logits are for one type.
#[derive(Default)]
struct Agreement {
    positions: usize,
    top1_agree: usize,
    max_rel: f32,
    sum_rel: f32,
    worst_gap: f32,
}

/// `v` minus its mean: logits and log-probabilities differ by a constant per position.
fn centered(v: &[f32]) -> Vec<f32> {
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    v.iter().map(|x| x - mean).collect()
}

fn arg_max(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

/// Compares our logits with llama.cpp's log-probabilities at one position: the relative
/// difference ‖c(ours) − c(theirs)‖ / ‖c(ours)‖ of the mean-centred vectors, and the arg-max.
fn compare(agreement: &mut Agreement, ours: &[f32], theirs: &[f32]) {
    let (a, b) = (centered(ours), centered(theirs));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
    let norm = a.iter().map(|x| x * x).sum::<f32>();
    // NaN (a garbage scale) counts as the largest difference.
    let rel = Some((diff / norm).sqrt())
        .filter(|r| r.is_finite())
        .unwrap_or(f32::INFINITY);
    agreement.positions += 1;
    agreement.max_rel = agreement.max_rel.max(rel);
    agreement.sum_rel += rel;
    let (mine, their) = (arg_max(ours), arg_max(theirs));
    if mine == their {
        agreement.top1_agree += 1;
    } else {
        agreement.worst_gap = agreement.worst_gap.max(ours[mine] - ours[their]);
    }
}

#[test]
fn every_tensor_type_reads_as_llama_cpp_reads_it() {
    let Some(dir) = interop_dir() else { return };
    let cfg = config();
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(3);
    let sequences: Vec<Vec<i32>> = (0..SEQUENCES)
        .map(|_| {
            (0..SEQ_LEN)
                .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as i32)
                .collect()
        })
        .collect();
    let params = ModelParams {
        device: Device::Cpu,
        threads: 2,
        ..ModelParams::default()
    };

    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for ty in GgmlType::ALL {
        let path = tmp.path().join(format!("{ty}.gguf"));
        let encoding_error = write_model(&path, &cfg, ty);
        let m = Model::load(&path, &params).unwrap();
        assert_eq!(m.config(), &cfg, "{ty}");
        let logits: Vec<Vec<f32>> = sequences
            .iter()
            .map(|s| {
                let b = Batch::new(1, s.len(), s.clone(), vec![IGNORE_LABEL; s.len()]).unwrap();
                m.logits(&b, None).unwrap()
            })
            .collect();
        ours.push((ty, encoding_error, logits));
        jobs.push(json!({"model": path, "score": sequences}));
    }
    let results = llama_cpp(&dir, &json!(jobs));

    let vocab = cfg.vocab_size;
    let mut failures = Vec::new();
    for ((ty, encoding_error, logits), result) in ours.iter().zip(&results) {
        let theirs: Vec<Vec<Vec<Option<f32>>>> =
            serde_json::from_value(result["log_probs"].clone()).unwrap();
        assert_eq!(theirs.len(), SEQUENCES, "{ty}");
        let mut a = Agreement::default();
        for (ours, theirs) in logits.iter().zip(&theirs) {
            assert_eq!(theirs.len(), SEQ_LEN, "{ty}: positions");
            for (pos, row) in theirs.iter().enumerate() {
                let row: Vec<f32> = row
                    .iter()
                    .map(|p| p.filter(|p| p.is_finite()))
                    .collect::<Option<_>>()
                    .unwrap_or_else(|| {
                        panic!("{ty}: llama.cpp gave no finite log-probability for some token")
                    });
                assert_eq!(row.len(), vocab, "{ty}: llama.cpp's vocabulary");
                compare(&mut a, &ours[pos * vocab..(pos + 1) * vocab], &row);
            }
        }
        let mean = a.sum_rel / a.positions as f32;
        eprintln!(
            "{ty:>5}: arg-max agrees at {}/{} positions (largest gap where not {:.3}); \
             logits differ by {:.4} at most, {:.4} on average (relative); \
             encoding error {encoding_error:.4}",
            a.top1_agree, a.positions, a.worst_gap, a.max_rel, mean
        );
        let tolerance = max_rel_diff(*ty);
        if !(a.max_rel <= tolerance && mean <= tolerance / 2.0)
            || a.worst_gap > MAX_TIE_GAP
            || a.top1_agree * 10 < a.positions * 9
        {
            failures.push(format!(
                "{ty}: this library and llama.cpp read it differently"
            ));
        } else if *encoding_error > max_encoding_error(*ty) {
            // Both read the blocks alike, but not as the weights they were made from: the
            // test's encoder is wrong, and agreement on wrong weights proves less.
            failures.push(format!(
                "{ty}: the blocks decode with relative error {encoding_error} (encoder broken?)"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
