"""flops.py: Appendix B's accounting by hand on a tiny config, public Qwen3 sizes, the paper's 5.7e17, the CLI."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hidden 8, intermediate 16, 2 layers, 2 query heads, 1 kv head, head_dim 4, vocab 10, tied embedding
TINY = flops.ModelConfig(8, 16, 2, 2, 1, 4, 10, True, "tiny")


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "flops.py"), *args], capture_output=True, text=True)


def test_tiny_config_by_hand():
    # verl N_dense per layer: MLP 3*8*16 = 384; q,k,v,o = 8*(8+4+4+8) = 192 -> 576; x2 layers + emb and head 2*10*8
    assert flops.dense_params(TINY) == 2 * 576 + 160 == 1312
    # transformers' count: + q/k norms 2*4 and two layer norms 2*8 per layer, final norm 8, the tied embedding once
    assert flops.param_count(TINY) == 2 * (576 + 8 + 16) + 80 + 8 == 1288
    # lengths 3 and 5: sum 8, sum of squares 34; 6*1312*8 = 62976, 12*34*head_dim 4*heads 2*layers 2 = 6528
    assert flops.seqlen_sums([3, 5]) == (8, 34)
    assert flops.train_flops(TINY, [3, 5]) == 62976 + 6528 == 69504
    assert flops.fwd_flops(TINY, [3, 5]) == 69504 / 3
    assert flops.opd_flops(TINY, TINY, [3, 5]) == 69504 + 2 * 23168 + 23168
    # a bigger teacher enters only through its forward pass
    teacher = flops.ModelConfig(16, 32, 3, 4, 2, 4, 10, False)  # per layer 3*16*32 + 16*(16+8+8+16) = 2304
    assert flops.dense_params(teacher) == 3 * 2304 + 2 * 10 * 16 == 7232
    t_train = 6 * 7232 * 8 + 12 * 34 * 4 * 4 * 3
    assert flops.opd_flops(TINY, teacher, [3, 5]) == pytest.approx(69504 * 5 / 3 + t_train / 3, rel=1e-15)
    # the per-step sums opd.py logs give the same number; nothing to train on costs nothing
    assert flops.opd_flops(TINY, teacher, sums=(8, 34)) == flops.opd_flops(TINY, teacher, (3, 5))
    assert flops.train_flops(TINY, []) == 0


def test_qwen3_parameter_counts_from_public_shapes():
    # Qwen3-1.7B: hidden 2048, intermediate 6144, 28 layers, 16 heads, 8 kv heads, head_dim 128, vocab 151936, tied
    attn = 2048 * 16 * 128 * 2 + 2048 * 8 * 128 * 2 + 128 * 2  # q, o; k, v; q_norm, k_norm
    layer = attn + 3 * 2048 * 6144 + 2 * 2048
    assert flops.param_count(flops.load_config("Qwen3-1.7B")) == 28 * layer + 151936 * 2048 + 2048 == 1_720_574_976
    # Qwen3-8B: hidden 4096, intermediate 12288, 36 layers, 32 heads, 8 kv heads, head_dim 128, untied
    attn = 4096 * 32 * 128 * 2 + 4096 * 8 * 128 * 2 + 128 * 2
    layer = attn + 3 * 4096 * 12288 + 2 * 4096
    assert flops.param_count(flops.load_config("Qwen/Qwen3-8B")) == 36 * layer + 2 * 151936 * 4096 + 4096
    # the totals keras-hub publishes for its Qwen3 presets (keras_hub/src/models/qwen3/qwen3_presets.py)
    for name, n in [("Qwen3-0.6B", 596049920), ("Qwen3-1.7B", 1720574976), ("Qwen3-4B", 4022468096),
                    ("Qwen3-8B", 8190735360), ("Qwen3-14B", 14768307200), ("Qwen3-32B", 32762123264)]:
        assert flops.param_count(flops.MODELS[name]) == n, name
    assert flops.MODELS["Qwen3-8B-Base"][:8] == flops.MODELS["Qwen3-8B"][:8]


def test_param_count_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import Qwen3Config, Qwen3ForCausalLM
    for tie in (True, False):
        c = Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, vocab_size=100, tie_word_embeddings=tie)
        with torch.device("meta"):
            n = sum(p.numel() for p in Qwen3ForCausalLM(c).parameters())
        assert flops.param_count(flops.ModelConfig(64, 96, 2, 4, 2, 32, 100, tie)) == n


def test_load_config_from_directory(tmp_path):
    cfg = {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
           "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert flops.load_config(tmp_path)[:8] == flops.load_config("Qwen3-8B")[:8]
    del cfg["head_dim"], cfg["num_key_value_heads"]  # HF defaults: hidden/heads, and as many kv heads as heads
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = flops.load_config(str(tmp_path / "config.json"))
    assert (c.head_dim, c.num_key_value_heads) == (128, 32)


def test_paper_prefix_256_ten_steps_on_8b():
    # §5.1: 10 steps of prefix 256, Qwen3-8B(-Base) student and Qwen3-8B teacher, 512 prompts x 4 rollouts: 5.7e17
    rows = flops.planned(flops.load_config("Qwen3-8B-Base"), flops.load_config("Qwen3-8B"), 10, 512 * 4, 256, 0,
                         16384)
    total = sum(r[-1] for r in rows)
    assert abs(total / 5.7e17 - 1) < 0.15, total
    assert {r[2] for r in rows} == {256}


def test_schedule_lengths():
    assert [flops.prefix_len(s, 1, 256, 16384) for s in (0, 1, 2, 59, 64, 65, 100)] == \
        [1, 257, 513, 15105, 16384, 16384, 16384]
    assert [flops.prefix_len(s, 256, 0, 16384) for s in range(3)] == [256] * 3
    s, t = flops.load_config("Qwen3-1.7B-Base"), flops.load_config("Qwen3-8B")
    rows = flops.planned(s, t, 4, 3, 1, 256, 600, mean_length=400)  # L: 1, 257, 513, 600; natural length 400
    assert [(r[1], r[2]) for r in rows] == [(1, 1), (257, 257), (513, 400), (600, 400)]
    assert rows[2][-1] == flops.opd_flops(s, t, [400] * 3)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'Qwen3-9B'"):
        flops.load_config("Qwen3-9B")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        flops.load_config(tmp_path)
    with pytest.raises(ValueError, match="-1 is not a non-negative integer"):
        flops.train_flops(TINY, [3, -1])
    with pytest.raises(ValueError, match="not a non-negative integer"):
        flops.train_flops(TINY, [2.5])
    with pytest.raises(ValueError, match="non-negative"):
        flops.opd_flops(TINY, TINY, sums=(-4, 16))
    for args in (["--prefix", "256", "--student", "Qwen3-9B"], ["--prefix", "-1"],
                 ["--full", "--teacher", str(tmp_path)], ["--from-metrics", str(tmp_path / "metrics.jsonl")],
                 ["--full", "--max-new-tokens", "-5"], ["--prefix", "9", "--batch-size", "0"], ["--prefx", "9"],
                 ["--from-metrics", str(tmp_path / "broken.jsonl")], ["--delta", "256", "--prefix-start", "0"],
                 ["--full", "--prefix-start", "5"], ["--paper", "--steps", "3"], ["--prefix", "99999"],
                 ["--from-metrics", str(tmp_path / "empty.jsonl")],
                 ["--from-metrics", str(tmp_path / "broken.jsonl"), "--batch-size", "7"]):
        (tmp_path / "broken.jsonl").write_text('{"step": 0}\n{"step": \n')
        (tmp_path / "empty.jsonl").write_text("\n")
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("flops.py: error:"), r.stderr
    assert "--max-new-tokens must be >= 1" in cli("--full", "--max-new-tokens", "-5").stderr
    assert "broken.jsonl:2: not valid JSON" in cli("--from-metrics", str(tmp_path / "broken.jsonl")).stderr
    assert "only applies to the --delta schedule" in cli("--full", "--prefix-start", "5").stderr
    # flags a mode does not read are refused, not ignored; a prefix past the budget is refused, not capped
    assert "--paper does not read --steps: drop it" in cli("--paper", "--steps", "3").stderr
    assert "--from-metrics does not read --batch-size" in cli("--from-metrics", "x.jsonl", "--batch-size", "7").stderr
    assert "--prefix 99999 is past --max-new-tokens 16384" in cli("--prefix", "99999").stderr
    assert "empty.jsonl: no records" in cli("--from-metrics", str(tmp_path / "empty.jsonl")).stderr
    # malformed files: one line naming the file and the field (were AttributeError / TypeError / ZeroDivisionError)
    with pytest.raises(ValueError, match=r"not \(sum s, sum s\^2\)"):
        flops.opd_flops(TINY, TINY, sums=(10, 1000))  # no lengths give sum s^2 > (sum s)^2
    cases = [("config.json", "[1, 2]", "--full", "config.json: not a JSON object"),
             ("config.json", '{"text_config": null}', "--full", "hidden_size is 'missing', not a positive integer"),
             ("config.json", '{"hidden_size": true}', "--full", "hidden_size is True, not a positive integer"),
             ("metrics.jsonl", '{"step": 0, "seqlen_sum": 10, "seqlen_sq_sum": NaN}', "--from-metrics",
              "metrics.jsonl:1: seqlen_sq_sum is nan"),
             ("config.json", '{"hidden_size": "4096"}', "--full", "hidden_size is '4096', not a positive integer"),
             ("config.json", '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 99, '
              '"num_attention_heads": 0}', "--full", "num_attention_heads is 0"),
             ("config.json", '{"hidden_size": ', "--full", "config.json:1: not valid JSON"),
             ("run.json", "[1]", "--from-metrics", "run.json: not a JSON object"),
             ("metrics.jsonl", '{"step": 0, "seqlen_sum": "x"}', "--from-metrics",
              "metrics.jsonl:1: seqlen_sum is 'x'"),
             ("metrics.jsonl", "[1]", "--from-metrics", "metrics.jsonl:1: not a JSON object")]
    for name, text, mode, needle in cases:
        d = tmp_path / "case"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / name).write_text(text)
        if name == "run.json":
            (d / "metrics.jsonl").write_text('{"step": 0, "flops": 1.0}\n')
        args = ["--full", "--teacher", str(d)] if mode == "--full" else ["--from-metrics", str(d / "metrics.jsonl")]
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (name, text, r.stderr)


def test_from_metrics_recomputes_or_falls_back(tmp_path):
    s, t = flops.load_config("Qwen3-1.7B"), flops.load_config("Qwen3-8B")
    steps = [[100, 300, 20], [512, 7]]
    recs = [{"step": i, "n_seqs": len(x), "seqlen_sum": sum(x), "seqlen_sq_sum": sum(n * n for n in x),
             "flops": 1.0 + i} for i, x in enumerate(steps)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows, source = flops.from_metrics(tmp_path / "metrics.jsonl")  # no run.json: the records' flops
    with pytest.raises(ValueError, match="nothing names the teacher"):  # not silently the records' flops
        flops.from_metrics(tmp_path / "metrics.jsonl", student="Qwen3-1.7B")
    assert [r[3] for r in rows] == [1.0, 2.0] and "records" in source
    (tmp_path / "run.json").write_text(json.dumps({"student": "Qwen/Qwen3-1.7B", "teacher": "Qwen3-8B"}))
    rows, source = flops.from_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r[3] for r in rows] == [flops.opd_flops(s, t, x) for x in steps] and "recomputed" in source
    (tmp_path / "run.json").write_text(json.dumps({"student": "/gone/ckpt", "teacher": "Qwen3-8B"}))
    rows, source = flops.from_metrics(str(tmp_path / "metrics.jsonl"))  # run.json's model not here: fall back
    assert [r[3] for r in rows] == [1.0, 2.0] and "/gone/ckpt" in source
    rows, _ = flops.from_metrics(tmp_path, "Qwen3-1.7B", "Qwen3-8B")  # the run's directory; models given: run.json
    assert [r[3] for r in rows] == [flops.opd_flops(s, t, x) for x in steps]  # is not read
    r = cli("--from-metrics", str(tmp_path / "metrics.jsonl"), "--student", "Qwen3-1.7B", "--teacher", "Qwen3-8B")
    total = sum(flops.opd_flops(s, t, x) for x in steps)
    assert r.returncode == 0 and f"total: {total:.3e} FLOPs over 2 steps" in r.stdout, r.stdout + r.stderr
    # a resumed run appends step 1 again (redone after the last checkpoint): it counts once, as the redone one
    redo = dict(recs[1], flops=5.0)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + [redo]))
    (tmp_path / "run.json").unlink()
    rows, _ = flops.from_metrics(tmp_path / "metrics.jsonl")
    assert [r[3] for r in rows] == [1.0, 5.0]
    # no flops in the records and run.json's student gone: the error says where the name came from
    (tmp_path / "metrics.jsonl").write_text(json.dumps({k: v for k, v in recs[0].items() if k != "flops"}) + "\n")
    (tmp_path / "run.json").write_text(json.dumps({"student": "/gone/ckpt", "teacher": "Qwen3-8B"}))
    with pytest.raises(ValueError, match=r"unknown model '/gone/ckpt'.*run.json: pass --student and --teacher\)"):
        flops.from_metrics(tmp_path)


def test_cli_plan_and_paper():
    r = cli("--student", "Qwen3-8B", "--teacher", "Qwen3-8B", "--batch-size", "512", "--samples", "4",
            "--steps", "10", "--prefix", "256")
    assert r.returncode == 0 and "total: 5.200e+17 FLOPs over 10 steps" in r.stdout, r.stdout + r.stderr
    r = cli("--paper")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "OPD prefix 256, 10 steps" in x)
    assert "5.7e+17" in line and "5.20e+17" in line and "1.10" in line
    assert "47.4x" in r.stdout and "ours, with full OPD at the cap = 100.8x" in r.stdout  # 5.24e19 / 5.20e17
    # Appendix E's checkpoint step beside a row, and paper / ours at that many steps (8B prefix 512: step 50, 5.25e18)
    line = next(x for x in r.stdout.splitlines() if x.startswith("Table 2") and "(prefix 512)" in x)
    assert line.split()[-2:] == ["50", "0.99"], line
