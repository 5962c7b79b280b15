r"""The embedded default: a tiny step-by-step arithmetic task, its tokenizer and two tiny Qwen3 models.

`torchrun --nproc_per_node 2 opd.py` with no model arguments distils `teacher/` into `student/` on this
task on a 2-core CPU. Everything here is the output of `python -m embedded.build` (seed 0).

The task. "Compute 41+19-24+18." -- a start value and 3-5 distinct 2-digit operands (10-49); every
step needs a carry (adding) or a borrow (subtracting) and every running value stays in [30, 79]. The
worked solution is one line per step, so an early slip is carried into the answer:

    <|im_start|>user\nCompute 41+19-24+18.<|im_end|>\n<|im_start|>assistant\n<think>\n   (the prompt)
    41+19=60\n60-24=36\n36+18=54\n</think>\nAnswer: 54<|im_end|>                          (the completion)

`grade` is exact: the text after the last "Answer:" that follows "</think>"; thinking that never closed
(a rollout cut at L_train, or a truncated one) gets no credit. data/train.jsonl (4000 questions) and
data/heldout.jsonl (200) are disjoint; no held-out question is in either model's training data.

The tokenizer. Character level (printable ASCII + newline, so digits are single tokens), plus one token
each for "user", "assistant", "Compute ", "Answer: " and the specials <|im_start|>, <|im_end|> (eos),
<|endoftext|> (pad), <think>, </think>; 126 tokens. decode(encode(x)) == x. Qwen-style chat template.

The models. Qwen3ForCausalLM, hidden 96, 3 layers, 3 heads of head_dim 32, MLP 384, tied embeddings,
455K parameters, fp32 (1.8 MB each). Both come from one training run, as a base model and its
post-trained version do (in the paper the student is Qwen3-8B-Base and the teacher Qwen3-8B):
- student ("base"): trained from scratch (700 steps x 64 chains, AdamW 3e-3, cosine) on chains whose
  FIRST step drops the carry/borrow with probability 0.8 and whose second step does with probability 0.3;
  every later step is right arithmetic on whatever came before. So it has the format and sound late
  steps but weak early steps -- the paper's story (§2.2, §4.4): an early slip dooms the answer.
- teacher: the student's weights after 200 more steps (AdamW 1e-3) on chains whose first two steps
  contain slips with probability 0.3 each, with the loss only on the right lines: it never slips, and
  after a slipped prefix (a student rollout) it continues with right arithmetic, not a "correction".
Held-out accuracy at temperature 1.0, top_p 1.0 (4 samples per question) and error rate of steps 1..5:
    teacher  0.994   0.003 0.003 0.001 0.006 0.003
    student  0.365   0.698 0.246 0.003 0.008 0.010

Prefix OPD on it (single-process check with opd.py's loss, 32 prompts x 4 rollouts per step,
AdamW lr 3e-4, L_train = 8 + 2*step, max_new_tokens 64, held-out accuracy at temperature 1.0):
    student accuracy   step 0   step 10            step 20            step 30     (3 seeds; teacher 0.998)
    L = 8 + 2*step     0.355    0.78 0.80 0.72     0.93 0.96 0.89     0.95 0.93 0.88
    L = 64 (full)      0.355    0.89               0.94               0.91
    L = 16 (fixed)     0.355    0.91               0.89               0.74
A fixed short prefix first helps and then hurts the untrained tail (paper §5.2, Finding 3: a small
student's prefix competes with its tail), which the growing schedule avoids.
The demo (`torchrun --nproc_per_node 2 opd.py`) runs 40 steps of L_train = 7 + step (7..46; completions
are ~42 tokens, and their first 6 tokens copy the question's first operation).
"""
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEACHER_DIR = HERE / "teacher"
STUDENT_DIR = HERE / "student"
TRAIN_FILE = HERE / "data" / "train.jsonl"
HELDOUT_FILE = HERE / "data" / "heldout.jsonl"

LO, HI = 30, 79          # every running value stays in [LO, HI]
OPERAND = (10, 49)       # operands are 2-digit
STEPS = (3, 5)           # operations per question


def carries(v: int, op: int) -> bool:
    """Does v+op need a carry (adding) or a borrow (subtracting) from the units digit?"""
    return v % 10 + op % 10 >= 10 if op > 0 else v % 10 < -op % 10


def make_problem(rng) -> dict:
    """One question from `rng` (a random.Random): a start value and 3-5 distinct operands, every step
    needing a carry or a borrow, every running value in [LO, HI]."""
    while True:
        v = start = rng.randint(LO, HI)
        ops = []
        for _ in range(rng.randint(*STEPS)):
            choices = [s * x for x in range(OPERAND[0], OPERAND[1] + 1) for s in (1, -1)
                       if x not in map(abs, ops) and LO <= v + s * x <= HI and carries(v, s * x)]
            if not choices:   # e.g. 30 or 40: nothing carries and stays in range; start over
                break
            ops.append(rng.choice(choices))
            v += ops[-1]
        else:
            q = "Compute " + str(start) + "".join(f"{op:+d}" for op in ops) + "."
            return {"question": q, "answer": str(v)}


def parse(question: str) -> tuple[int, list[int]]:
    """The question's start value and signed operands: 'Compute 41+19-24+18.' -> (41, [19, -24, 18])."""
    m = re.fullmatch(r"Compute (\d+)((?:[+-]\d+)+)\.", question)
    if not m:
        raise ValueError(f"not an embedded-task question: {question!r}")
    return int(m.group(1)), [int(x) for x in re.findall(r"[+-]\d+", m.group(2))]


def solution(problem: dict) -> str:
    """The worked solution, the text after the forced '<think>' line (no closing <|im_end|>)."""
    start, ops = parse(problem["question"])
    lines, v = [], start
    for op in ops:
        lines.append(f"{v}{op:+d}={v + op}")
        v += op
    return "\n".join(lines) + "\n</think>\nAnswer: " + str(v)


def step_ok(completion: str) -> list:
    """For each step line before </think>: is it well formed and is its arithmetic right (given its own inputs)?"""
    ok = []
    for line in completion.split("</think>")[0].strip().split("\n"):
        m = re.fullmatch(r"(\d+)([+-]\d+)=(\d+)", line)
        ok.append(m is not None and int(m[1]) + int(m[2]) == int(m[3]))
    return ok


def extract_answer(completion: str) -> str | None:
    """The text after the last "Answer:" that follows "</think>"; None if thinking never closed."""
    if "</think>" not in completion:
        return None
    tail = completion.rsplit("</think>", 1)[1]
    if "Answer:" not in tail:
        return None
    ans = tail.rsplit("Answer:", 1)[1]
    for stop in ("<|im_end|>", "<|endoftext|>", "\n"):
        ans = ans.split(stop, 1)[0]
    return ans.strip()


def grade(completion: str, answer: str) -> bool:
    """Exact match of the extracted answer (a completion with or without its trailing <|im_end|>)."""
    return extract_answer(completion) == answer.strip()
