//! The C ABI driven through the built libfinetune.so's exported symbols (libloading), as a C
//! program would: happy path, error statuses with messages, NULL checks, cancellation.

mod common;

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};

#[repr(C)]
struct ModelParams {
    device: *const c_char,
    n_threads: u32,
    quantization: i32,
    max_device_memory_mib: u64,
    world_size: u32,
    rank: u32,
    nccl_unique_id: *const u8,
    collective_timeout_ms: u32,
    lm_head_in_host_memory: i32,
    layers_in_host_memory: u32,
}

const FT_QUANT_NF4: i32 = 1;

#[repr(C)]
struct LoraParams {
    rank: u32,
    alpha: f32,
    use_rslora: i32,
    dropout: f32,
    target_modules: u32,
    seed: u64,
}

#[repr(C)]
struct TrainParams {
    learning_rate: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    max_grad_norm: f32,
    schedule: i32,
    warmup_steps: u64,
    total_steps: u64,
    gradient_checkpointing: i32,
    seed: u64,
    offload_activations: i32,
    kept_mlp_layers: u32,
}

#[repr(C)]
struct Batch {
    input_ids: *const i32,
    labels: *const i32,
    positions: *const i32,
    segment_ids: *const i32,
    batch_size: u32,
    seq_len: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct StepStats {
    step: u64,
    loss: f32,
    grad_norm: f32,
    learning_rate: f32,
    tokens: u64,
    labelled_tokens: u64,
}

#[repr(C)]
struct RunParams {
    dataset: *const c_char,
    output_dir: *const c_char,
    max_seq_len: u32,
    packing: i32,
    batch_size: u32,
    grad_accum: u32,
    epochs: u32,
    max_steps: u64,
    eval_fraction: f32,
    eval_every: u64,
    save_every: u64,
    keep_checkpoints: u32,
    loss_on_all_tokens: i32,
    skip_bad_records: i32,
    resume: i32,
    seed: u64,
    lora: LoraParams,
    train: TrainParams,
}

#[repr(C)]
struct RunProgress {
    stats: StepStats,
    total_steps: u64,
    epoch: u64,
    tokens_per_second: f32,
    eval_loss: f32,
}

#[repr(C)]
struct BenchParams {
    model: *const c_char,
    mode: *const c_char,
    batch: u32,
    seq: u32,
    rank: u32,
    steps: u32,
    checkpointing: i32,
    n_threads: u32,
    device: *const c_char,
    max_device_memory_mib: u64,
    offload_activations: i32,
    lm_head_in_host_memory: i32,
    layers_in_host_memory: u32,
    kept_mlp_layers: u32,
}

type Opaque = c_void;
type Progress = Option<extern "C" fn(*const StepStats, *mut c_void) -> i32>;

struct Api {
    _lib: libloading::Library,
    abi_version: extern "C" fn() -> u32,
    last_error: extern "C" fn() -> *const c_char,
    status_name: extern "C" fn(i32) -> *const c_char,
    model_default_params: extern "C" fn() -> ModelParams,
    lora_default_params: extern "C" fn() -> LoraParams,
    train_default_params: extern "C" fn() -> TrainParams,
    model_load: extern "C" fn(*const c_char, *const ModelParams, *mut *mut Opaque) -> i32,
    model_free: extern "C" fn(*mut Opaque),
    trainer_new: extern "C" fn(
        *const Opaque,
        *const LoraParams,
        *const TrainParams,
        *mut *mut Opaque,
    ) -> i32,
    trainer_free: extern "C" fn(*mut Opaque),
    trainer_step: extern "C" fn(*mut Opaque, *const Batch, usize, *mut StepStats) -> i32,
    trainer_train:
        extern "C" fn(*mut Opaque, *const Batch, usize, u64, Progress, *mut c_void) -> i32,
    trainer_eval_loss: extern "C" fn(*const Opaque, *const Batch, *mut f32) -> i32,
    trainer_save_adapter: extern "C" fn(*const Opaque, *const c_char) -> i32,
    trainer_load_adapter:
        extern "C" fn(*const Opaque, *const c_char, *const TrainParams, *mut *mut Opaque) -> i32,
    model_save_gguf: extern "C" fn(*const Opaque, *const c_char, i32) -> i32,
    trainer_save_adapter_gguf: extern "C" fn(*const Opaque, *const c_char) -> i32,
    trainer_export_gguf: extern "C" fn(*const Opaque, *const c_char, i32) -> i32,
    run_default_params: extern "C" fn() -> RunParams,
    run: RunFn,
    bench_default_params: extern "C" fn() -> BenchParams,
    bench: extern "C" fn(*const BenchParams, *mut *mut c_char) -> i32,
    string_free: extern "C" fn(*mut c_char),
    nccl_unique_id: extern "C" fn(*mut u8, usize) -> i32,
}

type RunFn = extern "C" fn(
    *const Opaque,
    *const RunParams,
    Option<extern "C" fn(*const RunProgress, *mut c_void) -> i32>,
    *mut c_void,
) -> i32;

impl Api {
    fn load() -> Api {
        // SAFETY: the library is ours; each symbol is declared with its header signature.
        unsafe {
            let lib =
                libloading::Library::new(common::library_path()).expect("libfinetune.so loads");
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes()).expect($name)
                };
            }
            Api {
                abi_version: sym!("ft_abi_version"),
                last_error: sym!("ft_last_error"),
                status_name: sym!("ft_status_name"),
                model_default_params: sym!("ft_model_default_params"),
                lora_default_params: sym!("ft_lora_default_params"),
                train_default_params: sym!("ft_train_default_params"),
                nccl_unique_id: sym!("ft_nccl_unique_id"),
                model_load: sym!("ft_model_load"),
                model_free: sym!("ft_model_free"),
                trainer_new: sym!("ft_trainer_new"),
                trainer_free: sym!("ft_trainer_free"),
                trainer_step: sym!("ft_trainer_step"),
                trainer_train: sym!("ft_trainer_train"),
                trainer_eval_loss: sym!("ft_trainer_eval_loss"),
                trainer_save_adapter: sym!("ft_trainer_save_adapter"),
                trainer_load_adapter: sym!("ft_trainer_load_adapter"),
                run_default_params: sym!("ft_run_default_params"),
                run: sym!("ft_run"),
                model_save_gguf: sym!("ft_model_save_gguf"),
                trainer_save_adapter_gguf: sym!("ft_trainer_save_adapter_gguf"),
                trainer_export_gguf: sym!("ft_trainer_export_gguf"),
                bench_default_params: sym!("ft_bench_default_params"),
                bench: sym!("ft_bench"),
                string_free: sym!("ft_string_free"),
                _lib: lib,
            }
        }
    }

    /// One step, then 15 more through `ft_trainer_train`: the evaluation loss must end below
    /// the first step's. Returns the first step's statistics and the final evaluation loss.
    fn train_and_check_loss_falls(&self, trainer: *mut Opaque, batch: &Batch) -> (StepStats, f32) {
        let mut first = StepStats::default();
        let st = (self.trainer_step)(trainer, batch, 1, &mut first);
        assert_eq!(st, 0, "{}", self.error());
        let st = (self.trainer_train)(trainer, batch, 1, 15, None, null_mut());
        assert_eq!(st, 0, "{}", self.error());
        let mut loss = 0.0f32;
        assert_eq!((self.trainer_eval_loss)(trainer, batch, &mut loss), 0);
        assert!(loss < first.loss, "loss {} -> {loss}", first.loss);
        (first, loss)
    }

    fn error(&self) -> String {
        // SAFETY: ft_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr((self.last_error)()) }
            .to_string_lossy()
            .into_owned()
    }

    fn name(&self, status: i32) -> String {
        // SAFETY: ft_status_name returns a static NUL-terminated string.
        unsafe { CStr::from_ptr((self.status_name)(status)) }
            .to_string_lossy()
            .into_owned()
    }

    fn load_model(&self, dir: &std::path::Path) -> *mut Opaque {
        self.load_model_quantized(dir, self.model_default_params().quantization)
    }

    fn load_model_quantized(&self, dir: &std::path::Path, quantization: i32) -> *mut Opaque {
        let path = CString::new(dir.to_str().unwrap()).unwrap();
        let mut p = self.model_default_params();
        p.n_threads = 1;
        p.quantization = quantization;
        let mut m = null_mut();
        assert_eq!(
            (self.model_load)(path.as_ptr(), &p, &mut m),
            0,
            "{}",
            self.error()
        );
        m
    }

    fn model_default_params(&self) -> ModelParams {
        (self.model_default_params)()
    }
}

