//! The CUDA backend against the CPU reference: every op on fresh random inputs, then whole training
//! steps on tiny models of every family. Each test skips (saying so) where no CUDA GPU is usable,
//! unless FINETUNE_REQUIRE_GPU=1, where a missing GPU is a failure (scripts/test_gpu.sh sets it).
//!
//! Tolerances. Ops whose inputs are f32 on both sides: relative error ‖gpu − cpu‖ / ‖cpu‖ below
//! 1e-5 (f32 sums in another order; attention and cross-entropy sum longer rows: 1e-4). Products
//! with a frozen bf16 weight: the GPU rounds the f32 operand to bf16, so the CPU reference gets the
//! same rounded operand and the same 1e-5 holds. Whole steps: the GPU rounds every activation
//! entering a base-weight product to bf16 (a relative error of 2^-9 each; the LoRA products read
//! the same rounded values) and the CPU does not, so the loss must agree within 1e-2 relative and
//! each LoRA gradient with cosine similarity ≥ 0.999.

mod common;

use common::gpu::{
    cpu, gpu, long_micro_batches_run_unrecorded, next_token_batch,
    non_finite_step_is_refused_and_training_goes_on, recorded_steps_match_unrecorded, steps_match,
    tensor_core_shape, trainer_on, Base,
};
use common::{bf16_round, fresh_rng, randn, rel_err};
use finetune::backend::cpu::CpuBackend;
use finetune::backend::cuda::tensor::Dtype;
use finetune::backend::cuda::{CudaBackend, CudaTensor, F32Products, PROJECTION_ROOM};
use finetune::backend::{
    attention_backward_then_product_inputs, AdamWSlot, AdamWStep, AttentionShape, Backend,
    ProductOutput, IGNORE_LABEL,
};
use finetune::error::Error;
use finetune::model::config::{Activation, Family};
use finetune::rng::Rng;
use finetune::train::batch::Batch;

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    let e = rel_err(gpu, cpu);
    eprintln!("{what}: relative error {e:.2e} (tolerance {tol:.0e})");
    assert!(e < tol, "{what}: relative error {e} exceeds {tol}");
}

/// Both backends and the inputs uploaded to each.
struct Pair {
    g: CudaBackend,
    c: CpuBackend,
}

impl Pair {
    /// f32 products in full f32 on the GPU, as on the CPU.
    fn new() -> Option<Self> {
        let mut g = gpu()?;
        g.set_f32_products(F32Products::Exact);
        Some(Pair { g, c: cpu() })
    }

    fn up(
        &self,
        v: &[f32],
        rows: usize,
        cols: usize,
    ) -> (
        <CudaBackend as Backend>::Tensor,
        <CpuBackend as Backend>::Tensor,
    ) {
        (
            self.g.upload(v, rows, cols).unwrap(),
            self.c.upload(v, rows, cols).unwrap(),
        )
    }

    fn ints(&self, v: &[i32]) -> (<CudaBackend as Backend>::Ints, Vec<i32>) {
        (
            self.g.upload_ints(v).unwrap(),
            self.c.upload_ints(v).unwrap(),
        )
    }

    fn check(
        &self,
        what: &str,
        g: &<CudaBackend as Backend>::Tensor,
        c: &<CpuBackend as Backend>::Tensor,
        tol: f64,
    ) {
        assert_eq!(self.g.shape(g), self.c.shape(c), "{what}: shapes");
        assert_close(
            what,
            &self.g.download(g).unwrap(),
            &self.c.download(c).unwrap(),
            tol,
        );
    }
}

#[test]
fn matmul_matches_cpu_in_f32_and_with_bf16_weights() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("matmul");
    let (m, k, n) = (37, 300, 45);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a_shape = if ta { (k, m) } else { (m, k) };
        let b_shape = if tb { (n, k) } else { (k, n) };
        let av = randn(&mut rng, m * k, 1.0);
        let bv = randn(&mut rng, k * n, 1.0);
        let cv = randn(&mut rng, m * n, 1.0);
        let (ag, ac) = p.up(&av, a_shape.0, a_shape.1);
        let (bg, bc) = p.up(&bv, b_shape.0, b_shape.1);
        let (mut cg, mut cc) = p.up(&cv, m, n);
        p.g.matmul(&ag, ta, &bg, tb, 0.7, &mut cg, true).unwrap();
        p.c.matmul(&ac, ta, &bc, tb, 0.7, &mut cc, true).unwrap();
        p.check(&format!("f32 matmul ta={ta} tb={tb}"), &cg, &cc, 1e-5);

        // TF32 (as in training): operands rounded to a 10-bit mantissa, relative error ≤ 2⁻¹⁰
        // each (truncated; 2⁻¹¹ rounded), so the product's relative error stays under 2e-3.
        p.g.set_f32_products(F32Products::Tf32);
        let mut cg = p.g.upload(&cv, m, n).unwrap();
        p.g.matmul(&ag, ta, &bg, tb, 0.7, &mut cg, true).unwrap();
        p.check(&format!("tf32 matmul ta={ta} tb={tb}"), &cg, &cc, 2e-3);
        p.g.set_f32_products(F32Products::Exact);

        // b as a frozen bf16 weight: the GPU rounds a to bf16 too.
        let bg16 = p.g.upload_frozen(&bv, b_shape.0, b_shape.1).unwrap();
        let ac16 = p.c.upload(&bf16_round(&av), a_shape.0, a_shape.1).unwrap();
        let bc16 = p.c.upload(&bf16_round(&bv), b_shape.0, b_shape.1).unwrap();
        let mut cg = p.g.zeros(m, n).unwrap();
        let mut cc = p.c.zeros(m, n).unwrap();
        p.g.matmul(&ag, ta, &bg16, tb, 1.0, &mut cg, false).unwrap();
        p.c.matmul(&ac16, ta, &bc16, tb, 1.0, &mut cc, false)
            .unwrap();
        p.check(&format!("bf16 matmul ta={ta} tb={tb}"), &cg, &cc, 1e-5);
    }
}

/// The adapters' gradient products, which run beside the compute stream
/// (backend/cuda/aside.rs): the CPU's sums over the same bf16-rounded inputs, twice (the second
/// pair waits for the first), and inputs handed over with `drop_after_adapter_gradients` are not
/// reused while the products read them (memory of their sizes is written at once, before the
/// join).
#[test]
fn adapter_gradients_beside_the_compute_stream_match_cpu() {
    let Some(mut p) = Pair::new() else { return };
    // Products rounded to bf16, as in training: the only case that runs beside.
    p.g.set_f32_products(F32Products::Tf32);
    let mut rng = fresh_rng("adapter gradients");
    let (rows, out, inp, r, s) = (4096, 1024, 768, 16, 0.5);
    let mut values = |n| randn(&mut rng, n, 1.0);
    let (dyv, xv, xav, dxav) = (
        values(rows * out),
        values(rows * inp),
        values(rows * r),
        values(rows * r),
    );
    let (dav, dbv) = (values(r * inp), values(out * r));
    let rounded_input = |v: &[f32], cols| {
        let t = p.g.upload(v, rows, cols).unwrap();
        p.g.product_input(t, r).unwrap()
    };
    let (dy, x) = (rounded_input(&dyv, out), rounded_input(&xv, inp));
    let (xa, dxa) = (
        p.g.upload(&xav, rows, r).unwrap(),
        p.g.upload(&dxav, rows, r).unwrap(),
    );
    let (mut da, mut db) = (
        p.g.upload(&dav, r, inp).unwrap(),
        p.g.upload(&dbv, out, r).unwrap(),
    );
    for _ in 0..2 {
        p.g.add_adapter_gradients(&dy, &xa, &dxa, &x, s, &mut da, &mut db)
            .unwrap();
    }
    p.g.drop_after_adapter_gradients(dy);
    p.g.drop_after_adapter_gradients(x);
    let junk = [values(rows * out), values(rows * inp)];
    let overwritten = [rounded_input(&junk[0], out), rounded_input(&junk[1], inp)];
    p.g.join_adapter_gradients().unwrap();
    drop(overwritten);

    let up = |v: &[f32], rows, cols| p.c.upload(&bf16_round(v), rows, cols).unwrap();
    let (dyc, xc, xac, dxac) = (
        up(&dyv, rows, out),
        up(&xv, rows, inp),
        up(&xav, rows, r),
        up(&dxav, rows, r),
    );
    let mut dac = p.c.upload(&dav, r, inp).unwrap();
    let mut dbc = p.c.upload(&dbv, out, r).unwrap();
    for _ in 0..2 {
        p.c.matmul(&dyc, true, &xac, false, s, &mut dbc, true)
            .unwrap();
        p.c.matmul(&dxac, true, &xc, false, 1.0, &mut dac, true)
            .unwrap();
    }
    p.check("dB beside", &db, &dbc, 1e-4);
    p.check("dA beside", &da, &dac, 1e-4);
}

