"""Masked 2-D convolution that only computes active channels (Triton, implicit GEMM).

(Over 400 lines on purpose: the forward, weight-grad and input-grad kernels share one gather
and one tile-size rule and must change together.)

Forward: gather the active filters (rows of ``weight`` where ``out_mask != 0``; and, for groups=1,
the active input channels where ``in_mask != 0``) into a compact weight ``Wc`` of shape
(M_act, C_act, KH, KW), run an implicit-GEMM convolution over the active channels only
(GEMM of shape [N*OH*OW, C_act*KH*KW] x [C_act*KH*KW, M_act], im2col done on the fly from
the strided input, so NCHW and channels_last both work) and store the result straight into the
active channels of a zero output.  Cost is proportional to M_act * C_act.

Backward runs over the same compact set: grad-input is an implicit transposed convolution
(reduction over M_act*KH*KW), grad-weight an implicit GEMM reduced over the N*OH*OW positions
(split over programs on GPU); masked filter rows get zero gradient.

Grouped convolutions (groups > 1, depthwise included) use a broadcast-multiply-reduce tile
instead of ``tl.dot`` because the input channel depends on the output channel's group; there
``in_mask`` zeroes the gathered weights rather than shrinking the reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_enabled


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, out_idx_ptr, in_idx_ptr, y_ptr,
                H, W, OH, OW, P, M, KC, CG, OG,
                sxn, sxc, sxh, sxw, swm, swc, swh, sww, syn, syc, syh, syw,
                SH, SW, PH, PW, DH, DW,
                KH: tl.constexpr, KW: tl.constexpr,
                HAS_IN_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
                BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Tile: BP output positions (n, oh, ow) x BN active output channels.  Reduction order:
    # (kh, kw) outer, channels inner, so the spatial address math ([BP] vectors) is done once
    # per filter tap and the inner loop only adds a channel offset to a row base.
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_p = pid_p * BP + tl.arange(0, BP)
    p_ok = offs_p < P
    nb = offs_p // (OH * OW)
    r = offs_p % (OH * OW)
    oh = r // OW
    ow = r % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    # int32 offsets unless a tensor has 2^31 elements or more (IDX64): 64-bit offsets for a
    # [BP, BK] tile double the registers of the address tensors and made the kernel spill
    if IDX64:
        x_row = nb.to(tl.int64) * sxn                                  # [BP]
    else:
        x_row = nb * sxn
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < M
    co = tl.load(out_idx_ptr + offs_n, mask=n_ok, other=0)            # original channel ids
    w_row = offs_n * swm                                               # [BN] (weights are small)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for t in range(0, KH * KW):
        kh = t // KW
        kw = t % KW
        ih = ih0 + kh * DH
        iw = iw0 + kw * DW
        sp_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)   # [BP]
        x_base = x_row + ih * sxh + iw * sxw                          # [BP]
        w_base = w_row + kh * swh + kw * sww                          # [BN]
        for c0 in range(0, KC, BK):
            offs_c = c0 + tl.arange(0, BK)
            c_ok = offs_c < KC
            b = tl.load(w_ptr + w_base[None, :] + offs_c[:, None] * swc,
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)   # [BK, BN]
            if GROUPED:
                # input channel = group(co) * CG + c: depends on both c and n -> [BP, BK, BN]
                ci = (co // OG)[None, :] * CG + offs_c[:, None]          # [BK, BN]
                a = tl.load(x_ptr + x_base[:, None, None] + ci[None, :, :] * sxc,
                            mask=sp_ok[:, None, None] & c_ok[None, :, None] & n_ok[None, None, :],
                            other=0.0)
                acc += tl.sum(a.to(tl.float32) * b.to(tl.float32)[None, :, :], axis=1)
            else:
                if HAS_IN_IDX:
                    ci = tl.load(in_idx_ptr + offs_c, mask=c_ok, other=0)
                else:
                    ci = offs_c
                a = tl.load(x_ptr + x_base[:, None] + ci[None, :] * sxc,
                            mask=sp_ok[:, None] & c_ok[None, :], other=0.0)   # [BP, BK]
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
                else:
                    acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # Scatter into the active channels of the (zero-initialised) output.
    if IDX64:
        y_off = (nb.to(tl.int64) * syn + oh * syh + ow * syw)[:, None] + co[None, :] * syc
    else:
        y_off = (nb * syn + oh * syh + ow * syw)[:, None] + co[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _wgrad_kernel(x_ptr, g_ptr, out_idx_ptr, in_idx_ptr, dw_ptr,
                  H, W, OH, OW, P, P_PER_SPLIT, M, KC, CG, OG, N_CT,
                  sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                  SH, SW, PH, PW, DH, DW,
                  KH: tl.constexpr, KW: tl.constexpr,
                  HAS_IN_IDX: tl.constexpr, GROUPED: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr, IDX64: tl.constexpr,
                  BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # dWc[n, t, c] = sum_p grad_y[p, co(n)] * x[p shifted by tap t, ci(c)].  One program owns
    # one filter tap t = (kh, kw), BK channel slots and BN filters, and loops over its slice of
    # the P = N*OH*OW positions; partial sums go to dw[split] (fp32), layout (M, KH*KW, KC).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    t = pid_k // N_CT
    kh = t // KW
    kw = t % KW
    offs_c = (pid_k % N_CT) * BK + tl.arange(0, BK)
    c_ok = offs_c < KC
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < M
    co = tl.load(out_idx_ptr + offs_n, mask=n_ok, other=0)
    if GROUPED:
        cig = (co // OG)[None, :] * CG + offs_c[:, None]               # [BK, BN]
        x_ch = cig * sxc
    else:
        if HAS_IN_IDX:
            ci = tl.load(in_idx_ptr + offs_c, mask=c_ok, other=0)
        else:
            ci = offs_c
        x_ch = ci * sxc                                                # [BK]
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    p_begin = pid_s * P_PER_SPLIT
    p_end = tl.minimum(p_begin + P_PER_SPLIT, P)
    for p0 in range(p_begin, p_end, BP):
        offs_p = p0 + tl.arange(0, BP)
        p_ok = offs_p < p_end
        nb = offs_p // (OH * OW)
        r = offs_p % (OH * OW)
        oh = r // OW
        ow = r % OW
        if IDX64:
            nb = nb.to(tl.int64)
        g = tl.load(g_ptr + (nb * sgn + oh * sgh + ow * sgw)[:, None] + co[None, :] * sgc,
                    mask=p_ok[:, None] & n_ok[None, :], other=0.0)     # [BP, BN]
        ih = oh * SH - PH + kh * DH                                    # [BP]
        iw = ow * SW - PW + kw * DW
        sp_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_sp = nb * sxn + ih * sxh + iw * sxw                          # [BP]
        if GROUPED:
            a = tl.load(x_ptr + x_sp[:, None, None] + x_ch[None, :, :],
                        mask=sp_ok[:, None, None] & c_ok[None, :, None] & n_ok[None, None, :],
                        other=0.0)
            acc += tl.sum(a.to(tl.float32) * g.to(tl.float32)[:, None, :], axis=0)
        else:
            a = tl.load(x_ptr + x_sp[:, None] + x_ch[None, :],
                        mask=sp_ok[:, None] & c_ok[None, :], other=0.0)  # [BP, BK]
            at = tl.trans(a)                                           # [BK, BP]
            if DOT_FP32:
                acc += tl.dot(at.to(tl.float32), g.to(tl.float32))
            else:
                acc += tl.dot(at, g, input_precision=PRECISION)
    K = KH * KW * KC
    dw_off = (pid_s.to(tl.int64) * M * K + offs_n[None, :].to(tl.int64) * K + t * KC
              + offs_c[:, None])
    tl.store(dw_ptr + dw_off, acc, mask=c_ok[:, None] & n_ok[None, :])


@triton.jit
def _dgrad_kernel(g_ptr, w_ptr, out_idx_ptr, in_idx_ptr, act_ptr, dx_ptr,
                  H, W, OH, OW, Q, MJ, NC, CG, OG,
                  sgn, sgc, sgh, sgw, swm, swc, swh, sww, sxn, sxc, sxh, sxw,
                  SH, SW, PH, PW, DH, DW,
                  KH: tl.constexpr, KW: tl.constexpr,
                  HAS_IN_IDX: tl.constexpr, GROUPED: tl.constexpr, DOT_FP32: tl.constexpr,
                  PRECISION: tl.constexpr, IDX64: tl.constexpr,
                  BQ: tl.constexpr, BC: tl.constexpr, BJ: tl.constexpr):
    # dx[n, ci, ih, iw] = sum_{kh, kw, m} grad_y[n, co(m), oh, ow] * Wc[m, c, kh, kw] with
    # oh = (ih + PH - kh*DH) / SH when that divides exactly and is in range (transposed conv).
    # Tile: BQ input positions x BC input channels; (kh, kw) outer so the output-position math
    # is per tap, the inner loop runs over MJ filter slots (all active filters; grouped: the
    # filters of one group, with inactive ones skipped through act).
    pid_q = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    q_ok = offs_q < Q
    nb = offs_q // (H * W)
    r = offs_q % (H * W)
    ih = r // W
    iw = r % W
    if IDX64:
        g_row = nb.to(tl.int64) * sgn
    else:
        g_row = nb * sgn
    offs_c = pid_c * BC + tl.arange(0, BC)
    c_ok = offs_c < NC
    acc = tl.zeros((BQ, BC), dtype=tl.float32)
    for t in range(0, KH * KW):
        kh = t // KW
        kw = t % KW
        oh_n = ih + PH - kh * DH                                      # [BQ]
        ow_n = iw + PW - kw * DW
        v = (q_ok & (oh_n >= 0) & (ow_n >= 0) & (oh_n % SH == 0) & (ow_n % SW == 0)
             & (oh_n < OH * SH) & (ow_n < OW * SW))
        g_base = g_row + (oh_n // SH) * sgh + (ow_n // SW) * sgw       # [BQ]
        w_tap = kh * swh + kw * sww
        for m0 in range(0, MJ, BJ):
            offs_m = m0 + tl.arange(0, BJ)
            m_ok = offs_m < MJ
            if GROUPED:
                co = (offs_c // CG)[None, :] * OG + offs_m[:, None]   # [BJ, BC]
                act = tl.load(act_ptr + co, mask=m_ok[:, None] & c_ok[None, :], other=0)
                wok = m_ok[:, None] & c_ok[None, :] & (act != 0)
                b = tl.load(w_ptr + co * swm + (offs_c % CG)[None, :] * swc + w_tap,
                            mask=wok, other=0.0)
                a = tl.load(g_ptr + g_base[:, None, None] + co[None, :, :] * sgc,
                            mask=v[:, None, None] & wok[None, :, :], other=0.0)
                acc += tl.sum(a.to(tl.float32) * b.to(tl.float32)[None, :, :], axis=1)
            else:
                co = tl.load(out_idx_ptr + offs_m, mask=m_ok, other=0)
                a = tl.load(g_ptr + g_base[:, None] + co[None, :] * sgc,
                            mask=v[:, None] & m_ok[None, :], other=0.0)   # [BQ, BJ]
                b = tl.load(w_ptr + (offs_m * swm + w_tap)[:, None] + offs_c[None, :] * swc,
                            mask=m_ok[:, None] & c_ok[None, :], other=0.0)  # [BJ, BC]
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
                else:
                    acc += tl.dot(a, b, input_precision=PRECISION)
    if HAS_IN_IDX:
        ci = tl.load(in_idx_ptr + offs_c, mask=c_ok, other=0)
    else:
        ci = offs_c
    if IDX64:
        dx_off = (nb.to(tl.int64) * sxn + ih * sxh + iw * sxw)[:, None] + ci[None, :] * sxc
    else:
        dx_off = (nb * sxn + ih * sxh + iw * sxw)[:, None] + ci[None, :] * sxc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _precision(dtype: torch.dtype) -> str:
    # Match what cuDNN does for the dense reference: TF32 for fp32 when allowed.
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _is_cl(t: torch.Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


class _Conf:
    """Block sizes chosen per shape.  Interpreter: large tiles (its cost is per program and per
    loop step).  GPU: tensor-core tiles sized to the problem (a tile never much larger than the
    active filter count or the channel count, so small or very sparse layers waste no lanes),
    K tiles twice as wide for 16-bit operands; broadcast tiles (grouped) kept small for
    registers."""

    def __init__(self, grouped: bool, dtype: torch.dtype = torch.bfloat16):
        self.interp = interpreter_enabled()
        self.grouped = grouped
        self.wide = dtype != torch.float32

    def _interp(self, a, b, c):
        hi = (64, 32, 32) if self.grouped else (128, 64, 64)
        return (_p2(a, 16, hi[0]), _p2(b, 16, hi[1]), _p2(c, 16, hi[2])), 4, 1

    def fwd(self, P, M, KC):
        if self.interp:
            (bp, bn, bk), w, st = self._interp(P, M, KC)
        elif self.grouped:
            (bp, bn, bk), w, st = (16, 16, 16), 4, 1
        else:
            # 128 x 32 output tiles on 8 warps: the largest that ptxas fits in 255 registers
            # without spilling on sm_90 (aot_check); 64-wide N tiles spilled.
            bn = _p2(M, 16, 32)
            bk = _p2(KC, 16, 64 if self.wide else 32)
            bp = 128 if P >= 4096 else 64
            w, st = (8 if bp == 128 else 4), 3
        return dict(BP=bp, BN=bn, BK=bk), w, st

    def wgrad(self, P, M, KC):
        if self.interp:
            (bp, bn, bk), w, st = self._interp(P, M, KC)
        elif self.grouped:
            (bp, bn, bk), w, st = (32, 16, 16), 4, 1
        else:
            bn = 64 if M > 32 else _p2(M, 16, 32)
            bk = _p2(KC, 16, 64)
            bp = 64 if self.wide else 32
            w, st = 4, 3
        return dict(BP=bp, BN=bn, BK=bk), w, st

    def dgrad(self, Q, NC, MJ):
        if self.interp:
            (bq, bc, bj), w, st = self._interp(Q, NC, MJ)
        elif self.grouped:
            (bq, bc, bj), w, st = (16, 16, 16), 4, 1
        else:
            bc = _p2(NC, 16, 64)
            bj = _p2(MJ, 16, 32)
            bq = 128 if Q >= 4096 else 64
            w, st = (8 if bq == 128 else 4), 3
        return dict(BQ=bq, BC=bc, BJ=bj), w, st


def _idx64(*ts: torch.Tensor) -> bool:
    """Whether element offsets into these tensors may exceed int32 (storage span >= 2^31)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2 ** 31 - 1
               for t in ts)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _active(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask != 0).view(-1)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

