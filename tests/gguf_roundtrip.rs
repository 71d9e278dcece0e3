//! GGUF export and import agree with each other on tiny random models of every family GGUF
//! supports: a model written as F32 and read back gives the same logits (which also checks that
//! the q/k row permutation of llama files is undone exactly), merged exports carry the adapter,
//! and GGUF LoRA adapters load back as the same adapter.

use finetune::api::{Model, ModelParams, Trainer};
use finetune::io::gguf::{GgmlType, GgufFile, MetaValue};
use finetune::lora::{LoraConfig, TargetModule};
use finetune::model::config::Family;
use finetune::model::presets::tiny;
use finetune::model::weights::Slot;
use finetune::rng::Rng;
use finetune::train::batch::Batch;
use finetune::train::trainer::TrainConfig;

fn params() -> ModelParams {
    ModelParams {
        threads: 2,
        ..Default::default()
    }
}

fn batch() -> Batch {
    let mut rng = Rng::new(5);
    let ids: Vec<i32> = (0..25).map(|_| (rng.next_u64() % 64) as i32).collect();
    Batch::new(2, 12, ids[..24].to_vec(), ids[1..].to_vec()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A trainer whose adapters are not zero (B starts at zero; a few steps move it).
fn trained(m: &Model) -> Trainer {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let train = TrainConfig {
        learning_rate: 1e-2,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(m, lora, train).unwrap();
    for _ in 0..3 {
        t.step(&[batch()]).unwrap();
    }
    t
}

#[test]
fn f32_model_round_trips_exactly_for_each_family() {
    for family in [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3] {
        let m = Model::random(tiny(family), 7, &params()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        m.save_gguf(&path, GgmlType::F32, None).unwrap();
        let back = Model::load(&path, &params()).unwrap();
        let mut want = m.config().clone();
        // llama.cpp has no separate mistral architecture: it reads back as llama.
        if family == Family::Mistral {
            want.family = Family::Llama;
        }
        assert_eq!(back.config(), &want, "{family:?}");
        let b = batch();
        assert_eq!(
            m.logits(&b, None).unwrap(),
            back.logits(&b, None).unwrap(),
            "{family:?}"
        );
    }
}

#[test]
fn llama_q_and_k_rows_are_stored_permuted() {
    let m = Model::random(tiny(Family::Llama), 7, &params()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    m.save_gguf(&path, GgmlType::F32, None).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let stored = f.read_f32("blk.0.attn_q.weight").unwrap();
    let (d, cols) = (8, 32);
    let hf = m.weight(Slot::Proj(0, TargetModule::Q)).unwrap();
    // GGUF row 1 of head 0 is Hugging Face row d/2.
    assert_eq!(stored[cols..2 * cols], hf[d / 2 * cols..(d / 2 + 1) * cols]);
    assert_ne!(stored[cols..2 * cols], hf[cols..2 * cols]);
}

#[test]
fn quantized_exports_stay_close() {
    let m = Model::random(tiny(Family::Llama), 7, &params()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let want = m.logits(&batch(), None).unwrap();
    for (ty, tolerance) in [
        (GgmlType::F16, 0.02),
        (GgmlType::BF16, 0.2),
        (GgmlType::Q8_0, 0.2),
    ] {
        let path = dir.path().join(format!("{ty}.gguf"));
        m.save_gguf(&path, ty, None).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(
            f.metadata().get("general.file_type"),
            Some(&MetaValue::U32(ty.file_type()))
        );
        assert_eq!(
            f.header().tensor("output_norm.weight").unwrap().ggml_type,
            GgmlType::F32
        );
        let got = Model::load(&path, &params())
            .unwrap()
            .logits(&batch(), None)
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < tolerance, "{ty}: {diff}");
    }
    // Rows of 48 values do not fill Q8_0 blocks: those tensors fall back to F16.
    let f = GgufFile::open(&dir.path().join("Q8_0.gguf")).unwrap();
    assert_eq!(
        f.header().tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        f.header()
            .tensor("blk.0.ffn_down.weight")
            .unwrap()
            .ggml_type,
        GgmlType::F16
    );
}

#[test]
fn merged_export_and_lora_adapter_reproduce_the_trainer() {
    for family in [Family::Llama, Family::Qwen2] {
        let m = Model::random(tiny(family), 9, &params()).unwrap();
        let t = trained(&m);
        let b = batch();
        let want = m.logits(&b, Some(&t)).unwrap();
        assert!(max_abs_diff(&want, &m.logits(&b, None).unwrap()) > 1e-3);
        let dir = tempfile::tempdir().unwrap();

        let merged = dir.path().join("merged.gguf");
        t.export_gguf(&merged, GgmlType::F32).unwrap();
        let got = Model::load(&merged, &params())
            .unwrap()
            .logits(&b, None)
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4, "{family:?}");

        let adapter = dir.path().join("adapter.gguf");
        t.save_adapter_gguf(&adapter).unwrap();
        let f = GgufFile::open(&adapter).unwrap();
        let text = |k: &str| {
            f.metadata()
                .get(k)
                .and_then(MetaValue::as_str)
                .map(String::from)
        };
        assert_eq!(text("general.type").as_deref(), Some("adapter"));
        assert_eq!(text("adapter.type").as_deref(), Some("lora"));
        assert_eq!(
            f.metadata().get("adapter.lora.alpha"),
            Some(&MetaValue::F32(8.0))
        );
        // llama.cpp's shape rules: lora_a ne = [in, r], lora_b ne = [r, out].
        assert_eq!(
            f.header()
                .tensor("blk.1.attn_k.weight.lora_a")
                .unwrap()
                .dims,
            [32, 4]
        );
        assert_eq!(
            f.header()
                .tensor("blk.1.attn_k.weight.lora_b")
                .unwrap()
                .dims,
            [4, 16]
        );
        let back = Trainer::from_adapter(&m, &adapter, TrainConfig::default()).unwrap();
        assert_eq!(back.lora_config().rank, 4);
        assert!((back.lora_config().scale() - t.lora_config().scale()).abs() < 1e-6);
        assert!(max_abs_diff(&m.logits(&b, Some(&back)).unwrap(), &want) < 1e-5);
    }
}

#[test]
fn rslora_scale_survives_as_alpha() {
    let m = Model::random(tiny(Family::Llama), 9, &params()).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        use_rslora: true,
        ..LoraConfig::default()
    };
    let t = Trainer::new(&m, lora, TrainConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    t.save_adapter_gguf(&path).unwrap();
    let back = Trainer::from_adapter(&m, &path, TrainConfig::default()).unwrap();
    // alpha/sqrt(r) = 4 = alpha'/r with alpha' = 16.
    assert!((back.lora_config().scale() - 4.0).abs() < 1e-6);
}

#[test]
fn gemma_export_is_refused_with_a_reason() {
    let m = Model::random(tiny(Family::Gemma), 1, &params()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = m
        .save_gguf(&dir.path().join("g.gguf"), GgmlType::F16, None)
        .unwrap_err();
    assert!(e.to_string().contains("gemma"), "{e}");
}
