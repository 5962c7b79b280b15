"""On-policy prefix distillation (prefix OPD), the whole method in one file.

The student samples its own rollouts, the frozen teacher scores every sampled token, and the student minimises the
sampled-token reverse KL (paper Eq. 1) with an importance ratio against the sampler's logprobs. Prefix OPD stops every
rollout at L_train tokens and grows L_train by Δ after each update (paper §3): a prefix run never pays for tokens it
will not train on.

    torchrun --nproc_per_node 2 opd.py                      # the embedded default: tiny task + models, CPU, minutes
    torchrun --nproc_per_node 8 opd.py --student Qwen/Qwen3-1.7B-Base --teacher Qwen/Qwen3-8B \\
        --data openthoughts3.jsonl --prefix-start 1 --delta 256 --out runs/prefix-sched     # the paper's setting
    python opd.py --help

One step (every rank runs the same code on its slice of the batch, SPMD under torchrun):
  L = schedule(step) → sync the student's weights into the colocated sampler (vLLM) → sample `samples` rollouts of
  each prompt with max_tokens = L → teacher logprobs of every sampled token → student loss, backward (FSDP2) →
  clip, AdamW → log, checkpoint. Researchers edit the `# ALGO LOGIC` sections; the rest is plumbing.
"""
import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

import flops

# The rollouts' sampling temperature; the kernels score at it too, so the ratios and the KL are of the T = 1
# distributions. The HF sampler's log-probs follow any T (its processor divides by it), but vLLM reports those of the
# raw logits: another T would also need vLLM's logprobs_mode="processed_logprobs".
TEMPERATURE = 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (--batch-size for batch_size). Defaults are the paper's (§4.1) where it
# gives one; weight decay and gradient clipping it does not give (ours: none, and verl's 1.0).
def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    student: str = _f(None, "student model: HF directory or hub id (default: the embedded tiny student)")
    teacher: str = _f(None, "teacher model, same tokenizer as the student (default: the embedded tiny teacher)")
    data: str = _f(None, "training prompts: .jsonl/.json/.parquet/.csv with a prompt/question/problem column, or "
                   "conversations/messages")
    out: str = _f("runs/opd", "output directory: metrics.jsonl, run.json, step_*/ checkpoints")
    steps: int = _f(60, "optimizer steps")
    batch_size: int = _f(512, "prompts per step, global (split over ranks)")
    samples: int = _f(4, "rollouts per prompt")
    lr: float = _f(5e-5, "AdamW learning rate (constant)")
    weight_decay: float = _f(0.0, "AdamW weight decay (not in the paper; verl uses 0.01)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping (not in the paper; verl's 1.0)")
    prefix_start: int = _f(1, "L_train at step 0 (tokens)")
    delta: int = _f(256, "L_train grows by this after every update; 0 = fixed prefix")
    max_new_tokens: int = _f(16384, "cap on rollout length (and on L_train)")
    full: bool = _f(False, "plain OPD: train on whole rollouts of up to --max-new-tokens (no prefix)")
    window: str = _f(None, "Table-3 ablation A:B: untruncated rollouts, loss only on response positions [A, B)")
    tail: int = _f(0, "Table-3 ablation: untruncated rollouts, loss only on the last N tokens of each rollout")
    micro_batch_tokens: int = _f(32768, "padded tokens per forward/backward micro-batch")
    save_every: int = _f(10, "checkpoint every N steps (and at the end); 0 = only at the end")
    resume: bool = _f(False, "continue from the newest checkpoint in --out")
    sampler: str = _f("vllm", "rollout engine: vllm (colocated) or hf (transformers generate; small fallback)")
    impl: str = _f("auto", "logprob/loss kernels: triton, torch (reference) or auto (triton on CUDA)")
    seed: int = _f(0, "seed for data order and sampling")
    heldout: str = _f(None, "held-out .jsonl with question/answer for the before/after accuracy print")
    eval_n: int = _f(0, "held-out questions to grade before and after training (0 = none)")
    eval_teacher: bool = _f(False, "also grade the teacher on the held-out questions (an unsharded HF copy and HF "
                            "generate: for small models; eval.py grades a teacher at scale)")
    kl_bin: int = _f(256, "width of the position bins for the KL-by-position log (paper Fig. 2/5)")
    vllm_memory: float = _f(0.35, "GPU memory fraction for the vLLM sampler (weights + KV cache); the trainer's "
                            "shards, optimizer state and teacher stay resident meanwhile: raise it where they leave "
                            "room (more KV cache, more rollouts in flight). vLLM checks it against free memory once, "
                            "at its start, before AdamW's state exists")

    @property
    def untruncated(self) -> bool:
        """--full / --window / --tail: whole rollouts up to --max-new-tokens, no prefix schedule."""
        return bool(self.full or self.window or self.tail)


# The embedded default: a built-in task whose solutions are ~40 tokens. L_train starts at 7 (a solution's first 6
# tokens copy the question's first operation, "37+14=", and the 7th is the first that needs arithmetic) and grows by 1
# per step, so every step but the last few trains on a truncated prefix.
EMBEDDED = dict(steps=40, batch_size=32, samples=4, lr=5e-4, prefix_start=7, delta=1, max_new_tokens=64,
                micro_batch_tokens=4096, save_every=20, eval_n=200, eval_teacher=True, kl_bin=8,
                out="runs/embedded")


# Mean |logp_trainer - logp_sampler| per trained token above which the sampler's weights are presumed stale. Same
# weights give ~1e-6 in fp32 and ~1e-2 in bf16; a missed sync after a few updates gives far more.
STALE_GAP = 0.1


def parse_args(argv=None) -> Config:
    # allow_abbrev=False: `--prefix 1024` (flops.py's fixed prefix) must not quietly mean --prefix-start 1024
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False, argument_default=argparse.SUPPRESS,
                                epilog="With no --student/--teacher/--data: the embedded default, which also sets "
                                + ", ".join(f"{k}={v}" for k, v in EMBEDDED.items()))
    p.error = lambda msg: usage_exit(f"{msg} (see --help)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            # --no-X too: the embedded default turns --eval-teacher on
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            default = "" if f.default is None else f" (default: {f.default})"
            p.add_argument(flag, type=typ, metavar=f.name.upper(), help=f.metadata["help"] + default)
    given = typed = vars(p.parse_args(argv))
    untruncated = [f"--{k}" for k in ("full", "window", "tail") if given.get(k)]
    if untruncated and ("prefix_start" in given or "delta" in given):
        p.error(f"--prefix-start / --delta set the prefix schedule, which {untruncated[0]} replaces "
                "(untruncated rollouts): drop one")
    if not any(k in given for k in ("student", "teacher", "data")):  # no model arguments: the embedded default
        import embedded
        preset = dict(EMBEDDED, student=str(embedded.STUDENT_DIR), teacher=str(embedded.TEACHER_DIR),
                      data=str(embedded.TRAIN_FILE), heldout=str(embedded.HELDOUT_FILE))
        given = {**preset, **given}
    if "heldout" in typed and not given.get("eval_n"):  # typed, and not graded (the preset's count counts)
        p.error("--heldout FILE is graded only with --eval-n N (how many of its questions)")
    return Config(**given)


def usage_exit(msg):
    """A bad command line or input: one line from one rank, exit 2. Under torchrun the line also goes to the error
    file torchrun reads, so its failure report ends with it rather than with a link to its docs."""
    line = f"opd.py: error: {msg}"
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # the layout torchrun's @record writes (its py_callstack shown)
        info = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
        Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps({"message": info}))
    sys.exit(2)