class _MaskedConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups,
                out_index, in_index, on_error=None):
        N, C, H, W = x.shape
        O, CG, KH, KW = weight.shape
        if C != CG * groups or O % groups:
            raise RuntimeError(f"masked_conv2d: weight {tuple(weight.shape)} does not fit input "
                               f"channels {C} with groups={groups}")
        (SH, SW), (PH, PW), (DH, DW) = stride, padding, dilation
        OH, OW = _out_size(H, KH, SH, PH, DH), _out_size(W, KW, SW, PW, DW)
        if OH <= 0 or OW <= 0:
            raise RuntimeError(f"masked_conv2d: output size {OH}x{OW} is too small")
        grouped = groups != 1
        cl = _is_cl(x)
        fmt = torch.channels_last if cl else torch.contiguous_format

        out_idx = (out_index if out_index is not None else _active(out_mask)).to(x.device)
        M = out_idx.numel()
        out_scale = out_mask.index_select(0, out_idx).to(weight.dtype)
        wc = weight.index_select(0, out_idx) * out_scale.view(-1, 1, 1, 1)   # (M, CG, KH, KW)
        in_idx = None
        in_scale = None
        if in_mask is not None and not grouped:
            in_idx = (in_index if in_index is not None else _active(in_mask)).to(x.device)
            in_scale = in_mask.index_select(0, in_idx).to(weight.dtype)
            wc = wc.index_select(1, in_idx) * in_scale.view(1, -1, 1, 1)     # (M, C_act, KH, KW)
        elif in_mask is not None:
            # grouped: zero the inactive input channels of each gathered filter's group
            im = in_mask.to(weight.dtype).view(groups, CG)
            in_scale = im.index_select(0, out_idx // (O // groups))          # (M, CG)
            wc = wc * in_scale.view(M, CG, 1, 1)
        wc = wc.contiguous(memory_format=fmt)
        KC = wc.shape[1]
        K = KC * KH * KW
        bc = bias.index_select(0, out_idx) * out_scale if bias is not None else None
        out_idx32 = out_idx.to(torch.int32)
        in_idx32 = in_idx.to(torch.int32) if in_idx is not None else None

        y = torch.empty((N, O, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        P = N * OH * OW
        conf = _Conf(grouped, x.dtype)
        if M > 0 and P > 0:
            blocks, warps, stages = conf.fwd(P, M, KC)
            grid = (triton.cdiv(P, blocks["BP"]), triton.cdiv(M, blocks["BN"]))
            _fwd_kernel[grid](
                x, wc, bc if bc is not None else wc, out_idx32,
                in_idx32 if in_idx32 is not None else out_idx32, y,
                H, W, OH, OW, P, M, KC, CG, O // groups,
                *x.stride(), *wc.stride(), *y.stride(),
                SH, SW, PH, PW, DH, DW,
                KH=KH, KW=KW, HAS_IN_IDX=in_idx is not None, HAS_BIAS=bc is not None,
                GROUPED=grouped, DOT_FP32=conf.interp and x.dtype == torch.bfloat16,
                PRECISION=_precision(x.dtype), IDX64=_idx64(x, y), num_warps=warps, num_stages=stages, **blocks)
        ctx.save_for_backward(x, wc, out_idx, in_idx, out_scale, in_scale)
        ctx.geom = (stride, padding, dilation, groups, weight.shape, bias is not None, cl)
        ctx.on_error = on_error
        return y

    @staticmethod
    def backward(ctx, gy):
        x, wc, out_idx, in_idx, out_scale, in_scale = ctx.saved_tensors
        stride, padding, dilation, groups, wshape, has_bias, cl = ctx.geom
        N, C, H, W = x.shape
        O, CG, KH, KW = wshape
        M, KC = wc.shape[0], wc.shape[1]
        grouped = groups != 1
        fmt = torch.channels_last if cl else torch.contiguous_format
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = gb = None
        try:
            gx, dwc = _backward_kernels(ctx, gy, x, wc, out_idx, in_idx, need_x, need_w)
        except Exception as e:
            if ctx.on_error is None or isinstance(e, (ValueError, TypeError)):
                raise
            ctx.on_error(e)
            gx, dwc = _backward_fallback(ctx, gy, x, wc, out_idx, in_idx, need_x, need_w)
        if need_w:
            gw = torch.zeros(wshape, dtype=wc.dtype, device=wc.device)
            if dwc is not None:
                # chain rule through Wc = W[out_idx][:, in_idx] * out_scale * in_scale
                dwc = dwc * out_scale.float().view(-1, 1, 1, 1)
                if in_scale is not None:
                    if grouped:
                        dwc = dwc * in_scale.float().view(M, CG, 1, 1)
                    else:
                        dwc = dwc * in_scale.float().view(1, -1, 1, 1)
                        rows = torch.zeros((M, C, KH, KW), dtype=torch.float32, device=x.device)
                        rows.index_copy_(1, in_idx, dwc)
                        dwc = rows
                gw.index_copy_(0, out_idx, dwc.to(gw.dtype))
        if need_x and gx is None:
            gx = torch.zeros_like(x, memory_format=fmt)
        if has_bias and ctx.needs_input_grad[2]:
            gb = torch.zeros(O, dtype=wc.dtype, device=x.device)
            if M > 0:
                gsum = gy.index_select(1, out_idx).sum(dim=(0, 2, 3), dtype=torch.float32)
                gb.index_copy_(0, out_idx, (gsum * out_scale.float()).to(gb.dtype))
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


def _backward_kernels(ctx, gy, x, wc, out_idx, in_idx, need_x, need_w):
    """(grad x or None, grad of the compact weight (M, KC, KH, KW) fp32 or None) by Triton."""
    stride, padding, dilation, groups, wshape, has_bias, cl = ctx.geom
    (SH, SW), (PH, PW), (DH, DW) = stride, padding, dilation
    N, C, H, W = x.shape
    O, CG, KH, KW = wshape
    OG = O // groups
    OH, OW = gy.shape[2], gy.shape[3]
    M, KC = wc.shape[0], wc.shape[1]
    grouped = groups != 1
    conf = _Conf(grouped, x.dtype)
    dot_fp32 = conf.interp and x.dtype == torch.bfloat16
    prec = _precision(x.dtype)
    out_idx32 = out_idx.to(torch.int32)
    in_idx32 = in_idx.to(torch.int32) if in_idx is not None else out_idx32
    fmt = torch.channels_last if cl else torch.contiguous_format
    gx = dwc = None
    if need_x:
        Q = N * H * W
        if M == 0 or Q == 0:
            gx = torch.zeros_like(x, memory_format=fmt)
        elif grouped:
            # Full (O, CG, KH, KW) weight with inactive filters zero, plus an activity flag per
            # filter so the kernel skips their loads.
            w_full = torch.zeros(wshape, dtype=wc.dtype, device=wc.device)
            w_full.index_copy_(0, out_idx, wc.contiguous())
            act = torch.zeros(O, dtype=torch.int8, device=x.device)
            act[out_idx] = 1
            gx = torch.empty_like(x, memory_format=fmt)
            blocks, warps, stages = conf.dgrad(Q, C, OG)
            grid = (triton.cdiv(Q, blocks["BQ"]), triton.cdiv(C, blocks["BC"]))
            _dgrad_kernel[grid](
                gy, w_full, out_idx32, in_idx32, act, gx,
                H, W, OH, OW, Q, OG, C, CG, OG,
                *gy.stride(), *w_full.stride(), *gx.stride(),
                SH, SW, PH, PW, DH, DW,
                KH=KH, KW=KW, HAS_IN_IDX=False, GROUPED=True,
                DOT_FP32=dot_fp32, PRECISION=prec, IDX64=_idx64(x, gy), num_warps=warps, num_stages=stages, **blocks)
        else:
            # inactive input channels (in_mask) keep a zero gradient
            gx = (torch.zeros_like(x, memory_format=fmt) if in_idx is not None
                  else torch.empty_like(x, memory_format=fmt))
            blocks, warps, stages = conf.dgrad(Q, KC, M)
            grid = (triton.cdiv(Q, blocks["BQ"]), triton.cdiv(KC, blocks["BC"]))
            if KC > 0:
                _dgrad_kernel[grid](
                    gy, wc, out_idx32, in_idx32, out_idx32, gx,
                    H, W, OH, OW, Q, M, KC, CG, OG,
                    *gy.stride(), *wc.stride(), *gx.stride(),
                    SH, SW, PH, PW, DH, DW,
                    KH=KH, KW=KW, HAS_IN_IDX=in_idx is not None, GROUPED=False,
                    DOT_FP32=dot_fp32, PRECISION=prec, IDX64=_idx64(x, gy), num_warps=warps,
                    num_stages=stages, **blocks)
    if need_w:
        P = N * OH * OW
        K = KC * KH * KW
        if M > 0 and K > 0 and P > 0:
            blocks, warps, stages = conf.wgrad(P, M, KC)
            n_ct = triton.cdiv(KC, blocks["BK"])
            programs = triton.cdiv(M, blocks["BN"]) * n_ct * KH * KW
            split = 1
            if not conf.interp:
                # Enough programs to fill the GPU; each keeps >= 8 steps of BP positions.
                split = max(1, min(2 * _sm_count(x.device) // max(programs, 1),
                                   triton.cdiv(P, 8 * blocks["BP"])))
            per_split = triton.cdiv(triton.cdiv(P, split), blocks["BP"]) * blocks["BP"]
            split = triton.cdiv(P, per_split)
            dw = torch.empty((split, M, K), dtype=torch.float32, device=x.device)
            grid = (triton.cdiv(M, blocks["BN"]), n_ct * KH * KW, split)
            _wgrad_kernel[grid](
                x, gy, out_idx32, in_idx32, dw,
                H, W, OH, OW, P, per_split, M, KC, CG, OG, n_ct,
                *x.stride(), *gy.stride(),
                SH, SW, PH, PW, DH, DW,
                KH=KH, KW=KW, HAS_IN_IDX=in_idx is not None, GROUPED=grouped,
                DOT_FP32=dot_fp32, PRECISION=prec, IDX64=_idx64(x, gy), num_warps=warps, num_stages=stages,
                **blocks)
            dwc = dw.sum(0) if split > 1 else dw[0]                          # (M, K) fp32
            dwc = dwc.view(M, KH, KW, KC).permute(0, 3, 1, 2)                # (M, KC, KH, KW)
        else:
            dwc = torch.zeros((M, KC, KH, KW), dtype=torch.float32, device=x.device)
    return gx, dwc


def _backward_fallback(ctx, gy, x, wc, out_idx, in_idx, need_x, need_w):
    """Same results as :func:`_backward_kernels` with PyTorch convolutions (used once a Triton
    backward kernel failed to compile or launch in auto mode)."""
    stride, padding, dilation, groups, wshape, has_bias, cl = ctx.geom
    O = wshape[0]
    xs = x.index_select(1, in_idx) if in_idx is not None else x
    w_full = torch.zeros((O,) + tuple(wc.shape[1:]), dtype=wc.dtype, device=wc.device)
    w_full.index_copy_(0, out_idx, wc)
    with torch.enable_grad():
        xs = xs.detach().requires_grad_(need_x)
        w_full = w_full.detach().requires_grad_(need_w)
        y = torch.nn.functional.conv2d(xs, w_full, None, stride, padding, dilation, groups)
        inputs = [t for t, n in ((xs, need_x), (w_full, need_w)) if n]
        grads = list(torch.autograd.grad(y, inputs, gy))
    gx = dwc = None
    if need_x:
        g = grads.pop(0)
        if in_idx is not None:
            gx = torch.zeros_like(x)
            gx.index_copy_(1, in_idx, g)
        else:
            gx = g
        if cl:
            gx = gx.contiguous(memory_format=torch.channels_last)
    if need_w:
        dwc = grads.pop(0).index_select(0, out_idx).float()
    return gx, dwc


def masked_conv2d(x, weight, bias, out_mask, stride, padding, dilation, groups, in_mask=None,
                  out_index=None, in_index=None, on_error=None):
    """Triton backend of :func:`distributed_prune.kernels.masked_conv2d` (4-D input; stride,
    padding, dilation as int pairs).  ``on_error`` (auto mode): when a backward kernel fails to
    compile or launch, ``on_error(exception)`` is called (the dispatcher demotes the backend)
    and the gradient is computed with PyTorch instead; None: the error propagates."""
    return _MaskedConv2dFn.apply(x, weight, bias, out_mask, in_mask, tuple(stride),
                                 tuple(padding), tuple(dilation), int(groups), out_index, in_index,
                                 on_error)
