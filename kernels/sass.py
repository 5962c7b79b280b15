"""What the row kernels compile to on an NVIDIA GPU, read without one.

    python -m kernels.sass              # sm_90 (H100 / H200): one line per kernel variant and launch config
    python -m kernels.sass --arch 80    # A100
    python -m kernels.sass --arch 100   # B200 / GB200: tcgen05 (the tensor-memory MMA) in GEMM 1 + epilogue
    python -m kernels.sass --check      # exit 1 unless every variant compiles without spills, every bf16
                                        # hot loop (and the scale-and-cast kernel) moves 16 bytes per load /
                                        # store instruction, and GEMM 1 + epilogue runs on the tensor cores
                                        # (a test runs this)

Triton compiles a kernel for any target without a device (its wheel ships ptxas and cuobjdump). The
arguments are specialised the way the JIT specialises a real launch (16-aligned pointers, V = 151936,
unit strides), so the SASS is what a GPU would run, up to the Triton version installed here.

Why look: the row programs are memory bound only if their hot loop is lean. A logit costs 4 bytes of HBM
traffic in the fused-gradient pass (bf16 in, bf16 out): 0.84e12 logits/s at an H100's 3.35 TB/s,
1.2e12 at an H200's 4.8 TB/s. The SMs issue ~33e12 thread-instructions/s (132 SMs x 4 x 32 lanes x
~1.98 GHz), so the loop has a budget of ~40 (H100) / ~28 (H200) instructions per logit, and a 2-byte
store per logit (8 store instructions where one 16-byte store does) eats it. That happened once: a
`col != y` store mask made every store scalar, at 17 instructions per logit; without it 11, and 9 once
the per-lane running max went. On an H100 that loop then ran at 82-85 % of a plain copy's bandwidth.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch

V = 151936  # Qwen3's vocabulary: divisible by 16, so its row stride keeps 16-byte alignment
H = 4096


def _variants():
    """(name, kernel, dtype, positional args, constexpr kwargs) for each way _head_pass / backward launch."""
    from . import fused

    def fwd(dt, **kw):
        x = torch.empty(8, dtype=dt)  # only dtype and alignment matter to the compiler
        f = torch.empty(8)
        y = torch.empty(8, dtype=torch.long)
        args = (x, V, y, f, f, f, f, f, f, f, f, f, x, H, 1, x, H, 1, H, V, 1.4427, 1.0, 0.5)
        return fused._fwd_kernel, dt, args, dict(EXACT_Y=torch.finfo(dt).bits == 16, BLOCK_H=1024, **kw)

    def bwd(dt, **kw):
        x, f, y = torch.empty(8, dtype=dt), torch.empty(8), torch.empty(8, dtype=torch.long)
        return fused._bwd_kernel, dt, (x, V, y, f, f, f, f, V, 1.4427, 1.0), kw

    return [
        ("opd_loss grad", *fwd(torch.bfloat16, FUSED_GRAD=True, GIVEN_C=False)),
        ("forward only", *fwd(torch.bfloat16, FUSED_GRAD=False, GIVEN_C=False)),
        ("opd_loss redo", *fwd(torch.bfloat16, FUSED_GRAD=True, GIVEN_C=True)),
        ("forward only", *fwd(torch.float16, FUSED_GRAD=False, GIVEN_C=False)),  # fp16's gradient: in backward
        ("opd_loss grad", *fwd(torch.float32, FUSED_GRAD=True, GIVEN_C=False)),
        ("logprobs bwd", *bwd(torch.bfloat16, HAS_ENT=False)),
        ("logprobs+ent bwd", *bwd(torch.bfloat16, HAS_ENT=True)),
    ]


def compile_sass(fn, cfg, args, kw, arch):
    """SASS and resource usage of the @triton.jit kernel fn for one launch config, compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kw = dict(kw, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # the JIT's own binder: the same specialisation (divisibility by 16, unit strides as constants) as a launch
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = triton.knobs.nvidia.cuobjdump.path
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))  # spills land in local memory
    return sass, regs, local