class UsageError(Exception):
    """A bad flag or input: reported as one line, before anything is written."""


def model_dir_lacks(path) -> str:
    """What a local directory lacks of a Hugging Face model (config, tokenizer, weights): '' if nothing. Checked
    up front, where a loader would fail minutes in (a model loads after the other, and after sampling in eval.py)."""
    files = sorted(os.listdir(path))
    cut = next((f for f in files if f.endswith(".safetensors") and not _safetensors_whole(os.path.join(path, f))), None)
    parts = (("config.json", "config.json" in files),
             ("tokenizer.json", any(f in files for f in ("tokenizer.json", "vocab.json", "tokenizer.model"))),
             ("*.safetensors weights", any(f.endswith((".safetensors", ".bin")) for f in files)),
             (f"whole {cut}: it is cut off, or not safetensors", cut is None))
    return ", ".join(what for what, there in parts if not there)


def _safetensors_whole(file) -> bool:
    """The file's header reads and its tensors end where the file does (a copy cut short fails; reads ~KBs)."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 100 << 20 else None
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end == os.path.getsize(file)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False


def need(ok, msg):
    if not ok:
        raise UsageError(msg)


def check_config(cfg: Config):
    need(cfg.student and cfg.teacher and cfg.data,
         "--student, --teacher and --data go together: give all three (or none for the embedded default)")
    for flag, name in (("--student", cfg.student), ("--teacher", cfg.teacher)):
        # a path, not a hub id ("org/name"): say it is missing, not that it is a malformed repo id
        local = name.startswith(("/", ".")) or name.count("/") > 1
        need(not local or os.path.isdir(name),
             f"{flag} {name}: no such model directory (a local Hugging Face model dir, or a hub id like Qwen/Qwen3-8B)")
        lacks = os.path.isdir(name) and model_dir_lacks(name)
        need(not lacks, f"{flag} {name}: not a Hugging Face model directory (no {lacks}); pass one, e.g. a run's "
             "step_N/")
    need(cfg.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {cfg.max_new_tokens})")
    need(cfg.prefix_start >= 1, f"--prefix-start must be >= 1 (got {cfg.prefix_start})")
    need(cfg.untruncated or cfg.prefix_start <= cfg.max_new_tokens, f"--prefix-start {cfg.prefix_start} is past "
         f"--max-new-tokens {cfg.max_new_tokens}: L_train would be capped from the first step; use --full for "
         "whole rollouts")
    need(cfg.delta >= 0, f"--delta must be >= 0 (got {cfg.delta}); 0 keeps the prefix fixed")
    for name in ("steps", "batch_size", "samples", "micro_batch_tokens", "kl_bin"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    need(0 < cfg.lr < math.inf, f"--lr must be > 0 and finite (got {cfg.lr})")
    need(cfg.save_every >= 0, f"--save-every must be >= 0 (got {cfg.save_every}); 0 saves only at the end")
    need(cfg.eval_n >= 0, f"--eval-n must be >= 0 (got {cfg.eval_n})")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0 (got {cfg.weight_decay})")
    need(0 < cfg.vllm_memory <= 1, f"--vllm-memory is a fraction of GPU memory in (0, 1] (got {cfg.vllm_memory})")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (got {cfg.grad_clip}); 0 turns clipping off")
    need(cfg.tail >= 0, f"--tail must be >= 0 (got {cfg.tail})")
    # sampling_seed() must stay below 2^63 (vLLM and torch seed generators take a signed 64-bit integer)
    need(0 <= cfg.seed < 500_000, f"--seed must be in [0, 500000) (got {cfg.seed})")
    need(sum([cfg.full, cfg.window is not None, cfg.tail > 0]) <= 1,
         "--full, --window and --tail are different runs: pick at most one")
    if cfg.window is not None:
        a, _, b = cfg.window.partition(":")
        need(a.isdigit() and b.isdigit() and int(a) < int(b),
             f"--window must be A:B with 0 <= A < B, e.g. 1024:2048 (got {cfg.window!r})")
        need(int(a) < cfg.max_new_tokens, f"--window {cfg.window} starts at or past --max-new-tokens "
             f"{cfg.max_new_tokens}: no token would be trained; raise --max-new-tokens or move the window")
    need(cfg.sampler in ("vllm", "hf"), f"--sampler must be vllm or hf (got {cfg.sampler!r})")
    need(cfg.impl in ("auto", "triton", "torch"), f"--impl must be auto, triton or torch (got {cfg.impl!r})")
    need(cfg.eval_n == 0 or cfg.heldout, "--eval-n needs --heldout FILE (a .jsonl with question and answer)")
    need(cfg.batch_size * cfg.samples < 2**24, "--batch-size x --samples must be < 2^24 (one sampling seed each)")


# ----------------------------------------------------------------------------------------------------------------------
# Distributed plumbing: works under torchrun and as a plain `python opd.py` (world of one).
def init_dist():
    kw = {}
    if "RANK" not in os.environ:  # plain `python opd.py`: a world of one on a port nobody holds
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            kw = dict(init_method=f"tcp://127.0.0.1:{s.getsockname()[1]}", rank=0, world_size=1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        # Ranks wait in collectives while one works alone (rank 0 loading / saving models, the slowest rank sampling
        # 16k-token rollouts): far past NCCL's default 10-minute watchdog on the paper's models.
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(hours=2), **kw)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **kw)
        # Ranks share the cores: give each its own slice so they don't oversubscribe.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # ours to use
        torch.set_num_threads(max(1, (cores or 1) // dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size(), device


def log0(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def all_reduce(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce a few Python numbers over all ranks in one collective (gloo wants CPU tensors, NCCL CUDA ones)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


# ----------------------------------------------------------------------------------------------------------------------
# Data: questions from JSONL/Parquet; the prompt is the chat template with <think> forced (paper §3, Appendix A).
def chat_prompt(tokenizer, question: str) -> str:
    """The training/eval prompt (paper §3, Appendix A): chat template of the user turn, `<think>` forced.

    Forcing `<think>\\n` keeps the sample-based KL away from special tokens the student cannot learn.
    """
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    if text.rstrip().endswith("<think>"):  # a thinking model's template opens the block itself: not a second one
        return text.rstrip() + "\n"
    return text + "<think>\n"


def prompt_ids(tokenizer, question: str) -> list[int]:
    """chat_prompt's token ids (the template writes its own special tokens: none added)."""
    return tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids


def read_rows(path) -> list[dict]:
    """Rows (dicts) of a .jsonl / .json / .parquet / .csv file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: {'a directory' if path.is_dir() else 'no such file'}, not a data file (pass an "
                         "existing .jsonl/.json/.parquet/.csv file)")
    try:
        return _read_rows(path)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise UsageError(f"{path}: not a readable parquet file ({e})") from None
    if path.suffix == ".csv":
        import csv
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
            return list(csv.DictReader(f))
    if path.suffix not in (".jsonl", ".json"):
        raise UsageError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json, .parquet or .csv)")
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows tools) is not JSON
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a list of objects") from None
        if not all(isinstance(r, dict) for r in rows):
            raise UsageError(f"{path}: expected a JSON list of objects (one per question)")
        return rows
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(rows[-1], dict):
                raise UsageError(f"{path}:{i}: expected a JSON object per line, got {type(rows[-1]).__name__}")
    return rows


def question_of(row: dict, where: str) -> str:
    for key in ("prompt", "question", "problem", "Problem"):
        if isinstance(row.get(key), str):
            return row[key]
    for key in ("conversations", "messages"):  # OpenThoughts3 style: the first user turn
        for turn in row.get(key) or []:
            if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("human", "user") and \
                    isinstance(turn.get("value", turn.get("content")), str):
                return turn.get("value", turn.get("content"))
    if any(key in row for key in ("prompt", "question", "problem", "Problem")):
        raise UsageError(f"{where}: its prompt/question/problem field is not text")
    raise UsageError(f"{where}: no prompt/question/problem field and no user turn in conversations/messages")


def load_questions(path) -> list[str]:
    rows = read_rows(path)
    if not rows:
        raise UsageError(f"{path}: no rows; --data needs at least one question")
    return [question_of(r, f"{path} row {i}") for i, r in enumerate(rows, 1)]


def step_prompts(n_questions: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Question indices of global step `step`: consecutive slices of per-epoch shuffles (resumable from the step)."""
    return [_epoch_order(n_questions, seed, epoch)[i]
            for epoch, i in (divmod(pos, n_questions) for pos in range(step * batch_size, (step + 1) * batch_size))]


