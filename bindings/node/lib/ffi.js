'use strict';
// Finds libfinetune.so and declares its C API with koffi. Loaded once per thread: by the main
// thread for short calls and by each training worker.

const fs = require('fs');
const path = require('path');
const koffi = require('koffi');

const LIB_ENV = 'FINETUNE_LIB';
const LIB_NAME = 'libfinetune.so';
/** The C ABI version the declarations below mirror (FT_ABI_VERSION of include/finetune.h). */
const ABI_VERSION = 5;
/** Bytes of an NCCL unique id (FT_NCCL_UNIQUE_ID_BYTES). */
const NCCL_UNIQUE_ID_BYTES = 128;

/** Where the library is looked for when FINETUNE_LIB is not set, in order. */
function candidates() {
  const dirs = [path.resolve(__dirname, '..')];
  if (require.main && require.main.filename) dirs.push(path.dirname(require.main.filename));
  dirs.push(path.dirname(process.execPath));
  for (const d of (process.env.LD_LIBRARY_PATH || '').split(':')) if (d) dirs.push(d);
  dirs.push('/usr/local/lib', '/usr/lib', '/usr/lib/x86_64-linux-gnu');
  return dirs.map((d) => path.join(d, LIB_NAME));
}

function openLibrary(explicitPath) {
  const fromEnv = explicitPath || process.env[LIB_ENV];
  if (fromEnv) {
    try {
      return { lib: koffi.load(fromEnv), path: fromEnv };
    } catch (e) {
      throw new Error(`finetune: cannot load the library named by ${LIB_ENV}=${fromEnv}: ${e.message}`);
    }
  }
  const looked = [`${LIB_ENV} (not set)`];
  for (const p of candidates()) {
    if (!fs.existsSync(p)) {
      looked.push(`${p} (absent)`);
      continue;
    }
    try {
      return { lib: koffi.load(p), path: p };
    } catch (e) {
      looked.push(`${p} (${e.message})`);
    }
  }
  try {
    return { lib: koffi.load(LIB_NAME), path: LIB_NAME };
  } catch (e) {
    looked.push("the dynamic linker's search path");
  }
  throw new Error(
    `finetune: ${LIB_NAME} not found; set ${LIB_ENV} to its full path. Looked in: ${looked.join(', ')}`,
  );
}

// Field for field, in order, as in include/finetune.h: a struct shorter than the library's would
// let it read past the end (test/binding.test.js checks the sizes).
const ModelParams = koffi.struct('ft_model_params', {
  device: 'const char *', n_threads: 'uint32_t', quantization: 'int32_t', max_device_memory_mib: 'uint64_t',
  world_size: 'uint32_t', rank: 'uint32_t', nccl_unique_id: 'const uint8_t *', collective_timeout_ms: 'uint32_t',
  lm_head_in_host_memory: 'int32_t', layers_in_host_memory: 'uint32_t',
});
const BenchParams = koffi.struct('ft_bench_params', {
  model: 'const char *', mode: 'const char *', batch: 'uint32_t', seq: 'uint32_t', rank: 'uint32_t',
  steps: 'uint32_t', checkpointing: 'int32_t', n_threads: 'uint32_t', device: 'const char *',
  max_device_memory_mib: 'uint64_t', offload_activations: 'int32_t', lm_head_in_host_memory: 'int32_t',
  layers_in_host_memory: 'uint32_t', kept_mlp_layers: 'uint32_t',
});
const ModelInfo = koffi.struct('ft_model_info', {
  vocab_size: 'uint64_t', hidden_size: 'uint64_t', intermediate_size: 'uint64_t', num_layers: 'uint64_t',
  num_heads: 'uint64_t', num_kv_heads: 'uint64_t', head_dim: 'uint64_t',
});
const LoraParams = koffi.struct('ft_lora_params', {
  rank: 'uint32_t', alpha: 'float', use_rslora: 'int32_t', dropout: 'float', target_modules: 'uint32_t',
  seed: 'uint64_t',
});
const TrainParams = koffi.struct('ft_train_params', {
  learning_rate: 'float', weight_decay: 'float', beta1: 'float', beta2: 'float', eps: 'float',
  max_grad_norm: 'float', schedule: 'int32_t', warmup_steps: 'uint64_t', total_steps: 'uint64_t',
  gradient_checkpointing: 'int32_t', seed: 'uint64_t', offload_activations: 'int32_t',
  kept_mlp_layers: 'uint32_t',
});
const Batch = koffi.struct('ft_batch', {
  input_ids: 'const int32_t *', labels: 'const int32_t *', positions: 'const int32_t *',
  segment_ids: 'const int32_t *', batch_size: 'uint32_t', seq_len: 'uint32_t',
});
const StepStats = koffi.struct('ft_step_stats', {
  step: 'uint64_t', loss: 'float', grad_norm: 'float', learning_rate: 'float', tokens: 'uint64_t',
  labelled_tokens: 'uint64_t',
});
koffi.opaque('ft_model');
koffi.opaque('ft_trainer');
const ProgressFn = koffi.proto('int32_t ft_progress_fn(const ft_step_stats *stats, void *user_data)');

let api = null;

