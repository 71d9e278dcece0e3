//! QLoRA on the CPU backend: products with an NF4 matrix, a model whose projection matrices are
//! quantized at load, and bitsandbytes-4bit model directories read without an f32 copy of their
//! matrices. (LoRA gradients with NF4 base weights against finite differences: tests/gradients.rs.)
//!
//! Tolerances. A product with an NF4 matrix multiplies exactly the dequantized values (the same
//! function computes them for download), a block of rows at a time; only the order in which f32
//! products are summed can differ from the product with the whole dequantized matrix, so the two
//! agree within ‖Δ‖/‖ref‖ < 1e-5 (f32 rounding over sums of a few thousand terms is ~1e-6).
//! Logits of a model read from a 4-bit checkpoint against the same model built from the
//! dequantized f32 values: the same arithmetic in the same order except inside the products, 1e-5.

mod common;

use common::bnb::{f32_entry, nf4_entries, write_raw, RawTensors};
use common::{fresh_rng, randn, rel_err};
use finetune::api::{Device, Model, ModelParams, Trainer};
use finetune::backend::cpu::{CpuBackend, CpuTensor};
use finetune::backend::Backend;
use finetune::error::Error;
use finetune::io::model_dir::WeightSource;
use finetune::lora::{LoraConfig, TargetModule};
use finetune::model::config::ModelConfig;
use finetune::model::presets::preset;
use finetune::model::weights::{random_weights, tensor_specs, Slot, TensorValues};
use finetune::quant::{Nf4Tensor, Quantization};
use finetune::rng::Rng;
use finetune::train::batch::Batch;
use finetune::train::trainer::TrainConfig;
use std::path::Path;

fn cpu_params(quantization: Quantization) -> ModelParams {
    ModelParams {
        device: Device::Cpu,
        threads: 2,
        quantization,
        ..ModelParams::default()
    }
}

/// `c = 0.7·op(a)·op(b) + c` on both tensors pairs: `(a, b)` with the NF4 matrix and `(a', b')`
/// with its dequantized values in f32 (the same matrix in the same place).
#[allow(clippy::too_many_arguments)]
fn product_pair(
    be: &CpuBackend,
    rng: &mut Rng,
    w: (&CpuTensor, &CpuTensor),
    w_is_a: bool,
    trans_w: bool,
    trans_other: bool,
    m: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (rows, cols) = be.shape(w.0);
    let (wr, wc) = if trans_w { (cols, rows) } else { (rows, cols) };
    // op(a)·op(b): W is [wr, wc] after its op; the other operand supplies the free dimension m.
    let (other_op, out) = if w_is_a {
        ((wc, m), (wr, m))
    } else {
        ((m, wr), (m, wc))
    };
    let other_stored = if trans_other {
        (other_op.1, other_op.0)
    } else {
        other_op
    };
    let ov = randn(rng, other_stored.0 * other_stored.1, 1.0);
    let other = be.upload(&ov, other_stored.0, other_stored.1).unwrap();
    let c0 = randn(rng, out.0 * out.1, 1.0);
    let mut results = Vec::new();
    for wt in [w.0, w.1] {
        let mut c = be.upload(&c0, out.0, out.1).unwrap();
        let (a, ta, b, tb) = if w_is_a {
            (wt, trans_w, &other, trans_other)
        } else {
            (&other, trans_other, wt, trans_w)
        };
        be.matmul(a, ta, b, tb, 0.7, &mut c, true).unwrap();
        results.push(be.download(&c).unwrap());
    }
    let dense = results.pop().unwrap();
    (results.pop().unwrap(), dense)
}

#[test]
fn nf4_products_equal_products_with_the_dequantized_matrix() {
    let be = CpuBackend::new(2).unwrap();
    let mut rng = fresh_rng("nf4 products");
    // 2500×1000 is dequantized in three blocks of rows (the last one short); 37×91 in one, with
    // an odd number of values.
    for (rows, cols) in [(2500, 1000), (37, 91)] {
        let values = randn(&mut rng, rows * cols, 0.05);
        for plain in [false, true] {
            let q = if plain {
                Nf4Tensor::quantize_plain(&values, rows, cols).unwrap()
            } else {
                Nf4Tensor::quantize(&values, rows, cols).unwrap()
            };
            let dequantized = q.dequantize();
            let wq = be.upload_nf4(q).unwrap();
            assert_eq!(
                be.download(&wq).unwrap(),
                dequantized,
                "download dequantizes"
            );
            let wd = be.upload(&dequantized, rows, cols).unwrap();
            for w_is_a in [false, true] {
                for trans_w in [false, true] {
                    let trans_other = rng.next_u64() % 2 == 0;
                    let m = 1 + (rng.next_u64() % 20) as usize;
                    let (nf4, dense) =
                        product_pair(&be, &mut rng, (&wq, &wd), w_is_a, trans_w, trans_other, m);
                    let e = rel_err(&nf4, &dense);
                    eprintln!(
                        "{rows}x{cols} (plain absmax {plain}) as {} trans {trans_w}, other trans \
                         {trans_other}, m {m}: relative error {e:.1e}",
                        if w_is_a { "a" } else { "b" }
                    );
                    assert!(e < 1e-5, "relative error {e}");
                }
            }
        }
    }
    // The one-step quantizing upload keeps the same matrix as quantizing first.
    let values = randn(&mut rng, 64 * 80, 1.0);
    let direct = be.upload_frozen_nf4(&values, 64, 80).unwrap();
    let q = Nf4Tensor::quantize(&values, 64, 80).unwrap();
    assert_eq!(direct.nf4.as_deref(), Some(&q));
}

