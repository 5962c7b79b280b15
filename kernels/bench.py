"""Benchmark of the LM-head loss: fused kernels vs cuBLAS floors, naive torch, torch.compile, Liger, CCE.

    python -m kernels.bench                 # GPU, quick: the target rows (T=16384, H=2048/4096) + T scaling
    python -m kernels.bench --full          # GPU, every T in {4096, 16384, 32768, 65536} for every method
    python -m kernels.bench --tiny          # CPU smoke test (Triton interpreter, tiny sizes)
    python -m kernels.bench --diagnose      # GPU, ~1 min: ours interleaved with the floor, profiles, breakdown

bf16, V=151936. Every method computes the same OPD loss, scale * sum_t m_t exp(logp_t - ls_t) (ls_t - lt_t),
ours in one op, the others from their per-token logp (for Liger / CCE: -CE). Times are medians of
triton.testing.do_bench (it flushes L2 before every call; the operands are far larger than L2 anyway). Floors:
one cuBLAS h @ W^T (bf16 out) for forward-only, 3x that for forward + backward. Peak extra memory is
max_memory_allocated during one call minus what was allocated before (inputs), gradients included.
Gradient error: ||g - g_ref|| / ||g_ref|| over dh and dW (the larger), against the same OPD loss in
fp32 (no TF32) on the same bf16-rounded inputs, at T=8192 (3 of ours' chunks: their dW accumulation too).
Logits have std 2 (max ~9); bf16 logits round to 2^-9 of their size. In the OPD loss that rounding also enters
the gradient through ratio = exp(logp - ls), so methods that take logp from bf16 logits (naive torch, Liger) show
~3x the error they show on a loss linear in logp; ours takes the target logit in fp32 (see fused.py).
Writes bench.csv, bench.png, prints a table and the targets. On a GPU, diagnostics follow: the row kernel
alone per launch config (vs a plain copy), ours step by step (breakdown), and the three GEMMs' TFLOP/s per
chunk size (gemm_sweep.csv). `--vs OLD_FUSED_PY` times another version of fused.py beside ours.
"""
import argparse
import contextlib
import csv
import importlib
import importlib.machinery
import importlib.util
import math
import os
import statistics
import sys
import time

import torch

from . import fused, ref, token_logprobs

GIB = 2**30
CHUNK_SWEEP = (2048, 2368, 3328, 4096)  # 8, 7, 5, 4 chunks at T = 16384 (ours: 6 of <= 2752)


def fail(msg, prog="kernels.bench"):
    """A usage error: one line, exit 2 (as opd.py, eval.py and flops.py)."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def interpret_on_cpu(module):
    """Rerun `python -m module` with TRITON_INTERPRET=1 unless it is set: Triton reads it at its first import, so it
    cannot be set from inside a process that has imported it (the CPU smoke tests)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})


def parse():
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail
    p.add_argument("--full", action="store_true", help="every T for every method (GPU memory permitting)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes; runs on CPU with the Triton interpreter")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (saves ~1 min)")
    p.add_argument("--diagnose", action="store_true", help="GPU, ~1 min: only where ours' time goes (its paths "
                   "interleaved with the floor, a profile of one call, each step timed alone), no table")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out", help="folder for bench.csv / bench.png")
    p.add_argument("--vs", metavar="FUSED_PY", help="also time another version of kernels/fused.py (e.g. from "
                   "`git show REV:kernels/fused.py`) as method 'vs', to see what a change bought")
    args = p.parse_args()
    if args.vs and not os.path.isfile(args.vs):
        p.error(f"--vs {args.vs}: no such file")
    return args


# ----------------------------------------------------------------------------- losses under test


# fused.py's paths for bf16 (module flags); "ours" is whichever the flags select by default
PATHS = {"epilogue": dict(GEMM_EPILOGUE=True), "cublas+row": dict(GEMM_EPILOGUE=False)}


