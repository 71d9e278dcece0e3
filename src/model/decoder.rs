//! Forward and backward pass of the decoder, written once against [`Backend`].
//!
//! One layer (x: [tokens, hidden], LoRA added to each adapted projection P: P(x) = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ):
//!
//! ```text
//!   h1 = rmsnorm(x)                     q,k,v = Pq(h1), Pk(h1), Pv(h1)
//!   (qwen3) q,k = rmsnorm per head      q,k = rope(q), rope(k)
//!   a  = attention(q, k, v)             x1 = x + Po(a)
//!   h2 = rmsnorm(x1)                    m = act(Pgate(h2)) · Pup(h2)
//!   out = x1 + Pdown(m)
//! ```
//! After the last layer: `loss = CE(rmsnorm(x)·W_outᵀ, labels)`. The backward pass walks the same
//! steps in reverse and produces gradients for the LoRA tensors only; the base weights are frozen.
//! With checkpointing, only each layer's input is kept and the layer is recomputed in the backward,
//! except the adapters' inputs `dropout(x)·Aᵀ` (r columns each, ~1 MiB a layer at 2,048 tokens
//! and rank 16): the recomputation reuses them instead of running those rank-wide products again.
//! When the inputs are offloaded to host memory, the attention output may go there too
//! ([`Saving::offload_attention`]): the recomputation then skips the attention forward, the
//! part of a layer that grows with the square of the sequence; with its inputs q, k and v
//! ([`Saving::offload_attention_inputs`]) it also skips their products and the rotation, and
//! recomputes only `h1` (their products' input, for their backward) and the residual half.
//!
//! The MLP runs over chunks of at most [`Decoder::mlp_chunk_rows`] token rows, as even as
//! multiples of 256 rows let them be ([`mlp_chunk_ranges`]; its intermediates,
//! three `[rows, intermediate]` tensors and their gradients, are the largest of a layer), and its
//! intermediates are never kept: the backward recomputes `gate`, `up` and `m` chunk by chunk from
//! `h2`. So a layer's memory beyond `[rows, hidden]` tensors stops growing with the sequence, and
//! a recomputed layer runs only up to `h2` (its `down` product is never needed again).

use super::adapters::{LoraPair, LoraTensors};
use super::config::ModelConfig;
use super::host_layers::LayerCopies;
use super::weights::{DecoderWeights, LayerWeights};
use crate::backend::{product_into, AttentionShape, Backend, DeviceCopy, PassPoint, ProductOutput};
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, TargetModule};
use crate::rng::derive;

/// A batch of token rows on a backend. Row `t = b·seq + i` is position i of sequence b.
pub struct DeviceBatch<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    pub ids: B::Ints,
    pub labels: B::Ints,
    pub positions: B::Ints,
    pub segments: B::Ints,
    /// Rows with a label (not [`crate::backend::IGNORE_LABEL`]).
    pub labelled: usize,
}

/// Where a training pass puts its loss: `row_loss` (`[rows, 1]`) receives each row's
/// cross-entropy (0 for unlabelled rows), and the gradients are those of `scale · Σ CE`, `scale`
/// a `[1, 1]` tensor (1/normalizer) that the device work reads itself.
pub struct LossOutput<'a, B: Backend> {
    pub scale: &'a B::Tensor,
    pub row_loss: &'a mut B::Tensor,
}

/// What a training forward pass keeps for its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saving {
    /// Keep only each layer's input and recompute the layer in the backward pass (activation
    /// checkpointing), instead of every intermediate.
    pub recompute: bool,
    /// Keep the layer inputs in host memory (`Backend::stash`): copied out while the next
    /// layers compute, copied back while the layer after runs its attention's backward.
    pub offload_inputs: bool,
    /// With `recompute`: keep each layer's attention output in host memory too (stashed like the
    /// inputs, its log-sum-exp on the device), so the recomputation skips the attention forward.
    pub offload_attention: bool,
    /// With `offload_attention` and `keep_adapter_inputs`: keep q, k and v as the attention read
    /// them (rotated) in host memory too, stashed with its output, and x1 (`x + o`, the MLP
    /// norm's input), so the recomputation runs only the two norms: no product before the MLP,
    /// no rotation (layers with no per-head q/k norm). Such a layer's input and x1 are kept as
    /// the norms read them ([`Backend::norm_input`]: bf16 on CUDA).
    pub offload_attention_inputs: bool,
    /// With `recompute`: keep the adapters' inputs `dropout(x)·Aᵀ` on the device (r columns a
    /// projection, 14 KiB a token on Llama 3 8B at rank 16 in f32, half in CUDA's bf16), so
    /// the recomputation reuses them instead of running those rank-wide products again.
    pub keep_adapter_inputs: bool,
    /// With `recompute`: the last this many layers (all of them when more) keep their MLP's
    /// gate and up products on the device, so the backward does not recompute them (their
    /// two products are ~60 % of a recomputed layer's work): `2 × tokens × intermediate_size`
    /// values a layer (bf16 on CUDA; 448 MiB at 8,192 tokens of Llama 3 8B).
    pub kept_mlp_layers: usize,
}

/// Values of one MLP intermediate (`rows × intermediate_size`) per chunk unless set otherwise
/// ([`Decoder::set_mlp_chunk_rows`]): 4,096 rows of Llama 3 8B, whose intermediates are then
/// 112 MiB each in bf16. Against 2,048 rows: half the launches of the MLP's small kernels and
/// rank-wide products, and about as fast (bench/NOTES.md, 2026-12-04); 1,024 rows left the gate
/// and up products (448 tiles of 128 × 256 for 132 multiprocessors on an H200) a last wave a
/// third full. The gated backward writing its results over its inputs
/// ([`Backend::gated_activation_backward_in_place`]) keeps the backward's chunk memory what
/// 2,048-row chunks needed before it.
pub const MLP_CHUNK_VALUES: usize = 4096 * 14336;

/// Token rows per MLP chunk for an intermediate size: `MLP_CHUNK_VALUES / intermediate_size`,
/// rounded down to a multiple of 256 rows (at least 256).
pub fn mlp_chunk_rows_for(intermediate_size: usize) -> usize {
    (MLP_CHUNK_VALUES / intermediate_size.max(1) / 256).max(1) * 256
}

/// The row ranges `(start, rows)` of the MLP chunks of `total` rows, at most `max_rows` each: as
/// few chunks as that allows, of equal rows rounded up to a multiple of 256 (within `max_rows`),
/// the last one the rest. No chunk is then a small remainder with the products' last wave
/// mostly empty, and the largest is as small as the count allows: 8,192 rows of Gemma-7B (at
/// most 2,304) make 4 chunks of 2,048, not 3 of 2,304 and one of 1,280.
pub fn mlp_chunk_ranges(total: usize, max_rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let max_rows = max_rows.max(1);
    let even = total.div_ceil(total.div_ceil(max_rows).max(1));
    let step = even.next_multiple_of(256).min(max_rows);
    (0..total)
        .step_by(step.max(1))
        .map(move |start| (start, step.min(total - start)))
}

/// A pass's hold on its adapter factors ([`Backend::hold_adapter_factors`]), ended when dropped,
/// on every way out of the pass.
struct FactorsHeld<'b, B: Backend>(&'b B);

impl<'b, B: Backend> FactorsHeld<'b, B> {
    fn new(be: &'b B) -> Self {
        be.hold_adapter_factors(true);
        FactorsHeld(be)
    }
}

impl<B: Backend> Drop for FactorsHeld<'_, B> {
    fn drop(&mut self) {
        self.0.hold_adapter_factors(false);
    }
}

/// The decoder: configuration, frozen weights and the backend they live on.
pub struct Decoder<B: Backend> {
    pub cfg: ModelConfig,
    pub backend: B,
    pub weights: DecoderWeights<B>,
    inv_freq: Vec<f32>,
    mlp_chunk_rows: usize,
}

/// Keys and values of the tokens seen so far, per layer (`[len, kv_heads·head_dim]`), for
/// incremental decoding.
pub struct KvCache<B: Backend> {
    k: Vec<B::Tensor>,
    v: Vec<B::Tensor>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The LoRA state a pass runs with.
pub struct Adapters<'a, B: Backend> {
    pub tensors: &'a LoraTensors<B>,
    pub cfg: &'a LoraConfig,
    /// Seed of this pass's dropout masks; `None` disables dropout (evaluation, inference).
    pub dropout_seed: Option<u64>,
    /// The factors rounded once for the pass as the products that pair them with a product
    /// input round them ([`Backend::rounded_product_input`]); `None`: those read `tensors`.
    rounded: Option<&'a LoraTensors<B>>,
}

