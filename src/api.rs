//! The Rust API that the C ABI wraps: a [`Model`] loaded once (frozen, shareable between threads)
//! and [`Trainer`]s that attach LoRA adapters to it.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::nccl::{self, NcclRank, UNIQUE_ID_BYTES};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, DeviceMemory};
use crate::data::encode::TextCodec;
use crate::error::{Error, Result};
use crate::io::gguf::lora::{read_lora_adapter, write_lora_adapter};
use crate::io::gguf::model::GgufModel;
use crate::io::gguf::{export::write_model, is_gguf, GgmlType, MetaValue};
use crate::io::model_dir::{read_config_json, WeightSource};
use crate::io::peft::{load_peft_adapter, save_peft_adapter, AdapterModule, PeftAdapterConfig};
use crate::io::safetensors::{write_safetensors, Dtype};
use crate::lora::{LoraConfig, TargetModule};
use crate::model::adapters::{LoraPair, LoraTensors};
use crate::model::config::ModelConfig;
use crate::model::decoder::{Decoder, KvCache};
use crate::model::weights::{
    random_weights, tensor_specs, DecoderWeights, FrozenStorage, Slot, TensorSpec, TensorValues,
};
use crate::quant::Quantization;
use crate::train::batch::Batch;
use crate::train::trainer::{StepStats, TrainConfig, Trainer as Core};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokenizers::Tokenizer;

/// Where the model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// The first CUDA GPU when one is usable (driver, NVRTC and cuBLAS found), else the CPU.
    Auto,
    Cpu,
    /// An NVIDIA GPU by index.
    Cuda(usize),
    /// Several GPUs of this process training as one data-parallel group (NCCL), by index.
    CudaSet(Vec<usize>),
    /// Every GPU of the machine as one data-parallel group.
    CudaAll,
}

impl Device {
    /// Parses "auto", "cpu", "cuda:N" ("cuda" means "cuda:0"), a comma-separated list of
    /// "cuda:N" (several GPUs, one data-parallel group) or "cuda:all".
    pub fn parse(s: &str) -> Result<Self> {
        let one_gpu = |d: &str| {
            match d.trim() {
                "cuda" => Some(0),
                d => d.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
            }
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown device {d:?} (expected auto, cpu, cuda:N, cuda:all or a list such \
                     as cuda:0,cuda:1)"
                ))
            })
        };
        match s.trim() {
            "" | "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda:all" => Ok(Device::CudaAll),
            list if list.contains(',') => {
                let gpus = list.split(',').map(one_gpu).collect::<Result<Vec<_>>>()?;
                if let Some(d) = gpus
                    .iter()
                    .find(|&&d| gpus.iter().filter(|&&e| e == d).count() > 1)
                {
                    return Err(Error::InvalidArgument(format!(
                        "device list {list:?} names cuda:{d} twice; each GPU holds one rank"
                    )));
                }
                Ok(Device::CudaSet(gpus))
            }
            other => one_gpu(other).map(Device::Cuda),
        }
    }
}

/// This process's place in a data-parallel group that spans processes or hosts: it is rank
/// `rank` of `world_size` and drives one GPU. The ranks meet by `unique_id`, made once by
/// [`nccl_unique_id`] on one of them and handed to the others by the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessGroup {
    pub rank: usize,
    pub world_size: usize,
    pub unique_id: [u8; UNIQUE_ID_BYTES],
}

/// A fresh id for a [`ProcessGroup`] (needs NCCL). The process that makes it hosts the group's
/// rendezvous and must stay alive until every rank has loaded the model.
pub fn nccl_unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    nccl::unique_id()
}

