"""Build the embedded default from a seed: tokenizer, train/held-out split, student and teacher.

    python -m embedded.build [--out DIR] [--seed 0]      # about 5 minutes on one CPU core

1. the tokenizer; 2. data/heldout.jsonl and data/train.jsonl; 3. the student ("base"), from scratch,
on chains whose early steps slip; 4. the teacher: the student trained further on the right lines only;
5. held-out accuracy at temperature 1.0 of both. Deterministic given the seed (one thread, CPU).
The package docstring says what comes out and why.
"""
import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

import embedded as E
from opd import chat_prompt  # the one prompt: chat template of the user turn, "<think>\n" forced

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # pad, turn start, eos
THINK = ["<think>", "</think>"]                              # added, not special (as in Qwen3)
WORDS = ["user", "assistant", "Compute ", "Answer: "]        # the template's words, one token each
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level BPE (printable ASCII + newline) with merges only for the template's words."""
    vocab = {t: i for i, t in enumerate(SPECIAL + THINK + ["\n"] + [chr(c) for c in range(32, 127)])}
    merges = []
    for w in WORDS:
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                vocab[w[:k]] = len(vocab)
                merges.append((w[:k - 1], w[k - 1]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.decoder = decoders.Fuse()   # tokens are substrings: concatenation is the exact inverse
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def write_split(out: Path, seed: int, n_train: int = 4000, n_heldout: int = 200) -> list:
    """out/heldout.jsonl then out/train.jsonl, all questions distinct; returns the held-out rows."""
    rng, seen, rows = random.Random(f"split-{seed}"), set(), []
    while len(rows) < n_heldout + n_train:
        p = E.make_problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            rows.append(p)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("heldout.jsonl", rows[:n_heldout]), ("train.jsonl", rows[n_heldout:])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return rows[:n_heldout]


def slip(a: int, op: int) -> int:
    """a+op with the carry (or borrow) dropped: 47+38 -> 75, 47-19 -> 38 (every step of the task has one)."""
    return a + op - 10 if op > 0 else a + op + 10


def chain(problem: dict, rng: random.Random, p_slip) -> list:
    """Solution lines with slips: step i (0-based) slips with probability p_slip[i] (never after those),
    and every later line is right arithmetic on the slipped value. Returns [(line, slipped)]."""
    start, ops = E.parse(problem["question"])
    lines, v = [], start
    for i, op in enumerate(ops):
        slipped = i < len(p_slip) and rng.random() < p_slip[i]
        r = slip(v, op) if slipped else v + op
        assert 10 <= r <= 99, (problem, r)   # running values stay in [30, 79], so two slips stay 2-digit
        lines.append((f"{v}{op:+d}={r}\n", slipped))
        v = r
    return lines + [(f"</think>\nAnswer: {v}<|im_end|>", False)]


def make_model(tok, hidden: int, layers: int, seed: int) -> Qwen3ForCausalLM:
    """A tiny Qwen3 (head_dim 32: vLLM's CPU attention needs >= 32) with tied embeddings."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                      head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return Qwen3ForCausalLM(cfg)


def batch_of(tok, examples):
    """Right-padded input ids and labels from examples [(text, trained)]: -100 where not trained."""
    seqs = []
    for segments in examples:
        ids, labels = [], []
        for text, trained in segments:   # segments end at line breaks, so their tokens concatenate
            t = tok(text, add_special_tokens=False)["input_ids"]
            ids += t
            labels += t if trained else [-100] * len(t)
        seqs.append((ids, labels))
    n = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (n - len(s)) for s, _ in seqs])
    labels = torch.tensor([l + [-100] * (n - len(l)) for _, l in seqs])
    return ids, labels


def train(model, tok, sample, steps: int, lr: float, batch: int, desc: str):
    """AdamW with warmup + cosine decay on examples drawn from `sample()` -> [(text, trained)]."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        ids, labels = batch_of(tok, [sample() for _ in range(batch)])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()


@torch.no_grad()
def complete(model, tok, questions, temperature: float = 1.0, seed: int = 0, batch: int = 200) -> list:
    """Completions sampled at `temperature` with top_p 1.0 and no top-k (paper §4.1); greedy at 0."""
    torch.manual_seed(seed)
    tok.padding_side = "left"
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    texts = []
    for i in range(0, len(questions), batch):
        enc = tok([chat_prompt(tok, q) for q in questions[i:i + batch]], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=96, pad_token_id=tok.pad_token_id, **kw)
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    return texts


def report(model, tok, rows, samples: int = 4) -> tuple:
    """(accuracy, error rate of step 1..5) over `samples` samples per question at temperature 1.0."""
    rows = [r for r in rows for _ in range(samples)]
    texts = complete(model, tok, [r["question"] for r in rows])
    acc = sum(E.grade(x, r["answer"]) for x, r in zip(texts, rows)) / len(rows)
    steps = [E.step_ok(x) for x in texts]
    err = [sum(not s[i] for s in steps if len(s) > i) / max(1, sum(len(s) > i for s in steps)) for i in range(5)]
    return acc, err


def save(model, tok, out: Path):
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=True,
                     temperature=1.0, top_p=1.0, top_k=0).save_pretrained(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=E.HERE, help="where teacher/, student/ and data/ go (default: the package)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--base-steps", type=int, default=700)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--p-slip", type=float, nargs="+", default=[0.8, 0.3], help="base: slip probability of steps 1, 2, ...")
    ap.add_argument("--teacher-slip", type=float, nargs="+", default=[0.3, 0.3], help="slips in the teacher's context")
    ap.add_argument("--threads", type=int, default=1, help="1 keeps it deterministic and robust to a busy machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tok = build_tokenizer()
    heldout = write_split(args.out / "data", args.seed)
    heldout_q = {r["question"] for r in heldout}
    rng = random.Random(f"corpus-{args.seed}")

    def problem():
        while (p := E.make_problem(rng))["question"] in heldout_q:
            pass
        return p

    def base_example():   # the base imitates every line, slips included
        p = problem()
        return [(chat_prompt(tok, p["question"]), False)] + [(line, True) for line, _ in chain(p, rng, args.p_slip)]

    def teacher_example():   # learns only the right lines, so it never slips but continues from a slip
        p = problem()
        return [(chat_prompt(tok, p["question"]), False)] + [(l, not s) for l, s in chain(p, rng, args.teacher_slip)]

    student = make_model(tok, args.hidden, args.layers, args.seed)
    train(student, tok, base_example, args.base_steps, args.lr, args.batch, "student (base) pretrain")
    teacher = copy.deepcopy(student)
    train(teacher, tok, teacher_example, args.sft_steps, args.lr / 3, args.batch, "teacher SFT")
    for name, m in (("student", student), ("teacher", teacher)):
        save(m, tok, args.out / name)
    n = sum(p.numel() for p in teacher.parameters())
    print(f"{n / 1e3:.0f}K parameters each; held-out accuracy at temperature 1.0 (4 samples per question) "
          f"and error rate of steps 1..5:")
    for name, m in (("teacher", teacher), ("student", student)):
        acc, err = report(m, tok, heldout)
        print(f"  {name}: {acc:.3f}  steps {' '.join(f'{e:.3f}' for e in err)}")
    print(f"built in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
