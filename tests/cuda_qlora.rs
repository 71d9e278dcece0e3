//! NF4 (QLoRA) on the CUDA backend against the CPU reference: the dequantization kernel, the
//! quantization kernels, products with an NF4 operand, the memory account, and whole QLoRA
//! training steps. Each test skips (saying so) where no CUDA GPU is usable, unless
//! FINETUNE_REQUIRE_GPU=1, where a missing GPU is a failure (scripts/test_gpu.sh sets it).
//!
//! Tolerances.
//! - Dequantization: bit-exact. Both sides compute M'_b = DYN[k]·D + c with two f32 roundings and
//!   x' = NF4[q]·M'_b with one (the kernel uses non-fusing intrinsics), so the f32 values are
//!   identical; the kernel then rounds them to bf16, and the test compares with the CPU's values
//!   rounded to bf16 (round to nearest even on both sides): equal values (−0 and +0 alike, as the
//!   product that reads the kernel's output cannot tell them apart).
//! - Quantization: the packed 4-bit codes bit-exact (they depend only on the values and their
//!   block's absmax, computed the same way). The absmax codes too when the GPU's mean of the
//!   absmax values (summed in another order) rounds to the same f32 offset as the CPU's; when it
//!   is an ulp away, every dequantized value must agree within one step of the 8-bit map scaled by
//!   its group's nested absmax plus f32 rounding: |Δx'| ≤ H·D_g + 8ε·(M_b + D_g + |c|),
//!   H = DYNAMIC_MAX_GAP.
//! - Products: the GPU multiplies bf16 values (the dequantized matrix and the other operand
//!   rounded to bf16) with f32 accumulation; the CPU reference gets the same bf16-rounded values,
//!   so only the summation order differs: relative error below 1e-5.
//! - Training steps (tiny models, head_dim 8, NF4 projections quantized on each device from the
//!   same f32 values): the GPU rounds every activation entering a base product to bf16 and the
//!   base matrices are bf16 roundings of the CPU's f32 dequantized values, so the loss agrees
//!   within 1e-2 relative and each LoRA gradient with cosine similarity ≥ 0.999.

mod common;

use common::gpu::{cpu, gpu, recorded_steps_match_unrecorded, steps_match, Base};
use common::{bf16_round, fresh_rng, randn, rel_err};
use finetune::api::{Device, Model, ModelParams};
use finetune::backend::cuda::Dtype;
use finetune::backend::cuda::F32Products;
use finetune::backend::cuda::{
    CudaBackend, CudaTensor, DEQUANTIZED_SLOTS, MAX_FOLDED_RANK, PROJECTION_ROOM,
};
use finetune::backend::Backend;
use finetune::backend::ProductOutput::{GatedOperand, Rounded, Sums};
use finetune::error::Error;
use finetune::model::presets::preset;
use finetune::model::weights::{tensor_specs, Slot};
use finetune::quant::nf4::{
    Absmax, Nf4Tensor, BLOCK, DYNAMIC_MAX_GAP, NESTED_BLOCK, NF4_THRESHOLDS,
};
use finetune::quant::Quantization;
use finetune::rng::Rng;

/// Weight-like values with what the quantizers must get right: N(0, 0.02²) with outliers, an
/// all-zero block, and blocks whose absmax is 1 holding every NF4 threshold and the f32 values
/// either side of it.
fn weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n)
        .map(|_| {
            let x = 0.02 * rng.normal();
            if rng.next_u64() % 500 == 0 {
                12.0 * x
            } else {
                x
            }
        })
        .collect();
    if n >= 4 * BLOCK {
        v[BLOCK..2 * BLOCK].fill(0.0);
        let edges: Vec<f32> = NF4_THRESHOLDS
            .iter()
            .flat_map(|t| {
                let b = t.to_bits();
                [f32::from_bits(b - 1), *t, f32::from_bits(b + 1)]
            })
            .collect();
        for (k, chunk) in edges.chunks(BLOCK - 1).enumerate() {
            let start = (2 + k) * BLOCK;
            if start + BLOCK <= n {
                v[start] = 1.0;
                v[start + 1..start + 1 + chunk.len()].copy_from_slice(chunk);
            }
        }
    }
    v
}

/// Shapes: odd n with a short last block; several nested groups with a short last one; one row;
/// groups of 32 values in rows (the kernel for the models' shapes) with a short last group.
const SHAPES: [(usize, usize); 4] = [
    (37, 91),
    (300, 260),
    (1, 3 * BLOCK * NESTED_BLOCK + 70),
    (96, 320),
];