struct Tokens {
    ids: Vec<i32>,
    labels: Vec<i32>,
}

impl Tokens {
    fn new() -> Tokens {
        let ids: Vec<i32> = (0..17).map(|i| i * 7 % 64).collect();
        Tokens {
            labels: ids[1..].to_vec(),
            ids: ids[..16].to_vec(),
        }
    }
    fn batch(&self) -> Batch {
        Batch {
            input_ids: self.ids.as_ptr(),
            labels: self.labels.as_ptr(),
            positions: null(),
            segment_ids: null(),
            batch_size: 2,
            seq_len: 8,
        }
    }
}

#[test]
fn train_save_and_reload_through_the_abi() {
    let api = Api::load();
    assert_eq!((api.abi_version)(), 5);
    let dir = common::tiny_model_dir();
    let model = api.load_model(dir.path());
    let mut tp = (api.train_default_params)();
    tp.learning_rate = 1e-2;
    let lp = (api.lora_default_params)();
    assert_eq!((lp.rank, lp.target_modules), (16, 127));
    let mut trainer = null_mut();
    assert_eq!(
        (api.trainer_new)(model, &lp, &tp, &mut trainer),
        0,
        "{}",
        api.error()
    );
    let tokens = Tokens::new();
    let batch = tokens.batch();
    let (first, loss) = api.train_and_check_loss_falls(trainer, &batch);
    assert_eq!(
        (first.step, first.tokens, first.labelled_tokens),
        (1, 16, 16)
    );

    let out = tempfile::tempdir().unwrap();
    let out_c = CString::new(out.path().to_str().unwrap()).unwrap();
    assert_eq!(
        (api.trainer_save_adapter)(trainer, out_c.as_ptr()),
        0,
        "{}",
        api.error()
    );
    let mut reloaded = null_mut();
    assert_eq!(
        (api.trainer_load_adapter)(model, out_c.as_ptr(), null(), &mut reloaded),
        0,
        "{}",
        api.error()
    );
    let mut loss2 = 0.0f32;
    assert_eq!((api.trainer_eval_loss)(reloaded, &batch, &mut loss2), 0);
    assert_eq!(loss, loss2);
    // The model may be freed before its trainers: they hold the weights.
    (api.model_free)(model);
    assert_eq!((api.trainer_eval_loss)(reloaded, &batch, &mut loss2), 0);
    (api.trainer_free)(reloaded);
    (api.trainer_free)(trainer);
}

