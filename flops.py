"""Training cost accounting of the paper (Appendix B): a library for opd.py and a command line.

    python flops.py --student Qwen3-8B-Base --teacher Qwen3-8B --batch-size 512 --samples 4 --steps 10 --prefix 256
    python flops.py --prefix-start 1 --delta 256 --steps 60 --max-new-tokens 16384   # prefix scheduling
    python flops.py --full --steps 10 --mean-length 9000     # full OPD, rollouts ending at a natural mean length
    python flops.py --from-metrics run/metrics.jsonl         # actual cost of a finished run
    python flops.py --paper                                  # the paper's figures beside this module's

For one batch of sequences of lengths s_i (the sampled response lengths: in prefix and full OPD the trained ones, as
in the paper; a --window / --tail run samples, scores and backpropagates whole rollouts, so it pays for them):
    F_train(M) = 6 * N_dense(M) * sum(s_i) + 12 * sum(s_i^2) * head_dim * heads * layers
    F_fwd(M)   = F_train(M) / 3
    F_OPD      = F_train(S) + 2 F_fwd(S) + F_fwd(T)   (student update; sampling, student log-probs; teacher log-probs)
F_train is verl's counter for Qwen3 (`_estimate_qwen2_flops`, verl/utils/flops_counter.py at c936ec7d, the commit the
paper cites; unchanged on verl main): 6 FLOPs per weight per token for forward+backward, N_dense counting the q, k,
v, o projections (k, v at the GQA width), the SwiGLU MLP and embedding + LM head (2*V*H even when tied) but no
RMSNorm (q/k norms neither); plus 12 * s^2 * head_dim per query head per layer for QK^T and PV (no causal halving).
F_fwd = F_train / 3 is the paper's rule of thumb. F_OPD is linear in sum(s) and sum(s^2): a step needs only those.
"""
import argparse
import itertools
import json
import math
import os
import sys
from collections import namedtuple


# The shapes that the accounting needs, named as in a Hugging Face config.json.
ModelConfig = namedtuple("ModelConfig", "hidden_size intermediate_size num_hidden_layers num_attention_heads "
                         "num_key_value_heads head_dim vocab_size tie_word_embeddings name", defaults=("",))

# Public config.json values (huggingface.co/Qwen/<name>/raw/main/config.json) as quoted verbatim in
# github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md (4B, 8B, 14B, 32B), in public code citing those URLs (0.6B,
# 1.7B) and in github.com/Chen-Oliver/qwen3-8b-base config.json (8B-Base). All: head_dim 128, vocab_size 151936.
# The -Base checkpoints share their sibling's shapes (there is no Qwen3-32B-Base). Cross-check: param_count() of
# each equals the total keras-hub publishes for its Qwen3 presets (tests/test_flops.py).
#                      hidden, intermediate, layers, heads, kv_heads, tied
_QWEN3 = {"Qwen3-0.6B": (1024, 3072, 28, 16, 8, True), "Qwen3-1.7B": (2048, 6144, 28, 16, 8, True),
          "Qwen3-4B": (2560, 9728, 36, 32, 8, True), "Qwen3-8B": (4096, 12288, 36, 32, 8, False),
          "Qwen3-14B": (5120, 17408, 40, 40, 8, False), "Qwen3-32B": (5120, 25600, 64, 64, 8, False)}
MODELS = {n: ModelConfig(h, i, l, a, kv, 128, 151936, tie, n)
          for name, (h, i, l, a, kv, tie) in _QWEN3.items()
          for n in [name] + ([name + "-Base"] if name != "Qwen3-32B" else [])}


def _read_json(file):
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None


