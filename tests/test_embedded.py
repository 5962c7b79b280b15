"""The embedded default: task generator, split, grader, tokenizer and the two committed tiny models."""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import embedded as E
from embedded import build as B
from opd import chat_prompt


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generator_is_deterministic_and_solutions_are_right():
    ra, rb = random.Random(7), random.Random(7)
    a, b = [E.make_problem(ra) for _ in range(5)], [E.make_problem(rb) for _ in range(5)]
    assert a == b and len({p["question"] for p in a}) == 5
    rng = random.Random(1)
    for _ in range(200):
        p = E.make_problem(rng)
        start, ops = E.parse(p["question"])
        assert 3 <= len(ops) <= 5 and len({abs(o) for o in ops}) == len(ops)
        assert int(p["answer"]) == start + sum(ops)
        sol = E.solution(p)
        v = start
        for line, op in zip(sol.split("\n"), ops):   # one line per step, each one checkable by hand
            assert line == f"{v}{op:+d}={v + op}" and E.carries(v, op) and 30 <= v + op <= 79
            v += op
        assert sol.endswith(f"\n</think>\nAnswer: {p['answer']}")


def test_split_is_disjoint_and_reproducible(tmp_path):
    train, held = rows(E.TRAIN_FILE), rows(E.HELDOUT_FILE)
    assert len(held) == 200 and len(train) >= 2000
    assert all(set(r) == {"question", "answer"} for r in train + held)
    tq, hq = [r["question"] for r in train], [r["question"] for r in held]
    assert len(set(tq)) == len(tq) and len(set(hq)) == len(hq) and not set(tq) & set(hq)
    B.write_split(tmp_path, seed=0)   # the committed files are the build's output for seed 0
    assert (tmp_path / "train.jsonl").read_text() == E.TRAIN_FILE.read_text()
    assert (tmp_path / "heldout.jsonl").read_text() == E.HELDOUT_FILE.read_text()


def test_carries_and_slips():
    assert E.carries(47, 38) and E.carries(85, -19) and not E.carries(47, 12) and not E.carries(47, -12)
    assert B.slip(47, 38) == 75 and B.slip(85, -19) == 76   # the carry / the borrow dropped
    lines = B.chain({"question": "Compute 47+38-19+26."}, random.Random(0), [1.0, 0.0])
    assert lines == [("47+38=75\n", True), ("75-19=56\n", False), ("56+26=82\n", False),
                     ("</think>\nAnswer: 82<|im_end|>", False)]   # later steps right on the slipped value


def test_grader():
    p = {"question": "Compute 47+38-19+26.", "answer": "92"}
    sol = E.solution(p)
    assert sol == "47+38=85\n85-19=66\n66+26=92\n</think>\nAnswer: 92"
    assert E.grade(sol, "92") and E.grade(sol + "<|im_end|>", "92")
    assert E.extract_answer(sol + "<|im_end|>") == "92"
    # an early slip (dropped carry) carried through to a wrong answer
    assert not E.grade("47+38=75\n75-19=56\n56+26=82\n</think>\nAnswer: 82<|im_end|>", "92")
    assert not E.grade(sol.replace("Answer: 92", "Answer: 93"), "92")
    assert not E.grade(sol.replace("Answer: 92", "Answer: 920"), "92")
    # truncated thinking gets no credit, even when the right number is already in it
    assert E.extract_answer("47+38=85\n85-19=66\n66+26=92\nAnswer: 92") is None
    assert E.extract_answer("47+38=85\n85-19=66\n66+26=92") is None
    assert not E.grade("Answer: 92\n</think>\n", "92")   # an answer before </think> does not count
    with pytest.raises(ValueError, match="not an embedded-task question"):
        E.parse("What is 2+2?")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(E.STUDENT_DIR)


def test_tokenizer_round_trip_and_chat_prompt(tok):
    q = "Compute 47+38-19+26."
    prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) + "<think>\n"
    assert prompt == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    for t in ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for r in rows(E.HELDOUT_FILE)[:50]:
        text = chat_prompt(tok, r["question"]) + E.solution(r) + "<|im_end|>"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # digits are single characters, so arithmetic is done digit by digit
    assert tok.convert_ids_to_tokens(tok("85-19=66", add_special_tokens=False)["input_ids"]) == list("85-19=66")


@pytest.fixture
def one_thread():
    """Tiny models decode ~10x faster on one thread than on two when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    return {name: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for name, d in (("teacher", E.TEACHER_DIR), ("student", E.STUDENT_DIR))}


def test_models_load_and_agree_on_vocab(models, tok):
    t, s = models["teacher"].config, models["student"].config
    for c in (t, s):
        assert c.model_type == "qwen3" and c.head_dim >= 32 and c.eos_token_id == tok.eos_token_id
        assert c.vocab_size == len(tok)
    for f in ("tokenizer.json", "chat_template.jinja"):
        assert (E.TEACHER_DIR / f).read_text() == (E.STUDENT_DIR / f).read_text()
    for d in (E.TEACHER_DIR, E.STUDENT_DIR):
        assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_teacher_beats_student_and_student_slips_early(models, tok, one_thread):
    """Greedy on 24 held-out questions: the teacher is (nearly) always right; the student's wrong steps
    are the first two (its defect) while its later steps are right arithmetic on whatever came before."""
    questions = [r["question"] for r in rows(E.HELDOUT_FILE)[:24]]
    answers = [r["answer"] for r in rows(E.HELDOUT_FILE)[:24]]
    score, slips = {}, {}
    for name, m in models.items():
        texts = B.complete(m, tok, questions, temperature=0)
        score[name] = sum(E.grade(x, a) for x, a in zip(texts, answers))
        steps = [E.step_ok(x) for x in texts]
        slips[name] = (sum(not s[0] for s in steps), sum(not ok for s in steps for ok in s[2:]))
    assert score["teacher"] >= 22 and slips["teacher"] == (0, 0), (score, slips)
    assert score["student"] <= score["teacher"] // 2, score
    assert slips["student"][0] >= 12 and slips["student"][1] <= 2, slips
