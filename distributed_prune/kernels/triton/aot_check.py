"""Compile every Triton kernel ahead of time for a GPU target, without a GPU.

    TRITON_INTERPRET=0 python -m distributed_prune.kernels.triton.aot_check [--arch 90] [--quick]

The interpreter (used by the CPU tests) accepts code the real compiler rejects; this lowers each
kernel variant (dtype, layout, grouped or tl.dot path) through Triton's compiler to PTX with the
launch configurations used on GPU, assembles the PTX with the ptxas that ships with Triton and
reports, per variant, registers per thread, spill stores/loads (bytes) and whether the dot path
uses tensor cores.  Exit status 1 if any variant fails.  Needs no driver; must run with
TRITON_INTERPRET unset or 0.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _variants(quick: bool):
    from . import filter_norms as fn
    from . import masked_conv as mc

    dtypes = ("bf16",) if quick else ("bf16", "fp16", "fp32")
    for dt in dtypes:
        p = f"*{dt}"
        for mode in ((0, 2) if quick else (0, 1, 2)):
            yield (f"filter_norms {dt} mode={mode}", fn._filter_norms_kernel,
                   dict(w_table_ptr="*i64", g_table_ptr="*i64", w0_ptr=p, g0_ptr=p,
                        row_tid_ptr="*i32", row_off_ptr="*i64", row_len_ptr="*i32",
                        out_ptr="*fp32"),
                   dict(MODE=mode, BLOCK_R=16, BLOCK_C=256), 4, 2)
        base = dict(KH=3, KW=3, DOT_FP32=False, PRECISION="tf32", IDX64=False)
        torch_dt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dt]
        import torch
        # a ResNet-50 3x3 layer (64 -> 64 channels, 56x56, batch 32) at half the filters kept
        P, M, KC = 32 * 56 * 56, 32, 64
        for grouped in (False, True):
            conf = mc._Conf(grouped, getattr(torch, torch_dt))
            conf.interp = False                       # GPU block sizes
            blocks, warps, stages = conf.fwd(P, M, KC)
            yield (f"fwd {dt} grouped={grouped}", mc._fwd_kernel,
                   dict(x_ptr=p, w_ptr=p, b_ptr=p, out_idx_ptr="*i32", in_idx_ptr="*i32",
                        y_ptr=p),
                   dict(base, HAS_IN_IDX=not grouped, HAS_BIAS=True, GROUPED=grouped, **blocks),
                   warps, stages)
            blocks, warps, stages = conf.wgrad(P, M, KC)
            yield (f"wgrad {dt} grouped={grouped}", mc._wgrad_kernel,
                   dict(x_ptr=p, g_ptr=p, out_idx_ptr="*i32", in_idx_ptr="*i32", dw_ptr="*fp32"),
                   dict(base, HAS_IN_IDX=not grouped, GROUPED=grouped, **blocks), warps, stages)
            blocks, warps, stages = conf.dgrad(P, KC, M)
            yield (f"dgrad {dt} grouped={grouped}", mc._dgrad_kernel,
                   dict(g_ptr=p, w_ptr=p, out_idx_ptr="*i32", in_idx_ptr="*i32",
                        act_ptr="*i8", dx_ptr=p),
                   dict(base, HAS_IN_IDX=not grouped, GROUPED=grouped, **blocks), warps, stages)


def _ptxas() -> str | None:
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.is_file() else None


def _resources(ptx: str, arch: int) -> str:
    """'regs=N spill_st=B spill_ld=B' from ``ptxas -v`` (empty if no ptxas ships with Triton)."""
    ptxas = _ptxas()
    if ptxas is None:
        return "regs=? (no ptxas)"
    m = re.search(r"\.target\s+(sm_\w+)", ptx)
    sm = m.group(1) if m else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, f"-arch={sm}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    st = re.search(r"(\d+) bytes spill stores", text)
    ld = re.search(r"(\d+) bytes spill loads", text)
    if regs is None:
        return f"regs=? ({text.strip()[:200]})"
    return (f"regs={regs.group(1)} spill_st={st.group(1) if st else 0}B "
            f"spill_ld={ld.group(1) if ld else 0}B")


def consts_text(consts: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("B"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90 = H100)")
    ap.add_argument("--quick", action="store_true", help="one variant per kernel path")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (kernels must be real JIT functions)",
              file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, ptr_types, consts, warps, stages in _variants(args.quick):
        signature = {name: ("constexpr" if name in consts else ptr_types.get(name, "i32"))
                     for name in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=consts),
                                      target=target,
                                      options=dict(num_warps=warps, num_stages=stages))
            ptx = compiled.asm.get("ptx", "")
            tc = "mma" in ptx
            print(f"ok    {label:<28} shared={compiled.metadata.shared:>6}B tensor_cores={tc} "
                  f"{_resources(ptx, args.arch)}  {consts_text(consts)}", flush=True)
        except Exception as e:  # report every variant, fail at the end
            failed += 1
            print(f"FAIL  {label}: {type(e).__name__}: {str(e)[:800]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