def load_config(name_or_path) -> ModelConfig:
    """A built-in name ('Qwen3-8B', 'Qwen/Qwen3-8B-Base'), a model directory holding config.json, or that file."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path) or path.endswith(".json"):
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {file}: pass a model directory with config.json "
                                    f"or a built-in name ({', '.join(MODELS)})")
        c = _read_json(file)
        if not isinstance(c, dict):
            raise ValueError(f"{file}: not a JSON object; pass a model's config.json")
        c = c["text_config"] if isinstance(c.get("text_config"), dict) else c  # a multimodal config nests the LM's
        optional = ("num_key_value_heads", "head_dim")  # absent or null: the attention heads' defaults below
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        for k in sizes + optional:
            v = c.get(k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0 or v is None and k in optional):
                raise ValueError(f"{file}: {k} is {c.get(k, 'missing')!r}, not a positive integer: not a "
                                 "decoder-only transformer config")
        h, heads = c["hidden_size"], c["num_attention_heads"]
        return ModelConfig(h, c["intermediate_size"], c["num_hidden_layers"], heads,
                           c.get("num_key_value_heads") or heads, c.get("head_dim") or h // heads,
                           c["vocab_size"], bool(c.get("tie_word_embeddings", False)), path)  # Qwen3's default
    if path.removeprefix("Qwen/") not in MODELS:
        raise ValueError(f"unknown model {path!r}: pass a local model directory with config.json "
                         f"or one of {', '.join(MODELS)}")
    return MODELS[path.removeprefix("Qwen/")]


def param_count(cfg: ModelConfig) -> int:
    """Parameters of a Qwen3 decoder as transformers builds it (a tied embedding counted once)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * 2 * (cfg.num_attention_heads + cfg.num_key_value_heads) + 2 * d  # q,o + k,v; q_norm, k_norm
    layer = attn + 3 * h * cfg.intermediate_size + 2 * h  # + SwiGLU MLP + two RMSNorms
    return cfg.num_hidden_layers * layer + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h


def dense_params(cfg: ModelConfig) -> int:
    """verl's N_dense: linear weights of every layer plus embedding and LM head (both, even if tied), no norms."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = 3 * h * cfg.intermediate_size + h * (q + kv + kv + q)  # gate/up/down; q, k, v, o projections
    return cfg.num_hidden_layers * layer + 2 * cfg.vocab_size * h


def seqlen_sums(seqlens=(), sums=None) -> tuple:
    """(sum s, sum s^2) of the lengths, or the given sums checked (opd.py logs seqlen_sum, seqlen_sq_sum)."""
    if sums is not None:
        sums = tuple(sums)
        # what lengths n >= 0 can give: 0 <= sum n <= sum n^2 <= (sum n)^2
        if not (len(sums) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in sums)
                and 0 <= sums[0] <= sums[1] <= sums[0] ** 2):
            raise ValueError(f"length sums {sums} are not (sum s, sum s^2) of non-negative integer lengths")
        return sums
    s = s2 = 0
    for n in seqlens:
        if not hasattr(n, "__index__") or n < 0:
            raise ValueError(f"sequence length {n!r} is not a non-negative integer")
        s, s2 = s + int(n), s2 + int(n) ** 2
    return s, s2


def train_flops(cfg: ModelConfig, seqlens=(), *, sums=None) -> float:
    """F_train: one forward+backward over sequences of these lengths, or of these (sum s, sum s^2)."""
    s, s2 = seqlen_sums(seqlens, sums)
    return float(6 * dense_params(cfg) * s + 12 * s2 * cfg.head_dim * cfg.num_attention_heads * cfg.num_hidden_layers)


def fwd_flops(cfg: ModelConfig, seqlens=(), *, sums=None) -> float:
    """F_fwd: the paper's forward-only estimate, a third of forward+backward."""
    return train_flops(cfg, seqlens, sums=sums) / 3


def opd_flops(student: ModelConfig, teacher: ModelConfig, seqlens=(), *, sums=None) -> float:
    """F_OPD summed over rollouts: student update + sampling + student log-probs + teacher log-probs."""
    sums = seqlen_sums(seqlens, sums)
    return train_flops(student, sums=sums) + 2 * fwd_flops(student, sums=sums) + fwd_flops(teacher, sums=sums)


