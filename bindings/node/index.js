'use strict';
// Node.js binding of libfinetune: Model and Trainer objects over the C API's handles, errors as
// FinetuneError, and training on a worker thread behind a Promise with progress events.

const path = require('path');
const { EventEmitter } = require('events');
const { Worker } = require('worker_threads');
const ffi = require('./lib/ffi');

const { koffi } = ffi;

const Status = Object.freeze({
  OK: 0, INVALID_ARGUMENT: 1, IO: 2, FORMAT: 3, UNSUPPORTED: 4, ADAPTER_MISMATCH: 5, CANCELLED: 6,
  NON_FINITE: 7, INTERNAL: 8, DEVICE: 9, OUT_OF_MEMORY: 10, COLLECTIVE: 11,
});
const Target = Object.freeze({ Q: 1, K: 2, V: 4, O: 8, GATE: 16, UP: 32, DOWN: 64, ALL: 127 });
const DType = Object.freeze({ F32: 0, F16: 1, BF16: 2 });
const SCHEDULES = { constant: 0, linear: 1, cosine: 2 };
const QUANTIZATIONS = { none: 0, nf4: 1 };
const IGNORE_LABEL = -100;
const { ABI_VERSION, NCCL_UNIQUE_ID_BYTES } = ffi;
const UINT32_MAX = 0xffffffff;

/** A failed library call: `status`, `code` ("FT_ERR_IO", ...), `op` (the C function) and the
 * library's message. Cancelled training rejects with one whose name is "AbortError". */
class FinetuneError extends Error {
  constructor(op, status, code, message, options) {
    super(`${op}: ${code}: ${message}`, options);
    this.name = status === Status.CANCELLED ? 'AbortError' : 'FinetuneError';
    this.op = op;
    this.status = status;
    this.code = code;
    this.libraryMessage = message;
  }
}

let api = null;
/** The library's functions; ffi.load refuses a library of another ABI version. */
function lib() {
  if (!api) api = ffi.load();
  return api;
}

/** Runs a C call and turns a failure into a FinetuneError with ft_last_error's message (read at
 * once, on the same thread). */
function check(op, status) {
  if (status !== 0) {
    throw new FinetuneError(op, status, lib().statusName(status), lib().lastError());
  }
}

/** `value` as a uint32_t field, or a RangeError naming the option. */
function uint32(name, value) {
  if (!Number.isInteger(value) || value < 0 || value > UINT32_MAX) {
    throw new RangeError(`finetune: ${name} must be an integer from 0 to ${UINT32_MAX}, not ${value}`);
  }
  return value;
}

function modelParams(opts) {
  opts = opts ?? {};
  const p = lib().modelDefaultParams();
  if (opts.device != null) p.device = opts.device;
  if (opts.threads != null) p.n_threads = opts.threads;
  if (opts.quantization != null) {
    const q = QUANTIZATIONS[opts.quantization];
    if (q === undefined) throw new RangeError(`finetune: unknown quantization ${opts.quantization} (expected none or nf4)`);
    p.quantization = q;
  }
  if (opts.maxDeviceMemoryMiB != null) p.max_device_memory_mib = opts.maxDeviceMemoryMiB;
  if (opts.worldSize != null) p.world_size = uint32('worldSize', opts.worldSize);
  if (opts.rank != null) p.rank = uint32('rank', opts.rank);
  if (opts.collectiveTimeoutMs != null) p.collective_timeout_ms = uint32('collectiveTimeoutMs', opts.collectiveTimeoutMs);
  if (opts.lmHeadInHost != null) p.lm_head_in_host_memory = opts.lmHeadInHost ? 1 : 0;
  if (opts.layersInHost != null) p.layers_in_host_memory = uint32('layersInHost', opts.layersInHost);
  const id = opts.ncclUniqueId;
  if (id != null) {
    if (!(id instanceof Uint8Array)) {
      throw new TypeError('finetune: ncclUniqueId must be a Buffer or Uint8Array (from ncclUniqueId())');
    }
    if (id.length !== NCCL_UNIQUE_ID_BYTES) {
      throw new RangeError(
        `finetune: ncclUniqueId has ${id.length} bytes; an NCCL unique id has ${NCCL_UNIQUE_ID_BYTES}`);
    }
    // The struct refers to the bytes, which stay alive with it for the call (read during the
    // call only).
    p.nccl_unique_id = id;
  } else if (p.world_size > 1) {
    throw new TypeError(`finetune: ncclUniqueId is missing but worldSize is ${p.world_size}: make one with `
      + 'ncclUniqueId() on one rank and give it to every rank');
  }
  return p;
}

