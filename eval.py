"""Benchmark evaluation for prefix OPD checkpoints (paper §4.1), answer grading, teacher-prefix probe (§2.3).

Protocol (§4.1): the training prompt (chat template of the question, `<think>` forced: opd.chat_prompt),
temperature 1.0, top-p 1.0, up to 16384 new tokens, k samples per question (16 for AIME, 4 otherwise),
mean accuracy over the k samples (mean acc@k). The ± in the table is the 95% normal-approximation
interval over questions: 1.96 * sd(per-question acc@k) / sqrt(#questions).

Grading reads the text after the last `</think>`; a sample without one gets nothing if it was cut off at the token
budget and is read whole if it ended its turn (base models often never close the thought). Math: the last \\boxed{}
(else an anchored "the answer is ..."; all boxes as one list where each answer got its own; none if the last box is
cut off), checked against the gold answer with math-verify. Multiple choice: the last explicit letter (a boxed letter,
also "\\boxed{C. 3.1 eV}"; "Answer: C", "the answer is (C)", "the correct option is $C$"), else the last "(C)" unless a
box holds a value.

    python eval.py                                   # embedded student + teacher on the held-out set
    python eval.py --model runs/x/step_000050 runs/x/step_000060 \\
        --data math500=math500.jsonl aime24=aime24.parquet aime25=aime25.jsonl gpqa=gpqa_diamond.csv \\
               mmlupro=mmlu_pro_test.parquet
    python eval.py --model Qwen/Qwen3-1.7B-Base runs/x/step_0000{10,20,30,40,50,60} --dev aime24 --engines 8 \\
        --data aime24=aime24.parquet math500=math500.jsonl     # Appendix E; one engine per GPU of 8
    python eval.py --model Qwen/Qwen3-1.7B-Base runs/x/step_0000{10,20,30} --kl-teacher Qwen/Qwen3-8B \\
        --data aime24=aime24.parquet --engines 8                # + the reverse KL to the teacher by position (Fig. 5)
    python eval.py --model Qwen/Qwen3-1.7B-Base --teacher-prefix Qwen/Qwen3-8B \\
        --data aime24=aime24.parquet --prefix-lengths 0,2048,4096,6144,8192     # Fig. 3

--model takes checkpoint directories or hub ids (fetched into the Hugging Face cache: config, tokenizer,
*.safetensors). Local files use the public column names (MATH-500 problem/answer, AIME-24 Problem/Answer,
AIME-25 problem/answer, GPQA Question/Correct Answer/Incorrect Answer 1-3, MMLU-Pro question/options/answer). A benchmark named in
--benchmarks without --data is fetched from the hub with `datasets` (when installed and online).
Writes OUT/eval.json (every sample), OUT/table.md (rows = checkpoints, columns = benchmarks) and,
for the probe, OUT/prefix_probe.png. Checkpoints that opd.py wrote (step_N/ with trainer/state.json) also get their
training FLOPs (Appendix B accounting) in the table and OUT/compute.png: accuracy against training compute, one line
per run, as the paper's Fig. 4; models without that record (base models, the teacher) are dashed levels.
--kl-teacher scores every sample (with --dev: the dev benchmark's, which every row has) under its own model and the
teacher (teacher-forced, with opd.py's forward and kernels): the sampled-token reverse KL log p_model - log p_teacher,
as a table column and by position in OUT/kl_by_position.png (Fig. 2 / 5, over whole responses: past a prefix run's
trained L_train too).
"""
import argparse
import ast
import functools
import gc
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from opd import HFSampler, UsageError as BadInput, model_dir_lacks, prompt_ids, quiet_vllm, read_rows, stop_ids  # as training

# name: (table title, answer kind, default k, hub source (id, config, split)); columns follow the hub sets
BENCHMARKS = {
    "math500": ("MATH500", "math", 4, ("HuggingFaceH4/MATH-500", None, "test")),
    "aime24": ("AIME-24", "math", 16, ("Maxwell-Jia/AIME_2024", None, "train")),
    "aime25": ("AIME-25", "math", 16, ("math-ai/aime25", None, "test")),
    "gpqa": ("GPQA", "choice", 4, ("Idavidrein/gpqa", "gpqa_diamond", "train")),
    "mmlupro": ("MMLU-Pro", "choice", 4, ("TIGER-Lab/MMLU-Pro", None, "test")),
    "embedded": ("embedded", "embedded", 4, None),
}
DATA_SEED = 0          # fixed: the MMLU-Pro subset and GPQA choice order must not change between checkpoints
MMLUPRO_N = 500        # §4.1: a random sample of 500 MMLU-Pro questions
LETTERS = "ABCDEFGHIJ"
CHOICE_INSTRUCTION = "Answer with the letter of the correct option, as \\boxed{X}."


def hub_rows(name):
    """Rows of the benchmark's public hub dataset (only when `datasets` is installed and the hub is reachable)."""
    hub_id, config, split = BENCHMARKS[name][3]
    try:
        import datasets
    except ImportError:
        raise BadInput(f"no data for {name}: pass --data {name}=FILE (.jsonl/.parquet/.csv), "
                       f"or pip install datasets to fetch {hub_id}")
    try:
        return datasets.load_dataset(hub_id, config, split=split).to_list()
    except Exception as e:  # offline, gated (GPQA), renamed...: the fix is the same
        raise BadInput(f"could not fetch {hub_id} for {name} ({type(e).__name__}); pass --data {name}=FILE")