def prefix_len(step: int, prefix_start: int, delta: int, max_new_tokens: int) -> int:
    """The training prefix L at a step (0-based): min(prefix_start + delta * step, max_new_tokens)."""
    return min(prefix_start + delta * step, max_new_tokens)


def planned(student, teacher, steps, rollouts, prefix_start, delta, max_new_tokens, mean_length=None):
    """Rows (step, L, length, rollouts, tokens, flops) of a run whose rollouts all reach min(L(step), mean_length)."""
    for name, v in dict(steps=steps, rollouts=rollouts, prefix=prefix_start, delta=delta,
                        max_new_tokens=max_new_tokens, mean_length=mean_length or 0).items():
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    rows = []
    for step in range(steps):
        L = prefix_len(step, prefix_start, delta, max_new_tokens)
        n = min(L, mean_length) if mean_length else L
        sums = (rollouts * n, rollouts * n * n)  # every rollout n tokens long
        rows.append((step, L, n, rollouts, sums[0], opd_flops(student, teacher, sums=sums)))
    return rows


def from_metrics(path, student=None, teacher=None):
    """Rows (step, rollouts, tokens, flops, recorded flops) of a finished run, and where its flops came from:
    recomputed from each record's seqlen_sum, seqlen_sq_sum with the student and teacher (the arguments, else
    run.json's beside metrics.jsonl), else the records' own `flops` (no sums, or the models not loadable here).
    path: the metrics.jsonl, or the run's directory (--out) holding it."""
    path = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass the metrics.jsonl that opd.py wrote")
    recs = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                r = recs[-1]
                if not isinstance(r, dict):
                    raise ValueError(f"{path}:{i}: not a JSON object; pass the metrics.jsonl that opd.py wrote")
                for k in ("step", "seqlen_sum", "seqlen_sq_sum", "flops"):
                    if k in r and (isinstance(r[k], bool) or not isinstance(r[k], (int, float))
                                   or not math.isfinite(r[k])):
                        raise ValueError(f"{path}:{i}: {k} is {r[k]!r}, not a number")
    if not recs:
        raise ValueError(f"{path}: no records (the run has not finished a step)")
    if all("step" in r for r in recs):  # a resumed run redid the steps after its checkpoint: keep the last of each
        recs = sorted({r["step"]: r for r in recs}.values(), key=lambda r: r["step"])
    run_file = os.path.join(os.path.dirname(path), "run.json")
    run = {}
    if not (student and teacher) and os.path.isfile(run_file):
        run = _read_json(run_file)
        if not isinstance(run, dict):
            raise ValueError(f"{run_file}: not a JSON object; it is opd.py's record of a run's flags")
    student, teacher = student or run.get("student"), teacher or run.get("teacher")
    if bool(student) != bool(teacher):
        raise ValueError(f"recomputing {path}'s flops needs both models, and nothing names the "
                         f"{'teacher' if student else 'student'}: pass --student and --teacher")
    has_flops = all("flops" in r for r in recs)
    cfgs, source = None, "the records' flops"
    if student and teacher and all("seqlen_sum" in r and "seqlen_sq_sum" in r for r in recs):
        try:
            cfgs = load_config(student), load_config(teacher)
            source = f"recomputed (student {student}, teacher {teacher})"
        except (ValueError, FileNotFoundError) as e:
            if not has_flops:
                raise type(e)(f"{e}" + (f" (named by {run_file}: pass --student and --teacher)" if run else ""))
            source += f" ({e})"
    elif not has_flops:
        raise ValueError(f"{path}: records lack flops, and seqlen_sum/seqlen_sq_sum with a known student and teacher")
    rows = [(r.get("step", i), r.get("n_seqs"), r.get("seqlen_sum"),
             opd_flops(*cfgs, sums=(r["seqlen_sum"], r["seqlen_sq_sum"])) if cfgs else float(r["flops"]),
             float(r["flops"]) if "flops" in r else None) for i, r in enumerate(recs)]
    return rows, source