/// An adapter's rank-wide products (`Backend::adapter_product`) are stored in bf16 where
/// products round their operands: the CPU's product of the rounded operands, rounded; in f32
/// with `F32Products::Exact`. The folded product and the adapter gradients read such a bf16
/// `xa` (copied into the spare columns, read as it is) exactly as they read the f32 tensor of
/// the same values (rounded into the spare columns, rounded copies), for a rank that fills
/// 4-value groups and one that does not.
#[test]
fn adapter_products_are_stored_rounded_and_read_like_f32_ones() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("adapter products");
    let (rows, inp, out) = (300, 256, 192);
    for r in [16, 6] {
        let mut values = |n| randn(&mut rng, n, 1.0);
        let (xv, av, wv, bv) = (
            values(rows * inp),
            values(r * inp),
            values(out * inp),
            values(out * r),
        );
        let a = p.g.upload(&av, r, inp).unwrap();
        let xa_of = |g: &CudaBackend| {
            let x = g
                .product_input(g.upload(&xv, rows, inp).unwrap(), r)
                .unwrap();
            let xa = g.adapter_product(&x, &a, true, 0.5).unwrap();
            (x, xa)
        };
        let (_, exact) = xa_of(&p.g);
        assert_eq!(exact.dtype(), Dtype::F32, "rank {r}: f32 products keep f32");
        p.g.set_f32_products(F32Products::Tf32);
        let (x, xa) = xa_of(&p.g);
        assert_eq!(xa.dtype(), Dtype::Bf16, "rank {r}: stored rounded");
        let xc = p.c.upload(&bf16_round(&xv), rows, inp).unwrap();
        let ac = p.c.upload(&bf16_round(&av), r, inp).unwrap();
        let xac = p.c.product(&xc, false, &ac, true, 0.5).unwrap();
        let rounded = bf16_round(&p.c.download(&xac).unwrap());
        // bf16 rounding of the f32 sums: at most 2⁻⁹ relative each, plus their order.
        assert_close(
            &format!("rank {r}: xa in bf16"),
            &p.g.download(&xa).unwrap(),
            &rounded,
            4e-3,
        );

        let xa32 = p.g.upload(&p.g.download(&xa).unwrap(), rows, r).unwrap();
        let w = p.g.upload_projection(&wv, out, inp).unwrap();
        let b = p.g.upload(&bv, out, r).unwrap();
        let sums = ProductOutput::Sums;
        let y16 = p.g.adapted_product(&x, &w, &xa, &b, 0.5, sums).unwrap();
        let y32 = p.g.adapted_product(&x, &w, &xa32, &b, 0.5, sums).unwrap();
        assert_eq!(
            p.g.download(&y16).unwrap(),
            p.g.download(&y32).unwrap(),
            "rank {r}: the folded product reads a bf16 xa as the f32 one"
        );

        let dy =
            p.g.product_input(p.g.upload(&values(rows * out), rows, out).unwrap(), r);
        let dy = dy.unwrap();
        let gradients = |xa: &CudaTensor| {
            let (mut da, mut db) = (p.g.zeros(r, inp).unwrap(), p.g.zeros(out, r).unwrap());
            p.g.add_adapter_gradients(&dy, xa, xa, &x, 0.5, &mut da, &mut db)
                .unwrap();
            p.g.join_adapter_gradients().unwrap();
            [da, db].map(|t| p.g.download(&t).unwrap())
        };
        assert_eq!(
            gradients(&xa),
            gradients(&xa32),
            "rank {r}: the adapter gradients read a bf16 xa and dxa as the f32 ones"
        );
        p.g.set_f32_products(F32Products::Exact);
    }
}

/// The adapters' factors rounded for a pass in one launch give each factor's own rounding, bit
/// for bit: shapes of several sizes, one longer than a launch's block of threads times 8, one
/// of odd length.
#[test]
fn factors_rounded_in_one_launch_match_one_by_one() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("factors rounded at once");
    let shapes = [(16, 4096), (4096, 16), (16, 14336), (7, 33), (1, 1)];
    let values: Vec<Vec<f32>> = (shapes.iter())
        .map(|&(r, c)| randn(&mut rng, r * c, 3.0))
        .collect();
    let xs: Vec<CudaTensor> = (shapes.iter().zip(&values))
        .map(|(&(r, c), v)| p.g.upload(v, r, c).unwrap())
        .collect();
    let refs: Vec<&CudaTensor> = xs.iter().collect();
    assert!(
        p.g.rounded_product_inputs(&refs).unwrap().is_none(),
        "f32 products read the factors as they are"
    );
    p.g.set_f32_products(F32Products::Tf32);
    let at_once = p.g.rounded_product_inputs(&refs).unwrap().unwrap();
    for ((x, y), v) in xs.iter().zip(&at_once).zip(&values) {
        assert_eq!(y.dtype(), Dtype::Bf16);
        assert_eq!(p.g.shape(y), p.g.shape(x));
        let alone = p.g.rounded_product_input(x, 0).unwrap().unwrap();
        let got = p.g.download(y).unwrap();
        assert_eq!(got, p.g.download(&alone).unwrap(), "{:?}", p.g.shape(x));
        assert_eq!(
            got,
            bf16_round(v),
            "{:?}: rounded to nearest even",
            p.g.shape(x)
        );
    }
    p.g.set_f32_products(F32Products::Exact);
}

/// A folded product skips writing its adapter factor into the weight's spare values where the
/// same pass wrote the same factor last (fold.rs), and only there: another factor written in
/// between, or the factor's values changed between passes, are written again. Forward (`B` in
/// the spare columns) and backward (`A` in the spare rows), for a bf16 projection matrix and
/// an NF4 one.
#[test]
fn folded_factor_writes_are_skipped_only_within_a_held_pass() {
    let Some(mut p) = Pair::new() else { return };
    p.g.set_f32_products(F32Products::Tf32);
    let g = &p.g;
    let mut rng = fresh_rng("held factors");
    let (rows, inp, out, r) = (64, 256, 192, 16);
    let mut values = |n| randn(&mut rng, n, 1.0);
    let wv = values(out * inp);
    let x = g.upload(&values(rows * inp), rows, inp).unwrap();
    let x = g.product_input(x, r).unwrap();
    let dy = g.upload(&values(rows * out), rows, out).unwrap();
    let dy = g.product_input(dy, r).unwrap();
    let xa = g.upload(&values(rows * r), rows, r).unwrap();
    let (first, second) = (
        [values(out * r), values(out * r)],
        [values(r * inp), values(r * inp)],
    );
    let weights = [
        g.upload_projection(&wv, out, inp).unwrap(),
        g.upload_frozen_nf4(&wv, out, inp).unwrap(),
    ];
    for (w, kind) in weights.iter().zip(["bf16", "NF4"]) {
        for backward in [false, true] {
            let (one, two) = match backward {
                false => (&first[0], &first[1]),
                true => (&second[0], &second[1]),
            };
            let shape = if backward { (r, inp) } else { (out, r) };
            let product = |f: &CudaTensor| {
                let y = match backward {
                    false => g.adapted_product(&x, w, &xa, f, 0.5, ProductOutput::Sums),
                    true => g.adapted_product_backward(&dy, w, &xa, f, None, ProductOutput::Sums),
                };
                g.download(&y.unwrap()).unwrap()
            };
            let mut factor = g.upload(one, shape.0, shape.1).unwrap();
            let other = g.upload(two, shape.0, shape.1).unwrap();
            let (with_one, with_two) = (product(&factor), product(&other));
            assert_ne!(
                with_one, with_two,
                "{kind}: the factors give other products"
            );
            let what = format!("{kind} weight, backward {backward}");
            g.hold_adapter_factors(true);
            assert_eq!(product(&factor), with_one, "{what}: written");
            assert_eq!(product(&factor), with_one, "{what}: written already");
            assert_eq!(product(&other), with_two, "{what}: another factor");
            assert_eq!(product(&factor), with_one, "{what}: the first again");
            g.hold_adapter_factors(false);
            g.write(&mut factor, two).unwrap();
            g.hold_adapter_factors(true);
            assert_eq!(product(&factor), with_two, "{what}: new values, next pass");
            g.hold_adapter_factors(false);
        }
    }
}

#[test]
fn pointwise_ops_match_cpu() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("pointwise");
    let (rows, cols) = (67, 129);
    let n = rows * cols;
    let xv = randn(&mut rng, n, 2.0);
    let yv = randn(&mut rng, n, 2.0);
    let bv = randn(&mut rng, cols, 1.0);
    let (mut xg, mut xc) = p.up(&xv, rows, cols);
    let (yg, yc) = p.up(&yv, rows, cols);
    let (bg, bc) = p.up(&bv, 1, cols);
    p.g.add_assign(&mut xg, &yg).unwrap();
    p.c.add_assign(&mut xc, &yc).unwrap();
    p.check("add_assign", &xg, &xc, 1e-6);
    p.g.add_row_vector(&mut xg, &bg).unwrap();
    p.c.add_row_vector(&mut xc, &bc).unwrap();
    p.check("add_row_vector", &xg, &xc, 1e-6);
    // fill_zero clears whatever a tensor held, NaN and infinities too (scaling by 0 would not).
    let mut poisoned = randn(&mut rng, n, 1.0);
    poisoned[..3].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    let (mut zg, _) = p.up(&poisoned, rows, cols);
    p.g.fill_zero(&mut zg).unwrap();
    assert!(
        p.g.download(&zg).unwrap().iter().all(|&z| z == 0.0),
        "fill_zero"
    );
    // Rows 13..13+29 of y added into rows 31.. of x, and copied out.
    let (start, part) = (13, 29);
    let (pg, pc) = (
        p.g.copy_rows(&yg, start, part).unwrap(),
        p.c.copy_rows(&yc, start, part).unwrap(),
    );
    p.check("copy_rows", &pg, &pc, 1e-12);
    p.g.add_rows(&mut xg, 31, &pg).unwrap();
    p.c.add_rows(&mut xc, 31, &pc).unwrap();
    p.check("add_rows", &xg, &xc, 1e-6);
    assert!(p.g.add_rows(&mut xg, rows - part + 1, &pg).is_err());
    assert!(p.g.copy_rows(&yg, rows - part + 1, part).is_err());
    let (sg, sc) = (
        p.g.sum_squares(&[&xg, &yg]).unwrap(),
        p.c.sum_squares(&[&xc, &yc]).unwrap(),
    );
    assert!(((sg - sc) / sc).abs() < 1e-6, "sum_squares {sg} vs {sc}");
    assert!(!p.g.has_non_finite(&xg).unwrap());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = xv.clone();
        v[(rng.next_u64() % n as u64) as usize] = bad;
        let (t, _) = p.up(&v, rows, cols);
        assert!(p.g.has_non_finite(&t).unwrap(), "{bad} not found");
    }
    // 129 columns: the gated kernels' quads and one-by-one tail; 136: eight values a thread.
    let gated_shapes = [(rows, cols), (29, 136)];
    for ((rows, cols), act) in gated_shapes
        .into_iter()
        .flat_map(|shape| [(shape, Activation::Silu), (shape, Activation::GeluTanh)])
    {
        let n = rows * cols;
        let (gg, gc) = p.up(&randn(&mut rng, n, 3.0), rows, cols);
        let (ug, uc) = p.up(&randn(&mut rng, n, 1.0), rows, cols);
        let (dg_, dc_) = p.up(&randn(&mut rng, n, 1.0), rows, cols);
        let hg = p.g.gated_activation(&gg, &ug, act).unwrap();
        let hc = p.c.gated_activation(&gc, &uc, act).unwrap();
        p.check(&format!("{act:?}, {cols} columns: forward"), &hg, &hc, 1e-5);
        let (a, b) = p.g.gated_activation_backward(&dg_, &gg, &ug, act).unwrap();
        let (c, d) = p.c.gated_activation_backward(&dc_, &gc, &uc, act).unwrap();
        p.check(
            &format!("{act:?}, {cols} columns: backward dg"),
            &a,
            &c,
            1e-5,
        );
        p.check(
            &format!("{act:?}, {cols} columns: backward du"),
            &b,
            &d,
            1e-5,
        );
        // As product inputs: the same values rounded to bf16 as they are written (within
        // bf16's half unit, 2⁻⁹ relative; f32 ulps can tip a rounding either way).
        p.g.set_f32_products(F32Products::Tf32);
        let rh = p.g.gated_activation_for_products(&gg, &ug, act, 0).unwrap();
        let (rdg, rdu, rbh) =
            p.g.gated_activation_backward_for_products(&dg_, &gg, &ug, act, 0, true)
                .unwrap();
        let rounded = [rh, rdg, rdu, rbh.expect("asked for")];
        p.g.set_f32_products(F32Products::Exact);
        for (what, g, c) in [
            ("forward", &rounded[0], &hc),
            ("dg", &rounded[1], &c),
            ("du", &rounded[2], &d),
            ("forward from the backward", &rounded[3], &hc),
        ] {
            let values = p.g.download(g).unwrap();
            assert_eq!(
                values,
                bf16_round(&values),
                "{act:?}, {cols} columns: {what}: not bf16"
            );
            p.check(
                &format!("{act:?}, {cols} columns: {what} as a product input"),
                g,
                c,
                4e-3,
            );
        }
    }
    // The dropout mask is a hash of (seed, index): bit-identical on both sides.
    let seed = rng.next_u64();
    let dg = p.g.dropout(&yg, 0.3, seed).unwrap();
    let dc = p.c.dropout(&yc, 0.3, seed).unwrap();
    assert_eq!(
        p.g.download(&dg).unwrap(),
        p.c.download(&dc).unwrap(),
        "dropout"
    );
    // A product input is y rounded to bf16 once; copying its rows and dropping it out give
    // exactly the rounded values' rows and their dropout, rounded.
    let rounded = bf16_round(&yv);
    let (_, rc) = p.up(&rounded, rows, cols);
    p.g.set_f32_products(F32Products::Tf32);
    let ig = p.g.product_input(p.g.duplicate(&yg).unwrap(), 0).unwrap();
    p.g.set_f32_products(F32Products::Exact);
    assert_eq!(p.g.download(&ig).unwrap(), rounded, "product_input");
    let (part_g, part_c) = (
        p.g.copy_rows(&ig, start, part).unwrap(),
        p.c.copy_rows(&rc, start, part).unwrap(),
    );
    assert_eq!(
        p.g.download(&part_g).unwrap(),
        p.c.download(&part_c).unwrap(),
        "copy_rows of a product input"
    );
    let dg = p.g.dropout(&ig, 0.3, seed).unwrap();
    let dc = p.c.dropout(&rc, 0.3, seed).unwrap();
    assert_eq!(
        p.g.download(&dg).unwrap(),
        bf16_round(&p.c.download(&dc).unwrap()),
        "dropout of a product input"
    );
}