@contextlib.contextmanager
def path_flags(path):
    """fused.py's module flags set to PATHS[path] inside the block."""
    old = {k: getattr(fused, k) for k in PATHS[path]}
    for k, v in PATHS[path].items():
        setattr(fused, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(fused, k, v)


def naive_logp(h, w, y):
    return torch.log_softmax((h @ w.t()).float(), -1).gather(1, y[:, None]).squeeze(1)


def opd_from_logp(logp, opd):
    """The OPD loss from per-token logp (what opd_loss computes in one op)."""
    ls, lt, m, scale = opd
    return scale * (m * torch.exp(logp - ls) * (ls - lt)).sum()


def naive_loss(h, w, y, opd):
    return opd_from_logp(naive_logp(h, w, y), opd)


def load_vs(path):
    """Another version of kernels/fused.py, as a module (inside the package: its relative imports work)."""
    loader = importlib.machinery.SourceFileLoader("kernels._vs", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    vs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs)
    return vs


def methods(args, dev):
    """name -> (fwd_fn or None, fwd_bwd_fn or None); each takes (h, w, y, c, opd) and returns a tensor."""
    def ours_fwd(h, w, y, c, opd):
        with torch.no_grad():
            return token_logprobs(h, w, y)[0]

    def ours_fb(h, w, y, c, opd, chunk=None):
        loss, _ = fused.opd_loss_triton(h, w, y, *opd, chunk_rows=chunk)
        loss.backward()
        return loss

    def ours_tl_fb(h, w, y, c, opd):
        loss = opd_from_logp(fused.token_logprobs_triton(h, w, y)[0], opd)
        loss.backward()
        return loss

    def torch_fwd(h, w, y, c, opd):
        with torch.no_grad():
            return naive_logp(h, w, y)

    def torch_fb(h, w, y, c, opd):
        loss = naive_loss(h, w, y, opd)
        loss.backward()
        return loss

    def on(path, fn):  # ours with fused.py's path flags set for the call
        def call(*a):
            with path_flags(path):
                return fn(*a)
        return call

    out = {
        "cublas_gemm": (lambda h, w, y, c, opd: torch.mm(h, w.t()), None),
        "ours": (ours_fwd, ours_fb),
    }
    for path, flags in PATHS.items():  # ours' other paths, for the A/B in the same run
        if any(getattr(fused, k) != v for k, v in flags.items()):
            out[f"ours_{path}"] = (on(path, ours_fwd), on(path, ours_fb))
    out.update({
        "ours_tl(4gemm)": (None, ours_tl_fb),
        "torch": (torch_fwd, torch_fb),
    })
    for rows in CHUNK_SWEEP:  # the time/memory trade-off of the chunk size
        out[f"ours_C{rows}"] = (None, lambda *a, rows=rows: ours_fb(*a, chunk=rows))
    if args.vs:
        vs = load_vs(args.vs)

        def vs_fwd(h, w, y, c, opd):
            with torch.no_grad():
                return vs.token_logprobs_triton(h, w, y)[0]

        def vs_fb(h, w, y, c, opd):
            loss, _ = vs.opd_loss_triton(h, w, y, *opd)
            loss.backward()
            return loss
        out["vs"] = (vs_fwd, vs_fb)
    if dev.type == "cuda" and not args.no_compile:
        compiled = torch.compile(naive_loss, dynamic=False)

        def compile_fb(h, w, y, c, opd):
            loss = compiled(h, w, y, opd)
            loss.backward()
            return loss
        out["torch.compile"] = (None, compile_fb)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger_fb(h, w, y, c, opd):
            loss = opd_from_logp(-liger(w, h, y), opd)  # CE = -logp
            loss.backward()
            return loss
        out["liger_flce"] = (None, liger_fb)
    except ImportError:
        print("liger_kernel: not installed")
    except Exception as e:  # installed but broken (version skew): say so, go on
        print(f"liger_kernel: unusable: {type(e).__name__}: {e}")
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce_fb(h, w, y, c, opd):
            loss = opd_from_logp(-linear_cross_entropy(h, w, y, reduction="none"), opd)
            loss.backward()
            return loss
        out["cce"] = (None, cce_fb)
    except ImportError:
        print("cut_cross_entropy: not installed")
    except Exception as e:
        print(f"cut_cross_entropy: unusable: {type(e).__name__}: {e}")
    return out


# ----------------------------------------------------------------------------- measuring


def time_ms(fn, dev, grads, short=False):
    """Median ms of fn() on a GPU (called once before, for compiles and autotuning; short: a quarter of the
    repetitions); on CPU the time of that one call."""
    t0 = time.perf_counter()
    fn()
    if dev.type != "cuda":  # the interpreter's times mean nothing: one call shows that the path runs
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    k = 0.25 if short else 1
    return triton.testing.do_bench(fn, warmup=k * max(est, 25), rep=k * max(5 * est, 100), grad_to_none=grads,
                                   return_mode="median")


def interleaved(meths, h, w, y, c, opd, dev, rounds=25):
    """Ours' paths (and vs) against the floor in pairs: each round times, for every method and mode in turn (the order
    rotating by round), one cuBLAS GEMM and right after it one call of the method, each a single call between CUDA
    events with L2 flushed and grads cleared first; the ratio is the method's to its own GEMM's. The table above
    times each method in one block, minutes apart, while SM clocks drift with heat and power (the same run once put
    one method 9 ms, 18 %, apart in two places); a pair is ~0.1 s apart, so the drift falls on both. (Run 9's
    version ran a short do_bench per method and round: one timed call after nine untimed ones, ~2 s a round, 5 rounds
    that spread 1.01-1.29.) After each fwd+bwd call, three GEMMs back to back in one timed region as well: a floor as
    long as the call, in case "3 x one GEMM" (a 15-30 ms burst) ran at clocks a 50-100 ms stretch does not get. In
    run 10 it did not matter: 1.163 / 1.138 against it, 1.149 / 1.156 against 3 x one. Returns rows: method, mode,
    floor, T, H, the median ratio, its quartiles and the rounds."""
    T, H = h.shape

    def floor(n=1):
        for _ in range(n):  # each product freed before the next: one [T, V] block at a time
            torch.mm(h, w.t())
    calls = [(name, mode, fn) for name, fns in meths.items() for mode, fn in zip(("fwd", "fwd+bwd"), fns) if fn]
    cuda = dev.type == "cuda"
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev) if cuda else None  # as do_bench: > L2

    def once(fn):
        """ms of one call of fn."""
        h.grad = w.grad = None
        if not cuda:  # the interpreter's times mean nothing: one call shows that the path runs
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    for _, _, fn in calls:  # compiles and autotuning out of the way (under --diagnose nothing has run them yet)
        once(lambda: fn(h, w, y, c, opd))
    one, three = "one GEMM", "3 GEMMs in a row"  # the floors
    ratios = {(name, mode, f): [] for name, mode, _ in calls for f in (one, three) if f == one or mode != "fwd"}
    for r in range(rounds if cuda else 1):
        k = r % len(calls)
        for name, mode, fn in calls[k:] + calls[:k]:
            f = once(floor)
            ms = once(lambda: fn(h, w, y, c, opd))
            ratios[name, mode, one].append(ms / (f * (1 if mode == "fwd" else 3)))
            if mode != "fwd":
                ratios[name, mode, three].append(ms / once(lambda: floor(3)))
    h.grad = w.grad = None
    print(f"\ninterleaved with the floor, T={T}, H={H}, {len(next(iter(ratios.values())))} rounds: x floor (fwd+bwd: "
          "3 x one GEMM, then three GEMMs back to back), median [quartiles], then each round")
    out = []
    for (name, mode, f), rs in ratios.items():
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else rs * 3
        print(f"  {name:17s} {mode if f == one else ' 3 GEMMs':8s} {statistics.median(rs):6.3f} "
              f"[{q[0]:.3f}, {q[2]:.3f}]   " + " ".join(f"{r:.3f}" for r in rs))
        out.append(dict(method=name, mode=mode, floor=f, T=T, H=H, x_floor=statistics.median(rs), q1=q[0], q3=q[2],
                        rounds=" ".join(f"{r:.4f}" for r in rs)))
    return out


