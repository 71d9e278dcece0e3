//! What the GPU tests share: the backends, and whole training steps of tiny models of every
//! family run on both backends side by side.

use super::{bf16_round, cosine, randn, rel_err};
use finetune::backend::cpu::CpuBackend;
use finetune::backend::cuda::{CudaBackend, F32Products};
use finetune::backend::{Backend, IGNORE_LABEL};
use finetune::error::Error;
use finetune::lora::LoraConfig;
use finetune::model::config::{Family, ModelConfig};
use finetune::model::decoder::Decoder;
use finetune::model::presets::tiny;
use finetune::model::weights::{DecoderWeights, Slot, TensorValues};
use finetune::quant::Quantization;
use finetune::rng::Rng;
use finetune::train::batch::Batch;
use finetune::train::trainer::{TrainConfig, Trainer};
use std::sync::Arc;

/// GPU 0, or `None` (saying so) where no CUDA GPU is usable; with FINETUNE_REQUIRE_GPU=1 a
/// missing GPU is a failure.
pub fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("FINETUNE_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("FINETUNE_REQUIRE_GPU=1 but no GPU is usable: {e}")
        }
        Err(e) => {
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// The CPU reference.
pub fn cpu() -> CpuBackend {
    CpuBackend::new(2).unwrap()
}

/// How the frozen base matrices are held on the backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// f32 on both backends, f32 products in full f32 (only summation order differs).
    F32,
    /// The backend's own frozen format (bf16 on the GPU), as deployed.
    Frozen,
    /// NF4, quantized by each backend from the same values (QLoRA).
    Nf4,
}

/// Random weights at the scale of a trained model, with every frozen matrix bf16-representable so
/// that both backends hold the same base. Matrix entries have std 0.09 ≈ 1/√hidden, so each
/// product keeps activations O(1) and attention logits have std about 1; norm scales are near 1
/// (stored as w of 1 + w in families with a unit offset); biases are zero-mean. Much larger
/// weights (std 0.3) give logits of std ~12 and a softmax near one-hot, where an attention that
/// rounds q and k to bf16 (as the tensor-core path and FlashAttention do) moves the probabilities
/// by percents: measured gradient cosines 0.75-0.99 against f32, base weights f32 or bf16 alike.
fn weights_source(family: Family) -> impl Fn(Slot, usize) -> Vec<f32> {
    let unit_offset = tiny(family).norm_unit_offset;
    move |slot, n| {
        let mut rng = Rng::new(11 ^ (n as u64) ^ ((family as u64) << 32));
        match slot {
            Slot::Embedding | Slot::LmHead | Slot::Proj(..) => {
                bf16_round(&randn(&mut rng, n, 0.09))
            }
            Slot::Bias(..) => randn(&mut rng, n, 0.3),
            _ => {
                let offset = if unit_offset { 0.0 } else { 1.0 };
                randn(&mut rng, n, 0.3).iter().map(|x| offset + x).collect()
            }
        }
    }
}

/// The tiny shape of `family` widened to head_dim 64, which takes the attention kernels'
/// tensor-core path.
pub fn tensor_core_shape(family: Family) -> ModelConfig {
    ModelConfig {
        hidden_size: 128,
        intermediate_size: 256,
        head_dim: 64,
        num_heads: 4,
        num_kv_heads: 2,
        ..tiny(family)
    }
}

/// `rows` rows of `seq` random ids below `vocab` (seed `seed`), each labelled with the next id;
/// also the ids, one more than the batch holds.
pub fn next_token_batch(rows: usize, seq: usize, vocab: u64, seed: u64) -> (Vec<i32>, Batch) {
    let mut rng = Rng::new(seed);
    let ids: Vec<i32> = (0..rows * seq + 1)
        .map(|_| (rng.next_u64() % vocab) as i32)
        .collect();
    let b = Batch::new(rows, seq, ids[..rows * seq].to_vec(), ids[1..].to_vec()).unwrap();
    (ids, b)
}

/// A trainer on a tiny model of `family` with its base held as `base` says.
pub fn trainer_on<B: Backend>(be: B, family: Family, base: Base) -> Trainer<B> {
    let [with_dropout, _] = parity_adapters();
    trainer_with(be, family, base, with_dropout)
}

/// The adapters of the parity trainers, rank 4: on every projection with dropout (whose inputs
/// get no room, so every adapted product runs as two products), and without dropout on q, v,
/// gate and down only (folded products; up not adapted, so the gated kernels read a bf16 gate
/// product beside an f32 up product).
pub fn parity_adapters() -> [LoraConfig; 2] {
    use finetune::lora::TargetModule::{Down, Gate, Q, V};
    let with_dropout = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        seed: 3,
        ..LoraConfig::default()
    };
    let folded = LoraConfig {
        dropout: 0.0,
        targets: [Q, V, Gate, Down].iter().map(|m| m.bit()).sum(),
        ..with_dropout.clone()
    };
    [with_dropout, folded]
}