#[test]
fn embedding_and_rope_match_cpu() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("embedding/rope");
    let (vocab, hidden, tokens) = (100, 96, 53);
    let table = bf16_round(&randn(&mut rng, vocab * hidden, 1.0));
    let ids: Vec<i32> = (0..tokens)
        .map(|_| (rng.next_u64() % vocab as u64) as i32)
        .collect();
    let tg = p.g.upload_frozen(&table, vocab, hidden).unwrap();
    let tc = p.c.upload(&table, vocab, hidden).unwrap();
    let (ig, ic) = p.ints(&ids);
    let eg = p.g.embedding(&tg, &ig, 1.5).unwrap();
    let ec = p.c.embedding(&tc, &ic, 1.5).unwrap();
    p.check("embedding", &eg, &ec, 1e-7);
    let (bad, _) = p.ints(&[0, vocab as i32]);
    assert!(
        p.g.embedding(&tg, &bad, 1.0).is_err(),
        "id past the vocabulary"
    );
    // A table kept in host memory: no device memory held, the same rows, and products read a
    // device copy of the same values (made per product, or held from `bring_to_device` to
    // `release_device_copy`).
    let live = p.g.gpu().memory.live();
    let th = p.g.upload_lookup_table(&table, vocab, hidden).unwrap();
    assert_eq!(
        p.g.gpu().memory.live(),
        live,
        "host table holds device memory"
    );
    let eh = p.g.embedding(&th, &ig, 1.5).unwrap();
    p.check("embedding from a host table", &eh, &ec, 1e-7);
    assert_eq!(p.g.download(&th).unwrap(), table);
    assert!(
        p.g.embedding(&th, &bad, 1.0).is_err(),
        "id past the vocabulary"
    );
    let product = |t| {
        let mut out = p.g.zeros(tokens, vocab).unwrap();
        p.g.matmul(&eg, false, t, true, 1.0, &mut out, false)
            .unwrap();
        p.g.download(&out).unwrap()
    };
    assert_eq!(product(&th), product(&tg), "a product with a host table");
    let live = p.g.gpu().memory.live();
    assert!(!p.g.bring_to_device(&tg).unwrap(), "a device table copied");
    assert_eq!(p.g.gpu().memory.live(), live, "a device table copied");
    assert!(p.g.bring_to_device(&th).unwrap(), "no copy started");
    assert!(!p.g.bring_to_device(&th).unwrap(), "a second copy started");
    let copy_bytes = p.g.gpu().memory.live() - live;
    assert_eq!(copy_bytes, vocab * hidden * 2, "one device copy held");
    assert_eq!(
        product(&th),
        product(&tg),
        "a product with the brought copy"
    );
    assert_eq!(p.g.download(&th).unwrap(), table);
    p.g.release_device_copy(&th);
    assert_eq!(p.g.gpu().memory.live(), live, "the copy released");
    assert_eq!(product(&th), product(&tg), "a product after the release");

    let head_dim = 32;
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / head_dim as f32))
        .collect();
    let positions: Vec<i32> = (0..tokens)
        .map(|_| (rng.next_u64() % 9000) as i32)
        .collect();
    let (pg, pc) = p.ints(&positions);
    let xv = randn(&mut rng, tokens * hidden, 1.0);
    let (mut xg, mut xc) = p.up(&xv, tokens, hidden);
    for inverse in [false, true] {
        p.g.rope(&mut xg, &pg, &inv_freq, head_dim, inverse)
            .unwrap();
        p.c.rope(&mut xc, &pc, &inv_freq, head_dim, inverse)
            .unwrap();
        p.check(&format!("rope inverse={inverse}"), &xg, &xc, 1e-5);
    }
    assert_close("rope then inverse", &p.g.download(&xg).unwrap(), &xv, 1e-5);

    // Rotated and rounded at once (kernels/rope.cu, rope_bf16): the bits of the rotation in
    // place followed by the rounding, as a product input (with and without spare columns) and
    // as attention's inputs (head_dim 64 runs on tensor cores: bf16 q and k).
    p.g.set_f32_products(F32Products::Tf32);
    let g = &p.g;
    let dup = |t: &_| g.duplicate(t).unwrap();
    let rotated = |mut t, hd, inv: &[f32], inverse| {
        g.rope(&mut t, &pg, inv, hd, inverse).unwrap();
        t
    };
    let (x, _) = p.up(&xv, tokens, hidden);
    for inverse in [false, true] {
        for room in [0, 16] {
            let fused =
                p.g.rope_for_products(dup(&x), &pg, &inv_freq, head_dim, inverse, room)
                    .unwrap();
            let stepwise =
                p.g.product_input(rotated(dup(&x), head_dim, &inv_freq, inverse), room)
                    .unwrap();
            assert_eq!(fused.dtype(), Dtype::Bf16);
            assert_eq!(
                p.g.download(&fused).unwrap(),
                p.g.download(&stepwise).unwrap(),
                "rope for products, inverse {inverse}, room {room}"
            );
        }
    }
    let s = AttentionShape {
        batch: 1,
        seq: tokens,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 64,
    };
    let inv64: Vec<f32> = (0..32)
        .map(|i| 500000f32.powf(-2.0 * i as f32 / 64.0))
        .collect();
    let (q, _) = p.up(&randn(&mut rng, tokens * 128, 1.0), tokens, 128);
    let (k, _) = p.up(&randn(&mut rng, tokens * 64, 1.0), tokens, 64);
    let (v, _) = p.up(&randn(&mut rng, tokens * 64, 1.0), tokens, 64);
    let fused =
        p.g.rotated_attention_inputs(dup(&q), dup(&k), dup(&v), s, &pg, &inv64)
            .unwrap();
    let stepwise =
        p.g.attention_inputs(
            rotated(dup(&q), 64, &inv64, false),
            rotated(dup(&k), 64, &inv64, false),
            dup(&v),
            s,
        )
        .unwrap();
    for (name, f, w) in [
        ("q", &fused[0], &stepwise[0]),
        ("k", &fused[1], &stepwise[1]),
        ("v", &fused[2], &stepwise[2]),
    ] {
        assert_eq!(f.dtype(), Dtype::Bf16, "attention input {name}");
        assert_eq!(
            p.g.download(f).unwrap(),
            p.g.download(w).unwrap(),
            "rotated attention input {name}"
        );
    }
}