/// A model loaded with its projection matrices in NF4 trains through the ABI.
#[test]
fn qlora_trains_through_the_abi() {
    let api = Api::load();
    let defaults = api.model_default_params();
    assert_eq!(
        (defaults.quantization, defaults.max_device_memory_mib),
        (0, 0)
    );
    let dir = common::tiny_model_dir();
    let model = api.load_model_quantized(dir.path(), FT_QUANT_NF4);
    let mut tp = (api.train_default_params)();
    tp.learning_rate = 1e-2;
    let mut trainer = null_mut();
    assert_eq!(
        (api.trainer_new)(model, null(), &tp, &mut trainer),
        0,
        "{}",
        api.error()
    );
    let tokens = Tokens::new();
    let batch = tokens.batch();
    api.train_and_check_loss_falls(trainer, &batch);
    (api.trainer_free)(trainer);
    (api.model_free)(model);
}

#[test]
fn gguf_export_and_import_through_the_abi() {
    const FT_GGUF_Q8_0: i32 = 8;
    let api = Api::load();
    let dir = common::tiny_model_dir();
    let model = api.load_model(dir.path());
    let mut trainer = null_mut();
    assert_eq!((api.trainer_new)(model, null(), null(), &mut trainer), 0);
    let tokens = Tokens::new();
    assert_eq!(
        (api.trainer_step)(trainer, &tokens.batch(), 1, null_mut()),
        0
    );

    let out = tempfile::tempdir().unwrap();
    let path = |name: &str| CString::new(out.path().join(name).to_str().unwrap()).unwrap();
    let (base, merged, adapter) = (path("base.gguf"), path("merged.gguf"), path("lora.gguf"));
    assert_eq!(
        (api.model_save_gguf)(model, base.as_ptr(), FT_GGUF_Q8_0),
        0,
        "{}",
        api.error()
    );
    assert_eq!(
        (api.trainer_export_gguf)(trainer, merged.as_ptr(), FT_GGUF_Q8_0),
        0,
        "{}",
        api.error()
    );
    assert_eq!(
        (api.trainer_save_adapter_gguf)(trainer, adapter.as_ptr()),
        0,
        "{}",
        api.error()
    );
    for file in [&base, &merged] {
        let m = api.load_model(std::path::Path::new(file.to_str().unwrap()));
        (api.model_free)(m);
    }
    let mut reloaded = null_mut();
    assert_eq!(
        (api.trainer_load_adapter)(model, adapter.as_ptr(), null(), &mut reloaded),
        0,
        "{}",
        api.error()
    );
    (api.trainer_free)(reloaded);

    let status = (api.model_save_gguf)(model, base.as_ptr(), 2);
    assert_eq!(api.name(status), "FT_ERR_INVALID_ARGUMENT");
    assert!(
        api.error().contains("unknown GGUF type 2"),
        "{}",
        api.error()
    );
    (api.trainer_free)(trainer);
    (api.model_free)(model);
}

