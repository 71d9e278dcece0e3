//! Training behaviour through the Rust API on tiny random models: the loss falls, runs repeat
//! exactly, adapters round-trip through PEFT's format, merged exports reproduce the logits.

mod common;

use finetune::api::{Model, ModelParams, Trainer};
use finetune::backend::IGNORE_LABEL;
use finetune::io::safetensors::Dtype;
use finetune::lora::LoraConfig;
use finetune::model::config::Family;
use finetune::model::presets::tiny;
use finetune::rng::Rng;
use finetune::train::batch::Batch;
use finetune::train::schedule::ScheduleKind;
use finetune::train::trainer::TrainConfig;
use finetune::Error;

fn params() -> ModelParams {
    ModelParams {
        threads: 2,
        ..Default::default()
    }
}

fn model(family: Family) -> Model {
    Model::random(tiny(family), 3, &params()).unwrap()
}

fn batch(seed: u64, batch: usize, seq: usize) -> Batch {
    let mut rng = Rng::new(seed);
    let ids: Vec<i32> = (0..batch * seq + 1)
        .map(|_| (rng.next_u64() % 64) as i32)
        .collect();
    Batch::new(batch, seq, ids[..batch * seq].to_vec(), ids[1..].to_vec()).unwrap()
}

fn train_config() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-2,
        total_steps: 20,
        schedule: ScheduleKind::Constant,
        ..TrainConfig::default()
    }
}

fn losses(m: &Model, lora: LoraConfig, steps: usize) -> Vec<f32> {
    let mut t = Trainer::new(m, lora, train_config()).unwrap();
    let b = batch(1, 2, 12);
    (0..steps)
        .map(|_| t.step(std::slice::from_ref(&b)).unwrap().loss)
        .collect()
}

#[test]
fn loss_falls_over_twenty_steps_for_every_family() {
    for family in [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma,
    ] {
        let l = losses(&model(family), LoraConfig::default(), 20);
        assert!(l.iter().all(|x| x.is_finite()), "{family:?}: {l:?}");
        assert!(l[19] < 0.8 * l[0], "{family:?}: loss {} -> {}", l[0], l[19]);
    }
}

#[test]
fn one_seed_gives_identical_losses() {
    let m = model(Family::Llama);
    let lora = LoraConfig {
        dropout: 0.1,
        seed: 9,
        ..LoraConfig::default()
    };
    assert_eq!(losses(&m, lora.clone(), 5), losses(&m, lora.clone(), 5));
    let other = LoraConfig { seed: 10, ..lora };
    assert_ne!(
        losses(&m, other, 5)[1..],
        losses(
            &m,
            LoraConfig {
                seed: 9,
                dropout: 0.1,
                ..LoraConfig::default()
            },
            5
        )[1..]
    );
}

#[test]
fn gradient_accumulation_equals_the_whole_batch() {
    let m = model(Family::Llama);
    let whole = batch(4, 4, 8);
    let half = |r: std::ops::Range<usize>| {
        Batch::new(
            2,
            8,
            whole.input_ids[r.start * 8..r.end * 8].to_vec(),
            whole.labels[r.start * 8..r.end * 8].to_vec(),
        )
        .unwrap()
    };
    let mut a = Trainer::new(&m, LoraConfig::default(), train_config()).unwrap();
    let mut b = Trainer::new(&m, LoraConfig::default(), train_config()).unwrap();
    for _ in 0..3 {
        let sa = a.step(std::slice::from_ref(&whole)).unwrap();
        let sb = b.step(&[half(0..2), half(2..4)]).unwrap();
        assert!(
            (sa.loss - sb.loss).abs() <= 1e-5 * sa.loss,
            "{} vs {}",
            sa.loss,
            sb.loss
        );
    }
}

#[test]
fn adapter_round_trips_through_peft_files() {
    let m = model(Family::Qwen2);
    let mut t = Trainer::new(
        &m,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            use_rslora: true,
            ..LoraConfig::default()
        },
        train_config(),
    )
    .unwrap();
    let b = batch(2, 2, 10);
    for _ in 0..3 {
        t.step(std::slice::from_ref(&b)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    t.save_adapter(dir.path()).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["use_rslora"], true);
    let back = Trainer::from_adapter(&m, dir.path(), train_config()).unwrap();
    assert_eq!(back.lora_config().rank, 4);
    assert_eq!(
        m.logits(&b, Some(&t)).unwrap(),
        m.logits(&b, Some(&back)).unwrap()
    );
    assert_ne!(
        m.logits(&b, None).unwrap(),
        m.logits(&b, Some(&back)).unwrap()
    );
}