/// RMSNorm forward (f32, and bf16 product inputs) and backward against the CPU, at widths
/// that take the kernels' vectorized rows (96, 4096), their plain loop (90: not a multiple of
/// 4; 8200: longer than the registers hold) and both (6144: the forward's rows, the backward's
/// loop). Where product inputs are rounded (training) the norms read x rounded to bf16
/// (`Backend::norm_input`): against the CPU's norm of the rounded x, and bit for bit the same
/// from the bf16 copy of x as from x.
#[test]
fn rmsnorm_matches_cpu() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("rmsnorm");
    let tokens = 53;
    for hidden in [96, 90, 4096, 6144, 8200] {
        let xv = randn(&mut rng, tokens * hidden, 1.0);
        let (eg, ec) = p.up(&xv, tokens, hidden);
        // x as the norms read it where product inputs are rounded.
        let (_, ec_rounded) = p.up(&bf16_round(&xv), tokens, hidden);
        assert!(
            p.g.norm_input(&eg).unwrap().is_none(),
            "nothing rounded: no copy"
        );
        for unit_offset in [false, true] {
            let (wg, wc) = p.up(&randn(&mut rng, hidden, 0.5), 1, hidden);
            let (yg, rg) = p.g.rmsnorm(&eg, &wg, 1e-5, unit_offset).unwrap();
            let (yc, rc) = p.c.rmsnorm(&ec, &wc, 1e-5, unit_offset).unwrap();
            p.check("rmsnorm y", &yg, &yc, 1e-5);
            p.check("rmsnorm r", &rg, &rc, 1e-5);
            // In row chunks where nothing is rounded: the f32 output's rows.
            let chunks = [(0, 20), (20, tokens - 20)];
            let (parts, rcg) =
                p.g.rmsnorm_chunks_for_products(&eg, &wg, 1e-5, unit_offset, 16, &chunks)
                    .unwrap();
            assert_eq!(p.g.download(&rcg).unwrap(), p.g.download(&rg).unwrap());
            assert_eq!(parts.len(), chunks.len(), "a tensor a chunk");
            for (&(start, n), part) in chunks.iter().zip(&parts) {
                assert_eq!(part.dtype(), Dtype::F32, "nothing rounded");
                let rows = p.g.copy_rows(&yg, start, n).unwrap();
                assert_eq!(p.g.download(part).unwrap(), p.g.download(&rows).unwrap());
            }
            // Products rounding their f32 operands to bf16, as in training.
            p.g.set_f32_products(F32Products::Tf32);
            let kept = p.g.norm_input(&eg).unwrap().expect("a bf16 copy of x");
            assert_eq!(p.g.download(&kept).unwrap(), bf16_round(&xv), "norm input");
            let (ytg, rtg) = p.g.rmsnorm(&eg, &wg, 1e-5, unit_offset).unwrap();
            let (ytc, rtc) = p.c.rmsnorm(&ec_rounded, &wc, 1e-5, unit_offset).unwrap();
            p.check("rmsnorm y of x read rounded", &ytg, &ytc, 1e-5);
            p.check("rmsnorm r of x read rounded", &rtg, &rtc, 1e-5);
            let (ykg, rkg) = p.g.rmsnorm(&kept, &wg, 1e-5, unit_offset).unwrap();
            assert_eq!(p.g.download(&ykg).unwrap(), p.g.download(&ytg).unwrap());
            assert_eq!(p.g.download(&rkg).unwrap(), p.g.download(&rtg).unwrap());
            // Written at once as a product input (with and without spare columns): the bits
            // that rounding the f32 output gives, from x and from its bf16 copy.
            for room in [0, 16] {
                let rounded =
                    p.g.product_input(p.g.duplicate(&ytg).unwrap(), room)
                        .unwrap();
                assert_eq!(
                    p.g.download(&rounded).unwrap(),
                    bf16_round(&p.g.download(&ytg).unwrap())
                );
                for (from, x) in [("x", &eg), ("its bf16 copy", &kept)] {
                    let (pg, prg) =
                        p.g.rmsnorm_for_products(x, &wg, 1e-5, unit_offset, room)
                            .unwrap();
                    assert_eq!(
                        p.g.download(&pg).unwrap(),
                        p.g.download(&rounded).unwrap(),
                        "rmsnorm for products of {from}, room {room}"
                    );
                    assert_eq!(p.g.download(&prg).unwrap(), p.g.download(&rtg).unwrap());
                    // In row chunks, each written where it goes: the whole output's rows (other
                    // chunks from x and from its copy, so that a buffer handed back by the pool
                    // holds other rows).
                    let chunks = match from {
                        "x" => vec![(0, 17), (17, tokens - 20), (tokens - 3, 3)],
                        _ => vec![(0, 30), (30, tokens - 30)],
                    };
                    let (parts, rcg) =
                        p.g.rmsnorm_chunks_for_products(x, &wg, 1e-5, unit_offset, room, &chunks)
                            .unwrap();
                    assert_eq!(p.g.download(&rcg).unwrap(), p.g.download(&rtg).unwrap());
                    assert_eq!(parts.len(), chunks.len(), "a tensor a chunk");
                    for (&(start, n), part) in chunks.iter().zip(&parts) {
                        let rows = p.g.copy_rows(&pg, start, n).unwrap();
                        let layout = |t: &CudaTensor| (t.dtype(), t.rows, t.cols, t.pitch());
                        assert_eq!(layout(part), layout(&rows), "chunk at {start}");
                        assert_eq!(
                            p.g.download(part).unwrap(),
                            p.g.download(&rows).unwrap(),
                            "rmsnorm chunk at {start} of {from}, room {room}"
                        );
                    }
                }
                p.check("rmsnorm for products", &rounded, &yc, 8e-3);
            }
            // The backward of x read rounded: from x, from its bf16 copy (whole and by rows).
            let (dyg, dyc) = p.up(&randn(&mut rng, tokens * hidden, 1.0), tokens, hidden);
            let dtg =
                p.g.rmsnorm_backward(&dyg, &eg, &wg, &rtg, unit_offset, None)
                    .unwrap();
            let dtc =
                p.c.rmsnorm_backward(&dyc, &ec_rounded, &wc, &rtc, unit_offset, None)
                    .unwrap();
            p.check("rmsnorm backward of x read rounded", &dtg, &dtc, 1e-5);
            let dkg =
                p.g.rmsnorm_backward(&dyg, &kept, &wg, &rkg, unit_offset, None)
                    .unwrap();
            assert_eq!(p.g.download(&dkg).unwrap(), p.g.download(&dtg).unwrap());
            let (start, n) = (17, 20);
            let part = p.g.copy_rows(&dyg, start, n).unwrap();
            let mut by_rows = p.g.zeros(tokens, hidden).unwrap();
            p.g.rmsnorm_backward_rows(&part, &kept, &wg, &rkg, unit_offset, start, &mut by_rows)
                .unwrap();
            let (whole, by_rows) = (p.g.download(&dtg).unwrap(), p.g.download(&by_rows).unwrap());
            assert_eq!(
                by_rows[start * hidden..(start + n) * hidden],
                whole[start * hidden..(start + n) * hidden],
                "rmsnorm backward of rows of the bf16 copy"
            );
            p.g.set_f32_products(F32Products::Exact);
            let dg =
                p.g.rmsnorm_backward(&dyg, &eg, &wg, &rg, unit_offset, None)
                    .unwrap();
            let dc =
                p.c.rmsnorm_backward(&dyc, &ec, &wc, &rc, unit_offset, None)
                    .unwrap();
            p.check("rmsnorm backward", &dg, &dc, 1e-5);
            // Added into a gradient the residual carries (the decoder's use).
            let carried = randn(&mut rng, tokens * hidden, 1.0);
            let (ag, ac) = p.up(&carried, tokens, hidden);
            let dg =
                p.g.rmsnorm_backward(&dyg, &eg, &wg, &rg, unit_offset, Some(ag))
                    .unwrap();
            let dc =
                p.c.rmsnorm_backward(&dyc, &ec, &wc, &rc, unit_offset, Some(ac))
                    .unwrap();
            p.check("rmsnorm backward added into a gradient", &dg, &dc, 1e-5);
            let plain =
                p.c.download(
                    &p.c.rmsnorm_backward(&dyc, &ec, &wc, &rc, unit_offset, None)
                        .unwrap(),
                )
                .unwrap();
            let added = p.c.download(&dc).unwrap();
            let want: Vec<f32> = plain.iter().zip(&carried).map(|(g, a)| a + g).collect();
            assert_eq!(
                added, want,
                "the CPU's accumulation is the plain gradient plus the carried one"
            );
            // Rows [start, start + n) alone, added into those rows of a carried gradient.
            let (start, n) = (17, 20);
            let (ag, ac) = p.up(&carried, tokens, hidden);
            let (mut ag, mut ac) = (ag, ac);
            let (dyg, dyc) = (
                p.g.copy_rows(&dyg, start, n).unwrap(),
                p.c.copy_rows(&dyc, start, n).unwrap(),
            );
            p.g.rmsnorm_backward_rows(&dyg, &eg, &wg, &rg, unit_offset, start, &mut ag)
                .unwrap();
            p.c.rmsnorm_backward_rows(&dyc, &ec, &wc, &rc, unit_offset, start, &mut ac)
                .unwrap();
            p.check("rmsnorm backward of rows", &ag, &ac, 1e-5);
            let (outside_g, inside_g) = (p.g.download(&ag).unwrap(), p.c.download(&ac).unwrap());
            let rows =
                |v: &[f32], r: std::ops::Range<usize>| v[r.start * hidden..r.end * hidden].to_vec();
            for r in [0..start, start + n..tokens] {
                assert_eq!(
                    rows(&outside_g, r.clone()),
                    rows(&carried, r.clone()),
                    "GPU: rows outside"
                );
                assert_eq!(
                    rows(&inside_g, r.clone()),
                    rows(&carried, r),
                    "CPU: rows outside"
                );
            }
        }
    }
}

/// The attention cases' shape from (batch, seq, heads, kv_heads, head_dim).
fn attention_shape(
    (batch, seq, num_heads, num_kv_heads, head_dim): (usize, usize, usize, usize, usize),
) -> AttentionShape {
    AttentionShape {
        batch,
        seq,
        num_heads,
        num_kv_heads,
        head_dim,
    }
}

/// Segment ids of `s`'s tokens: the last sequence packs two examples (the second from position
/// `split`) when `split` is given, else every sequence is one.
fn packed_segments(s: AttentionShape, split: Option<usize>) -> Vec<i32> {
    (0..s.batch * s.seq)
        .map(|t| match split {
            Some(at) if t / s.seq == s.batch - 1 && t % s.seq >= at => 1,
            _ => 0,
        })
        .collect()
}