#[test]
fn errors_come_back_as_status_and_message() {
    let api = Api::load();
    let mut m = null_mut();
    let missing = CString::new("/definitely/not/a/model").unwrap();
    let st = (api.model_load)(missing.as_ptr(), null(), &mut m);
    assert_eq!(api.name(st), "FT_ERR_IO");
    assert!(
        api.error().contains("/definitely/not/a/model"),
        "{}",
        api.error()
    );
    assert!(m.is_null(), "no handle on failure");

    assert_eq!(
        api.name((api.model_load)(null(), null(), &mut m)),
        "FT_ERR_INVALID_ARGUMENT"
    );
    assert!(api.error().contains("path is NULL"), "{}", api.error());
    let dir = common::tiny_model_dir();
    let path = CString::new(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(
        api.name((api.model_load)(path.as_ptr(), null(), null_mut())),
        "FT_ERR_INVALID_ARGUMENT"
    );
    assert!(api.error().contains("out is NULL"), "{}", api.error());

    let device = CString::new("cuda:0").unwrap();
    let p = ModelParams {
        device: device.as_ptr(),
        n_threads: 1,
        ..api.model_default_params()
    };
    assert_ne!((api.model_load)(path.as_ptr(), &p, &mut m), 0);
    assert!(api.error().contains("cuda:0"), "{}", api.error());
    let p = ModelParams {
        quantization: 7,
        ..api.model_default_params()
    };
    assert_eq!(
        api.name((api.model_load)(path.as_ptr(), &p, &mut m)),
        "FT_ERR_INVALID_ARGUMENT"
    );
    assert!(api.error().contains("quantization"), "{}", api.error());

    let model = api.load_model(dir.path());
    assert!(api.error().is_empty(), "success clears the last error");
    let mut trainer = null_mut();
    let mut bad_lora = (api.lora_default_params)();
    bad_lora.rank = 0;
    assert_eq!(
        api.name((api.trainer_new)(model, &bad_lora, null(), &mut trainer)),
        "FT_ERR_INVALID_ARGUMENT"
    );
    assert!(api.error().contains("rank"), "{}", api.error());
    assert_eq!((api.trainer_new)(model, null(), null(), &mut trainer), 0);

    let mut tokens = Tokens::new();
    tokens.ids[3] = 1000;
    let st = (api.trainer_step)(trainer, &tokens.batch(), 1, null_mut());
    assert_eq!(api.name(st), "FT_ERR_INVALID_ARGUMENT");
    assert!(
        api.error().contains("token id 1000 at position 3"),
        "{}",
        api.error()
    );
    let mut nul = Tokens::new().batch();
    nul.labels = null();
    assert_ne!((api.trainer_step)(trainer, &nul, 1, null_mut()), 0);
    assert!(
        api.error().contains("batches[0].labels is NULL"),
        "{}",
        api.error()
    );
    assert_ne!(
        (api.trainer_step)(null_mut(), &Tokens::new().batch(), 1, null_mut()),
        0
    );
    assert!(api.error().contains("trainer is NULL"), "{}", api.error());

    let adapter_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        adapter_dir.path().join("adapter_config.json"),
        "{\"peft_type\": \"PREFIX_TUNING\"}",
    )
    .unwrap();
    let ad = CString::new(adapter_dir.path().to_str().unwrap()).unwrap();
    let mut t2 = null_mut();
    assert_eq!(
        api.name((api.trainer_load_adapter)(
            model,
            ad.as_ptr(),
            null(),
            &mut t2
        )),
        "FT_ERR_FORMAT"
    );
    assert!(
        api.error().contains("adapter_config.json"),
        "{}",
        api.error()
    );

    (api.trainer_free)(trainer);
    (api.model_free)(model);
    (api.model_free)(null_mut());
    (api.trainer_free)(null_mut());
}