def load_benchmark(name, path=None):
    """Questions of one benchmark as dicts {id, question, answer}; `answer` is a letter for choice sets."""
    if name == "embedded":
        import embedded
        path = path or embedded.HELDOUT_FILE
    rows = read_rows(path) if path else hub_rows(name)
    if not rows:
        raise BadInput(f"{name}: {path} has no rows")
    keys = {k.lower(): k for k in rows[0]}  # AIME-24 says Problem/Answer, the others problem/answer

    def need(*names):  # the column, which every row must fill (a blank answer would be graded against "None")
        for n in names:
            if n.lower() in keys:
                col = keys[n.lower()]
                for i, r in enumerate(rows, 1):
                    if r.get(col) is None or str(r[col]).strip() == "":
                        raise BadInput(f"{name}: {path or 'hub data'} row {i} has no {col!r}; every row needs one")
                return col
        raise BadInput(f"{name}: {path or 'hub data'} has no column {' or '.join(map(repr, names))} "
                       f"(columns: {', '.join(rows[0])}); use the public column names")

    id_col = next((keys[k] for k in ("unique_id", "id", "question_id", "record id") if k in keys), None)
    ids = [str(r.get(id_col)).strip() if id_col else str(i) for i, r in enumerate(rows)]
    seen = set()
    for i, v in enumerate(ids, 1):  # samples are kept and summed per id: a repeated or blank one would merge questions
        if v in ("", "None") or v in seen:
            raise BadInput(f"{name}: {path or 'hub data'} row {i}: its {id_col!r} {v!r} is blank or repeats an "
                           "earlier row's; ids must be unique")
        seen.add(v)
    rng = random.Random(DATA_SEED)
    if name == "gpqa":  # Question / Correct Answer / Incorrect Answer 1-3, shuffled with a fixed seed
        q, cols = need("Question"), [need("Correct Answer")] + [need(f"Incorrect Answer {i}") for i in (1, 2, 3)]
        orders = [rng.sample(range(4), 4) for _ in rows]  # letter j shows choice order[j]; choice 0 is right
        return [dict(id=i, question=format_choices(str(r[q]).strip(), [str(r[cols[j]]).strip() for j in o]),
                     answer=LETTERS[o.index(0)]) for i, r, o in zip(ids, rows, orders)]
    if name == "mmlupro":  # question / options (list) / answer (letter); a fixed random sample of 500
        q, opts, ans = need("question"), need("options"), need("answer")

        def options(i, r):  # a list, or the csv's "['a', 'b']"; anything else is a broken export
            o = r[opts]
            try:
                o = list(o) if isinstance(o, (list, tuple)) else ast.literal_eval(str(o))
            except (ValueError, SyntaxError):
                o = None
            if not (isinstance(o, list) and 2 <= len(o) <= len(LETTERS) and all(isinstance(x, str) for x in o)
                    and len(str(r[ans]).strip()) == 1 and str(r[ans]).strip() in LETTERS[:len(o)]):
                raise BadInput(f"mmlupro: {path or 'hub data'} question {i}: options {str(r[opts])[:60]!r} with "
                               f"answer {r[ans]!r} is not a list of 2-10 strings holding the answer's letter")
            return o
        out = [dict(id=i, question=format_choices(r[q], options(i, r)), answer=str(r[ans]).strip())
               for i, r in zip(ids, rows)]
        return out if len(out) <= MMLUPRO_N else [out[j] for j in sorted(rng.sample(range(len(out)), MMLUPRO_N))]
    q, ans = need("problem", "question"), need("answer")  # MATH-500, AIME-24/25, embedded
    return [dict(id=i, question=str(r[q]), answer=str(r[ans]).strip()) for i, r in zip(ids, rows)]


def format_choices(question, choices):
    lines = [f"({LETTERS[j]}) {c}" for j, c in enumerate(choices)]
    return f"{question}\n\n" + "\n".join(lines) + f"\n\n{CHOICE_INSTRUCTION}"


# ----------------------------------------------------------------------------- grading
def final_part(completion, finished=False):
    """The text after the reasoning. Without `</think>`: a sample cut off at the token budget has no answer; one that
    ended its turn (finished: base models often never close the thought) answered inside it, so all of it counts."""
    i = completion.rfind("</think>")
    return completion[i + len("</think>"):] if i >= 0 else completion if finished else None


_BOX = re.compile(r"\\boxed(?:\s*\{|\s+([^\s${}\\]+))")  # \boxed{...}, or \boxed 5 (valid LaTeX, and models write it)


def boxed(text):
    """The \\boxed{...} (braces matched) and \\boxed 5 in text, in order, as (start, end offset, content) triples; an
    unclosed one (cut off) ends them with content None."""
    out, pos = [], 0
    while m := _BOX.search(text, pos):
        if m.group(1) is not None:  # \boxed 5.: LaTeX boxes one token; the sentence's full stop is not the answer's
            value = m.group(1).rstrip(".,;:")
            out.append((m.start(), m.start(1) + len(value), value))
            pos = m.end()
            continue
        depth, i = 0, m.end() - 1  # at the {
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append((m.start(), j + 1, text[i + 1:j].strip()))
                break
        else:
            out.append((m.start(), len(text), None))
            break
        pos = j
    return out


def answer_part(completion, finished=False):
    """(final part, its boxes as boxed() gives them), or (None, None) where there is no answer: no final part, or cut
    off inside its last box (not the box before it)."""
    text = final_part(completion, finished)
    boxes = boxed(text) if text is not None else []
    return (None, None) if text is None or boxes and boxes[-1][2] is None else (text, boxes)


# A box that holds an option: \boxed{C}, \boxed{\text{(C)}}, \boxed{\mathbf{c}}, \boxed{C. 3.1 eV}, \boxed{(C) 3.1 eV}
# \boxed{C \text{ (3.1 eV)}}, \boxed{\text{Option C}} (not \boxed{a = 5}: a bare letter must end the box or be followed
# by punctuation, a LaTeX space or \text)
_BOX_LETTER = re.compile(r"\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?(?i:(?:option|choice)\s+)?"
                         r"(?:\(([A-Ja-j])\)|([A-Ja-j])(?=\s*(?:[.):,}\-–~]|\\[ ,;!]|\\(?:text|quad)|$)))")
# Said: "Answer: C", "the answer is (C)", "**Answer:** $\text{C}$", "the answer is \(C\)", "the answer is option C",
# "the correct option is C", "**Final Answer**" and C on the next line ("answer", "option" and "choice" only before
# "is", ":" or the line's end: "let me check option B" and "answer (D) is ruled out" are no answers)
_SAID = re.compile(r"(?i:answer|option|choice)(?P<is>\s+is|\s*:|[*_]*[ \t]*\n)\s*[*_]*\s*:?\s*[*_]*\s*"
                   r"(?i:(?:option|choice)\s+)?(?:\$|\\\()?\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?"
                   r"\(?(?P<letter>[A-J])\)?(?![A-Za-z])")
