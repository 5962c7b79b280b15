"""Whole-model step with each loss head: what the fused kernels buy inside a real student/teacher step.

    python -m kernels.bench_step                 # on a GPU: Qwen3-1.7B-shaped student, Qwen3-8B-shaped teacher
    python -m kernels.bench_step --tiny          # CPU smoke test: the embedded task's shapes, Triton interpreted

Random-init HF transformers models (sdpa, bf16), one sequence of --tokens tokens. Rows:
  student fwd+bwd: naive (HF logits → log_softmax → gather), torch reference (chunked), triton (fused), and the
  backbone alone (what a perfect loss head would leave); teacher fwd: the same heads, forward only.
MFU uses the paper's accounting (flops.py: verl's formula; forward = train / 3) over --peak TFLOP/s.
Prints a table and writes step.csv to --out.
"""
import argparse
import csv
import os
import statistics
import time

import torch

import flops
import kernels
from kernels.bench import fail, interpret_on_cpu


def qwen3(c, device):
    """A random-init bf16 Qwen3 of shapes c (a flops.ModelConfig)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
                      tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=1 << 17,
                      attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def head(mode, model, ids, coef):
    """Σ_t coef_t · logp(token_{t+1}) with the given loss head; `mode` picks it."""
    if mode == "naive":
        logits = model(input_ids=ids).logits[0, :-1].float()
        return (logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0] * coef).sum()
    hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
    if mode == "backbone":
        return hidden.float().sum() * 1e-6
    token_logprobs, opd_loss = kernels.get_impl(mode)
    if torch.is_grad_enabled():  # the OPD loss: per-token weight known in forward (the fused kernel's fast path)
        ones = torch.ones_like(coef)
        return opd_loss(hidden, model.lm_head.weight, ids[0, 1:], coef * 0, coef * 0 + 1, ones, 1.0)[0]
    return (token_logprobs(hidden, model.lm_head.weight, ids[0, 1:])[0] * coef).sum()


def timed(fn, iters, device):
    times, warm = [], 2 if device.type == "cuda" else 0  # two warm-ups: Triton compiles, cuBLAS picks algorithms
    for i in range(iters + warm):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(prog="python -m kernels.bench_step", description=__doc__.split("\n\n")[0])
    p.error = lambda msg: fail(msg, "kernels.bench_step")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peak", type=float, default=989.0, help="TFLOP/s for MFU (H100/H200 dense bf16)")
    p.add_argument("--tiny", action="store_true", help="toy shapes, for a CPU smoke test")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        fail("no GPU here: run with --tiny (CPU smoke test) or on a CUDA machine", "kernels.bench_step")
    if args.tiny:
        if device.type == "cpu":
            interpret_on_cpu("kernels.bench_step")
        args.tokens, args.iters = 64, 1
    import embedded
    models = ((("student", "embedded", flops.load_config(embedded.STUDENT_DIR)),
               ("teacher", "embedded", flops.load_config(embedded.TEACHER_DIR))) if args.tiny else
              (("student", "Qwen3-1.7B", flops.MODELS["Qwen3-1.7B"]), ("teacher", "Qwen3-8B", flops.MODELS["Qwen3-8B"])))
    rows = []
    for role, name, cfg in models:
        model = qwen3(cfg, device)
        model.requires_grad_(role == "student")  # no activation checkpointing, as in the trainer anchors it is compared with
        ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=device)
        coef = torch.randn(args.tokens - 1, device=device)
        work = flops.train_flops(cfg, [args.tokens]) if role == "student" else flops.fwd_flops(cfg, [args.tokens])
        for mode in ("naive", "torch", "triton", "backbone"):
            def step():
                if role == "teacher":
                    with torch.no_grad():
                        head(mode, model, ids, coef)
                else:
                    head(mode, model, ids, coef).backward()
                    model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                s = timed(step, args.iters, device)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            except torch.OutOfMemoryError:
                s, peak = float("nan"), float("inf")
            rows.append(dict(role=role, model=name, mode=mode, tokens=args.tokens, seconds=round(s, 4),
                             mfu=round(work / s / (args.peak * 1e12), 3), peak_gib=round(peak, 2)))
            print(f"{role:8s} {name:11s} {mode:9s} {s:8.3f} s  MFU {rows[-1]['mfu']:6.1%}  peak {peak:6.2f} GiB",
                  flush=True)
        del model
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