def peak_gib(fn, dev, grads):
    if dev.type != "cuda":
        return float("nan")
    for g in grads:
        g.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for g in grads:
        g.grad = None
    return peak / GIB


def grad_error(fb, h, w, y, c, opd, truth):
    """The larger relative error of (dh, dW) from fb against truth, the fp32 gradients of the same OPD loss."""
    hb, wb = h.detach().requires_grad_(), w.detach().requires_grad_()
    fb(hb, wb, y, c, opd)
    return max(((a.grad.float() - b).norm() / b.norm()).item() for a, b in zip((hb, wb), truth))


def row_kernel_sweep(V, dev, rows=2048):
    """GB/s of the row kernel alone for each launch config (stats pass; stats + in-place gradient pass),
    and of a plain copy of the same bytes (the bandwidth it could have)."""
    import triton.testing
    x = torch.randn(rows, V, device=dev).bfloat16()
    y = torch.randint(0, V, (rows,), device=dev)
    v = [torch.zeros(rows, device=dev) for _ in range(9)]  # c, logp, ent, lse2, alpha, bad, ls, lt, m
    H = 4096  # the fp32 target-logit dot reads h_t and W[y_t]: 2H of the ~V values per row
    h = torch.randn(rows, H, device=dev).bfloat16()
    w = (torch.randn(V, H, device=dev) / H**0.5).bfloat16()
    hw = (h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), H)
    gb = rows * V * 2 / 1e9
    copy_ms = triton.testing.do_bench(lambda: x.clone(), warmup=10, rep=50, return_mode="median")
    print(f"\nrow kernel alone, [{rows}, {V}] bf16 ({gb:.2f} GB), fp32 target logit at H={H}; "
          f"a copy (read + write) runs at {2 * gb / copy_ms * 1e3:.0f} GB/s:")
    for cfg in fused._configs():
        for grad, nbytes in ((False, 2), (True, 4)):  # bytes moved per logit: read; read + write

            def launch(cfg=cfg, grad=grad):  # with grad, later calls see the e's of the first: same work
                fused._fwd_kernel.fn[(rows,)](x, x.stride(0), y, *v, *hw, V, fused.LOG2E, 1.0, 1e-3,
                                              FUSED_GRAD=grad, EXACT_Y=True, GIVEN_C=False, BLOCK_H=1024,
                                              num_warps=cfg.num_warps, **cfg.kwargs)
            ms = triton.testing.do_bench(launch, warmup=10, rep=50, return_mode="median")
            print(f"  BLOCK={cfg.kwargs['BLOCK']:5d} warps={cfg.num_warps:2d} fused_grad={grad!s:5}: {ms:6.3f} ms "
                  f"{rows * V * nbytes / ms / 1e6:6.0f} GB/s")


def tuned(kernel):
    """The launch config autotuning picked for kernel (its last key), in one line."""
    c = getattr(kernel, "best_config", None)
    return "not tuned yet" if c is None else \
        " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" warps={c.num_warps} stages={c.num_stages}"


