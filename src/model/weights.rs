//! The frozen base weights of a decoder, their Hugging Face names, and where they come from.

use super::config::ModelConfig;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::lora::TargetModule;
use crate::quant::{Nf4Tensor, Quantization};
use crate::rng::{derive, fill_normal};

/// Where one base tensor lives inside [`DecoderWeights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Embedding,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    MlpNorm(usize),
    QNorm(usize),
    KNorm(usize),
    Proj(usize, TargetModule),
    Bias(usize, TargetModule),
}

/// A tensor of the checkpoint: its Hugging Face name, its shape as a matrix, and its slot.
/// Vectors (norm weights, biases) are `[1, n]` here and 1-D in the file.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub slot: Slot,
}

impl TensorSpec {
    /// The shape as stored in a safetensors file.
    pub fn file_shape(&self) -> Vec<usize> {
        if self.rows == 1 && !matches!(self.slot, Slot::Proj(..) | Slot::Embedding | Slot::LmHead) {
            vec![self.cols]
        } else {
            vec![self.rows, self.cols]
        }
    }
}

/// Every tensor a model of this configuration has, in checkpoint order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let spec = |name: String, rows, cols, slot| TensorSpec {
        name,
        rows,
        cols,
        slot,
    };
    let d = cfg.hidden_size;
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        cfg.vocab_size,
        d,
        Slot::Embedding,
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        out.push(spec(
            format!("{p}.input_layernorm.weight"),
            1,
            d,
            Slot::AttnNorm(l),
        ));
        for m in TargetModule::ALL {
            let (o, i) = (cfg.out_features(m), cfg.in_features(m));
            out.push(spec(
                format!("{p}.{}.weight", m.hf_path()),
                o,
                i,
                Slot::Proj(l, m),
            ));
            if cfg.qkv_bias && matches!(m, TargetModule::Q | TargetModule::K | TargetModule::V) {
                out.push(spec(
                    format!("{p}.{}.bias", m.hf_path()),
                    1,
                    o,
                    Slot::Bias(l, m),
                ));
            }
        }
        if cfg.qk_norm {
            out.push(spec(
                format!("{p}.self_attn.q_norm.weight"),
                1,
                cfg.head_dim,
                Slot::QNorm(l),
            ));
            out.push(spec(
                format!("{p}.self_attn.k_norm.weight"),
                1,
                cfg.head_dim,
                Slot::KNorm(l),
            ));
        }
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            1,
            d,
            Slot::MlpNorm(l),
        ));
    }
    out.push(spec("model.norm.weight".into(), 1, d, Slot::FinalNorm));
    if !cfg.tie_word_embeddings {
        out.push(spec(
            "lm_head.weight".into(),
            cfg.vocab_size,
            d,
            Slot::LmHead,
        ));
    }
    out
}

/// The values of one base tensor as a source provides them.
#[derive(Debug, Clone)]
pub enum TensorValues {
    /// Row-major f32 values.
    F32(Vec<f32>),
    /// An NF4 matrix as a bitsandbytes-4bit checkpoint stores it.
    Nf4(Nf4Tensor),
}

/// The weights of one decoder layer.
pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Tensor,
    pub mlp_norm: B::Tensor,
    /// Indexed by `TargetModule as usize`: `[out, in]`.
    pub proj: Vec<B::Tensor>,
    /// q/k/v biases (qwen2), indexed like `proj`.
    pub bias: Vec<Option<B::Tensor>>,
    pub q_norm: Option<B::Tensor>,
    pub k_norm: Option<B::Tensor>,
    /// `proj` is kept in host memory ([`Backend::upload_frozen_in_host`]; host_layers.rs).
    pub in_host: bool,
}

/// How the frozen weights are stored (checked by [`FrozenStorage::new`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrozenStorage {
    /// The projection matrices' format.
    quantization: Quantization,
    /// Layers whose projection matrices stay in host memory
    /// ([`host_layer_indices`](super::host_layers::host_layer_indices)): bf16 matrices whole,
    /// NF4 ones their codes ([`Backend::keep_codes_in_host`]).
    host_layers: Vec<usize>,
}

impl FrozenStorage {
    /// `quantization`, with `layers_in_host` of the `cfg`'s layers in host memory.
    pub fn new(
        cfg: &ModelConfig,
        quantization: Quantization,
        layers_in_host: usize,
    ) -> Result<Self> {
        Ok(FrozenStorage {
            quantization,
            host_layers: super::host_layers::host_layer_indices(cfg.num_layers, layers_in_host)?,
        })
    }
}

/// All frozen weights of a decoder.
pub struct DecoderWeights<B: Backend> {
    pub embedding: B::Tensor,
    pub layers: Vec<LayerWeights<B>>,
    pub final_norm: B::Tensor,
    /// `None` when tied to the embedding.
    pub lm_head: Option<B::Tensor>,
}

