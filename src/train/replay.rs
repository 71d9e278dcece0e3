//! Micro-batches recorded once and replayed ([`Backend::record`]): while batches keep one shape,
//! a micro-batch's forward and backward pass is queued as one recorded unit instead of
//! thousands of operations, each with its own host-side cost (on a GPU the recording is a CUDA
//! graph). The recording reads the batch, the loss scale and the adapters from buffers that stay
//! in place, and each micro-batch writes its values into them first.
//!
//! The first micro-batch of a new shape runs as usual (compiling kernels and planning products
//! on the way); the next one of that shape is recorded, and every later one replays. One
//! recording is held at a time: a batch of another shape drops it (and its memory). Where the
//! backend will not record a shape's pass (`Recorded::Never`: its recording would not fit in
//! device memory, say), that shape's passes run unrecorded without trying again.

use super::batch::Batch;
use crate::backend::{Backend, Recorded};
use crate::error::Result;
use crate::lora::LoraConfig;
use crate::model::adapters::LoraTensors;
use crate::model::decoder::{Adapters, Decoder, DeviceBatch, LossOutput, Saving};

/// `FINETUNE_CUDA_GRAPHS=0` turns recording off (every micro-batch queued operation by
/// operation); `all` records micro-batches of any length, past [`RECORDED_TOKENS_MAX`] too (to
/// compare the two there).
const SWITCH: &str = "FINETUNE_CUDA_GRAPHS";

/// Micro-batches of more tokens (rows × sequence) run unrecorded: a recording saves the host's
/// queueing, which a long pass hides behind its GPU time anyway, and queued passes run the
/// adapters' gradient products beside the compute stream (`Backend::add_adapter_gradients`),
/// which recorded ones do in order. On an H200 (Llama-3-8B QLoRA, bench/NOTES.md): at 2,048
/// tokens recording gained ~3 %; at 4,096 recorded and queued steps ran equally fast (11,401
/// and 11,428 tokens/s) and queued with the side stream no slower (11,434); at 8,192 queued
/// with the side stream gained 0.3-0.6 % over recorded; at 32,768 and 65,536 recorded and
/// queued ran equally fast, the recorded ones with 310 and 108 MiB more at their peak.
const RECORDED_TOKENS_MAX: usize = 2_048;

/// What a recording depends on besides the values in its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    batch: usize,
    seq: usize,
    saving: Saving,
    mlp_chunk_rows: usize,
}

/// A batch's buffers on the backend and the work recorded over them.
struct Held<B: Backend> {
    layout: Layout,
    batch: DeviceBatch<B>,
    /// `[1, 1]`: 1 / the labelled tokens of the step.
    scale: B::Tensor,
    /// `[rows, 1]`: each row's cross-entropy.
    row_loss: B::Tensor,
    recording: Option<B::Recording>,
    /// Cleared when the backend said it will not record this layout's pass.
    recordable: bool,
}

/// Runs micro-batches through held buffers, and a held recording where it can.
pub(super) struct Replayer<B: Backend> {
    /// Boxed: a trainer without a recording stays small.
    held: Option<Box<Held<B>>>,
    enabled: bool,
    /// Micro-batches past [`RECORDED_TOKENS_MAX`] are recorded too (`FINETUNE_CUDA_GRAPHS=all`).
    any_length: bool,
}

impl<B: Backend> Replayer<B> {
    pub(super) fn new() -> Self {
        let switch = std::env::var(SWITCH);
        Replayer {
            held: None,
            enabled: switch.as_ref().map_or(true, |v| v != "0"),
            any_length: switch.is_ok_and(|v| v == "all"),
        }
    }

    /// Whether a recording is held.
    pub(super) fn holds_recording(&self) -> bool {
        self.held.as_ref().is_some_and(|h| h.recording.is_some())
    }

