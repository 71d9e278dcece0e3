#!/usr/bin/env python3
"""Parity with Hugging Face PEFT: loss and LoRA gradients of libfinetune against transformers + peft.

For machines that have torch, transformers and peft (it skips, exit 0, when they are missing).
For each model family it

1. makes a tiny random model directory (f32): `finetune create --shape tiny` gives the llama one;
   the other families are derived from the same weights here (config.json of that family, plus
   the tensors it needs: q/k/v biases for qwen2, q/k norms for qwen3, tied embeddings and
   (1 + w) norms for gemma), because `create` only knows the llama-family "tiny" shape;
   "llama3-rope" adds Llama 3 rope scaling, and "llama3-hfcfg" is that with rope_theta 500000
   and its config.json rewritten by the installed transformers' save_pretrained;
2. drives libfinetune through its C API (ctypes): loads the model, creates a trainer (r 8,
   alpha 16, dropout 0, all seven projections, fixed seed), takes one ordinary AdamW step on a
   fixed batch so that LoRA B is no longer zero, and saves the adapter as `start/`;
3. loads `start/` into a fresh trainer whose AdamW update *is* the gradient (see
   `gradient_params`), takes one step on the same batch and saves `after/`: our gradient is
   start − after, and the loss that step reports (computed before its update) is our loss;
4. loads the same model directory with transformers (f32) and `start/` with
   PeftModel.from_pretrained, computes the loss on the same batch, backpropagates, and compares
   every lora_A / lora_B gradient (by PEFT key) with ours: relative error ‖ours − peft‖/‖peft‖
   and cosine, plus the loss and the global gradient norm our step reports.

Usage (by default the newer of target/release and target/debug holds the library and the CLI):

    python3 tests/peft_parity.py [--lib target/debug/libfinetune.so] [--finetune target/debug/finetune]
                                 [--device cpu|cuda:0] [--families llama,qwen2,...] [--keep DIR]
    python3 tests/peft_parity.py --lib .gpu/libfinetune.so --device cuda:0   # a GPU bundle

The CLI defaults to the `finetune` beside the library; a `kernel-cache` folder beside the
library becomes FINETUNE_KERNEL_CACHE unless that is set. PEFT runs in f32 on the CPU unless
--torch-device says otherwise. It prints a table per family and exits 1 when any comparison is
outside its tolerance (CPU: 1e-4 relative per gradient; CUDA, where our base weights are bf16:
loss within 1e-2 relative and cosine ≥ 0.999 per gradient).
"""