#[test]
fn dequantization_matches_the_cpu_exactly() {
    let Some(g) = gpu() else { return };
    let mut rng = fresh_rng("nf4 dequantization");
    for (rows, cols) in SHAPES {
        let values = weights(&mut rng, rows * cols);
        for plain in [false, true] {
            let q = if plain {
                Nf4Tensor::quantize_plain(&values, rows, cols).unwrap()
            } else {
                Nf4Tensor::quantize(&values, rows, cols).unwrap()
            };
            let t = g.upload_nf4(q.clone()).unwrap();
            assert_eq!(g.download_nf4(&t).unwrap(), q, "stored as uploaded");
            let expected = q.dequantize();
            assert_eq!(g.download(&t).unwrap(), expected, "download dequantizes");
            // The bf16 kernel through a product with the identity: each output is 1·w + Σ 0·w',
            // exact in f32, so C = I·Wᵀ holds the kernel's bf16 values of W transposed.
            if cols > 1024 {
                continue;
            }
            let mut identity = vec![0.0f32; cols * cols];
            (0..cols).for_each(|i| identity[i * cols + i] = 1.0);
            let eye = g.upload(&identity, cols, cols).unwrap();
            let mut c = g.zeros(cols, rows).unwrap();
            g.matmul(&eye, false, &t, true, 1.0, &mut c, false).unwrap();
            let got = g.download(&c).unwrap();
            let want = bf16_round(&expected);
            // Compared as numbers, so that −0 equals +0: an all-zero block whose double-quantized
            // scale comes out negative dequantizes to −0, which the product's sum makes +0. A
            // NaN never equals anything.
            let mismatches = (0..rows * cols)
                .filter(|&k| {
                    let (i, j) = (k / cols, k % cols);
                    got[j * rows + i] != want[k]
                })
                .count();
            eprintln!("{rows}x{cols} (plain absmax {plain}): {mismatches} bf16 values differ");
            assert_eq!(mismatches, 0);
        }
    }
}

#[test]
fn device_quantization_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = fresh_rng("nf4 quantization");
    for (rows, cols) in SHAPES {
        let values = weights(&mut rng, rows * cols);
        let want = Nf4Tensor::quantize(&values, rows, cols).unwrap();
        let got = g
            .download_nf4(&g.upload_frozen_nf4(&values, rows, cols).unwrap())
            .unwrap();
        assert!(
            got.packed() == want.packed(),
            "{rows}x{cols}: packed codes differ"
        );
        let (Absmax::Double(dg), Absmax::Double(dc)) = (got.absmax(), want.absmax()) else {
            panic!("both double quantize")
        };
        assert_eq!(dg.map(), dc.map(), "the 8-bit map");
        if dg.offset() == dc.offset() {
            assert_eq!(
                got, want,
                "{rows}x{cols}: same offset, so the same absmax codes"
            );
            eprintln!("{rows}x{cols}: bit-exact (offset {})", dg.offset());
            continue;
        }
        eprintln!(
            "{rows}x{cols}: offsets differ by summation order ({} vs {}); comparing values",
            dg.offset(),
            dc.offset()
        );
        let (xg, xc) = (got.dequantize(), want.dequantize());
        let eps = f32::EPSILON;
        for (i, (a, b)) in xg.iter().zip(&xc).enumerate() {
            let (block, group) = (i / BLOCK, i / BLOCK / NESTED_BLOCK);
            let m = dc.value(block).abs();
            let d = dc.nested_absmax()[group].max(dg.nested_absmax()[group]);
            let bound = DYNAMIC_MAX_GAP * d + 8.0 * eps * (m + d + dc.offset().abs());
            assert!((a - b).abs() <= bound, "[{i}]: {a} vs {b}, bound {bound}");
        }
    }
    let mut bad = vec![0.5f32; 128];
    bad[70] = f32::INFINITY;
    let message = g.upload_frozen_nf4(&bad, 2, 64).unwrap_err().to_string();
    assert!(message.contains("row 1, column 6"), "{message}");
}