_WEAK = re.compile(r"\(([A-J])\)|^\s*[*_]*([A-J])[.)]?[*_]*\s*$", re.MULTILINE)  # "(C)", a line that is just "C"


def _a_word(m):
    """Whether a said letter A or I is the word, not the option: "Answer: I think ...", "I'm", "Answer: A closer look".
    After "is", A is the option ("the answer is A in this case"); "I is / because / since / as" is option I."""
    letter, rest = m.group("letter"), m.string[m.end():]
    if letter not in "AI" or (letter == "A" and "is" in m.group("is").lower()):
        return False
    w = re.match(r"[ \t]+([a-z]+)|['’]", rest)  # a word on the same line
    return bool(w) and w.group(1) not in ("is", "because", "since", "as")


def extract_choice(completion, finished=False):
    """The last option letter of the final answer: the last explicit answer (a boxed letter, or one said as the
    answer), else the last "(C)" -- unless a box holds something else (a value after the options were restated:
    those letters are no answer)."""
    text, boxes = answer_part(completion, finished)
    if text is None:
        return None
    said = [(m.start(), m.group("letter")) for m in _SAID.finditer(text) if not _a_word(m)]
    letters = [(i, m.group(1) or m.group(2)) for i, _, c in boxes if (m := _BOX_LETTER.match(c))]
    hits = sorted(said + letters)
    if not hits and not boxes:  # the weak letters count only where no box holds something else
        hits = [(0, next(g for g in m.groups() if g)) for m in _WEAK.finditer(text)]
    return hits[-1][1].upper() if hits else None


# What may stand between boxes that answer together: "$x = \boxed{3}$ or $x = \boxed{5}$", "\boxed{3}, \boxed{5}",
# "x_1 = \boxed{3} \text{ and } x_2 = \boxed{5}" (not "\boxed{3}, no wait, \boxed{5}": words end the run)
_JOINED = re.compile(r"(?:\s|[$,;&]|\\[,;:! ()]|\\q?quad|\\text\{\s*(?:and|or|,)?\s*\}|\b(?:and|or)\b|"
                     r"[A-Za-z](?:_\{?\w+\}?)?\s*=)*")


def grade_math(completion, gold, finished=False):
    """(extracted answer, correct) with math-verify. Runs in a worker process's main thread, where
    math-verify's SIGALRM timeouts work (they fail in threads), and a hang cannot stall the caller."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    text, boxes = answer_part(completion, finished)
    if text is None:
        return None, False
    last = boxes[-1][2] if boxes else None  # the last \boxed{}: math-verify would join all boxes into a set
    # unboxed text: only anchored answers ("the final answer is 3"), not any number ("... in 7 steps")
    anchored = [LatexExtractionConfig(try_extract_without_anchor=False), ExprExtractionConfig(try_extract_without_anchor=False)]
    pred = (parse(f"$\\boxed{{{last}}}$", parsing_timeout=5) if last is not None
            else parse(text, extraction_config=anchored, parsing_timeout=5))
    if not pred:
        return last, False
    gold_parsed = parse(f"$\\boxed{{{gold}}}$", parsing_timeout=5)  # bare gold like "1,\!000" parses when boxed
    extracted = last if last is not None else str(pred[-1])
    if verify(gold_parsed, pred, timeout_seconds=5):
        return extracted, True
    # several answers boxed one by one ("x = \boxed{3} or x = \boxed{5}"): the last boxes that only connectives join
    k = len(boxes) - 1
    while k > 0 and _JOINED.fullmatch(text, boxes[k - 1][1], boxes[k][0]):
        k -= 1
    if k < len(boxes) - 1:
        joined = ", ".join(c for _, _, c in boxes[k:])
        if verify(gold_parsed, parse(f"$\\boxed{{{joined}}}$", parsing_timeout=5), timeout_seconds=5):
            return joined, True
    return extracted, False


def grade(kind, completions, answers, workers=2, finished=None):
    """[(extracted, correct)] for parallel lists of completions, gold answers and whether each sample ended its turn
    (default: none did; see final_part)."""
    finished = finished or [False] * len(completions)
    if kind == "choice":
        return [(e, e == a) for e, a in ((extract_choice(c, f), a) for c, a, f in zip(completions, answers, finished))]
    if kind == "embedded":
        import embedded
        return [(embedded.extract_answer(c), bool(embedded.grade(c, a))) for c, a in zip(completions, answers)]
    import multiprocessing as mp
    from tqdm import tqdm
    # spawn, not fork: the parent may hold vLLM/torch threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        it = pool.map(grade_math, completions, answers, finished, chunksize=16)
        return list(tqdm(it, total=len(completions), desc="grading", leave=False))


def mean_ci(scores):
    """Mean and 95% half-width (normal approximation over questions) of per-question scores, in %."""
    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    return 100 * mean, 100 * 1.96 * sd / math.sqrt(n)


# ----------------------------------------------------------------------------- sampling
@functools.cache  # one load per model: the vocab check, complete() and sample() each ask for it
def model_info(path):
    """(tokenizer, eos ids, max positions) of an HF checkpoint directory."""
    from transformers import AutoConfig, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    return tok, stop_ids(tok, path), getattr(cfg, "max_position_embeddings", 1 << 30)  # the ends training stops at


def sample(path, prompts, ns, max_tokens, args):
    """ns[i] continuations of each prompt (token ids), at most max_tokens[i] long: (token ids with the end token
    dropped, whether it ended there rather than at the budget). One model load per call: callers pass every
    benchmark's prompts at once."""
    tok, eos, max_pos = model_info(path)
    max_tokens = [max(1, min(m, max_pos - len(p))) for p, m in zip(prompts, max_tokens)]
    if args.sampler == "vllm":
        max_len = min(max_pos, max(map(len, prompts)) + max(max_tokens))
        out = sample_vllm(path, prompts, ns, max_tokens, max_len, eos, args)
    else:
        out = sample_hf(path, prompts, ns, max_tokens, tok, eos, args)
    return [[(cut_eos(ids, eos), finished) for ids, finished in row] for row in out]


