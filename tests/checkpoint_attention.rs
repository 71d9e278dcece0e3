//! A checkpointed pass that keeps each layer's attention output (`Saving::offload_attention`)
//! must give the gradients of one that recomputes it: the recomputation reads the kept output
//! and log-sum-exp of the right layer instead of running the attention forward again. The same
//! with the attention's inputs and x1 kept too (`Saving::offload_attention_inputs`: no product
//! before the MLP, no rotation in the recomputation), and for the adapters' inputs
//! (`Saving::keep_adapter_inputs`) and the MLP's gate and up products (`Saving::kept_mlp_layers`):
//! kept or recomputed, bit for bit.
//!
//! On the CPU the stash keeps tensors where they are, so the path runs here as it does on a GPU
//! (where the outputs go to host memory and come back), without the copies.

use finetune::backend::cpu::CpuBackend;
use finetune::backend::Backend;
use finetune::lora::LoraConfig;
use finetune::model::adapters::{LoraPair, LoraTensors};
use finetune::model::config::Family;
use finetune::model::decoder::{Adapters, Decoder, LossOutput, Saving};
use finetune::model::presets::tiny;
use finetune::model::weights::{random_weights, DecoderWeights, TensorValues};
use finetune::quant::Quantization;
use finetune::rng::Rng;
use finetune::train::batch::Batch;

#[test]
fn kept_attention_outputs_give_the_recomputed_gradients() {
    let cfg = tiny(Family::Llama);
    let be = CpuBackend::new(2).unwrap();
    let mut init = random_weights(&cfg, 7);
    let weights = DecoderWeights::load_with(&cfg, &be, Quantization::None, |spec| {
        Ok(TensorValues::F32(init(spec)))
    })
    .unwrap();
    let mut dec = Decoder::new(cfg.clone(), be, weights);
    // Three MLP chunks of the 48 rows: each keeps (or not) its own adapter inputs.
    dec.set_mlp_chunk_rows(16);
    let be = &dec.backend;
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    // Non-zero B as well as A, so that every adapter's gradient depends on the attention.
    let mut rng = Rng::new(5);
    let mut random = |rows: usize, cols: usize| {
        let v: Vec<f32> = (0..rows * cols).map(|_| 0.1 * rng.normal()).collect();
        be.upload(&v, rows, cols)
    };
    let params = LoraTensors::build(&cfg, &lora, |_, _, (r, i), (o, _)| {
        Ok(LoraPair {
            a: random(r, i)?,
            b: random(o, r)?,
        })
    })
    .unwrap();
    // Two rows of 24 tokens, the second packing two examples.
    let (rows, seq) = (2, 24);
    let ids: Vec<i32> = (0..rows * seq + 1)
        .map(|i| ((i * 7 + 3) % cfg.vocab_size) as i32)
        .collect();
    let mut batch = Batch::new(rows, seq, ids[..rows * seq].to_vec(), ids[1..].to_vec()).unwrap();
    for t in seq + 10..2 * seq {
        batch.segments[t] = 1;
        batch.positions[t] = (t - seq - 10) as i32;
    }
    let batch = batch.upload(be, cfg.vocab_size).unwrap();
    let ad = Adapters::new(&params, &lora, None);

    let gradients = |offload_attention: bool,
                     offload_attention_inputs: bool,
                     keep_adapter_inputs: bool,
                     kept_mlp_layers: usize|
     -> (f32, Vec<Vec<f32>>) {
        let mut grads = params.zeros_like(be).unwrap();
        let scale = be.upload(&[1.0 / batch.labelled as f32], 1, 1).unwrap();
        let mut row_loss = be.zeros(rows * seq, 1).unwrap();
        let mut loss = LossOutput {
            scale: &scale,
            row_loss: &mut row_loss,
        };
        let saving = Saving {
            recompute: true,
            offload_inputs: true,
            offload_attention,
            offload_attention_inputs,
            keep_adapter_inputs,
            kept_mlp_layers,
        };
        dec.forward_backward(&batch, &ad, &mut grads, &mut loss, saving, &mut |_, _| {
            Ok(())
        })
        .unwrap();
        let loss: f32 = be.download(&row_loss).unwrap().iter().sum();
        let grads = grads.tensors().map(|g| be.download(g).unwrap()).collect();
        (loss, grads)
    };
    let (recomputed_loss, recomputed) = gradients(false, false, true, 0);
    assert!(recomputed_loss.is_finite() && recomputed_loss > 0.0);
    for (what, (loss, grads)) in [
        (
            "the kept attention outputs",
            gradients(true, false, true, 0),
        ),
        (
            "the kept attention inputs and outputs",
            gradients(true, true, true, 0),
        ),
        (
            "the adapters' inputs recomputed",
            gradients(false, false, false, 0),
        ),
        (
            "the attention outputs kept, the adapters' inputs recomputed",
            gradients(true, false, false, 0),
        ),
        // q, k and v are then recomputed for their adapter inputs.
        (
            "the attention inputs asked for, the adapters' inputs recomputed",
            gradients(true, true, false, 0),
        ),
        // The last layer's MLP products kept (with the attention's tensors, and alone), then
        // every layer's (more layers asked for than there are).
        (
            "the last layer's MLP products kept",
            gradients(true, true, true, 1),
        ),
        (
            "the last layer's MLP products kept, the adapters' inputs recomputed",
            gradients(false, false, false, 1),
        ),
        (
            "every layer's MLP products kept",
            gradients(true, true, true, 5),
        ),
    ] {
        assert_eq!(loss, recomputed_loss, "{what}");
        assert_eq!(grads.len(), recomputed.len());
        for (i, (k, r)) in grads.iter().zip(&recomputed).enumerate() {
            assert!(
                r.iter().any(|&x| x != 0.0),
                "gradient tensor {i} is all zero"
            );
            assert_eq!(k, r, "gradient tensor {i} differs with {what}");
        }
    }
}
