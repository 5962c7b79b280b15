"""The embedded default: a tiny step-by-step arithmetic task, its tokenizer and two tiny Qwen3 models.

Placeholder while the build is being designed; see build.py.
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


def make_problem(rng) -> dict:
    """One question from `rng` (a random.Random): a start value and 3-5 distinct +/- operands."""
    v = rng.randint(LO, HI)
    start, ops, used = v, [], set()
    for _ in range(rng.randint(*STEPS)):
        choices = [s * x for x in range(OPERAND[0], OPERAND[1] + 1) for s in (1, -1)
                   if x not in used and LO <= v + s * x <= HI]
        op = rng.choice(choices)
        used.add(abs(op))
        ops.append(op)
        v += op
    q = "Compute " + str(start) + "".join(f"{op:+d}" for op in ops) + "."
    return {"question": q, "answer": str(v)}


def parse(question: str) -> tuple[int, list[int]]:
    m = re.fullmatch(r"Compute (\d+)((?:[+-]\d+)+)\.", question)
    if not m:
        raise ValueError(f"not an embedded-task question: {question!r}")
    return int(m.group(1)), [int(x) for x in re.findall(r"[+-]\d+", m.group(2))]


def solution(problem: dict) -> str:
    start, ops = parse(problem["question"])
    lines, v = [], start
    for op in ops:
        lines.append(f"{v}{op:+d}={v + op}")
        v += op
    return "\n".join(lines) + "\n</think>\nAnswer: " + str(v)


def extract_answer(completion: str):
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
    return extract_answer(completion) == answer.strip()
