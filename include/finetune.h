/*
 * libfinetune: LoRA fine-tuning of Llama-family language models, embeddable through a C ABI.
 *
 * This file is generated from src/capi by cbindgen (see tests/c_header.rs); do not edit it.
 *
 * Conventions
 * - Every fallible function returns an ft_status: FT_OK (0) or an FT_ERR_* code. After a failure,
 *   ft_last_error() gives a message naming the file, field or argument at fault.
 * - Objects are opaque handles created by ft_*_load / ft_*_new / ft_*_random and released by the
 *   matching ft_*_free, which accepts NULL. Output handles are written only on success.
 * - Parameter structs are passed by pointer; start from ft_*_default_params() and change fields.
 *   NULL for a parameter pointer means the defaults. The library keeps no pointer to caller
 *   memory after a call returns: strings and arrays are read during the call only.
 * - Paths are UTF-8, NUL-terminated.
 * - A string the library allocates for the caller (the JSON of ft_bench) is released with
 *   ft_string_free.
 *
 * Threads
 * - An ft_model is read-only after creation: any number of threads may use it at once.
 * - An ft_trainer must be used by one thread at a time.
 * - ft_last_error() is per thread, valid until the next ft_* call on that thread.
 * - Long calls (ft_trainer_train) report progress through a callback, which can cancel them.
 *   ft_bench has none: it holds the calling thread for its whole measurement.
 * - No call lets a Rust panic cross into C: an internal defect surfaces as FT_ERR_INTERNAL.
 */


#ifndef FINETUNE_H
#define FINETUNE_H

#include <stddef.h>
#include <stdint.h>

/**
 * Version of this C ABI. It changes only when an existing declaration changes incompatibly.
 */
#define FT_ABI_VERSION 5

/**
 * LoRA target bits for `ft_lora_params.target_modules`.
 */
#define FT_TARGET_Q 1

#define FT_TARGET_K 2

#define FT_TARGET_V 4

#define FT_TARGET_O 8

#define FT_TARGET_GATE 16

#define FT_TARGET_UP 32

#define FT_TARGET_DOWN 64

#define FT_TARGET_ALL 127

/**
 * Learning-rate schedules for `ft_train_params.schedule`.
 */
#define FT_SCHEDULE_CONSTANT 0

#define FT_SCHEDULE_LINEAR 1

#define FT_SCHEDULE_COSINE 2

/**
 * Label meaning "no loss at this position" in `ft_batch.labels`.
 */
#define FT_IGNORE_LABEL -100

/**
 * `ft_model_params.quantization`: frozen projection matrices in the device's own format (f32 on
 * the CPU, bf16 on a GPU).
 */
#define FT_QUANT_NONE 0

/**
 * `ft_model_params.quantization`: frozen projection matrices in NF4 with double-quantized
 * absmax (QLoRA), dequantized on the fly for each product.
 */
#define FT_QUANT_NF4 1

/**
 * Element types for exported weights.
 */
#define FT_DTYPE_F32 0

#define FT_DTYPE_F16 1

#define FT_DTYPE_BF16 2

/**
 * Tensor types for GGUF export (`ft_model_save_gguf`, `ft_trainer_export_gguf`): ggml's type
 * numbers. Norm weights are always written as F32.
 */
#define FT_GGUF_F32 0

#define FT_GGUF_F16 1

#define FT_GGUF_Q8_0 8

#define FT_GGUF_BF16 30

/**
 * Bytes of an NCCL unique id (`ft_nccl_unique_id`).
 */
#define FT_NCCL_UNIQUE_ID_BYTES 128

/**
 * A frozen base model (opaque). Created by `ft_model_load` or `ft_model_random`, released by
 * `ft_model_free`. Read-only once created: it may be used from several threads at once and
 * shared by several trainers (each keeps the weights alive, so frees may come in any order).
 */
typedef struct ft_model ft_model;

/**
 * LoRA adapters with their optimizer state (opaque). Not thread-safe: use one trainer from one
 * thread at a time. It holds its own reference to the model's weights, so the trainer and the
 * model may be freed in either order.
 */
typedef struct ft_trainer ft_trainer;