# Cached: a shuffle per batch position took 13 s a step at 1.2M questions (this CPU); one per epoch, 0.08 s
@functools.lru_cache(maxsize=2)
def _epoch_order(n_questions: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n_questions, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def load_tokenizers(cfg: Config):
    from transformers import AutoTokenizer

    def load(flag, name):
        try:
            return AutoTokenizer.from_pretrained(name)
        except OSError as e:  # a hub id that is not in the cache and not reachable (or a typo'd relative path)
            raise UsageError(f"{flag} {name}: not a local model directory, and the hub did not give its tokenizer "
                             f"({str(e).splitlines()[0]})") from None
    tok, ttok = load("--student", cfg.student), load("--teacher", cfg.teacher)
    # The loss compares logprobs of the same token ids under both models: the vocabularies must be identical.
    if tok.get_vocab() != ttok.get_vocab():
        raise UsageError(f"student {cfg.student} and teacher {cfg.teacher} have different vocabularies; "
                         "OPD needs one tokenizer: pick models of one family")
    # Both models are fed the prompt rendered once with the student's template: the teacher must see its own format.
    # Compared rendered, not as template source (a Base model's template may differ in comments or input checks).
    from jinja2 import TemplateError
    if not ttok.chat_template:
        raise UsageError(f"teacher {cfg.teacher} has no chat template: prompts are rendered in the teacher's chat "
                         "format (paper §3); give its tokenizer_config.json a chat_template")
    why = ""
    try:
        same = all(chat_prompt(tok, q) == chat_prompt(ttok, q) for q in ("What is 1 + 1?", "Find $x$ if $x^2 = 4$."))
    except (ValueError, TypeError, TemplateError) as e:  # no template at all, or one that fails to render
        same, why = False, f" ({type(e).__name__}: {e})"
    if not same:
        raise UsageError(f"student {cfg.student} and teacher {cfg.teacher} render prompts differently{why}; copy the "
                         "teacher's chat_template into the student's tokenizer_config.json")
    return tok


def model_shapes(name) -> "flops.ModelConfig":
    """The shapes for the FLOP accounting: flops.py's built-in Qwen3 names and local directories, else the hub id's
    config.json (from the hub cache, as transformers and vLLM resolve it)."""
    if os.path.isdir(name) or name.removeprefix("Qwen/") in flops.MODELS:
        return flops.load_config(name)
    from transformers.utils import cached_file
    try:
        return flops.load_config(cached_file(name, "config.json"))
    except OSError as e:  # transformers' message spans lines: keep the first
        raise UsageError(f"{name}: not a local model directory, and its hub config.json is not reachable "
                         f"({str(e).splitlines()[0]})") from None


def stop_ids(tok, path=None) -> list[int]:
    """Tokens that end a rollout, in training and in eval.py: the tokenizer's eos, the chat template's end of turn and
    end of text, and the eos of the model's generation_config.json (at `path`) when it has one. (Qwen3 base models
    name only <|endoftext|> as eos, but a chat-formatted prompt makes them, and their teacher, end with <|im_end|>.)"""
    vocab = tok.get_vocab()
    stop = {tok.eos_token_id} | {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    if path is not None:
        from transformers import GenerationConfig
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
            stop |= set(eos if isinstance(eos, list) else [eos])
        except OSError:  # no generation_config.json
            pass
    return sorted(stop - {None})


# ----------------------------------------------------------------------------------------------------------------------
# Models: HF Qwen3 (any causal LM with .model and .lm_head), FSDP2-sharded per decoder layer, then the root.
class LogProbs(torch.nn.Module):
    """Root FSDP unit: backbone → hidden states of the scored positions → `fn` (a fused kernel).

    The LM head is applied inside `fn` on [N, H] hidden rows, never as [T, V] logits. It lives in the root module's
    forward so FSDP2 has the embedding and LM head gathered while `fn` runs.
    """

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, rows, cols, fn, *args, **kwargs):
        hidden = self.hf.model(input_ids=input_ids, use_cache=False).last_hidden_state  # scored once: no KV cache
        weight = self.hf.lm_head.weight
        out = fn(hidden[rows, cols], weight, input_ids[rows, cols + 1], *args, **kwargs)
        if torch.is_grad_enabled():
            # Every rank must touch every parameter in every backward, even when its micro-batch has no trained token,
            # or FSDP's reduce-scatters fall out of step across ranks.
            out = (out[0] + 0.0 * (hidden.sum() + weight.sum()), out[1])
        return out


def load_model(path, device, train: bool, mixed_precision: bool | None = None):
    """Rank 0 reads the checkpoint (host RAM: one copy per job, not one per rank); the other ranks build the model on
    the meta device. After sharding, rank 0 broadcasts every tensor and each rank keeps its own shard.
    mixed_precision (default: on CUDA): bf16 compute, fp32 gradient reduction."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM
    cuda, rank0 = device.type == "cuda", dist.get_rank() == 0
    # Master weights in fp32 for the student; the frozen teacher needs only its compute copy.
    dtype = torch.float32 if train or not cuda else torch.bfloat16
    config = AutoConfig.from_pretrained(path)
    saved = config.dtype  # checkpoints keep the dtype the model shipped in (read before from_config can touch it)
    if rank0:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    else:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    full = hf.state_dict() if rank0 else {}  # rank 0's CPU tensors, alive past sharding
    buffers = {k: b.clone() for k, b in hf.named_buffers()}  # e.g. rotary inv_freq (not in the state dict)
    hf.config.dtype = getattr(torch, saved) if isinstance(saved, str) else (saved or torch.float32)
    hf.config.use_cache = False
    if train:  # long rollouts: recompute each layer's activations in backward rather than keep them. HF does that
        # only in training mode, so the student trains in it, with every dropout at 0 (its logprobs must be the sampler's)
        hf.train()
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for m in hf.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0
    else:
        hf.requires_grad_(False).eval()
    model = LogProbs(hf)
    mixed = cuda if mixed_precision is None else mixed_precision
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    for layer in hf.model.layers:
        fully_shard(layer, mp_policy=mp)
    # The root's forward also takes the sampler's and teacher's fp32 logprobs: FSDP must not round them to bf16.
    # The teacher never runs a backward, which is where FSDP reshards the root by default: reshard after forward.
    fully_shard(model, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False),
                reshard_after_forward=None if train else True)
    model.to_empty(device=device)
    set_model_state_dict(hf, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for k, b in hf.named_buffers():
            if rank0:
                b.copy_(buffers[k])
            dist.broadcast(b, src=0)
    return model


def full_weights(model, dtype, bucket_bytes=256 << 20):
    """Yield the student's full (unsharded) weights in buckets of ~bucket_bytes, in HF checkpoint names.

    Every rank all-gathers every parameter (a collective); only one bucket is alive at a time, so syncing the sampler
    never doubles peak memory.
    """
    bucket, size = {}, 0
    for name, p in model.hf.named_parameters():  # tied weights appear once, as HF checkpoints store them
        t = p.detach().to(dtype)  # cast the shard, then gather: fp32 master weights would move twice the bytes
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        bucket[name] = t
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = {}, 0
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------------------------------------------------
# Samplers. Both: load_weights(buckets), generate(prompt_ids, n, max_tokens, seed) -> list of
# (token_ids, logprobs, truncated) per prompt × sample, with the sampler's own logprob of every sampled token; close().
def _vllm_start(worker):
    import logging
    from vllm.config import set_current_vllm_config
    # Expected on every reload, not errors: rotary embeddings have no weights; a tied LM head loads via the embedding.
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.get_model())
    worker.opd_loaded = set()  # vLLM's names of the parameters this sync filled


def _vllm_load(worker, weights):
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(worker.vllm_config):
        worker.opd_loaded |= set(worker.model_runner.get_model().load_weights(iter(weights.items())) or ())


def _vllm_finish(worker) -> list[str]:
    """Ends the reload; returns the parameters it did not fill (their values would be a level-2 sleep's garbage)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload
    model = worker.model_runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
    lm_head = getattr(model, "lm_head", None)
    if hasattr(lm_head, "cpu_linear") and lm_head.weight is getattr(getattr(model.model, "embed_tokens", None),
                                                                     "weight", None):
        # vLLM-CPU (0.32) packs the LM head's GEMM once at load time; with tied embeddings a reload updates the
        # embedding but not that pack, so the sampler would keep the old head. Re-pack it.
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
    return sorted({name for name, _ in model.named_parameters()} - worker.opd_loaded)


def quiet_vllm():
    """vLLM logs at INFO per engine and per weight; keep errors only (VLLM_LOGGING_LEVEL=INFO brings them back)."""
    import logging
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # vLLM-CPU says at import, before its log level applies, that Triton has no CPU backend (as expected here)
    logging.getLogger("vllm.triton_utils.importing").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    # vLLM-CPU 0.32 walks every loaded module's attributes at start-up, tripping torch's deprecation of this one: here
    # and in the engine processes it spawns (they read PYTHONWARNINGS)
    msg = "`torch.distributed.reduce_op` is deprecated"
    warnings.filterwarnings("ignore", msg, FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", f"ignore:{msg}:FutureWarning")


class VLLMSampler:
    """vLLM colocated with the trainer: one engine per rank, sampling that rank's prompts.

    The engine lives in the trainer's process (`external_launcher`), on the rank's own device. On GPU it sleeps
    whenever it is not sampling, from its start on (level 2 drops the weights: every generate must follow a
    load_weights). Its CUDA graphs stay on the GPU while it sleeps (vLLM's sleep_mode_offload_cudagraph, off here,
    would copy them to the host and back every step).
    """

    def __init__(self, path, cfg: Config, max_model_len: int, rank: int, stop: list[int]):
        quiet_vllm()
        for k in ("RANK", "LOCAL_RANK"):  # the external launcher reads them; a plain `python opd.py` has none
            os.environ.setdefault(k, "0")
        self.cuda = torch.cuda.is_available()
        from vllm import LLM
        # external_launcher, data_parallel_size 1: vLLM's "ExternalDP", an engine in this process on this rank's
        # device, with no collectives while generating (its DP mode steps all ranks in lockstep: for MoE, hang-prone).
        kw = dict(model=path, seed=cfg.seed + rank, max_model_len=max_model_len, enable_prefix_caching=True,
                  distributed_executor_backend="external_launcher")
        if self.cuda:
            kw.update(dtype="bfloat16", gpu_memory_utilization=cfg.vllm_memory, enable_sleep_mode=True)
        else:
            # no chunked prefill: vLLM-CPU 0.32 rewinds a seeded request's generator after a partial prefill, which a
            # CPU generator cannot do (RuntimeError: CPU Generator does not use offset)
            kw.update(dtype="float32", kv_cache_memory_bytes=256 << 20, enforce_eager=True, enable_chunked_prefill=False)
        self.llm, self.stop = LLM(**kw), stop
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.kv_tokens = cache.num_gpu_blocks * cache.block_size  # rollout tokens its KV cache holds at once
        if self.cuda:  # asleep until the first load_weights: the memory is the trainer's (and the teacher grading's)
            self.llm.sleep(level=2)

    def load_weights(self, buckets):
        if self.cuda:  # what PyTorch's allocator keeps cached from training, vLLM's pool cannot use: give it back
            gc.collect()
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_vllm_start)
        for bucket in buckets:  # in-process: the tensors go by reference
            self.llm.collective_rpc(_vllm_load, args=(bucket,))
        bucket = None  # freed before the KV cache wakes (the last bucket holds Qwen3-8B's LM head: 1.2 GiB)
        [missing] = self.llm.collective_rpc(_vllm_finish)
        if missing:  # vLLM only logs this (a warning we silence above); sampling from such weights is off-policy noise
            raise RuntimeError(f"weight sync: {len(missing)} of the sampler's parameters got no weights from the "
                               f"student (e.g. {', '.join(missing[:3])}): the student's parameter names do not map "
                               "onto vLLM's model for this architecture")
        if self.cuda and self.llm.wake_up(tags=["kv_cache"]) is False:  # its scheduler stays paused: generate would hang
            raise RuntimeError("vLLM is not fully awake after the weight sync (weights and KV cache woken)")
        # Cached prefixes hold keys/values of the old weights: a prompt sharing one would be sampled off-policy.
        self.llm.reset_prefix_cache()

    def close(self):
        # vLLM tears down its process groups (built on ours, and ours with them): now, not at exit after ours are gone
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompt_ids, n, max_tokens, seed):
        from vllm import SamplingParams
        # One seed per prompt (vLLM gives the n samples seed+0..n-1): reproducible rollouts, also after a resume.
        # Token ids and flat logprob lists only: no text, no dict per token. The engine runs in this process, so
        # its per-token output work (detokenizing, a Logprob dict per token) would sit between decode steps.
        sps = [SamplingParams(n=n, temperature=TEMPERATURE, top_p=1.0, top_k=0, max_tokens=max_tokens, logprobs=0,
                              stop_token_ids=self.stop, seed=seed + i * n, detokenize=False, flat_logprobs=True)
               for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sps, use_tqdm=False)
        # each position's entries start with the sampled token's (logprobs=0 adds no others)
        rollouts = [(list(o.token_ids), [o.logprobs.logprobs[i] for i in o.logprobs.start_indices],
                     o.finish_reason == "length") for out in outs for o in out.outputs]
        if self.cuda:
            self.llm.sleep(level=2)  # free weights and KV cache for training; the next sync reloads the weights
        return rollouts


class _SampledLogprobs:
    """A logits processor that keeps log p of every sampled token, holding one step's distribution at a time.

    HF's `output_logits` would keep all of them: [rollouts, steps, V] in fp32, 160 GB for 256 rollouts of 1024
    tokens at V = 151936. Call t sees the tokens sampled so far, so it scores the one drawn at call t - 1;
    `finish` scores the last. Processors passed to generate run before HF's warpers: the scores are the raw
    logits, which over the temperature give the distribution the token was drawn from (top-p 1, top-k 0 and
    min-p 0 take nothing away)."""

    def __init__(self, temperature):
        self.temperature, self.last, self.logprobs = temperature, None, []

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self.logprobs.append(self.last.gather(1, input_ids[:, -1:]))
        self.last = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, sequences):
        """[rollouts, new tokens] log p of each generated token (sequences: prompt + generated ids)."""
        return torch.cat(self.logprobs + [self.last.gather(1, sequences[:, -1:])], 1)


