// Types of the finetune Node.js binding (index.js).

/** Status codes of the C API. */
export declare const Status: {
  readonly OK: 0; readonly INVALID_ARGUMENT: 1; readonly IO: 2; readonly FORMAT: 3; readonly UNSUPPORTED: 4;
  readonly ADAPTER_MISMATCH: 5; readonly CANCELLED: 6; readonly NON_FINITE: 7; readonly INTERNAL: 8;
  readonly DEVICE: 9; readonly OUT_OF_MEMORY: 10;
  /** A data-parallel group failed: another rank failed, died or timed out. */
  readonly COLLECTIVE: 11;
};
/** LoRA target bits for `LoraOptions.targetModules`. */
export declare const Target: {
  readonly Q: 1; readonly K: 2; readonly V: 4; readonly O: 8; readonly GATE: 16; readonly UP: 32;
  readonly DOWN: 64; readonly ALL: 127;
};
/** Element types of written weights. */
export declare const DType: { readonly F32: 0; readonly F16: 1; readonly BF16: 2 };
/** Label meaning "no loss at this position". */
export declare const IGNORE_LABEL: -100;
/** The C ABI version this package is written for (4); a library of another is refused. */
export declare const ABI_VERSION: number;
/** Bytes of an NCCL unique id: 128. */
export declare const NCCL_UNIQUE_ID_BYTES: number;
/** The environment variable naming the library's full path: "FINETUNE_LIB". */
export declare const LIBRARY_ENV: string;

/** A failed library call. `name` is "AbortError" when training was cancelled. */
export declare class FinetuneError extends Error {
  /** The C function, such as "ft_model_load". */
  readonly op: string;
  readonly status: number;
  /** The status's C name, such as "FT_ERR_IO". */
  readonly code: string;
  /** ft_last_error()'s message. */
  readonly libraryMessage: string;
}

export interface ModelOptions {
  /** "auto" (default), "cpu", "cuda:N", or several GPUs of this process training as one
   * data-parallel group: "cuda:0,cuda:1" or "cuda:all". */
  device?: string;
  /** CPU worker threads; 0 means one per core. */
  threads?: number;
  /** Storage of the frozen projection matrices: "none" (default) or "nf4" (QLoRA). */
  quantization?: 'none' | 'nf4';
  /** Cap on the device memory held, in MiB (GPU only); 0 or absent means none. */
  maxDeviceMemoryMiB?: number;
  /** Ranks in a data-parallel group spanning processes; 0, 1 or absent: this process trains alone
   * (or over the GPUs `device` lists). With more, `device` must be one "cuda:N" and `rank` and
   * `ncclUniqueId` are needed; each step's batches are then this rank's share. */
  worldSize?: number;
  /** This process's rank, 0 ≤ rank < worldSize. */
  rank?: number;
  /** The NCCL_UNIQUE_ID_BYTES (128) bytes ncclUniqueId() made on one rank, the same on every rank;
   * required when worldSize > 1 (a TypeError without it, a RangeError for another length). */
  ncclUniqueId?: Uint8Array | null;
  /** How long a rank waits for the others (joining, each step) before failing with
   * FT_ERR_COLLECTIVE instead of hanging, in milliseconds; 0 or absent means 300000 (5 minutes). */
  collectiveTimeoutMs?: number;
  /** Keep the LM head (or, tied, the embedding table serving as one) in pinned host memory
   * instead of device memory (GPU only; ignored on the CPU). Default false. */
  lmHeadInHost?: boolean;
  /** Decoder layers whose projection matrices stay in pinned host memory instead of device
   * memory, each copied to the device ahead of the layer (GPU only; bf16 matrices whole, "nf4"
   * ones their codes): spread evenly over the layers, at most all of them (more is refused).
   * Adjacent bf16 host layers make a pass wait on the bus. 0 or absent means none. */
  layersInHost?: number;
}

/** What bench() measures: the options of `finetune bench`. */
export interface BenchOptions {
  /** A named shape with random weights: "smollm2-135m" (default), "llama3.2-1b", "llama3-8b",
   * "mistral-7b", "qwen2.5-7b", "gemma-7b" or "tiny". */
  model?: string;
  /** "lora" (default) or "qlora" (frozen projection matrices in NF4). */
  mode?: 'lora' | 'qlora';
  /** Rows per step and GPU (default 4). */
  batch?: number;
  /** Tokens per row (default 256). */
  seq?: number;
  /** LoRA rank, alpha equal to it (default 16). */
  rank?: number;
  /** Timed steps after the untimed warm-up (one step, two where the second records the pass on
   * a GPU; default 3). */
  steps?: number;
  /** Recompute each layer in the backward pass (default true). */
  checkpointing?: boolean;
  /** CPU worker threads; 0 (default) means one per core. */
  threads?: number;
  /** "auto" (default), "cpu", "cuda:N", "cuda:0,cuda:1" or "cuda:all" (each GPU takes `batch` rows). */
  device?: string;
  /** Cap on the device memory held, in MiB (GPU only); 0 means none. */
  maxDeviceMemoryMiB?: number;
  /** Keep the saved layer inputs in pinned host memory (GPU only; default false). */
  offloadActivations?: boolean;
  /** Keep the LM head in pinned host memory instead of device memory (GPU only; default false). */
  lmHeadInHost?: boolean;
  /** Decoder layers kept in pinned host memory, as ModelOptions.layersInHost (GPU only;
   * default 0). */
  layersInHost?: number;
  /** Layers that keep their MLP's gate and up products, as TrainOptions.keptMlpLayers (default 0). */
  keptMlpLayers?: number;
}