def parse(sass):
    """(address, opcode) of every instruction, and (start, end) of every loop: a branch at end back to start."""
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass)]
    # "BRA 0x510" (sm_90) or "BRA.U UP0, 0x510" (sm_100: the uniform predicate as an operand)
    branches = re.findall(r"/\*([0-9a-f]{4,})\*/[^\n]*BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)", sass)
    return ins, [(int(t, 16), int(a, 16)) for a, t in branches if int(t, 16) < int(a, 16)]


def innermost(ins, loops, want):
    """(start, end) of the shortest loop holding an instruction whose opcode satisfies want, or None."""
    found = [(end - start, start, end) for start, end in loops if any(start <= a <= end and want(op) for a, op in ins)]
    return min(found)[1:] if found else None


def hot_loop(sass):
    """Opcodes of the innermost loop that calls exp2 (a backward branch around MUFU.EX2)."""
    ins, loops = parse(sass)
    loop = innermost(ins, loops, lambda op: op.startswith("MUFU.EX2"))
    return [op for a, op in ins if loop and loop[0] <= a <= loop[1]]


def width(op):
    """Bytes per thread moved by a global load / store opcode (LDG.E.128 -> 16, STG.E.U16 -> 2, LDG.E -> 4)."""
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}.get(op.split(".")[-1], 4)


def loop_stats(sass, per_thread):
    """Instructions per element and bytes per global load / store instruction in the hot loop
    (per_thread: elements each thread handles per trip)."""
    body = hot_loop(sass)
    ld = [width(op) for op in body if op.startswith("LDG")]
    st = [width(op) for op in body if op.startswith("STG")]
    return dict(instr=len(body) / per_thread, ld=sum(ld) / len(ld) if ld else 0, st=sum(st) / len(st) if st else 0,
                mem=dict(Counter(op for op in body if op.startswith(("LDG", "STG")))), found=bool(body))