#[test]
fn nf4_tensors_are_refused_where_only_f32_makes_sense() {
    let be = CpuBackend::new(1).unwrap();
    let w = be.upload_frozen_nf4(&[0.5; 64], 8, 8).unwrap();
    let mut x = be.zeros(8, 8).unwrap();
    let message = be.add_assign(&mut x, &w).unwrap_err().to_string();
    assert!(message.contains("NF4"), "{message}");
    let mut out = be.zeros(8, 8).unwrap();
    let message = be
        .matmul(&w, false, &w, true, 1.0, &mut out, false)
        .unwrap_err()
        .to_string();
    assert!(message.contains("two NF4"), "{message}");
    let mut bad = vec![0.5f32; 64];
    bad[19] = f32::NAN;
    let message = be.upload_frozen_nf4(&bad, 8, 8).unwrap_err().to_string();
    assert!(message.contains("row 2, column 3"), "{message}");
}

fn tiny_batch() -> Batch {
    let ids: Vec<i32> = (0..25).map(|i| (i * 7 + 3) % 64).collect();
    Batch::new(2, 12, ids[..24].to_vec(), ids[1..].to_vec()).unwrap()
}

#[test]
fn qlora_model_is_quantized_at_load_and_trains() {
    let cfg = preset("tiny").unwrap();
    let model = Model::random(cfg.clone(), 5, &cpu_params(Quantization::Nf4)).unwrap();
    // The projection matrices hold exactly the NF4 round trip of the random values; the rest is
    // as drawn.
    let mut source = random_weights(&cfg, 5);
    for spec in tensor_specs(&cfg) {
        let values = source(&spec);
        let held = model.weight(spec.slot).unwrap();
        let expected = match spec.slot {
            Slot::Proj(..) => Nf4Tensor::quantize(&values, spec.rows, spec.cols)
                .unwrap()
                .dequantize(),
            _ => values,
        };
        assert!(held == expected, "{}", spec.name);
    }
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        ..LoraConfig::default()
    };
    let train = TrainConfig {
        learning_rate: 1e-2,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&model, lora, train).unwrap();
    let batch = tiny_batch();
    let before = trainer.eval_loss(&batch).unwrap();
    let mut losses = Vec::new();
    for _ in 0..10 {
        losses.push(trainer.step(std::slice::from_ref(&batch)).unwrap().loss);
    }
    let after = trainer.eval_loss(&batch).unwrap();
    eprintln!("QLoRA losses: {before} → {losses:?} → {after}");
    assert!(after < 0.9 * before, "loss {before} -> {after}");
}