/** Opens the library (once per thread), checks its ABI version and returns its functions. */
function load(explicitPath) {
  if (api) return api;
  const { lib, path: libPath } = openLibrary(explicitPath);
  const f = (decl) => lib.func(decl);
  // Before the other declarations: a library of another ABI may lack some of their symbols, and
  // its version is the clearer message.
  const abiVersion = f('uint32_t ft_abi_version(void)');
  if (abiVersion() !== ABI_VERSION) {
    throw new Error(`finetune: ${libPath} has C ABI version ${abiVersion()}, this package needs ${ABI_VERSION}`);
  }
  api = {
    path: libPath,
    abiVersion,
    version: f('const char *ft_version(void)'),
    lastError: f('const char *ft_last_error(void)'),
    statusName: f('const char *ft_status_name(int32_t status)'),
    modelDefaultParams: f('ft_model_params ft_model_default_params(void)'),
    loraDefaultParams: f('ft_lora_params ft_lora_default_params(void)'),
    trainDefaultParams: f('ft_train_params ft_train_default_params(void)'),
    modelLoad: f('int32_t ft_model_load(const char *path, const ft_model_params *params, _Out_ ft_model **out)'),
    modelRandom: f('int32_t ft_model_random(const char *shape, uint64_t seed, const ft_model_params *params, _Out_ ft_model **out)'),
    modelGetInfo: f('int32_t ft_model_get_info(const ft_model *model, _Out_ ft_model_info *out)'),
    modelSave: f('int32_t ft_model_save(const ft_model *model, const char *dir, int32_t dtype)'),
    modelGenerate: f('int32_t ft_model_generate(const ft_model *model, const ft_trainer *trainer, const int32_t *prompt, size_t n_prompt, size_t max_new_tokens, int32_t stop_token, _Out_ int32_t *out, _Out_ size_t *n_out)'),
    modelFree: f('void ft_model_free(ft_model *model)'),
    trainerNew: f('int32_t ft_trainer_new(const ft_model *model, const ft_lora_params *lora, const ft_train_params *train, _Out_ ft_trainer **out)'),
    trainerLoadAdapter: f('int32_t ft_trainer_load_adapter(const ft_model *model, const char *dir, const ft_train_params *train, _Out_ ft_trainer **out)'),
    trainerStep: f('int32_t ft_trainer_step(ft_trainer *trainer, const ft_batch *batches, size_t n_batches, _Out_ ft_step_stats *out)'),
    // The trainer as an address: the worker thread receives it as a number from the main thread.
    trainerTrainAt: f('int32_t ft_trainer_train(uintptr_t trainer, const ft_batch *batches, size_t n_batches, uint64_t steps, ft_progress_fn *progress, void *user_data)'),
    trainerEvalLoss: f('int32_t ft_trainer_eval_loss(const ft_trainer *trainer, const ft_batch *batch, _Out_ float *out)'),
    trainerSaveAdapter: f('int32_t ft_trainer_save_adapter(const ft_trainer *trainer, const char *dir)'),
    trainerExportMerged: f('int32_t ft_trainer_export_merged(const ft_trainer *trainer, const char *dir, int32_t dtype)'),
    trainerFree: f('void ft_trainer_free(ft_trainer *trainer)'),
    ncclUniqueId: f('int32_t ft_nccl_unique_id(_Out_ uint8_t *out, size_t out_len)'),
    benchDefaultParams: f('ft_bench_params ft_bench_default_params(void)'),
    // The JSON comes back as a raw pointer, to be read and then released with ft_string_free.
    bench: f('int32_t ft_bench(const ft_bench_params *params, _Out_ void **json_out)'),
    stringFree: f('void ft_string_free(void *s)'),
  };
  return api;
}

/** Batches as the C structs, validated; arrays are copied to Int32Arrays. */
function toCBatches(batches) {
  if (!Array.isArray(batches)) batches = [batches];
  if (batches.length === 0) throw new TypeError('finetune: no batches');
  return batches.map((b, i) => {
    const ids = Int32Array.from(b.inputIds);
    const batchSize = b.batchSize ?? 1;
    const seqLen = b.seqLen ?? ids.length / batchSize;
    const n = batchSize * seqLen;
    const arr = (name, v, optional) => {
      if (v == null && optional) return null;
      const a = Int32Array.from(v ?? []);
      if (a.length !== n) {
        throw new RangeError(`finetune: batch ${i}: ${name} has ${a.length} values, batchSize*seqLen is ${n}`);
      }
      return a;
    };
    return {
      input_ids: arr('inputIds', ids), labels: arr('labels', b.labels),
      positions: arr('positions', b.positions, true), segment_ids: arr('segmentIds', b.segmentIds, true),
      batch_size: batchSize, seq_len: seqLen,
    };
  });
}

function statsOf(s) {
  return {
    step: Number(s.step), loss: s.loss, gradNorm: s.grad_norm, learningRate: s.learning_rate,
    tokens: Number(s.tokens), labelledTokens: Number(s.labelled_tokens),
  };
}

module.exports = {
  koffi, load, toCBatches, statsOf, ProgressFn, StepStats, Batch, ModelParams, BenchParams, TrainParams, LIB_ENV,
  ABI_VERSION,
  NCCL_UNIQUE_ID_BYTES,
};
