"""Compile every Triton kernel ahead of time for a GPU target, without a GPU.

    TRITON_INTERPRET=0 python -m distributed_prune.kernels.triton.aot_check [--arch 90] [--quick]

The interpreter (used by the CPU tests) accepts code the real compiler rejects; this lowers each
kernel variant (dtype, layout, grouped or tl.dot path) through Triton's compiler to PTX with the
launch configurations used on GPU, and reports whether the dot path uses tensor cores.  Exit
status 1 if any variant fails.  Needs no driver; must run with TRITON_INTERPRET unset or 0.
"""
from __future__ import annotations

import argparse
import os
import sys


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
        base = dict(KH=3, KW=3, DOT_FP32=False, PRECISION="tf32")
        for grouped in (False, True):
            conf = mc._Conf(grouped)
            conf.interp = False                       # GPU block sizes
            layouts = (True,) if quick else (False, True)
            for cl in layouts:
                blocks, warps, stages = conf.fwd(10_000, 64, 576)
                yield (f"fwd {dt} grouped={grouped} cl={cl}", mc._fwd_kernel,
                       dict(x_ptr=p, w_ptr=p, b_ptr=p, out_idx_ptr="*i32", in_idx_ptr="*i32",
                            y_ptr=p),
                       dict(base, CL=cl, HAS_IN_IDX=not grouped, HAS_BIAS=True,
                            GROUPED=grouped, **blocks), warps, stages)
                blocks, warps, stages = conf.wgrad(10_000, 64, 576)
                yield (f"wgrad {dt} grouped={grouped} cl={cl}", mc._wgrad_kernel,
                       dict(x_ptr=p, g_ptr=p, out_idx_ptr="*i32", in_idx_ptr="*i32",
                            dw_ptr="*fp32"),
                       dict(base, CL=cl, HAS_IN_IDX=not grouped, GROUPED=grouped, **blocks),
                       warps, stages)
                blocks, warps, stages = conf.dgrad(10_000, 64, 576)
                yield (f"dgrad {dt} grouped={grouped} cl={cl}", mc._dgrad_kernel,
                       dict(g_ptr=p, w_ptr=p, out_idx_ptr="*i32", in_idx_ptr="*i32",
                            act_ptr="*i8", dx_ptr=p),
                       dict(base, CL=cl and not grouped, HAS_IN_IDX=not grouped,
                            GROUPED=grouped, **blocks), warps, stages)


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
            print(f"ok    {label:<36} shared={compiled.metadata.shared:>6}B tensor_cores={tc}")
        except Exception as e:  # report every variant, fail at the end
            failed += 1
            print(f"FAIL  {label}: {type(e).__name__}: {str(e)[:800]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