/**
 * What `ft_bench` measures: the options of `finetune bench`. Get defaults from
 * `ft_bench_default_params()`. Strings are read during the call only.
 */
typedef struct ft_bench_params {
  /**
   * A named shape with random weights: "smollm2-135m", "llama3.2-1b", "llama3-8b",
   * "mistral-7b", "qwen2.5-7b", "gemma-7b", or "tiny" (two layers, hidden size 32).
   */
  const char *model;
  /**
   * "lora" (frozen weights in the device's own format) or "qlora" (frozen projection
   * matrices quantized to NF4 at load); NULL means "lora".
   */
  const char *mode;
  /**
   * Rows per step and GPU, at least 1.
   */
  uint32_t batch;
  /**
   * Tokens per row, at least 1.
   */
  uint32_t seq;
  /**
   * LoRA rank (alpha equals it), at least 1; all seven projections are adapted.
   */
  uint32_t rank;
  /**
   * Steps timed after the untimed warm-up (one step, two where the second records the pass
   * on a GPU), at least 1.
   */
  uint32_t steps;
  /**
   * Non-zero: recompute each layer in the backward pass instead of keeping its activations.
   */
  int32_t checkpointing;
  /**
   * CPU worker threads; 0 means one per core.
   */
  uint32_t n_threads;
  /**
   * "auto", "cpu", "cuda:N" or several GPUs ("cuda:0,cuda:1", "cuda:all"; each takes `batch`
   * rows), as in `ft_model_params`; NULL means "auto".
   */
  const char *device;
  /**
   * A cap on the device memory held, in MiB; 0 means none. GPU only (ignored on the CPU).
   */
  uint64_t max_device_memory_mib;
  /**
   * Non-zero: keep the saved layer inputs in pinned host memory (GPU only), as
   * `ft_train_params.offload_activations`.
   */
  int32_t offload_activations;
  /**
   * Non-zero: keep the LM head in pinned host memory (GPU only), as
   * `ft_model_params.lm_head_in_host_memory`.
   */
  int32_t lm_head_in_host_memory;
  /**
   * Decoder layers kept in pinned host memory (GPU only), as
   * `ft_model_params.layers_in_host_memory`.
   */
  uint32_t layers_in_host_memory;
  /**
   * Layers that keep their MLP's gate and up products, as
   * `ft_train_params.kept_mlp_layers`.
   */
  uint32_t kept_mlp_layers;
} ft_bench_params;

/**
 * Result of every fallible call: `FT_OK` (0) or one of the `FT_ERR_*` codes.
 */
typedef int32_t ft_status;

/**
 * How to load a model. Get defaults from `ft_model_default_params()`.
 */