extern "C" fn stop_after_three(stats: *const StepStats, user: *mut c_void) -> i32 {
    // SAFETY: the library passes valid stats; `user` is the counter passed below.
    let (stats, seen) = unsafe { (&*stats, &mut *(user as *mut u64)) };
    *seen = stats.step;
    (stats.step >= 3) as i32
}

#[test]
fn progress_callback_cancels_training() {
    let api = Api::load();
    let dir = common::tiny_model_dir();
    let model = api.load_model(dir.path());
    let mut trainer = null_mut();
    assert_eq!((api.trainer_new)(model, null(), null(), &mut trainer), 0);
    let tokens = Tokens::new();
    let mut seen = 0u64;
    let st = (api.trainer_train)(
        trainer,
        &tokens.batch(),
        1,
        100,
        Some(stop_after_three),
        &mut seen as *mut u64 as *mut c_void,
    );
    assert_eq!(api.name(st), "FT_ERR_CANCELLED");
    assert_eq!(seen, 3);
    // Training goes on from where it stopped.
    let mut stats = StepStats::default();
    assert_eq!(
        (api.trainer_step)(trainer, &tokens.batch(), 1, &mut stats),
        0
    );
    assert_eq!(stats.step, 4);
    (api.trainer_free)(trainer);
    (api.model_free)(model);
}

extern "C" fn record_run(p: *const RunProgress, user: *mut c_void) -> i32 {
    // SAFETY: the library passes valid progress; `user` is the vector passed below.
    let (p, seen) = unsafe { (&*p, &mut *(user as *mut Vec<(u64, u64, f32)>)) };
    seen.push((p.stats.step, p.total_steps, p.stats.loss));
    0
}