fn attention_case(p: &Pair, rng: &mut Rng, s: AttentionShape, split: Option<usize>) {
    let tokens = s.batch * s.seq;
    let qv = randn(rng, tokens * s.num_heads * s.head_dim, 1.0);
    let kv = randn(rng, tokens * s.num_kv_heads * s.head_dim, 1.0);
    let vv = randn(rng, tokens * s.num_kv_heads * s.head_dim, 1.0);
    let dov = randn(rng, tokens * s.num_heads * s.head_dim, 1.0);
    let segments = packed_segments(s, split);
    let (qg, _) = p.up(&qv, tokens, s.num_heads * s.head_dim);
    let (kg, _) = p.up(&kv, tokens, s.num_kv_heads * s.head_dim);
    let (vg, _) = p.up(&vv, tokens, s.num_kv_heads * s.head_dim);
    let (dog, _) = p.up(&dov, tokens, s.num_heads * s.head_dim);
    // The inputs made ready ahead (`attention_inputs`) are bf16 exactly where the attention runs
    // on tensor cores (head dims 64 and 128; 256 on Hopper): q, k, v and dO enter its products
    // as bf16, and P and dS are rounded to bf16 before theirs. There the reference gets the same
    // bf16-rounded inputs; the rounding of P and dS (2^-9 relative each) then leaves errors of
    // a few 1e-3. Elsewhere all is f32.
    let dup = |t| p.g.duplicate(t).unwrap();
    let [qr, kr, vr] =
        p.g.attention_inputs(dup(&qg), dup(&kg), dup(&vg), s)
            .unwrap();
    let bf16 = qr.dtype() == Dtype::Bf16;
    let (reference, tol) = if bf16 {
        (bf16_round as fn(&[f32]) -> Vec<f32>, 3e-3)
    } else {
        (<[f32]>::to_vec as fn(&[f32]) -> Vec<f32>, 1e-4)
    };
    let (_, qc) = p.up(&reference(&qv), tokens, s.num_heads * s.head_dim);
    let (_, kc) = p.up(&reference(&kv), tokens, s.num_kv_heads * s.head_dim);
    let (_, vc) = p.up(&reference(&vv), tokens, s.num_kv_heads * s.head_dim);
    let (sg, sc) = p.ints(&segments);
    let name = format!("attention {s:?} split {split:?}");
    let (og, lg) = p.g.attention(&qg, &kg, &vg, &sg, s).unwrap();
    let (oc, lc) = p.c.attention(&qc, &kc, &vc, &sc, s).unwrap();
    p.check(&format!("{name}: out"), &og, &oc, tol);
    p.check(&format!("{name}: lse"), &lg, &lc, 1e-5);
    // The gradients on the GPU given `out_g` and on the CPU given `out_c`, checked against each
    // other (`what` names the case); the GPU's returned.
    let backward = |what: &str, out_g, out_c| {
        let (dqg, dkg, dvg) =
            p.g.attention_backward(&qg, &kg, &vg, out_g, &lg, dup(&dog), &sg, s)
                .unwrap();
        let (_, doc) = p.up(&reference(&dov), tokens, s.num_heads * s.head_dim);
        let (dqc, dkc, dvc) =
            p.c.attention_backward(&qc, &kc, &vc, out_c, &lc, doc, &sc, s)
                .unwrap();
        for (grad, g, c) in [("dq", &dqg, &dqc), ("dk", &dkg, &dkc), ("dv", &dvg, &dvc)] {
            p.check(&format!("{name}: {grad}{what}"), g, c, tol);
        }
        (dqg, dkg, dvg)
    };
    let (dqg, dkg, dvg) = backward("", dup(&og), oc);
    // `out` as the decoder keeps it: o's product input (spare columns for an adapter of rank
    // 16), against the reference given the same values. This pair computes products exactly, so
    // the product input stays f32 here; where products round it, it is bf16, and the
    // training-step parity tests (a backend that rounds) run that backward.
    let o_input = p.g.product_input(dup(&og), 16).unwrap();
    let o_values = p.g.download(&og).unwrap();
    let o_kept = match o_input.dtype() {
        Dtype::Bf16 => bf16_round(&o_values),
        _ => o_values,
    };
    let (_, ock) = p.up(&o_kept, tokens, s.num_heads * s.head_dim);
    backward(", out kept", o_input, ock);
    // The ready inputs (rounded to bf16 once on the tensor-core path, as the kernels' own copies
    // are) give the same bits in both passes.
    let rounded = (qr.dtype(), kr.dtype(), vr.dtype());
    let want = qr.dtype();
    assert_eq!(rounded, (want, want, want), "{name}: ready inputs");
    let (or, lr) = p.g.attention(&qr, &kr, &vr, &sg, s).unwrap();
    let (dqr, dkr, dvr) =
        p.g.attention_backward(&qr, &kr, &vr, dup(&or), &lr, dup(&dog), &sg, s)
            .unwrap();
    let bits = |t| p.g.download(t).unwrap();
    for (what, ready, f32_inputs) in [
        ("out", &or, &og),
        ("lse", &lr, &lg),
        ("dq", &dqr, &dqg),
        ("dk", &dkr, &dkg),
        ("dv", &dvr, &dvg),
    ] {
        assert_eq!(
            bits(ready),
            bits(f32_inputs),
            "{name}: {what} from ready inputs"
        );
    }
    // dO stored in bf16 (o's input gradient as its product stores it for this backward,
    // `ProductOutput::Rounded`; widened for the CUDA-core kernels): the same bits as an f32 dO
    // holding the same values.
    let do_values = bf16_round(&dov);
    let do_cols = s.num_heads * s.head_dim;
    let do16 = p.g.upload_frozen(&do_values, tokens, do_cols).unwrap();
    assert_eq!(do16.dtype(), Dtype::Bf16);
    let (do32, _) = p.up(&do_values, tokens, do_cols);
    let grads = |d_out| {
        p.g.attention_backward(&qr, &kr, &vr, dup(&or), &lr, d_out, &sg, s)
            .unwrap()
    };
    let (from16, from32) = (grads(do16), grads(do32));
    for (what, a, b) in [
        ("dq", &from16.0, &from32.0),
        ("dk", &from16.1, &from32.1),
        ("dv", &from16.2, &from32.2),
    ] {
        assert_eq!(bits(a), bits(b), "{name}: {what} from a bf16 dO");
    }
}

/// Where products read rounded inputs, `attention_for_products` gives what `product_input` makes
/// of `attention`'s output (the CUDA tensor-core kernels write it rounded themselves): the same
/// layout, bits and log-sum-exp, with and without room, for every kernel (head_dim 32: the
/// CUDA-core fallback).
#[test]
fn attention_writes_its_product_input() {
    let Some(mut p) = Pair::new() else { return };
    p.g.set_f32_products(F32Products::Tf32);
    let mut rng = fresh_rng("attention for products");
    for (batch, seq, heads, kv_heads, head_dim, split) in [
        (2, 70, 4, 2, 64, None),
        (1, 1100, 16, 2, 128, None),
        (2, 130, 4, 1, 128, Some(50)),
        (2, 200, 4, 2, 256, Some(130)),
        (1, 200, 6, 3, 32, Some(129)),
    ] {
        let s = attention_shape((batch, seq, heads, kv_heads, head_dim));
        let tokens = batch * seq;
        let segments = packed_segments(s, split);
        let mut up = |cols| p.up(&randn(&mut rng, tokens * cols, 1.0), tokens, cols).0;
        let (q, k, v) = (
            up(heads * head_dim),
            up(kv_heads * head_dim),
            up(kv_heads * head_dim),
        );
        let (sg, _) = p.ints(&segments);
        let layout = |t: &CudaTensor| (t.dtype(), t.rows, t.cols, t.pitch());
        for room in [0, 16, 17] {
            let name = format!("{s:?} room {room}");
            let (out, lse) = p.g.attention(&q, &k, &v, &sg, s).unwrap();
            let made = p.g.product_input(out, room).unwrap();
            let (written, lse_w) =
                p.g.attention_for_products(&q, &k, &v, &sg, s, room)
                    .unwrap();
            assert_eq!(layout(&written), layout(&made), "{name}: layout");
            assert_eq!(written.dtype(), Dtype::Bf16, "{name}: rounded");
            for (what, a, b) in [("out", &written, &made), ("lse", &lse_w, &lse)] {
                let (a, b) = (p.g.download(a).unwrap(), p.g.download(b).unwrap());
                assert_eq!(a, b, "{name}: {what}");
            }
        }
    }
}

/// Where products read rounded inputs, `attention_backward_for_products` gives what the two steps
/// make (`attention_backward`, then dq and dk turned back and all three made product inputs):
/// the same layouts and bits, with and without room, at positions up to 60,000, for every kernel.
/// The tensor-core ones write them so themselves; a dK/dV launch split into slabs (each
/// query-head group in parts: short sequences) sums its slabs into them. Query-head groups of
/// one are never split: (2, 70, 4, 4, 64) runs the 64-key dK/dV whole, (1, 2048, 16, 16, 64, 128
/// and 256) the warp-specialized one on sm_90a, and (1, 1100, 8, 4, 256) that one in two parts;
/// (5, 2048, 32, 8, 128) has enough key rows for groups of four in one part on an H200; head_dim
/// 32 is the CUDA-core fallback.
#[test]
fn attention_backward_writes_its_product_inputs() {
    let Some(mut p) = Pair::new() else { return };
    p.g.set_f32_products(F32Products::Tf32);
    let mut rng = fresh_rng("attention backward for products");
    for (batch, seq, heads, kv_heads, head_dim, split) in [
        (2, 70, 4, 2, 64, None),
        (2, 70, 4, 4, 64, Some(40)),
        (1, 2048, 16, 16, 128, Some(700)),
        (1, 2048, 16, 16, 64, None),
        (1, 2048, 32, 8, 128, Some(700)),
        // 81,920 key rows: dK/dV in one part on a 132-multiprocessor GPU.
        (5, 2048, 32, 8, 128, Some(700)),
        (1, 1100, 16, 2, 128, None),
        (2, 130, 4, 1, 128, Some(50)),
        (1, 1000, 4, 4, 256, Some(400)),
        (2, 200, 4, 2, 256, Some(130)),
        (1, 2048, 16, 16, 256, Some(700)),
        (1, 1100, 8, 4, 256, None),
        (1, 200, 6, 3, 32, Some(129)),
    ] {
        let s = attention_shape((batch, seq, heads, kv_heads, head_dim));
        let tokens = batch * seq;
        let segments = packed_segments(s, split);
        let positions: Vec<i32> = (0..tokens)
            .map(|_| (rng.next_u64() % 60_000) as i32)
            .collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 500000f32.powf(-2.0 * i as f32 / head_dim as f32))
            .collect();
        let mut up = |cols| p.up(&randn(&mut rng, tokens * cols, 1.0), tokens, cols).0;
        let (q, k, v) = (
            up(heads * head_dim),
            up(kv_heads * head_dim),
            up(kv_heads * head_dim),
        );
        let d_out = up(heads * head_dim);
        let (sg, _) = p.ints(&segments);
        let (pg, _) = p.ints(&positions);
        let (out, lse) = p.g.attention(&q, &k, &v, &sg, s).unwrap();
        let dup = |t: &CudaTensor| p.g.duplicate(t).unwrap();
        let layout = |t: &CudaTensor| (t.dtype(), t.rows, t.cols, t.pitch());
        for room in [0, 16, 17] {
            let name = format!("{s:?} room {room}");
            let (o, d) = (dup(&out), dup(&d_out));
            let qkv = [&q, &k, &v];
            let made = attention_backward_then_product_inputs(
                &p.g, qkv, o, &lse, d, &sg, s, &pg, &inv_freq, room,
            )
            .unwrap();
            let (o, d) = (dup(&out), dup(&d_out));
            let written =
                p.g.attention_backward_for_products(
                    &q, &k, &v, o, &lse, d, &sg, s, &pg, &inv_freq, room,
                )
                .unwrap();
            for (what, a, b) in [
                ("dq", &written[0], &made[0]),
                ("dk", &written[1], &made[1]),
                ("dv", &written[2], &made[2]),
            ] {
                assert_eq!(layout(a), layout(b), "{name}: {what} layout");
                assert_eq!(a.dtype(), Dtype::Bf16, "{name}: {what} rounded");
                let bits = |t| -> Vec<u32> {
                    let values = p.g.download(t).unwrap();
                    assert!(
                        values.iter().all(|x| x.is_finite()),
                        "{name}: {what} finite"
                    );
                    values.iter().map(|x| x.to_bits()).collect()
                };
                assert_eq!(bits(a), bits(b), "{name}: {what}");
            }
        }
    }
}