/// Writes `tensors` into `dir` as two shards with an index, splitting the companions of some
/// 4-bit weights across the shards (a reader must look each tensor up on its own).
fn write_sharded(dir: &Path, tensors: RawTensors) {
    let mut shards = [RawTensors::new(), RawTensors::new()];
    let mut weight_map = serde_json::Map::new();
    for (name, entry) in tensors {
        let shard = name.len() % 2;
        weight_map.insert(
            name.clone(),
            format!("model-0000{}-of-00002.safetensors", shard + 1).into(),
        );
        shards[shard].insert(name, entry);
    }
    for (i, shard) in shards.iter().enumerate() {
        write_raw(
            &dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            shard,
        );
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A random tiny model saved as f32 safetensors: its config, its folder (removed on drop) and a
/// reader of its tensors.
fn saved_tiny_model() -> (ModelConfig, tempfile::TempDir, WeightSource) {
    let cfg = preset("tiny").unwrap();
    let dir = tempfile::tempdir().unwrap();
    Model::random(cfg.clone(), 9, &cpu_params(Quantization::None))
        .unwrap()
        .save_pretrained(dir.path(), finetune::io::safetensors::Dtype::F32, None)
        .unwrap();
    let source = WeightSource::open(dir.path()).unwrap();
    (cfg, dir, source)
}

#[test]
fn bnb_4bit_model_directory_gives_the_logits_of_its_dequantized_weights() {
    let (cfg, original, source) = saved_tiny_model();
    let (bnb, dequantized) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut bnb_tensors, mut deq_tensors) = (RawTensors::new(), RawTensors::new());
    let mut quantized = Vec::new();
    for spec in tensor_specs(&cfg) {
        let values = source.read_f32(&spec.name, &spec.file_shape()).unwrap();
        let values = match spec.slot {
            Slot::Proj(layer, m) => {
                // Double-quantized absmax in layer 0, plain f32 absmax (bnb_4bit_use_double_quant
                // off) in layer 1.
                let q = if layer == 0 {
                    Nf4Tensor::quantize(&values, spec.rows, spec.cols)
                } else {
                    Nf4Tensor::quantize_plain(&values, spec.rows, spec.cols)
                }
                .unwrap();
                bnb_tensors.extend(nf4_entries(&spec.name, &q, "bfloat16"));
                let d = q.dequantize();
                quantized.push((spec.slot, layer, m, q));
                d
            }
            _ => {
                bnb_tensors.insert(spec.name.clone(), f32_entry(spec.file_shape(), &values));
                values
            }
        };
        deq_tensors.insert(spec.name.clone(), f32_entry(spec.file_shape(), &values));
    }
    write_sharded(bnb.path(), bnb_tensors);
    write_raw(&dequantized.path().join("model.safetensors"), &deq_tensors);
    let config = std::fs::read_to_string(original.path().join("config.json")).unwrap();
    std::fs::write(dequantized.path().join("config.json"), &config).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["quantization_config"] = serde_json::json!({
        "quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16",
    });
    std::fs::write(bnb.path().join("config.json"), config.to_string()).unwrap();

    // The reader hands the projections over as NF4 (packed bytes only).
    let reader = WeightSource::open(bnb.path()).unwrap();
    for spec in tensor_specs(&cfg) {
        let read = reader.read_tensor(&spec).unwrap();
        match (&read, spec.slot) {
            (TensorValues::Nf4(q), Slot::Proj(..)) => {
                let (_, _, _, expected) = quantized.iter().find(|x| x.0 == spec.slot).unwrap();
                assert_eq!(q, expected, "{}", spec.name);
            }
            (TensorValues::F32(_), Slot::Proj(..)) => panic!("{} read as f32", spec.name),
            _ => {}
        }
    }

    let reference = Model::load(dequantized.path(), &cpu_params(Quantization::None)).unwrap();
    let batch = tiny_batch();
    let expected = reference.logits(&batch, None).unwrap();
    for quantization in [Quantization::Nf4, Quantization::None] {
        let model = Model::load(bnb.path(), &cpu_params(quantization)).unwrap();
        for (slot, _, _, q) in &quantized {
            assert_eq!(model.weight(*slot).unwrap(), q.dequantize(), "{slot:?}");
        }
        let e = rel_err(&model.logits(&batch, None).unwrap(), &expected);
        eprintln!(
            "bnb-4bit directory, quantization {quantization:?}: logits relative error {e:.1e}"
        );
        assert!(e < 1e-5, "relative error {e}");
    }

    // LoRA over the 4-bit checkpoint: only the down projections, one step.
    let model = Model::load(bnb.path(), &cpu_params(Quantization::Nf4)).unwrap();
    let lora = LoraConfig {
        targets: TargetModule::Down.bit(),
        ..LoraConfig::default()
    };
    let mut trainer = Trainer::new(&model, lora, TrainConfig::default()).unwrap();
    let loss = trainer.step(std::slice::from_ref(&batch)).unwrap().loss;
    assert!(loss.is_finite());
}

#[test]
fn a_4bit_weight_of_the_wrong_shape_is_an_error_naming_it() {
    let (cfg, original, source) = saved_tiny_model();
    let mut tensors = RawTensors::new();
    for spec in tensor_specs(&cfg) {
        let values = source.read_f32(&spec.name, &spec.file_shape()).unwrap();
        if spec.slot == Slot::Proj(1, TargetModule::Up) {
            // Transposed: [in, out] instead of [out, in].
            let q = Nf4Tensor::quantize(&values, spec.cols, spec.rows).unwrap();
            tensors.extend(nf4_entries(&spec.name, &q, "float32"));
        } else {
            tensors.insert(spec.name.clone(), f32_entry(spec.file_shape(), &values));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    write_raw(&dir.path().join("model.safetensors"), &tensors);
    std::fs::copy(
        original.path().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    for quantization in [Quantization::Nf4, Quantization::None] {
        let Err(err) = Model::load(dir.path(), &cpu_params(quantization)) else {
            panic!("a transposed 4-bit weight loaded");
        };
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("model.layers.1.mlp.up_proj.weight"),
            "{message}"
        );
    }
}
