//! The CPU reference against central finite differences, on tiny random models of every family.
//!
//! For each LoRA tensor θ_i (every A and B of every adapted projection) and a random unit direction
//! u over that tensor: `(L(θ + h·u) − L(θ − h·u)) / 2h` must match `∇_i L · u`. The loss is
//! computed in f32, so the difference quotient carries a round-off error of about
//! `ε_f32 · |L| / h ≈ 6e-8 · 4 / 1e-2 ≈ 2.4e-5`, and a truncation error `O(h²)`; with directional
//! derivatives of order 1e-2..1 that allows a relative tolerance of 2e-2 (and an absolute floor of
//! 1e-4 for directions along which the loss barely moves).
//!
//! With the projection matrices in NF4 (QLoRA) the same holds: the base weights are other (the
//! dequantized values) but fixed, and the LoRA gradients flow through the dequantized matrices.
//!
//! The batch has 14 token rows, so the MLP runs as one chunk unless a test asks for smaller ones.

mod common;

use common::rel_err;
use finetune::backend::cpu::CpuBackend;
use finetune::backend::IGNORE_LABEL;
use finetune::lora::LoraConfig;
use finetune::model::config::Family;
use finetune::model::decoder::Decoder;
use finetune::model::presets::tiny;
use finetune::model::weights::{random_weights, DecoderWeights, Slot, TensorValues};
use finetune::quant::Quantization;
use finetune::rng::Rng;
use finetune::train::batch::Batch;
use finetune::train::trainer::{TrainConfig, Trainer};
use std::sync::Arc;

/// What a test varies.
#[derive(Debug, Clone, Copy)]
struct Setup {
    checkpointing: bool,
    quantization: Quantization,
    dropout: f32,
    mlp_chunk_rows: usize,
}

const LORA: Setup = Setup {
    checkpointing: true,
    quantization: Quantization::None,
    dropout: 0.0,
    mlp_chunk_rows: usize::MAX, // one chunk
};

fn trainer(family: Family, setup: Setup) -> Trainer<CpuBackend> {
    let Setup {
        checkpointing,
        quantization,
        dropout,
        mlp_chunk_rows,
    } = setup;
    let cfg = tiny(family);
    let be = CpuBackend::new(2).unwrap();
    // Larger weights than an initialised model so that logits and gradients are far from uniform.
    let mut init = random_weights(&cfg, 7);
    let mut rng = Rng::new(99);
    let weights = DecoderWeights::load_with(&cfg, &be, quantization, |spec| {
        let mut values = init(spec);
        let std = match spec.slot {
            Slot::Proj(..) => 0.3,
            Slot::Embedding => 1.0,
            _ => return Ok(TensorValues::F32(values)),
        };
        values.iter_mut().for_each(|x| *x = std * rng.normal());
        Ok(TensorValues::F32(values))
    })
    .unwrap();
    let mut dec = Decoder::new(cfg, be, weights);
    dec.set_mlp_chunk_rows(mlp_chunk_rows);
    let dec = Arc::new(dec);
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        seed: 3,
        dropout,
        ..LoraConfig::default()
    };
    let mut t = Trainer::new(
        dec,
        lora,
        TrainConfig {
            checkpointing,
            ..TrainConfig::default()
        },
    )
    .unwrap();
    // PEFT starts B at zero; give it values so that the gradients of A are not zero too.
    for pair in t.params_mut().pairs.iter_mut().flatten() {
        pair.b.data.iter_mut().for_each(|x| *x = 0.2 * rng.normal());
    }
    t
}

fn batch() -> Batch {
    let mut rng = Rng::new(5);
    let ids: Vec<i32> = (0..2 * 7).map(|_| (rng.next_u64() % 64) as i32).collect();
    let mut labels: Vec<i32> = (0..2 * 7).map(|_| (rng.next_u64() % 64) as i32).collect();
    labels[3] = IGNORE_LABEL;
    let mut b = Batch::new(2, 7, ids, labels).unwrap();
    // The second row packs two examples: positions restart and attention must not cross.
    for (i, t) in (7..14).enumerate() {
        b.positions[t] = if i < 3 { i as i32 } else { i as i32 - 3 };
        b.segments[t] = if i < 3 { 1 } else { 2 };
    }
    b
}