/// How long a data-parallel rank waits for the others by default: room for the first step's
/// kernel compilation on every rank.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// How to load a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    pub device: Device,
    /// CPU worker threads; 0 means one per core.
    pub threads: usize,
    /// How the frozen projection matrices are stored: [`Quantization::Nf4`] for QLoRA. A
    /// bitsandbytes-4bit checkpoint is kept in NF4 as read with `Nf4`, dequantized with `None`.
    pub quantization: Quantization,
    /// A cap on the device memory the model and its trainers hold, in MiB (0: none). An
    /// allocation past it fails with `Error::OutOfMemory`. GPU backends only.
    pub max_device_memory_mib: usize,
    /// Membership of a data-parallel group spanning processes (none: this process trains
    /// alone, or over the GPUs `device` lists).
    pub process_group: Option<ProcessGroup>,
    /// How long a data-parallel rank waits for the others (joining, each step's sums) before
    /// failing with `Error::Collective` instead of hanging.
    pub collective_timeout: Duration,
    /// Keep the LM head (or, tied, the embedding table serving as one) in pinned host memory
    /// instead of device memory (GPU only): 1 GiB less held on Llama 3. Each micro-batch's
    /// forward pass starts copying it to the device in chunks of rows beside its last quarter of
    /// layers (after the last layer kept in host memory), and the loss takes the rest chunk by
    /// chunk (~384 MiB of it ahead of the chunk being read), freeing each after use; evaluation
    /// and generation copy it whole for each product (a generated token then costs one copy of
    /// it over the bus).
    pub lm_head_in_host: bool,
    /// Decoder layers whose projection matrices stay in pinned host memory instead of device
    /// memory (GPU only; bf16 matrices whole, 421 MiB a layer on Llama 3 8B; NF4 ones their
    /// codes, ~105 MiB): spread evenly over the layers, at most all of them
    /// ([`host_layer_indices`](crate::model::host_layer_indices)). A training pass copies each
    /// to the device ahead of the layer, beside the layers before it, holding one such copy at
    /// a time (two where host layers are adjacent: the next comes over while one runs);
    /// evaluation and generation bring them the same way (generation: each host layer once a
    /// token). Adjacent bf16 host layers make a pass wait on the bus (a layer's copy takes about
    /// as long as its forward); up to (layers − 2)/2 of them are never adjacent.
    pub layers_in_host: usize,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            device: Device::Auto,
            threads: 0,
            quantization: Quantization::None,
            max_device_memory_mib: 0,
            process_group: None,
            collective_timeout: DEFAULT_COLLECTIVE_TIMEOUT,
            lm_head_in_host: false,
            layers_in_host: 0,
        }
    }
}

/// The decoder on the device it was loaded to. Every operation on it is generic over the
/// backend; [`on_engine!`] picks the instance.
#[derive(Clone)]
enum Engine {
    Cpu(Arc<Decoder<CpuBackend>>),
    Cuda(Arc<Decoder<CudaBackend>>),
}

/// Runs `$body` with `$d` bound to the engine's decoder, whichever backend it is on.
macro_rules! on_engine {
    ($engine:expr, $d:ident => $body:expr) => {
        match $engine {
            Engine::Cpu($d) => $body,
            Engine::Cuda($d) => $body,
        }
    };
}

/// Decoders with the same weights on each of `backends`, every tensor fetched once.
fn decoders<B: Backend>(
    cfg: &ModelConfig,
    backends: Vec<B>,
    storage: &FrozenStorage,
    fetch: impl FnMut(&TensorSpec) -> Result<TensorValues>,
) -> Result<Vec<Arc<Decoder<B>>>> {
    let weights =
        DecoderWeights::load_replicas(cfg, &backends.iter().collect::<Vec<_>>(), storage, fetch)?;
    Ok(backends
        .into_iter()
        .zip(weights)
        .map(|(be, w)| Arc::new(Decoder::new(cfg.clone(), be, w)))
        .collect())
}

/// The decoder on one backend.
fn decoder<B: Backend>(
    cfg: &ModelConfig,
    backend: B,
    storage: &FrozenStorage,
    fetch: impl FnMut(&TensorSpec) -> Result<TensorValues>,
) -> Result<Arc<Decoder<B>>> {
    Ok(decoders(cfg, vec![backend], storage, fetch)?.remove(0))
}

/// This process's part of a data-parallel group.
struct Ranks {
    /// Decoders on this process's other GPUs: replicas of the engine's.
    replicas: Vec<Arc<Decoder<CudaBackend>>>,
    /// One member per GPU of this process, the engine's first.
    members: Vec<Arc<NcclRank>>,
    /// The group-wide rank of `members[0]`.
    first_rank: usize,
    world_size: usize,
}