export interface ModelInfo {
  vocabSize: number; hiddenSize: number; intermediateSize: number; numLayers: number;
  numHeads: number; numKvHeads: number; headDim: number;
}

export interface GenerateOptions {
  /** Default 16. */
  maxNewTokens?: number;
  /** Stop after this token; negative (default) never stops early. */
  stopToken?: number;
  /** Apply this trainer's adapters. */
  adapter?: Trainer;
}

export type TokenArray = ArrayLike<number>;

/** `batchSize` rows of `seqLen` tokens, each array holding batchSize*seqLen values row by row. */
export interface Batch {
  inputIds: TokenArray;
  /** The token expected after each position, or IGNORE_LABEL. */
  labels: TokenArray;
  positions?: TokenArray | null;
  segmentIds?: TokenArray | null;
  /** Default 1. */
  batchSize?: number;
  /** Default inputIds.length / batchSize. */
  seqLen?: number;
}

export interface LoraOptions {
  rank?: number; alpha?: number; useRslora?: boolean; dropout?: number;
  /** OR of Target bits. */
  targetModules?: number;
  seed?: number;
}

export interface TrainOptions {
  learningRate?: number; weightDecay?: number; beta1?: number; beta2?: number; eps?: number;
  /** 0 disables clipping. */
  maxGradNorm?: number;
  schedule?: 'constant' | 'linear' | 'cosine' | number;
  warmupSteps?: number; totalSteps?: number; gradientCheckpointing?: boolean; seed?: number;
  /** Keep the saved layer inputs in pinned host memory (GPU only). */
  offloadActivations?: boolean;
  /** With checkpointing: the last this many layers keep their MLP's gate and up products instead
   * of recomputing them (faster; 2 × tokens × intermediate_size values a layer of device memory). */
  keptMlpLayers?: number;
}

export interface StepStats {
  step: number; loss: number; gradNorm: number; learningRate: number; tokens: number; labelledTokens: number;
}

export interface TrainRunOptions {
  /** Steps to take, cycling through the batches. Default 1. */
  steps?: number;
  /** Aborting stops training after the step in flight; the promise rejects with an AbortError. */
  signal?: AbortSignal;
  /** Called on the main thread after each step. */
  onProgress?: (stats: StepStats) => void;
}

/** A frozen base model. */
export declare class Model {
  private constructor();
  static load(dir: string, opts?: ModelOptions): Model;
  static random(shape: string, seed?: number, opts?: ModelOptions): Model;
  info(): ModelInfo;
  save(dir: string, dtype?: number): void;
  /** Greedy decoding; returns the new token ids. */
  generate(prompt: TokenArray, opts?: GenerateOptions): number[];
  /** Frees the model; trainers made from it stay usable. Safe to call twice. */
  close(): void;
}

/** LoRA adapters and their optimizer over a model. */
export declare class Trainer {
  private constructor();
  static create(model: Model, opts?: { lora?: LoraOptions; train?: TrainOptions }): Trainer;
  static loadAdapter(model: Model, dir: string, opts?: { train?: TrainOptions }): Trainer;
  /** One optimizer step over the micro-batches (gradient accumulation), on the calling thread. */
  step(batches: Batch | Batch[]): StepStats;
  /** Trains on a worker thread; resolves with the last step's stats (null for 0 steps). */
  train(batches: Batch | Batch[], opts?: TrainRunOptions): Promise<StepStats | null>;
  evalLoss(batch: Batch): number;
  saveAdapter(dir: string): void;
  exportMerged(dir: string, dtype?: number): void;
  /** Frees the trainer (after training ends, if it is running). Safe to call twice. */
  close(): void;
  on(event: 'progress', listener: (stats: StepStats) => void): this;
  once(event: 'progress', listener: (stats: StepStats) => void): this;
  off(event: 'progress', listener: (stats: StepStats) => void): this;
}

/** Opens the library now and returns its path (it opens on first use otherwise). */
export declare function loadLibrary(): string;
/** The library's version, such as "0.1.0". */
export declare function version(): string;
/** A fresh NCCL unique id (a Buffer of NCCL_UNIQUE_ID_BYTES bytes) for ModelOptions.ncclUniqueId:
 * make it on one rank and hand it to the others. Throws a FinetuneError (code FT_ERR_DEVICE, naming NCCL) where
 * libnccl.so.2 is absent. */
export declare function ncclUniqueId(): Uint8Array;
/** The library's defaults for bench(), those of `finetune bench`. */
export declare function benchDefaults(): Required<BenchOptions>;
/** Runs the training-step benchmark of `finetune bench` on the calling thread (blocking the event
 * loop) and returns its JSON text: model, device, mode, batch, seq, rank, checkpointing,
 * offload_activations, kept_mlp_layers, lm_head_in_host, layers_in_host, steps, replayed, step_seconds_median,
 * cpu_seconds_median, tokens_per_second, first_loss, last_loss, peak_rss_mib, peak_device_mib,
 * peak_device_set_by, peak_device_purposes_mib, held_device_mib, load_seconds. */
export declare function bench(opts?: BenchOptions): string;