/// `product_input_rows` gives what `product_input` makes of `copy_rows`: where products round
/// their inputs (the rows read in place and rounded at once) the same layout and bits, with and
/// without room, from aligned and unaligned starts and widths; where they do not, the f32 rows.
#[test]
fn product_input_rows_are_a_copy_made_a_product_input() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("product input rows");
    let layout = |t: &CudaTensor| (t.dtype(), t.rows, t.cols, t.pitch());
    for products in [F32Products::Tf32, F32Products::Exact] {
        p.g.set_f32_products(products);
        for (rows, cols, first, n) in [(300, 256, 100, 150), (37, 37, 3, 31), (64, 8, 0, 60)] {
            let (x, _) = p.up(&randn(&mut rng, rows * cols, 1.0), rows, cols);
            for room in [0, 16, 17] {
                // Other rows for each room: a buffer of the last one's size, handed back by the
                // pool, holds other values.
                let start = first + room % 3;
                let name = format!("{products:?} [{rows}, {cols}] rows {start}+{n} room {room}");
                let made =
                    p.g.product_input(p.g.copy_rows(&x, start, n).unwrap(), room)
                        .unwrap();
                let read = p.g.product_input_rows(&x, start, n, room).unwrap();
                assert_eq!(layout(&read), layout(&made), "{name}: layout");
                let bits = |t| -> Vec<u32> {
                    let values = p.g.download(t).unwrap();
                    values.iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(bits(&read), bits(&made), "{name}");
            }
            let past = p.g.product_input_rows(&x, first, rows - first + 1, 0);
            assert!(past.is_err(), "rows past the end are refused");
        }
    }
}

#[test]
fn attention_matches_cpu() {
    let Some(p) = Pair::new() else { return };
    let mut rng = fresh_rng("attention");
    // Short sequences split every query-head group of the dK/dV launch into one part per head;
    // the long one gets enough blocks for fewer parts (2 of its group of 4 on a 132-SM GPU); a
    // group of one is never split. On sm_90a the 2048, 1100 and 1050 ones (blocks of 128 keys for
    // every query head filling a 132-SM GPU) take the warp-specialized dK/dV: 1100 with a last
    // block whose second 64 keys are partial, 1050 with none there at all; at head_dim 256 (64
    // keys a block) the 576 ones (whole tiles, one part; one in two sequences) and the 1100 one
    // (a partial last tile, two parts summed from slabs).
    for (batch, seq, heads, kv_heads, head_dim, split) in [
        (2, 70, 4, 2, 64, None),
        (3, 2048, 32, 8, 128, Some(700)),
        (1, 1100, 16, 2, 128, None),
        (1, 1050, 16, 4, 64, Some(1037)),
        (1, 300, 4, 4, 64, None),
        (2, 130, 4, 1, 128, Some(50)),
        (1, 200, 6, 3, 32, Some(129)),
        (3, 17, 2, 2, 16, None),
        (1, 65, 2, 1, 256, None),
        (1, 1000, 4, 4, 256, Some(400)),
        (2, 200, 4, 2, 256, Some(130)),
        (1, 576, 16, 16, 256, None),
        (2, 576, 8, 8, 256, Some(300)),
        (1, 1100, 8, 4, 256, Some(900)),
    ] {
        let s = attention_shape((batch, seq, heads, kv_heads, head_dim));
        attention_case(&p, &mut rng, s, split);
    }
}

#[test]
fn decode_attention_and_kv_cache_match_cpu() {
    let Some(p) = Pair::new() else { return };
    let mut rng = fresh_rng("decode");
    let (heads, kv_heads, hd) = (4, 2, 64);
    let (n, m) = (77, 3);
    let (mut kg, mut kc) = p.up(
        &randn(&mut rng, (n - m) * kv_heads * hd, 1.0),
        n - m,
        kv_heads * hd,
    );
    let (mut vg, mut vc) = p.up(
        &randn(&mut rng, (n - m) * kv_heads * hd, 1.0),
        n - m,
        kv_heads * hd,
    );
    let (k2g, k2c) = p.up(&randn(&mut rng, m * kv_heads * hd, 1.0), m, kv_heads * hd);
    let (v2g, v2c) = p.up(&randn(&mut rng, m * kv_heads * hd, 1.0), m, kv_heads * hd);
    p.g.append_rows(&mut kg, &k2g).unwrap();
    p.c.append_rows(&mut kc, &k2c).unwrap();
    p.g.append_rows(&mut vg, &v2g).unwrap();
    p.c.append_rows(&mut vc, &v2c).unwrap();
    p.check("append_rows", &kg, &kc, 1e-7);
    for rows in [1, m] {
        let (qg, qc) = p.up(&randn(&mut rng, rows * heads * hd, 1.0), rows, heads * hd);
        let (og, lg) =
            p.g.attention_decode(&qg, &kg, &vg, (heads, kv_heads, hd))
                .unwrap();
        let (oc, lc) =
            p.c.attention_decode(&qc, &kc, &vc, (heads, kv_heads, hd))
                .unwrap();
        p.check(&format!("decode {rows} rows: out"), &og, &oc, 1e-4);
        p.check(&format!("decode {rows} rows: lse"), &lg, &lc, 1e-5);
    }
}

/// The LM head's loss on `tokens` rows against the CPU: an f32 head (loss and dh), a bf16 head
/// (loss, and dh within bf16's rounding of the probabilities), and the bf16 head in host memory
/// brought over in chunks (as the loss starts it, and as a pass starts it ahead), which must give
/// the bf16 head's numbers bit for bit. Head row v is scaled by `1 + growth·v / 4096`: with
/// growth, each vocabulary chunk's largest logits pass the earlier chunks' by about 20 (the loss
/// then moves its reference maximum in some rows and not in others).
fn lm_head_case(
    p: &mut Pair,
    rng: &mut Rng,
    tokens: usize,
    hidden: usize,
    vocab: usize,
    growth: f32,
) {
    let hv = randn(rng, tokens * hidden, 1.0);
    let wv: Vec<f32> = randn(rng, vocab * hidden, 0.3)
        .chunks(hidden)
        .enumerate()
        .flat_map(|(v, row)| {
            let scale = 1.0 + growth * v as f32 / 4096.0;
            row.iter().map(move |w| w * scale)
        })
        .collect();
    let wv = bf16_round(&wv);
    let labels: Vec<i32> = (0..tokens)
        .map(|t| {
            if t % 5 == 0 {
                IGNORE_LABEL
            } else {
                (rng.next_u64() % vocab as u64) as i32
            }
        })
        .collect();
    let (lg, lc) = p.ints(&labels);
    // f32 weight (tests, small heads) and frozen bf16 weight (every loaded model).
    let (hg, hc) = p.up(&hv, tokens, hidden);
    let (wg, wc) = p.up(&wv, vocab, hidden);
    let (sg, sc) = p.up(&[1.0 / 33.0], 1, 1);
    // The GPU's loss with head `w` on `hg` against the CPU's on `h_cpu` (head `wc`); the GPU's row
    // losses and dh. Row losses start as NaN: every row must be written (0 where the label is
    // ignored).
    let against_cpu = |p: &Pair,
                       what: &str,
                       w: &<CudaBackend as Backend>::Tensor,
                       h_cpu: &<CpuBackend as Backend>::Tensor,
                       dh_tol: f64| {
        let (mut rg, mut rc) = p.up(&vec![f32::NAN; tokens], tokens, 1);
        let dhg =
            p.g.lm_head_cross_entropy(&hg, w, &lg, &sg, &mut rg)
                .unwrap();
        let dhc =
            p.c.lm_head_cross_entropy(h_cpu, &wc, &lc, &sc, &mut rc)
                .unwrap();
        p.check(
            &format!("lm head row losses ({what}, vocab {vocab})"),
            &rg,
            &rc,
            1e-5,
        );
        p.check(
            &format!("lm head dh ({what}, vocab {vocab})"),
            &dhg,
            &dhc,
            dh_tol,
        );
        (rg, dhg)
    };
    against_cpu(p, "f32 weight", &wg, &hc, 1e-4);
    let wg16 = p.g.upload_frozen(&wv, vocab, hidden).unwrap();
    let hc16 = p.c.upload(&bf16_round(&hv), tokens, hidden).unwrap();
    let (mut rg, dhg) = against_cpu(p, "bf16 weight", &wg16, &hc16, 1e-2);
    let want = (p.g.download(&rg).unwrap(), p.g.download(&dhg).unwrap());
    p.g.set_output_projection_in_host(true);
    let head = p.g.upload_output_projection(&wv, vocab, hidden).unwrap();
    p.g.set_output_projection_in_host(false);
    for ahead in [false, true] {
        if ahead {
            assert!(p.g.bring_to_device(&head).unwrap());
        }
        let mut rh = p.g.upload(&vec![f32::NAN; tokens], tokens, 1).unwrap();
        let dhh =
            p.g.lm_head_cross_entropy(&hg, &head, &lg, &sg, &mut rh)
                .unwrap();
        p.g.release_device_copy(&head);
        let got = (p.g.download(&rh).unwrap(), p.g.download(&dhh).unwrap());
        assert!(
            got == want,
            "vocab {vocab}, brought ahead {ahead}: a head in host memory"
        );
    }
    let (bad, _) = p.ints(&vec![vocab as i32; tokens]);
    assert!(
        p.g.lm_head_cross_entropy(&hg, &wg, &bad, &sg, &mut rg)
            .is_err(),
        "label past the vocabulary"
    );
}