#[test]
fn nf4_products_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = fresh_rng("nf4 products");
    // The second matrix is larger than the first, so the scratch grows between products; more
    // matrices than scratch slots, used in an order that finds some still dequantized and
    // refills the least recently used slot for others.
    let mut matrices = Vec::new();
    for (rows, cols) in [(96, 200), (300, 260), (64, 64), (128, 96), (50, 300)] {
        let q = Nf4Tensor::quantize(&weights(&mut rng, rows * cols), rows, cols).unwrap();
        let reference = bf16_round(&q.dequantize());
        matrices.push((g.upload_nf4(q).unwrap(), reference, rows, cols));
    }
    assert!(matrices.len() > DEQUANTIZED_SLOTS);
    for i in [0, 1, 0, 2, 3, 0, 4, 1, 1, 0, 2] {
        let (wg, reference, rows, cols) = &matrices[i];
        let wc = c.upload(reference, *rows, *cols).unwrap();
        for w_is_a in [false, true] {
            for trans_w in [false, true] {
                let m = 1 + (rng.next_u64() % 40) as usize;
                let (wr, wcols) = if trans_w {
                    (*cols, *rows)
                } else {
                    (*rows, *cols)
                };
                // The other operand untransposed: [wcols, m] after W, or [m, wr] before it.
                let (other, out) = if w_is_a {
                    ((wcols, m), (wr, m))
                } else {
                    ((m, wr), (m, wcols))
                };
                let ov = randn(&mut rng, other.0 * other.1, 1.0);
                let og = g.upload(&ov, other.0, other.1).unwrap();
                let oc = c.upload(&bf16_round(&ov), other.0, other.1).unwrap();
                let c0 = randn(&mut rng, out.0 * out.1, 1.0);
                let mut cg = g.upload(&c0, out.0, out.1).unwrap();
                let mut cc = c.upload(&c0, out.0, out.1).unwrap();
                if w_is_a {
                    g.matmul(wg, trans_w, &og, false, 0.7, &mut cg, true)
                        .unwrap();
                    c.matmul(&wc, trans_w, &oc, false, 0.7, &mut cc, true)
                        .unwrap();
                } else {
                    g.matmul(&og, false, wg, trans_w, 0.7, &mut cg, true)
                        .unwrap();
                    c.matmul(&oc, false, &wc, trans_w, 0.7, &mut cc, true)
                        .unwrap();
                }
                let e = rel_err(&g.download(&cg).unwrap(), &c.download(&cc).unwrap());
                eprintln!(
                    "{rows}x{cols} as {} trans {trans_w}, m {m}: relative error {e:.1e}",
                    if w_is_a { "a" } else { "b" }
                );
                assert!(e < 1e-5, "relative error {e}");
            }
        }
    }
    let mut out = g.zeros(96, 96).unwrap();
    let w = &matrices[0].0;
    let err = g
        .matmul(w, false, w, true, 1.0, &mut out, false)
        .unwrap_err();
    assert!(err.to_string().contains("two NF4"), "{err}");
    let x = g.zeros(96, 200).unwrap();
    assert!(g.add_assign(&mut g.zeros(96, 200).unwrap(), w).is_err());
    assert!(g.sum_squares(&[&x, w]).is_err());
}

/// bf16 values a scratch slot holds for a `[rows, cols]` NF4 matrix: with room for the rows and
/// columns of an adapter of rank up to MAX_FOLDED_RANK folded into its products where its rows
/// can take them (cols a multiple of 8), else the matrix alone.
fn slot_values(rows: usize, cols: usize) -> usize {
    match cols % 8 {
        0 => (rows + MAX_FOLDED_RANK) * (cols + MAX_FOLDED_RANK),
        _ => rows * cols,
    }
}

/// Bytes an NF4 matrix of `n` values with double-quantized absmax holds: packed codes, one code
/// per block, one f32 per group, the 256-value map and the offset.
fn nf4_bytes(n: usize) -> usize {
    let blocks = n.div_ceil(BLOCK);
    n.div_ceil(2) + blocks + 4 * blocks.div_ceil(NESTED_BLOCK) + 4 * 256 + 4
}