typedef struct ft_model_params {
  /**
   * "auto" (the first CUDA GPU when its driver, NVRTC and cuBLAS load, else the CPU), "cpu",
   * "cuda:N", a list such as "cuda:0,cuda:1" or "cuda:all" (several GPUs of this process
   * training as one data-parallel group over NCCL: each holds a replica and takes its share
   * of every batch's rows); NULL means "auto". Read during the call only.
   */
  const char *device;
  /**
   * CPU worker threads; 0 means one per core.
   */
  uint32_t n_threads;
  /**
   * How the frozen projection matrices (q, k, v, o, gate, up, down) are stored: `FT_QUANT_NONE`
   * or `FT_QUANT_NF4` (QLoRA). The embedding and LM head are never quantized. A
   * bitsandbytes-4bit checkpoint stays in NF4 as read with `FT_QUANT_NF4` and is dequantized
   * with `FT_QUANT_NONE`.
   */
  int32_t quantization;
  /**
   * A cap on the device memory the model and its trainers hold, in MiB; 0 means none. An
   * allocation past it fails with `FT_ERR_OUT_OF_MEMORY`, leaving the model and trainers
   * usable. GPU only (ignored on the CPU).
   */
  uint64_t max_device_memory_mib;
  /**
   * Ranks in a data-parallel group spanning processes or hosts; 0 or 1 means this process
   * trains alone (or over the GPUs `device` lists). With more, `device` must be one "cuda:N",
   * `rank` and `nccl_unique_id` say where this process stands, and each step's batches are
   * this rank's own share: the gradients are summed over the group as if one trainer had
   * taken the union of all ranks' batches. Loading waits until every rank has joined.
   */
  uint32_t world_size;
  /**
   * This process's rank, 0 ≤ rank < world_size.
   */
  uint32_t rank;
  /**
   * `FT_NCCL_UNIQUE_ID_BYTES` bytes made by `ft_nccl_unique_id` on one rank and handed to the
   * others by the application; read during the call only. Ignored when world_size ≤ 1.
   */
  const uint8_t *nccl_unique_id;
  /**
   * How long a rank waits for the others (joining, each step) before failing with
   * `FT_ERR_COLLECTIVE` instead of hanging, in milliseconds; 0 means 300000 (5 minutes).
   */
  uint32_t collective_timeout_ms;
  /**
   * Non-zero: keep the LM head (or, tied, the embedding table serving as one) in pinned host
   * memory instead of device memory (GPU only; 1 GiB less held on Llama 3). Each micro-batch's
   * forward pass starts copying it to the device in chunks of rows beside its last quarter of
   * layers (after the last layer kept in host memory), and the loss takes the rest chunk by
   * chunk (~384 MiB of it ahead of the chunk being read); evaluation and generation copy it
   * whole for each product (a generated token then costs one copy of it over the bus).
   */
  int32_t lm_head_in_host_memory;
  /**
   * Decoder layers whose projection matrices stay in pinned host memory instead of device
   * memory (GPU only; bf16 matrices whole, 421 MiB a layer on Llama 3 8B; NF4 ones their
   * codes, ~105 MiB): spread evenly over the layers, at most all of them. A training pass
   * copies each to the device ahead of the layer, beside the layers before it, holding one
   * such copy at a time (two where host layers are adjacent: the next comes over while one
   * runs); evaluation and generation bring them the same way (generation: each host layer
   * once a token). Adjacent bf16 host layers make a pass wait on the bus (a layer's copy takes
   * about as long as its forward); up to (layers − 2)/2 of them are never adjacent. 0: none.
   */
  uint32_t layers_in_host_memory;
} ft_model_params;

/**
 * Sizes of a loaded model.
 */
typedef struct ft_model_info {
  uint64_t vocab_size;
  uint64_t hidden_size;
  uint64_t intermediate_size;
  uint64_t num_layers;
  uint64_t num_heads;
  uint64_t num_kv_heads;
  uint64_t head_dim;
} ft_model_info;

/**
 * Device memory held by a model's backend: its weights plus the tensors of every trainer and
 * call running on it.
 */
typedef struct ft_device_memory {
  /**
   * 1 when the model is on a GPU; 0 on the CPU (the byte counts are then 0).
   */
  int32_t on_device;
  uint64_t live_bytes;
  /**
   * The most bytes held at once since the model was created or the peak was last reset.
   */
  uint64_t peak_bytes;
} ft_device_memory;

/**
 * LoRA shape. Get defaults from `ft_lora_default_params()`: r 16, alpha 16, all seven targets.
 */
typedef struct ft_lora_params {
  uint32_t rank;
  float alpha;
  /**
   * Non-zero: scale alpha/sqrt(rank) (rsLoRA) instead of alpha/rank.
   */
  int32_t use_rslora;
  /**
   * Dropout on the adapter input while training, in [0, 1).
   */
  float dropout;
  /**
   * OR of `FT_TARGET_*` bits.
   */
  uint32_t target_modules;
  /**
   * Seed of the A initialisation.
   */
  uint64_t seed;
} ft_lora_params;

/**
 * Optimizer and schedule. Get defaults from `ft_train_default_params()`.
 */