def breakdown(V, H, T, dev):
    """Where ours' fwd+bwd time goes at T tokens on the epilogue path: each step of one chunk timed alone, on the data
    ours sees (GEMMs 2 and 3 read the epilogue's e', GEMM 3's alpha h sits in the strided scratch), times
    the number of chunks, next to the 3-GEMM floor (sum over chunks of GEMM 1 alone is not the floor:
    the floor is one T-row GEMM; small chunks lose there too). Reference rows show the alternatives
    (the cuBLAS + row-kernel path among them)."""
    import triton.testing
    dt = torch.bfloat16
    C = fused._chunk_rows(V, dt, T)
    n = -(-T // C)
    g = torch.Generator(device=dev).manual_seed(1)
    hs = torch.randn(T, H, device=dev, generator=g).to(dt)
    w = (torch.randn(V, H, device=dev, generator=g) * (2.0 / math.sqrt(H))).to(dt)
    h, x = hs[:C], torch.empty(C, V, device=dev, dtype=dt)
    y = torch.randint(0, V, (C,), device=dev, generator=g)
    o = torch.zeros(9, C, device=dev)  # c, logp, ent, lse2, alpha, bad, ls, lt, m
    o[7] = -0.5
    o[8] = 1
    NT = -(-V // fused.EPI_BN_MIN)
    part = torch.zeros(2, C, NT, device=dev)
    dh32 = torch.empty(C, H, device=dev)
    ha = dh32.view(dt)[:, :H]  # as in _head_pass: alpha h in the first half of each fp32 scratch row
    ha_c = torch.empty(C, H, device=dev, dtype=dt)
    acc = torch.zeros(V, H, device=dev)
    acc_t, dw = torch.zeros(H, V, device=dev), torch.empty(V, H, device=dev, dtype=dt)  # GEMM 3 transposed
    hw = (h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1))
    torch.mm(h, w.t(), out=x)
    x0 = x.clone()

    def target():
        fused._target_kernel[(C,)](*hw, y, o[0], H, fused.LOG2E, BLOCK_H=1024)

    def combine():  # over the slots GEMM 1's autotuned tile writes
        fused._combine_kernel[(C,)](part, part.stride(1), part.stride(0), nt, x, x.stride(0), y, o[0], o[0], *o[1:],
                                    V, 1.0, 1e-3, FUSED_GRAD=True, BLOCK_T=1024, BLOCK=1024)

    def row():
        fused._fwd_kernel[(C,)](x, x.stride(0), y, *o, *hw, H, V, fused.LOG2E, 1.0, 1e-3, FUSED_GRAD=True,
                                EXACT_Y=True, GIVEN_C=False, BLOCK_H=1024)

    def row_again():
        x.copy_(x0)  # the kernel overwrites x; the copy is timed separately and subtracted
        row()
    target()
    nt = fused._gemm_epi(h, w, x, o[0], part, fused.LOG2E, fused.SUMS, store_e=True)
    combine()
    e0 = x.clone()  # what GEMMs 2 and 3 read in ours: e' = 2^(u - c), mostly tiny
    steps = [  # (what, call, chunks it runs for in ours: n, 1 (once per call) or 0 (reference))
        ("target logit u_y (fp32 dot)", target, n),
        ("GEMM 1 + epilogue (sums, e' stored)", lambda: fused._gemm_epi(h, w, x, o[0], part, fused.LOG2E,
                                                                        fused.SUMS, store_e=True), n),
        ("combine (per row: sums -> logp, alpha, x[y])", combine, n),
        ("GEMM 1 + epilogue, forward only (sums)", lambda: fused._gemm_epi(h, w, None, o[0], part, fused.LOG2E,
                                                                           fused.SUMS), 0),
        ("GEMM 1 cuBLAS x = h W^T (bf16 out)", lambda: torch.mm(h, w.t(), out=x), 0),
        ("row kernel (fused grad), copy subtracted", row_again, 0),
        ("copy x (read + write: the row kernel's floor)", lambda: x.copy_(x0), 0),
        ("GEMM 2  e' W (fp32 out)", lambda: fused._mm32(e0, w, dh32), n),
        ("GEMM 2  e' W (bf16 out)", lambda: torch.mm(e0, w), 0),
        ("dh rows * alpha, h * alpha",
         lambda: (fused._scale_cast(dh32, o[4], ha_c), fused._scale_cast(h, o[4], ha)), n),
        ("GEMM 3  acc += e'^T (alpha h), strided scratch", lambda: fused._acc_dw(acc, e0, ha, first=False), n),
        ("GEMM 3  same, alpha h contiguous", lambda: fused._acc_dw(acc, e0, ha_c, first=False), 0),
        ("GEMM 3  e'^T h (bf16 out, no accumulate)", lambda: torch.mm(e0.t(), h), 0),
        # cuBLAS picks its kernel by shape: the same product as acc^T [H, V], once turned into W.grad at the end
        ("GEMM 3  transposed: acc^T += (alpha h)^T e'", lambda: fused._acc_dw(acc_t, ha, e0, first=False), 0),
        ("  its W.grad: acc^T -> bf16 [V, H] (once)", lambda: dw.copy_(acc_t.t()), 0),
        ("dW: fp32 accumulator -> bf16 (once)", lambda: fused._grad_weight(acc.clone(), None, dt), 1),
        ("  (its clone, subtracted)", lambda: acc.clone(), 0),
    ]
    ms = {what: triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median") for what, f, _ in steps}
    ms["row kernel (fused grad), copy subtracted"] -= ms["copy x (read + write: the row kernel's floor)"]
    ms["dW: fp32 accumulator -> bf16 (once)"] -= ms["  (its clone, subtracted)"]
    floor = triton.testing.do_bench(lambda: torch.mm(hs, w.t()), warmup=10, rep=40, return_mode="median")
    print(f"\nbreakdown of ours fwd+bwd on the epilogue path, T={T}, H={H}: {n} chunks of <= {C} rows; ms per chunk, "
          f"x {n}; GEMM 1 + epilogue: {tuned(fused._gemm_epi_kernel)}:")
    total = sum(k * ms[what] for what, _, k in steps)
    for what, _, k in steps:
        v = ms[what]
        print(f"  {what:48s} {v:7.3f} ms  x{k} = {k * v:7.2f} ms" if k else
              f"  {what:48s} {v:7.3f} ms  (for reference)")
    print(f"  {'sum':48s} {'':7s}          = {total:7.2f} ms;  3-GEMM floor {3 * floor:.2f} ms "
          f"(one {T}-row GEMM {floor:.2f} ms)")


def profile(V, H, T, dev, mod=fused, label="ours", path=None, fwd_only=False):
    """One call of ours (mod: fused.py or another version of it; path: one of PATHS, else its defaults) fwd+bwd
    (fwd_only: token_logprobs without grad, the teacher's call) under torch.profiler: the GPU time of each kernel
    inside the real call, its sum, and the call's wall time (the rest is the GPU standing idle: host syncs,
    launches)."""
    if path is not None:
        with path_flags(path):
            return profile(V, H, T, dev, mod, f"{label} ({path})", fwd_only=fwd_only)
    from torch.profiler import ProfilerActivity, profile as torch_profile
    h, w, y, _, opd = head_inputs(V, H, T, dev, seed=3)

    def call():
        h.grad = w.grad = None
        if fwd_only:
            with torch.no_grad():
                mod.token_logprobs_triton(h, w, y)
        else:
            mod.opd_loss_triton(h, w, y, *opd)[0].backward()
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
    profiled, walls = start.elapsed_time(end), []
    for _ in range(5):  # the same call without the profiler (whose CPU-side bookkeeping slows launches)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        walls.append(start.elapsed_time(end))
    try:  # printed last; a failure here must not cost the profile
        host = "" if fwd_only else host_timing(mod, call)  # it times backward's start
    except Exception as e:
        host = f"  host timing failed: {type(e).__name__}: {e}"
    on_gpu = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    kernels = {}  # name -> [count, us]: the GPU-side kernel events (the CPU-side ops only launch them)
    for e in on_gpu:
        k = kernels.setdefault(e.name, [0, 0.0])
        k[0] += 1
        k[1] += e.time_range.end - e.time_range.start
    print(f"\nprofile of one {label} {'forward-only' if fwd_only else 'fwd+bwd'} call, T={T}, H={H}: wall "
          f"{profiled:.2f} ms under the profiler, {statistics.median(walls):.2f} ms without (median of 5); GPU kernels "
          f"{sum(us for _, us in kernels.values()) / 1e3:.2f} ms")
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:10]:
        print(f"  {us / 1e3:8.2f} ms  x{count:<3d} {name[:100]}")
    gaps = sorted(((b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(on_gpu, on_gpu[1:])),
                  reverse=True)
    print(f"  GPU idle between kernels: {sum(g for g, _, _ in gaps) / 1e3:.2f} ms; the largest gaps, with what the "
          f"host was doing then (the CPU-side ops spanning the gap's middle, outermost first):")
    t0 = on_gpu[0].time_range.start if on_gpu else 0
    on_cpu = [e for e in prof.events() if e.device_type.name == "CPU"]
    for a, b in sorted(zip(on_gpu, on_gpu[1:]), key=lambda ab: ab[0].time_range.end - ab[1].time_range.start)[:5]:
        mid = (a.time_range.end + b.time_range.start) / 2
        busy = [e.name for e in sorted(on_cpu, key=lambda e: e.time_range.start)
                if e.time_range.start <= mid <= e.time_range.end]
        print(f"  {(b.time_range.start - a.time_range.end) / 1e3:6.2f} ms at +{(a.time_range.end - t0) / 1e3:6.2f} ms: "
              f"host in {' > '.join(busy[-6:]) or '(no op)'}")
        print(f"      after  {a.name[:150]}\n      before {b.name[:150]}")
    if host:
        print(host)
    if not kernels:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14))