#[test]
fn memory_account_counts_packed_storage_and_the_scratch() {
    let Some(g) = gpu() else { return };
    let mut rng = fresh_rng("nf4 memory");
    let live = || g.device_memory().unwrap().live_bytes;
    let start = live();
    // The first NF4 matrix brings the scratch: its slots of 2 bytes a value of the largest
    // matrix so far, with the room of folded products (none for 260 columns, which are not a
    // multiple of 8; the second matrix's slot is smaller than the first's).
    let scratch = |n: usize| DEQUANTIZED_SLOTS * 2 * n;
    let (n1, n2, n3) = (300 * 260, 100 * 64, 512 * 512);
    assert!(slot_values(100, 64) < slot_values(300, 260));
    let a = g
        .upload_frozen_nf4(&weights(&mut rng, n1), 300, 260)
        .unwrap();
    assert_eq!(live() - start, nf4_bytes(n1) + scratch(n1));
    let b = g
        .upload_frozen_nf4(&weights(&mut rng, n2), 100, 64)
        .unwrap();
    assert_eq!(live() - start, nf4_bytes(n1) + nf4_bytes(n2) + scratch(n1));
    g.reset_peak_memory();
    let before = live();
    let c = g
        .upload_frozen_nf4(&weights(&mut rng, n3), 512, 512)
        .unwrap();
    // The scratch grew to the new largest matrix; the f32 copy quantized from is gone.
    assert_eq!(
        live() - start,
        nf4_bytes(n1) + nf4_bytes(n2) + nf4_bytes(n3) + scratch(slot_values(512, 512))
    );
    let peak = g.device_memory().unwrap().peak_bytes;
    assert!(
        peak - before >= 4 * n3 + n3 / 2,
        "peak {peak}, before {before}"
    );
    // Products allocate no more scratch.
    let x = g.upload(&randn(&mut rng, 7 * 512, 1.0), 7, 512).unwrap();
    let mut y = g.zeros(7, 512).unwrap();
    let held = live();
    g.matmul(&x, false, &c, true, 1.0, &mut y, false).unwrap();
    g.matmul(&x, false, &c, false, 1.0, &mut y, false).unwrap();
    assert_eq!(live(), held);
    drop((a, b, c, x, y));
    assert_eq!(
        live() - start,
        scratch(slot_values(512, 512)),
        "only the scratch stays"
    );

    // A cap below the next matrix: an out-of-memory error, and the backend stays usable.
    g.gpu().memory.set_limit(live() + 1024);
    let err = g
        .upload_frozen_nf4(&weights(&mut rng, n3), 512, 512)
        .unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    g.gpu().memory.set_limit(0);
    g.upload_frozen_nf4(&weights(&mut rng, n3), 512, 512)
        .unwrap();
}

#[test]
fn qlora_model_holds_less_and_the_cap_applies() {
    let Some(g) = gpu() else { return };
    drop(g);
    let cfg = preset("smollm2-135m").unwrap();
    let params = |quantization, cap| ModelParams {
        device: Device::Cuda(0),
        quantization,
        max_device_memory_mib: cap,
        ..ModelParams::default()
    };
    let held = |q| {
        let m = Model::random(cfg.clone(), 1, &params(q, 0)).unwrap();
        m.device_memory().unwrap().live_bytes
    };
    let (bf16, nf4) = (held(Quantization::None), held(Quantization::Nf4));
    let specs = tensor_specs(&cfg);
    let proj: Vec<_> = specs
        .iter()
        .filter(|s| matches!(s.slot, Slot::Proj(..)))
        .collect();
    let largest = proj
        .iter()
        .map(|s| slot_values(s.rows, s.cols))
        .max()
        .unwrap();
    let nf4_total: usize = proj.iter().map(|s| nf4_bytes(s.rows * s.cols)).sum();
    // bf16 projection matrices carry PROJECTION_ROOM spare columns and rows (every width of
    // this model is a multiple of 8).
    let room = PROJECTION_ROOM;
    let bf16_total: usize = proj
        .iter()
        .map(|s| 2 * (s.rows + room) * (s.cols + room))
        .sum();
    eprintln!(
        "smollm2-135m: {bf16} bytes with bf16 projections, {nf4} with NF4 ({nf4_total} packed + \
         {} scratch)",
        DEQUANTIZED_SLOTS * 2 * largest
    );
    assert_eq!(
        bf16 - nf4,
        bf16_total - nf4_total - DEQUANTIZED_SLOTS * 2 * largest
    );
    // The embedding alone (49152×576 bf16, 54 MiB) passes a 16 MiB cap.
    match Model::random(cfg, 1, &params(Quantization::Nf4, 16)) {
        Err(Error::OutOfMemory { detail, .. }) => eprintln!("capped load: {detail}"),
        Err(e) => panic!("expected OutOfMemory, got {e}"),
        Ok(_) => panic!("a 16 MiB cap held a 135M-parameter model"),
    }
}

/// As deployed: NF4 projections quantized by each backend from the same values, head_dim 64 (the
/// attention's tensor-core path).
#[test]
fn qlora_training_steps_match_cpu() {
    let Some(g) = gpu() else { return };
    drop(g);
    steps_match(Base::Nf4, 1e-2, 0.999);
}