/// [`trainer_on`] with the adapters `lora`.
pub fn trainer_with<B: Backend>(be: B, family: Family, base: Base, lora: LoraConfig) -> Trainer<B> {
    // head_dim 64 takes the attention kernels' tensor-core path; the f32 run uses the tiny
    // shape, whose head_dim (8) takes the exact f32 path.
    let cfg = match base {
        Base::F32 => tiny(family),
        Base::Frozen | Base::Nf4 => tensor_core_shape(family),
    };
    let quantization = match base {
        Base::Nf4 => Quantization::Nf4,
        Base::F32 | Base::Frozen => Quantization::None,
    };
    let source = weights_source(family);
    let mut weights = DecoderWeights::load_with(&cfg, &be, quantization, |spec| {
        Ok(TensorValues::F32(source(spec.slot, spec.rows * spec.cols)))
    })
    .unwrap();
    if base == Base::F32 {
        fn f32_copy<B: Backend>(be: &B, t: &B::Tensor) -> B::Tensor {
            let (r, c) = be.shape(t);
            be.upload(&be.download(t).unwrap(), r, c).unwrap()
        }
        weights.embedding = f32_copy(&be, &weights.embedding);
        weights.lm_head = weights.lm_head.as_ref().map(|t| f32_copy(&be, t));
        for layer in &mut weights.layers {
            layer.proj = layer.proj.iter().map(|t| f32_copy(&be, t)).collect();
        }
    }
    let mut decoder = Decoder::new(cfg, be, weights);
    // Three MLP chunks over the 66 rows of the parity batch, as a long sequence runs.
    decoder.set_mlp_chunk_rows(24);
    let mut t = Trainer::new(Arc::new(decoder), lora, TrainConfig::default()).unwrap();
    // PEFT starts B at zero; give it values so that A's gradients are not zero too.
    let mut rng = Rng::new(21);
    let dec = t.decoder().clone();
    let be = &dec.backend;
    for pair in t.params_mut().pairs.iter_mut().flatten() {
        let (r, c) = be.shape(&pair.b);
        pair.b = be.upload(&randn(&mut rng, r * c, 0.2), r, c).unwrap();
    }
    t
}

/// Two rows of 33 tokens, the second packing two examples, a few labels ignored.
pub fn parity_batch() -> Batch {
    let mut rng = Rng::new(5);
    let (b, s) = (2, 33);
    let ids: Vec<i32> = (0..b * s).map(|_| (rng.next_u64() % 64) as i32).collect();
    let mut labels: Vec<i32> = (0..b * s).map(|_| (rng.next_u64() % 64) as i32).collect();
    labels[..5].fill(IGNORE_LABEL);
    let mut batch = Batch::new(b, s, ids, labels).unwrap();
    for (i, t) in (s..2 * s).enumerate() {
        batch.positions[t] = if i < 12 { i as i32 } else { i as i32 - 12 };
        batch.segments[t] = if i < 12 { 1 } else { 2 };
    }
    batch
}

fn grads<B: Backend>(t: &Trainer<B>) -> Vec<Vec<f32>> {
    let be = &t.decoder().backend;
    t.grads()
        .tensors()
        .map(|g| be.download(g).unwrap())
        .collect()
}

/// Three training steps of every family on both backends, with each of [`parity_adapters`]: the
/// loss within `loss_tol` relative and every LoRA gradient with cosine similarity at least
/// `min_cosine`.
pub fn steps_match(base: Base, loss_tol: f32, min_cosine: f64) {
    let mut failures = Vec::new();
    let families = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Gemma];
    for (family, lora) in families
        .into_iter()
        .flat_map(|f| parity_adapters().map(|l| (f, l)))
    {
        let mut g = CudaBackend::new(0).unwrap();
        if base == Base::F32 {
            g.set_f32_products(F32Products::Exact);
        }
        let adapters = format!("dropout {}, targets {:#x}", lora.dropout, lora.targets);
        let mut tg = trainer_with(g, family, base, lora.clone());
        // Same shape and values on both sides; the CPU computes in f32 whatever `base` says.
        let mut tc = trainer_with(cpu(), family, base, lora);
        let batch = parity_batch();
        for step in 0..3 {
            let sg = tg.step(std::slice::from_ref(&batch)).unwrap();
            let sc = tc.step(std::slice::from_ref(&batch)).unwrap();
            let rel = ((sg.loss - sc.loss) / sc.loss).abs();
            let (gg, gc) = (grads(&tg), grads(&tc));
            let (worst, at) = gg
                .iter()
                .zip(&gc)
                .map(|(a, b)| cosine(a, b))
                .enumerate()
                .fold((1.0f64, 0), |m, (i, c)| if c < m.0 { (c, i) } else { m });
            let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            eprintln!(
                "{family:?} step {step} ({base:?} base, {adapters}): loss gpu {} cpu {} (rel \
                 {rel:.1e}); lowest gradient cosine {worst:.6} at tensor {at} (norm {:.2e})",
                sg.loss,
                sc.loss,
                norm(&gc[at])
            );
            if rel >= loss_tol || worst < min_cosine || worst.is_nan() {
                failures.push(format!(
                    "{family:?} step {step} ({adapters}): loss rel {rel:.1e}, gradient cosine \
                     {worst:.6}"
                ));
            }
        }
    }
    // Every family runs before the verdict, so a failure shows the whole picture.
    assert!(failures.is_empty(), "out of tolerance: {failures:#?}");
}