impl<'a, B: Backend> Adapters<'a, B> {
    /// The adapters `tensors` configured by `cfg`, with dropout masks drawn from `dropout_seed`.
    pub fn new(
        tensors: &'a LoraTensors<B>,
        cfg: &'a LoraConfig,
        dropout_seed: Option<u64>,
    ) -> Self {
        Adapters {
            tensors,
            cfg,
            dropout_seed,
            rounded: None,
        }
    }

    /// These adapters with `rounded` factors for the products with product inputs.
    fn with_rounded<'b>(&'b self, rounded: &'b LoraTensors<B>) -> Adapters<'b, B> {
        Adapters {
            tensors: self.tensors,
            cfg: self.cfg,
            dropout_seed: self.dropout_seed,
            rounded: Some(rounded),
        }
    }

    /// Module `m`'s factors for a product whose other operand is a product input (`x·Aᵀ`,
    /// `dy·B`): the pass's rounded copies where made, which are the values such a product
    /// would round each factor to at every call.
    fn product_pair(&self, layer: usize, m: TargetModule) -> Option<&LoraPair<B>> {
        self.rounded.unwrap_or(self.tensors).get(layer, m)
    }
}

/// What a layer's attention leaves for its backward: q, k and v as the backward reads them
/// (rotated, and in training made attention's inputs: [`Backend::rotated_attention_inputs`]),
/// the output and its log-sum-exp.
struct Attended<B: Backend> {
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    out: B::Tensor,
    lse: B::Tensor,
}

/// q and k before the per-head RMSNorm, and the norm's 1/rms of each head row.
struct QkNormCache<B: Backend> {
    q: B::Tensor,
    rq: B::Tensor,
    k: B::Tensor,
    rk: B::Tensor,
}

/// Intermediate values of one layer kept for its backward pass: both halves of its forward up
/// to the MLP, and what the MLP chunks kept.
struct LayerCache<B: Backend> {
    attention: AttentionHalf<B>,
    residual: ResidualHalf<B>,
    /// Each MLP chunk's `gate` and `up` when the forward pass kept them; empty when the backward
    /// recomputes them from `h2`.
    mlp: Vec<MlpChunk<B>>,
}

/// What the adapter's gradients need of a projection's dy once its input gradient is queued
/// ([`Decoder::project_input_gradient`]): dy rounded as the products read it (`None`: dy
/// itself) and `dxa = s·dy·B`.
struct AdapterBackward<B: Backend> {
    rounded_dy: Option<B::Tensor>,
    dxa: B::Tensor,
}

/// What the forward pass keeps of one MLP chunk: the adapter inputs `dropout(·)·Aᵀ` of gate, up
/// and down, and the products `g = Pgate(h)`, `u = Pup(h)` unless the backward recomputes them.
struct MlpChunk<B: Backend> {
    products: Option<(B::Tensor, B::Tensor)>,
    xa: [Option<B::Tensor>; 3],
}

/// What a checkpointed layer keeps for its backward besides its input: the adapter inputs of
/// the attention projections and of each MLP chunk, and with [`Saving::offload_attention`] the
/// attention's output (stashed), log-sum-exp and maybe inputs.
struct Checkpoint<B: Backend> {
    adapter_inputs: [Option<B::Tensor>; 4],
    mlp: Vec<MlpChunk<B>>,
    attention: Option<KeptAttention<B>>,
}

/// A layer's attention output (stashed) and log-sum-exp, and what
/// [`Saving::offload_attention_inputs`] kept besides.
struct KeptAttention<B: Backend> {
    out: B::Tensor,
    lse: B::Tensor,
    inputs: Option<KeptInputs<B>>,
}

/// What a layer keeps (stashed) with [`Saving::offload_attention_inputs`]: q, k and v as its
/// attention read them and x1 as the MLP's norm reads it ([`Backend::norm_input`]); its input is
/// then kept as the attention's norm reads it too. Its recomputation runs the two norms alone.
struct KeptInputs<B: Backend> {
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    x1: B::Tensor,
}

impl<B: Backend> Checkpoint<B> {
    /// Starts bringing the kept attention tensors back to the device (`Backend::fetch_stashed`).
    fn fetch(self, be: &B) -> Result<Self> {
        let attention = match self.attention {
            Some(KeptAttention { out, lse, inputs }) => Some(KeptAttention {
                out: be.fetch_stashed(out)?,
                lse,
                inputs: match inputs {
                    Some(KeptInputs { q, k, v, x1 }) => Some(KeptInputs {
                        q: be.fetch_stashed(q)?,
                        k: be.fetch_stashed(k)?,
                        v: be.fetch_stashed(v)?,
                        x1: be.fetch_stashed(x1)?,
                    }),
                    None => None,
                },
            }),
            None => None,
        };
        Ok(Checkpoint { attention, ..self })
    }
}

/// What a checkpointed layer's forward keeps up to `h2` ([`Decoder::checkpointed_layer_forward`]).
struct CheckpointedHalves<B: Backend> {
    /// The adapter inputs of q, k, v and o.
    xa: [Option<B::Tensor>; 4],
    attn: B::Tensor,
    lse: B::Tensor,
    /// q, k and v as the attention read them, when asked for.
    inputs: Option<[B::Tensor; 3]>,
    x1: B::Tensor,
    /// `h2` in MLP chunks ([`Decoder::mlp_norm`]).
    h2: Vec<B::Tensor>,
}

/// What [`Decoder::attention_half`] computes: `h1`, the adapter inputs of q, k and v, q and k
/// before their per-head norm (qwen3), q, k, v as attention read them, its output and lse.
struct AttentionHalf<B: Backend> {
    h1: B::Tensor,
    r1: B::Tensor,
    /// `dropout(h1)·Aᵀ` of q, k and v where adapted.
    xa: [Option<B::Tensor>; 3],
    qk_raw: Option<QkNormCache<B>>,
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    attn: B::Tensor,
    lse: B::Tensor,
}

/// What [`Decoder::residual_half`] computes: o's adapter input `dropout(attn)·Aᵀ`, `x1`, `h2`
/// (one tensor an MLP chunk: [`Decoder::mlp_norm`]) and its 1/rms.
struct ResidualHalf<B: Backend> {
    xo: Option<B::Tensor>,
    x1: B::Tensor,
    h2: Vec<B::Tensor>,
    r2: B::Tensor,
}

/// Rows of a tensor: all of it (borrowed) or some of them made into a tensor of their own.
enum Rows<'a, T> {
    All(&'a T),
    Part(T),
}

impl<T> std::ops::Deref for Rows<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Rows::All(t) => t,
            Rows::Part(t) => t,
        }
    }
}

impl<B: Backend> Decoder<B> {
    pub fn new(cfg: ModelConfig, backend: B, weights: DecoderWeights<B>) -> Self {
        let inv_freq = cfg.rope_inv_freq();
        let mlp_chunk_rows = mlp_chunk_rows_for(cfg.intermediate_size);
        Decoder {
            cfg,
            backend,
            weights,
            inv_freq,
            mlp_chunk_rows,
        }
    }

    /// Token rows per MLP chunk.
    pub fn mlp_chunk_rows(&self) -> usize {
        self.mlp_chunk_rows
    }

    /// Sets the token rows per MLP chunk (at least 1). Results depend on it only through the
    /// order of floating-point sums and, with dropout, through the masks (one stream per chunk).
    pub fn set_mlp_chunk_rows(&mut self, rows: usize) {
        self.mlp_chunk_rows = rows.max(1);
    }

    /// The row ranges `(start, rows)` of the MLP chunks of `total` rows ([`mlp_chunk_ranges`]).
    fn mlp_chunks(&self, total: usize) -> impl Iterator<Item = (usize, usize)> {
        mlp_chunk_ranges(total, self.mlp_chunk_rows)
    }