function loraParams(o) {
  if (o == null) return null;
  const p = lib().loraDefaultParams();
  if (o.rank != null) p.rank = o.rank;
  if (o.alpha != null) p.alpha = o.alpha;
  if (o.useRslora != null) p.use_rslora = o.useRslora ? 1 : 0;
  if (o.dropout != null) p.dropout = o.dropout;
  if (o.targetModules != null) p.target_modules = o.targetModules;
  if (o.seed != null) p.seed = o.seed;
  return p;
}

function trainParams(o) {
  if (o == null) return null;
  const p = lib().trainDefaultParams();
  const map = {
    learningRate: 'learning_rate', weightDecay: 'weight_decay', beta1: 'beta1', beta2: 'beta2', eps: 'eps',
    maxGradNorm: 'max_grad_norm', warmupSteps: 'warmup_steps', totalSteps: 'total_steps', seed: 'seed',
  };
  for (const [k, c] of Object.entries(map)) if (o[k] != null) p[c] = o[k];
  if (o.gradientCheckpointing != null) p.gradient_checkpointing = o.gradientCheckpointing ? 1 : 0;
  if (o.offloadActivations != null) p.offload_activations = o.offloadActivations ? 1 : 0;
  if (o.keptMlpLayers != null) p.kept_mlp_layers = uint32('keptMlpLayers', o.keptMlpLayers);
  if (o.schedule != null) {
    const s = typeof o.schedule === 'string' ? SCHEDULES[o.schedule] : o.schedule;
    if (s === undefined) throw new RangeError(`finetune: unknown schedule ${o.schedule}`);
    p.schedule = s;
  }
  return p;
}

// Handles that were never closed are freed when their object is collected.
const modelRegistry = new FinalizationRegistry((h) => lib().modelFree(h));
const trainerRegistry = new FinalizationRegistry((h) => lib().trainerFree(h));

/** A frozen base model. Call close() when done (trainers made from it stay usable). */
class Model {
  constructor(handle) {
    this._h = handle;
    modelRegistry.register(this, handle, this);
  }

  /** Loads a Hugging Face model directory. opts: { device: 'auto'|'cpu'|'cuda:N'|'cuda:0,cuda:1'|'cuda:all',
   * threads, quantization, maxDeviceMemoryMiB, worldSize, rank, ncclUniqueId, collectiveTimeoutMs, lmHeadInHost,
   * layersInHost } */
  static load(dir, opts) {
    const out = [null];
    check('ft_model_load', lib().modelLoad(dir, modelParams(opts), out));
    return new Model(out[0]);
  }

  /** A model of a named shape ('tiny', 'smollm2-135m', ...) with random weights. */
  static random(shape, seed = 0, opts) {
    const out = [null];
    check('ft_model_random', lib().modelRandom(shape, seed, modelParams(opts), out));
    return new Model(out[0]);
  }

  get handle() {
    if (!this._h) throw new Error('finetune: the model is closed');
    return this._h;
  }

  info() {
    const i = {};
    check('ft_model_get_info', lib().modelGetInfo(this.handle, i));
    return {
      vocabSize: Number(i.vocab_size), hiddenSize: Number(i.hidden_size),
      intermediateSize: Number(i.intermediate_size), numLayers: Number(i.num_layers),
      numHeads: Number(i.num_heads), numKvHeads: Number(i.num_kv_heads), headDim: Number(i.head_dim),
    };
  }

  save(dir, dtype = DType.F32) {
    check('ft_model_save', lib().modelSave(this.handle, dir, dtype));
  }

  /** Greedy decoding; returns the new token ids. opts: { maxNewTokens, stopToken, adapter } */
  generate(prompt, opts = {}) {
    const max = opts.maxNewTokens ?? 16;
    const out = new Int32Array(Math.max(max, 1));
    const n = [0];
    const adapter = opts.adapter ? opts.adapter.handle : null;
    const p = Int32Array.from(prompt);
    check('ft_model_generate', lib().modelGenerate(this.handle, adapter, p, p.length, max, opts.stopToken ?? -1, out, n));
    return Array.from(out.subarray(0, Number(n[0])));
  }