/// Recorded NF4 steps dequantize what they read whatever the scratch held when recorded.
#[test]
fn recorded_qlora_steps_match_unrecorded_steps() {
    let Some(g) = gpu() else { return };
    drop(g);
    recorded_steps_match_unrecorded(Base::Nf4, 1e-5);
}

/// `c = a·bᵀ` (`transpose_b`) or `a·b` of row-major f32 matrices, summed in f64.
fn reference_product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, t: bool) -> Vec<f64> {
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|l| {
                    let bv = if t { b[j * k + l] } else { b[l * n + j] };
                    a[i * k + l] as f64 * bv as f64
                })
                .sum();
        }
    }
    c
}

fn sum_of(parts: &[Vec<f64>]) -> Vec<f32> {
    (0..parts[0].len())
        .map(|i| parts.iter().map(|p| p[i]).sum::<f64>() as f32)
        .collect()
}

/// Adapted products folded into one bf16 product (`[x | xa]·[W | s·B]ᵀ`, `[dy | dxa]·[W ; A]`)
/// for ranks the weight has room for, with an NF4 weight (dequantized into a scratch slot, room
/// MAX_FOLDED_RANK) and a bf16 projection matrix (`upload_projection`, room PROJECTION_ROOM,
/// its own spare values written): against the sums of the three products in f64 with the
/// adapter's factors rounded to bf16 as the fold rounds them. The tolerance (1e-5, summation
/// order only) fails the two-product path, whose rank-wide product rounds to TF32 instead: the
/// adapter's term is made as large as the base term here, so that rounding shows (~1e-3). A
/// rank above the room takes the two products (checked within TF32's 3e-3). Inputs: f32
/// activations (rounded with room by the product) and product inputs given room by
/// `product_input` and the gated kernels, whose values equal the dense ones; a dense product of
/// the same matrix between folded ones (another layout in the scratch). Each forward product
/// also added into rows of a larger tensor (`adapted_product_add_rows`). The bf16 matrix still
/// downloads as its own values afterwards (the spare values are not part of it).
#[test]
fn adapted_products_fold_the_rank_into_the_base_product() {
    let Some(mut g) = gpu() else { return };
    g.set_f32_products(F32Products::Tf32);
    let mut rng = fresh_rng("folded products");
    let (inp, out) = (256, 192);
    let q = Nf4Tensor::quantize(&weights(&mut rng, out * inp), out, inp).unwrap();
    let nf4_values = bf16_round(&q.dequantize());
    let nf4 = g.upload_nf4(q).unwrap();
    check_folded_products(&g, &mut rng, &nf4, &nf4_values, MAX_FOLDED_RANK, "NF4");
    let bf16_values = bf16_round(&weights(&mut rng, out * inp));
    let projection = g.upload_projection(&bf16_values, out, inp).unwrap();
    check_folded_products(
        &g,
        &mut rng,
        &projection,
        &bf16_values,
        PROJECTION_ROOM,
        "bf16",
    );
    assert_eq!(g.download(&projection).unwrap(), bf16_values);
    gated_kernels_keep_the_room(&g, &mut rng);
}