    fn attention_shape(&self, batch: &DeviceBatch<B>) -> AttentionShape {
        AttentionShape {
            batch: batch.batch,
            seq: batch.seq,
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// The dropout seed of module `m` of `layer`; MLP chunks after the first (`chunk` > 0) each
    /// draw their own.
    fn dropout_seed(ad: &Adapters<B>, layer: usize, m: TargetModule, chunk: usize) -> Option<u64> {
        ad.dropout_seed
            .filter(|_| ad.cfg.dropout > 0.0)
            .map(|s| match chunk {
                0 => derive(s, &[layer as u64, m as u64]),
                c => derive(s, &[layer as u64, m as u64, c as u64]),
            })
    }

    /// `dropout(x)` while training with dropout; `None` when the adapter reads `x` itself.
    fn dropped_out(&self, x: &B::Tensor, seed: Option<u64>, p: f32) -> Result<Option<B::Tensor>> {
        seed.map(|s| self.backend.dropout(x, p, s)).transpose()
    }

    /// `y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ` ([`Backend::adapted_product`]; `out` says what
    /// reads `y`); also returns `dropout(x)·Aᵀ` for the backward pass, `kept` when the forward
    /// pass kept it (a recomputation), else computed here. `chunk` is the MLP chunk `x` is (0
    /// elsewhere): it picks the dropout stream.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        layer: usize,
        m: TargetModule,
        x: &B::Tensor,
        ad: Option<&Adapters<B>>,
        chunk: usize,
        kept: Option<B::Tensor>,
        out: ProductOutput,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        let xa = self.adapter_input(layer, m, x, ad, chunk, kept)?;
        let y = self.projected(layer, m, x, ad, xa.as_ref(), out)?;
        Ok((y, xa))
    }

    /// `P(x)` of module `m` given `x`'s adapter input `xa` (see [`Self::project`]).
    fn projected(
        &self,
        layer: usize,
        m: TargetModule,
        x: &B::Tensor,
        ad: Option<&Adapters<B>>,
        xa: Option<&B::Tensor>,
        out: ProductOutput,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let lw: &LayerWeights<B> = &self.weights.layers[layer];
        let w = &lw.proj[m as usize];
        let bias = &lw.bias[m as usize];
        // A bias is added in f32.
        let out = if bias.is_some() {
            ProductOutput::Sums
        } else {
            out
        };
        let mut y = match (xa, Self::adapted(ad, layer, m)) {
            (Some(xa), Some((ad, pair))) => {
                be.adapted_product(x, w, xa, &pair.b, ad.cfg.scale(), out)?
            }
            _ => be.product(x, false, w, true, 1.0)?,
        };
        if let Some(b) = bias {
            be.add_row_vector(&mut y, b)?;
        }
        Ok(y)
    }

    /// [`Self::project`] with `P(x)` added into rows `[start, start + rows of x)` of `acc`,
    /// at once where the backend can ([`Backend::adapted_product_add_rows`]); returns
    /// `dropout(x)·Aᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn project_add_rows(
        &self,
        layer: usize,
        m: TargetModule,
        x: &B::Tensor,
        ad: Option<&Adapters<B>>,
        chunk: usize,
        acc: &mut B::Tensor,
        start: usize,
    ) -> Result<Option<B::Tensor>> {
        let be = &self.backend;
        let lw: &LayerWeights<B> = &self.weights.layers[layer];
        let xa = self.adapter_input(layer, m, x, ad, chunk, None)?;
        match (&xa, Self::adapted(ad, layer, m)) {
            (Some(xa), Some((ad, pair))) if lw.bias[m as usize].is_none() => {
                let w = &lw.proj[m as usize];
                be.adapted_product_add_rows(x, w, xa, &pair.b, ad.cfg.scale(), acc, start)?;
            }
            _ => {
                let y = self.projected(layer, m, x, ad, xa.as_ref(), ProductOutput::Sums)?;
                be.add_rows(acc, start, &y)?;
            }
        }
        Ok(xa)
    }