/// With `dropout`, the function differentiated is the training loss under the masks of the first
/// step (the dropout seed comes from the step count, so every evaluation draws the same masks);
/// without, it is the evaluation loss, which must then equal the training loss.
fn check_family(family: Family, setup: Setup) {
    let mut t = trainer(family, setup);
    let dropout = setup.dropout;
    let b = batch();
    let (loss, _, _) = t.compute_gradients(std::slice::from_ref(&b)).unwrap();
    let eval = t.eval_loss(&b).unwrap();
    if dropout == 0.0 {
        assert!(
            (loss - eval).abs() <= 1e-5 * loss.abs(),
            "train loss {loss} vs eval loss {eval}"
        );
    } else {
        assert!((loss - eval).abs() > 1e-4, "dropout changed nothing");
    }
    let grads: Vec<Vec<f32>> = t.grads().tensors().map(|g| g.data.to_vec()).collect();
    let h = 1e-2f32;
    let mut rng = Rng::new(11);
    let mut worst = 0.0f32;
    for (i, g) in grads.iter().enumerate() {
        let mut u: Vec<f32> = (0..g.len()).map(|_| rng.normal()).collect();
        let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
        u.iter_mut().for_each(|x| *x /= norm);
        let analytic: f32 = g.iter().zip(&u).map(|(a, b)| a * b).sum();
        let mut loss_at = |sign: f32| {
            let p = t.params_mut().tensors_mut().nth(i).unwrap();
            p.data
                .iter_mut()
                .zip(&u)
                .for_each(|(x, d)| *x += sign * h * d);
            let l = if dropout == 0.0 {
                t.eval_loss(&b).unwrap()
            } else {
                t.compute_gradients(std::slice::from_ref(&b)).unwrap().0
            };
            let p = t.params_mut().tensors_mut().nth(i).unwrap();
            p.data
                .iter_mut()
                .zip(&u)
                .for_each(|(x, d)| *x -= sign * h * d);
            l
        };
        let numeric = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * h);
        let err = (numeric - analytic).abs();
        let tolerance = 2e-2 * analytic.abs().max(numeric.abs()) + 1e-4;
        assert!(
            numeric.is_finite() && err <= tolerance,
            "{family:?} tensor {i}: analytic {analytic}, finite difference {numeric}"
        );
        worst = worst.max(err / tolerance);
    }
    eprintln!(
        "{family:?} ({setup:?}): {} tensors, largest error/tolerance {worst:.2}",
        grads.len()
    );
}

#[test]
fn llama_lora_gradients_match_finite_differences() {
    check_family(Family::Llama, LORA);
}

const QLORA: Setup = Setup {
    quantization: Quantization::Nf4,
    ..LORA
};

#[test]
fn llama_qlora_gradients_match_finite_differences() {
    check_family(Family::Llama, QLORA);
}

#[test]
fn qwen2_qlora_gradients_match_finite_differences() {
    check_family(
        Family::Qwen2,
        Setup {
            checkpointing: false,
            ..QLORA
        },
    );
}

/// The gradients of the LoRA tensors (all of them, in order) after one batch.
fn gradients(setup: Setup) -> Vec<Vec<f32>> {
    let mut t = trainer(Family::Llama, setup);
    t.compute_gradients(&[batch()]).unwrap();
    t.grads().tensors().map(|g| g.data.to_vec()).collect()
}

#[test]
fn llama_without_checkpointing_gives_the_same_gradients() {
    let setup = Setup {
        checkpointing: false,
        ..LORA
    };
    check_family(Family::Llama, setup);
    assert_eq!(gradients(LORA), gradients(setup));
}

/// 14 rows in chunks of 5: three chunks, the last one short.
const CHUNKED: Setup = Setup {
    mlp_chunk_rows: 5,
    ..LORA
};

#[test]
fn mlp_chunks_give_the_gradients_of_one_chunk() {
    // Only the order of the sums over rows in dA and dB differs.
    for (i, (chunked, whole)) in gradients(CHUNKED).iter().zip(gradients(LORA)).enumerate() {
        let err = rel_err(chunked, &whole);
        assert!(err < 1e-5, "tensor {i}: relative error {err}");
    }
}

#[test]
fn kept_mlp_chunks_give_the_gradients_of_recomputed_ones() {
    // Without checkpointing the forward keeps each chunk's gate and up products (and their
    // adapter inputs, dropout applied) for the backward; with it the backward recomputes them.
    let recomputed = Setup {
        dropout: 0.1,
        ..CHUNKED
    };
    let kept = Setup {
        checkpointing: false,
        ..recomputed
    };
    assert_eq!(gradients(recomputed), gradients(kept));
}

#[test]
fn llama_lora_gradients_with_mlp_chunks_and_dropout_match_finite_differences() {
    check_family(
        Family::Llama,
        Setup {
            dropout: 0.1,
            ..CHUNKED
        },
    );
}

#[test]
fn qwen2_lora_gradients_match_finite_differences() {
    check_family(Family::Qwen2, LORA);
}

#[test]
fn qwen3_lora_gradients_match_finite_differences() {
    check_family(Family::Qwen3, LORA);
}

#[test]
fn gemma_lora_gradients_match_finite_differences() {
    check_family(Family::Gemma, LORA);
}

#[test]
fn llama_lora_gradients_with_dropout_match_finite_differences() {
    check_family(
        Family::Llama,
        Setup {
            dropout: 0.1,
            ..LORA
        },
    );
}