#[test]
fn lm_head_cross_entropy_and_adamw_match_cpu() {
    let Some(mut p) = Pair::new() else { return };
    let mut rng = fresh_rng("lm head/adamw");
    // One vocabulary chunk, and five (the last one short), their logits alike or growing.
    for (vocab, growth) in [(3001, 0.0), (20000, 0.0), (20000, 3.0)] {
        lm_head_case(&mut p, &mut rng, 41, 64, vocab, growth);
    }
    // Several tensors of different lengths in one call (one launch on the GPU).
    let sizes = [1000, 70, 3];
    let (mut state_g, mut state_c): (Vec<_>, Vec<_>) = sizes
        .iter()
        .map(|&n| {
            let v0: Vec<f32> = randn(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
            let [(pg, pc), (mg, mc), (vg, vc)] = [
                p.up(&randn(&mut rng, n, 1.0), 1, n),
                p.up(&randn(&mut rng, n, 0.1), 1, n),
                p.up(&v0, 1, n),
            ];
            ([pg, mg, vg], [pc, mc, vc])
        })
        .unzip();
    /// AdamW slots over `[param, m, v]` triples and their gradients.
    fn slots<'a, T>(state: &'a mut [[T; 3]], grads: &'a [T]) -> Vec<AdamWSlot<'a, T>> {
        state
            .iter_mut()
            .zip(grads)
            .map(|([param, m, v], grad)| AdamWSlot { param, grad, m, v })
            .collect()
    }
    for step in 1..=3 {
        let (grads_g, grads_c): (Vec<_>, Vec<_>) = sizes
            .iter()
            .map(|&n| p.up(&randn(&mut rng, n, 1.0), 1, n))
            .unzip();
        let h = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
            grad_scale: 0.75,
        };
        p.g.adamw(&mut slots(&mut state_g, &grads_g), h).unwrap();
        p.c.adamw(&mut slots(&mut state_c, &grads_c), h).unwrap();
    }
    for (i, (g, c)) in state_g.iter().zip(&state_c).enumerate() {
        for (name, (tg, tc)) in ["p", "m", "v"].iter().zip(g.iter().zip(c)) {
            p.check(&format!("adamw {name} {i}"), tg, tc, 1e-6);
        }
    }
}

/// With the base weights in f32 on the GPU too, only summation order differs: any wrong index or
/// formula anywhere in a step shows up far above these bounds.
#[test]
fn training_steps_match_cpu_exactly_with_f32_weights() {
    let Some(g) = gpu() else { return };
    drop(g);
    steps_match(Base::F32, 1e-4, 0.99999);
}

/// As deployed (bf16 base weights, activations rounded to bf16 at each base product): the loss
/// within 1e-2 relative and every LoRA gradient with cosine similarity ≥ 0.999.
#[test]
fn training_steps_match_cpu_with_bf16_weights() {
    let Some(g) = gpu() else { return };
    drop(g);
    steps_match(Base::Frozen, 1e-2, 0.999);
}

/// A recorded and replayed step (CUDA graph) computes what the step queued op by op does.
#[test]
fn recorded_steps_match_unrecorded_steps() {
    let Some(g) = gpu() else { return };
    drop(g);
    recorded_steps_match_unrecorded(Base::Frozen, 1e-5);
}

#[test]
fn long_micro_batches_are_not_recorded() {
    let Some(g) = gpu() else { return };
    drop(g);
    long_micro_batches_run_unrecorded();
}

#[test]
fn out_of_memory_is_an_error_naming_the_size_and_the_trainer_stays_usable() {
    let Some(be) = gpu() else { return };
    // Far past any GPU: the driver refuses, the error names the bytes.
    match be.zeros(1 << 20, 1 << 16) {
        Err(Error::OutOfMemory { requested, .. }) => assert_eq!(requested, 1 << 38),
        other => panic!("expected OutOfMemory, got {:?}", other.map(|_| ())),
    }
    // A cap below what a step needs: the step fails cleanly, a smaller batch then works.
    let mut t = trainer_on(be, Family::Llama, Base::Frozen);
    let gpu = t.decoder().backend.gpu().memory.clone();
    gpu.set_limit(gpu.live() + (1 << 20));
    let mut rng = Rng::new(1);
    let big = Batch::new(
        8,
        256,
        (0..2048).map(|_| (rng.next_u64() % 64) as i32).collect(),
        vec![1; 2048],
    )
    .unwrap();
    let err = t.step(std::slice::from_ref(&big)).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    eprintln!("capped step: {err}");
    let small = Batch::new(1, 8, vec![1; 8], vec![2; 8]).unwrap();
    t.step(std::slice::from_ref(&small)).unwrap();
    gpu.set_limit(0);
}

/// A NaN in an adapter matrix is reported, never applied, and training goes on once mended.
#[test]
fn non_finite_loss_is_reported_and_not_applied() {
    let Some(be) = gpu() else { return };
    non_finite_step_is_refused_and_training_goes_on(be);
}