impl Engine {
    /// Opens the device(s) of `params` and builds the decoder there, asking `fetch` for each
    /// tensor once; with several GPUs (of this process or of a process group) also the
    /// data-parallel group.
    fn build(
        cfg: ModelConfig,
        params: &ModelParams,
        fetch: impl FnMut(&TensorSpec) -> Result<TensorValues>,
    ) -> Result<(Self, Option<Ranks>)> {
        let q = &FrozenStorage::new(&cfg, params.quantization, params.layers_in_host)?;
        let cuda = |n| {
            let mut be = CudaBackend::new(n)?;
            be.set_output_projection_in_host(params.lm_head_in_host);
            be.gpu()
                .memory
                .set_limit(params.max_device_memory_mib.saturating_mul(1 << 20));
            Ok::<_, Error>(be)
        };
        let gpus = match &params.device {
            Device::CudaSet(list) => list.clone(),
            Device::CudaAll => (0..CudaBackend::device_count()?).collect(),
            _ => Vec::new(),
        };
        if let Some(pg) = &params.process_group {
            let Device::Cuda(n) = params.device else {
                return Err(Error::InvalidArgument(format!(
                    "rank {} of a multi-process group drives one GPU: set the device to cuda:N \
                     (not {:?})",
                    pg.rank, params.device
                )));
            };
            let dec = decoder(&cfg, cuda(n)?, q, fetch)?;
            let member = NcclRank::join(
                &dec.backend,
                pg.rank,
                pg.world_size,
                &pg.unique_id,
                params.collective_timeout,
            )?;
            let ranks = Ranks {
                replicas: Vec::new(),
                members: vec![Arc::new(member)],
                first_rank: pg.rank,
                world_size: pg.world_size,
            };
            return Ok((Engine::Cuda(dec), Some(ranks)));
        }
        if gpus.len() > 1 {
            let backends = gpus.iter().map(|&n| cuda(n)).collect::<Result<Vec<_>>>()?;
            let members = NcclRank::group(
                &backends.iter().collect::<Vec<_>>(),
                params.collective_timeout,
            )?;
            let mut decs = decoders(&cfg, backends, q, fetch)?;
            let primary = decs.remove(0);
            let ranks = Ranks {
                replicas: decs,
                world_size: members.len(),
                members: members.into_iter().map(Arc::new).collect(),
                first_rank: 0,
            };
            return Ok((Engine::Cuda(primary), Some(ranks)));
        }
        let engine = match (&params.device, gpus.first()) {
            (Device::Cpu, _) => {
                Engine::Cpu(decoder(&cfg, CpuBackend::new(params.threads)?, q, fetch)?)
            }
            (Device::Cuda(n), _) | (_, Some(n)) => {
                Engine::Cuda(decoder(&cfg, cuda(*n)?, q, fetch)?)
            }
            _ => match cuda(0) {
                Ok(be) => Engine::Cuda(decoder(&cfg, be, q, fetch)?),
                Err(_) => Engine::Cpu(decoder(&cfg, CpuBackend::new(params.threads)?, q, fetch)?),
            },
        };
        Ok((engine, None))
    }

    fn config(&self) -> &ModelConfig {
        on_engine!(self, d => &d.cfg)
    }