def sample_kept(path, prompts, ns, max_tokens, args):
    """sample(), kept in --out/samples/: rerun after a crash (or with more checkpoints) with the same --out, and
    nothing sampled before is sampled again. The key: the checkpoint's weight files (path, size, time), the prompts,
    counts and budgets, and the flags that change a sample (--sampler, --dtype, --seed). With --engines, each engine
    keeps its shard as soon as it is drawn: after one engine failed, a rerun draws only that shard again."""
    if args.engines > 1 and len(prompts) > 1:
        return sample_parallel(path, prompts, ns, max_tokens, args)
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in os.scandir(path)
                     if f.name.endswith((".safetensors", ".bin")))
    key = json.dumps([os.path.realpath(path), weights, prompts, ns, max_tokens, args.sampler, args.dtype, args.seed])
    file = os.path.join(args.out, "samples", hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
    if os.path.isfile(file):
        print(f"{args.labels.get(path, path)}: {sum(ns)} samples kept in {file} (delete it to sample them again)")
        with open(file) as f:
            return [[(ids, finished) for ids, finished in row] for row in json.load(f)]
    outs = sample(path, prompts, ns, max_tokens, args)
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with open(file + ".tmp", "w") as f:  # then renamed: a crash mid-write leaves no half file to reuse
        json.dump(outs, f)
    os.replace(file + ".tmp", file)
    return outs


def sample_parallel(path, prompts, ns, max_tokens, args):
    """sample_kept() over --engines data-parallel engines, each taking every engines-th prompt with its own seed."""
    e = min(args.engines, len(prompts))
    return interleave(on_engines(sample_kept, [(path, prompts[i::e], ns[i::e], max_tokens[i::e], argparse.Namespace(
        **dict(vars(args), engines=1, seed=args.seed + 1_000_003 * i, quiet=i > 0))) for i in range(e)]), len(prompts))


def on_engines(fn, shards):
    """[fn(*shard) for shard in shards], side by side: a process each, on a GPU each (of those visible) where there
    are GPUs. One shard per process: a process that took a second one would stay on its first GPU."""
    import multiprocessing as mp
    gpus = gpu_ids()[:len(shards)] or [None] * len(shards)  # parse_args checked there are enough
    with ProcessPoolExecutor(max_workers=len(shards), mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        return list(pool.map(_on_gpu, [(fn, gpu, shard) for gpu, shard in zip(gpus, shards)]))


def _on_gpu(job):
    fn, gpu, shard = job
    if gpu is not None:  # before anything touches CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return fn(*shard)


def interleave(shards, n):
    """The n results of shards that took items i, i + e, i + 2e, ... (shard i of e), back in the items' order."""
    out = [None] * n
    for i, shard in enumerate(shards):
        out[i::len(shards)] = shard
    return out


def gpu_ids():
    """The visible GPUs' ids as CUDA_VISIBLE_DEVICES names them (none on a CPU machine). Asking the driver rules out
    forking CUDA users from this process later: every pool here spawns (and so must vLLM, sample_vllm)."""
    import torch
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def cut_eos(ids, eos):
    """Token ids up to (not including) the first end-of-sequence id (HF pads after it)."""
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def sample_vllm(path, prompts, ns, max_tokens, max_model_len, eos, args):
    import torch
    quiet_vllm()  # before vLLM's first import: it reads its log level then
    from vllm import LLM, SamplingParams
    # vLLM forks its engine process unless told otherwise, and a fork cannot use CUDA once the parent has asked it
    # anything (torch.cuda.is_available() below, or a scoring model before): "Cannot re-initialize CUDA in forked
    # subprocess". eval.py's entry point is __main__-guarded, so spawn is safe. Set, not defaulted: an inherited
    # "fork" would fail just so.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    # on CPU: a bounded KV cache (vLLM takes ~18 GB otherwise) and no torch.compile warmup (~40 s per engine)
    extra = {} if torch.cuda.is_available() else dict(kv_cache_memory_bytes=int(args.cpu_kv_cache_gb * 2**30),
                                                       enforce_eager=True)
    llm = LLM(model=path, dtype=args.dtype, seed=args.seed, max_model_len=max_model_len, **extra)
    params = [SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=m, stop_token_ids=eos,
                             detokenize=False)  # token ids are all we keep: no text to build per token
              for n, m in zip(ns, max_tokens)]
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=not args.quiet)
    finally:
        # now, and on an error too: a live engine process holds its GPU (the next engine checks free memory at its
        # start), and an --engines worker waits for its children before it exits
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return [[(list(c.token_ids), c.finish_reason != "length") for c in o.outputs] for o in outs]


def sample_hf(path, prompts, ns, max_tokens, tok, eos, args):
    """transformers generate fallback (opd.HFSampler, on the GPU when there is one): batches of consecutive prompts
    with the same n, at most --batch-size long; pure sampling at temperature 1."""
    import torch
    from tqdm import tqdm
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampler = HFSampler(path, device, tok.pad_token_id if tok.pad_token_id is not None else eos[0], eos,
                        dtype=getattr(torch, args.dtype, "auto"))
    batches, b = [], 0
    while b < len(prompts):
        e = b + 1
        while e < len(prompts) and e - b < args.batch_size and ns[e] == ns[b]:
            e += 1
        batches, b = batches + [(b, e)], e
    out = []
    for k, (b, e) in enumerate(tqdm(batches, desc=f"sampling {os.path.basename(path)}",
                                    disable=args.quiet)):
        n = ns[b]
        rollouts = sampler.generate(prompts[b:e], n, max(max_tokens[b:e]), seed=args.seed + k)
        out += [[(toks[:m], not cut and len(toks) <= m) for toks, _, cut in rollouts[i * n:(i + 1) * n]]
                for i, m in enumerate(max_tokens[b:e])]
    return out