# ---------------------------------------------------------------------------------------------- the paper's figures
# §4.1: teacher Qwen3-8B; OPD 512 prompts x 4 rollouts, max 16384 new tokens, 60 steps, schedule L = 1 + 256*step;
# SeqKD batch 128 on QwQ-32B responses (student update only; cap assumed 16384). Prefix rows are taken as 60 steps
# (Table 2's prefix 256, 3.4e18, is 6x the 10-step 5.7e17 of §5.1).
TEACHER, PROMPTS, SAMPLES, MAX_NEW, STEPS, SEQKD_BATCH, SCHEDULE = "Qwen3-8B", 512, 4, 16384, 60, 128, (1, 256)
_ROWS = [("OPD - 10 steps", "full", 10, None), ("SeqKD - 300 steps", "seqkd", 300, None)] + [
    (f"OPD (prefix {p})", "prefix", STEPS, p) for p in (256, 512, 1024, 2048)] + [
    ("OPD (60 steps)", "full", STEPS, None), ("SeqKD (1500 steps)", "seqkd", 1500, None),
    ("OPD (prefix scheduling)", "schedule", STEPS, None)]
PAPER = [("Table 1", *row[:1], "Qwen3-1.7B-Base", f, *row[1:]) for row, f in zip(_ROWS, (
             8.2e18, 1.3e19, 9.4e17, 1.4e18, 2.5e18, 4.7e18, 5.7e19, 6.6e19, 2.4e19))] + [
         ("Table 2", *row[:1], "Qwen3-8B-Base", f, *row[1:]) for row, f in zip(_ROWS, (
             2.7e19, 4.4e19, 3.4e18, 5.2e18, 8.9e18, 1.7e19, 1.8e20, 2.2e20, 7.5e19))] + [
         ("§5.1", "OPD prefix 256, 10 steps", "Qwen3-8B-Base", 5.7e17, "prefix", 10, 256),
         ("§5.1", "full OPD to 22.5% AIME-24", "Qwen3-8B-Base", 2.7e19, "full", 10, None),
         ("§5.1", "SeqKD to 22.5% AIME-24", "Qwen3-8B-Base", 1.5e19, "seqkd", None, None)]  # steps not given


# Appendix E (Tables 5 / 6): the step of the checkpoint each row's accuracy was tested at, by student and row
APPENDIX_E = {"Qwen3-1.7B-Base": {"OPD (prefix 256)": 20, "OPD (prefix 512)": 60, "OPD (prefix 1024)": 60,
                                  "OPD (prefix 2048)": 40, "OPD (prefix scheduling)": 60, "OPD (60 steps)": 50},
              "Qwen3-8B-Base": {"OPD (prefix 256)": 60, "OPD (prefix 512)": 50, "OPD (prefix 1024)": 40,
                                "OPD (prefix 2048)": 60, "OPD (prefix scheduling)": 60, "OPD (60 steps)": 60}}


def paper_row_flops(student, method, steps, prefix, natural=None):
    """This module's FLOPs for a paper row: every sequence at its cap, or at min(cap, natural)."""
    s, t = load_config(student), load_config(TEACHER)
    if method == "seqkd":
        n = min(MAX_NEW, natural or MAX_NEW)
        return steps * train_flops(s, sums=(SEQKD_BATCH * n, SEQKD_BATCH * n * n))
    start, delta = {"prefix": (prefix, 0), "full": (MAX_NEW, 0), "schedule": SCHEDULE}[method]
    return sum(r[-1] for r in planned(s, t, steps, PROMPTS * SAMPLES, start, delta, MAX_NEW, natural))


def implied_length(reported, *row):
    """The natural length at which this module matches the reported figure (None: above even the cap's cost)."""
    lo, hi = 0, MAX_NEW
    if paper_row_flops(*row, natural=hi) < reported:
        return None
    while hi - lo > 1:  # the cost grows with the length: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if paper_row_flops(*row, natural=mid) < reported else (lo, mid)
    return hi


