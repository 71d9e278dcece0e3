#!/usr/bin/env python3
"""The CPU reference point of `finetune bench`: one LoRA training step of PyTorch + PEFT on the
same shapes, so both can be timed side by side on one machine on one day.

SmolLM2-135M's shapes (30 layers, hidden 576, 9 query / 3 KV heads, intermediate 1536, vocab
49152, tied embeddings) with random weights in f32; LoRA r=16, alpha 32 on q,k,v,o,gate,up,down;
AdamW on the adapters; random tokens, every position labelled. Prints one JSON object with the
median step time, CPU seconds per step and the peak RSS, like `finetune bench`.

Needs torch, transformers and peft (pip install torch transformers peft). Usage:
    python3 bench/torch_cpu_step.py [--batch 4] [--seq 256] [--steps 3] [--threads 2]
        [--checkpointing]
"""

import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    t0 = time.perf_counter()
    model = LlamaForCausalLM(cfg).float()
    if a.checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    load_seconds = time.perf_counter() - t0

    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    walls, cpus, losses = [], [], []
    for step in range(a.steps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        losses.append(loss.item())
        if step > 0:
            walls.append(wall)
            cpus.append(cpu)

    step = statistics.median(walls)
    print(
        json.dumps(
            {
                "model": "smollm2-135m",
                "device": f"torch {torch.__version__} cpu ({a.threads} threads)",
                "batch": a.batch,
                "seq": a.seq,
                "rank": 16,
                "checkpointing": a.checkpointing,
                "steps": a.steps,
                "step_seconds_median": step,
                "cpu_seconds_median": statistics.median(cpus),
                "tokens_per_second": a.batch * a.seq / step,
                "first_loss": losses[0],
                "last_loss": losses[-1],
                # ru_maxrss is in KiB on Linux.
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "load_seconds": load_seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