    fn same(&self, other: &Engine) -> bool {
        match (self, other) {
            (Engine::Cpu(a), Engine::Cpu(b)) => Arc::ptr_eq(a, b),
            (Engine::Cuda(a), Engine::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Files copied beside an exported model so that it stays usable with its tokenizer.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

/// A frozen base model on a device. Cheap to clone; read-only, so several trainers and threads
/// may share it.
#[derive(Clone)]
pub struct Model {
    engine: Engine,
    /// This process's part of a data-parallel group, if the model trains in one.
    ranks: Option<Arc<Ranks>>,
    /// What `base_model_name_or_path` records in saved adapters.
    name: String,
    source_dir: Option<PathBuf>,
    /// Tokenizer and chat template, when the model comes with them.
    codec: Option<Arc<TextCodec>>,
    /// The `tokenizer.*` metadata of a GGUF source, carried into GGUF exports.
    gguf_vocabulary: Arc<Vec<(String, MetaValue)>>,
}

impl Model {
    /// Loads a Hugging Face model directory (config.json + safetensors, single or sharded) or a
    /// GGUF file (with its tokenizer and chat template).
    pub fn load(path: &Path, params: &ModelParams) -> Result<Self> {
        if is_gguf(path) {
            return Self::load_gguf(path, params);
        }
        let source = WeightSource::open(path)?;
        let dir = source.dir().to_path_buf();
        let cfg = ModelConfig::from_json(&read_config_json(&dir)?, &dir.join("config.json"))?;
        let (engine, ranks) = Engine::build(cfg, params, |spec| source.read_tensor(spec))?;
        let codec = TextCodec::from_model_dir(&dir)?.map(Arc::new);
        Ok(Model {
            engine,
            ranks: ranks.map(Arc::new),
            name: path.display().to_string(),
            source_dir: Some(dir),
            codec,
            gguf_vocabulary: Arc::default(),
        })
    }

    fn load_gguf(path: &Path, params: &ModelParams) -> Result<Self> {
        let g = GgufModel::open(path)?;
        let (engine, ranks) = Engine::build(g.config.clone(), params, |spec| {
            g.read_f32(spec).map(TensorValues::F32)
        })?;
        let codec = match g.tokenizer {
            Some(t) => {
                let text = |id: Option<u32>| id.and_then(|i| t.id_to_token(i));
                let (bos, eos) = (text(g.special.bos), text(g.special.eos));
                let codec = TextCodec::new(
                    t,
                    g.chat_template.as_deref(),
                    bos.as_deref(),
                    eos.as_deref(),
                    g.special.add_bos,
                )?;
                Some(Arc::new(codec))
            }
            None => None,
        };
        Ok(Model {
            engine,
            ranks: ranks.map(Arc::new),
            name: path.display().to_string(),
            source_dir: None,
            codec,
            gguf_vocabulary: Arc::new(g.vocabulary),
        })
    }

    /// A model of the given shape with random weights (tests, benchmarks, demos).
    pub fn random(cfg: ModelConfig, seed: u64, params: &ModelParams) -> Result<Self> {
        cfg.validate().map_err(Error::InvalidArgument)?;
        let mut source = random_weights(&cfg, seed);
        let (engine, ranks) =
            Engine::build(cfg, params, |spec| Ok(TensorValues::F32(source(spec))))?;
        Ok(Model {
            engine,
            ranks: ranks.map(Arc::new),
            name: format!("random-{seed}"),
            source_dir: None,
            codec: None,
            gguf_vocabulary: Arc::default(),
        })
    }

    /// The tokenizer the model came with (tokenizer.json or a GGUF file's vocabulary), if any.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.codec().map(|c| &c.tokenizer)
    }

    /// The chat template (Jinja source) the model came with, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.codec()
            .and_then(|c| c.template.as_ref())
            .map(|t| t.source())
    }

    pub fn config(&self) -> &ModelConfig {
        self.engine.config()
    }

    /// The tokenizer and chat template, if the model has them.
    pub fn codec(&self) -> Option<&TextCodec> {
        self.codec.as_deref()
    }

    /// Attaches a tokenizer (for models that come without one).
    pub fn with_codec(mut self, codec: TextCodec) -> Self {
        self.codec = Some(Arc::new(codec));
        self
    }

    /// A description of the device ("cpu (2 threads)", "cuda:0 (NVIDIA H200, sm_90)").
    pub fn device(&self) -> String {
        on_engine!(&self.engine, d => d.backend.describe())
    }

    /// This process's first rank in its data-parallel group (0 when it trains alone). Only rank
    /// 0 writes adapters, checkpoints and metrics in a run.
    pub fn rank(&self) -> usize {
        self.ranks.as_ref().map_or(0, |r| r.first_rank)
    }

    /// The number of ranks (GPUs) training together, in all processes (1 when alone).
    pub fn world_size(&self) -> usize {
        self.ranks.as_ref().map_or(1, |r| r.world_size)
    }

    /// `(rank, world_size)` when the model is one rank of a group spanning processes: a run
    /// then hands it only its share of each batch ([`Batch::share`]).
    pub fn process_share(&self) -> Option<(usize, usize)> {
        self.ranks
            .as_ref()
            .filter(|r| r.replicas.is_empty() && r.world_size > 1)
            .map(|r| (r.first_rank, r.world_size))
    }

    /// Device memory held by this model's backend and its peak (GPU backends only; with
    /// several GPUs in this process, those of the first: every replica holds the same).
    pub fn device_memory(&self) -> Option<DeviceMemory> {
        on_engine!(&self.engine, d => d.backend.device_memory())
    }

    /// Starts a new peak measurement of [`Model::device_memory`].
    pub fn reset_peak_memory(&self) {
        on_engine!(&self.engine, d => d.backend.reset_peak_memory())
    }

    /// The adapters of `adapter`, checked to belong to this model.
    fn own<'a>(&self, adapter: Option<&'a Trainer>) -> Result<Option<&'a Trainer>> {
        match adapter {
            Some(t) if !t.model.engine.same(&self.engine) => Err(Error::InvalidArgument(
                "the adapter belongs to another model".into(),
            )),
            a => Ok(a),
        }
    }

    /// Logits `[tokens, vocab]` for every row of `batch`, with `adapter`'s LoRA applied if given.
    pub fn logits(&self, batch: &Batch, adapter: Option<&Trainer>) -> Result<Vec<f32>> {
        let adapter = self.own(adapter)?;
        on_engine!(&self.engine, dec => {
            let b = batch.upload(&dec.backend, dec.cfg.vocab_size)?;
            let core = adapter.map(|t| t.core.on(dec)).transpose()?;
            let ad = core.map(|c| c.inference_adapters());
            dec.backend.download(&dec.logits(&b, ad.as_ref())?)
        })
    }

    /// An incremental decoding session (KV cache) with `adapter`'s LoRA applied if given.
    pub fn decode_session<'a>(&'a self, adapter: Option<&'a Trainer>) -> Result<DecodeSession<'a>> {
        let adapter = self.own(adapter)?;
        let cache = match &self.engine {
            Engine::Cpu(d) => Cache::Cpu(d.new_cache()?),
            Engine::Cuda(d) => Cache::Cuda(d.new_cache()?),
        };
        Ok(DecodeSession {
            model: self,
            adapter,
            cache,
        })
    }