def print_paper():
    print(f"Paper vs flops.py. OPD: {PROMPTS} prompts x {SAMPLES} rollouts, teacher {TEACHER}, max {MAX_NEW} new "
          f"tokens; SeqKD: batch {SEQKD_BATCH}, student update only.\n"
          f"'ours': every sequence at its cap (prefix L, L(step) or {MAX_NEW}); 'implied': the natural length at "
          "which ours equals the paper;\n'App. E': the step of the checkpoint the row was tested at (Tables 5 / 6), "
          "and paper / ours at that many steps.\n")
    print(f"{'':8} {'row':26} {'student':16} {'steps':>5} {'paper':>8} {'ours':>9} {'paper/ours':>10} {'implied':>7} "
          f"{'App. E':>6} {'p/o':>5}")
    ours = {}
    for where, row, student, reported, method, steps, prefix in PAPER:
        if steps is None:
            print(f"{where:8} {row:26} {student:16} {'?':>5} {reported:8.1e} {'n/a':>9} {'n/a':>10} {'n/a':>7}")
            continue
        f = ours[row] = paper_row_flops(student, method, steps, prefix)
        n = implied_length(reported, student, method, steps, prefix)
        e = APPENDIX_E.get(student, {}).get(row) if where.startswith("Table") else None
        at_e = f"{e:6} {reported / paper_row_flops(student, method, e, prefix):5.2f}" if e else ""
        print(f"{where:8} {row:26} {student:16} {steps:5} {reported:8.1e} {f:9.2e} {reported / f:10.2f} "
              f"{'>cap' if n is None else n:>7} {at_e}".rstrip())
    full, pre = ours["full OPD to 22.5% AIME-24"], ours["OPD prefix 256, 10 steps"]
    print(f"\n47x (§5.1): paper 2.7e19 / 5.7e17 = {2.7e19 / 5.7e17:.1f}x; paper's full OPD / our prefix 256 = "
          f"{2.7e19 / pre:.1f}x;\nours, with full OPD at the cap = {full / pre:.1f}x (an upper bound).")
    print("""
Reproducible from the paper alone: only rows whose every rollout reaches its cap, i.e. prefix 256 with the 8B
student, §5.1's 5.7e17 included (ours is 9% lower, past what 2-digit rounding explains; the paper does not say why:
verl's own counter is fed prompt + response lengths, and ~24 prompt tokens per rollout would close it). The rest
depend on lengths the paper does not report: full OPD (rollouts end at EOS, far below 16384 on average), prefix
512-2048 and the 1.7B student's prefix 256 (rollouts ending before L: ours is an upper bound, and ratios below 1
say many did), prefix scheduling (L(step) caps lengths only until it passes the natural length), SeqKD (QwQ-32B
response lengths; §5.1's SeqKD step count is not given).
'implied' is a uniform length: with spread-out real lengths (larger sum s^2) the true mean is somewhat lower.
Prefix rows are taken as 60 steps. Another reading fits some 8B rows as well: at their Appendix E steps, prefix
512 (50) and 1024 (40) come within 1-4% with every rollout at the cap, as prefix 256 does at 60; prefix 2048 does
at 40 steps (0.96), not at Table 6's 60. The 1.7B rows do not fit theirs (prefix 256 at step 20 would be 2.4x
the cap's cost), so the 60-step reading is kept.""")