#[test]
fn offloaded_activations_train_identically_with_less_device_memory() {
    if gpu().is_none() {
        return;
    }
    use finetune::api::{Device, Model, ModelParams, Trainer};
    use finetune::lora::LoraConfig;
    use finetune::model::config::ModelConfig;
    use finetune::model::presets::tiny;
    use finetune::train::trainer::TrainConfig;
    let shape = ModelConfig {
        num_layers: 12,
        hidden_size: 256,
        intermediate_size: 512,
        head_dim: 64,
        num_heads: 4,
        num_kv_heads: 2,
        ..tiny(Family::Llama)
    };
    let (rows, seq) = (4, 512);
    let (_, b) = next_token_batch(rows, seq, 64, 3);
    let run = |offload: bool| {
        let params = ModelParams {
            device: Device::Cuda(0),
            ..ModelParams::default()
        };
        let model = Model::random(shape.clone(), 5, &params).unwrap();
        let lora = LoraConfig {
            dropout: 0.1,
            ..LoraConfig::default()
        };
        let train = TrainConfig {
            learning_rate: 1e-2,
            offload_activations: offload,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(&model, lora, train).unwrap();
        model.reset_peak_memory();
        let losses: Vec<f32> = (0..3)
            .map(|_| t.step(std::slice::from_ref(&b)).unwrap().loss)
            .collect();
        (losses, model.device_memory().unwrap().peak_bytes)
    };
    let (kept, kept_peak) = run(false);
    let (moved, moved_peak) = run(true);
    let input_bytes = rows * seq * shape.hidden_size * 4;
    eprintln!(
        "losses kept {kept:?} offloaded {moved:?}; peak {kept_peak} -> {moved_peak} bytes \
         (one layer input: {input_bytes})"
    );
    assert_eq!(kept, moved);
    // Offloaded, the device still holds a few layer inputs at a time (the one in use, the next
    // one coming back) and, as the attention outputs are offloaded too, one of those coming
    // back and every layer's log-sum-exp (1/16 of an input here).
    let saved = kept_peak.saturating_sub(moved_peak);
    assert!(
        saved >= (shape.num_layers - 4) * input_bytes,
        "offload saved {saved} bytes"
    );
}

/// Stashed tensors of each kind the decoder offloads (f32 layer inputs; bf16 attention outputs,
/// with spare columns or dense) read the same in host memory and come back with the same bits.
#[test]
fn stashed_tensors_come_back_bit_identical() {
    let Some(be) = gpu() else { return };
    let mut rng = fresh_rng("stash");
    let (rows, cols) = (37, 96);
    let values = randn(&mut rng, rows * cols, 1.0);
    let f32_values = be.upload(&values, rows, cols).unwrap();
    // The f32 values as they are (`None`) or as a product input with `Some(room)`.
    let make = |room: Option<usize>| {
        let t = be.duplicate(&f32_values).unwrap();
        match room {
            None => t,
            Some(r) => be.product_input(t, r).unwrap(),
        }
    };
    let w = be.upload(&randn(&mut rng, 8 * cols, 1.0), 8, cols).unwrap();
    let product = |x: &CudaTensor| {
        be.download(&be.product(x, false, &w, true, 1.0).unwrap())
            .unwrap()
    };
    for room in [None, Some(0), Some(16)] {
        let t = make(room);
        let what = format!("{:?} with room {room:?}", t.dtype());
        let before = be.download(&t).unwrap();
        let stashed = be.stash(t).unwrap();
        assert_eq!(
            be.download(&stashed).unwrap(),
            before,
            "{what}: in host memory"
        );
        let back = be.settle(be.fetch_stashed(stashed).unwrap()).unwrap();
        assert_eq!(
            be.download(&back).unwrap(),
            before,
            "{what}: back on the device"
        );
        // Read as before: o's product reads the kept attention output.
        assert_eq!(
            product(&back),
            product(&make(room)),
            "{what}: a product of it"
        );
    }
}

/// What a model of `shape` loaded with `params` on GPU 0 gives: device bytes held once loaded,
/// the peak over four training steps (the first unrecorded, the later ones recorded and
/// replayed), and the numbers of training, evaluation, logits and generation.
#[derive(Debug)]
struct PlacedRun {
    loaded: usize,
    peak: usize,
    losses: Vec<f32>,
    eval: f32,
    logits: Vec<f32>,
    generated: Vec<f32>,
}

fn run_placed(
    shape: &finetune::model::config::ModelConfig,
    params: finetune::api::ModelParams,
    offload: bool,
) -> PlacedRun {
    use finetune::api::{Model, Trainer};
    use finetune::lora::LoraConfig;
    use finetune::train::trainer::TrainConfig;
    let (ids, b) = next_token_batch(2, 64, shape.vocab_size as u64, 9);
    let model = Model::random(shape.clone(), 5, &params).unwrap();
    let loaded = model.device_memory().unwrap().live_bytes;
    let train = TrainConfig {
        learning_rate: 1e-2,
        offload_activations: offload,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&model, LoraConfig::default(), train).unwrap();
    model.reset_peak_memory();
    let losses: Vec<f32> = (0..4)
        .map(|_| t.step(std::slice::from_ref(&b)).unwrap().loss)
        .collect();
    let peak = model.device_memory().unwrap().peak_bytes;
    let eval = t.eval_loss(&b).unwrap();
    let logits = model.logits(&b, Some(&t)).unwrap();
    let mut session = model.decode_session(Some(&t)).unwrap();
    let mut generated = session.feed(&ids[..5]).unwrap();
    generated.extend(session.feed(&ids[5..6]).unwrap());
    PlacedRun {
        loaded,
        peak,
        losses,
        eval,
        logits,
        generated,
    }
}

/// `moved` (weights in host memory) against `resident`: the same numbers bit for bit (products
/// read device copies of the same bf16 values), `bytes` less held once loaded, and a peak at
/// least `peak_drop` bytes lower.
fn assert_moved_to_host(
    what: &str,
    resident: &PlacedRun,
    moved: &PlacedRun,
    bytes: usize,
    peak_drop: usize,
) {
    eprintln!(
        "{what}: loaded {} -> {} bytes, peak {} -> {} bytes, losses {:?} / {:?}",
        resident.loaded, moved.loaded, resident.peak, moved.peak, resident.losses, moved.losses
    );
    assert_eq!(
        resident.loaded - moved.loaded,
        bytes,
        "{what}: held when loaded"
    );
    assert!(moved.peak + peak_drop <= resident.peak, "{what}: peak");
    assert_eq!(resident.losses, moved.losses, "{what}: losses");
    assert!(moved.losses.iter().all(|l| l.is_finite()), "{what}");
    assert_eq!(resident.eval, moved.eval, "{what}: evaluation loss");
    assert_eq!(resident.logits, moved.logits, "{what}: logits");
    assert_eq!(
        resident.generated, moved.generated,
        "{what}: generation logits"
    );
}

/// A Llama of tensor-core widths with six layers and a 4,096-entry vocabulary: room for runs
/// of host layers and a pass of several layers' copies.
fn six_layer_llama() -> finetune::model::config::ModelConfig {
    finetune::model::config::ModelConfig {
        num_layers: 6,
        vocab_size: 4096,
        ..tensor_core_shape(Family::Llama)
    }
}

/// `[out, in]` of a decoder layer's q, k, v, o, gate, up and down projections.
fn projection_shapes(shape: &finetune::model::config::ModelConfig) -> [(usize, usize); 7] {
    let (h, d, i) = (shape.hidden_size, shape.head_dim, shape.intermediate_size);
    let (q, kv) = (shape.num_heads * d, shape.num_kv_heads * d);
    [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
}

/// The bytes of a bf16 decoder layer's projection matrices, each laid out with PROJECTION_ROOM
/// spare columns and rows (every width here a multiple of 8).
fn bf16_host_layer_bytes(shape: &finetune::model::config::ModelConfig) -> usize {
    let room = PROJECTION_ROOM;
    projection_shapes(shape)
        .iter()
        .map(|(o, n)| 2 * (o + room) * (n + room))
        .sum()
}

/// The LM head kept in host memory (`ModelParams::lm_head_in_host`), untied (Llama) and tied
/// (Gemma, whose embedding table is the head): the device holds exactly its bytes less once
/// loaded and never more at the peak, and training (with and without offload), evaluation,
/// logits and generation give bit-identical numbers.
#[test]
fn lm_head_in_host_memory_changes_no_number_and_frees_its_bytes() {
    if gpu().is_none() {
        return;
    }
    use finetune::api::{Device, ModelParams};
    use finetune::model::config::ModelConfig;
    for family in [Family::Llama, Family::Gemma] {
        // Three chunks of the vocabulary (head_chunks.rs).
        let shape = ModelConfig {
            num_layers: 4,
            vocab_size: 20000,
            ..tensor_core_shape(family)
        };
        let head_bytes = shape.vocab_size * shape.hidden_size * 2;
        for offload in [false, true] {
            let params = |lm_head_in_host| ModelParams {
                device: Device::Cuda(0),
                lm_head_in_host,
                ..ModelParams::default()
            };
            let resident = run_placed(&shape, params(false), offload);
            let moved = run_placed(&shape, params(true), offload);
            let what = format!("{family:?}, offload {offload}");
            assert_moved_to_host(&what, &resident, &moved, head_bytes, 0);
        }
    }
}

/// Decoder layers kept in host memory (`ModelParams::layers_in_host`), alone and beside an LM
/// head kept there: the device holds exactly their projection matrices' bytes less once loaded
/// (each laid out with PROJECTION_ROOM spare columns and rows for the folded adapter products,
/// in host memory as on the device) and a peak at least one layer's lower (a pass holds one
/// layer's copy at a time), and every number is bit-identical to the resident model's (the
/// copies fold the adapters into their products as the resident matrices do).
#[test]
fn layers_in_host_memory_change_no_number_and_free_their_bytes() {
    if gpu().is_none() {
        return;
    }
    use finetune::api::{Device, ModelParams};
    use finetune::model::config::ModelConfig;
    for family in [Family::Llama, Family::Qwen2] {
        // Eight layers: two of the first six in host memory (layers 1 and 4).
        let shape = ModelConfig {
            num_layers: 8,
            vocab_size: 4096,
            ..tensor_core_shape(family)
        };
        let layer_bytes = bf16_host_layer_bytes(&shape);
        for (offload, lm_head_in_host) in [(false, false), (true, true)] {
            let params = |layers_in_host| ModelParams {
                device: Device::Cuda(0),
                lm_head_in_host,
                layers_in_host,
                ..ModelParams::default()
            };
            let resident = run_placed(&shape, params(0), offload);
            let moved = run_placed(&shape, params(2), offload);
            let what = format!("{family:?}, offload {offload}, head in host {lm_head_in_host}");
            assert_moved_to_host(&what, &resident, &moved, 2 * layer_bytes, layer_bytes);
        }
    }
}

/// Adjacent host layers (more than (n − 2)/2 of them, all n too) and NF4 layers, whose packed
/// codes stay in host memory: the device holds exactly their bytes less once loaded, a peak at
/// least that of all but two layers lower (a pass holds two host layers' copies where they are
/// adjacent), and every number is bit-identical to the resident model's (an NF4 matrix's
/// dequantization reads its codes' device copy).
#[test]
fn adjacent_and_nf4_host_layers_change_no_number_and_free_their_bytes() {
    if gpu().is_none() {
        return;
    }
    use finetune::api::{Device, ModelParams};
    use finetune::quant::Quantization;
    let shape = six_layer_llama();
    // Two 4-bit codes a byte.
    let nf4_layer: usize = projection_shapes(&shape)
        .iter()
        .map(|(o, n)| o * n / 2)
        .sum();
    for (quantization, layer_bytes) in [
        (Quantization::None, bf16_host_layer_bytes(&shape)),
        (Quantization::Nf4, nf4_layer),
    ] {
        let params = |layers_in_host| ModelParams {
            device: Device::Cuda(0),
            quantization,
            layers_in_host,
            ..ModelParams::default()
        };
        let resident = run_placed(&shape, params(0), true);
        // 4 of 6: layers 0, 1, 3 and 4 (two adjacent pairs); then all of them.
        for count in [4, 6] {
            let moved = run_placed(&shape, params(count), true);
            let what = format!("{quantization:?}, {count} layers in host memory");
            let drop = (count - 2) * layer_bytes;
            assert_moved_to_host(&what, &resident, &moved, count * layer_bytes, drop);
        }
    }
}

/// The longest-sequence search of `finetune bench`: under a device-memory cap, every probe at or
/// below the answer fitted, every one above failed with out-of-memory, and a failure lies
/// within the resolution above the answer.
#[test]
fn the_longest_sequence_search_ends_at_the_cap() {
    if gpu().is_none() {
        return;
    }
    use finetune::api::{Device, ModelParams};
    use finetune::bench::{longest_sequence, BenchConfig};
    let cfg = BenchConfig {
        model: "tiny".into(),
        seq: 64,
        rank: 8,
        params: ModelParams {
            device: Device::Cuda(0),
            max_device_memory_mib: 24,
            ..ModelParams::default()
        },
        ..BenchConfig::default()
    };
    let mut probes = Vec::new();
    let longest = longest_sequence(&cfg, 1 << 17, 256, &mut |p| probes.push(p.clone())).unwrap();
    eprintln!("longest {longest}: {probes:?}");
    assert!(
        probes.iter().all(|p| p.fits == (p.seq <= longest)),
        "{probes:?}"
    );
    assert!(
        probes.iter().any(|p| !p.fits && p.seq <= longest + 256) || longest + 256 >= 1 << 17,
        "{probes:?}"
    );
    assert!(
        longest > 64,
        "the cap leaves room for more than the lower end"
    );
}

/// FINETUNE_CUDA_TIMELINE: a recorded pass's marks come out in the pass's order with times that
/// never go back, and every copy (activations out and in, host layers and head in) with a begin
/// and an end inside the pass.
#[test]
fn the_timeline_holds_the_last_pass_in_order() {
    if gpu().is_none() {
        return;
    }
    use finetune::api::{Device, Model, ModelParams, Trainer};
    use finetune::lora::LoraConfig;
    use finetune::train::trainer::TrainConfig;
    let shape = six_layer_llama();
    let path = std::env::temp_dir().join(format!("timeline-{}.csv", std::process::id()));
    // The tests run one at a time on a GPU (scripts/test_gpu.sh): no other backend sees it.
    std::env::set_var("FINETUNE_CUDA_TIMELINE", &path);
    {
        let params = ModelParams {
            device: Device::Cuda(0),
            lm_head_in_host: true,
            layers_in_host: 2,
            ..ModelParams::default()
        };
        let model = Model::random(shape.clone(), 5, &params).unwrap();
        let train = TrainConfig {
            offload_activations: true,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(&model, LoraConfig::default(), train).unwrap();
        let (_, b) = next_token_batch(2, 64, shape.vocab_size as u64, 9);
        for _ in 0..3 {
            t.step(std::slice::from_ref(&b)).unwrap();
        }
    }
    std::env::remove_var("FINETUNE_CUDA_TIMELINE");
    let csv = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("ms,stream,what,index"));
    let rows: Vec<(f64, &str, &str, usize)> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().unwrap(), f[1], f[2], f[3].parse().unwrap())
        })
        .collect();
    let n = shape.num_layers;
    let marks: Vec<(&str, usize)> = rows
        .iter()
        .filter(|r| r.1 == "compute")
        .map(|r| (r.2, r.3))
        .collect();
    let expected: Vec<(&str, usize)> = [("start", 0)]
        .into_iter()
        .chain((0..n).map(|l| ("forward", l)))
        .chain([("loss", 0)])
        .chain((0..n).rev().map(|l| ("backward", l)))
        .chain([("end", 0)])
        .collect();
    assert_eq!(marks, expected);
    let times: Vec<f64> = rows
        .iter()
        .filter(|r| r.1 == "compute")
        .map(|r| r.0)
        .collect();
    assert_eq!(times[0], 0.0);
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let end = *times.last().unwrap();
    assert!(end > 0.0);
    for (stream, direction) in [
        ("activations", "out"),
        ("activations", "in"),
        ("tables", "in"),
    ] {
        let edge = |e: &str| -> Vec<(f64, usize)> {
            let what = format!("{direction}-{e}");
            rows.iter()
                .filter(|r| r.1 == stream && r.2 == what)
                .map(|r| (r.0, r.3))
                .collect()
        };
        let (begins, ends) = (edge("begin"), edge("end"));
        assert!(!begins.is_empty(), "no {direction} copy on {stream}");
        assert_eq!(begins.len(), ends.len(), "{stream} {direction}");
        for (b, e) in begins.iter().zip(&ends) {
            assert_eq!(b.1, e.1, "a copy's bytes at both ends");
            assert!(b.1 > 0);
            assert!(
                0.0 <= b.0 && b.0 <= e.0 && e.0 <= end,
                "{stream} {direction}: {b:?} {e:?}"
            );
        }
    }
}
