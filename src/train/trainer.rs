//! The trainer: LoRA tensors, their gradients and AdamW state over a frozen decoder.

use super::batch::Batch;
use super::memory::host_memory_bytes;
use super::replay::{row_loss_sum, Replayer};
use super::schedule::{Schedule, ScheduleKind};
use crate::backend::collective::Collective;
use crate::backend::{AdamWSlot, AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::model::adapters::LoraTensors;
use crate::model::decoder::{Adapters, Decoder, Saving};
use crate::rng::derive;
use std::sync::Arc;

/// The most device memory a checkpointed step keeps the adapters' inputs in
/// ([`Saving::keep_adapter_inputs`]); past it the recomputation runs those rank-wide products
/// again. Keeping them gained 0-2 % of speed at 2,048 and 8,192 tokens (bench/NOTES.md) and
/// costs 14 KiB a token on Llama 3 8B at rank 16 in f32 (109 MiB at 8,192 tokens; the CUDA
/// backend stores them in bf16, half that, `Backend::adapter_product`, and the bound still
/// counts 4 bytes a value): kept up to about 18,700 tokens there; a long sequence, whose step
/// attention dominates, gets the memory back.
pub const KEPT_ADAPTER_INPUTS_MAX_BYTES: usize = 256 << 20;

/// Optimizer and schedule settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f32,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    /// Steps the schedule decays over.
    pub total_steps: u64,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub checkpointing: bool,
    /// Keep the saved layer inputs in pinned host memory instead of device memory, copied out
    /// and back beside the compute (GPU backends; the CPU keeps them where they are); with
    /// checkpointing, each layer's attention output, its inputs (q, k, v) and x1 too when all
    /// of them take at most a quarter of the host's memory (`Trainer::offloads_attention`; past that
    /// the outputs alone while they fit).
    pub offload_activations: bool,
    /// With checkpointing: the last this many decoder layers keep their MLP's gate and up
    /// products on the device instead of recomputing them in the backward pass (faster by
    /// about 1/5 of such a layer's step time; `2 × tokens × intermediate_size` bf16 values a layer
    /// on a GPU: 448 MiB at 8,192 tokens of Llama 3 8B). 0 keeps none.
    pub kept_mlp_layers: usize,
    /// Seed of the dropout masks.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            learning_rate: 2e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            schedule: ScheduleKind::Linear,
            warmup_steps: 0,
            total_steps: 100,
            checkpointing: true,
            offload_activations: false,
            kept_mlp_layers: 0,
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32| Error::InvalidArgument(format!("{what} out of range: {v}"));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return Err(bad("learning_rate", self.learning_rate));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad("weight_decay", self.weight_decay));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return Err(bad("beta1", self.beta1));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(bad("beta2", self.beta2));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(bad("eps", self.eps));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(bad("max_grad_norm", self.max_grad_norm));
        }
        Ok(())
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.schedule,
            peak_lr: self.learning_rate,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// 1-based number of this step.
    pub step: u64,
    /// Mean cross-entropy over the labelled tokens of all micro-batches.
    pub loss: f32,
    /// Global L2 norm of the LoRA gradients before clipping.
    pub grad_norm: f32,
    /// Learning rate applied.
    pub lr: f32,
    /// Tokens processed (all rows, padding included).
    pub tokens: u64,
    /// Tokens that carried a label.
    pub labelled_tokens: u64,
}

/// LoRA training over a shared frozen decoder.
pub struct Trainer<B: Backend> {
    decoder: Arc<Decoder<B>>,
    lora: LoraConfig,
    cfg: TrainConfig,
    params: LoraTensors<B>,
    grads: LoraTensors<B>,
    m: LoraTensors<B>,
    v: LoraTensors<B>,
    /// Optimizer steps taken.
    step: u64,
    /// The data-parallel group this trainer is a rank of (none: it trains alone).
    group: Option<Arc<dyn Collective<B>>>,
    /// The recorded micro-batch pass, replayed while batches keep their shape.
    replayer: Replayer<B>,
}

impl<B: Backend> Trainer<B> {
    /// Fresh adapters initialised from `lora.seed`.
    pub fn new(decoder: Arc<Decoder<B>>, lora: LoraConfig, cfg: TrainConfig) -> Result<Self> {
        lora.validate()?;
        let params = LoraTensors::init(&decoder.cfg, &lora, &decoder.backend)?;
        Self::with_params(decoder, lora, cfg, params)
    }

