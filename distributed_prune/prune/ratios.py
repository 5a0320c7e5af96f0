"""Layer-wise pruning ratios in the three formats of docs/science.md section 4.

Every spec resolves to an explicit ``{layer_name: ratio}`` table over the model's conv/linear
layers (in ``named_modules`` order, which is also the layer index used by range specs):

1. stage list ``[stem, stage1, ..., stageK, fc]`` for ResNets, e.g. ``[0,0.7,0.7,0.7,0]``;
   only block-inner convs (whose output channels are not tied to a residual sum) get the stage
   ratio; the stem entry applies to stem convs that are not tied to a residual sum either;
2. index ranges ``[1-15:0.5]`` or ``[0-5:0.8,6:0]`` over the conv/linear layer index;
3. glob patterns on module names, later patterns win: ``*layer*.conv1:0.9``;
4. (convenience) a bare number ``0.5``: the paper's default layer rule (residual nets: block-inner
   convs; chains: every conv/linear layer but the first and the output layer).

``skip`` patterns force ratio 0 afterwards.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch.nn as nn

from ..errors import UserError

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All conv/linear layers in module order; the position is the layer index of range specs."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def _ratio(text: str, spec: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise UserError(f"prune.ratios: cannot read ratio {text!r} in {spec!r}") from None
    if not 0.0 <= r < 1.0:
        raise UserError(f"prune.ratios: ratio {r} in {spec!r} is outside [0, 1)")
    return r


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (glob patterns may contain ``[1-3]``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


@dataclass
class RatioSpec:
    """A parsed spec: ``kind`` in {"uniform", "stages", "ranges", "globs"} and its entries."""

    kind: str
    entries: list
    text: str


def parse(spec) -> RatioSpec:
    """Parse a ratio spec (string, number or list as YAML may give it); raises UserError."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        spec = "[" + ",".join(str(s) for s in spec) + "]"
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"prune.ratios: empty or invalid ratio spec {spec!r}")
    text = spec.strip().replace(" ", "")
    if re.fullmatch(_NUM, text):
        return RatioSpec("uniform", [_ratio(text, spec)], text)
    if text.startswith("[") and text.endswith("]") and "[" not in text[1:-1]:
        items = [s for s in text[1:-1].split(",")]
        if any(not s for s in items):
            raise UserError(f"prune.ratios: empty entry in {spec!r}")
        if all(re.fullmatch(_NUM, s) for s in items):
            return RatioSpec("stages", [_ratio(s, spec) for s in items], text)
        ranges = []
        for s in items:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?:(" + _NUM + ")", s)
            if not m:
                raise UserError(f"prune.ratios: cannot parse entry {s!r} of {spec!r} "
                                "(expected 'i:r' or 'i-j:r')")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise UserError(f"prune.ratios: range {s!r} in {spec!r} is reversed")
            ranges.append((lo, hi, _ratio(m.group(3), spec)))
        return RatioSpec("ranges", ranges, text)
    globs = []
    for item in _split_top(text):
        if ":" not in item:
            raise UserError(f"prune.ratios: cannot parse {item!r} in {spec!r} (expected 'pattern:ratio')")
        pat, r = item.rsplit(":", 1)
        if not pat:
            raise UserError(f"prune.ratios: empty pattern in {spec!r}")
        globs.append((pat, _ratio(r, spec)))
    return RatioSpec("globs", globs, text)


def _stage_of(name: str) -> int | None:
    m = re.match(r"(?:.*\.)?layer(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def resolve(model: nn.Module, spec, *, uncoupled: set[str], output_layer: str,
            skip: tuple[str, ...] | list[str] = ()) -> dict[str, float]:
    """Resolve ``spec`` to ``{layer_name: ratio}`` for every conv/linear layer of ``model``.

    ``uncoupled``: layers whose output channels are not tied to another layer's (block-inner
    convs); ``output_layer``: the classifier, never pruned.
    """
    rs = parse(spec)
    layers = [n for n, _ in prunable_layers(model)]
    table = {n: 0.0 for n in layers}
    if rs.kind == "uniform":
        residual = any(_stage_of(n) for n in layers)
        for i, n in enumerate(layers):
            if n == output_layer:
                continue
            if residual:
                if _stage_of(n) is not None and n in uncoupled:
                    table[n] = rs.entries[0]
            elif i > 0:
                table[n] = rs.entries[0]
    elif rs.kind == "stages":
        stages = sorted({s for s in map(_stage_of, layers) if s is not None})
        if not stages:
            raise UserError(f"prune.ratios: stage list {rs.text!r} needs a model with "
                            "layer1..layerK stages (use index ranges or patterns instead)")
        if len(rs.entries) != len(stages) + 2:
            raise UserError(f"prune.ratios: stage list {rs.text!r} has {len(rs.entries)} entries; "
                            f"this model needs {len(stages) + 2} ([stem, layer1..layer{stages[-1]}, fc])")
        seen_stage = False
        for n in layers:
            s = _stage_of(n)
            if s is not None:
                seen_stage = True
                r = rs.entries[stages.index(s) + 1]
            else:
                r = rs.entries[-1] if seen_stage else rs.entries[0]
            if n != output_layer and n in uncoupled:
                table[n] = r
            elif r > 0 and n == output_layer:
                raise UserError(f"prune.ratios: the output layer {n!r} cannot be pruned "
                                f"(last entry of {rs.text!r} must be 0)")
    elif rs.kind == "ranges":
        for lo, hi, r in rs.entries:
            if hi >= len(layers):
                raise UserError(f"prune.ratios: layer index {hi} in {rs.text!r} is out of range "
                                f"(the model has {len(layers)} conv/linear layers, 0-{len(layers) - 1})")
            for i in range(lo, hi + 1):
                table[layers[i]] = r
    else:
        for pat, r in rs.entries:
            hits = [n for n in layers if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise UserError(f"prune.ratios: pattern {pat!r} matches no conv/linear layer")
            for n in hits:
                table[n] = r
    for pat in skip:
        hits = [n for n in layers if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise UserError(f"prune.skip: pattern {pat!r} matches no conv/linear layer")
        for n in hits:
            table[n] = 0.0
    if table.get(output_layer, 0.0) > 0:
        raise UserError(f"prune.ratios: the output layer {output_layer!r} cannot be pruned "
                        f"(its outputs are the classes)")
    return table


def n_pruned(ratio: float, n: int, round_to: int | None = None) -> int:
    """Channels to remove from ``n``: min(ceil(ratio*n), n-1), then keep a multiple of round_to."""
    if ratio <= 0:
        return 0
    k = min(-int(-(ratio * n - 1e-9) // 1), n - 1)
    if round_to and round_to > 1:
        keep = n - k
        keep = min(n, -(-keep // round_to) * round_to)
        k = n - keep
    return k