#[test]
fn merged_export_reloads_with_the_same_logits() {
    let m = model(Family::Gemma);
    let mut t = Trainer::new(&m, LoraConfig::default(), train_config()).unwrap();
    let b = batch(3, 1, 9);
    for _ in 0..3 {
        t.step(std::slice::from_ref(&b)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    t.export_merged(dir.path(), Dtype::F32).unwrap();
    let merged = Model::load(dir.path(), &params()).unwrap();
    let (want, got) = (
        m.logits(&b, Some(&t)).unwrap(),
        merged.logits(&b, None).unwrap(),
    );
    let max_err = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = want.iter().map(|a| a.abs()).fold(0.0f32, f32::max);
    // Merging reorders f32 sums: W·x + s·B·(A·x) versus (W + s·B·A)·x.
    assert!(
        max_err <= 1e-4 * scale,
        "max |Δlogit| {max_err} for logits up to {scale}"
    );
}

#[test]
fn adapter_for_another_model_is_refused() {
    let small = model(Family::Llama);
    let t = Trainer::new(&small, LoraConfig::default(), train_config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    t.save_adapter(dir.path()).unwrap();
    let wider = Model::random(
        finetune::model::config::ModelConfig {
            hidden_size: 48,
            ..tiny(Family::Llama)
        },
        1,
        &params(),
    )
    .unwrap();
    let err = Trainer::from_adapter(&wider, dir.path(), train_config())
        .err()
        .expect("must not fit");
    assert!(matches!(err, Error::AdapterMismatch(_)), "{err}");
    assert!(err.to_string().contains("q_proj"), "{err}");
}

#[test]
fn token_ids_outside_the_vocabulary_are_errors() {
    let m = model(Family::Llama);
    let mut t = Trainer::new(&m, LoraConfig::default(), train_config()).unwrap();
    let mut b = batch(1, 1, 6);
    b.input_ids[4] = 64;
    let e = t.step(std::slice::from_ref(&b)).unwrap_err().to_string();
    assert!(e.contains("token id 64 at position 4"), "{e}");
    let mut b = batch(1, 1, 6);
    b.labels[2] = -7;
    let e = t.step(std::slice::from_ref(&b)).unwrap_err().to_string();
    assert!(e.contains("label -7 at position 2"), "{e}");
    let mut b = batch(1, 1, 6);
    b.labels = vec![IGNORE_LABEL; 6];
    assert!(t.step(std::slice::from_ref(&b)).is_err());
    // The trainer is still usable after the errors.
    t.step(&[batch(1, 1, 6)]).unwrap();
}

#[test]
fn saved_model_directory_loads_back_identically() {
    let dir = common::tiny_model_dir();
    let a = Model::load(dir.path(), &params()).unwrap();
    let b = Model::load(dir.path(), &params()).unwrap();
    let x = batch(5, 1, 5);
    assert_eq!(a.logits(&x, None).unwrap(), b.logits(&x, None).unwrap());
    let e = Model::load(&dir.path().join("nope"), &params())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

/// With activation offload asked for, the CPU keeps the saved inputs where they are; the
/// decoder's order of stashing, fetching and settling must still hand each layer its own
/// input: the losses equal those without offload, with and without checkpointing.
#[test]
fn offloading_activations_changes_no_loss() {
    let m = model(Family::Qwen3);
    let b = batch(4, 2, 12);
    for checkpointing in [true, false] {
        let run = |offload_activations: bool| {
            let cfg = TrainConfig {
                checkpointing,
                offload_activations,
                ..train_config()
            };
            let lora = LoraConfig {
                dropout: 0.1,
                ..LoraConfig::default()
            };
            let mut t = Trainer::new(&m, lora, cfg).unwrap();
            (0..3)
                .map(|_| t.step(std::slice::from_ref(&b)).unwrap().loss)
                .collect::<Vec<f32>>()
        };
        assert_eq!(run(true), run(false), "checkpointing {checkpointing}");
    }
}

/// A NaN in an adapter matrix is reported and never applied; once mended, training goes on.
#[test]
fn non_finite_step_is_refused_and_training_goes_on() {
    common::gpu::non_finite_step_is_refused_and_training_goes_on(common::gpu::cpu());
}

/// The CPU backend records nothing, so no step is ever the one that records a pass (a bench
/// then needs no second warm-up step).
#[test]
fn no_cpu_step_records_a_pass() {
    let mut t = Trainer::new(&model(Family::Llama), LoraConfig::default(), train_config()).unwrap();
    let b = batch(1, 2, 8);
    for _ in 0..2 {
        t.step(std::slice::from_ref(&b)).unwrap();
        assert!(!t.records_next_step());
        assert!(!t.holds_recording());
    }
}