def host_timing(mod, call, n=5):
    """The host side of `call` (one fwd+bwd of mod.opd_loss_triton), for gaps where the GPU waits on it: how long
    loss.backward() takes to enter _OPDLoss.backward (the autograd engine's start; after the forward's last host
    sync the GPU has nothing queued then), Python's garbage collections during the calls, and the wall time with
    the collector off. Returns the lines to print."""
    import gc
    entered, gcs, t = [], [], {}
    fn = mod._OPDLoss.backward

    def backward(ctx, *g):  # autograd looks the method up on the class at each call
        entered.append(time.perf_counter())
        return fn(ctx, *g)

    def on_gc(phase, info):
        if phase == "start":
            t["gc"] = time.perf_counter()
        else:
            gcs.append(time.perf_counter() - t["gc"])
    orig_opd = mod.opd_loss_triton

    def opd(*a, **k):  # the call's own loss.backward() follows right after: note when it starts
        out = orig_opd(*a, **k)
        t["bwd"] = time.perf_counter()
        return out
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    waits, walls = [], {True: [], False: []}
    mod._OPDLoss.backward, mod.opd_loss_triton = staticmethod(backward), opd
    gc.callbacks.append(on_gc)
    try:
        for collect in (True, False) * n:
            (gc.enable if collect else gc.disable)()
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            walls[collect].append((time.perf_counter() - t0) * 1e3)
            waits.append((entered[-1] - t["bwd"]) * 1e3)
    finally:
        gc.enable()
        gc.callbacks.remove(on_gc)
        mod._OPDLoss.backward, mod.opd_loss_triton = staticmethod(fn), orig_opd
    return (f"  host: loss.backward() -> _OPDLoss.backward entered after {statistics.median(waits):.2f} ms "
            f"(median, max {max(waits):.2f}); {len(gcs)} Python GCs in {2 * n} calls, {sum(gcs) * 1e3:.2f} ms in "
            f"all; wall {statistics.median(walls[True]):.2f} ms with the GC on, "
            f"{statistics.median(walls[False]):.2f} ms off")