    /// The host values of the base weight in `slot` (as stored: bf16-rounded on a GPU).
    pub fn weight(&self, slot: Slot) -> Result<Vec<f32>> {
        on_engine!(&self.engine, d => {
            let t = d.weights.get(slot).ok_or_else(|| {
                Error::InvalidArgument(format!("the model has no tensor {slot:?}"))
            })?;
            d.backend.download(t)
        })
    }

    /// Writes the model as a Hugging Face directory (config.json + model.safetensors), with
    /// `adapter` merged into the base weights (`W + scale·B·A`) when given.
    pub fn save_pretrained(
        &self,
        dir: &Path,
        dtype: Dtype,
        adapter: Option<&Trainer>,
    ) -> Result<()> {
        let cfg = self.config();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = Vec::new();
        for spec in tensor_specs(cfg) {
            let values = self.merged_weight(&spec, adapter)?;
            tensors.push((spec.name.clone(), spec.file_shape(), values));
        }
        let views: Vec<(String, Vec<usize>, &[f32])> = tensors
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors(&dir.join("model.safetensors"), &views, dtype, &meta)?;
        let mut config = cfg.to_json();
        config["torch_dtype"] = match dtype {
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            _ => "float32",
        }
        .into();
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
        crate::io::atomic::write_atomic(&dir.join("config.json"), |f| {
            std::io::Write::write_all(f, text.as_bytes())
        })?;
        if let Some(src) = &self.source_dir {
            for name in TOKENIZER_FILES {
                let from = src.join(name);
                if from.is_file() && src != dir {
                    std::fs::copy(&from, dir.join(name)).map_err(|e| Error::io(&from, e))?;
                }
            }
        }
        Ok(())
    }

    /// Writes the model as one GGUF file with matrices of type `ty` (F32, F16, BF16 or Q8_0) and
    /// `adapter` merged when given. The tokenizer is included when the model was loaded from GGUF.
    pub fn save_gguf(&self, path: &Path, ty: GgmlType, adapter: Option<&Trainer>) -> Result<()> {
        write_model(
            path,
            self.config(),
            &self.name,
            &self.gguf_vocabulary,
            ty,
            |spec| self.merged_weight(spec, adapter),
        )
    }

    /// The host values of one base weight, with `adapter`'s update `scale·B·A` added.
    fn merged_weight(&self, spec: &TensorSpec, adapter: Option<&Trainer>) -> Result<Vec<f32>> {
        let mut values = self.weight(spec.slot)?;
        if let (Slot::Proj(layer, m), Some(tr)) = (spec.slot, self.own(adapter)?) {
            let scale = tr.lora_config().scale();
            on_engine!(&self.engine, dec => {
                if let Some(pair) = tr.core.on(dec)?.params().get(layer, m) {
                    merge_into(&dec.backend, &mut values, pair, scale)?;
                }
            })
        }
        Ok(values)
    }
}

/// A KV cache on the model's device.
enum Cache {
    Cpu(KvCache<CpuBackend>),
    Cuda(KvCache<CudaBackend>),
}

/// Tokens fed one after another through a KV cache.
pub struct DecodeSession<'a> {
    model: &'a Model,
    adapter: Option<&'a Trainer>,
    cache: Cache,
}