    /// The adapters and module `m`'s pair when `m` of `layer` is adapted.
    fn adapted<'a>(
        ad: Option<&'a Adapters<'a, B>>,
        layer: usize,
        m: TargetModule,
    ) -> Option<(&'a Adapters<'a, B>, &'a LoraPair<B>)> {
        ad.and_then(|ad| ad.tensors.get(layer, m).map(|p| (ad, p)))
    }

    /// The room [`Backend::product_input`] leaves in the inputs of adapted projections: the
    /// adapters' rank, unless dropout is on (its backward masks the adapter's share of dx, which
    /// then cannot be folded into the base product).
    fn room(ad: Option<&Adapters<B>>) -> usize {
        ad.filter(|ad| ad.dropout_seed.is_none() || ad.cfg.dropout == 0.0)
            .map_or(0, |ad| ad.cfg.rank)
    }

    /// `dropout(x)·Aᵀ` of module `m` when it is adapted: `kept` when the forward pass kept it (a
    /// recomputation), else computed here.
    fn adapter_input(
        &self,
        layer: usize,
        m: TargetModule,
        x: &B::Tensor,
        ad: Option<&Adapters<B>>,
        chunk: usize,
        kept: Option<B::Tensor>,
    ) -> Result<Option<B::Tensor>> {
        if kept.is_some() {
            return Ok(kept);
        }
        let Some((ad, pair)) = ad.and_then(|ad| ad.product_pair(layer, m).map(|p| (ad, p))) else {
            return Ok(None);
        };
        let seed = Self::dropout_seed(ad, layer, m, chunk);
        let dropped = self.dropped_out(x, seed, ad.cfg.dropout)?;
        let x = dropped.as_ref().unwrap_or(x);
        Ok(Some(self.backend.adapter_product(x, &pair.a, true, 1.0)?))
    }

    /// Backward of [`Decoder::project`]: returns dx, added into `acc` when given (the inputs
    /// shared by several projections), and adds into the pair's gradients `dB += s·dyᵀ·xa`,
    /// `dA += (s·dy·B)ᵀ·dropout(x)`: [`Self::project_input_gradient`], then
    /// [`Self::add_adapter_gradients`].
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        layer: usize,
        m: TargetModule,
        dy: &B::Tensor,
        x: &B::Tensor,
        xa: Option<B::Tensor>,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
        acc: Option<B::Tensor>,
        chunk: usize,
    ) -> Result<B::Tensor> {
        let (dx, pending) = self.project_input_gradient(layer, m, dy, ad, grads, acc, chunk)?;
        if let Some(pending) = pending {
            self.add_adapter_gradients(layer, m, dy, pending, x, xa, ad, grads, chunk)?;
        }
        Ok(dx)
    }

    /// The input gradient of [`Decoder::project`]: dx (added into `acc` when given) and, when
    /// `m` is adapted, what its adapter's gradients need of dy. As in the forward, the base
    /// product comes last and accumulates onto the adapter's share of dx (or runs as one
    /// product with it: [`Backend::adapted_product_backward`]). Reads nothing of the
    /// projection's input: the MLP's backward forms down's input afterwards.
    #[allow(clippy::too_many_arguments)]
    fn project_input_gradient(
        &self,
        layer: usize,
        m: TargetModule,
        dy: &B::Tensor,
        ad: &Adapters<B>,
        grads: &LoraTensors<B>,
        acc: Option<B::Tensor>,
        chunk: usize,
    ) -> Result<(B::Tensor, Option<AdapterBackward<B>>)> {
        let be = &self.backend;
        let w = &self.weights.layers[layer].proj[m as usize];
        let (Some(pair), Some(rounded), Some(_)) = (
            ad.tensors.get(layer, m),
            ad.product_pair(layer, m),
            grads.get(layer, m),
        ) else {
            return Ok((product_into(be, acc, dy, w)?, None));
        };
        // dy rounded once, as the base product would round it, for all three products reading it.
        let rounded_dy = be.rounded_product_input(dy, Self::room(Some(ad)))?;
        let dyr = rounded_dy.as_ref().unwrap_or(dy);
        let dxa = be.adapter_product(dyr, &rounded.b, false, ad.cfg.scale())?;
        let dx = match Self::dropout_seed(ad, layer, m, chunk) {
            None => {
                // dL/dm, the input gradient of down, is read only by the gated activation's
                // backward, dL/d(attn), o's, only by the attention's backward (as its dO).
                let out = match m {
                    TargetModule::Down => ProductOutput::GatedOperand,
                    TargetModule::O => ProductOutput::Rounded,
                    _ => ProductOutput::Sums,
                };
                be.adapted_product_backward(dyr, w, &dxa, &pair.a, acc, out)?
            }
            Some(seed) => {
                // d dropout(x) = dropout(dxa·A): masked and scaled as the forward was.
                let dxin = be.product(&dxa, false, &pair.a, false, 1.0)?;
                let mut dx = be.dropout(&dxin, ad.cfg.dropout, seed)?;
                drop(dxin);
                if let Some(acc) = acc {
                    be.add_assign(&mut dx, &acc)?;
                }
                be.matmul(dyr, false, w, false, 1.0, &mut dx, true)?;
                dx
            }
        };
        Ok((dx, Some(AdapterBackward { rounded_dy, dxa })))
    }

    /// The adapter's gradients of [`Decoder::project`] from what
    /// [`Self::project_input_gradient`] left: `dB += s·dyᵀ·xa`, `dA += dxaᵀ·dropout(x)`
    /// ([`Backend::add_adapter_gradients`]: `dy` and `x` stay unwritten and alive until
    /// [`Backend::join_adapter_gradients`]; `xa` and `dxa` are handed over to stay so).
    #[allow(clippy::too_many_arguments)]
    fn add_adapter_gradients(
        &self,
        layer: usize,
        m: TargetModule,
        dy: &B::Tensor,
        pending: AdapterBackward<B>,
        x: &B::Tensor,
        xa: Option<B::Tensor>,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
        chunk: usize,
    ) -> Result<()> {
        let be = &self.backend;
        let missing = |what: &str| {
            Error::InvalidArgument(format!("layer {layer} {m:?}: adapted, but no {what}"))
        };
        let xa = xa.ok_or_else(|| missing("adapter input"))?;
        let grad = grads.get_mut(layer, m).ok_or_else(|| missing("gradient"))?;
        let seed = Self::dropout_seed(ad, layer, m, chunk);
        let dropped = self.dropped_out(x, seed, ad.cfg.dropout)?;
        let (dy_read, x_read) = (
            pending.rounded_dy.as_ref().unwrap_or(dy),
            dropped.as_ref().unwrap_or(x),
        );
        let (s, dxa) = (ad.cfg.scale(), &pending.dxa);
        let added =
            be.add_adapter_gradients(dy_read, &xa, dxa, x_read, s, &mut grad.a, &mut grad.b);
        // What they read is dropped once they are done (failed ones too: part of the pair may
        // be running).
        let AdapterBackward { rounded_dy, dxa } = pending;
        for t in [rounded_dy, dropped, Some(dxa), Some(xa)]
            .into_iter()
            .flatten()
        {
            be.drop_after_adapter_gradients(t);
        }
        added
    }

    /// Per-head RMSNorm of q or k (qwen3): rows of `head_dim` values.
    fn head_norm(&self, t: B::Tensor, w: &B::Tensor) -> Result<(B::Tensor, B::Tensor)> {
        let be = &self.backend;
        let (rows, cols) = be.shape(&t);
        let hd = self.cfg.head_dim;
        let flat = be.reshape(t, rows * cols / hd, hd);
        let (y, r) = be.rmsnorm(&flat, w, self.cfg.rms_norm_eps, self.cfg.norm_unit_offset)?;
        Ok((be.reshape(y, rows, cols), r))
    }

    fn head_norm_backward(
        &self,
        dy: B::Tensor,
        raw: &B::Tensor,
        w: &B::Tensor,
        r: &B::Tensor,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let (rows, cols) = be.shape(&dy);
        let hd = self.cfg.head_dim;
        let dy = be.reshape(dy, rows * cols / hd, hd);
        let raw = be.reshape(be.duplicate(raw)?, rows * cols / hd, hd);
        let dx = be.rmsnorm_backward(&dy, &raw, w, r, self.cfg.norm_unit_offset, None)?;
        Ok(be.reshape(dx, rows, cols))
    }

    /// One layer forward; returns the output and the cache for its backward, which holds the
    /// MLP's products too when `keep_mlp` is set.
    ///
    /// `attend(q, k, v)` rotates q and k (RoPE at the batch's positions: the layer hands them
    /// over unrotated), runs the attention (over the batch's own rows in training, over a KV
    /// cache when decoding) and returns what the backward reads of it ([`Attended`]).
    fn layer_forward(
        &self,
        layer: usize,
        x: &B::Tensor,
        ad: Option<&Adapters<B>>,
        attend: impl FnOnce(B::Tensor, B::Tensor, B::Tensor) -> Result<Attended<B>>,
        keep_mlp: bool,
    ) -> Result<(B::Tensor, LayerCache<B>)> {
        let mut cache = self.layer_cache(layer, x, ad, attend, Default::default())?;
        let r = &cache.residual;
        let (out, mlp) =
            self.mlp_forward(layer, self.backend.duplicate(&r.x1)?, &r.h2, ad, keep_mlp)?;
        cache.mlp = mlp;
        Ok((out, cache))
    }

    /// One layer forward up to the MLP's input `h2`: what its backward keeps. `kept` holds the
    /// adapter inputs of q, k, v and o when the forward pass kept them (a recomputation);
    /// `attend` as in [`Self::layer_forward`].
    fn layer_cache(
        &self,
        layer: usize,
        x: &B::Tensor,
        ad: Option<&Adapters<B>>,
        attend: impl FnOnce(B::Tensor, B::Tensor, B::Tensor) -> Result<Attended<B>>,
        kept: [Option<B::Tensor>; 4],
    ) -> Result<LayerCache<B>> {
        let [kq, kk, kv, ko] = kept;
        let attention = self.attention_half(layer, x, ad, attend, [kq, kk, kv])?;
        let residual = self.residual_half(layer, x, &attention.attn, ad, ko)?;
        Ok(LayerCache {
            attention,
            residual,
            mlp: Vec::new(),
        })
    }

    /// A checkpointed layer's forward up to `h2`, keeping only what the checkpoint and the MLP
    /// need (the adapter inputs, the attention output and its log-sum-exp, x1, h2, and q, k, v
    /// with `keep_inputs`): the rest of the attention half is freed before the output
    /// projection runs, which lowers the forward pass's working set (the peak while the output
    /// projection's copy arrives: [`Backend::bring_to_device`]).
    fn checkpointed_layer_forward(
        &self,
        layer: usize,
        x: &B::Tensor,
        ad: &Adapters<B>,
        attend: impl FnOnce(B::Tensor, B::Tensor, B::Tensor) -> Result<Attended<B>>,
        keep_inputs: bool,
    ) -> Result<CheckpointedHalves<B>> {
        // The rest of the attention half (h1, and q, k, v unless kept) is freed at the end of
        // this block.
        let ([xq, xk, xv], attn, lse, inputs) = {
            let a = self.attention_half(layer, x, Some(ad), attend, Default::default())?;
            (a.xa, a.attn, a.lse, keep_inputs.then_some([a.q, a.k, a.v]))
        };
        let r = self.residual_half(layer, x, &attn, Some(ad), None)?;
        Ok(CheckpointedHalves {
            xa: [xq, xk, xv, r.xo],
            attn,
            lse,
            inputs,
            x1: r.x1,
            h2: r.h2,
        })
    }

    /// A layer recomputed up to `h2` from its input, x1, its kept attention (inputs, output,
    /// log-sum-exp) and adapter inputs `kept`: the norms alone, `h1` (q, k and v's products'
    /// input, read by their backward) and `h2`; no product, no rotation.
    fn layer_cache_from_kept_attention(
        &self,
        layer: usize,
        x: &B::Tensor,
        x1: B::Tensor,
        ad: &Adapters<B>,
        attended: Attended<B>,
        kept: [Option<B::Tensor>; 4],
    ) -> Result<LayerCache<B>> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let lw = &self.weights.layers[layer];
        let [xq, xk, xv, xo] = kept;
        let room = Self::room(Some(ad));
        let (eps, offset) = (cfg.rms_norm_eps, cfg.norm_unit_offset);
        let (h1, r1) = be.rmsnorm_for_products(x, &lw.attn_norm, eps, offset, room)?;
        let Attended { q, k, v, out, lse } = attended;
        let attention = AttentionHalf {
            h1,
            r1,
            xa: [xq, xk, xv],
            qk_raw: None,
            q,
            k,
            v,
            attn: be.product_input(out, room)?,
            lse,
        };
        let (h2, r2) = self.mlp_norm(layer, &x1, room)?;
        let residual = ResidualHalf { xo, x1, h2, r2 };
        Ok(LayerCache {
            attention,
            residual,
            mlp: Vec::new(),
        })
    }

    /// The first half of a layer's forward: `h1`, q, k, v and the attention over them.
    fn attention_half(
        &self,
        layer: usize,
        x: &B::Tensor,
        ad: Option<&Adapters<B>>,
        attend: impl FnOnce(B::Tensor, B::Tensor, B::Tensor) -> Result<Attended<B>>,
        kept: [Option<B::Tensor>; 3],
    ) -> Result<AttentionHalf<B>> {
        use TargetModule::*;
        let be = &self.backend;
        let cfg = &self.cfg;
        let lw = &self.weights.layers[layer];
        let [kq, kk, kv] = kept;
        let (eps, offset) = (cfg.rms_norm_eps, cfg.norm_unit_offset);
        let (h1, r1) = be.rmsnorm_for_products(x, &lw.attn_norm, eps, offset, Self::room(ad))?;
        let sums = ProductOutput::Sums;
        let (q, xq) = self.project(layer, Q, &h1, ad, 0, kq, sums)?;
        let (k, xk) = self.project(layer, K, &h1, ad, 0, kk, sums)?;
        let (v, xv) = self.project(layer, V, &h1, ad, 0, kv, sums)?;
        let (q, k, qk_raw) = match (&lw.q_norm, &lw.k_norm) {
            (Some(qn), Some(kn)) => {
                let (qn_out, rq) = self.head_norm(be.duplicate(&q)?, qn)?;
                let (kn_out, rk) = self.head_norm(be.duplicate(&k)?, kn)?;
                (qn_out, kn_out, Some(QkNormCache { q, rq, k, rk }))
            }
            _ => (q, k, None),
        };
        // `attend` rotates q and k (RoPE) at the batch's positions.
        let Attended {
            q,
            k,
            v,
            out: attn,
            lse,
        } = attend(q, k, v)?;
        // o's input is a product input for both of its products (the adapter's input and the
        // base product), as h1 and h2 are for theirs, and kept so by the backward (o's products
        // and the attention's) and, offloaded, in host memory: on CUDA bf16, half the bytes.
        // `batch_attention` makes it so (`Backend::attention_for_products`); an `attend` that
        // does not has it made here.
        let attn = be.product_input(attn, Self::room(ad))?;
        Ok(AttentionHalf {
            h1,
            r1,
            xa: [xq, xk, xv],
            qk_raw,
            q,
            k,
            v,
            attn,
            lse,
        })
    }

    /// The second half of a layer's forward up to the MLP's input: `x1 = x + Po(attn)` and
    /// `h2 = rmsnorm(x1)`, `attn` the product input [`Self::attention_half`] made; `kept` is o's
    /// adapter input when the forward pass kept it.
    fn residual_half(
        &self,
        layer: usize,
        x: &B::Tensor,
        attn: &B::Tensor,
        ad: Option<&Adapters<B>>,
        kept: Option<B::Tensor>,
    ) -> Result<ResidualHalf<B>> {
        let be = &self.backend;
        let lw = &self.weights.layers[layer];
        // x1 = x + o: made by o's product where the backend can (its epilogue reads x),
        // else written over o's values (no copy of x).
        let m = TargetModule::O;
        let xo = self.adapter_input(layer, m, attn, ad, 0, kept)?;
        let x1 = match (&xo, Self::adapted(ad, layer, m)) {
            (Some(xa), Some((ad, pair))) if lw.bias[m as usize].is_none() => {
                let w = &lw.proj[m as usize];
                be.adapted_product_plus(attn, w, xa, &pair.b, ad.cfg.scale(), x)?
            }
            _ => {
                let mut o = self.projected(layer, m, attn, ad, xo.as_ref(), ProductOutput::Sums)?;
                be.add_assign(&mut o, x)?;
                o
            }
        };
        let (h2, r2) = self.mlp_norm(layer, &x1, Self::room(ad))?;
        Ok(ResidualHalf { xo, x1, h2, r2 })
    }

    /// `h2 = rmsnorm(x1)` as the MLP reads it, a product input with `room` in one tensor a chunk
    /// ([`Self::mlp_chunks`]: no rows copied out of a whole h2), and its 1/rms of every row.
    fn mlp_norm(
        &self,
        layer: usize,
        x1: &B::Tensor,
        room: usize,
    ) -> Result<(Vec<B::Tensor>, B::Tensor)> {
        let be = &self.backend;
        let (eps, offset) = (self.cfg.rms_norm_eps, self.cfg.norm_unit_offset);
        let chunks: Vec<_> = self.mlp_chunks(be.shape(x1).0).collect();
        let norm = &self.weights.layers[layer].mlp_norm;
        be.rmsnorm_chunks_for_products(x1, norm, eps, offset, room, &chunks)
    }

    /// A copy of the residual `x` as the norms read it ([`Backend::norm_input`]), for keeping.
    fn kept_for_norms(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let be = &self.backend;
        be.norm_input(x)?.map_or_else(|| be.duplicate(x), Ok)
    }

    /// Fails unless `held` (`what` of the MLP) comes one a chunk of `chunks`.
    fn check_mlp_chunks(chunks: &[(usize, usize)], held: usize, what: &str) -> Result<()> {
        if chunks.len() != held {
            return Err(Error::InvalidArgument(format!(
                "the MLP's {what} in {held} chunks for {} chunks of rows",
                chunks.len()
            )));
        }
        Ok(())
    }

    /// `gate` and `up` of one MLP chunk `h`, with their adapter inputs (`kept` ones reused).
    #[allow(clippy::type_complexity)]
    fn gate_up(
        &self,
        layer: usize,
        h: &B::Tensor,
        ad: Option<&Adapters<B>>,
        chunk: usize,
        kept: [Option<B::Tensor>; 2],
    ) -> Result<((B::Tensor, B::Tensor), [Option<B::Tensor>; 2])> {
        let [kg, ku] = kept;
        // Read only by the gated activation and its backward (which writes dg and du over them).
        let out = ProductOutput::GatedOperand;
        let (g, xg) = self.project(layer, TargetModule::Gate, h, ad, chunk, kg, out)?;
        let (u, xu) = self.project(layer, TargetModule::Up, h, ad, chunk, ku, out)?;
        Ok(((g, u), [xg, xu]))
    }

    /// `out = x1 + Pdown(act(Pgate(h2))·Pup(h2))`, chunk by chunk, each chunk's product added
    /// into the rows of `x1` (taken: a caller that keeps x1 hands over a copy); returns `out` and
    /// what each chunk keeps for the backward pass (its products too when `keep` is set).
    fn mlp_forward(
        &self,
        layer: usize,
        x1: B::Tensor,
        h2: &[B::Tensor],
        ad: Option<&Adapters<B>>,
        keep: bool,
    ) -> Result<(B::Tensor, Vec<MlpChunk<B>>)> {
        let be = &self.backend;
        let chunks: Vec<_> = self.mlp_chunks(be.shape(&x1).0).collect();
        Self::check_mlp_chunks(&chunks, h2.len(), "input")?;
        let mut out = x1;
        let mut kept = Vec::new();
        for (c, ((start, _), h)) in chunks.into_iter().zip(h2).enumerate() {
            let ((g, u), [xg, xu]) = self.gate_up(layer, h, ad, c, [None, None])?;
            let m =
                be.gated_activation_for_products(&g, &u, self.cfg.activation, Self::room(ad))?;
            let xd =
                self.project_add_rows(layer, TargetModule::Down, &m, ad, c, &mut out, start)?;
            kept.push(MlpChunk {
                products: keep.then_some((g, u)),
                xa: [xg, xu, xd],
            });
        }
        Ok((out, kept))
    }

    /// Backward of the MLP half, out = x1 + mlp(h2), h2 = norm(x1) (scales r2): takes dL/d(out)
    /// and returns dL/dx1 in its buffer. `kept` holds what the forward kept of each chunk (its
    /// adapter inputs; its products unless they are recomputed from `h2`). Chunk by chunk, the
    /// chunk's dL/dh2 goes through the norm's backward into the chunk's rows of d_out (which no
    /// later chunk reads): dL/dh2 of all rows never exists at once. Adds the LoRA
    /// gradients of gate, up and down into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_half_backward(
        &self,
        layer: usize,
        mut d_out: B::Tensor,
        x1: &B::Tensor,
        r2: &B::Tensor,
        h2: Vec<B::Tensor>,
        kept: Vec<MlpChunk<B>>,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let (norm, offset) = (
            &self.weights.layers[layer].mlp_norm,
            self.cfg.norm_unit_offset,
        );
        // Room only where down's adapter folds into its products (an unadapted down reads its
        // input dense, as its product would round it).
        let room = match Self::adapted(Some(ad), layer, TargetModule::Down) {
            Some(_) => Self::room(Some(ad)),
            None => 0,
        };
        let total = be.shape(x1).0;
        let chunks: Vec<_> = self.mlp_chunks(total).collect();
        Self::check_mlp_chunks(&chunks, h2.len(), "input")?;
        Self::check_mlp_chunks(&chunks, kept.len(), "forward's kept values")?;
        let chunks = chunks.into_iter().zip(h2).zip(kept);
        for (c, (((start, n), h), chunk)) in chunks.enumerate() {
            let dh = {
                // A part of d_out is made down's product input at once (the norm's backward
                // below adds into d_out itself, after the chunk's products read it).
                let dy = match n == total {
                    true => Rows::All(&d_out),
                    false => Rows::Part(be.product_input_rows(&d_out, start, n, room)?),
                };
                let dh = self.mlp_chunk_backward(layer, &dy, &h, chunk, ad, grads, c)?;
                // The chunk's last adapter gradients, still in flight, may read its rows of h2
                // and of d_out.
                be.drop_after_adapter_gradients(h);
                if let Rows::Part(dy) = dy {
                    be.drop_after_adapter_gradients(dy);
                }
                dh
            };
            be.rmsnorm_backward_rows(&dh, x1, norm, r2, offset, start, &mut d_out)?;
        }
        Ok(d_out)
    }

    /// The MLP backward of chunk `c` (rows `h` of h2, `dy` of dL/d(out), what the forward kept of
    /// it): returns dL/dh.
    #[allow(clippy::too_many_arguments)]
    fn mlp_chunk_backward(
        &self,
        layer: usize,
        dy: &B::Tensor,
        h: &B::Tensor,
        kept: MlpChunk<B>,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
        c: usize,
    ) -> Result<B::Tensor> {
        use TargetModule::*;
        let be = &self.backend;
        let MlpChunk {
            products,
            xa: [xg, xu, xd],
        } = kept;
        let ((g, u), [xg, xu]) = match products {
            // Their adapter inputs computed here where the forward did not keep them.
            Some(gu) => (
                gu,
                [
                    self.adapter_input(layer, Gate, h, Some(ad), c, xg)?,
                    self.adapter_input(layer, Up, h, Some(ad), c, xu)?,
                ],
            ),
            None => self.gate_up(layer, h, Some(ad), c, [xg, xu])?,
        };
        // Down's input m = act(g)·u is read only by its adapter's gradients, which come after
        // dm: the gated activation's backward writes m as it reads g and u.
        let (dm, pending) = self.project_input_gradient(layer, Down, dy, ad, grads, None, c)?;
        // The previous chunk's adapter gradients ran beside the products so far; what they
        // held is freed before this chunk's gradients are made.
        be.join_adapter_gradients()?;
        let (act, room) = (self.cfg.activation, Self::room(Some(ad)));
        // dg, du and m may take the memory of g, u and dm.
        let (dg, du, m) =
            be.gated_activation_backward_in_place(dm, g, u, act, room, pending.is_some())?;
        if let (Some(pending), Some(m)) = (pending, m) {
            let xd = self.adapter_input(layer, Down, &m, Some(ad), c, xd)?;
            self.add_adapter_gradients(layer, Down, dy, pending, &m, xd, ad, grads, c)?;
            be.drop_after_adapter_gradients(m);
        }
        // Each projection's adapter gradients run beside the next one's input gradient.
        let dh = self.project_backward(layer, Gate, &dg, h, xg, ad, grads, None, c)?;
        be.drop_after_adapter_gradients(dg);
        let dh = self.project_backward(layer, Up, &du, h, xu, ad, grads, Some(dh), c)?;
        be.drop_after_adapter_gradients(du);
        Ok(dh)
    }

    /// One layer backward: takes dL/d(out), the layer input and its cache, returns dL/dx. Each
    /// cached value and gradient is dropped as soon as it is used up (the peak memory of a long
    /// sequence is set here). `before_attention` runs once the backward of the MLP half and of
    /// o is queued, before the attention's own backward.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        layer: usize,
        d_out: B::Tensor,
        x: &B::Tensor,
        c: LayerCache<B>,
        batch: &DeviceBatch<B>,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
        before_attention: impl FnOnce() -> Result<()>,
    ) -> Result<B::Tensor> {
        use TargetModule::*;
        let be = &self.backend;
        let cfg = &self.cfg;
        let lw = &self.weights.layers[layer];
        let LayerCache {
            attention:
                AttentionHalf {
                    h1,
                    r1,
                    xa: [xq, xk, xv],
                    qk_raw,
                    q,
                    k,
                    v,
                    attn,
                    lse,
                },
            residual: ResidualHalf { xo, x1, h2, r2 },
            mlp,
        } = c;
        // out = x1 + mlp(h2), h2 = norm(x1): dx1 = d_out + the norm's input gradient (added
        // into d_out's values).
        let dx1 = self.mlp_half_backward(layer, d_out, &x1, &r2, h2, mlp, ad, grads)?;
        drop((x1, r2));
        // x1 = x + o(attn), `attn` the product input the forward made (`attention_half`).
        let dattn = self.project_backward(layer, O, &dx1, &attn, xo, ad, grads, None, 0)?;
        before_attention()?;
        // o's adapter gradients read `attn`, which the attention's backward frees.
        be.join_adapter_gradients()?;
        let shape = self.attention_shape(batch);
        let (segments, pos, inv, hd) = (
            &batch.segments,
            &batch.positions,
            &self.inv_freq,
            cfg.head_dim,
        );
        let room = Self::room(Some(ad));
        // The rotation's backward (by −θ), then (qwen3) the per-head norms', then product inputs.
        let [dq, dk, dv] = match (qk_raw, &lw.q_norm, &lw.k_norm) {
            (Some(raw), Some(qn), Some(kn)) => {
                let (mut dq, mut dk, dv) =
                    be.attention_backward(&q, &k, &v, attn, &lse, dattn, segments, shape)?;
                drop((q, k, v, lse));
                be.rope(&mut dq, pos, inv, hd, true)?;
                be.rope(&mut dk, pos, inv, hd, true)?;
                let dq = self.head_norm_backward(dq, &raw.q, qn, &raw.rq)?;
                let dk = self.head_norm_backward(dk, &raw.k, kn, &raw.rk)?;
                let input = |t| be.product_input(t, room);
                [input(dq)?, input(dk)?, input(dv)?]
            }
            _ => {
                let grads = be.attention_backward_for_products(
                    &q, &k, &v, attn, &lse, dattn, segments, shape, pos, inv, room,
                )?;
                drop((q, k, v, lse));
                grads
            }
        };
        let dh1 = self.project_backward(layer, Q, &dq, &h1, xq, ad, grads, None, 0)?;
        be.drop_after_adapter_gradients(dq);
        let dh1 = self.project_backward(layer, K, &dk, &h1, xk, ad, grads, Some(dh1), 0)?;
        be.drop_after_adapter_gradients(dk);
        let dh1 = self.project_backward(layer, V, &dv, &h1, xv, ad, grads, Some(dh1), 0)?;
        be.drop_after_adapter_gradients(dv);
        be.drop_after_adapter_gradients(h1);
        // x1 = x + attention(norm(x)): dx = dx1 + the norm's input gradient.
        be.rmsnorm_backward(&dh1, x, &lw.attn_norm, &r1, cfg.norm_unit_offset, Some(dx1))
    }

    /// q and k rotated at the batch's positions, and q, k, v made ready for attention and its
    /// backward ([`Backend::rotated_attention_inputs`]).
    fn rotated_attention_inputs(
        &self,
        q: B::Tensor,
        k: B::Tensor,
        v: B::Tensor,
        batch: &DeviceBatch<B>,
    ) -> Result<[B::Tensor; 3]> {
        let s = self.attention_shape(batch);
        let be = &self.backend;
        be.rotated_attention_inputs(q, k, v, s, &batch.positions, &self.inv_freq)
    }

    /// Attention of a batch's rows among themselves (training, evaluation), q and k rotated and
    /// its inputs made ready for it and its backward; its output a product input with `room`
    /// (o's, [`Self::room`]).
    fn batch_attention<'a>(
        &'a self,
        batch: &'a DeviceBatch<B>,
        room: usize,
    ) -> impl FnOnce(B::Tensor, B::Tensor, B::Tensor) -> Result<Attended<B>> + 'a {
        move |q, k, v| {
            let be = &self.backend;
            let s = self.attention_shape(batch);
            let [q, k, v] = self.rotated_attention_inputs(q, k, v, batch)?;
            let (out, lse) = be.attention_for_products(&q, &k, &v, &batch.segments, s, room)?;
            Ok(Attended { q, k, v, out, lse })
        }
    }

    /// An empty KV cache for [`Decoder::forward_cached`].
    pub fn new_cache(&self) -> Result<KvCache<B>> {
        let width = self.cfg.num_kv_heads * self.cfg.head_dim;
        let empty = || self.backend.zeros(0, width);
        Ok(KvCache {
            k: (0..self.cfg.num_layers)
                .map(|_| empty())
                .collect::<Result<_>>()?,
            v: (0..self.cfg.num_layers)
                .map(|_| empty())
                .collect::<Result<_>>()?,
            len: 0,
        })
    }

    /// Runs `ids` (one sequence) after the tokens already in `cache`, appending their keys and
    /// values to it, and returns the logits of the last new token `[1, vocab]`.
    pub fn forward_cached(
        &self,
        ids: &[i32],
        cache: &mut KvCache<B>,
        ad: Option<&Adapters<B>>,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let cfg = &self.cfg;
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no token to run".into()));
        }
        let start = cache.len as i32;
        let positions = be.upload_ints(&(start..start + ids.len() as i32).collect::<Vec<_>>())?;
        let batch = DeviceBatch {
            batch: 1,
            seq: ids.len(),
            ids: be.upload_ints(ids)?,
            labels: be.upload_ints(&vec![crate::backend::IGNORE_LABEL; ids.len()])?,
            positions,
            segments: be.upload_ints(&vec![0; ids.len()])?,
            labelled: 0,
        };
        let heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let n = cfg.num_layers;
        let mut layer_copies = LayerCopies::new(be, &self.weights);
        let mut x = self.embed(&batch)?;
        for layer in 0..n {
            layer_copies.before(layer..n)?;
            let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
            x = self
                .layer_forward(
                    layer,
                    &x,
                    ad,
                    |mut q, mut k, v| {
                        let (pos, inv) = (&batch.positions, &self.inv_freq);
                        be.rope(&mut q, pos, inv, cfg.head_dim, false)?;
                        be.rope(&mut k, pos, inv, cfg.head_dim, false)?;
                        be.append_rows(kc, &k)?;
                        be.append_rows(vc, &v)?;
                        let (out, lse) = be.attention_decode(&q, kc, vc, heads)?;
                        Ok(Attended { q, k, v, out, lse })
                    },
                    false,
                )?
                .0;
            layer_copies.after(layer);
        }
        cache.len += ids.len();
        let (rows, d) = be.shape(&x);
        let last = be.upload(&be.download(&x)?[(rows - 1) * d..], 1, d)?;
        let (h, _) = be.rmsnorm(
            &last,
            &self.weights.final_norm,
            cfg.rms_norm_eps,
            cfg.norm_unit_offset,
        )?;
        let w = self.weights.output_projection();
        let mut z = be.zeros(1, be.shape(w).0)?;
        be.matmul(&h, false, w, true, 1.0, &mut z, false)?;
        Ok(z)
    }

    fn embed(&self, batch: &DeviceBatch<B>) -> Result<B::Tensor> {
        let scale = if self.cfg.scale_embeddings {
            (self.cfg.hidden_size as f32).sqrt()
        } else {
            1.0
        };
        self.backend
            .embedding(&self.weights.embedding, &batch.ids, scale)
    }

    /// Final hidden states after the last norm, `[tokens, hidden]` (no LM head).
    pub fn hidden_states(
        &self,
        batch: &DeviceBatch<B>,
        ad: Option<&Adapters<B>>,
    ) -> Result<B::Tensor> {
        let n = self.cfg.num_layers;
        let mut layer_copies = LayerCopies::new(&self.backend, &self.weights);
        let mut x = self.embed(batch)?;
        for layer in 0..n {
            layer_copies.before(layer..n)?;
            let attend = self.batch_attention(batch, Self::room(ad));
            x = self.layer_forward(layer, &x, ad, attend, false)?.0;
            layer_copies.after(layer);
        }
        let (h, _) = self.backend.rmsnorm(
            &x,
            &self.weights.final_norm,
            self.cfg.rms_norm_eps,
            self.cfg.norm_unit_offset,
        )?;
        Ok(h)
    }

    /// Logits `[tokens, vocab]` of every row (for inference and tests; training never builds them).
    pub fn logits(&self, batch: &DeviceBatch<B>, ad: Option<&Adapters<B>>) -> Result<B::Tensor> {
        let be = &self.backend;
        let h = self.hidden_states(batch, ad)?;
        let w = self.weights.output_projection();
        let mut z = be.zeros(be.shape(&h).0, be.shape(w).0)?;
        be.matmul(&h, false, w, true, 1.0, &mut z, false)?;
        Ok(z)
    }

    /// The final norm, LM head and loss of the last layer's output `last`: writes each row's loss
    /// and returns dL/d(last) (see [`LossOutput`]), every other value freed before the layers'
    /// backward starts. `head_copy` is the output projection's device copy (or the chunks of it
    /// on their way) when it lives in host memory ([`Backend::bring_to_device`]), released after
    /// the loss.
    fn head_forward_backward(
        &self,
        last: B::Tensor,
        batch: &DeviceBatch<B>,
        loss: &mut LossOutput<B>,
        head_copy: Option<DeviceCopy<'_, B>>,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let (eps, offset) = (self.cfg.rms_norm_eps, self.cfg.norm_unit_offset);
        let norm = &self.weights.final_norm;
        let (h, r) = be.rmsnorm(&last, norm, eps, offset)?;
        // Rounded once for the head's products (half the bytes while the logits are live).
        let h = be.product_input(h, 0)?;
        let head = self.weights.output_projection();
        let dh = be.lm_head_cross_entropy(&h, head, &batch.labels, loss.scale, loss.row_loss)?;
        drop((h, head_copy));
        be.rmsnorm_backward(&dh, &last, norm, &r, offset, None)
    }

    /// Forward and backward of one micro-batch. Adds the LoRA gradients of
    /// `scale · Σ_labelled CE` into `grads` and writes each row's cross-entropy (see
    /// [`LossOutput`]); nothing is read back, so the whole pass can be recorded
    /// ([`Backend::record`]).
    /// `saving` says what the forward pass keeps for the backward pass.
    /// `layer_done(layer, grads)` runs once the backward of `layer` has queued its last write to
    /// `grads` (last layer first), so a data-parallel sum of that layer's gradients can start
    /// while the earlier layers' backward goes on.
    pub fn forward_backward(
        &self,
        batch: &DeviceBatch<B>,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
        loss: &mut LossOutput<B>,
        saving: Saving,
        layer_done: &mut dyn FnMut(usize, &mut LoraTensors<B>) -> Result<()>,
    ) -> Result<()> {
        let queued = self.queue_pass(batch, ad, grads, loss, saving, layer_done);
        // A pass that failed may leave adapter gradients in flight: later work (the next
        // step's zeroed gradients) waits for them.
        let joined = self.backend.join_adapter_gradients();
        queued.and(joined)
    }

    /// [`Self::forward_backward`]'s work.
    fn queue_pass(
        &self,
        batch: &DeviceBatch<B>,
        ad: &Adapters<B>,
        grads: &mut LoraTensors<B>,
        loss: &mut LossOutput<B>,
        saving: Saving,
        layer_done: &mut dyn FnMut(usize, &mut LoraTensors<B>) -> Result<()>,
    ) -> Result<()> {
        let be = &self.backend;
        let _held = FactorsHeld::new(be);
        let rounded = ad.tensors.rounded_for_products(be)?;
        let with_rounded = rounded.as_ref().map(|r| ad.with_rounded(r));
        let ad = with_rounded.as_ref().unwrap_or(ad);
        let cfg = &self.cfg;
        let n = cfg.num_layers;
        let mut inputs = Vec::with_capacity(n);
        let mut caches = Vec::with_capacity(if saving.recompute { 0 } else { n });
        let mut checkpoints = Vec::with_capacity(if saving.recompute { n } else { 0 });
        // An output projection kept in host memory starts coming over with the last quarter
        // of the layers' forward pass (on its own copy stream, beside the copies out of `stash`):
        // on CUDA its first chunks of rows (backend/cuda/head_chunks.rs), whose copies then
        // overlap those layers' compute, and the loss brings the rest as it reads the vocabulary
        // chunk by chunk. Layers kept in host memory come over ahead of their forward and
        // backward (host_layers.rs), not beside the head's copy: it starts after the last of
        // them has run, or with the last layer when that one is kept in host memory.
        let after_host_layers = self.weights.layers.iter().rposition(|l| l.in_host);
        let head_copy_from = after_host_layers
            .map_or(0, |l| l + 1)
            .max(n - n.div_ceil(4))
            .min(n.saturating_sub(1));
        let mut head_copy = None;
        let mut layer_copies = LayerCopies::new(be, &self.weights);
        be.mark(PassPoint::Start)?;
        let mut x = self.embed(batch)?;
        for layer in 0..n {
            be.mark(PassPoint::Forward(layer))?;
            if layer == head_copy_from {
                head_copy = Some(DeviceCopy::bring(be, self.weights.output_projection())?);
            }
            layer_copies.before(layer..n)?;
            // The last layer's input and attention output stay on the device: its backward comes
            // first, right after the head (a copy out and back would only make it wait).
            let stays = layer + 1 == n;
            let attend = self.batch_attention(batch, Self::room(Some(ad)));
            // `input`: the layer's input as kept, stashed already where `stashed` says so.
            let (out, input, stashed) = if saving.recompute {
                // q, k and v are kept only where they go to host memory, and where the
                // recomputation needs nothing else of their products (their adapter inputs
                // kept, no per-head norm).
                let keep_inputs = saving.offload_attention
                    && saving.offload_attention_inputs
                    && saving.keep_adapter_inputs
                    && !stays
                    && self.weights.layers[layer].q_norm.is_none();
                let CheckpointedHalves {
                    xa,
                    attn,
                    lse,
                    inputs,
                    x1,
                    h2,
                } = self.checkpointed_layer_forward(layer, &x, ad, attend, keep_inputs)?;
                // Stashed before the MLP is queued, so that their copies run beside the MLP:
                // the next stash makes the compute stream wait for them.
                let (attention, input, stashed) = match (saving.offload_attention, inputs) {
                    (true, Some([q, k, v])) => {
                        // x and x1 as the norms read them: nothing else reads them again (the
                        // f32 x is freed here, before the MLP).
                        let x1_kept = self.kept_for_norms(&x1)?;
                        let x_kept = be.norm_input(&x)?.unwrap_or(x);
                        let stashed = be.stash_all([attn, q, k, v, x1_kept, x_kept])?;
                        let [out, q, k, v, x1, x_kept] = stashed;
                        let inputs = Some(KeptInputs { q, k, v, x1 });
                        (Some(KeptAttention { out, lse, inputs }), x_kept, true)
                    }
                    (true, None) => {
                        let out = if stays { attn } else { be.stash(attn)? };
                        let kept = KeptAttention {
                            out,
                            lse,
                            inputs: None,
                        };
                        (Some(kept), x, false)
                    }
                    (false, _) => (None, x, false),
                };
                // x1 is not needed again: the MLP's output is added into it.
                let keep_mlp = layer + saving.kept_mlp_layers >= n;
                let (out, mut mlp) = self.mlp_forward(layer, x1, &h2, Some(ad), keep_mlp)?;
                let adapter_inputs = match saving.keep_adapter_inputs {
                    true => xa,
                    false => {
                        mlp.iter_mut()
                            .for_each(|chunk| chunk.xa = Default::default());
                        Default::default()
                    }
                };
                checkpoints.push(Checkpoint {
                    adapter_inputs,
                    mlp,
                    attention,
                });
                (out, input, stashed)
            } else {
                let (out, cache) = self.layer_forward(layer, &x, Some(ad), attend, true)?;
                caches.push(cache);
                (out, x, false)
            };
            layer_copies.after(layer);
            inputs.push(if !stashed && saving.offload_inputs && !stays {
                be.stash(input)?
            } else {
                input
            });
            x = out;
        }
        be.mark(PassPoint::Loss)?;
        let mut dx = self.head_forward_backward(x, batch, loss, head_copy)?;
        // In shares: the backward's fetches of offloaded activations (on another copy stream)
        // then wait behind one share of a host layer's copy at most, not the whole layer.
        layer_copies = LayerCopies::paced(be, &self.weights);
        // Each layer's kept attention output comes back from host memory, when offloaded, while
        // the layer after it runs its backward; its input while that layer runs the backward of
        // its attention and of q, k and v: not sooner, so that the moments of a long sequence's
        // peak (the MLP half's backward, o's backward) do not hold it.
        let fetch = |t: B::Tensor| be.fetch_stashed(t);
        let mut next = inputs.pop().map(fetch).transpose()?;
        let mut next_kept = checkpoints.pop().map(|c| c.fetch(be)).transpose()?;
        for layer in (0..n).rev() {
            be.mark(PassPoint::Backward(layer))?;
            layer_copies.before((0..=layer).rev())?;
            let x = be.settle(next.take().expect("one input per layer"))?;
            let kept = next_kept.take();
            next_kept = checkpoints.pop().map(|c| c.fetch(be)).transpose()?;
            let fetch_next_input = || -> Result<()> {
                next = inputs.pop().map(fetch).transpose()?;
                Ok(())
            };
            let cache = match caches.pop() {
                Some(c) => c,
                None => {
                    let kept = kept.expect("one per layer");
                    let mut c = match kept.attention {
                        Some(KeptAttention {
                            out,
                            lse,
                            inputs: Some(KeptInputs { q, k, v, x1 }),
                        }) => {
                            let attended = Attended {
                                q: be.settle(q)?,
                                k: be.settle(k)?,
                                v: be.settle(v)?,
                                out: be.settle(out)?,
                                lse,
                            };
                            let x1 = be.settle(x1)?;
                            let kept_inputs = kept.adapter_inputs;
                            self.layer_cache_from_kept_attention(
                                layer,
                                &x,
                                x1,
                                ad,
                                attended,
                                kept_inputs,
                            )?
                        }
                        kept_attention => {
                            let attend = |q, k, v| match kept_attention {
                                Some(KeptAttention { out, lse, .. }) => {
                                    let [q, k, v] =
                                        self.rotated_attention_inputs(q, k, v, batch)?;
                                    let out = be.settle(out)?;
                                    Ok(Attended { q, k, v, out, lse })
                                }
                                None => self.batch_attention(batch, Self::room(Some(ad)))(q, k, v),
                            };
                            self.layer_cache(layer, &x, Some(ad), attend, kept.adapter_inputs)?
                        }
                    };
                    c.mlp = kept.mlp;
                    c
                }
            };
            dx = self.layer_backward(layer, dx, &x, cache, batch, ad, grads, fetch_next_input)?;
            layer_copies.after(layer);
            // The layer's adapter gradients complete before anything reads them.
            be.join_adapter_gradients()?;
            layer_done(layer, grads)?;
        }
        be.mark(PassPoint::End)
    }
}