import argparse
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    import peft
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM
except ImportError as e:  # pragma: no cover - depends on the machine
    print(f"SKIP peft_parity: needs torch, transformers, peft and safetensors ({e})")
    sys.exit(0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["llama", "llama3-rope", "llama3-hfcfg", "mistral", "qwen2", "qwen3", "gemma"]
IGNORE = -100  # FT_IGNORE_LABEL

# LoRA of the comparison.
RANK, ALPHA, LORA_SEED, TRAIN_SEED = 8, 16.0, 1234, 7
# The learning rate of the first, ordinary step. It is large on purpose: after it, LoRA B is of
# order lr, and the gradients of A are proportional to B. A larger B keeps those gradients well
# above the f32 rounding of A (|A| ~ 1/sqrt(in)) when they are recovered as start − after.
FIRST_LR = 0.02

# ---------------------------------------------------------------------------------------------
# The C API through ctypes (include/finetune.h).


class ModelParams(ctypes.Structure):
    _fields_ = [
        ("device", ctypes.c_char_p),
        ("n_threads", ctypes.c_uint32),
        ("quantization", ctypes.c_int32),
        ("max_device_memory_mib", ctypes.c_uint64),
        ("world_size", ctypes.c_uint32),
        ("rank", ctypes.c_uint32),
        ("nccl_unique_id", ctypes.POINTER(ctypes.c_uint8)),
        ("collective_timeout_ms", ctypes.c_uint32),
        ("lm_head_in_host_memory", ctypes.c_int32),
        ("layers_in_host_memory", ctypes.c_uint32),
    ]


class LoraParams(ctypes.Structure):
    _fields_ = [
        ("rank", ctypes.c_uint32),
        ("alpha", ctypes.c_float),
        ("use_rslora", ctypes.c_int32),
        ("dropout", ctypes.c_float),
        ("target_modules", ctypes.c_uint32),
        ("seed", ctypes.c_uint64),
    ]


class TrainParams(ctypes.Structure):
    _fields_ = [
        ("learning_rate", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("max_grad_norm", ctypes.c_float),
        ("schedule", ctypes.c_int32),
        ("warmup_steps", ctypes.c_uint64),
        ("total_steps", ctypes.c_uint64),
        ("gradient_checkpointing", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("offload_activations", ctypes.c_int32),
        ("kept_mlp_layers", ctypes.c_uint32),
    ]


class StepStats(ctypes.Structure):
    _fields_ = [
        ("step", ctypes.c_uint64),
        ("loss", ctypes.c_float),
        ("grad_norm", ctypes.c_float),
        ("learning_rate", ctypes.c_float),
        ("tokens", ctypes.c_uint64),
        ("labelled_tokens", ctypes.c_uint64),
    ]


I32P = ctypes.POINTER(ctypes.c_int32)


class Batch(ctypes.Structure):
    _fields_ = [
        ("input_ids", I32P),
        ("labels", I32P),
        ("positions", I32P),
        ("segment_ids", I32P),
        ("batch_size", ctypes.c_uint32),
        ("seq_len", ctypes.c_uint32),
    ]


FT_TARGET_ALL = 127
FT_SCHEDULE_CONSTANT = 0
FT_ABI_VERSION = 5


class Lib:
    """The few entry points used here, with their signatures."""

    def __init__(self, path):
        self.so = so = ctypes.CDLL(path)
        vp, vpp, cp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p
        sig = {
            "ft_abi_version": (ctypes.c_uint32, []),
            "ft_version": (cp, []),
            "ft_last_error": (cp, []),
            "ft_status_name": (cp, [ctypes.c_int32]),
            "ft_model_load": (ctypes.c_int32, [cp, ctypes.POINTER(ModelParams), vpp]),
            "ft_model_random": (ctypes.c_int32, [cp, ctypes.c_uint64, ctypes.POINTER(ModelParams), vpp]),
            "ft_model_save": (ctypes.c_int32, [vp, cp, ctypes.c_int32]),
            "ft_model_free": (None, [vp]),
            "ft_model_default_params": (ModelParams, []),
            "ft_lora_default_params": (LoraParams, []),
            "ft_train_default_params": (TrainParams, []),
            "ft_trainer_new": (
                ctypes.c_int32,
                [vp, ctypes.POINTER(LoraParams), ctypes.POINTER(TrainParams), vpp],
            ),
            "ft_trainer_load_adapter": (ctypes.c_int32, [vp, cp, ctypes.POINTER(TrainParams), vpp]),
            "ft_trainer_step": (
                ctypes.c_int32,
                [vp, ctypes.POINTER(Batch), ctypes.c_size_t, ctypes.POINTER(StepStats)],
            ),
            "ft_trainer_save_adapter": (ctypes.c_int32, [vp, cp]),
            "ft_trainer_free": (None, [vp]),
        }
        for name, (res, args) in sig.items():
            f = getattr(so, name)
            f.restype, f.argtypes = res, args
        if so.ft_abi_version() != FT_ABI_VERSION:
            raise SystemExit(f"{path}: ABI version {so.ft_abi_version()}, this script knows {FT_ABI_VERSION}")

    def check(self, status, what):
        if status != 0:
            name = self.so.ft_status_name(status).decode()
            raise RuntimeError(f"{what}: {name}: {self.so.ft_last_error().decode()}")

    def model_params(self, device):
        p = self.so.ft_model_default_params()
        p.device = device.encode()
        return p


class HostBatch:
    """Keeps the arrays of an ft_batch alive."""

    def __init__(self, ids, labels):
        self.ids = np.ascontiguousarray(ids, dtype=np.int32)
        self.labels = np.ascontiguousarray(labels, dtype=np.int32)
        b, s = self.ids.shape
        self.c = Batch(
            self.ids.ctypes.data_as(I32P), self.labels.ctypes.data_as(I32P), None, None, b, s
        )


# ---------------------------------------------------------------------------------------------
# Models.


def create_llama(finetune, lib, out):
    """The CLI's random "tiny" model (llama family, f32)."""
    if finetune and os.path.exists(finetune):
        subprocess.run(
            [finetune, "create", "--shape", "tiny", "--out", out, "--dtype", "f32"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return
    # No CLI beside the library: the same through the C API (ft_model_random + ft_model_save).
    print(f"note: {finetune} not found, creating the tiny model through ft_model_random")
    m = ctypes.c_void_p()
    lib.check(lib.so.ft_model_random(b"tiny", 1, lib.model_params("cpu"), ctypes.byref(m)), "ft_model_random")
    try:
        lib.check(lib.so.ft_model_save(m, out.encode(), 0), "ft_model_save")
    finally:
        lib.so.ft_model_free(m)


def derive_family(family, llama_dir, out):
    """A model of `family` from the tiny llama's weights: that family's config.json and the
    tensors it has beyond llama's, drawn from a fixed generator."""
    with open(os.path.join(llama_dir, "config.json")) as f:
        cfg = json.load(f)
    w = load_file(os.path.join(llama_dir, "model.safetensors"))
    rng = np.random.default_rng(99)
    layers = cfg["num_hidden_layers"]
    hd = cfg["head_dim"]

    def normal(shape, scale):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    arch = {"llama3-rope": "Llama", "llama3-hfcfg": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma"}
    cfg["architectures"] = [arch[family] + "ForCausalLM"]
    cfg["model_type"] = "llama" if family.startswith("llama3") else family
    if family.startswith("llama3"):
        # Llama 3 frequency scaling with a short original context, so that it changes the
        # rotations at the 16 positions of the batch (wavelengths 6.3, 63, 628, 6283).
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    if family == "llama3-hfcfg":
        cfg["rope_theta"] = 500000.0  # Llama 3's; changes every frequency but the first
    if family in ("mistral", "qwen2", "qwen3"):
        cfg["sliding_window"] = None
        cfg["use_sliding_window"] = False
    if family == "qwen2":
        for i in range(layers):
            for p, n in (("q", cfg["num_attention_heads"]), ("k", cfg["num_key_value_heads"]), ("v", cfg["num_key_value_heads"])):
                w[f"model.layers.{i}.self_attn.{p}_proj.bias"] = normal(n * hd, 0.2)
        cfg["attention_bias"] = True
    if family == "qwen3":
        for i in range(layers):
            for p in ("q", "k"):
                w[f"model.layers.{i}.self_attn.{p}_norm.weight"] = 1.0 + normal(hd, 0.1)
    if family == "gemma":
        cfg["hidden_act"] = cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["tie_word_embeddings"] = True
        del w["lm_head.weight"]
        # Embeddings are multiplied by sqrt(hidden) and also serve as the LM head: scale them
        # down to keep the logits of moderate size.
        w["model.embed_tokens.weight"] = (w["model.embed_tokens.weight"] * 0.25).astype(np.float32)
        # Gemma's RMSNorm multiplies by (1 + w): store w − 1 for the same effective weights.
        for k in list(w):
            if k.endswith("norm.weight"):
                w[k] = (w[k] - 1.0).astype(np.float32)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(w, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    if family == "llama3-hfcfg":
        # config.json as the installed transformers writes it (5.x puts rope_theta and the
        # scaling under "rope_parameters"; 4.x writes "rope_theta" and "rope_scaling"), so that
        # our loader is checked against the format current checkpoints come in.
        transformers.AutoConfig.from_pretrained(out).save_pretrained(out)


def fixed_batch(vocab):
    """Two rows of 16 tokens. Labels follow our convention (already shifted: labels[t] is the
    token expected after position t): row 0 has a 3-token prompt without loss and a label at its
    last position (the token after the row); row 1 ends in 4 padding tokens without loss."""
    rng = np.random.default_rng(2024)
    b, s = 2, 16
    ids = rng.integers(0, vocab, size=(b, s + 1), dtype=np.int64)
    labels = ids[:, 1:].copy()
    ids = ids[:, :s].copy()
    labels[0, :3] = IGNORE
    ids[1, s - 4 :] = 0
    labels[1, s - 5 :] = IGNORE  # the last real token predicts nothing, the padding neither
    return ids, labels


# ---------------------------------------------------------------------------------------------
# Our side.


def first_step_params(lib):
    t = lib.so.ft_train_default_params()
    t.learning_rate = FIRST_LR
    t.schedule = FT_SCHEDULE_CONSTANT
    t.warmup_steps = 0
    t.seed = TRAIN_SEED
    return t


def gradient_params(lib):
    """AdamW settings under which one step moves every parameter by minus its gradient.

    AdamW (torch's form, as src/backend/cpu/pointwise.rs implements it) at step t:
        p ← p·(1 − lr·wd)
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
    With wd = 0 there is no decay. With β1 = β2 = 0, m = g and v = g² whatever the moments held
    before and the bias corrections are 1 (the trainer is fresh anyway: the adapter is loaded
    into a new one, step 1). So
        Δp = −lr · g / (|g| + eps),
    and with lr = eps = 1e6:
        Δp = −g / (1 + |g|/1e6) = −g·(1 − |g|/1e6 + …) ≈ −g,
    a relative deviation of |g|/1e6 (< 1e-6 for the gradient elements here, below f32 rounding).
    max_grad_norm = 0 disables clipping (else g would be rescaled when ‖g‖ > max), and the
    constant schedule without warmup applies lr itself at step 1 (a warmup would make it 0).
    So the gradient is start − after."""
    t = lib.so.ft_train_default_params()
    t.learning_rate = 1e6
    t.eps = 1e6
    t.weight_decay = 0.0
    t.beta1 = 0.0
    t.beta2 = 0.0
    t.max_grad_norm = 0.0
    t.schedule = FT_SCHEDULE_CONSTANT
    t.warmup_steps = 0
    t.seed = TRAIN_SEED
    return t


def ours(lib, model_dir, device, batch, work):
    """Runs our two steps; returns (loss, grad_norm, labelled tokens, {key: gradient}) of the
    second one, whose loss and gradient are those of the `start` adapter."""
    model = ctypes.c_void_p()
    lib.check(
        lib.so.ft_model_load(model_dir.encode(), lib.model_params(device), ctypes.byref(model)),
        f"ft_model_load {model_dir}",
    )
    start, after = os.path.join(work, "start"), os.path.join(work, "after")
    try:
        lora = lib.so.ft_lora_default_params()
        lora.rank, lora.alpha, lora.dropout = RANK, ALPHA, 0.0
        lora.use_rslora, lora.target_modules, lora.seed = 0, FT_TARGET_ALL, LORA_SEED
        tr = ctypes.c_void_p()
        lib.check(
            lib.so.ft_trainer_new(model, lora, first_step_params(lib), ctypes.byref(tr)),
            "ft_trainer_new",
        )
        try:
            stats = StepStats()
            lib.check(lib.so.ft_trainer_step(tr, ctypes.byref(batch.c), 1, ctypes.byref(stats)), "first step")
            lib.check(lib.so.ft_trainer_save_adapter(tr, start.encode()), "save start")
        finally:
            lib.so.ft_trainer_free(tr)

        tr = ctypes.c_void_p()
        lib.check(
            lib.so.ft_trainer_load_adapter(model, start.encode(), gradient_params(lib), ctypes.byref(tr)),
            "ft_trainer_load_adapter start",
        )
        try:
            stats = StepStats()
            lib.check(lib.so.ft_trainer_step(tr, ctypes.byref(batch.c), 1, ctypes.byref(stats)), "gradient step")
            lib.check(lib.so.ft_trainer_save_adapter(tr, after.encode()), "save after")
        finally:
            lib.so.ft_trainer_free(tr)
    finally:
        lib.so.ft_model_free(model)

    p0 = load_file(os.path.join(start, "adapter_model.safetensors"))
    p1 = load_file(os.path.join(after, "adapter_model.safetensors"))
    if set(p0) != set(p1):
        raise RuntimeError("start and after adapters have different tensors")
    # In float64: the subtraction of the two f32 values is then exact.
    grads = {k: p0[k].astype(np.float64) - p1[k].astype(np.float64) for k in p0}
    b_norm = math.sqrt(sum(float((p0[k].astype(np.float64) ** 2).sum()) for k in p0 if "lora_B" in k))
    if b_norm == 0.0:
        raise RuntimeError("LoRA B is still zero after the first step")
    return float(stats.loss), float(stats.grad_norm), int(stats.labelled_tokens), grads


# ---------------------------------------------------------------------------------------------
# PEFT's side.


def load_hf(model_dir, torch_device):
    kwargs = {"attn_implementation": "eager"}
    try:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    except TypeError:  # transformers < 4.56 knows only torch_dtype
        m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kwargs)
    return m.to(torch_device)


def peft_side(model_dir, adapter_dir, ids, labels, torch_device):
    base = load_hf(model_dir, torch_device)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.eval()  # no dropout anywhere (LoRA dropout is 0 as well)
    ids_t = torch.tensor(ids, dtype=torch.long, device=torch_device)
    labels_t = torch.tensor(labels, dtype=torch.long, device=torch_device)
    logits = model(input_ids=ids_t).logits.float()
    # Our labels are already shifted (labels[t] is the token after position t), so no shift
    # here: cross-entropy of the logits at t against labels[t], mean over the labelled tokens.
    # (Passing labels= to the HF model would shift them once more and drop the last position.)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_t.reshape(-1), ignore_index=IGNORE)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight → the key
            # PEFT saves (and we write): without the adapter name.
            key = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            grads[key] = p.grad.detach().to("cpu", torch.float64).numpy() if p.grad is not None else None
    return float(loss.item()), grads


# ---------------------------------------------------------------------------------------------


def compare(family, our, ref, tol):
    """Prints the table of one family; returns the list of failures."""
    loss, grad_norm, labelled, g_ours = our
    ref_loss, g_ref = ref
    fails = []
    if set(g_ours) != set(g_ref):
        only_ours = sorted(set(g_ours) - set(g_ref))
        only_ref = sorted(set(g_ref) - set(g_ours))
        return [f"{family}: keys differ: only ours {only_ours[:4]}, only peft {only_ref[:4]}"]
    print(f"\n== {family}: {len(g_ref)} LoRA tensors, {labelled} labelled tokens")
    print(f"{'tensor':58} {'|peft grad|':>12} {'rel err':>10} {'cosine':>12}")
    worst_rel, worst_cos, sq, n_bad = 0.0, 1.0, 0.0, 0
    for key in sorted(g_ref):
        r, o = g_ref[key], g_ours[key]
        if r is None:
            fails.append(f"{family}: {key}: PEFT has no gradient")
            continue
        if r.shape != o.shape:
            fails.append(f"{family}: {key}: shape ours {o.shape}, peft {r.shape}")
            continue
        rn, on = float(np.linalg.norm(r)), float(np.linalg.norm(o))
        sq += rn * rn
        rel = float(np.linalg.norm(o - r)) / rn if rn > 0 else float(np.linalg.norm(o))
        cos = float((o * r).sum()) / (rn * on) if rn > 0 and on > 0 else (1.0 if rn == on else 0.0)
        worst_rel, worst_cos = max(worst_rel, rel), min(worst_cos, cos)
        bad = (tol["rel"] is not None and rel > tol["rel"]) or cos < tol["cos"] or not math.isfinite(rel)
        short = key.replace("base_model.model.model.", "")
        print(f"{short:58} {rn:12.4e} {rel:10.2e} {cos:12.9f}{'  FAIL' if bad else ''}")
        n_bad += bad
    ref_norm = math.sqrt(sq)
    loss_rel = abs(loss - ref_loss) / abs(ref_loss)
    norm_rel = abs(grad_norm - ref_norm) / ref_norm
    print(f"loss: ours {loss:.7f}, peft {ref_loss:.7f}, rel diff {loss_rel:.2e}")
    print(f"global grad norm: ours (step stats) {grad_norm:.6e}, peft {ref_norm:.6e}, rel diff {norm_rel:.2e}")
    print(f"worst tensor: rel err {worst_rel:.2e}, cosine {worst_cos:.9f}")
    if n_bad:
        fails.append(
            f"{family}: {n_bad} of {len(g_ref)} gradients out of tolerance "
            f"(worst rel err {worst_rel:.2e}, worst cosine {worst_cos:.9f})"
        )
    if not loss_rel <= tol["loss"]:
        fails.append(f"{family}: loss rel diff {loss_rel:.2e} > {tol['loss']}")
    if not norm_rel <= tol["norm"]:
        fails.append(f"{family}: grad norm rel diff {norm_rel:.2e} > {tol['norm']}")
    return fails


def default_path(name):
    """The newer of target/release/NAME and target/debug/NAME."""
    found = [os.path.join(REPO, "target", k, name) for k in ("release", "debug")]
    found = [p for p in found if os.path.exists(p)]
    return max(found, key=os.path.getmtime) if found else os.path.join(REPO, "target", "debug", name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=os.environ.get("FINETUNE_LIB") or default_path("libfinetune.so"))
    ap.add_argument("--finetune", help="the CLI (default: beside --lib, else target/*/finetune)")
    ap.add_argument("--device", default="cpu", help='our device: "cpu" or "cuda:N"')
    ap.add_argument("--torch-device", default="cpu", help="where PEFT runs (f32 either way)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--keep", help="write the models and adapters here and keep them")
    args = ap.parse_args()

    finetune = args.finetune or os.path.join(os.path.dirname(os.path.abspath(args.lib)), "finetune")
    if not os.path.exists(finetune) and not args.finetune:
        finetune = default_path("finetune")
    # A GPU bundle (scripts/gpu_bundle.sh) keeps its precompiled kernels beside the library.
    cache = os.path.join(os.path.dirname(os.path.abspath(args.lib)), "kernel-cache")
    if os.path.isdir(cache):
        os.environ.setdefault("FINETUNE_KERNEL_CACHE", cache)

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.device == "cpu":
        # Both sides in f32 with the same weights: the only differences are the order of
        # summation in products and reductions (our GEMM and kernels against torch's), ~1e-7
        # relative per operation, which after two layers, the LM head and the backward pass
        # leaves ~1e-7 on the loss and ~5e-7 on the B gradients (measured). Recovering our
        # gradient as start − after adds the f32 rounding of `after` (half an ulp per
        # element): the A matrices are 10-55 times larger than their gradients here, so
        # that is up to ~2.5e-6 relative on the A gradients. 1e-4 leaves room for other
        # CPUs and summation orders and still catches any real mistake (a wrong scale, a
        # missing term, a transposition, a misread config field), each of which shows as
        # 1e-3 or more. cos ≥ 1 − 1e-8 is the same bound (1 − cos ≈ rel²/2).
        tol = {"rel": 1e-4, "cos": 1 - 1e-8, "loss": 1e-5, "norm": 1e-4}
    else:
        # Our base weights are bf16 on a GPU (8 significant bits), PEFT's f32.
        tol = {"rel": None, "cos": 0.999, "loss": 1e-2, "norm": 2e-2}

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for family in families:
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    lib = Lib(args.lib)
    print(
        f"libfinetune {lib.so.ft_version().decode()} ({args.lib}) on {args.device}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )
    work = args.keep or tempfile.mkdtemp(prefix="peft_parity_")
    os.makedirs(work, exist_ok=True)
    failures = []
    try:
        llama = os.path.join(work, "llama", "model")
        if os.path.exists(llama):
            shutil.rmtree(llama)
        os.makedirs(os.path.dirname(llama), exist_ok=True)
        create_llama(finetune, lib, llama)
        for family in families:
            fam_work = os.path.join(work, family)
            model_dir = os.path.join(fam_work, "model")
            if family != "llama":
                derive_family(family, llama, model_dir)
            with open(os.path.join(model_dir, "config.json")) as f:
                vocab = json.load(f)["vocab_size"]
            ids, labels = fixed_batch(vocab)
            batch = HostBatch(ids, labels)
            try:
                our = ours(lib, model_dir, args.device, batch, fam_work)
                ref = peft_side(model_dir, os.path.join(fam_work, "start"), ids, labels, args.torch_device)
            except Exception as e:  # report and go on with the other families
                failures.append(f"{family}: {type(e).__name__}: {e}")
                print(f"\n== {family}: ERROR {type(e).__name__}: {e}")
                continue
            failures += compare(family, our, ref, tol)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    if failures:
        print("FAILED:")
        for f in failures:
            print("  " + f)
        return 1
    print("peft_parity: all families within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