  close() {
    if (this._h) {
      modelRegistry.unregister(this);
      lib().modelFree(this._h);
      this._h = null;
    }
  }
}

/** LoRA adapters and their optimizer over a model. Emits 'progress' (stats) while training.
 * One call at a time: other methods throw while train() is running. */
class Trainer extends EventEmitter {
  constructor(handle) {
    super();
    this._h = handle;
    this._training = false;
    this._closeAfterTraining = false;
    trainerRegistry.register(this, handle, this);
  }

  /** Fresh adapters on `model`. opts: { lora: {rank, alpha, ...}, train: {learningRate, ...} } */
  static create(model, opts = {}) {
    const out = [null];
    check('ft_trainer_new', lib().trainerNew(model.handle, loraParams(opts.lora), trainParams(opts.train), out));
    return new Trainer(out[0]);
  }

  /** A PEFT adapter directory loaded onto `model`. */
  static loadAdapter(model, dir, opts = {}) {
    const out = [null];
    check('ft_trainer_load_adapter', lib().trainerLoadAdapter(model.handle, dir, trainParams(opts.train), out));
    return new Trainer(out[0]);
  }

  get handle() {
    if (this._training) throw new Error('finetune: the trainer is busy training');
    if (!this._h) throw new Error('finetune: the trainer is closed');
    return this._h;
  }

  /** One optimizer step over the micro-batches, on this thread. Returns its stats. */
  step(batches) {
    const cb = ffi.toCBatches(batches);
    const s = {};
    check('ft_trainer_step', lib().trainerStep(this.handle, cb, cb.length, s));
    return ffi.statsOf(s);
  }

  /** Trains `steps` steps on a worker thread, cycling through the batches. Resolves with the last
   * step's stats; rejects with a FinetuneError (an 'AbortError' when `signal` aborts it, after the
   * step in flight; the steps taken stay applied). */
  train(batches, opts = {}) {
    const h = this.handle;
    const steps = opts.steps ?? 1;
    const signal = opts.signal;
    if (signal && signal.aborted) {
      return Promise.reject(new FinetuneError('ft_trainer_train', Status.CANCELLED, 'FT_ERR_CANCELLED',
        'aborted before the first step', { cause: signal.reason }));
    }
    let plain;
    try {
      plain = ffi.toCBatches(batches).map((b) => ({
        inputIds: b.input_ids, labels: b.labels, positions: b.positions, segmentIds: b.segment_ids,
        batchSize: b.batch_size, seqLen: b.seq_len,
      }));
    } catch (e) {
      return Promise.reject(e);
    }
    const cancelFlag = new SharedArrayBuffer(4);
    const worker = new Worker(path.join(__dirname, 'lib', 'train-worker.js'), {
      workerData: { libPath: lib().path, trainer: koffi.address(h), batches: plain, steps, cancelFlag },
    });
    this._training = true;
    const onAbort = () => Atomics.store(new Int32Array(cancelFlag), 0, 1);
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
    return new Promise((resolve, reject) => {
      let last = null;
      let result = null;
      worker.on('message', (m) => {
        if (m.type === 'progress') {
          last = m.stats;
          if (opts.onProgress) opts.onProgress(m.stats);
          this.emit('progress', m.stats);
        } else if (m.type === 'done') {
          result = m;
        }
      });
      worker.on('error', (e) => { result = { error: e }; });
      worker.on('exit', () => {
        this._training = false;
        if (signal) signal.removeEventListener('abort', onAbort);
        if (this._closeAfterTraining) this.close();
        if (!result) reject(new Error('finetune: the training worker exited without an answer'));
        else if (result.error) reject(result.error);
        else if (result.status !== 0) {
          reject(new FinetuneError('ft_trainer_train', result.status, result.name, result.message,
            signal && signal.aborted ? { cause: signal.reason } : undefined));
        } else resolve(last);
      });
    });
  }

  /** Mean loss on one batch with the current adapters, without updating them. */
  evalLoss(batch) {
    const [b] = ffi.toCBatches([batch]);
    const out = [0];
    check('ft_trainer_eval_loss', lib().trainerEvalLoss(this.handle, b, out));
    return out[0];
  }