/// The checks of [`adapted_products_fold_the_rank_into_the_base_product`] for the matrix `w`
/// (`[out, inp]`, bf16 values `wd`) with room for ranks up to `room`.
fn check_folded_products(
    g: &CudaBackend,
    rng: &mut Rng,
    w: &CudaTensor,
    wd: &[f32],
    room: usize,
    kind: &str,
) {
    let (m, s) = (45, 1.5f32);
    let (out, inp) = g.shape(w);
    for r in [16, 5, room + 6] {
        let folded = r <= room;
        let tol = if folded { 1e-5 } else { 3e-3 };
        let factor = |v: Vec<f32>| if folded { bf16_round(&v) } else { v };
        // Base term ~ sqrt(inp)·0.02·1 ≈ 0.3 a value; the adapter's ~ s·sqrt(r)·0.1·1.
        let x = randn(rng, m * inp, 1.0);
        let xa = randn(rng, m * r, 1.0);
        let b = randn(rng, out * r, 0.1);
        let sb: Vec<f32> = b.iter().map(|v| s * v).collect();
        let expected = sum_of(&[
            reference_product(&bf16_round(&x), wd, m, inp, out, true),
            reference_product(&factor(xa.clone()), &factor(sb), m, r, out, true),
        ]);
        let xg = g.upload(&x, m, inp).unwrap();
        let (xag, bg) = (g.upload(&xa, m, r).unwrap(), g.upload(&b, out, r).unwrap());
        let with_room = g.product_input(g.duplicate(&xg).unwrap(), r).unwrap();
        assert_eq!(
            g.download(&with_room).unwrap(),
            bf16_round(&x),
            "a product input with room holds the rounded values"
        );
        for (what, input) in [("f32 input", &xg), ("input with room", &with_room)] {
            let y = g.adapted_product(input, w, &xag, &bg, s, Sums).unwrap();
            let e = rel_err(&g.download(&y).unwrap(), &expected);
            eprintln!(
                "{kind}, rank {r}, {what}: forward relative error {e:.1e} (tolerance {tol:.0e})"
            );
            assert!(
                e < tol,
                "{kind}, rank {r}, {what}: forward relative error {e}"
            );
            // For a gated activation: the folded product's output stored in bf16 (within its
            // rounding, 2⁻⁹ of each value), the two products' in f32 as before.
            let y = g.adapted_product(input, w, &xag, &bg, s, Rounded).unwrap();
            let (dtype, tol16) = if folded {
                (Dtype::Bf16, 3e-3)
            } else {
                (Dtype::F32, tol)
            };
            assert_eq!(y.dtype(), dtype, "{kind}, rank {r}, {what}");
            let e = rel_err(&g.download(&y).unwrap(), &expected);
            assert!(
                e < tol16,
                "{kind}, rank {r}, {what}: bf16 output, error {e}"
            );
            // For the gated kernels alone: the same values, with the room of rank r after each
            // row where folded.
            let yg = g
                .adapted_product(input, w, &xag, &bg, s, GatedOperand)
                .unwrap();
            assert_eq!(g.download(&yg).unwrap(), g.download(&y).unwrap());
            assert_eq!(yg.pitch() >= out + r, folded, "{kind}, rank {r}, {what}");
            // Added into rows [start, start + m) of a tensor holding other values: the rows
            // around them untouched, the rows themselves the held values plus the product.
            let (start, total) = (7, m + 12);
            let held = randn(rng, total * out, 1.0);
            let mut acc = g.upload(&held, total, out).unwrap();
            g.adapted_product_add_rows(input, w, &xag, &bg, s, &mut acc, start)
                .unwrap();
            let got = g.download(&acc).unwrap();
            let rows = start * out..(start + m) * out;
            let want: Vec<f32> = held[rows.clone()]
                .iter()
                .zip(&expected)
                .map(|(h, y)| h + y)
                .collect();
            let e = rel_err(&got[rows.clone()], &want);
            assert!(
                e < tol,
                "{kind}, rank {r}, {what}: added into rows, relative error {e}"
            );
            assert_eq!(got[..rows.start], held[..rows.start], "rows before");
            assert_eq!(got[rows.end..], held[rows.end..], "rows after");
            // Added to a residual (the product's epilogue reads it where folded), which stays.
            let residual = &held[..m * out];
            let plus = g.upload(residual, m, out).unwrap();
            let y = g
                .adapted_product_plus(input, w, &xag, &bg, s, &plus)
                .unwrap();
            let want: Vec<f32> = residual.iter().zip(&expected).map(|(h, y)| h + y).collect();
            let e = rel_err(&g.download(&y).unwrap(), &want);
            assert!(
                e < tol,
                "{kind}, rank {r}, {what}: plus a residual, relative error {e}"
            );
            assert_eq!(g.download(&plus).unwrap(), residual, "the residual");
            let wrong = g.upload(&held[..(m + 1) * out], m + 1, out).unwrap();
            let err = g
                .adapted_product_plus(input, w, &xag, &bg, s, &wrong)
                .unwrap_err();
            assert!(
                err.to_string().contains(&format!("[{}, {out}]", m + 1)),
                "{err}"
            );
            // The same matrix dense in between: the scratch must not mix the layouts up.
            let mut dense = g.zeros(m, out).unwrap();
            g.matmul(&xg, false, w, true, 1.0, &mut dense, false)
                .unwrap();
            let base = sum_of(&[reference_product(&bf16_round(&x), wd, m, inp, out, true)]);
            assert!(rel_err(&g.download(&dense).unwrap(), &base) < 1e-5);
        }

        let dy = randn(rng, m * out, 1.0);
        let dxa = randn(rng, m * r, 1.0);
        let a = randn(rng, r * inp, 0.3);
        let acc = randn(rng, m * inp, 1.0);
        let parts = [
            reference_product(&bf16_round(&dy), wd, m, out, inp, false),
            reference_product(&factor(dxa.clone()), &factor(a.clone()), m, r, inp, false),
        ];
        let acc64: Vec<f64> = acc.iter().map(|&v| v as f64).collect();
        let dyg = g.upload(&dy, m, out).unwrap();
        let (dxag, ag) = (g.upload(&dxa, m, r).unwrap(), g.upload(&a, r, inp).unwrap());
        let dy_room = g.product_input(g.duplicate(&dyg).unwrap(), r).unwrap();
        for (what, input) in [("f32 gradient", &dyg), ("gradient with room", &dy_room)] {
            for with_acc in [false, true] {
                let expected = match with_acc {
                    true => sum_of(&[parts[0].clone(), parts[1].clone(), acc64.clone()]),
                    false => sum_of(&parts),
                };
                // Stored in bf16 for `Rounded` and `GatedOperand` (with room) when folded with
                // no accumulator.
                for out in [Sums, Rounded, GatedOperand] {
                    let acc_g = with_acc.then(|| g.upload(&acc, m, inp).unwrap());
                    let dx = g
                        .adapted_product_backward(input, w, &dxag, &ag, acc_g, out)
                        .unwrap();
                    let rounded = folded && !with_acc && out != Sums;
                    let room = rounded && out == GatedOperand;
                    assert_eq!(
                        dx.pitch() >= inp + r,
                        room,
                        "{kind}, rank {r}, {what}, {out:?}"
                    );
                    let (dtype, tol) = match rounded {
                        true => (Dtype::Bf16, 3e-3),
                        false => (Dtype::F32, tol),
                    };
                    assert_eq!(dx.dtype(), dtype, "{kind}, rank {r}, {what}, {out:?}");
                    let e = rel_err(&g.download(&dx).unwrap(), &expected);
                    eprintln!(
                        "{kind}, rank {r}, {what}, acc {with_acc}, {out:?}: backward relative \
                         error {e:.1e}"
                    );
                    assert!(
                        e < tol,
                        "{kind}, rank {r}, {what}, acc {with_acc}, {out:?}: backward {e}"
                    );
                }
            }
        }
    }
}