impl DecodeSession<'_> {
    /// Runs `ids` after everything fed so far and returns the next-token logits (`vocab` values).
    pub fn feed(&mut self, ids: &[i32]) -> Result<Vec<f32>> {
        let vocab = self.model.config().vocab_size;
        if let Some(bad) = ids.iter().position(|&i| i < 0 || i as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {} at position {bad} is outside the vocabulary of {vocab} tokens",
                ids[bad]
            )));
        }
        fn feed<B: Backend>(
            dec: &Decoder<B>,
            core: Option<&Core<B>>,
            cache: &mut KvCache<B>,
            ids: &[i32],
        ) -> Result<Vec<f32>> {
            let ad = core.map(|c| c.inference_adapters());
            dec.backend
                .download(&dec.forward_cached(ids, cache, ad.as_ref())?)
        }
        match (&self.model.engine, &mut self.cache) {
            (Engine::Cpu(d), Cache::Cpu(c)) => {
                let core = self.adapter.map(|t| t.core.on(d)).transpose()?;
                feed(d, core, c, ids)
            }
            (Engine::Cuda(d), Cache::Cuda(c)) => {
                let core = self.adapter.map(|t| t.core.on(d)).transpose()?;
                feed(d, core, c, ids)
            }
            _ => unreachable!("the cache is made on the model's own device"),
        }
    }

    /// Tokens fed so far.
    pub fn len(&self) -> usize {
        match &self.cache {
            Cache::Cpu(c) => c.len(),
            Cache::Cuda(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `W += scale · B·A` on host values of W `[out, in]`.
fn merge_into<B: Backend>(be: &B, w: &mut [f32], pair: &LoraPair<B>, scale: f32) -> Result<()> {
    let (out, _) = be.shape(&pair.b);
    let (_, fan_in) = be.shape(&pair.a);
    let mut delta = be.zeros(out, fan_in)?;
    be.matmul(&pair.b, false, &pair.a, false, scale, &mut delta, false)?;
    w.iter_mut()
        .zip(be.download(&delta)?)
        .for_each(|(x, d)| *x += d);
    Ok(())
}

/// The generic trainer on the model's device.
enum TrainerCore {
    Cpu(Core<CpuBackend>),
    Cuda(Core<CudaBackend>),
}

/// Runs `$body` with `$c` bound to the trainer's core, whichever backend it is on.
macro_rules! on_core {
    ($core:expr, $c:ident => $body:expr) => {
        match $core {
            TrainerCore::Cpu($c) => $body,
            TrainerCore::Cuda($c) => $body,
        }
    };
}

/// The backends an [`Engine`] can hold, with the way back from a [`TrainerCore`] to its typed core.
trait EngineBackend: Backend + Sized {
    fn core(c: &TrainerCore) -> Option<&Core<Self>>;
}

impl EngineBackend for CpuBackend {
    fn core(c: &TrainerCore) -> Option<&Core<Self>> {
        match c {
            TrainerCore::Cpu(t) => Some(t),
            TrainerCore::Cuda(_) => None,
        }
    }
}

impl EngineBackend for CudaBackend {
    fn core(c: &TrainerCore) -> Option<&Core<Self>> {
        match c {
            TrainerCore::Cuda(t) => Some(t),
            TrainerCore::Cpu(_) => None,
        }
    }
}

impl TrainerCore {
    /// The typed core for a decoder of backend `B` (the adapters' own model, checked before).
    fn on<B: EngineBackend>(&self, _decoder: &Arc<Decoder<B>>) -> Result<&Core<B>> {
        B::core(self).ok_or_else(|| {
            Error::InvalidArgument("the adapter lives on another device than the model".into())
        })
    }
}

/// LoRA adapters and their optimizer over a [`Model`].
pub struct Trainer {
    model: Model,
    core: TrainerCore,
    /// The trainers of this process's other GPUs when the model spans several (same adapters,
    /// same steps, each on its share of the rows).
    replicas: Vec<Core<CudaBackend>>,
}

impl Trainer {
    /// Fresh adapters (A Kaiming-uniform from `lora.seed`, B zero).
    pub fn new(model: &Model, lora: LoraConfig, train: TrainConfig) -> Result<Self> {
        let core = match &model.engine {
            Engine::Cpu(d) => TrainerCore::Cpu(Core::new(d.clone(), lora.clone(), train.clone())?),
            Engine::Cuda(d) => {
                TrainerCore::Cuda(Core::new(d.clone(), lora.clone(), train.clone())?)
            }
        };
        Self::in_group(model, core, |d| {
            Core::new(d.clone(), lora.clone(), train.clone())
        })
    }

    /// The trainer of `core` with, when the model trains in a data-parallel group, a replica on
    /// each other GPU of this process (`replica` makes one) and every rank joined to its group.
    fn in_group(
        model: &Model,
        mut core: TrainerCore,
        replica: impl Fn(&Arc<Decoder<CudaBackend>>) -> Result<Core<CudaBackend>>,
    ) -> Result<Self> {
        let mut replicas = Vec::new();
        if let (Some(ranks), TrainerCore::Cuda(first)) = (&model.ranks, &mut core) {
            first.join_group(ranks.members[0].clone());
            for (d, member) in ranks.replicas.iter().zip(&ranks.members[1..]) {
                let mut r = replica(d)?;
                r.join_group(member.clone());
                replicas.push(r);
            }
        }
        Ok(Trainer {
            model: model.clone(),
            core,
            replicas,
        })
    }

    /// Adapters read from a PEFT adapter directory or a GGUF LoRA adapter file, to continue
    /// training or to infer. The LoRA settings come from adapter_config.json (or the GGUF
    /// metadata and tensor shapes); `train.seed` seeds dropout.
    pub fn from_adapter(model: &Model, dir: &Path, train: TrainConfig) -> Result<Self> {
        let (lora, modules) = if is_gguf(dir) {
            read_lora_adapter(dir, model.config(), train.seed)?
        } else {
            let (peft, modules) = load_peft_adapter(dir)?;
            (peft.to_lora(train.seed), modules)
        };
        let found = check_adapter(model.config(), &lora, &modules, dir)?;
        fn loaded<B: Backend>(
            d: &Arc<Decoder<B>>,
            lora: &LoraConfig,
            train: &TrainConfig,
            found: &BTreeMap<(usize, TargetModule), &AdapterModule>,
            dir: &Path,
        ) -> Result<Core<B>> {
            let params = upload_adapter(&d.backend, &d.cfg, lora, found, dir)?;
            Core::with_params(d.clone(), lora.clone(), train.clone(), params)
        }
        let core = match &model.engine {
            Engine::Cpu(d) => TrainerCore::Cpu(loaded(d, &lora, &train, &found, dir)?),
            Engine::Cuda(d) => TrainerCore::Cuda(loaded(d, &lora, &train, &found, dir)?),
        };
        Self::in_group(model, core, |d| loaded(d, &lora, &train, &found, dir))
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn lora_config(&self) -> &LoraConfig {
        on_core!(&self.core, c => c.lora_config())
    }

    /// One optimizer step over `micro_batches` (gradient accumulation when there are several).
    /// On several GPUs of this process each takes its share of every micro-batch's rows; in a
    /// group spanning processes the micro-batches are this rank's share. Either way the step
    /// equals one over the union of all ranks' rows, and the figures returned are the group's.
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        match &mut self.core {
            TrainerCore::Cuda(first) if !self.replicas.is_empty() => {
                let vocab = self.model.config().vocab_size;
                step_local_ranks(first, &mut self.replicas, micro_batches, vocab)
            }
            core => on_core!(core, c => c.step(micro_batches)),
        }
    }

    /// Sums host values over the processes of a group spanning processes, one value per rank
    /// (as they are otherwise): a run agrees on checkpoints with it. Every rank must call it.
    pub fn sum_over_processes(&self, values: &mut [f64]) -> Result<()> {
        match &self.core {
            TrainerCore::Cuda(c) if self.model.process_share().is_some() => {
                c.sum_over_group(values)
            }
            _ => Ok(()),
        }
    }

    /// Mean loss on `batch`, no dropout, no update.
    pub fn eval_loss(&self, batch: &Batch) -> Result<f32> {
        on_core!(&self.core, c => c.eval_loss(batch))
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        on_core!(&self.core, c => c.steps_taken())
    }

    /// Whether a recorded pass is held, which the next step of the last one's shape replays
    /// (never on the CPU, with dropout or data-parallel ranks, for micro-batches of more than
    /// 2,048 tokens, or where the recording's memory does not fit under the device-memory cap).
    pub fn holds_recording(&self) -> bool {
        on_core!(&self.core, c => c.holds_recording())
    }

    /// Whether the next step, of one micro-batch of the last one's shape, would record its pass
    /// before replaying it (two captures first: not a steady step's time).
    pub fn records_next_step(&self) -> bool {
        on_core!(&self.core, c => c.records_next_step())
    }

    /// `(rows, cols)` of each adapter tensor, in the order of the optimizer state.
    pub fn param_shapes(&self) -> Vec<(usize, usize)> {
        on_core!(&self.core, c => {
            let be = &c.decoder().backend;
            c.params().tensors().map(|t| be.shape(t)).collect()
        })
    }

    /// AdamW's moments on the host (see [`Core::moments_host`]).
    #[allow(clippy::type_complexity)]
    pub fn moments_host(&self) -> Result<[Vec<(usize, usize, Vec<f32>)>; 2]> {
        on_core!(&self.core, c => c.moments_host())
    }

    /// Puts back saved moments and the step count (see [`Core::restore_optimizer`]), on every
    /// GPU of this process.
    pub fn restore_optimizer(&mut self, m: &[Vec<f32>], v: &[Vec<f32>], step: u64) -> Result<()> {
        for r in &mut self.replicas {
            r.restore_optimizer(m, v, step)?;
        }
        on_core!(&mut self.core, c => c.restore_optimizer(m, v, step))
    }

    /// Writes adapter_config.json and adapter_model.safetensors in PEFT's format.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let peft = PeftAdapterConfig::from_lora(self.lora_config(), &self.model.name);
        save_peft_adapter(dir, &peft, &self.adapter_modules()?)
    }

    /// Writes the adapters as one GGUF LoRA adapter file, which llama.cpp applies to the base
    /// model at run time (`--lora`, `llama_adapter_lora_init`).
    pub fn save_adapter_gguf(&self, path: &Path) -> Result<()> {
        write_lora_adapter(
            path,
            self.model.config(),
            self.lora_config(),
            &self.adapter_modules()?,
            &self.model.name,
        )
    }

    /// The adapters on the host, in PEFT layout.
    fn adapter_modules(&self) -> Result<Vec<AdapterModule>> {
        let cfg = self.model.config();
        let mut modules = Vec::new();
        on_core!(&self.core, c => {
            let be = &c.decoder().backend;
            for layer in 0..cfg.num_layers {
                for m in TargetModule::ALL {
                    if let Some(p) = c.params().get(layer, m) {
                        modules.push(AdapterModule {
                            layer,
                            module: m,
                            a: be.download(&p.a)?,
                            b: be.download(&p.b)?,
                            in_features: cfg.in_features(m),
                            out_features: cfg.out_features(m),
                        });
                    }
                }
            }
        });
        Ok(modules)
    }

    /// Writes the base model with these adapters merged, as a Hugging Face directory.
    pub fn export_merged(&self, dir: &Path, dtype: Dtype) -> Result<()> {
        self.model.save_pretrained(dir, dtype, Some(self))
    }

    /// Writes the base model with these adapters merged as one GGUF file of type `ty`.
    pub fn export_gguf(&self, path: &Path, ty: GgmlType) -> Result<()> {
        self.model.save_gguf(path, ty, Some(self))
    }
}

/// One step of this process's GPUs together, each on its own thread with its share of every
/// micro-batch's rows. Batches are checked on the host first, so a bad one fails every rank at
/// once instead of leaving the others waiting for it.
fn step_local_ranks(
    first: &mut Core<CudaBackend>,
    replicas: &mut [Core<CudaBackend>],
    micro_batches: &[Batch],
    vocab: usize,
) -> Result<StepStats> {
    if micro_batches.is_empty() {
        return Err(Error::InvalidArgument(
            "a step needs at least one batch".into(),
        ));
    }
    for b in micro_batches {
        b.validate(vocab)?;
    }
    let n = replicas.len() + 1;
    let share = |rank| -> Vec<Batch> {
        micro_batches
            .iter()
            .filter_map(|b| b.share(rank, n))
            .collect()
    };
    let results: Vec<Result<StepStats>> = std::thread::scope(|s| {
        let others: Vec<_> = replicas
            .iter_mut()
            .enumerate()
            .map(|(i, core)| {
                let mine = share(i + 1);
                s.spawn(move || core.step(&mine))
            })
            .collect();
        let mut results = vec![first.step(&share(0))];
        results.extend(others.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Collective("a rank's thread panicked".into())))
        }));
        results
    });
    // A rank's own failure explains the others' (which then report the group's failure).
    let mut errors: Vec<Error> = Vec::new();
    let mut stats = None;
    for r in results {
        match r {
            Ok(s) => {
                stats.get_or_insert(s);
            }
            Err(e) => errors.push(e),
        }
    }
    match errors
        .iter()
        .position(|e| !matches!(e, Error::Collective(_)))
    {
        Some(i) => Err(errors.swap_remove(i)),
        None if !errors.is_empty() => Err(errors.swap_remove(0)),
        None => Ok(stats.expect("every rank returned")),
    }
}