#[test]
fn one_call_trains_from_a_dataset_file() {
    let api = Api::load();
    let dir = common::tiny_chat_model_dir();
    let model = api.load_model(dir.path());
    let data = dir.path().join("data.jsonl");
    let line = r#"{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Bran."}]}"#;
    std::fs::write(
        &data,
        format!("{line}\n{line}\n{{\"text\": \"Emberfall\"}}\n"),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let (data_c, out_c) = (
        CString::new(data.to_str().unwrap()).unwrap(),
        CString::new(out.path().to_str().unwrap()).unwrap(),
    );
    let mut p = (api.run_default_params)();
    assert_eq!((p.max_seq_len, p.batch_size, p.epochs), (512, 4, 1));
    p.dataset = data_c.as_ptr();
    p.output_dir = out_c.as_ptr();
    p.batch_size = 1;
    p.epochs = 2;
    p.train.learning_rate = 1e-2;
    let mut seen: Vec<(u64, u64, f32)> = Vec::new();
    let st = (api.run)(
        model,
        &p,
        Some(record_run),
        &mut seen as *mut _ as *mut c_void,
    );
    assert_eq!(st, 0, "{}", api.error());
    assert_eq!(
        seen.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=seen.len() as u64).collect::<Vec<_>>()
    );
    assert!(seen.iter().all(|s| s.1 == seen.len() as u64), "{seen:?}");
    assert!(out
        .path()
        .join("adapter/adapter_model.safetensors")
        .is_file());
    assert!(out.path().join("metrics.jsonl").is_file() && out.path().join("loss.svg").is_file());

    p.dataset = out_c.as_ptr(); // a directory is not a dataset
    assert_eq!(
        api.name((api.run)(model, &p, None, null_mut())),
        "FT_ERR_IO"
    );
    (api.model_free)(model);
}

/// `ft_bench` on the tiny shape on the CPU returns the JSON of `finetune bench`.
#[test]
fn bench_returns_the_cli_json() {
    let api = Api::load();
    let d = (api.bench_default_params)();
    // SAFETY: the defaults' strings are static NUL-terminated strings; device is NULL ("auto").
    let (model, mode) = unsafe { (CStr::from_ptr(d.model), CStr::from_ptr(d.mode)) };
    assert_eq!(
        (model.to_str(), mode.to_str()),
        (Ok("smollm2-135m"), Ok("lora"))
    );
    assert_eq!(
        (
            d.batch,
            d.seq,
            d.rank,
            d.steps,
            d.checkpointing,
            d.n_threads
        ),
        (4, 256, 16, 3, 1, 0)
    );
    assert!(d.device.is_null());
    assert_eq!(d.max_device_memory_mib, 0);
    assert_eq!(
        (
            d.offload_activations,
            d.lm_head_in_host_memory,
            d.layers_in_host_memory,
            d.kept_mlp_layers
        ),
        (0, 0, 0, 0)
    );

    let (tiny, cpu, qlora) = (
        CString::new("tiny").unwrap(),
        CString::new("cpu").unwrap(),
        CString::new("qlora").unwrap(),
    );
    let mut p = (api.bench_default_params)();
    p.model = tiny.as_ptr();
    p.device = cpu.as_ptr();
    p.n_threads = 1;
    p.batch = 2;
    p.seq = 8;
    p.rank = 4;
    p.steps = 2;
    for mode in [null(), qlora.as_ptr()] {
        p.mode = mode;
        // The QLoRA run also asks for the host-memory options (the CPU ignores them; the JSON
        // says what was asked for) and keeps its last layer's MLP products.
        let host_options = !mode.is_null();
        p.offload_activations = host_options as i32;
        p.lm_head_in_host_memory = host_options as i32;
        p.kept_mlp_layers = host_options as u32;
        let mut json = null_mut();
        assert_eq!((api.bench)(&p, &mut json), 0, "{}", api.error());
        assert!(!json.is_null());
        // SAFETY: on success the library sets a NUL-terminated string, freed just below.
        let text = unsafe { CStr::from_ptr(json) }.to_str().unwrap().to_owned();
        (api.string_free)(json);
        let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
        let expected_mode = if mode.is_null() { "lora" } else { "qlora" };
        assert_eq!(v["model"], "tiny", "{text}");
        assert_eq!(v["mode"], expected_mode, "{text}");
        let size = |k: &str| v[k].as_u64();
        assert_eq!(
            (size("batch"), size("seq"), size("rank"), size("steps")),
            (Some(2), Some(8), Some(4), Some(2)),
            "{text}"
        );
        assert_eq!(v["checkpointing"], true, "{text}");
        assert_eq!(v["offload_activations"], host_options, "{text}");
        assert_eq!(v["lm_head_in_host"], host_options, "{text}");
        assert_eq!(v["layers_in_host"], 0, "{text}");
        assert_eq!(v["kept_mlp_layers"], host_options as u64, "{text}");
        assert!(v["device"].as_str().unwrap().starts_with("cpu"), "{text}");
        assert_eq!(v["replayed"], false, "the CPU records nothing: {text}");
        for k in [
            "peak_device_mib",
            "peak_device_set_by",
            "peak_device_purposes_mib",
            "held_device_mib",
        ] {
            assert!(v[k].is_null(), "{k}: {text}");
        }
        let tps = v["tokens_per_second"].as_f64().expect(&text);
        assert!(tps.is_finite() && tps > 0.0, "{text}");
        let loss = v["first_loss"].as_f64().expect(&text);
        // Random weights and tokens over a vocabulary of 64: the loss is near ln 64.
        assert!(loss.is_finite() && loss > 1.0, "{text}");
        // The fields of the CLI's output (serde_json's map sorts them).
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut expected = [
            "model",
            "device",
            "mode",
            "ranks",
            "batch",
            "seq",
            "rank",
            "checkpointing",
            "offload_activations",
            "kept_mlp_layers",
            "lm_head_in_host",
            "layers_in_host",
            "steps",
            "replayed",
            "step_seconds_median",
            "cpu_seconds_median",
            "tokens_per_second",
            "first_loss",
            "last_loss",
            "peak_rss_mib",
            "peak_device_mib",
            "peak_device_set_by",
            "peak_device_purposes_mib",
            "held_device_mib",
            "load_seconds",
        ];
        expected.sort();
        assert_eq!(keys, expected);
    }
    (api.string_free)(null_mut());
}