class HFSampler:
    """Fallback: transformers `generate` on an unsharded copy (no vLLM needed; slow on long rollouts). Prompts go
    through in groups whose KV cache fits half the GPU memory free at the time, so a big batch runs in turns.
    Unlike vLLM it draws from one torch generator per call, seeded with the call's first rollout seed: the same
    command samples the same rollouts, but a resume or another world size (other groups, other shards) may not."""

    kv_tokens = None  # rollout tokens one generate may hold; None: from free GPU memory (CPU: no limit)

    def __init__(self, path, device, pad_id, stop: list[int], dtype=None):
        from transformers import AutoModelForCausalLM
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.pad_id, self.stop = device, pad_id, stop

    def close(self):
        pass

    @torch.no_grad()
    def load_weights(self, buckets):
        params = dict(self.model.named_parameters())
        for bucket in buckets:
            for name, t in bucket.items():
                params[name].copy_(t)

    def _kv_budget(self):
        """Rollout tokens whose keys and values fit half the GPU memory free now (PyTorch's cached blocks count)."""
        if self.kv_tokens or self.device.type != "cuda":
            return self.kv_tokens
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * self.model.dtype.itemsize
        free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) - \
            torch.cuda.memory_allocated(self.device)
        return free // 2 // per_token

    @torch.no_grad()
    def generate(self, prompt_ids, n, max_tokens, seed):
        torch.manual_seed(seed)
        budget = self._kv_budget()
        group = len(prompt_ids) if budget is None else \
            max(1, budget // (n * (max(map(len, prompt_ids)) + max_tokens)))
        rollouts = []
        for i in range(0, len(prompt_ids), group):
            rollouts += self._generate(prompt_ids[i:i + group], n, max_tokens)
        return rollouts

    def _generate(self, prompt_ids, n, max_tokens):
        from transformers import LogitsProcessorList
        width = max(map(len, prompt_ids))  # left-pad so every prompt ends where generation starts
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        scorer = _SampledLogprobs(TEMPERATURE)
        seqs = self.model.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([scorer]),
                                   do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0, min_p=0.0,
                                   repetition_penalty=1.0, max_new_tokens=max_tokens, num_return_sequences=n,
                                   pad_token_id=self.pad_id, eos_token_id=self.stop)
        tokens, logp = seqs[:, width:], scorer.finish(seqs)
        rollouts = []
        for toks, lps in zip(tokens.tolist(), logp.tolist()):
            end = next((i + 1 for i, t in enumerate(toks) if t in self.stop), None)
            rollouts.append((toks[:end], lps[:end], end is None))
        return rollouts


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the prefix schedule, the trained window, and the loss.
def sampling_seed(cfg: Config, stream: int, index: int) -> int:
    """A seed of its own for every rollout of the run (vLLM gives sample j of a prompt seeded s the seed s + j, and
    equal seeds draw equal noise): stream = the step (or 10^7 + k for held-out evaluation k), index < 2^24 within it."""
    return (cfg.seed * 1_000_003 + stream) * 2**24 + index


def schedule(cfg: Config, step: int) -> int:
    """L_train for this step (paper §3): prefix_start, growing by delta per update, capped at max_new_tokens.
    A function of the step alone (so a resume lands on the same L): a skipped, non-finite update moves L on too."""
    if cfg.untruncated:
        return cfg.max_new_tokens
    return flops.prefix_len(step, cfg.prefix_start, cfg.delta, cfg.max_new_tokens)


def token_mask(cfg: Config, length: int) -> list[float]:
    """m_t for the response positions t = 0..length-1 of one rollout (1 = trained). A sampled stop token is a
    position like any other (as in verl and Tinker): the teacher's logprob of it teaches the student where to end."""
    if cfg.window:
        a, b = map(int, cfg.window.split(":"))
        return [float(a <= t < b) for t in range(length)]
    if cfg.tail:
        return [float(t >= length - cfg.tail) for t in range(length)]
    return [1.0] * length  # prefix and full OPD: the rollout already stops at L_train


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sequence indices (longest first) so that each group's padded size stays within `budget` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, cur = [], []
    for i in order:
        if cur and lengths[cur[0]] * (len(cur) + 1) > budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    return groups + [cur] if cur else groups


def forward(model, seqs, pad_id, device, fn, *args):
    """Right-padded batch of prompt+response sequences → fn on the hidden rows that predict response tokens.

    Causal attention never looks right, so right padding needs no attention mask.
    """
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    rows, cols = [], []
    for b, (p, r) in enumerate(seqs):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        rows += [b] * len(r)
        cols += range(len(p) - 1, len(p) + len(r) - 1)
    rows, cols = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    return model(ids.to(device), rows, cols, fn, *args)