# ----------------------------------------------------------------------------- runs
def complete(path, items, args):
    """Graded samples of checkpoint `path` for items {benchmark, q, k, head}: k samples per question.
    With a head (token ids: the teacher's prefix) the model continues it, and head + continuation is graded
    as one response. Returns (records, each item's prompt token ids (head included), token ids of its samples)."""
    tok = model_info(path)[0]
    prompts = [prompt_ids(tok, it["q"]["question"]) + it["head"] for it in items]
    budgets = [args.max_new_tokens - len(it["head"]) for it in items]  # head + continuation <= max_new_tokens
    outs = sample_kept(path, prompts, [it["k"] for it in items], budgets, args)
    recs = [dict(model=path, benchmark=it["benchmark"], id=it["q"]["id"], sample=j, answer=it["q"]["answer"],
                 tokens=len(ids), finished=finished,  # ended its turn (end token), not cut off at the budget
                 completion=tok.decode(it["head"] + ids, skip_special_tokens=True))
            for it, row in zip(items, outs) for j, (ids, finished) in enumerate(row)]
    for kind in {BENCHMARKS[r["benchmark"]][1] for r in recs}:  # one grading pass (and worker pool) per kind
        mine = [r for r in recs if BENCHMARKS[r["benchmark"]][1] == kind]
        for r, (e, c) in zip(mine, grade(kind, [r["completion"] for r in mine], [r["answer"] for r in mine],
                                          args.grade_workers, [r["finished"] for r in mine])):
            r.update(extracted=e, correct=c)
    return recs, prompts, [[ids for ids, _ in row] for row in outs]


def prefix_len(L, teacher_len, margin):
    """§2.3: L_p = min(L, L_r - margin), so the teacher's final answer is unlikely to be in the prefix."""
    return max(0, min(L, teacher_len - margin))


def check_vocab(models, teacher, what):
    """The models and the teacher must share one tokenizer: `what` passes token ids between them."""
    vocab = model_info(teacher)[0].get_vocab()
    for m in models:
        if model_info(m)[0].get_vocab() != vocab:
            raise BadInput(f"{m} and {teacher} use different tokenizers; {what} needs one (it passes token ids)")


def prefix_probe(students, teacher, items, args):
    """§2.3: the teacher writes one full solution per question; each student continues its first L_p tokens."""
    teacher_recs, _, outs = complete(teacher, [dict(it, k=1) for it in items], args)
    runs = [(L, dict(it, head=row[0][:prefix_len(L, len(row[0]), args.prefix_margin)]), len(row[0]))
            for L in args.prefix_lengths for it, row in zip(items, outs)]
    recs = []
    for s in students:
        got = complete(s, [it for _, it, _ in runs], args)[0]
        recs += [dict(r, teacher=teacher, prefix=L, prefix_len=len(it["head"]), teacher_len=lr)
                 for r, (L, it, lr) in zip(got, [run for run in runs for _ in range(run[1]["k"])])]
    return recs, teacher_recs


def summarize(samples):
    """{row: {col: (mean %, 95% half-width %, #questions, k)}} over the samples' row/col labels."""
    per_q = {}
    for s in samples:
        per_q.setdefault(s["row"], {}).setdefault(s["col"], {}).setdefault(s["id"], []).append(s["correct"])
    return {r: {c: (*mean_ci([sum(v) / len(v) for v in qs.values()]), len(qs), len(next(iter(qs.values()))))
                for c, qs in cols.items()} for r, cols in per_q.items()}


def markdown_table(summary, cols, first, extra=None):
    """Rows = checkpoints (or student · benchmark), columns = benchmarks (or prefix lengths), as Tables 1-2;
    extra {title: {row: text}}: further columns (training FLOPs, KL to the teacher), "–" where a row has none."""
    extra = {t: by for t, by in (extra or {}).items() if by}
    cell = lambda v: f"{v[0]:.1f} ± {v[1]:.1f}" if v else "–"
    return (f"| {first} | " + " | ".join(cols + list(extra)) + " |\n|---|" + "---|" * (len(cols) + len(extra)) +
            "\n" + "".join(f"| {r} | " + " | ".join([cell(by.get(c)) for c in cols] +
                                                    [e.get(r, "–") for e in extra.values()]) + " |\n"
                           for r, by in summary.items()))