typedef struct ft_train_params {
  float learning_rate;
  float weight_decay;
  float beta1;
  float beta2;
  float eps;
  /**
   * Clip the global gradient norm to this; 0 disables clipping.
   */
  float max_grad_norm;
  /**
   * One of `FT_SCHEDULE_*`.
   */
  int32_t schedule;
  uint64_t warmup_steps;
  /**
   * Steps the schedule decays over.
   */
  uint64_t total_steps;
  /**
   * Non-zero: recompute each layer in the backward pass (less memory, ~1/3 more compute).
   */
  int32_t gradient_checkpointing;
  /**
   * Seed of the dropout masks.
   */
  uint64_t seed;
  /**
   * Non-zero: keep the saved layer inputs in pinned host memory instead of device memory,
   * copied out and back beside the compute (GPU only); with checkpointing, each layer's
   * attention output, its inputs (q, k, v) and x1 too when all of them take at most a quarter
   * of the host's memory (the backward then skips the recomputed attention forward and, where
   * the adapters' inputs are kept, every product before the MLP).
   */
  int32_t offload_activations;
  /**
   * With checkpointing: the last this many decoder layers keep their MLP's gate and up
   * products on the device instead of recomputing them in the backward pass (faster;
   * 2 × tokens × intermediate_size bf16 values a layer of device memory on a GPU). 0: none.
   */
  uint32_t kept_mlp_layers;
} ft_train_params;

/**
 * Settings of a run. Get defaults from `ft_run_default_params()`, then set at least `dataset`
 * and `output_dir`. Strings are read during the call only.
 */
typedef struct ft_run_params {
  /**
   * JSONL or JSON array of text, alpaca, chat (`messages`) or ShareGPT records.
   */
  const char *dataset;
  /**
   * Receives adapter/, checkpoints/, metrics.jsonl and loss.svg.
   */
  const char *output_dir;
  uint32_t max_seq_len;
  /**
   * Non-zero: several records per row (attention stays inside each record).
   */
  int32_t packing;
  /**
   * Rows per micro-batch.
   */
  uint32_t batch_size;
  /**
   * Micro-batches per optimizer step.
   */
  uint32_t grad_accum;
  uint32_t epochs;
  /**
   * Stop after this many steps; 0: run `epochs` epochs.
   */
  uint64_t max_steps;
  /**
   * Share of records held out for evaluation, in [0, 1).
   */
  float eval_fraction;
  /**
   * Evaluate every this many steps; 0: only at the end.
   */
  uint64_t eval_every;
  /**
   * Checkpoint every this many steps; 0: never during the run.
   */
  uint64_t save_every;
  uint32_t keep_checkpoints;
  /**
   * Non-zero: loss on every token, not only assistant turns and completions.
   */
  int32_t loss_on_all_tokens;
  /**
   * Non-zero: leave out unreadable records (counted) instead of failing.
   */
  int32_t skip_bad_records;
  /**
   * Non-zero: continue from the newest checkpoint in `output_dir`.
   */
  int32_t resume;
  /**
   * Seed of data order, eval split, LoRA initialisation and dropout.
   */
  uint64_t seed;
  struct ft_lora_params lora;
  /**
   * `total_steps` is ignored: the run computes it from the data.
   */
  struct ft_train_params train;
} ft_run_params;

/**
 * What one optimizer step did.
 */
typedef struct ft_step_stats {
  /**
   * 1-based number of the step just taken.
   */
  uint64_t step;
  /**
   * Mean cross-entropy over the labelled tokens.
   */
  float loss;
  /**
   * Global gradient norm before clipping.
   */
  float grad_norm;
  float learning_rate;
  uint64_t tokens;
  uint64_t labelled_tokens;
} ft_step_stats;

/**
 * Progress of a run, after each step.
 */
typedef struct ft_run_progress {
  struct ft_step_stats stats;
  uint64_t total_steps;
  uint64_t epoch;
  float tokens_per_second;
  /**
   * Evaluation loss when this step evaluated, NaN otherwise.
   */
  float eval_loss;
} ft_run_progress;

/**
 * Called after each step of `ft_run`; return 0 to go on, non-zero to stop (a checkpoint is
 * written first and `ft_run` returns `FT_ERR_CANCELLED`; resume later with `resume = 1`).
 */
typedef int32_t (*ft_run_progress_fn)(const struct ft_run_progress *progress, void *user_data);

/**
 * A batch of `batch_size` rows of `seq_len` tokens, each array holding batch_size·seq_len values
 * row by row. `labels[t]` is the token expected after position t, or `FT_IGNORE_LABEL` (-100) for no loss
 * there.
 * `positions` (NULL: 0..seq_len in every row) and `segment_ids` (NULL: one segment a row) let
 * several examples share a row without attending to each other. The arrays are read during the
 * call only.
 */