def train_step(cfg, student, teacher, kernels, seqs, logp_sampler, scale, pad_id, device, n_micro):
    """Teacher scoring, then the student's loss and backward, micro-batch by micro-batch. Returns per-token stats."""
    token_logprobs, opd_loss = kernels
    groups = micro_batches([len(p) + len(r) for p, r in seqs], cfg.micro_batch_tokens)
    groups += [[]] * (n_micro - len(groups))  # every rank runs the same number of FSDP forwards/backwards
    dummy = ([pad_id, pad_id], [pad_id])  # a 1-token stand-in for the padding micro-batches, never trained
    stats, t0 = [], time.perf_counter()
    teacher_lp = []
    with torch.no_grad():
        for g in groups:
            teacher_lp.append(forward(teacher, [seqs[i] for i in g] or [dummy], pad_id, device, token_logprobs,
                                      TEMPERATURE)[0])
    t_teacher = time.perf_counter() - t0
    for g, lp_t in zip(groups, teacher_lp):
        batch = [seqs[i] for i in g] or [dummy]
        lp_s = (torch.cat([torch.tensor(logp_sampler[i]) for i in g]) if g else torch.zeros(1)).to(device)
        mask = torch.cat([torch.tensor(token_mask(cfg, len(seqs[i][1]))) for i in g]) if g else torch.zeros(1)
        mask = mask.to(device)
        loss, st = forward(student, batch, pad_id, device, opd_loss, lp_s, lp_t, mask, scale, TEMPERATURE)
        loss.backward()
        if g:  # st already holds logp, entropy, ratio and kl per token
            stats.append(dict(st, loss=loss.detach(), logp_sampler=lp_s, mask=mask,
                              pos=torch.cat([torch.arange(len(seqs[i][1])) for i in g]).to(device)))
    return stats, t_teacher, time.perf_counter() - t0 - t_teacher