impl<B: Backend> DecoderWeights<B> {
    /// Builds the weights by asking `fetch` for each tensor of [`tensor_specs`] (as f32, row-major),
    /// with the projection matrices in the backend's own frozen format.
    pub fn load(
        cfg: &ModelConfig,
        backend: &B,
        mut fetch: impl FnMut(&TensorSpec) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        Self::load_with(cfg, backend, Quantization::None, |spec| {
            fetch(spec).map(TensorValues::F32)
        })
    }

    /// Builds the weights by asking `fetch` for each tensor of [`tensor_specs`]. The projection
    /// matrices are stored as `quantization` says: with [`Quantization::Nf4`], f32 values are
    /// quantized at upload and NF4 values kept as they are; with [`Quantization::None`], NF4
    /// values are dequantized first. Other tensors are never quantized (NF4 values for them are
    /// dequantized).
    pub fn load_with(
        cfg: &ModelConfig,
        backend: &B,
        quantization: Quantization,
        fetch: impl FnMut(&TensorSpec) -> Result<TensorValues>,
    ) -> Result<Self> {
        let storage = FrozenStorage {
            quantization,
            ..FrozenStorage::default()
        };
        let mut sets = Self::load_replicas(cfg, &[backend], &storage, fetch)?;
        Ok(sets.pop().expect("one set per backend"))
    }

    /// As [`DecoderWeights::load_with`], stored as `storage` says, onto each of `backends`
    /// (data-parallel replicas): every tensor is fetched once and uploaded to each backend in
    /// turn.
    pub fn load_replicas(
        cfg: &ModelConfig,
        backends: &[&B],
        storage: &FrozenStorage,
        mut fetch: impl FnMut(&TensorSpec) -> Result<TensorValues>,
    ) -> Result<Vec<Self>> {
        let mut sets: Vec<PartialWeights<B>> =
            backends.iter().map(|_| PartialWeights::new(cfg)).collect();
        for spec in tensor_specs(cfg) {
            let values = fetch(&spec)?;
            if let TensorValues::Nf4(q) = &values {
                if q.shape() != [spec.rows, spec.cols] {
                    return Err(Error::InvalidArgument(format!(
                        "tensor {:?}: the NF4 matrix is {:?}, the model needs [{}, {}]",
                        spec.name,
                        q.shape(),
                        spec.rows,
                        spec.cols
                    )));
                }
            }
            for (backend, set) in backends.iter().zip(&mut sets) {
                let t = upload_tensor(cfg, *backend, &spec, &values, storage)
                    .map_err(|e| in_tensor(&spec.name, e))?;
                set.place(spec.slot, t);
            }
        }
        Ok(sets
            .into_iter()
            .map(|set| set.finish(&storage.host_layers))
            .collect())
    }

    /// Random weights (for tests, benchmarks and demos); see [`random_weights`].
    pub fn random(cfg: &ModelConfig, backend: &B, seed: u64) -> Result<Self> {
        let mut source = random_weights(cfg, seed);
        Self::load(cfg, backend, |spec| Ok(source(spec)))
    }

    /// The tensor in `slot`, if the model has it.
    pub fn get(&self, slot: Slot) -> Option<&B::Tensor> {
        match slot {
            Slot::Embedding => Some(&self.embedding),
            Slot::FinalNorm => Some(&self.final_norm),
            Slot::LmHead => self.lm_head.as_ref(),
            Slot::AttnNorm(l) => self.layers.get(l).map(|x| &x.attn_norm),
            Slot::MlpNorm(l) => self.layers.get(l).map(|x| &x.mlp_norm),
            Slot::QNorm(l) => self.layers.get(l).and_then(|x| x.q_norm.as_ref()),
            Slot::KNorm(l) => self.layers.get(l).and_then(|x| x.k_norm.as_ref()),
            Slot::Proj(l, m) => self.layers.get(l).map(|x| &x.proj[m as usize]),
            Slot::Bias(l, m) => self.layers.get(l).and_then(|x| x.bias[m as usize].as_ref()),
        }
    }

    /// The output projection: the LM head, or the embedding when tied.
    pub fn output_projection(&self) -> &B::Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }
}

/// `e` with the name of the tensor it concerns (argument errors only: device errors already say
/// what they were doing).
fn in_tensor(name: &str, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("tensor {name:?}: {m}")),
        other => other,
    }
}