typedef struct ft_batch {
  const int32_t *input_ids;
  const int32_t *labels;
  const int32_t *positions;
  const int32_t *segment_ids;
  uint32_t batch_size;
  uint32_t seq_len;
} ft_batch;

/**
 * Called after each step of `ft_trainer_train` with that step's statistics. Return 0 to go on,
 * anything else to stop: the call then returns `FT_ERR_CANCELLED` with the steps taken so far
 * applied.
 */
typedef int32_t (*ft_progress_fn)(const struct ft_step_stats *stats, void *user_data);

#define FT_OK 0

/**
 * A NULL pointer, a value out of range, or inconsistent arguments.
 */
#define FT_ERR_INVALID_ARGUMENT 1

/**
 * The operating system refused to read or write a file.
 */
#define FT_ERR_IO 2

/**
 * A file is malformed (safetensors header, config.json, adapter files).
 */
#define FT_ERR_FORMAT 3

/**
 * The model's architecture or a requested feature is not supported.
 */
#define FT_ERR_UNSUPPORTED 4

/**
 * An adapter does not fit the model.
 */
#define FT_ERR_ADAPTER_MISMATCH 5

/**
 * The progress callback asked to stop.
 */
#define FT_ERR_CANCELLED 6

/**
 * A loss or gradient was NaN or infinite; the adapter was not updated.
 */
#define FT_ERR_NON_FINITE 7

/**
 * A defect inside the library (a caught panic); the message says where.
 */
#define FT_ERR_INTERNAL 8

/**
 * The GPU, its driver or a CUDA library failed or is absent (the message names which).
 */
#define FT_ERR_DEVICE 9

/**
 * A device allocation did not fit; the message gives the size asked for. The objects involved
 * stay usable (a smaller batch may then work).
 */
#define FT_ERR_OUT_OF_MEMORY 10

/**
 * A data-parallel group failed: another rank returned an error, died or did not answer within
 * the group's timeout. The group is aborted (load the model again to train together); the call
 * returned instead of hanging.
 */