/// The gated kernels and copy_rows keep the room and write the dense values; kernels that read
/// dense rows refuse rows with room.
fn gated_kernels_keep_the_room(g: &CudaBackend, rng: &mut Rng) {
    let (rows, cols) = (37, 96);
    let gate = g.upload(&randn(rng, rows * cols, 2.0), rows, cols).unwrap();
    let up = g.upload(&randn(rng, rows * cols, 1.0), rows, cols).unwrap();
    let dh = g.upload(&randn(rng, rows * cols, 1.0), rows, cols).unwrap();
    let act = finetune::model::config::Activation::Silu;
    let dense = g.gated_activation_for_products(&gate, &up, act, 0).unwrap();
    let roomy = g
        .gated_activation_for_products(&gate, &up, act, 16)
        .unwrap();
    assert_eq!(g.download(&dense).unwrap(), g.download(&roomy).unwrap());
    // The backward of (dh, gate, up) written with `room`, and two such results compared bit for
    // bit (dg and du). The activation it also writes is the forward's, bit for bit; without it
    // the gradients are the same.
    let backward = |dh, gate, up, room| {
        let (dg, du, h) = g
            .gated_activation_backward_for_products(dh, gate, up, act, room, true)
            .unwrap();
        let forward = g
            .gated_activation_for_products(gate, up, act, room)
            .unwrap();
        let h = h.expect("asked for");
        assert_eq!(h.pitch(), forward.pitch());
        assert_eq!(g.download(&h).unwrap(), g.download(&forward).unwrap());
        let (dg_alone, du_alone, none) = g
            .gated_activation_backward_for_products(dh, gate, up, act, room, false)
            .unwrap();
        assert!(none.is_none());
        assert_eq!(g.download(&dg).unwrap(), g.download(&dg_alone).unwrap());
        assert_eq!(g.download(&du).unwrap(), g.download(&du_alone).unwrap());
        (dg, du)
    };
    let same = |a: &(CudaTensor, CudaTensor), b: &(CudaTensor, CudaTensor), what: &str| {
        assert_eq!(
            g.download(&a.0).unwrap(),
            g.download(&b.0).unwrap(),
            "dg, {what}"
        );
        assert_eq!(
            g.download(&a.1).unwrap(),
            g.download(&b.1).unwrap(),
            "du, {what}"
        );
    };
    same(
        &backward(&dh, &gate, &up, 0),
        &backward(&dh, &gate, &up, 16),
        "dense and with room",
    );
    assert_eq!(
        g.download(&g.copy_rows(&roomy, 11, 20).unwrap()).unwrap(),
        g.download(&g.copy_rows(&dense, 11, 20).unwrap()).unwrap()
    );
    // bf16 inputs (products stored for the gated activation): the same values as f32 inputs
    // holding the bf16 values, bit for bit.
    let as_bf16 = |t: &CudaTensor| {
        let v = g.download(t).unwrap();
        let bf16 = g.upload_frozen(&v, rows, cols).unwrap();
        let f32 = g.upload(&bf16_round(&v), rows, cols).unwrap();
        (bf16, f32)
    };
    let ((gate16, gate32), (up16, up32), (dh16, dh32)) =
        (as_bf16(&gate), as_bf16(&up), as_bf16(&dh));
    assert_eq!(gate16.dtype(), Dtype::Bf16);
    let from16 = g
        .gated_activation_for_products(&gate16, &up16, act, 16)
        .unwrap();
    let from32 = g
        .gated_activation_for_products(&gate32, &up32, act, 16)
        .unwrap();
    assert_eq!(g.download(&from16).unwrap(), g.download(&from32).unwrap());
    let reference = backward(&dh32, &gate32, &up32, 16);
    for (dh_in, what) in [(&dh16, "bf16 dh"), (&dh32, "f32 dh")] {
        same(&backward(dh_in, &gate16, &up16, 16), &reference, what);
    }
    // Gate and up of different dtypes (one of them not adapted, so not folded).
    let mixed = g
        .gated_activation_for_products(&gate16, &up32, act, 16)
        .unwrap();
    assert_eq!(g.download(&mixed).unwrap(), g.download(&from32).unwrap());
    same(
        &backward(&dh16, &gate32, &up16, 16),
        &reference,
        "f32 gate, bf16 up",
    );
    // In place: inputs with the results' room (as `GatedOperand` products store them) give the
    // same bits, in their own memory; inputs of other layouts get buffers of their own.
    // (f32 tensors holding bf16 values, rounded into rows with room: the same values.)
    let with_room = |t: &CudaTensor| g.product_input(g.duplicate(t).unwrap(), 16).unwrap();
    for value in [true, false] {
        let (dg, du, h) = g
            .gated_activation_backward_for_products(&dh16, &gate16, &up16, act, 16, value)
            .unwrap();
        let inputs = [&dh32, &gate32, &up32].map(with_room);
        assert!(inputs.iter().all(|t| t.pitch() > cols));
        // Nothing allocated: the peak since here stays what was held here.
        g.reset_peak_memory();
        let held = g.device_memory().unwrap().live_bytes;
        let [dh_in, gate_in, up_in] = inputs;
        let (dg2, du2, h2) = g
            .gated_activation_backward_in_place(dh_in, gate_in, up_in, act, 16, value)
            .unwrap();
        assert_eq!(g.device_memory().unwrap().peak_bytes, held, "value {value}");
        assert!([&dg2, &du2].iter().all(|t| t.pitch() == dg.pitch()));
        assert_eq!(h2.is_some(), value);
        for (a, b, what) in [(&dg, &dg2, "dg"), (&du, &du2, "du")] {
            assert_eq!(
                g.download(a).unwrap(),
                g.download(b).unwrap(),
                "{what} in place"
            );
        }
        assert_eq!(
            h.map(|h| g.download(&h).unwrap()),
            h2.map(|h| g.download(&h).unwrap())
        );
        // Dense inputs: not written over, the same values.
        let (dg3, _, _) = g
            .gated_activation_backward_in_place(
                g.duplicate(&dh16).unwrap(),
                g.duplicate(&gate16).unwrap(),
                g.duplicate(&up16).unwrap(),
                act,
                16,
                value,
            )
            .unwrap();
        assert_eq!(dg3.pitch(), dg.pitch());
        assert_eq!(g.download(&dg3).unwrap(), g.download(&dg).unwrap());
    }
    // Kernels that read dense rows refuse rows with room, naming it.
    let err = g
        .add_assign(&mut g.zeros(rows, cols).unwrap(), &roomy)
        .unwrap_err();
    eprintln!("{err}");
    assert!(g.dropout(&roomy, 0.1, 7).is_err());
}