/// Stores one fetched tensor on `backend` in the form its slot and `storage` call for.
fn upload_tensor<B: Backend>(
    cfg: &ModelConfig,
    backend: &B,
    spec: &TensorSpec,
    values: &TensorValues,
    storage: &FrozenStorage,
) -> Result<B::Tensor> {
    let nf4 = storage.quantization == Quantization::Nf4 && matches!(spec.slot, Slot::Proj(..));
    let in_host = matches!(spec.slot, Slot::Proj(l, _) if storage.host_layers.contains(&l));
    let (rows, cols) = (spec.rows, spec.cols);
    let upload = |values: &[f32]| match spec.slot {
        // Untied, the embedding table is read only by the lookup.
        Slot::Embedding if !cfg.tie_word_embeddings => {
            backend.upload_lookup_table(values, rows, cols)
        }
        Slot::Embedding | Slot::LmHead => backend.upload_output_projection(values, rows, cols),
        Slot::Proj(..) if in_host => backend.upload_frozen_in_host(values, rows, cols),
        Slot::Proj(..) => backend.upload_projection(values, rows, cols),
        _ => backend.upload(values, rows, cols),
    };
    let quantized = match values {
        TensorValues::Nf4(q) if nf4 => backend.upload_nf4(q.clone())?,
        TensorValues::Nf4(q) => return upload(&q.dequantize()),
        TensorValues::F32(values) if nf4 => backend.upload_frozen_nf4(values, rows, cols)?,
        TensorValues::F32(values) => return upload(values),
    };
    match in_host {
        true => backend.keep_codes_in_host(quantized),
        false => Ok(quantized),
    }
}

/// The tensors of a [`DecoderWeights`] as they arrive.
struct PartialWeights<B: Backend> {
    embedding: Option<B::Tensor>,
    final_norm: Option<B::Tensor>,
    lm_head: Option<B::Tensor>,
    layers: Vec<PartialLayer<B>>,
}

impl<B: Backend> PartialWeights<B> {
    fn new(cfg: &ModelConfig) -> Self {
        PartialWeights {
            embedding: None,
            final_norm: None,
            lm_head: None,
            layers: (0..cfg.num_layers)
                .map(|_| PartialLayer::default())
                .collect(),
        }
    }

    fn place(&mut self, slot: Slot, t: B::Tensor) {
        let layers = &mut self.layers;
        match slot {
            Slot::Embedding => self.embedding = Some(t),
            Slot::FinalNorm => self.final_norm = Some(t),
            Slot::LmHead => self.lm_head = Some(t),
            Slot::AttnNorm(l) => layers[l].attn_norm = Some(t),
            Slot::MlpNorm(l) => layers[l].mlp_norm = Some(t),
            Slot::QNorm(l) => layers[l].q_norm = Some(t),
            Slot::KNorm(l) => layers[l].k_norm = Some(t),
            Slot::Proj(l, m) => layers[l].proj[m as usize] = Some(t),
            Slot::Bias(l, m) => layers[l].bias[m as usize] = Some(t),
        }
    }

    fn finish(self, host_layers: &[usize]) -> DecoderWeights<B> {
        let complete = "tensor_specs lists every slot";
        DecoderWeights {
            embedding: self.embedding.expect(complete),
            final_norm: self.final_norm.expect(complete),
            lm_head: self.lm_head,
            layers: self
                .layers
                .into_iter()
                .enumerate()
                .map(|(l, p)| LayerWeights {
                    attn_norm: p.attn_norm.expect(complete),
                    mlp_norm: p.mlp_norm.expect(complete),
                    proj: p.proj.into_iter().map(|t| t.expect(complete)).collect(),
                    bias: p.bias,
                    q_norm: p.q_norm,
                    k_norm: p.k_norm,
                    in_host: host_layers.contains(&l),
                })
                .collect(),
        }
    }
}

struct PartialLayer<B: Backend> {
    attn_norm: Option<B::Tensor>,
    mlp_norm: Option<B::Tensor>,
    proj: Vec<Option<B::Tensor>>,
    bias: Vec<Option<B::Tensor>>,
    q_norm: Option<B::Tensor>,
    k_norm: Option<B::Tensor>,
}

impl<B: Backend> Default for PartialLayer<B> {
    fn default() -> Self {
        PartialLayer {
            attn_norm: None,
            mlp_norm: None,
            proj: (0..7).map(|_| None).collect(),
            bias: (0..7).map(|_| None).collect(),
            q_norm: None,
            k_norm: None,
        }
    }
}

/// Random values for the tensors of [`tensor_specs`], asked for in that order: embeddings
/// N(0, 1), matrices N(0, 1/in) so activations keep their scale through the layers, norm weights
/// near their identity value, biases N(0, 0.02²).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> impl FnMut(&TensorSpec) -> Vec<f32> {
    let unit_offset = cfg.norm_unit_offset;
    let mut tensor = 0u64;
    move |spec| {
        let stream = derive(seed, &[tensor]);
        tensor += 1;
        let n = spec.rows * spec.cols;
        let is_norm = matches!(
            spec.slot,
            Slot::AttnNorm(_)
                | Slot::MlpNorm(_)
                | Slot::QNorm(_)
                | Slot::KNorm(_)
                | Slot::FinalNorm
        );
        let identity = if is_norm && !unit_offset { 1.0 } else { 0.0 };
        let std = match spec.slot {
            _ if is_norm => 0.1,
            Slot::Embedding => 1.0,
            Slot::Bias(..) => 0.02,
            _ => 1.0 / (spec.cols as f32).sqrt(),
        };
        let mut values = vec![0.0; n];
        fill_normal(stream, &mut values, |z| identity + std * z);
        values
    }
}