def training_record(path):
    """{run, step, flops} of a checkpoint opd.py wrote (run/step_N/trainer/state.json; flops: the run's training
    FLOPs up to it, Appendix B accounting), else None."""
    try:
        with open(os.path.join(path, "trainer", "state.json")) as f:
            state = json.load(f)
        run = os.path.realpath(os.path.dirname(os.path.normpath(path)) or ".")  # one run however it is spelled
        rel = os.path.relpath(run)
        return dict(run=run if rel.startswith("..") else rel, step=int(state["step"]), flops=float(state["flops_total"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- KL to the teacher by position
SCORE_TOKENS = 32768  # padded tokens per scoring forward (opd.py's default micro-batch)


def score(path, seqs, engines=1):
    """log p of every response token of seqs [(prompt ids, response ids as an array)] under model `path`,
    teacher-forced by the training loop's own code (opd.forward, kernels.token_logprobs): an fp32 numpy array per
    sequence (numpy, not torch: torch shares tensors between processes through handles that die with the engine's
    process). engines > 1: every engines-th sequence in a process (and on a GPU) of its own."""
    if engines > 1 and len(seqs) > 1:
        e = min(engines, len(seqs))
        return interleave(on_engines(score, [(path, seqs[i::e]) for i in range(e)]), len(seqs))
    import torch
    import kernels
    from opd import LogProbs, forward, micro_batches
    from transformers import AutoModelForCausalLM
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LogProbs(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval())
    out = [None] * len(seqs)
    with torch.no_grad():
        for g in micro_batches([len(p) + len(r) for p, r in seqs], SCORE_TOKENS):
            batch = [(seqs[i][0], seqs[i][1].tolist()) for i in g]
            # pad id 0: right padding is never attended to, nor scored
            lp = forward(model, batch, 0, device, kernels.token_logprobs, 1.0)[0].float().cpu()
            for i, part in zip(g, lp.split([len(seqs[i][1]) for i in g])):
                out[i] = part.numpy()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def kl_by_position(runs, teacher, width, engines=1):
    """{row: {kl: mean, kl_by_pos: [...], tokens_by_pos: [...]}}: the sampled-token reverse KL
    log p_model(x_t) - log p_teacher(x_t) over each row's samples (runs: [(row, seqs, model logps)]), overall and
    by `width`-token position bins (paper Fig. 2 / 5); the teacher is loaded once for every row."""
    import torch
    every = [s for _, seqs, _ in runs for s in seqs]
    lt = iter(score(teacher, every, engines) if every else [])
    out = {}
    for row, seqs, ls in runs:
        kl = [torch.from_numpy(a - next(lt)) for a in ls]
        n = max((len(k) for k in kl), default=0)
        sums, counts = (torch.zeros(-(-n // width), dtype=torch.float64) for _ in range(2))
        for k in kl:
            b = torch.arange(len(k)) // width
            sums.index_add_(0, b, k.double())
            counts.index_add_(0, b, torch.ones(len(k), dtype=torch.float64))
        total = counts.sum().item()  # 0: every sample empty, no KL (not a perfect 0)
        out[row] = dict(kl=sums.sum().item() / total if total else None, tokens_by_pos=counts.long().tolist(),
                        kl_by_pos=[round(float(a / c), 5) if c else None for a, c in zip(sums, counts)])
    return out


# ----------------------------------------------------------------------------- CLI
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", help="HF checkpoint dirs or hub ids, several -> one table; 'student'/'teacher' = the "
                   "embedded task's models (default: both; the student alone with --teacher-prefix)")
    p.add_argument("--benchmarks", help=f"comma list of {','.join(BENCHMARKS)} (default: --data's, else embedded)")
    p.add_argument("--data", nargs="+", default=[], metavar="BENCH=FILE",
                   help="local .jsonl/.json/.parquet/.csv per benchmark (else the hub via `datasets`)")
    p.add_argument("--samples", type=int, help="k samples per question (default 16 for AIME, 4 otherwise)")
    p.add_argument("--max-new-tokens", type=int, help="response budget (default: the paper's 16384; 32768 with "
                   "--teacher-prefix, as in §2.3)")
    p.add_argument("--limit", type=int, help="only the first N questions of each benchmark (smoke tests)")
    p.add_argument("--sampler", choices=["vllm", "hf"], default="vllm", help="vLLM (default), or transformers "
                   "generate")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype for sampling (auto: from the checkpoint's, as vLLM / transformers choose)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--engines", type=int, default=1, help="data-parallel engines for sampling (and --kl-teacher's "
                   "scoring): a process each, on a GPU each where there are GPUs (e.g. 8 on an 8-GPU node for models "
                   "that fit one GPU)")
    p.set_defaults(quiet=False)  # engines after the first sample without progress bars
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (--sampler hf)")
    p.add_argument("--cpu-kv-cache-gb", type=float, default=1.0, help="vLLM KV cache on CPU (else it takes ~18 GB)")
    p.add_argument("--grade-workers", type=int, default=2, help="processes for math-verify grading")
    p.add_argument("--dev", metavar="BENCH", help="Appendix E: score every checkpoint on BENCH (paper: aime24), keep "
                   "each run's best, and score only those (and models that are no opd.py checkpoint) on the rest")
    p.add_argument("--kl-teacher", metavar="TEACHER", help="also score every sample (with --dev: the dev set's) under "
                   "TEACHER and its own model: the sampled-token reverse KL, overall and by position (Fig. 5; TEACHER "
                   "'teacher' = the embedded one)")
    p.add_argument("--kl-bin", type=int, default=256, help="position bin width for --kl-teacher, tokens (default 256, "
                   "the paper's; ~4-8 for the embedded task)")
    p.add_argument("--teacher-prefix", metavar="TEACHER", help="run the §2.3 probe: students continue TEACHER's "
                   "prefixes (embedded task: use e.g. --prefix-lengths 0,8,16,32 --prefix-margin 4)")
    p.add_argument("--prefix-lengths", default="0,2048,4096,6144,8192", help="comma list of L (probe)")
    p.add_argument("--prefix-margin", type=int, default=512, help="L_p = min(L, L_r - margin) (paper: 512)")
    p.add_argument("--out", default=None, help="output dir (default runs/eval-<time>); samples are kept in its "
                   "samples/ as drawn, so a rerun with the same --out samples only what it lacks")
    p.error = lambda msg: (print(f"eval.py: error: {msg} (see --help)", file=sys.stderr), sys.exit(2))
    args = p.parse_args(argv)
    try:
        args.prefix_lengths = [int(x) for x in args.prefix_lengths.split(",")]
    except ValueError:
        raise BadInput(f"--prefix-lengths takes integers like 0,2048,4096 (got {args.prefix_lengths!r})")
    bad = [d for d in args.data if "=" not in d]
    if bad:
        raise BadInput(f"--data takes BENCH=FILE pairs, e.g. math500=math500.jsonl (got {bad[0]!r})")
    args.data, given = dict(d.split("=", 1) for d in args.data), [d.split("=", 1)[0] for d in args.data]
    if len(given) > len(args.data):
        raise BadInput(f"--data names {max(given, key=given.count)} twice: give one file per benchmark")
    args.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else \
        list(args.data) or ["embedded"]
    if not args.benchmarks:
        raise BadInput("--benchmarks names no benchmark; give e.g. math500,aime24")
    unused = [b for b in args.data if b not in args.benchmarks]
    if unused:
        raise BadInput(f"--data {unused[0]}=... but --benchmarks does not name {unused[0]}: add it there or drop "
                       "the --data")
    for b in args.benchmarks + list(args.data):
        if b not in BENCHMARKS:
            raise BadInput(f"unknown benchmark '{b}' (choose from {', '.join(BENCHMARKS)})")
    if args.dev and args.dev not in args.benchmarks:
        raise BadInput(f"--dev {args.dev} is not among the benchmarks ({', '.join(args.benchmarks)}): add it")
    if args.teacher_prefix and (args.dev or args.kl_teacher):
        raise BadInput(f"--{'dev' if args.dev else 'kl-teacher'} goes with the benchmark table, not the "
                       "--teacher-prefix probe: run them separately")
    if args.dev and len(args.benchmarks) == 1:
        raise BadInput(f"--dev {args.dev} picks the checkpoints to score on the other benchmarks: name some")
    for flag in ("samples", "max_new_tokens", "limit", "batch_size", "grade_workers", "engines", "kl_bin"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be >= 1")
    gpus = len(gpu_ids()) if args.engines > 1 else 0
    if 0 < gpus < args.engines:
        raise BadInput(f"--engines {args.engines}: only {gpus} GPUs are visible (one engine per GPU)")
    if not args.cpu_kv_cache_gb > 0:
        raise BadInput(f"--cpu-kv-cache-gb must be > 0 (got {args.cpu_kv_cache_gb})")
    if min(args.prefix_lengths) < 0 or args.prefix_margin < 0:
        raise BadInput("--prefix-lengths and --prefix-margin must be >= 0")
    args.max_new_tokens = args.max_new_tokens or (32768 if args.teacher_prefix else 16384)
    default = ["student"] if args.teacher_prefix else ["student", "teacher"]
    typed = args.model or default
    args.model = [resolve_model(m) for m in typed]
    if len({os.path.realpath(m) for m in args.model}) < len(args.model):
        raise BadInput(f"--model names a checkpoint twice ({' '.join(args.model)}): its samples would merge into one row")
    args.labels = dict(zip(args.model, typed))  # rows are named after what was typed (a hub id, not its cache path)
    for flag in ("teacher_prefix", "kl_teacher"):
        if getattr(args, flag):
            path = resolve_model(getattr(args, flag))
            args.labels.setdefault(path, getattr(args, flag))
            setattr(args, flag, path)
    args.out = args.out or time.strftime("runs/eval-%Y%m%d-%H%M%S")
    check_out(args.out)
    return args


def check_out(out):
    """--out must be (or be creatable as) a writable directory: checked before hours of sampling, nothing made."""
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:  # a real write, not os.access: root passes that everywhere, /proc included
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise BadInput(f"--out {out}: {parent} is not a writable directory") from None


def resolve_model(m):
    """A checkpoint directory; 'student'/'teacher' name the embedded task's models; an 'org/name' hub id that is
    not a local directory is fetched into (or read from) the Hugging Face cache."""
    if not os.path.isdir(m) and m in ("student", "teacher"):
        import embedded
        m = str(embedded.STUDENT_DIR if m == "student" else embedded.TEACHER_DIR)
        if not os.path.isfile(os.path.join(m, "config.json")):
            raise BadInput(f"the embedded {os.path.basename(m)} is not built at {m} (run: python -m embedded.build)")
    elif not os.path.exists(m) and m.count("/") == 1 and not m.startswith("."):
        from huggingface_hub import snapshot_download
        try:
            m = snapshot_download(m, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        except Exception as e:  # offline, unknown id, no access: huggingface_hub raises several types
            raise BadInput(f"no local checkpoint at {m}, and the hub did not give it ({type(e).__name__}); pass a "
                           "checkpoint directory") from None
    lacks = model_dir_lacks(m) if os.path.isdir(m) else "such directory"
    if lacks:
        raise BadInput(f"no HF checkpoint at {m} (no {lacks}; expected a directory with config.json, tokenizer and "
                       "*.safetensors)")
    return m


def dev_picks(summary, trained, dev):
    """{run: its checkpoint with the best mean acc@k on the dev column (ties: the one trained with fewer FLOPs)};
    a row that no opd.py run wrote is a run of its own."""
    best = {}
    for r, by in summary.items():
        run = trained[r]["run"] if r in trained else r
        key = (by[dev][0], -trained[r]["flops"] if r in trained else 0)
        if run not in best or key > best[run][0]:
            best[run] = (key, r)
    return {run: r for run, (_, r) in best.items()}


def row_names(labels):
    """{model path: table row} for labels {model path: what was typed for it}: the typed names' last components (a hub
    id's name, a checkpoint's runA/step_000010), as few as keep different models apart."""
    real = {m: os.path.realpath(m) for m in labels}
    parts = {}
    for m, label in labels.items():  # one name per model, however it was spelled
        parts.setdefault(real[m], os.path.normpath(label).split(os.sep))
    for k in range(1, max(map(len, parts.values())) + 1):
        names = {r: "/".join(p[-k:]) for r, p in parts.items()}
        if len(set(names.values())) == len(names):
            break
    return {m: names[real[m]] for m in labels}


def main(argv=None):
    args = parse_args(argv)
    data = {b: load_benchmark(b, args.data.get(b))[:args.limit] for b in args.benchmarks}  # every input checked first
    names = row_names(args.labels)
    ks = {b: args.samples or BENCHMARKS[b][2] for b in args.benchmarks}
    items = [dict(benchmark=b, q=q, k=ks[b], head=[]) for b in args.benchmarks for q in data[b]]
    title = lambda x: BENCHMARKS[x["benchmark"]][0]
    samples, teacher = [], []
    scored = {}  # row: ([(prompt ids, response ids)], the model's own logps) for --kl-teacher
    for flag, path in (("--teacher-prefix", args.teacher_prefix), ("--kl-teacher", args.kl_teacher)):
        if path:  # before any sampling
            check_vocab(args.model, path, flag)

    def run(m, its, kl=True):  # sample, grade, and (--kl-teacher) score the samples under their own model
        recs, prompts, ids = complete(m, its, args)
        if args.kl_teacher and kl:
            import numpy as np  # responses as int32 arrays: a paper-scale run holds millions of tokens
            seqs = [(p, np.array(s, dtype=np.int32)) for p, row in zip(prompts, ids) for s in row if s]
            scored[names[m]] = (seqs, score(m, seqs, args.engines) if seqs else [])
        return [dict(x, row=names[m], col=title(x)) for x in recs]

    if args.teacher_prefix:
        s, t = prefix_probe(args.model, args.teacher_prefix, items, args)
        samples = [dict(x, row=f"{names[x['model']]} · {title(x)}", col=f"L={x['prefix']}") for x in s]
        n = names[args.teacher_prefix]  # "teacher Qwen3-8B", but not "teacher teacher"
        teacher = [dict(x, row=n if "teacher" in n.lower() else f"teacher {n}", col=title(x)) for x in t]
    else:
        first = [it for it in items if it["benchmark"] == args.dev] if args.dev else items
        for m in args.model:
            samples += run(m, first)
    trained = {} if args.teacher_prefix else {  # row: {run, step, flops}
        names[m]: rec for m in args.model if (rec := training_record(m))}
    picks = {}
    if args.dev:  # Appendix E: each run's best checkpoint on the dev benchmark goes on to the others
        picks = dev_picks(summarize(samples), trained, BENCHMARKS[args.dev][0])
        rest = [it for it in items if it["benchmark"] != args.dev]
        for m in args.model:
            if names[m] in picks.values():  # KL over the dev set alone: the one every row has
                samples += run(m, rest, kl=False)
    kl = kl_by_position([(r, *v) for r, v in scored.items()], args.kl_teacher, args.kl_bin, args.engines) \
        if scored else {}
    summary = summarize(samples)
    if args.teacher_prefix:
        table = markdown_table(summary, [f"L={L}" for L in args.prefix_lengths], "student · benchmark")
        table += "\n" + markdown_table(summarize(teacher), [BENCHMARKS[b][0] for b in args.benchmarks],
                                        "teacher (1 solution per question)")
    else:
        table = markdown_table(summary, [BENCHMARKS[b][0] for b in args.benchmarks], "checkpoint", {
            "training FLOP": {r: f"{t['flops']:.2e}" for r, t in trained.items()},
            f"KL to {names.get(args.kl_teacher)}" + (f" ({BENCHMARKS[args.dev][0]})" if args.dev else ""):
                {r: f"{k['kl']:.4f}" for r, k in kl.items() if k["kl"] is not None}})
        if picks:
            best = "; ".join(f"{run}: {r}" for run, r in picks.items() if r in trained) or "no opd.py run among --model"
            table += (f"\n{BENCHMARKS[args.dev][0]} as dev set (Appendix E), best checkpoint of each run: {best}. Only "
                      "these and the models outside a run were scored on the other benchmarks.\n")
    table += (f"\nmean acc@k in % (k: {', '.join(f'{b} {k}' for b, k in ks.items())}); ± = 95% normal-approximation "
              f"interval over questions; temperature 1.0, top-p 1.0, at most {args.max_new_tokens} new tokens\n")
    out = args.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(dict(config=vars(args), summary=summary, samples=samples, teacher_samples=teacher,
                       training=trained, dev_picks=picks, kl=kl), f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    wrote = ["eval.json", "table.md"]
    if args.teacher_prefix:
        plot_probe(summary, summarize(teacher), args.prefix_lengths, os.path.join(out, "prefix_probe.png"))
        wrote.append("prefix_probe.png")
    if trained:
        plot_compute(summary, trained, [BENCHMARKS[b][0] for b in args.benchmarks], os.path.join(out, "compute.png"))
        wrote.append("compute.png")
    if kl:
        plot_kl(kl, args.kl_bin, names[args.kl_teacher], os.path.join(out, "kl_by_position.png"))
        wrote.append("kl_by_position.png")
    print("\n" + table + "\nwrote " + ", ".join(f"{out}/{w}" for w in wrote))


# ----------------------------------------------------------------------------- plots
def subplots(*args, **kw):
    """plt.subplots on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kw)


def save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_probe(summary, teacher, lengths, path):
    """Fig. 3: mean acc@k against the teacher-prefix length L, one line per student · benchmark."""
    fig, ax = subplots(figsize=(5, 3.5))
    for row, by in summary.items():
        ax.errorbar(lengths, [by[f"L={L}"][0] for L in lengths], yerr=[by[f"L={L}"][1] for L in lengths],
                    marker="o", capsize=3, label=row)
    for row, by in teacher.items():
        for col, v in by.items():
            ax.axhline(v[0], ls="--", lw=1, color="gray", label=f"{row} · {col}")
    ax.set(xlabel="teacher prefix length L (tokens)", ylabel="mean acc@k (%)", title="Teacher-prefix probe (§2.3)",
           ylim=(0, None))
    ax.legend(fontsize=7)
    save(fig, path)


def plot_kl(kl, width, teacher, path, few=32):
    """Fig. 5: the sampled-token reverse KL to the teacher by position in the response, a line per row; below it
    how many sampled tokens each bin averages. Bins of fewer than `few` tokens (the tail that one or two long
    samples reach) are drawn faint: their mean is a handful of tokens' noise."""
    fig, (ax, an) = subplots(2, 1, figsize=(6, 5), sharex=True, height_ratios=(2, 1))
    solid = [0.0]
    for row, k in kl.items():
        pts = [((i + 0.5) * width, v, n) for i, (v, n) in enumerate(zip(k["kl_by_pos"], k["tokens_by_pos"])) if n]
        if pts:
            x, v, n = zip(*pts)
            solid += [y for y, m in zip(v, n) if m >= few]
            color = ax.plot(x, v, "-", lw=1, alpha=0.3)[0].get_color()
            ax.plot(x, [y if m >= few else math.nan for y, m in zip(v, n)], "o-", ms=3, color=color, label=row)
            an.plot(x, n, "-", color=color)
    ax.axhline(0, color="gray", lw=0.5)
    pad = 0.08 * (max(solid) - min(solid)) or 0.01  # the scale of the solid points: a faint tail may leave the plot
    ax.set(ylabel="sampled-token reverse KL", title=f"KL to {teacher} by position",
           ylim=(min(solid) - pad, max(solid) + pad))
    ax.legend(fontsize=7)
    an.axhline(few, color="gray", lw=0.5, ls=":")
    an.set(xlabel="position in response (tokens)", ylabel=f"tokens per bin (faint: < {few})", yscale="log")
    save(fig, path)


def plot_compute(summary, trained, cols, path):
    """Fig. 4: mean acc@k against training FLOPs, a panel per benchmark and a line per run (the directory holding
    the step_N checkpoints); rows without a training record (base model, teacher) are dashed levels."""
    fig, axes = subplots(1, len(cols), figsize=(4.5 * len(cols), 3.5), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for run in dict.fromkeys(t["run"] for t in trained.values()):  # in --model order
            rows = sorted((r for r, t in trained.items() if t["run"] == run and col in summary[r]),
                          key=lambda r: trained[r]["flops"])
            ax.errorbar([trained[r]["flops"] for r in rows], [summary[r][col][0] for r in rows],
                        yerr=[summary[r][col][1] for r in rows], marker="o", capsize=3, label=run)
        for r in summary:
            if r not in trained and col in summary[r]:
                ax.axhline(summary[r][col][0], ls="--", lw=1, color="gray")
                ax.annotate(r, (0, summary[r][col][0]), xycoords=("axes fraction", "data"), fontsize=7,
                            va="bottom", color="gray")
        ax.set(xscale="log", xlabel="training FLOPs (Appendix B)", ylabel="mean acc@k (%)", title=col, ylim=(0, 106))
        ax.legend(fontsize=7)
    save(fig, path)


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