/// Loaded adapter modules by (layer, module), checked to fit the model `cfg`.
fn check_adapter<'m>(
    cfg: &ModelConfig,
    lora: &LoraConfig,
    modules: &'m [AdapterModule],
    dir: &Path,
) -> Result<BTreeMap<(usize, TargetModule), &'m AdapterModule>> {
    let mut found: BTreeMap<(usize, TargetModule), &AdapterModule> = BTreeMap::new();
    for m in modules {
        let (want_in, want_out) = (cfg.in_features(m.module), cfg.out_features(m.module));
        if m.layer >= cfg.num_layers {
            return Err(Error::AdapterMismatch(format!(
                "{}: layer {} {} but the model has {} layers",
                dir.display(),
                m.layer,
                m.module.peft_name(),
                cfg.num_layers
            )));
        }
        if (m.in_features, m.out_features) != (want_in, want_out) {
            return Err(Error::AdapterMismatch(format!(
                "{}: layer {} {} maps {} -> {} features, the model's maps {want_in} -> {want_out}",
                dir.display(),
                m.layer,
                m.module.peft_name(),
                m.in_features,
                m.out_features
            )));
        }
        if !lora.targets(m.module) {
            return Err(Error::AdapterMismatch(format!(
                "{}: weights for {} are present but adapter_config.json does not target it",
                dir.display(),
                m.module.peft_name()
            )));
        }
        found.insert((m.layer, m.module), m);
    }
    Ok(found)
}

/// Uploads checked adapter modules; every module `lora` targets must be present.
fn upload_adapter<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    lora: &LoraConfig,
    found: &BTreeMap<(usize, TargetModule), &AdapterModule>,
    dir: &Path,
) -> Result<LoraTensors<B>> {
    LoraTensors::build(cfg, lora, |layer, m, (r, fan_in), (out, _)| {
        let am = found.get(&(layer, m)).ok_or_else(|| {
            Error::AdapterMismatch(format!(
                "{}: adapter_config.json targets {} but layer {layer} has no weights for it",
                dir.display(),
                m.peft_name()
            ))
        })?;
        Ok(LoraPair {
            a: be.upload(&am.a, r, fan_in)?,
            b: be.upload(&am.b, out, r)?,
        })
    })
}