#define FT_ERR_COLLECTIVE 11

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Returns `FT_ABI_VERSION` as compiled into the library (compare with the header's).
 */
uint32_t ft_abi_version(void);

/**
 * The library's version, a static NUL-terminated string such as "0.1.0".
 */
const char *ft_version(void);

/**
 * Releases a string the library allocated for the caller (the JSON of `ft_bench`). NULL is
 * ignored. Never pass it other strings: not `ft_last_error`, `ft_version` or `ft_status_name`
 * (static or owned by the library), nor memory from malloc.
 */
void ft_string_free(char *s);

/**
 * Defaults, those of `finetune bench`: model "smollm2-135m", mode "lora", batch 4, seq 256,
 * rank 16, 3 timed steps, checkpointing on, one thread per core, device "auto" (NULL), no
 * device-memory cap, no offload, the LM head in device memory.
 */
struct ft_bench_params ft_bench_default_params(void);

/**
 * Builds a model of the named shape with random weights on the device, runs the warm-up (one
 * step, two where the second records the pass) and `steps` timed training steps on random
 * tokens, and sets `*json_out` to the JSON object that `finetune bench` prints: model, device,
 * mode, ranks, batch, seq, rank, checkpointing, offload_activations, kept_mlp_layers,
 * lm_head_in_host, layers_in_host, steps, replayed
 * (whether the timed steps replayed a recorded pass), step_seconds_median,
 * cpu_seconds_median (null where the OS does not report it), tokens_per_second, first_loss,
 * last_loss, peak_rss_mib (the whole process's peak resident memory), peak_device_mib,
 * peak_device_set_by (what the allocation that reached the peak was for),
 * peak_device_purposes_mib (what the peak was made of: [purpose, MiB] pairs, largest first),
 * held_device_mib (held between steps; these four null on the CPU) and load_seconds.
 * The caller frees the string with `ft_string_free`; on failure `*json_out` is left untouched. `params` may be NULL for the
 * defaults. The call runs on the calling thread and may take minutes for the larger shapes.
 * An unknown model or mode, or a batch, seq, rank or steps of 0 fails with
 * `FT_ERR_INVALID_ARGUMENT` before any model is built.
 */
ft_status ft_bench(const struct ft_bench_params *params,
                   char **json_out);

/**
 * The message of the last failed call on this thread ("" after a successful one). The pointer
 * stays valid until the next `ft_*` call on the same thread; never free it.
 */
const char *ft_last_error(void);

/**
 * A static name for a status code ("FT_OK", "FT_ERR_IO", ...).
 */
const char *ft_status_name(ft_status status);

/**
 * Loads a Hugging Face model directory (config.json and model.safetensors, or a sharded
 * model.safetensors.index.json) or a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
 * Q4_K, Q5_K or Q6_K tensors, dequantized; its embedded tokenizer is kept) given as a UTF-8 path. `params` may be NULL for defaults. On
 * success `*out` receives a model the caller frees with `ft_model_free`; on failure `*out` is
 * left untouched.
 */
ft_status ft_model_load(const char *path,
                        const struct ft_model_params *params,
                        struct ft_model **out);

/**
 * Creates a model of a named shape ("tiny", "smollm2-135m", "llama3-8b", ...) with random
 * weights drawn from `seed`: for tests, benchmarks and demos.
 */
ft_status ft_model_random(const char *shape,
                          uint64_t seed,
                          const struct ft_model_params *params,
                          struct ft_model **out);

/**
 * Fills `*out` with the model's sizes.
 */
ft_status ft_model_get_info(const struct ft_model *model, struct ft_model_info *out);

/**
 * Fills `*out` with the device memory the model's backend holds now and its peak.
 */
ft_status ft_model_device_memory(const struct ft_model *model, struct ft_device_memory *out);

/**
 * Starts a new peak measurement: the peak of `ft_model_device_memory` becomes the bytes held now.
 */
ft_status ft_model_reset_peak_memory(const struct ft_model *model);

/**
 * Writes the model as a Hugging Face directory (config.json + model.safetensors) with weights
 * of `dtype` (`FT_DTYPE_*`).
 */
ft_status ft_model_save(const struct ft_model *model, const char *dir, int32_t dtype);

/**
 * Writes the model as one GGUF file at `path` with matrices of type `ggml_type` (`FT_GGUF_*`), in
 * the layout llama.cpp loads. The tokenizer is included when the model was loaded from GGUF.
 */
ft_status ft_model_save_gguf(const struct ft_model *model, const char *path, int32_t ggml_type);

/**
 * Greedy decoding: appends up to `max_new_tokens` arg-max tokens to the `n_prompt` prompt
 * tokens, stopping after `stop_token` if it is not negative. With a non-NULL `trainer` its
 * adapters are applied. Writes the new tokens to `out` (room for `max_new_tokens` values) and
 * their number to `*n_out`.
 */
ft_status ft_model_generate(const struct ft_model *model,
                            const struct ft_trainer *trainer,
                            const int32_t *prompt,
                            size_t n_prompt,
                            size_t max_new_tokens,
                            int32_t stop_token,
                            int32_t *out,
                            size_t *n_out);

/**
 * Releases a model. NULL is ignored. Trainers created on it stay usable.
 */
void ft_model_free(struct ft_model *model);

/**
 * Makes a fresh NCCL unique id for a data-parallel group spanning processes
 * (`ft_model_params.world_size` > 1) and writes its `FT_NCCL_UNIQUE_ID_BYTES` bytes to `out`
 * (`out_len` must be at least that). Call it on one rank and hand the bytes to the others
 * however the application likes (a file, an environment variable, its own messages); the
 * process that made it hosts the group's rendezvous and must stay alive until every rank has
 * loaded its model. Needs NCCL (libnccl.so.2): `FT_ERR_DEVICE` names it when absent.
 */
ft_status ft_nccl_unique_id(uint8_t *out, size_t out_len);

/**
 * Defaults: device "auto", one thread per core, no quantization, no device-memory cap, no
 * process group, the LM head in device memory.
 */
struct ft_model_params ft_model_default_params(void);

/**
 * Defaults: rank 16, alpha 16, no rsLoRA, no dropout, all seven projections, seed 0.
 */
struct ft_lora_params ft_lora_default_params(void);

/**
 * Defaults: AdamW lr 2e-4, betas 0.9/0.999, eps 1e-8, no weight decay, clip 1.0, linear
 * schedule over 100 steps without warmup, checkpointing on, no offload, seed 0.
 */
struct ft_train_params ft_train_default_params(void);

/**
 * Defaults: max_seq_len 512, packing, batch 4, no accumulation, 1 epoch, no eval split, no
 * intermediate checkpoints (2 kept when enabled), loss on completions only, seed 0, and the
 * LoRA and optimizer defaults.
 */
struct ft_run_params ft_run_default_params(void);

/**
 * Trains LoRA adapters on `params->dataset` with the model's tokenizer and chat template, and
 * writes them to `params->output_dir`/adapter. `progress` may be NULL.
 */
ft_status ft_run(const struct ft_model *model,
                 const struct ft_run_params *params,
                 ft_run_progress_fn progress,
                 void *user_data);

/**
 * Attaches fresh LoRA adapters to `model` (A Kaiming-uniform from `lora->seed`, B zero, as PEFT
 * does). `lora` and `train` may be NULL for defaults. The caller frees `*out` with
 * `ft_trainer_free`.
 */
ft_status ft_trainer_new(const struct ft_model *model,
                         const struct ft_lora_params *lora,
                         const struct ft_train_params *train,
                         struct ft_trainer **out);

/**
 * Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a GGUF
 * LoRA adapter file onto `model`, to continue training or to generate with it. Fails with
 * `FT_ERR_ADAPTER_MISMATCH` when its shapes do not fit the model.
 */
ft_status ft_trainer_load_adapter(const struct ft_model *model,
                                  const char *dir,
                                  const struct ft_train_params *train,
                                  struct ft_trainer **out);

/**
 * One optimizer step over `n_batches` micro-batches (gradient accumulation: the loss is the mean
 * over all their labelled tokens). `out` may be NULL. A non-finite loss or gradient returns
 * `FT_ERR_NON_FINITE` and leaves the adapters unchanged.
 */
ft_status ft_trainer_step(struct ft_trainer *trainer,
                          const struct ft_batch *batches,
                          size_t n_batches,
                          struct ft_step_stats *out);

/**
 * Takes `steps` optimizer steps, step i on `batches[i % n_batches]`, calling `progress` (may be
 * NULL) after each. Returns `FT_ERR_CANCELLED` if `progress` asks to stop.
 */
ft_status ft_trainer_train(struct ft_trainer *trainer,
                           const struct ft_batch *batches,
                           size_t n_batches,
                           uint64_t steps,
                           ft_progress_fn progress,
                           void *user_data);

/**
 * Mean loss on one batch with the current adapters, no dropout and no update.
 */
ft_status ft_trainer_eval_loss(const struct ft_trainer *trainer,
                               const struct ft_batch *batch,
                               float *out);

/**
 * Writes the adapters in PEFT's format into `dir` (created if needed): adapter_config.json and
 * adapter_model.safetensors, each replaced atomically.
 */
ft_status ft_trainer_save_adapter(const struct ft_trainer *trainer, const char *dir);

/**
 * Writes the base model with the adapters merged (W + scale·B·A) as a Hugging Face directory
 * with weights of `dtype` (`FT_DTYPE_*`).
 */
ft_status ft_trainer_export_merged(const struct ft_trainer *trainer,
                                   const char *dir,
                                   int32_t dtype);

/**
 * Writes the adapters as one GGUF LoRA adapter file at `path` (general.type "adapter"), which
 * llama.cpp applies to the base model with `--lora` or `llama_adapter_lora_init`.
 */
ft_status ft_trainer_save_adapter_gguf(const struct ft_trainer *trainer, const char *path);

/**
 * Writes the base model with the adapters merged (W + scale·B·A) as one GGUF file at `path`
 * with matrices of type `ggml_type` (`FT_GGUF_*`).
 */
ft_status ft_trainer_export_gguf(const struct ft_trainer *trainer,
                                 const char *path,
                                 int32_t ggml_type);

/**
 * Releases a trainer. NULL is ignored.
 */
void ft_trainer_free(struct ft_trainer *trainer);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* FINETUNE_H */