    /// Whether the next micro-batch of the held shape would be recorded (before its replay),
    /// given `record` ([`Replayer::applies`]): that shape ran once, unrecorded, and nothing
    /// ruled its recording out.
    pub(super) fn records_next(&self, record: bool) -> bool {
        record
            && self.held.as_ref().is_some_and(|h| {
                h.recording.is_none()
                    && h.recordable
                    && self.length_allows(h.layout.batch * h.layout.seq)
            })
    }

    /// Whether micro-batches of `tokens` (rows × sequence) may be recorded.
    fn length_allows(&self, tokens: usize) -> bool {
        tokens <= RECORDED_TOKENS_MAX || self.any_length
    }

    /// Turns recording on or off (off drops the held recording).
    pub(super) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.forget();
        }
    }

    /// Whether micro-batches trained with these settings on `be` can be recorded: where the
    /// backend records at all, not in a data-parallel group (its sums are queued between
    /// layers), not with dropout (its masks change every step).
    pub(super) fn applies(&self, be: &B, lora: &LoraConfig, in_group: bool) -> bool {
        self.enabled && be.records_work() && !in_group && lora.dropout == 0.0
    }

    /// Drops the held recording: the buffers it reads (the adapters) may be replaced.
    pub(super) fn forget(&mut self) {
        self.held = None;
    }

    /// Forward and backward of `batch` (see [`Decoder::forward_backward`]), gradients of
    /// `scale · Σ CE` added into `grads`; returns the sum of the rows' cross-entropies. The
    /// batch goes into the held buffers either way; the pass is recorded and replayed only when
    /// `record` (see [`Replayer::applies`]; `layer_done` then never runs), else queued op by op.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &mut self,
        dec: &Decoder<B>,
        batch: &Batch,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
        scale: f32,
        saving: Saving,
        record: bool,
        layer_done: &mut dyn FnMut(usize, &mut LoraTensors<B>) -> Result<()>,
    ) -> Result<f64> {
        let be = &dec.backend;
        let vocab = dec.cfg.vocab_size;
        let layout = Layout {
            batch: batch.batch_size,
            seq: batch.seq_len,
            saving,
            mlp_chunk_rows: dec.mlp_chunk_rows(),
        };
        let seen = match &mut self.held {
            Some(h) if h.layout == layout => {
                batch.write_into(be, vocab, &mut h.batch)?;
                be.write(&mut h.scale, &[scale])?;
                true
            }
            _ => {
                // The old recording's memory goes before the new buffers come.
                self.held = None;
                self.held = Some(Box::new(Held {
                    layout,
                    batch: batch.upload(be, vocab)?,
                    scale: be.upload(&[scale], 1, 1)?,
                    row_loss: be.zeros(batch.batch_size * batch.seq_len, 1)?,
                    recording: None,
                    recordable: true,
                }));
                false
            }
        };
        let records = seen && self.records_next(record);
        let Held {
            batch,
            scale,
            row_loss,
            recording,
            recordable,
            ..
        } = &mut **self.held.as_mut().expect("set above");
        let mut pass = || {
            let mut loss = LossOutput { scale, row_loss };
            dec.forward_backward(batch, ad, grads, &mut loss, saving, layer_done)
        };
        if !record {
            // Settings changed since it was made (a trainer that joined a group, say).
            *recording = None;
        } else if records {
            match be.record(&mut pass)? {
                Recorded::Kept(r) => *recording = Some(r),
                Recorded::NotNow => {}
                Recorded::Never => *recordable = false,
            }
        }
        match recording {
            Some(r) => be.replay(r)?,
            None => pass()?,
        }
        row_loss_sum(be, row_loss)
    }
}

/// `Σ` of a `[rows, 1]` tensor of row losses, in f64 (waits for the work queued before).
pub(super) fn row_loss_sum<B: Backend>(be: &B, row_loss: &B::Tensor) -> Result<f64> {
    Ok(be.download(row_loss)?.iter().map(|&x| x as f64).sum())
}