def step_metrics(cfg, stats, rollouts, L, device) -> dict:
    """Global (all-rank) metrics of one step; the KL by position bin is what the paper plots in Fig. 2 and 5."""
    cat = lambda k: torch.cat([s[k].float() for s in stats]) if stats else torch.zeros(0, device=device)
    m, kl, pos = cat("mask"), cat("kl"), cat("pos")
    gap = (cat("logp") - cat("logp_sampler")).abs()
    nbins = -(-cfg.max_new_tokens // cfg.kl_bin)
    bins = (pos // cfg.kl_bin).long().clamp(max=nbins - 1)
    kl_bin = torch.zeros(nbins, dtype=torch.float64, device=device).index_add_(0, bins, kl.double())
    n_bin = torch.zeros(nbins, dtype=torch.float64, device=device).index_add_(0, bins, torch.ones_like(kl).double())
    lens = [len(r[0]) for r in rollouts]
    sums = all_reduce([len(lens), sum(lens), sum(x * x for x in lens), sum(r[2] for r in rollouts), m.sum().item(),
                       (m * kl).sum().item(), (m * cat("entropy")).sum().item(), (m * cat("ratio")).sum().item(),
                       (m * gap).sum().item(), kl.sum().item(), len(kl)] + kl_bin.tolist() + n_bin.tolist(), device)
    n, tot, sq, trunc, nm, klm, ent, ratio, gapm, klall, nall = sums[:11]
    maxes = all_reduce([max(lens, default=0), (m * cat("ratio")).max().item() if len(m) else 0,
                        (m * gap).max().item() if len(m) else 0], device, dist.ReduceOp.MAX)
    kb, nb = sums[11:11 + nbins], sums[11 + nbins:]
    last = max([i for i in range(nbins) if nb[i] > 0], default=-1)
    return dict(L=L, n_seqs=int(n), seqlen_sum=int(tot), seqlen_sq_sum=int(sq), len_mean=tot / max(n, 1),
                len_max=int(maxes[0]), truncated=trunc / max(n, 1), trained_tokens=int(nm), kl=klm / max(nm, 1),
                kl_all=klall / max(nall, 1), entropy=ent / max(nm, 1), ratio_mean=ratio / max(nm, 1),
                ratio_max=maxes[1], gap_mean=gapm / max(nm, 1), gap_max=maxes[2],
                kl_by_pos=[round(kb[i] / nb[i], 5) if nb[i] else None for i in range(last + 1)])


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: step_N/ is an HF model directory (transformers, vLLM and eval.py load it) + trainer/ to resume from.
def save_checkpoint(cfg, step, model, optimizer, tok, skipped, flops_total):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    out, rank = Path(cfg.out), dist.get_rank()
    tmp, final = out / f".tmp_step_{step:06d}", out / f"step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    hf = model.hf
    full = get_model_state_dict(hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if hf.config.tie_word_embeddings:
            full.pop("lm_head.weight", None)
        save_file({k: v.to(hf.config.dtype).contiguous() for k, v in full.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        hf.config.use_cache = True  # the trainer runs without a KV cache; whoever loads the checkpoint wants one
        hf.config.save_pretrained(tmp)
        hf.config.use_cache = False
        hf.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    del full
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp / "trainer")
    rng = dict(cpu=torch.get_rng_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    torch.save(rng, tmp / "trainer" / f"rng_rank{rank}.pt")
    if rank == 0:
        (tmp / "trainer" / "state.json").write_text(json.dumps(
            dict(step=step, L_next=schedule(cfg, step), skipped=skipped, flops_total=flops_total,
                 world_size=dist.get_world_size())))
    dist.barrier()
    if rank == 0:  # the rename is the commit: a killed run never leaves a half-written step_N
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


def latest_checkpoint(out) -> Path | None:
    steps = sorted(Path(out).glob("step_*/trainer/state.json"))
    return steps[-1].parent.parent if steps else None


def checkpoint_to_resume(cfg) -> Path | None:
    """The checkpoint --resume continues from (None: a new run), refusing what would mix two runs in one --out."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    ckpt = latest_checkpoint(out)
    if not cfg.resume:
        if ckpt:
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if (out / "metrics.jsonl").exists():
            raise UsageError(f"{out} holds metrics.jsonl of a run that never checkpointed; delete it or choose "
                             "another --out")
        return None
    if ckpt is None:
        raise UsageError(f"--resume: no checkpoint in {out}; drop --resume to start a new run")
    done = json.loads((ckpt / "trainer" / "state.json").read_text())["step"]
    if cfg.steps < done:
        raise UsageError(f"--resume: {ckpt} is at step {done}, past --steps {cfg.steps}; raise --steps")
    old = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}

    def same(k, a, b):  # a model or data path may be spelled differently (relative, absolute, through a link)
        return a == b or (k in ("student", "teacher", "data", "heldout") and os.path.exists(a or "") and
                          os.path.exists(b or "") and os.path.samefile(a, b))

    # The same run: models, data, schedule, batches, seeds and optimizer settings (the optimizer's lr and weight
    # decay come back from the checkpoint: a new value would be logged but not used); the same KL bins in
    # metrics.jsonl; where both grade held-out questions, the same ones (heldout.json sets before beside after).
    keys = ["student", "teacher", "data", "batch_size", "samples", "seed", "prefix_start", "delta", "max_new_tokens",
            "full", "window", "tail", "lr", "weight_decay", "grad_clip", "kl_bin"]
    if cfg.eval_n and old.get("eval_n"):
        keys += ["heldout", "eval_n"]
    for k in keys:
        if k in old and not same(k, old[k], getattr(cfg, k)):
            raise UsageError(f"--resume: {out / 'run.json'} has {k}={old[k]!r}, this command {getattr(cfg, k)!r}; "
                             "a resumed run keeps its models, data, schedule, seeds, optimizer and held-out set (or "
                             "start a new --out)")
    return ckpt


def load_checkpoint(path, model, optimizer):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path / "trainer")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    state = json.loads((path / "trainer" / "state.json").read_text())
    rng_file = path / "trainer" / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.exists():  # DCP reshards model and optimizer to any number of ranks; per-rank RNG cannot follow
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    if state["world_size"] != dist.get_world_size():
        log0(f"note: {path} was written by {state['world_size']} ranks, resumed on {dist.get_world_size()}: "
             "weights and optimizer are resharded; RNG states restored only where a rank had one")
    return state


def read_metrics(out: Path) -> list[dict]:
    """OUT/metrics.jsonl's records, less a line a killed run left half-written."""
    recs = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


# ----------------------------------------------------------------------------------------------------------------------
# The run at a glance: OUT/metrics.png, redrawn at every checkpoint and at the end (rank 0).
def plot_run(out: Path, kl_bin: int):
    """KL and L_train per step; KL by rollout position (paper Fig. 2/5) for a few steps; KL against training FLOPs
    (Appendix B, the paper's x-axis); entropy, importance ratio and sampler gap. A plot must never stop a run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        recs = sorted({r["step"]: r for r in read_metrics(out)}.values(), key=lambda r: r["step"])  # a resume redid some
        step = [r["step"] + 1 for r in recs]
        fig, ax = plt.subplots(1, 4, figsize=(20, 4))
        # wide under dashed: in prefix and full OPD every sampled token is trained, and the two lines coincide
        ax[0].plot(step, [r["kl"] for r in recs], lw=3, alpha=0.5, label="KL, trained tokens")
        ax[0].plot(step, [r["kl_all"] for r in recs], "--", label="KL, all sampled tokens")
        ax[0].set(xlabel="step", ylabel="sampled-token reverse KL")
        ax[0].legend(loc="upper center")
        ax[0].twinx().plot(step, [r["L"] for r in recs], "k:")[0].axes.set_ylabel("L_train (dotted)")
        for i in sorted({0, len(recs) // 2, len(recs) - 1}):
            kl = [math.nan if v is None else v for v in recs[i]["kl_by_pos"]]  # None: no token in that bin
            ax[1].plot([(j + 0.5) * kl_bin for j in range(len(kl))], kl, "o-", ms=3, label=f"step {step[i]}")
        ax[1].set(xlabel="position in rollout (tokens)", ylabel="KL", title="KL by position")
        ax[1].legend()
        ax[2].plot([r["flops_total"] for r in recs], [r["kl_all"] for r in recs], "o-", ms=3)
        ax[2].set(xscale="log", xlabel="training FLOPs (Appendix B)", ylabel="KL, all sampled tokens")
        ax[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for k in ("entropy", "ratio_max", "gap_mean"):
            ax[3].plot(step, [max(r[k], 1e-12) for r in recs], label=k)
        ax[3].set(yscale="log", xlabel="step")
        ax[3].legend()
        if (out / "heldout.json").exists():
            acc = json.loads((out / "heldout.json").read_text())
            fig.suptitle("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=90)
        plt.close(fig)
    except Exception as e:  # noqa: BLE001
        log0(f"note: no metrics.png ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------------------------------------------------
# Held-out accuracy, the quick sanity print around a run (eval.py is the full protocol).
def heldout_accuracy(sampler, tok, rows, cfg, k, device) -> float:
    """One sample per question at temperature 1.0, up to --max-new-tokens, graded as eval.py grades it.
    k numbers the evaluation (its own seeds); each rank takes a contiguous block of the rows."""
    import embedded
    import eval as evaluation
    kind = "embedded" if Path(cfg.heldout).resolve() == embedded.HELDOUT_FILE else "math"
    per = -(-len(rows) // dist.get_world_size())
    first = dist.get_rank() * per
    mine = rows[first:first + per]
    correct = 0
    if mine:
        prompts = [prompt_ids(tok, r["question"]) for r in mine]
        outs = sampler.generate(prompts, 1, cfg.max_new_tokens, sampling_seed(cfg, 10**7 + k, first))
        graded = evaluation.grade(kind, [tok.decode(o[0], skip_special_tokens=True) for o in outs],
                                  [str(r["answer"]) for r in mine],
                                  finished=[not o[2] for o in outs])
        correct = sum(ok for _, ok in graded)
    c, n = all_reduce([correct, len(mine)], device)
    return c / max(n, 1)


# ----------------------------------------------------------------------------------------------------------------------
@record  # under torchrun, a crash's traceback (and the rank it hit first) closes torchrun's failure report
def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = init_dist()
    error = None
    try:
        check_config(cfg)
        if cfg.batch_size % world:
            raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the number of ranks ({world})")
        questions = load_questions(cfg.data)
        tok = load_tokenizers(cfg)
        heldout = read_rows(cfg.heldout)[:cfg.eval_n] if cfg.eval_n else []
        for i, r in enumerate(heldout, 1):
            need(isinstance(r, dict) and isinstance(r.get("question"), str) and r.get("answer") is not None,
                 f"{cfg.heldout} row {i}: --heldout needs a question (text) and an answer per row")
        ckpt = checkpoint_to_resume(cfg)
        s_cfg, t_cfg = model_shapes(cfg.student), model_shapes(cfg.teacher)
        import kernels
        impl = cfg.impl if cfg.impl != "auto" else ("triton" if device.type == "cuda" else "torch")
        if impl == "triton" and not kernels.triton_usable(torch.empty(0, device=device)):
            raise UsageError(f"--impl triton cannot run on {device.type} here ({kernels.FUSED_ERROR or 'no GPU'}); "
                             "use --impl torch (or set TRITON_INTERPRET=1 for a slow CPU check)")
        prompts = [prompt_ids(tok, q) for q in questions]
        longest = max(len(p) for p in prompts + [prompt_ids(tok, r["question"]) for r in heldout])
        max_len = longest + cfg.max_new_tokens + 1
        from transformers import AutoConfig
        for flag, name in (("--student", cfg.student), ("--teacher", cfg.teacher)):
            limit = getattr(AutoConfig.from_pretrained(name), "max_position_embeddings", None) or math.inf
            room = limit - longest - 1
            need(max_len <= limit, f"the longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} "
                 f"is past {flag}'s {limit} positions: " + (f"lower --max-new-tokens to {room} or less" if room >= 1
                                                            else "shorten the longest prompts"))
        out = Path(cfg.out)
        try:  # now, not after minutes of loading (every rank: each must exit here if it fails); a real write, as
            out.mkdir(parents=True, exist_ok=True)  # os.access passes anything for root
            tempfile.TemporaryFile(dir=out).close()
        except OSError as e:
            raise UsageError(f"--out {out}: cannot write there ({e.strerror}); choose another --out") from None
    except (UsageError, ValueError, OSError) as e:
        error = str(e)
    # Every rank learns every rank's verdict: a check that fails on one node only (a path not there, an --out it
    # cannot write) must stop them all, not leave the rest waiting in the first collective until NCCL times out.
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        r, first = next((r, e) for r, e in enumerate(errors) if e)
        try:  # the line first: torchrun stops the other ranks as soon as one has exited
            usage_exit(first if errors.count(first) == len(errors) else f"rank {r}: {first}")
        finally:
            dist.destroy_process_group()

    kern = kernels.get_impl(impl)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = stop_ids(tok, cfg.student)

    student = load_model(cfg.student, device, train=True)
    teacher = load_model(cfg.teacher, device, train=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.sampler == "vllm":
        sampler = VLLMSampler(cfg.student, cfg, max_len, rank, stop)
        fits, per_rank = sampler.kv_tokens // max_len, cfg.batch_size // world * cfg.samples
        # a rollout that does not fit waits for another to finish: late prefix steps and full OPD sample in waves
        log0(f"sampler: a KV cache of {sampler.kv_tokens} tokens per rank holds {fits} rollouts at full length "
             f"({max_len} tokens) at once, of the {per_rank} each rank samples per step"
             + (" (--vllm-memory sets it)" if device.type == "cuda" and fits < per_rank else ""))
    else:
        sampler = HFSampler(cfg.student, device, pad_id, stop)
    start, skipped, flops_total = 0, 0, 0.0
    if ckpt is not None:  # after the sampler: vLLM reseeds the process's RNGs when it starts; the resumed ones win
        state = load_checkpoint(ckpt, student, optimizer)
        start, skipped, flops_total = state["step"], state["skipped"], state["flops_total"]
        log0(f"resumed from {ckpt}: step {start}, L_train {schedule(cfg, start)}")
    if rank == 0:
        (out / "run.json").write_text(json.dumps(dict(dataclasses.asdict(cfg), world_size=world), indent=1))
        if start and (out / "metrics.jsonl").exists():  # steps after the checkpoint are redone: drop their records
            kept = [r for r in read_metrics(out) if r["step"] < start]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def sync_sampler():  # the sampler must sample from the weights being trained (on-policy)
        sampler.load_weights(full_weights(student, torch.bfloat16 if device.type == "cuda" else torch.float32))

    acc = {}
    if heldout and start == 0:
        if cfg.eval_teacher:  # before the sampler wakes: an unsharded teacher copy next to it may not fit
            teacher_sampler = HFSampler(cfg.teacher, device, pad_id, stop)
            acc["teacher"] = heldout_accuracy(teacher_sampler, tok, heldout, cfg, 0, device)
            del teacher_sampler
            gc.collect()
        sync_sampler()
        acc["student_before"] = heldout_accuracy(sampler, tok, heldout, cfg, 1, device)
        log0("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
        if rank == 0:  # now, so that a resumed run still has them
            (out / "heldout.json").write_text(json.dumps(acc))

    per_rank = cfg.batch_size // world
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        L = schedule(cfg, step)
        sync_sampler()  # every generate follows a sync: the GPU sampler drops its weights when it sleeps
        t_sync = time.perf_counter() - t0
        idx = step_prompts(len(questions), step, cfg.batch_size, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
        rollouts = sampler.generate([prompts[i] for i in idx], cfg.samples, L,
                                    seed=sampling_seed(cfg, step, rank * per_rank * cfg.samples))
        t_sample = time.perf_counter() - t0 - t_sync
        # ALGO LOGIC: each rollout is one sequence; token losses are summed per sequence and averaged over all
        # rollouts of the global batch. FSDP averages gradients over ranks, hence world / N rather than 1 / N.
        seqs = [(prompts[i], r[0]) for i, rs in zip(idx, zip(*[iter(rollouts)] * cfg.samples)) for r in rs]
        seqs_kept = [(s, r[1]) for s, r in zip(seqs, rollouts) if r[0]]  # empty rollouts score nothing
        scale = world / (cfg.batch_size * cfg.samples)
        n_local = len(micro_batches([len(p) + len(r) for (p, r), _ in seqs_kept], cfg.micro_batch_tokens))
        n_micro = int(all_reduce([n_local], device, dist.ReduceOp.MAX)[0])
        stats, t_teacher, t_student = train_step(cfg, student, teacher, kern, [s for s, _ in seqs_kept],
                                                 [lp for _, lp in seqs_kept], scale, pad_id, device, n_micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss = all_reduce([sum(s["loss"].item() for s in stats)], device)[0] / world  # what was differentiated
        if math.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
        else:  # one bad batch must not poison the weights
            skipped += 1
            log0(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm.item()}: update skipped")
        optimizer.zero_grad(set_to_none=True)

        met = step_metrics(cfg, stats, rollouts, L, device)
        step_flops = flops.opd_flops(s_cfg, t_cfg, sums=(met["seqlen_sum"], met["seqlen_sq_sum"]))
        flops_total += step_flops
        dt = time.perf_counter() - t0
        met.update(step=step, loss=loss, grad_norm=grad_norm.item(), skipped=skipped, flops=step_flops,
                   flops_total=flops_total, tokens_per_s=met["seqlen_sum"] / dt, lr=cfg.lr,
                   time=dict(sync=t_sync, sample=t_sample, teacher=t_teacher, student=t_student, total=dt))
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(met) + "\n")
        log0(f"step {step + 1}/{cfg.steps} | L {L} | len {met['len_mean']:.1f}/{met['len_max']} "
             f"trunc {met['truncated']:.0%} | kl {met['kl']:.4f} | H {met['entropy']:.3f} | "
             f"ratio {met['ratio_mean']:.3f}/{met['ratio_max']:.3f} | gap {met['gap_mean']:.1e}/{met['gap_max']:.1e} | "
             f"|g| {met['grad_norm']:.3f} | {met['tokens_per_s']:.0f} tok/s | {dt:.1f}s (sync {t_sync:.1f} sample "
             f"{t_sample:.1f} teacher {t_teacher:.1f} student {t_student:.1f}) | {flops_total:.2e} FLOP")
        if met["gap_mean"] > STALE_GAP:
            log0(f"WARNING: sampler and trainer disagree by {met['gap_mean']:.3f} nats/token on the same tokens: "
                 "the sampler's weights look stale (weight sync broken?) or its numerics differ badly")
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
            path = save_checkpoint(cfg, step + 1, student, optimizer, tok, skipped, flops_total)
            log0(f"saved {path}")
            if rank == 0:
                plot_run(out, cfg.kl_bin)

    if heldout:
        sync_sampler()
        if (out / "heldout.json").exists():  # the before-training numbers, also after a resume
            acc = {**json.loads((out / "heldout.json").read_text()), **acc}
        acc["student_after"] = heldout_accuracy(sampler, tok, heldout, cfg, 2, device)
        log0("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
        if rank == 0:
            (out / "heldout.json").write_text(json.dumps(acc))
            plot_run(out, cfg.kl_bin)
    log0(f"done: {cfg.steps - start} steps, {flops_total:.3e} FLOP (paper accounting), {skipped} skipped updates")
    sampler.close()
    if dist.is_initialized():  # vLLM's shutdown may have destroyed it already
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