  saveAdapter(dir) {
    check('ft_trainer_save_adapter', lib().trainerSaveAdapter(this.handle, dir));
  }

  exportMerged(dir, dtype = DType.F32) {
    check('ft_trainer_export_merged', lib().trainerExportMerged(this.handle, dir, dtype));
  }

  /** Frees the trainer; while train() runs, it is freed when training ends. */
  close() {
    if (this._training) {
      this._closeAfterTraining = true;
      return;
    }
    if (this._h) {
      trainerRegistry.unregister(this);
      lib().trainerFree(this._h);
      this._h = null;
    }
  }
}

/** A fresh NCCL unique id (a Buffer of NCCL_UNIQUE_ID_BYTES) for a data-parallel group spanning
 * processes: make it on one rank, hand it to the others, and pass it to every rank as
 * `ncclUniqueId` with `worldSize` and `rank`. This process hosts the group's rendezvous and must
 * stay alive until every rank has loaded its model. Without NCCL (libnccl.so.2) it throws a
 * FinetuneError with code FT_ERR_DEVICE that names it. */
function ncclUniqueId() {
  const id = Buffer.alloc(NCCL_UNIQUE_ID_BYTES);
  check('ft_nccl_unique_id', lib().ncclUniqueId(id, id.length));
  return id;
}

/** The options of bench() as the library's defaults, those of `finetune bench`. */
function benchDefaults() {
  const d = lib().benchDefaultParams();
  return {
    model: d.model, mode: d.mode ?? 'lora', batch: d.batch, seq: d.seq, rank: d.rank, steps: d.steps,
    checkpointing: d.checkpointing !== 0, threads: d.n_threads, device: d.device ?? 'auto',
    maxDeviceMemoryMiB: Number(d.max_device_memory_mib), offloadActivations: d.offload_activations !== 0,
    lmHeadInHost: d.lm_head_in_host_memory !== 0, layersInHost: d.layers_in_host_memory,
    keptMlpLayers: d.kept_mlp_layers,
  };
}

/** The training-step benchmark of `finetune bench`: builds a model of the named shape with random
 * weights, runs the warm-up (one step, two where the second records the pass on a GPU) and
 * `steps` timed steps, and returns the JSON text `finetune bench` prints (tokens_per_second,
 * step_seconds_median, peak_rss_mib, ...). Options left out keep benchDefaults(). It runs on
 * the calling thread, blocking the event loop (minutes for the larger shapes). */
function bench(opts) {
  opts = opts ?? {};
  const p = lib().benchDefaultParams();
  if (opts.model != null) p.model = opts.model;
  if (opts.mode != null) p.mode = opts.mode;
  for (const [k, c] of [['batch', 'batch'], ['seq', 'seq'], ['rank', 'rank'], ['steps', 'steps'], ['threads', 'n_threads'],
    ['layersInHost', 'layers_in_host_memory'], ['keptMlpLayers', 'kept_mlp_layers']]) {
    if (opts[k] != null) p[c] = uint32(k, opts[k]);
  }
  if (opts.checkpointing != null) p.checkpointing = opts.checkpointing ? 1 : 0;
  if (opts.device != null) p.device = opts.device;
  if (opts.maxDeviceMemoryMiB != null) p.max_device_memory_mib = opts.maxDeviceMemoryMiB;
  if (opts.offloadActivations != null) p.offload_activations = opts.offloadActivations ? 1 : 0;
  if (opts.lmHeadInHost != null) p.lm_head_in_host_memory = opts.lmHeadInHost ? 1 : 0;
  const out = [null];
  check('ft_bench', lib().bench(p, out));
  try {
    return koffi.decode(out[0], 'char', -1);
  } finally {
    lib().stringFree(out[0]);
  }
}

/** Opens the library now (it opens on first use otherwise); returns its path. */
function loadLibrary() {
  return lib().path;
}

function version() {
  return lib().version();
}

module.exports = {
  Model, Trainer, FinetuneError, Status, Target, DType, IGNORE_LABEL, ABI_VERSION, NCCL_UNIQUE_ID_BYTES,
  loadLibrary, version, ncclUniqueId, bench, benchDefaults, LIBRARY_ENV: ffi.LIB_ENV,
};