#[cfg(test)]
mod tests {
    use super::{mlp_chunk_ranges, mlp_chunk_rows_for};
    use crate::model::presets::preset;

    #[test]
    fn mlp_chunks_are_as_even_as_multiples_of_256_rows_allow() {
        let ranges = |total, max| mlp_chunk_ranges(total, max).collect::<Vec<_>>();
        let rows = |total, max| ranges(total, max).iter().map(|c| c.1).collect::<Vec<_>>();
        assert_eq!(rows(8192, 2304), [2048; 4], "gemma-7b at 8,192 tokens");
        assert_eq!(rows(8192, 3072), [2816, 2816, 2560], "qwen2.5-7b");
        assert_eq!(rows(8192, 4096), [4096, 4096], "llama3-8b");
        assert_eq!(rows(2048, 4096), [2048]);
        assert_eq!(rows(5000, 4096), [2560, 2440]);
        assert_eq!(rows(48, 24), [24, 24], "a limit below 256 rows is kept");
        assert_eq!(rows(50, 24), [24, 24, 2]);
        assert!(ranges(0, 4096).is_empty());
        for (total, max) in [(8192, 2304), (1, 256), (300, 256), (12_345, 3072), (77, 5)] {
            let r = ranges(total, max);
            // Contiguous, within the limit, covering every row, and no more chunks than needed.
            assert!(r.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            assert!(r.iter().all(|c| c.1 >= 1 && c.1 <= max));
            assert_eq!(r.iter().map(|c| c.1).sum::<usize>(), total);
            assert_eq!(r.len(), total.div_ceil(max));
        }
    }

    #[test]
    fn mlp_chunks_hold_about_the_same_values_for_every_family() {
        let rows = |name: &str| mlp_chunk_rows_for(preset(name).unwrap().intermediate_size);
        assert_eq!(rows("llama3-8b"), 4096);
        assert_eq!(rows("mistral-7b"), 4096);
        assert_eq!(rows("qwen2.5-7b"), 3072);
        assert_eq!(rows("gemma-7b"), 2304);
        assert_eq!(mlp_chunk_rows_for(usize::MAX), 256);
        assert_eq!(mlp_chunk_rows_for(0) % 256, 0);
    }
}