/// Bad arguments to `ft_bench` fail before any model is built, naming the field at fault, and
/// leave the output untouched.
#[test]
fn bench_refuses_bad_arguments() {
    let api = Api::load();
    let (tiny, cpu) = (CString::new("tiny").unwrap(), CString::new("cpu").unwrap());
    let good = || BenchParams {
        model: tiny.as_ptr(),
        device: cpu.as_ptr(),
        n_threads: 1,
        batch: 1,
        seq: 4,
        rank: 2,
        steps: 1,
        ..(api.bench_default_params)()
    };
    let sentinel = 0x5a as *mut c_char;
    let check = |p: *const BenchParams, out: *mut *mut c_char, status: &str, words: &[&str]| {
        let st = (api.bench)(p, out);
        assert_eq!(api.name(st), status, "{}", api.error());
        let e = api.error();
        for w in words {
            assert!(e.contains(w), "{w:?} not in {e:?}");
        }
    };
    let mut out = sentinel;

    check(
        &good(),
        null_mut(),
        "FT_ERR_INVALID_ARGUMENT",
        &["json_out is NULL"],
    );
    let p = BenchParams {
        model: null(),
        ..good()
    };
    check(
        &p,
        &mut out,
        "FT_ERR_INVALID_ARGUMENT",
        &["params->model is NULL"],
    );
    let nope = CString::new("gpt-5").unwrap();
    let p = BenchParams {
        model: nope.as_ptr(),
        ..good()
    };
    check(
        &p,
        &mut out,
        "FT_ERR_INVALID_ARGUMENT",
        &["unknown model shape \"gpt-5\"", "smollm2-135m", "tiny"],
    );
    let int8 = CString::new("int8").unwrap();
    let p = BenchParams {
        mode: int8.as_ptr(),
        ..good()
    };
    check(
        &p,
        &mut out,
        "FT_ERR_INVALID_ARGUMENT",
        &["mode \"int8\"", "lora or qlora"],
    );
    let tpu = CString::new("tpu").unwrap();
    let p = BenchParams {
        device: tpu.as_ptr(),
        ..good()
    };
    check(&p, &mut out, "FT_ERR_INVALID_ARGUMENT", &["device \"tpu\""]);
    let bad_utf8 = [0xffu8, 0];
    let p = BenchParams {
        mode: bad_utf8.as_ptr().cast(),
        ..good()
    };
    check(
        &p,
        &mut out,
        "FT_ERR_INVALID_ARGUMENT",
        &["params->mode is not valid UTF-8"],
    );
    for field in ["batch", "seq", "rank", "steps"] {
        let mut p = good();
        match field {
            "batch" => p.batch = 0,
            "seq" => p.seq = 0,
            "rank" => p.rank = 0,
            _ => p.steps = 0,
        }
        check(
            &p,
            &mut out,
            "FT_ERR_INVALID_ARGUMENT",
            &[&format!("{field} is 0")],
        );
    }
    // Layers in host memory: at most the tiny shape's 2.
    let p = BenchParams {
        layers_in_host_memory: 3,
        ..good()
    };
    check(
        &p,
        &mut out,
        "FT_ERR_INVALID_ARGUMENT",
        &["layers_in_host: 3 layers asked for; the model has 2"],
    );
    assert_eq!(out, sentinel, "no output on failure");

    // A good call succeeds and clears the last error.
    assert_eq!((api.bench)(&good(), &mut out), 0, "{}", api.error());
    assert!(out != sentinel && !out.is_null());
    assert!(api.error().is_empty());
    (api.string_free)(out);
}