    /// Starts from given adapter tensors (a loaded adapter) with fresh optimizer state.
    pub fn with_params(
        decoder: Arc<Decoder<B>>,
        lora: LoraConfig,
        cfg: TrainConfig,
        params: LoraTensors<B>,
    ) -> Result<Self> {
        lora.validate()?;
        cfg.validate()?;
        let be = &decoder.backend;
        let grads = params.zeros_like(be)?;
        let m = params.zeros_like(be)?;
        let v = params.zeros_like(be)?;
        Ok(Trainer {
            decoder,
            lora,
            cfg,
            params,
            grads,
            m,
            v,
            step: 0,
            group: None,
            replayer: Replayer::new(),
        })
    }

    /// Makes this trainer a rank of a data-parallel group: each step's gradients and loss are
    /// then those of the union of every rank's batches (see [`Trainer::compute_gradients`]).
    /// Every rank must start from the same adapters and take the same steps.
    pub fn join_group(&mut self, group: Arc<dyn Collective<B>>) {
        self.group = Some(group);
    }

    pub fn decoder(&self) -> &Arc<Decoder<B>> {
        &self.decoder
    }
    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora
    }
    pub fn train_config(&self) -> &TrainConfig {
        &self.cfg
    }
    pub fn params(&self) -> &LoraTensors<B> {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut LoraTensors<B> {
        // The caller may put new tensors in place of those a recording reads.
        self.replayer.forget();
        &mut self.params
    }
    /// Gradients of the last [`Trainer::compute_gradients`] or step (before clipping: the step
    /// scales them as AdamW reads them).
    pub fn grads(&self) -> &LoraTensors<B> {
        &self.grads
    }
    /// Whether micro-batches may be recorded once and replayed while batches keep their shape
    /// (CUDA graphs on a GPU; see [`Backend::record`]). On by default, unless the environment
    /// variable `FINETUNE_CUDA_GRAPHS` is `0`; never with dropout or in a data-parallel group.
    pub fn set_recording(&mut self, on: bool) {
        self.replayer.set_enabled(on);
    }
    /// Whether a recorded pass is held, which the next micro-batch of the last one's shape
    /// replays.
    pub fn holds_recording(&self) -> bool {
        self.replayer.holds_recording()
    }
    /// Whether the next step, of one micro-batch of the last one's shape, would record its pass
    /// (two captures before the replay: not a steady step's time).
    pub fn records_next_step(&self) -> bool {
        let record =
            self.replayer
                .applies(&self.decoder().backend, &self.lora, self.group.is_some());
        self.replayer.records_next(record)
    }
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The adapters as inference sees them: current parameters, no dropout.
    pub fn inference_adapters(&self) -> Adapters<'_, B> {
        Adapters::new(&self.params, &self.lora, None)
    }

    /// AdamW's first and second moments on the host, one `(rows, cols, values)` per parameter
    /// tensor, in the order of [`LoraTensors::tensors`].
    #[allow(clippy::type_complexity)]
    pub fn moments_host(&self) -> Result<[Vec<(usize, usize, Vec<f32>)>; 2]> {
        let be = &self.decoder.backend;
        let host = |set: &LoraTensors<B>| -> Result<Vec<_>> {
            set.tensors()
                .map(|t| {
                    let (r, c) = be.shape(t);
                    Ok((r, c, be.download(t)?))
                })
                .collect()
        };
        Ok([host(&self.m)?, host(&self.v)?])
    }

    /// Puts back a saved optimizer state: moments (host values in the layout of
    /// [`Trainer::moments_host`]) and the number of steps taken.
    pub fn restore_optimizer(&mut self, m: &[Vec<f32>], v: &[Vec<f32>], step: u64) -> Result<()> {
        let be = &self.decoder.backend;
        let mut restored = [self.params.zeros_like(be)?, self.params.zeros_like(be)?];
        for (set, values) in restored.iter_mut().zip([m, v]) {
            let count = set.tensors().count();
            if values.len() != count {
                return Err(Error::InvalidArgument(format!(
                    "optimizer state has {} tensors, the adapter {count}",
                    values.len()
                )));
            }
            for (t, vals) in set.tensors_mut().zip(values) {
                let (r, c) = be.shape(t);
                *t = be.upload(vals, r, c)?;
            }
        }
        let [m, v] = restored;
        (self.m, self.v, self.step) = (m, v, step);
        Ok(())
    }

    /// Zeroes the gradients, then accumulates those of `micro_batches` (one optimizer step's worth).
    /// The loss is the mean over every labelled token of all micro-batches, so the result does
    /// not depend on how the tokens are split into micro-batches. Returns that mean loss, the
    /// tokens and the labelled tokens.
    ///
    /// In a data-parallel group the micro-batches are this rank's share (possibly none): the
    /// labelled tokens are counted over all ranks first, each rank's gradients are normalised
    /// by that total, and the sum over ranks (one bucket per layer, started as soon as the
    /// layer's backward is queued, running beside the earlier layers' backward) is the gradient
    /// of the mean loss over the union of all ranks' batches. The returned figures are totals
    /// over the group.
    pub fn compute_gradients(&mut self, micro_batches: &[Batch]) -> Result<(f32, u64, u64)> {
        let group = self.group.clone();
        if micro_batches.is_empty() && group.is_none() {
            return Err(Error::InvalidArgument(
                "a step needs at least one batch".into(),
            ));
        }
        let dec = &self.decoder;
        let be = &dec.backend;
        for b in micro_batches {
            b.validate(dec.cfg.vocab_size)?;
        }
        let mut labelled = [micro_batches.iter().map(|b| b.labelled()).sum::<usize>() as f64];
        if let Some(g) = &group {
            g.sum_host(be, &mut labelled)?;
        }
        let labelled = labelled[0];
        if labelled == 0.0 {
            return Err(Error::InvalidArgument(
                "the batch has no labelled token (every label is -100)".into(),
            ));
        }
        for g in self.grads.tensors_mut() {
            be.fill_zero(g)?;
        }
        let largest = micro_batches.iter().map(|b| b.batch_size * b.seq_len).max();
        let saving = Saving {
            recompute: self.cfg.checkpointing,
            offload_inputs: self.cfg.offload_activations,
            offload_attention: self.offloads_attention(largest.unwrap_or(0)),
            offload_attention_inputs: self.offloads_attention_inputs(largest.unwrap_or(0)),
            keep_adapter_inputs: self.keeps_adapter_inputs(largest.unwrap_or(0)),
            kept_mlp_layers: self.cfg.kept_mlp_layers,
        };
        let record = self.replayer.applies(be, &self.lora, group.is_some());
        let scale = 1.0 / labelled as f32;
        let mut loss_sum = 0.0f64;
        for (i, batch) in micro_batches.iter().enumerate() {
            let last = i + 1 == micro_batches.len();
            let ad = Adapters::new(&self.params, &self.lora, Some(self.dropout_seed(i)));
            // The gradients are final once the last micro-batch's backward leaves a layer.
            let mut layer_done = |layer: usize, grads: &mut LoraTensors<B>| match &group {
                Some(g) if last => g.start_sum(be, &mut grads.layer_tensors_mut(layer)),
                _ => Ok(()),
            };
            loss_sum += self.replayer.run(
                dec,
                batch,
                &ad,
                &mut self.grads,
                scale,
                saving,
                record,
                &mut layer_done,
            )?;
        }
        if !loss_sum.is_finite() {
            return Err(Error::NonFinite(format!("loss ({loss_sum})")));
        }
        let mut totals = [
            loss_sum,
            micro_batches
                .iter()
                .map(|b| (b.batch_size * b.seq_len) as f64)
                .sum(),
        ];
        if let Some(g) = &group {
            if micro_batches.is_empty() {
                // No share of this step: zero gradients, summed in the same buckets as the others'.
                for layer in (0..dec.cfg.num_layers).rev() {
                    g.start_sum(be, &mut self.grads.layer_tensors_mut(layer))?;
                }
            }
            g.wait(be)?;
            g.sum_host(be, &mut totals)?;
        }
        let [loss_sum, tokens] = totals;
        Ok(((loss_sum / labelled) as f32, tokens as u64, labelled as u64))
    }

    /// Whether a checkpointed, offloaded step of micro-batches of at most `tokens` keeps the
    /// attention outputs in host memory too ([`Saving::offload_attention`]): when the stash
    /// really moves them off the device and all layers' (`tokens × heads × head_dim` values, at
    /// most 4 bytes each) take at most a quarter of the host's memory. Longer sequences (the
    /// layer inputs take about as much again) recompute the attention instead.
    fn offloads_attention(&self, tokens: usize) -> bool {
        let cfg = &self.decoder.cfg;
        self.cfg.checkpointing
            && self.cfg.offload_activations
            && self.decoder.backend.stash_moves()
            && self.fits_host_quarter(tokens, cfg.num_heads * cfg.head_dim)
    }

    /// Whether the attention's inputs go with its outputs ([`Saving::offload_attention_inputs`]):
    /// while all layers' outputs, q, k, v and x1 (`tokens × (2·(heads + kv_heads) × head_dim +
    /// hidden)` values) take at most a quarter of the host's memory; past that only the outputs
    /// are kept.
    fn offloads_attention_inputs(&self, tokens: usize) -> bool {
        let cfg = &self.decoder.cfg;
        let values = 2 * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim + cfg.hidden_size;
        self.offloads_attention(tokens) && self.fits_host_quarter(tokens, values)
    }

    /// Whether `values` a token and layer, at most 4 bytes each, take at most a quarter of the
    /// host's memory for `tokens` tokens.
    fn fits_host_quarter(&self, tokens: usize, values: usize) -> bool {
        let bytes = (tokens * values * self.decoder.cfg.num_layers) as u64 * 4;
        host_memory_bytes().is_some_and(|host| bytes <= host / 4)
    }

    /// Whether a checkpointed step of micro-batches of at most `tokens` keeps the adapters'
    /// inputs for the backward ([`Saving::keep_adapter_inputs`]): while they take at most
    /// [`KEPT_ADAPTER_INPUTS_MAX_BYTES`] (`tokens × layers × adapters × r` f32 values).
    fn keeps_adapter_inputs(&self, tokens: usize) -> bool {
        let adapters = self.lora.target_list().len() * self.decoder.cfg.num_layers;
        tokens * adapters * self.lora.rank * std::mem::size_of::<f32>()
            <= KEPT_ADAPTER_INPUTS_MAX_BYTES
    }

    /// The dropout seed of micro-batch `i` of this step. Rank 0 of a group draws the masks a
    /// lone trainer would; the other ranks draw streams of their own.
    fn dropout_seed(&self, i: usize) -> u64 {
        let seed = derive(self.cfg.seed, &[self.step, i as u64]);
        match &self.group {
            Some(g) if g.rank() > 0 => derive(seed, &[g.rank() as u64]),
            _ => seed,
        }
    }

    /// One optimizer step over `micro_batches` (gradient accumulation when there are several).
    /// A non-finite loss or gradient is reported as [`Error::NonFinite`] and nothing is updated.
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        // In a data-parallel group the gradients come back summed over the ranks, identical on
        // each, so the norm, clipping and AdamW below keep every replica the same.
        let (loss, tokens, labelled) = self.compute_gradients(micro_batches)?;
        let be = &self.decoder.backend;
        let grads: Vec<&B::Tensor> = self.grads.tensors().collect();
        let grad_norm = be.sum_squares(&grads)?.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!("gradient norm ({grad_norm})")));
        }
        // torch.nn.utils.clip_grad_norm_: g ← g · max / (norm + 1e-6) when norm > max, applied
        // by AdamW as it reads each gradient.
        let max = self.cfg.max_grad_norm as f64;
        let grad_scale = if max > 0.0 && grad_norm > max {
            (max / (grad_norm + 1e-6)) as f32
        } else {
            1.0
        };
        let lr = self.cfg.schedule().lr(self.step);
        let h = AdamWStep {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.step + 1,
            grad_scale,
        };
        let tensors = self.params.tensors_mut().zip(self.grads.tensors());
        let mut slots: Vec<AdamWSlot<'_, B::Tensor>> = tensors
            .zip(self.m.tensors_mut().zip(self.v.tensors_mut()))
            .map(|((param, grad), (m, v))| AdamWSlot { param, grad, m, v })
            .collect();
        be.adamw(&mut slots, h)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss,
            grad_norm: grad_norm as f32,
            lr,
            tokens,
            labelled_tokens: labelled,
        })
    }

    /// Sums host values over the ranks of this trainer's group (as they are when alone).
    pub fn sum_over_group(&self, values: &mut [f64]) -> Result<()> {
        match &self.group {
            Some(g) => g.sum_host(&self.decoder.backend, values),
            None => Ok(()),
        }
    }

    /// Mean loss on `batch` without dropout and without touching any state.
    pub fn eval_loss(&self, batch: &Batch) -> Result<f32> {
        let dec = &self.decoder;
        let be = &dec.backend;
        let b = batch.upload(be, dec.cfg.vocab_size)?;
        if b.labelled == 0 {
            return Err(Error::InvalidArgument(
                "the batch has no labelled token".into(),
            ));
        }
        let h = dec.hidden_states(&b, Some(&self.inference_adapters()))?;
        // The fused loss also returns a gradient we do not need; evaluation is rare enough.
        let mut row_loss = be.zeros(batch.batch_size * batch.seq_len, 1)?;
        let head = dec.weights.output_projection();
        let one = be.upload(&[1.0], 1, 1)?;
        be.lm_head_cross_entropy(&h, head, &b.labels, &one, &mut row_loss)?;
        Ok((row_loss_sum(be, &row_loss)? / b.labelled as f64) as f32)
    }
}