def gemm_sweep(V, Hs, dev, out):
    """TFLOP/s of the three GEMMs (and of GEMM 1 with our epilogue) at each chunk size C (rows): which C the GPU
    likes. Output tiles come in waves over the SMs, so a C a little too large for a whole wave can cost more than
    it saves. GEMM 2 is also timed split in two along V (a batched GEMM + a sum): twice the tiles, for when its
    C x H output is too few tiles to fill the GPU. Writes gemm_sweep.csv."""
    import triton.testing
    dt, rows, split_ok = torch.bfloat16, [], None if V % 2 == 0 else False
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"\nGEMMs of one chunk vs its row count C (bf16, V={V}, {sms} SMs), TFLOP/s:")
    print(f"{'H':>5s} {'C':>5s} {'GEMM1 hW^T':>11s} {'GEMM1+epi':>10s} {'GEMM2 xW f32':>13s} "
          f"{'GEMM2 split2':>13s} {'GEMM3 +=x^Th':>13s}")
    for H in Hs:
        g = torch.Generator(device=dev).manual_seed(2)
        w = (torch.randn(V, H, device=dev, generator=g) / math.sqrt(H)).to(dt)
        acc = torch.zeros(V, H, device=dev)
        for C in range(1024, 4097, 256):
            h = torch.randn(C, H, device=dev, generator=g).to(dt)
            x = torch.empty(C, V, device=dev, dtype=dt)
            torch.mm(h, w.t(), out=x)
            x.mul_(1e-3)
            o32 = torch.empty(C, H, device=dev)
            shift = torch.zeros(C, device=dev)  # logits have std 1 here: 2^u stays in range
            part = torch.zeros(2, C, -(-V // fused.EPI_BN_MIN), device=dev)
            calls = [lambda: torch.mm(h, w.t(), out=x),
                     lambda: fused._gemm_epi(h, w, x, shift, part, fused.LOG2E, fused.SUMS, store_e=True),
                     lambda: fused._mm32(x, w, o32)]
            def split2():  # [2, C, V/2] @ [2, V/2, H] -> [2, C, H], summed: split-K by hand
                return torch.bmm(x.view(C, 2, V // 2).transpose(0, 1), w.view(2, V // 2, H),
                                 out_dtype=torch.float32).sum(0)
            if split_ok is None:
                try:
                    split2()
                    split_ok = True
                except (RuntimeError, TypeError, NotImplementedError) as e:  # bmm with out_dtype: newer torch only
                    print(f"  (GEMM2 split2 unavailable: {type(e).__name__})")
                    split_ok = False
            calls.append(split2 if split_ok else None)
            calls.append(lambda: fused._acc_dw(acc, x, h, first=False))
            tf = [2 * C * V * H / triton.testing.do_bench(f, warmup=5, rep=25, return_mode="median") / 1e9
                  if f else float("nan") for f in calls]
            rows.append(dict(H=H, C=C, gemm1=tf[0], gemm1_epi=tf[1], gemm2=tf[2], gemm2_split2=tf[3], gemm3=tf[4]))
            print(f"{H:5d} {C:5d} {tf[0]:11.0f} {tf[1]:10.0f} {tf[2]:13.0f} {tf[3]:13.0f} {tf[4]:13.0f}", flush=True)
        del w, acc
    write_csv(rows, os.path.join(out, "gemm_sweep.csv"))


# ----------------------------------------------------------------------------- main


def main():
    args = parse()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        if not args.tiny:
            fail("no GPU here: run with --tiny (CPU smoke test) or on a CUDA machine")
        if args.diagnose:
            fail("--diagnose times CUDA kernels: run it on a GPU")
        interpret_on_cpu("kernels.bench")
    os.makedirs(args.out, exist_ok=True)
    if args.diagnose:
        return diagnose(151936, (2048, 4096), 16384, dev, args.out, sweeps=False, vs=args.vs and load_vs(args.vs),
                        ab=methods(args, dev))
    V = 1007 if args.tiny else 151936
    Hs = (64,) if args.tiny else (2048, 4096)
    T_main = 64 if args.tiny else 16384
    T_all = (32, 64) if args.tiny else (4096, 16384, 32768, 65536)
    # the error's tokens: at V = 151936, 3 of ours' chunks of 2752 rows, as at T_main (16384: 6 of them), so its fp32
    # dW accumulation across chunks is in the figure, and autotuning (run first, here) picks GEMM tiles on timed shapes
    T_err = 32 if args.tiny else 8192
    dtype = torch.bfloat16
    if dev.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{importlib.import_module('triton').__version__}; fp32-out GEMM for dW: {fused._f32_out_ok(dev)}")
    meths = methods(args, dev)
    rows, ab = [], []
    csv_path = os.path.join(args.out, "bench.csv")
    for H in Hs:
        g = torch.Generator(device=dev).manual_seed(0)
        w = (torch.randn(V, H, device=dev, generator=g) * (2.0 / math.sqrt(H))).to(dtype).requires_grad_()
        errs = grad_errors(meths, w, T_err, g)
        for T in sorted(T_all, key=lambda t: t != T_main):  # the target rows first
            h = torch.randn(T, H, device=dev, generator=g).to(dtype).requires_grad_()
            y, c, opd = loss_inputs(T, V, dev, g)
            for name, (fwd, fb) in meths.items():
                if not (T == T_main or args.full or name in ("cublas_gemm", "ours")):
                    continue
                if name in ("torch", "torch.compile") and T * V * 4 * 3.5 > 0.8 * _free(dev):
                    print(f"{name}: skipped at T={T} (would not fit)")
                    continue
                for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
                    if fn is None:
                        continue
                    def call(fn=fn, h=h, w=w, y=y, c=c, opd=opd):
                        return fn(h, w, y, c, opd)
                    try:
                        t0 = time.perf_counter()
                        ms = time_ms(call, dev, [h, w])
                        first_s = time.perf_counter() - t0
                        mem = peak_gib(call, dev, [h, w])
                    except torch.OutOfMemoryError:
                        print(f"{name} {mode} T={T} H={H}: out of memory")
                        h.grad = w.grad = None
                        torch.cuda.empty_cache()
                        continue
                    except Exception as e:  # a baseline that breaks must not stop the benchmark
                        print(f"{name} {mode} T={T} H={H}: failed: {type(e).__name__}: {e}")
                        h.grad = w.grad = None
                        continue
                    h.grad = w.grad = None
                    flops = 2 * T * V * H * (1 if mode == "fwd" else 3)
                    err = errs.get(name, float("nan")) if mode == "fwd+bwd" else float("nan")
                    rows.append(dict(method=name, mode=mode, T=T, H=H, V=V, ms=ms, tflops=flops / ms / 1e9,
                                     peak_extra_gib=mem, w_gib=w_gib(V, H), grad_rel_err=err, wall_s=first_s))
                    print(f"{name:15s} {mode:8s} T={T:6d} H={H}: {ms:9.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  "
                          f"peak extra {mem:6.2f} GiB  ({first_s:.1f} s)", flush=True)
                    write_csv(rows, csv_path)  # as we go: a run cut short still leaves its numbers
            before = [r for r in rows if r["method"] == "cublas_gemm" and (r["T"], r["H"]) == (T, H)]
            if T == T_main and before:  # the floor again, after the methods: SM clocks drift with heat (the same
                # GEMM kernel ran 11.6 vs 13.0 ms minutes apart on an H100); ratios use the mean of the two
                ms = time_ms(lambda: meths["cublas_gemm"][0](h, w, y, c, opd), dev, [h, w])
                rows.append(dict(before[0], method="cublas_gemm_after", ms=ms, tflops=2 * T * V * H / ms / 1e9))
                write_csv(rows, csv_path)
                try:  # a failure here must not cost the rest of the run
                    ab += interleaved(ab_methods(meths), h, w, y, c, opd, dev)
                    write_csv(ab, os.path.join(args.out, "interleaved.csv"))
                except Exception as e:
                    print(f"interleaved timing failed: {type(e).__name__}: {e}")
                    h.grad = w.grad = None
    report(rows, T_main, args.out, ab)
    if dev.type == "cuda":  # diagnostics, after the table so that a failure or a timeout here costs nothing above
        diagnose(V, Hs, T_main, dev, args.out, vs=args.vs and load_vs(args.vs))


def diagnose(V, Hs, T, dev, out, sweeps=True, vs=None, ab=None):
    """Where ours' time goes, per H at T tokens: the profile of one fwd+bwd call of each path and of vs, and the
    breakdown. ab (methods() of a --diagnose run): first ours' paths against the floor in interleaved rounds, and a
    forward-only profile before each fwd+bwd one. sweeps: the row kernel's launch configs and the GEMMs per chunk
    size too."""
    print(f"\nautotuned: row kernel {tuned(fused._fwd_kernel)}; GEMM 1 + epilogue {tuned(fused._gemm_epi_kernel)}")
    b16 = torch.empty(8, 64, device=dev, dtype=torch.bfloat16)
    epi = fused._epilogue(b16, b16)  # else its profile would be the other path's, its breakdown and sweep would fail
    if not epi:
        print("GEMM 1 + epilogue is off here (it needs TMA: sm_90 / sm_100): the cuBLAS + row-kernel path only")
    paths = [p for p in ("epilogue", "cublas+row") if epi or p != "epilogue"]
    rows = []

    def ab_rounds(H):
        rows.extend(interleaved(ab_methods(ab), *head_inputs(V, H, T, dev, seed=0), dev))
        write_csv(rows, os.path.join(out, "interleaved.csv"))
    fwd_only = (True, False) if ab else (False,)
    diags = []
    for H in Hs:  # the A/B its own entry: if it fails, the profiles still run
        if ab:
            diags.append(lambda H=H: ab_rounds(H))
        diags.append(lambda H=H: ([profile(V, H, T, dev, path=p, fwd_only=f) for p in paths for f in fwd_only],
                                  vs and profile(V, H, T, dev, vs, "vs"), epi and breakdown(V, H, T, dev)))
    if sweeps:
        diags = [lambda: row_kernel_sweep(V, dev)] + diags + ([lambda: gemm_sweep(V, Hs, dev, out)] if epi else [])
    for diag in diags:
        try:
            diag()
        except Exception as e:
            print(f"diagnostic failed: {type(e).__name__}: {e}")


def head_inputs(V, H, T, dev, seed):
    """Random bf16 h [T, H] and W [V, H] (logits of std 2), both requiring grad, then loss_inputs."""
    g = torch.Generator(device=dev).manual_seed(seed)
    w = (torch.randn(V, H, device=dev, generator=g) * (2.0 / math.sqrt(H))).to(torch.bfloat16).requires_grad_()
    h = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16).requires_grad_()
    return (h, w, *loss_inputs(T, V, dev, g))


def ab_methods(meths):
    """Of methods(): ours' paths and the other version (vs), the ones timed in interleaved rounds."""
    return {k: f for k, f in meths.items() if k in {"ours", "vs"} | {f"ours_{p}" for p in PATHS}}


def loss_inputs(T, V, dev, g):
    """Targets, per-token weights c (unused: every method is timed on the OPD loss), the OPD inputs."""
    y = torch.randint(0, V, (T,), device=dev, generator=g)
    c = torch.randn(T, device=dev, generator=g) / T
    ls = -torch.rand(T, device=dev, generator=g)
    lt = ls - 0.3 * torch.rand(T, device=dev, generator=g)
    return y, c, (ls, lt, torch.ones(T, device=dev), 1.0 / T)


def grad_errors(meths, w, T, g):
    """method -> gradient relative error at T tokens against the same OPD loss in fp32 (no TF32), on the same inputs
    for every method."""
    V, H = w.shape
    h = torch.randn(T, H, device=w.device, generator=g).to(w.dtype)
    y, c, opd = loss_inputs(T, V, w.device, g)
    h32, w32 = h.float().requires_grad_(), w.detach().float().requires_grad_()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref.opd_loss_ref(h32, w32, y, *opd)[0].backward()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    truth = (h32.grad, w32.grad)
    del h32, w32
    errs = {}
    for name, (_, fb) in meths.items():
        if fb is None or name == "torch.compile" or name.startswith("ours_C"):
            continue  # compile: the same math as torch (and a minute to recompile); chunks: the same as ours
        try:
            errs[name] = grad_error(fb, h, w, y, c, opd, truth)
            print(f"{name:15s} grad rel err (T={T}, H={H}, same OPD loss for all, vs fp32): {errs[name]:.2e}")
        except Exception as e:
            print(f"{name}: grad error failed: {type(e).__name__}: {e}")
    w.grad = None
    return errs


def w_gib(V, H):
    return V * H * 2 / GIB


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


def _free(dev):
    """Bytes a method can still allocate: the device's free memory plus what PyTorch's allocator holds unused (the
    previous method's cache; without it torch.compile was skipped on an 80 GB card right after naive torch ran)."""
    if dev.type != "cuda":
        return float("inf")
    return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def report(rows, T_main, out, ab=()):
    if not rows:
        raise SystemExit("nothing was measured")
    print(f"\n{'method':15s} {'mode':8s} {'T':>6s} {'H':>5s} {'ms':>9s} {'TFLOP/s':>8s} {'x floor':>8s} "
          f"{'peak GiB':>9s} {'grad err':>9s}")
    floor = {(r["T"], r["H"]): r["ms"] for r in rows if r["method"] == "cublas_gemm"}
    for r in rows:
        if r["method"] == "cublas_gemm_after":  # timed before and after the methods: use the mean
            print(f"floor drift at T={r['T']}, H={r['H']}: one GEMM {floor[r['T'], r['H']]:.2f} ms before the methods, "
                  f"{r['ms']:.2f} ms after")
            floor[r["T"], r["H"]] = (floor[r["T"], r["H"]] + r["ms"]) / 2
    for r in rows:
        f = floor.get((r["T"], r["H"]))
        r["x_floor"] = r["ms"] / (f * (1 if r["mode"] == "fwd" else 3)) if f else float("nan")
        print(f"{r['method']:15s} {r['mode']:8s} {r['T']:6d} {r['H']:5d} {r['ms']:9.2f} {r['tflops']:8.1f} "
              f"{r['x_floor']:8.3f} {r['peak_extra_gib']:9.2f} {r['grad_rel_err']:9.2e}")
    write_csv(rows, os.path.join(out, "bench.csv"))
    print("\nTargets (issue 3)" + (":" if torch.cuda.is_available() else ", not judged here: the CPU interpreter "
                                      "at tiny sizes shows only that every path runs:"))
    alt = {(a["mode"], a["H"], a["floor"]): a for a in ab if a["method"] == "ours"}
    for r in rows:
        if r["method"] != "ours" or r["T"] != T_main:
            continue
        a, a3 = (alt.get((r["mode"], r["H"], f)) for f in ("one GEMM", "3 GEMMs in a row"))
        also = f"; {a['x_floor']:.3f}x [quartiles {a['q1']:.3f}, {a['q3']:.3f}] interleaved with it" if a else ""
        if r["mode"] == "fwd+bwd":
            also += (f"; {a3['x_floor']:.3f}x [{a3['q1']:.3f}, {a3['q3']:.3f}] three GEMMs timed back to back"
                     if a3 else "")
            print(f"  H={r['H']}: fwd+bwd {r['x_floor']:.3f}x the 3-GEMM floor{also} (target <= 1.10)")
            # "1 GiB + the size of W.grad": W.grad is bf16, though ours returns it inside its fp32 accumulator's storage
            verdict = lambda lim: "hit" if r["peak_extra_gib"] <= lim else "miss"
            print(f"  H={r['H']}: peak extra {r['peak_extra_gib']:.2f} GiB; 1 GiB + W.grad = {1 + r['w_gib']:.2f} "
                  f"(bf16 W.grad: {verdict(1 + r['w_gib'])}) / {1 + 2 * r['w_gib']:.2f} (fp32 dW accumulator: "
                  f"{verdict(1 + 2 * r['w_gib'])})")
            print(f"  H={r['H']}: grad rel err {r['grad_rel_err']:.2e} (target <= 5e-3)")
        else:
            print(f"  H={r['H']}: forward-only {r['x_floor']:.3f}x one GEMM{also} (target <= 1.15)")
    for H in sorted({r["H"] for r in rows}):
        pts = sorted((r["T"], r["peak_extra_gib"]) for r in rows
                     if r["method"] == "ours" and r["mode"] == "fwd+bwd" and r["H"] == H)
        print(f"  H={H}: peak extra vs T: " + ", ".join(f"{t}: {m:.2f}" for t, m in pts))
    plot(rows, T_main, out)
    print(f"\nwrote {out}/bench.csv and {out}/bench.png")


def plot(rows, T_main, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    Hs = sorted({r["H"] for r in rows})
    fig, axes = plt.subplots(1, len(Hs) + 1, figsize=(6 * (len(Hs) + 1), 4.5))
    for ax, H in zip(axes, Hs):
        sel = [r for r in rows if r["H"] == H and r["T"] == T_main and r["mode"] == "fwd+bwd"]
        ax.barh([r["method"] for r in sel], [r["ms"] for r in sel], color="tab:blue")
        gemm = [r["ms"] for r in rows if r["H"] == H and r["T"] == T_main and r["method"] == "cublas_gemm"]
        if gemm:
            ax.axvline(3 * gemm[0], color="k", ls="--", label="3-GEMM floor")
            ax.axvline(3.3 * gemm[0], color="tab:red", ls=":", label="target 1.10x")
            ax.legend()
        ax.set_xlabel("ms (fwd+bwd)")
        ax.set_title(f"T={T_main}, H={H}, V={sel[0]['V'] if sel else '?'}, bf16")
    ax = axes[-1]
    for H, color in zip(Hs, ("tab:blue", "tab:orange", "tab:green")):
        pts = sorted((r["T"], r["peak_extra_gib"], r["w_gib"]) for r in rows
                     if r["method"] == "ours" and r["mode"] == "fwd+bwd" and r["H"] == H)
        if pts:  # the target (then linear growth), W.grad read as the fp32 accumulator it is returned in (report())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"ours fwd+bwd, H={H}")
            ax.axhline(1 + 2 * pts[0][2], color=color, ls=":", label=f"1 GiB + fp32 dW (target at T={T_main}), H={H}")
    ax.set_ylim(bottom=0)  # from zero: the curves are near flat, and an axis from their minimum hides that
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("peak extra GiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench.png"), dpi=110)


if __name__ == "__main__":
    main()