/// A data-parallel group's parameters are checked before anything loads; a unique id needs
/// NCCL (present on GPU machines, absent in CI: then the error names it).
#[test]
fn process_group_parameters_are_checked() {
    let api = Api::load();
    let dir = common::tiny_model_dir();
    let path = CString::new(dir.path().to_str().unwrap()).unwrap();
    let device = CString::new("cuda:0").unwrap();
    let mut m: *mut Opaque = null_mut();
    let refused = |p: &ModelParams, needle: &str| {
        let mut m: *mut Opaque = null_mut();
        assert_eq!((api.model_load)(path.as_ptr(), p, &mut m), 1, "{needle}");
        assert!(m.is_null());
        assert!(api.error().contains(needle), "{}", api.error());
    };
    let id = [7u8; 128];
    let group = ModelParams {
        device: device.as_ptr(),
        world_size: 2,
        rank: 0,
        nccl_unique_id: id.as_ptr(),
        ..api.model_default_params()
    };
    refused(
        &ModelParams {
            nccl_unique_id: std::ptr::null(),
            ..group
        },
        "params->nccl_unique_id",
    );
    refused(&ModelParams { rank: 2, ..group }, "params->rank 2");
    let cpu = CString::new("cpu").unwrap();
    refused(
        &ModelParams {
            device: cpu.as_ptr(),
            ..group
        },
        "cuda:N",
    );
    // A world of one (or zero) is a model of its own: the id is not read.
    let alone = ModelParams {
        world_size: 1,
        rank: 5,
        nccl_unique_id: std::ptr::null(),
        n_threads: 1,
        ..api.model_default_params()
    };
    let cpu_alone = ModelParams {
        device: cpu.as_ptr(),
        ..alone
    };
    assert_eq!((api.model_load)(path.as_ptr(), &cpu_alone, &mut m), 0);
    (api.model_free)(m);

    let mut out = [0u8; 128];
    assert_eq!((api.nccl_unique_id)(out.as_mut_ptr(), 127), 1);
    assert!(api.error().contains("128 bytes"), "{}", api.error());
    assert_eq!((api.nccl_unique_id)(null_mut(), 128), 1);
    match (api.nccl_unique_id)(out.as_mut_ptr(), out.len()) {
        0 => assert!(out.iter().any(|&b| b != 0), "an all-zero id"),
        9 => assert!(api.error().contains("NCCL"), "{}", api.error()),
        other => panic!("status {other}: {}", api.error()),
    }
}