# --------------------------------------------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", help="built-in name or model dir (default Qwen3-8B-Base, or run.json's)")
    p.add_argument("--teacher", help="built-in name or model dir (default Qwen3-8B, or run.json's)")
    p.add_argument("--batch-size", type=int, help=f"prompts per step (default {PROMPTS})")
    p.add_argument("--samples", type=int, help=f"rollouts per prompt (default {SAMPLES})")
    p.add_argument("--steps", type=int, help=f"default {STEPS}")
    p.add_argument("--max-new-tokens", type=int, help=f"default {MAX_NEW}")
    p.add_argument("--prefix-start", type=int, help="L at step 0 of the --delta schedule (default 1)")
    p.add_argument("--mean-length", type=int, help="natural rollout length: caps every rollout")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prefix", type=int, help="fixed prefix L")
    mode.add_argument("--delta", type=int, help="schedule L(step) = min(prefix_start + delta*step, max_new_tokens)")
    mode.add_argument("--full", action="store_true", help="full OPD: rollouts up to --max-new-tokens")
    mode.add_argument("--from-metrics", metavar="JSONL", help="actual cost of a run from its metrics.jsonl")
    mode.add_argument("--paper", action="store_true", help="the paper's reported FLOPs beside this module's")
    p.error = lambda msg: (print(f"flops.py: error: {msg} (see --help)", file=sys.stderr), sys.exit(2))
    a = p.parse_args(argv)
    minimum = dict(batch_size=1, samples=1, max_new_tokens=1, mean_length=1, steps=0, prefix_start=1, prefix=1, delta=0)
    for flag, lo in minimum.items():
        if getattr(a, flag) is not None and getattr(a, flag) < lo:
            p.error(f"--{flag.replace('_', '-')} must be >= {lo} (got {getattr(a, flag)})")
    if a.prefix_start is not None and a.delta is None:
        p.error("--prefix-start only applies to the --delta schedule (L at its step 0)")
    plan = ("batch_size", "samples", "steps", "max_new_tokens", "mean_length")  # what a run's records hold
    for mode, unread in (("paper", plan + ("student", "teacher")), ("from_metrics", plan)):
        given = [f for f in unread if getattr(a, f) is not None]
        if getattr(a, mode) and given:
            p.error(f"--{mode.replace('_', '-')} does not read --{given[0].replace('_', '-')}: drop it")
    a.batch_size, a.samples = a.batch_size or PROMPTS, a.samples or SAMPLES
    a.steps = STEPS if a.steps is None else a.steps
    a.max_new_tokens = a.max_new_tokens or MAX_NEW
    for flag in ("prefix", "prefix_start"):
        if (getattr(a, flag) or 0) > a.max_new_tokens:
            p.error(f"--{flag.replace('_', '-')} {getattr(a, flag)} is past --max-new-tokens {a.max_new_tokens}")
    try:
        if a.paper:
            return print_paper()
        if a.from_metrics:
            rows, source = from_metrics(a.from_metrics, a.student, a.teacher)
            print(f"{a.from_metrics}: {len(rows)} steps, FLOPs {source}")
            header = ("step", "rollouts", "tokens", "flops", "recorded")
        else:
            s, t = load_config(a.student or "Qwen3-8B-Base"), load_config(a.teacher or "Qwen3-8B")
            start, delta = ((a.prefix, 0) if a.prefix is not None else (a.max_new_tokens, 0) if a.full
                            else (a.prefix_start or 1, a.delta))
            rows = planned(s, t, a.steps, a.batch_size * a.samples, start, delta, a.max_new_tokens, a.mean_length)
            print(f"student {s.name} (N_dense {dense_params(s):.3e}), teacher {t.name} (N_dense "
                  f"{dense_params(t):.3e}), {a.batch_size} x {a.samples} rollouts per step")
            header = ("step", "L", "length", "rollouts", "tokens", "flops")
        cumulative = itertools.accumulate(r[header.index("flops")] for r in rows)
        print("  ".join(f"{h:>11}" for h in (*header, "cumulative")))
        for r in zip(rows, cumulative):
            print("  ".join(f"{'-' if v is None else f'{v:.3e}' if isinstance(v, float) else v:>11}"
                            for v in (*r[0], r[1])))
        print(f"total: {sum(r[header.index('flops')] for r in rows):.3e} FLOPs over {len(rows)} steps")
    except (ValueError, FileNotFoundError) as e:
        print(f"flops.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