def resident(regs, warps):
    """Programs resident per SM on sm_80 / sm_90: 64K registers (allocated per warp in 256s), <= 64 warps."""
    per_warp = -(-regs * 32 // 256) * 256
    return max(0, min(65536 // (per_warp * warps), 64 // warps, 32))


BUDGET = 20  # instructions per logit in a bf16 hot loop: an H200 issues ~28 per logit at its HBM rate (docstring)


def report(arch=90, check=False):
    from . import fused
    if fused.INTERPRET:
        sys.exit("kernels.sass compiles for the GPU: unset TRITON_INTERPRET and run it again")
    print(f"row kernels compiled for sm_{arch}, V={V}; hot loop, per logit: instructions (SASS in the loop body / "
          f"logits per thread per trip), bytes per load / store instruction")
    print("(progs/SM: resident programs per SM by registers; KB/SM: the prefetched blocks in flight per SM, which\n"
          " must cover bandwidth x latency, ~25 KB on an H200 at ~0.7 us)")
    print(f"{'variant':<18} {'dtype':<9} {'BLOCK':>5} {'warps':>5} {'regs':>4} {'spill':>5} {'progs/SM':>8} "
          f"{'KB/SM':>5} {'instr':>6} {'ld B':>4} {'st B':>4}  loop loads / stores")
    bad = []
    for name, kernel, dt, args, kw in _variants():
        for cfg in kernel.configs:
            sass, regs, local = compile_sass(kernel.fn, cfg, args, kw, arch)
            st = loop_stats(sass, cfg.kwargs["BLOCK"] // (32 * cfg.num_warps))
            progs = resident(regs, cfg.num_warps)
            kb = progs * cfg.kwargs["BLOCK"] * dt.itemsize / 1024
            print(f"{name:<18} {str(dt)[6:]:<9} {cfg.kwargs['BLOCK']:>5} {cfg.num_warps:>5} {regs:>4} {local:>5} "
                  f"{progs:>8} {kb:>5.0f} {st['instr']:>6.1f} {st['ld']:>4.0f} {st['st']:>4.0f}  {st['mem']}")
            what = f"{name} {str(dt)[6:]} BLOCK={cfg.kwargs['BLOCK']} warps={cfg.num_warps}"
            if not st["found"]:
                bad.append(f"{what}: no hot loop found in the SASS")
            if local:
                bad.append(f"{what}: {local} bytes of spills")
            if dt == torch.bfloat16 and (st["ld"] != 16 or st["st"] not in (0, 16) or st["instr"] > BUDGET):
                bad.append(f"{what}: {st['instr']:.1f} instructions per logit (budget {BUDGET}), loads {st['ld']:.0f} B, "
                           f"stores {st['st']:.0f} B per instruction (want 16)")
    # the scale-and-cast kernel (dW's fp32 -> bf16 conversion, the row scalings): no loop; its data moves in 16 B
    import triton
    f32, b16 = torch.empty(8), torch.empty(8, dtype=torch.bfloat16)
    R, BC = fused.SCALE_TILE
    for name, args, per_row in (("dW fp32 -> bf16 * g", (f32, H, 1, b16, H, 1, f32, 16384, H), False),
                                ("h * alpha (strided)", (b16, H, 1, b16, 2 * H, 1, f32, 2752, H), True)):
        sass, regs, local = compile_sass(fused._scale_cast_kernel, triton.Config({"R": R, "BC": BC}, num_warps=4),
                                         args, dict(PER_ROW=per_row, NARROW=True), arch)
        ops = re.findall(r"\s((?:LDG|STG)\S*)", sass)
        print(f"scale-and-cast {name}: {regs} registers, {local} B spilled, {dict(Counter(ops))}")
        if local or max(width(op) for op in ops if op.startswith("LDG")) != 16 or \
                any(width(op) != 16 for op in ops if op.startswith("STG")):
            bad.append(f"scale-and-cast {name}: spills or loads / stores narrower than 16 B")
    if arch // 10 in EPI_MMA:  # GEMM 1 + epilogue: where fused._epilogue runs it
        bad += gemm_report(arch)
    for b in bad:
        print("FAIL", b)
    if check and bad:
        sys.exit(1)


# The tensor-core instruction GEMM 1 + epilogue must compile to, where fused._epilogue runs it: wgmma on Hopper
# (timed on H100s), tcgen05 (accumulator in tensor memory, read back by LDTM) on datacenter Blackwell (never run)
EPI_MMA = {9: "HGMMA", 10: "UTCHMMA"}

# Epilogue instructions per logit allowed, per mode (SUMS, MAX, DX): at H = 2048 on an H100 the mainloop gives
# each logit ~1 SM clock, in which the SM issues 128 instructions; 12 is ~9 % of that when nothing overlaps it.
EPI_BUDGET = {0: 12, 1: 12, 2: 24}


def gemm_report(arch, M=2752):
    """GEMM 1 with the row pass in its epilogue (fused._gemm_epi_kernel), per mode and tile config: whether the
    mainloop runs on the tensor cores (HGMMA on sm_90, UTCHMMA on sm_100) fed by TMA, what the epilogue costs per logit
    (SASS instructions after the mainloop / logits per thread: the SMs issue 128 per clock, while the mainloop
    takes ~2H / 4096 clocks per logit on an H100, i.e. 1 at H = 2048), and the stores' width. Returns failures."""
    import triton
    from . import fused
    b16, f, y = torch.empty(8, dtype=torch.bfloat16), torch.empty(8), torch.empty(8, dtype=torch.long)
    grad, fwd = dict(EPI=fused.SUMS, STORE_E=True, HAS_ENT=False), dict(EPI=fused.SUMS, STORE_E=False, HAS_ENT=False)
    modes = [("epi: opd grad, SUMS+e", grad), ("epi: fwd only, SUMS", fwd),
             ("epi: redo max, MAX", dict(EPI=fused.MAX, STORE_E=False, HAS_ENT=False)),
             ("epi: lp+ent bwd, DX", dict(EPI=fused.DX, STORE_E=False, HAS_ENT=True))]
    print(f"\nGEMM 1 + epilogue (_gemm_epi_kernel) for sm_{arch}, M={M} rows, H={H}: CTAs/SM by registers and shared "
          f"memory; epilogue instructions per logit (the mainloop costs ~{2 * H / 4096:.0f} SM clock per logit on an "
          f"H100, the epilogue instr / 128)")
    print(f"{'mode':<24} {'BMxBNxBK':>11} {'warps':>5} {'st':>2} {'regs':>4} {'spill':>5} {'CTA/SM':>6} {'MMA op':<26} "
          f"{'epi/logit':>9} {'st B':>4} {'loads':<10}")
    bad = []
    for name, kw in modes:
        for cfg in fused._gemm_configs():
            k = cfg.kwargs
            # a launch's descriptors, with the block shapes _tma_blocks gives them
            hd = fused.TensorDescriptor(torch.empty(16, dtype=torch.bfloat16), [M, H], [H, 1], [k["BM"], k["BK"]])
            wd = fused.TensorDescriptor(torch.empty(16, dtype=torch.bfloat16), [V, H], [H, 1], [k["BN"], k["BK"]])
            args = (hd, wd, b16, V, f, f, 1216, M * 1216, y, f, f, f, M, V, H, 1.4427, 1.0)
            sass, regs, local = compile_sass(fused._gemm_epi_kernel.fn.fn, cfg, args,
                                             dict(kw, F32_DOT=False, EVEN_N=V % k["BN"] == 0), arch)
            ins, loops = parse(sass)
            mma = sorted({op for _, op in ins if op.startswith((*EPI_MMA.values(), "HMMA"))})
            # the mainloop: the shortest loop around an MMA (TMA kernels also branch back from out-of-line barrier
            # waits placed after the last EXIT); the epilogue: from its end to the last EXIT
            main, last = innermost(ins, loops, lambda op: op in mma), max(a for a, op in ins if op == "EXIT")
            epi = [op for a, op in ins if main and main[1] < a <= last and op not in ("NOP", "BRA", "EXIT")]
            per_thread = k["BM"] * k["BN"] / (32 * cfg.num_warps)
            smem = cfg.num_stages * (k["BM"] + k["BN"]) * k["BK"] * 2
            ctas = min(resident(regs, cfg.num_warps), 232448 // smem)
            stw = [width(op) for op in epi if op.startswith("STG")]
            wide = max(stw) if stw else 0
            loads = "TMA" if "UTMALDG" in sass else "cp.async" if "LDGSTS" in sass else "other"
            print(f"{name:<24} {k['BM']:>3}x{k['BN']}x{k['BK']:<3} {cfg.num_warps:>5} {cfg.num_stages:>2} {regs:>4} "
                  f"{local:>5} {ctas:>6} {','.join(mma)[:26]:<26} {len(epi) / per_thread:>9.1f} {wide:>4} {loads:<10}")
            what = f"GEMM epilogue {name} {k['BM']}x{k['BN']}x{k['BK']} warps={cfg.num_warps} stages={cfg.num_stages}"
            if local:
                bad.append(f"{what}: {local} bytes of spills")
            if not any(op.startswith(EPI_MMA[arch // 10]) for op in mma):
                bad.append(f"{what}: the mainloop is not on the tensor cores ({mma or 'no MMA'})")
            if loads != "TMA":
                bad.append(f"{what}: the mainloop loads by {loads}, not TMA")
            if not ctas:
                bad.append(f"{what}: does not fit on an SM")
            budget = EPI_BUDGET[int(kw["EPI"])]
            if len(epi) / per_thread > budget:
                bad.append(f"{what}: {len(epi) / per_thread:.1f} epilogue instructions per logit (budget {budget})")
            if (kw["STORE_E"] or kw["EPI"] == fused.DX) and wide != 16:
                bad.append(f"{what}: x is stored {wide} bytes at a time (want 16)")
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: (print(f"kernels.sass: error: {msg}", file=sys.stderr), sys.exit(2))
    p.add_argument("--arch", type=int, default=90,
                   help="compute capability x 10: 80 (A100), 90 (H100/H200), 100 (B200)")
    p.add_argument("--check", action="store_true", help="exit 1 on spills or narrow bf16 loads/stores")
    a = p.parse_args()
    if a.arch < 75:
        p.error(f"--arch {a.arch}: Triton's NVIDIA backend needs sm_75 or newer")
    report(a.arch, a.check)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    main()
