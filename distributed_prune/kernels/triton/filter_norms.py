"""Filter importance for many tensors in ONE Triton launch (segmented row reduction).

A row table describes every output channel (filter) of every tensor: which tensor (an index into
a table of base addresses), the row's element offset and its length.  ResNet-50's 53 convs
(~26.5k filters, lengths 147 ... 4608) are one grid of ``ceil(rows / BLOCK_R)`` programs instead
of ~150 small PyTorch launches, and the weights are read in place (no concatenated copy) when
they share a dtype; mixed dtypes are first packed into one fp32 buffer.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

MODE_L1_MEAN, MODE_L2, MODE_TAYLOR = 0, 1, 2


@triton.jit
def _filter_norms_kernel(w_table_ptr, g_table_ptr, w0_ptr, g0_ptr, row_tid_ptr, row_off_ptr,
                         row_len_ptr, out_ptr, n_rows,
                         MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program reduces BLOCK_R rows (filters) with a [BLOCK_R, BLOCK_C] tile; rows of a tile
    # may belong to different tensors, so each row has its own base address and length.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    tid = tl.load(row_tid_ptr + rows, mask=row_ok, other=0)            # int32 [BLOCK_R]
    start = tl.load(row_off_ptr + rows, mask=row_ok, other=0)          # int64 [BLOCK_R]
    length = tl.load(row_len_ptr + rows, mask=row_ok, other=0)         # int32 [BLOCK_R]
    # int64 addresses -> typed pointers (w0_ptr / g0_ptr only carry the element type)
    w_base = tl.load(w_table_ptr + tid, mask=row_ok, other=0).to(w0_ptr.dtype) + start
    if MODE == 2:
        g_base = tl.load(g_table_ptr + tid, mask=row_ok, other=0).to(g0_ptr.dtype) + start
    max_len = tl.max(length, axis=0)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, max_len, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols[None, :] < length[:, None])
        w = tl.load(w_base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if MODE == 0:
            acc += tl.abs(w)
        elif MODE == 1:
            acc += w * w
        else:
            g = tl.load(g_base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += w * g
    s = tl.sum(acc, axis=1)
    if MODE == 0:
        s = s / tl.maximum(length, 1).to(tl.float32)
    elif MODE == 1:
        s = tl.sqrt(s)
    else:
        s = tl.abs(s)
    tl.store(out_ptr + rows, s, mask=row_ok)


def _rows_dense(t: torch.Tensor) -> bool:
    """Filter r occupies elements [r*L, (r+1)*L) of the storage (in some order): contiguous, or
    channels_last (memory order O, H, W, I).  Any order inside a row is fine for a reduction."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _row_len(shape) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


@lru_cache(maxsize=64)
def _row_table(shapes: tuple, packed: bool, device: torch.device):
    """(tensor id int32, element offset int64, length int32) per row, and rows per tensor.
    ``packed``: every tensor lives in one buffer (tensor id 0, offsets accumulate)."""
    tids, offs, lens, counts, base = [], [], [], [], 0
    for i, shape in enumerate(shapes):
        n, length = shape[0], _row_len(shape)
        tids.append(torch.full((n,), 0 if packed else i, dtype=torch.int32))
        offs.append(torch.arange(n, dtype=torch.int64) * length + (base if packed else 0))
        lens.append(torch.full((n,), length, dtype=torch.int32))
        counts.append(n)
        base += n * length
    return (torch.cat(tids).to(device), torch.cat(offs).to(device), torch.cat(lens).to(device),
            tuple(counts))


_ptr_tables: OrderedDict = OrderedDict()


def _ptr_table(tensors, device: torch.device) -> torch.Tensor:
    """Device int64 table of base addresses; cached, since weights rarely move between calls."""
    key = (device, tuple(t.data_ptr() for t in tensors))
    table = _ptr_tables.get(key)
    if table is None:
        table = torch.tensor(key[1], dtype=torch.int64).to(device)
        _ptr_tables[key] = table
        if len(_ptr_tables) > 16:
            _ptr_tables.popitem(last=False)
    return table


def _sources(weights, grads):
    """Tensors the kernel reads (kept alive by the caller for the launch) and whether packed."""
    dtypes = {w.dtype for w in weights}
    gdtypes = {g.dtype for g in grads} if grads is not None else set()
    if len(dtypes) == 1 and len(gdtypes) <= 1:
        ws = [w if _rows_dense(w) else w.contiguous() for w in weights]
        gs = [g if _rows_dense(g) else g.contiguous() for g in grads] if grads is not None else None
        return ws, gs, False
    # mixed dtypes: one fp32 buffer (rows keep their order inside it)
    def pack(ts):
        return [torch.cat([t.contiguous().view(-1).float() for t in ts])]
    return pack(weights), pack(grads) if grads is not None else None, True


def _blocks(n_rows: int, max_len: int) -> tuple[int, int, int]:
    if interpreter_enabled():
        # The interpreter pays per program and per loop step: few, large tiles.
        return (min(triton.next_power_of_2(max(n_rows, 1)), 128),
                min(triton.next_power_of_2(max(max_len, 1)), 1024), 4)
    # GPU: 16 rows x 256 columns = 4096 elements per step, 32 per thread with 4 warps.
    return 16, min(256, triton.next_power_of_2(max(max_len, 16))), 4


def launch(w_table, g_table, w0, g0, row_tid, row_off, row_len, out, n_rows, mode, max_len):
    """Single kernel launch over every row of every tensor (the only launch site)."""
    block_r, block_c, warps = _blocks(n_rows, max_len)
    grid = (triton.cdiv(n_rows, block_r),)
    _filter_norms_kernel[grid](w_table, g_table, w0, g0, row_tid, row_off, row_len, out, n_rows,
                               MODE=mode, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)


def filter_norms(weights, p: int, grads=None) -> list[torch.Tensor]:
    """Triton backend of :func:`distributed_prune.kernels.filter_norms` (one launch)."""
    device = weights[0].device
    with torch.no_grad():
        ws, gs, packed = _sources(weights, grads)       # under no_grad: no detach needed
        shapes = tuple(tuple(w.shape) if w.dim() > 0 else (1,) for w in weights)
        row_tid, row_off, row_len, counts = _row_table(shapes, packed, device)
        n_rows = sum(counts)
        out = torch.empty(n_rows, dtype=torch.float32, device=device)
        if n_rows:
            w_table = _ptr_table(ws, device)
            g_table = _ptr_table(gs, device) if gs is not None else w_table
            mode = MODE_TAYLOR if grads is not None else (MODE_L1_MEAN if p == 1 else MODE_L2)
            max_len = max(_row_len(s) for s in shapes)
            launch(w_table, g_table, ws[0], gs[0] if gs is not None else ws[0], row_tid, row_off,
                   row_len, out, n_rows, mode, max_len)
    return list(out.split(counts))