/// A NaN in an adapter matrix poisons the loss: the step reports it and changes no other
/// parameter, and once the matrix is mended the next step trains again.
pub fn non_finite_step_is_refused_and_training_goes_on<B: Backend>(be: B) {
    let mut t = trainer_on(be, Family::Llama, Base::Frozen);
    let dec = t.decoder().clone();
    let be = &dec.backend;
    let download_all = |t: &Trainer<B>| -> Vec<Vec<f32>> {
        t.params()
            .tensors()
            .map(|p| be.download(p).unwrap())
            .collect()
    };
    let before = download_all(&t);
    let pair = t.params_mut().pairs.iter_mut().flatten().next().unwrap();
    let (r, c) = be.shape(&pair.a);
    let clean = be.download(&pair.a).unwrap();
    let mut poisoned = clean.clone();
    poisoned[0] = f32::NAN;
    pair.a = be.upload(&poisoned, r, c).unwrap();
    let err = t.step(std::slice::from_ref(&parity_batch())).unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    let after = download_all(&t);
    assert_eq!(before.len(), after.len());
    for (i, (b, a)) in before.iter().zip(&after).enumerate().skip(1) {
        assert_eq!(b, a, "tensor {i} changed");
    }
    let pair = t.params_mut().pairs.iter_mut().flatten().next().unwrap();
    pair.a = be.upload(&clean, r, c).unwrap();
    let stats = t.step(std::slice::from_ref(&parity_batch())).unwrap();
    assert!(
        stats.loss.is_finite() && stats.grad_norm.is_finite(),
        "the step after mending: loss {}, gradient norm {}",
        stats.loss,
        stats.grad_norm
    );
}

/// Batches of the parity batch's shape with other values each step: ids, labels (and which are
/// ignored) and the packing differ, so a replayed recording must read every one of them.
fn varied_batches(steps: usize) -> Vec<Batch> {
    let mut rng = Rng::new(17);
    (0..steps)
        .map(|step| {
            let mut b = parity_batch();
            for id in &mut b.input_ids {
                *id = (rng.next_u64() % 64) as i32;
            }
            for (t, label) in b.labels.iter_mut().enumerate() {
                *label = if (t + step) % (3 + step) == 0 {
                    IGNORE_LABEL
                } else {
                    (rng.next_u64() % 64) as i32
                };
            }
            let split = 5 + 4 * step;
            for (i, t) in (b.seq_len..2 * b.seq_len).enumerate() {
                b.positions[t] = if i < split { i } else { i - split } as i32;
                b.segments[t] = if i < split { 1 } else { 2 };
            }
            b
        })
        .collect()
}

/// A trainer on a tiny model (as [`trainer_on`]) without dropout, which recording needs, its
/// activations offloaded when `offload`; the value returned makes more trainers with the same
/// adapters on the same decoder.
fn recordable_trainer(
    base: Base,
    offload: bool,
) -> Arc<dyn Fn() -> Trainer<CudaBackend> + Send + Sync> {
    let t = trainer_on(CudaBackend::new(0).unwrap(), Family::Llama, base);
    let mut lora = t.lora_config().clone();
    lora.dropout = 0.0;
    let dec = t.decoder().clone();
    let params: Vec<_> = t
        .params()
        .tensors()
        .map(|p| {
            let (r, c) = dec.backend.shape(p);
            (dec.backend.download(p).unwrap(), r, c)
        })
        .collect();
    Arc::new(move || {
        let train = TrainConfig {
            offload_activations: offload,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(dec.clone(), lora.clone(), train).unwrap();
        for (p, (values, r, c)) in t.params_mut().tensors_mut().zip(&params) {
            *p = dec.backend.upload(values, *r, *c).unwrap();
        }
        t
    })
}

/// Six steps of `t` (varied values, a batch of another shape fourth): the losses and the
/// adapters after them.
fn six_steps(t: &mut Trainer<CudaBackend>) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut batches = varied_batches(6);
    batches[3] = Batch::new(1, 20, vec![3; 20], vec![4; 20]).unwrap();
    let losses = batches
        .iter()
        .map(|b| t.step(std::slice::from_ref(b)).unwrap().loss)
        .collect();
    let be = &t.decoder().backend;
    let values = t
        .params()
        .tensors()
        .map(|p| be.download(p).unwrap())
        .collect();
    (losses, values)
}

/// Micro-batches of at most 2,048 tokens are recorded at their second step (which the trainer
/// says after the first), longer ones run unrecorded (a long pass hides the host's queueing
/// behind its GPU time: bench/NOTES.md).
pub fn long_micro_batches_run_unrecorded() {
    let make = recordable_trainer(Base::Frozen, false);
    for (rows, seq, recorded) in [(2, 1_024, true), (1, 2_056, false)] {
        let mut t = make();
        let (_, b) = next_token_batch(rows, seq, 64, 5);
        let step = |t: &mut Trainer<CudaBackend>| t.step(std::slice::from_ref(&b)).unwrap().loss;
        let mut losses = vec![step(&mut t)];
        assert_eq!(
            t.records_next_step(),
            recorded,
            "{rows} x {seq} tokens: the second step records"
        );
        losses.extend((0..2).map(|_| step(&mut t)));
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        assert_eq!(
            t.holds_recording(),
            recorded,
            "{rows} x {seq} tokens: a recording held after three steps"
        );
    }
}

/// Fails unless two runs' losses and adapters agree within `tol` relative.
fn assert_same_run(
    what: &str,
    (la, pa): &(Vec<f32>, Vec<Vec<f32>>),
    (lb, pb): &(Vec<f32>, Vec<Vec<f32>>),
    tol: f64,
) {
    eprintln!("{what}: losses {la:?} and {lb:?}");
    for (i, (a, b)) in la.iter().zip(lb).enumerate() {
        let rel = ((a - b) / a).abs() as f64;
        assert!(rel <= tol, "{what}, step {i}: loss {a} against {b}");
    }
    let worst = pa
        .iter()
        .zip(pb)
        .map(|(a, b)| rel_err(b, a))
        .fold(0.0f64, |m, e| if e.is_nan() { f64::NAN } else { m.max(e) });
    eprintln!("{what}: adapters after the steps differ by {worst:.2e} at most (relative)");
    assert!(worst <= tol, "{what}: adapters differ by {worst}");
}

/// Steps with recording (CUDA graphs) against the same steps queued operation by operation:
/// every loss and every adapter value after the steps within `tol` relative. A batch of another
/// shape comes in the middle (the recording is dropped, then made again). Then the same two
/// trainers again side by side on two threads sharing the model: recording on one thread
/// captures none of the other's work. All of it with activations kept on the device and
/// offloaded to host memory (the layer inputs and attention outputs, copied on a stream of
/// their own, recorded too), which must train alike.
pub fn recorded_steps_match_unrecorded(base: Base, tol: f64) {
    let on_device = recorded_steps_match_unrecorded_with(base, tol, false);
    let offloaded = recorded_steps_match_unrecorded_with(base, tol, true);
    assert_same_run(
        &format!("{base:?} queued, offloaded"),
        &on_device,
        &offloaded,
        tol,
    );
}

/// [`recorded_steps_match_unrecorded`] with activations offloaded or not; returns the queued run.
fn recorded_steps_match_unrecorded_with(
    base: Base,
    tol: f64,
    offload: bool,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let make = recordable_trainer(base, offload);
    let run = |record: bool| {
        let mut t = make();
        t.set_recording(record);
        let run = six_steps(&mut t);
        (run, t.holds_recording())
    };
    let (queued, queued_holds) = run(false);
    let (recorded, recorded_holds) = run(true);
    let base = format!("{base:?}{}", if offload { " offloaded" } else { "" });
    // The sixth step, the second of its shape, was recorded (alone, nothing else held the
    // offload's buffers): the recorded run did not fall back to queueing.
    assert!(
        !queued_holds && recorded_holds,
        "{base}: a recording held after the queued run {queued_holds}, the recorded {recorded_holds}"
    );
    assert_same_run(
        &format!("{base} queued / recorded"),
        &queued,
        &recorded,
        tol,
    );
    let (beside_queued, beside_recorded) = std::thread::scope(|s| {
        let a = s.spawn(|| run(false).0);
        let b = s.spawn(|| run(true).0);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_same_run(
        &format!("{base} queued, two threads"),
        &queued,
        &beside_queued,
        tol,
    );
    assert_same_run(
        &format!("{base} recorded, two threads"),
        &recorded,
        &beside_recorded,
        tol,
    );
    queued
}
