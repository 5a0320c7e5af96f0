"""One typed config: YAML file + dotted ``key=value`` overrides, validated by pydantic.

Unknown keys, wrong types and bad values (ratio spec, LR schedule, model name, NaN/inf, a
``model.kwargs`` argument the model factory does not take) are a :class:`UserError` naming the
dotted key; nothing is created before the config validates. Config files must be UTF-8 YAML
with no repeated key; aliases may expand a document to at most :data:`MAX_EXPANDED_NODES`
values (a few nested anchors could otherwise stand for billions). Errors name file and line.
The resolved config is saved as ``config.yaml`` in every run directory.

Over 400 lines on purpose: every section of the config is declared here, with its defaults and
validators, so that one file answers "which keys exist and what do they accept".

    dprune config show configs/debug_cpu.yaml retrain.epochs=3 prune.ratios="[0,0.5,0.5,0.5,0]"

Over 400 lines on purpose: every section of the schema with its validators, the one place a
user reads to learn what a key accepts (the YAML loader itself lives in yamlfile.py).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .yamlfile import (MAX_CONFIG_BYTES, MAX_EXPANDED_NODES, StrictYAMLError, dump_yaml,  # noqa: F401 (re-exported)
                       read_yaml_file, yaml_load)


class _Section(BaseModel):
    # allow_inf_nan=False: every float of the config means a finite number (".nan" / ".inf" in
    # YAML would otherwise pass validation and surface epochs later as a NaN loss).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_schedule(v):
    from .train.schedules import parse_schedule

    return parse_schedule(str(v)).text


def _check_ratios(v):
    from .prune.ratios import parse

    bad = _non_finite(v, "prune.ratios")
    if bad:  # a YAML list with .nan / .inf: say so (the parser would only say it cannot read it)
        raise ValueError(f"{bad}: must be a finite number")
    return parse(v).text


def _check_path(v, key: str, empty_ok: bool = True):
    if v is None and empty_ok:
        return v
    if not empty_ok and (v is None or isinstance(v, str) and not v.strip()):
        raise ValueError(f"must not be empty (it would put the run into the current directory); "
                         f"give a directory like {key}=runs/my_run")
    if not isinstance(v, str):
        raise ValueError(f"expected a path (a string), got {v!r}")
    if "\0" in v:
        raise ValueError("a path cannot contain a NUL character")
    return v


def _non_finite(value, key: str):
    """The dotted key of the first NaN/inf float inside ``value`` (nested dicts/lists), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        bad = _non_finite(v, f"{key}.{k}")
        if bad:
            return bad
    return None


# Seeds are added to (seed + epoch, seed + 7919 * rank, ...) before they reach torch and numpy
# generators, which take 64-bit integers; 32 bits leaves room for every offset.
MAX_SEED = 2**32 - 1


class OutputCfg(_Section):
    dir: str = "runs/default"
    keep_checkpoints: int = Field(2, ge=1)   # per stage; older epoch checkpoints are deleted
    verbose: bool = True                     # per-epoch / pruned / done lines on stdout
    # per-epoch scalars (every metrics.jsonl value) and the config in <dir>/tensorboard, from
    # rank 0; needs the tensorboard extra (pip install 'distributed_prune[tensorboard]')
    tensorboard: bool = False

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, v):
        return _check_path(v, "output.dir", empty_ok=False)


class ModelCfg(_Section):
    name: str = "resnet56"
    num_classes: Optional[int] = Field(None, ge=1)  # default: from the dataset
    kwargs: dict = {}                         # extra factory arguments (e.g. in_features)
    activation: Literal["relu", "linear"] = "relu"  # gain used by OrthP
    # torchvision's pretrained weights by name (IMAGENET1K_V1, DEFAULT, ...), from the torch.hub
    # cache ($TORCH_HOME), downloaded once when missing; the base model instead of pretraining
    # when pretrain.epochs is 0 (or the start of pretraining / fine-tuning otherwise)
    weights: Optional[str] = None
    # with weights: num_classes may differ from the weights' classes; the classifier head is
    # then replaced by a freshly initialised one (every other layer keeps its pretrained weights)
    new_head: bool = False

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        from .models import list_models

        if v not in list_models():
            raise ValueError(f"unknown model {v!r} (see `dprune models`)")
        return v

    @model_validator(mode="after")
    def _kwargs(self):
        # checked here, against the factory's signature, so a typo is refused before any run
        # directory exists (and before every point of a sweep starts)
        from .models import check_kwargs

        bad = _non_finite(self.kwargs, "model.kwargs")
        if bad:
            raise ValueError(f"{bad}: must be a finite number")
        check_kwargs(self.name, self.kwargs)
        return self

    @model_validator(mode="after")
    def _weights(self):
        if self.weights is not None:
            from .models.pretrained import resolve

            try:
                resolve(self.name, self.weights)
            except UserError as e:
                raise ValueError(str(e)) from None
        elif self.new_head:
            raise ValueError("model.new_head: needs model.weights (a pretrained model to put it on)")
        return self


class DataCfg(_Section):
    name: Literal["digits", "synthetic", "cifar10", "cifar100", "mnist", "imagenet", "imagefolder"] = "digits"
    format: Literal["torchvision", "ffcv"] = "torchvision"
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    input_size: Optional[int] = Field(None, ge=1)
    flatten: Optional[bool] = None            # default: True for MLPs
    batch_size: int = Field(128, ge=1)        # per optimizer step, global (split over ranks)
    val_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    synthetic_train: int = Field(1024, ge=1)
    synthetic_val: int = Field(256, ge=1)
    # FFCV options
    ffcv_pipeline: Optional[Literal["imagenet", "cifar", "digits"]] = None
    os_cache: Optional[bool] = None
    res_start: Optional[int] = Field(None, ge=1)   # progressive resizing (FFCV)
    res_end: Optional[int] = Field(None, ge=1)
    res_start_epoch: int = Field(0, ge=0)
    res_end_epoch: int = Field(0, ge=0)

    @field_validator("train_path", "val_path", mode="before")
    @classmethod
    def _paths(cls, v, info):
        return _check_path(v, f"data.{info.field_name}")


class StageCfg(_Section):
    epochs: int = Field(0, ge=0)
    lr_schedule: str = "0:0.1"
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"

    _sched = field_validator("lr_schedule", mode="before")(classmethod(lambda cls, v: _check_schedule(v)))


class PretrainCfg(StageCfg):
    checkpoint: Optional[str] = None          # load this base model instead of pretraining
    # K1 for Scratch-E/B: the epochs that trained the checkpoint's base model, when the checkpoint
    # does not record them (bases written by `dprune run` do; torchvision weight files do not)
    base_epochs: Optional[float] = Field(None, ge=0)

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _ckpt(cls, v):
        _check_path(v, "pretrain.checkpoint")
        if v is not None:
            try:  # "{seed}" is filled in per run (one base per seed); no other placeholder is
                v.format(seed=0)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"only {{seed}} may appear in braces ({type(e).__name__}: {e})") from None
        return v


class RetrainCfg(StageCfg):
    epochs: int = Field(0, ge=0)
    lr_schedule: str = "0:0.01"
    scratch_budget: Literal["none", "E", "B"] = "none"  # with reinit=scratch: Scratch-E / Scratch-B epochs


class RegCfg(_Section):
    """GReg / TPP settings; defaults are the authors' (docs/science.md section 10 names them)."""
    granularity: float = Field(1e-4, gt=0)            # reg_granularity_prune
    ceiling: float = Field(1.0, gt=0)                 # reg_upper_limit
    update_interval: int = Field(5, ge=1)             # update_reg_interval (iterations)
    stabilize_interval: int = Field(40000, ge=0)      # stabilize_reg_interval (iterations)
    lw_opp: float = Field(1000.0, ge=0)               # TPP Gram-loss weight
    lw_opp_schedule: Literal["reg", "constant"] = "reg"  # TPP: weight lw_opp * reg (authors) or lw_opp
    zero_out_interval: int = Field(100, ge=0)         # TPP layer-wise zeroing in stabilization (0: off)
    weight_reg: bool = True                           # TPP: L2 on the pruned filters' weight and bias
    bn_reg: Optional[bool] = None                     # L2 on the following BN (default: TPP yes, GReg no)
    mag_ratio_limit: Optional[float] = Field(1000.0, gt=0)  # GReg: stop growing at this kept/pruned ratio


class MaskedCfg(_Section):
    """Masked phases (prune.method=gradual|soft): see distributed_prune/prune/masked.py."""
    schedule: Literal["cubic", "linear"] = "cubic"  # gradual: ramp of the pruned count
    update_interval: int = Field(100, ge=1)   # gradual: iterations between mask updates
    ramp_fraction: float = Field(0.75, gt=0, le=1)  # gradual: target reached at this phase fraction
    criterion: Literal["l1", "l2"] = "l1"     # importance recomputed at every update
    kernel: Literal["auto", "masked_conv", "hooks"] = "auto"  # auto: masked-conv kernels on CUDA
    # gradual: compact (train the cut model of the current masks, re-cut at each update) or
    # masked (the full model with masks, `kernel`); auto: compact on the ddp engine, else masked
    execution: Literal["auto", "compact", "masked"] = "auto"


class PruneCfg(_Section):
    # the rows of prune.methods.METHODS (spelled out so loading a config needs no torch;
    # tests/unit/test_method_table.py keeps the two equal)
    method: Literal["l1", "l2", "random", "bn_scale", "taylor", "greg", "tpp", "gradual", "soft",
                    "none"] = "l1"
    ratios: str = "0"
    pick: Literal["smallest", "largest", "random"] = "smallest"
    round_to: Optional[int] = Field(None, ge=1)
    skip: list[str] = []
    reinit: Literal["none", "orthp", "scratch"] = "none"
    taylor_batches: int = Field(4, ge=1)
    iterative_steps: int = Field(1, ge=1)     # prune/retrain cycles reaching the ratio geometrically
    iterative_epochs: int = Field(0, ge=0)    # retrain epochs between intermediate steps
    epochs: int = Field(0, ge=0)              # greg/tpp (a cap: the phase ends when done) / gradual / soft phase, in epochs
    lr_schedule: str = "0:0.001"              # that phase's LR (default: the authors' lr_prune 0.001)
    reg: RegCfg = RegCfg()
    masked: MaskedCfg = MaskedCfg()

    _ratios = field_validator("ratios", mode="before")(classmethod(lambda cls, v: _check_ratios(v)))

    @field_validator("lr_schedule", mode="before")
    @classmethod
    def _s(cls, v):
        return "0:0.001" if v is None else _check_schedule(v)


class PxFyCfg(_Section):
    """Prune at epoch ``prune_at`` of ONE overall schedule of ``total_epochs`` ("PxFy",
    docs/science.md section 4): pretrain uses epochs [0, x) of ``lr_schedule``; retrain continues
    it for the rest."""
    total_epochs: int = Field(0, ge=0)
    prune_at: int = Field(0, ge=0)
    lr_schedule: Optional[str] = None

    @field_validator("lr_schedule", mode="before")
    @classmethod
    def _s(cls, v):
        return None if v is None else _check_schedule(v)


def _deepspeed_precision(path) -> str | None:
    """The precision a DeepSpeed JSON enables (bf16 / fp16 / none), None when unreadable (the
    engine then reports the file)."""
    import json

    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(ds, dict):
        return None
    for key in ("bf16", "fp16"):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") is True:
            return key
    return "none"


class TrainCfg(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto" (default): see train.engine.fast_path. Resolved while the config validates, so the resolved
    # config (config.yaml of a run, `dprune config show`) records what actually runs.
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: Union[bool, Literal["auto"]] = "auto"
    compile: bool = False
    grad_accum: int = Field(1, ge=1)
    progress: bool = True
    cudnn_benchmark: bool = True
    deterministic: bool = False

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto(cls, data):
        if isinstance(data, dict) and "auto" in (data.get("amp", "auto"), data.get("channels_last", "auto")):
            from .train.engine import fast_path

            fast = fast_path(data.get("device", "auto"))
            data = {**data, **{k: fast[k] for k in ("amp", "channels_last") if data.get(k, "auto") == "auto"}}
        return data


class DistCfg(_Section):
    engine: Literal["ddp", "deepspeed"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    sync_bn: bool = False
    deepspeed_config: Optional[str] = None

    @field_validator("deepspeed_config", mode="before")
    @classmethod
    def _ds(cls, v):
        return _check_path(v, "dist.deepspeed_config")
    bucket_cap_mb: int = Field(25, ge=1)
    # "auto": on unless train.compile or train.grad_accum > 1 (see train.engine.resolve_static_graph)
    static_graph: Union[bool, Literal["auto"]] = "auto"


class TrainabilityCfg(_Section):
    jsv: bool = True
    every_epoch: bool = False
    samples: int = Field(32, ge=1)
    method: Literal["auto", "exact", "randomized"] = "auto"


class Config(_Section):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    name: Optional[str] = None                # label used by reports (default: method + schedule)
    resume: Union[bool, Literal["auto"]] = "auto"
    output: OutputCfg = OutputCfg()
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    pretrain: PretrainCfg = PretrainCfg()
    prune: PruneCfg = PruneCfg()
    retrain: RetrainCfg = RetrainCfg()
    pxfy: PxFyCfg = PxFyCfg()
    train: TrainCfg = Field(default_factory=TrainCfg)   # a factory: "auto" resolves at load, not import
    dist: DistCfg = DistCfg()
    trainability: TrainabilityCfg = TrainabilityCfg()

    @model_validator(mode="before")
    @classmethod
    def _deepspeed_amp(cls, data):
        """``train.amp: auto`` with a DeepSpeed JSON follows the JSON's precision (one precision
        for training and evaluation; the engine rejects a contradiction)."""
        if not isinstance(data, dict):
            return data
        train, dist_ = data.get("train"), data.get("dist")
        if not isinstance(dist_, dict) or dist_.get("engine") != "deepspeed" or not dist_.get("deepspeed_config"):
            return data
        train = train if isinstance(train, dict) else ({} if train is None else None)
        if train is None or train.get("amp", "auto") != "auto":
            return data
        prec = _deepspeed_precision(dist_["deepspeed_config"])
        return data if prec is None else {**data, "train": {**train, "amp": prec}}

    @model_validator(mode="after")
    def _pxfy(self):
        if self.model.weights is not None and self.pretrain.checkpoint:
            raise ValueError("model.weights and pretrain.checkpoint both give the base model: keep one")
        if self.pxfy.total_epochs:
            if not self.pxfy.lr_schedule:
                raise ValueError("pxfy.lr_schedule is required with pxfy.total_epochs")
            if not 0 <= self.pxfy.prune_at <= self.pxfy.total_epochs:
                raise ValueError("pxfy.prune_at must lie in [0, pxfy.total_epochs]")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        m = self.prune.method + ("+orthp" if self.prune.reinit == "orthp" else "")
        if self.prune.reinit == "scratch":
            m = "scratch"
        return f"{m} {self.effective_retrain()[1]}"

    def effective_pretrain(self) -> tuple[int, str]:
        """(epochs, schedule text) of the pretraining stage, PxFy applied: the first x epochs of
        the overall schedule laid over all T epochs (a cosine anneals over the whole run)."""
        if self.pxfy.total_epochs:
            from .train.schedules import parse_schedule

            s = parse_schedule(self.pxfy.lr_schedule).over(self.pxfy.total_epochs)
            return self.pxfy.prune_at, s.text
        return self.pretrain.epochs, self.pretrain.lr_schedule

    def effective_retrain(self) -> tuple[int, str]:
        """(epochs, schedule text) of the retraining stage, PxFy applied."""
        if self.pxfy.total_epochs:
            from .train.schedules import parse_schedule

            s = parse_schedule(self.pxfy.lr_schedule).offset(self.pxfy.prune_at)
            return self.pxfy.total_epochs - self.pxfy.prune_at, s.text
        return self.retrain.epochs, self.retrain.lr_schedule


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _set(d: dict, dotted: str, value, what: str = "config"):
    keys = dotted.split(".")
    for i, k in enumerate(keys[:-1]):
        nxt = d.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise UserError(f"{what}: {'.'.join(keys[:i + 1])} is not a section (it holds {nxt!r})")
        d = nxt
    d[keys[-1]] = value


def _prefixed(msg: str) -> str:
    return msg if msg.startswith("config") else f"config: {msg}"


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"config: unknown key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    if not key:  # a check across sections (its message names the keys)
        return _prefixed(msg)
    msg = msg.removeprefix(f"{key}: ")
    named = re.match(r"[a-z_]+(\.[a-z_]+)+\b", msg)
    if named and (key == "config" or named.group(0).startswith(key + ".")):
        return f"config: {msg}"  # a section-level check whose message names its own key(s)
    if msg.startswith(f"{key}."):  # the validator named a key inside this one (prune.ratios.1)
        return f"config: {msg}"
    inp = err.get("input")
    shown = (f" (got {inp!r})" if not isinstance(inp, dict) and inp is not None and len(repr(inp)) < 80
             and repr(inp) not in msg else "")
    return f"config: {key}: {msg}{shown}"


def parse_override(ov: str) -> tuple[str, object]:
    """``key=value`` -> (dotted key, YAML value; the raw text when it is not YAML, None when empty)."""
    key, eq, raw = ov.partition("=")
    key = key.strip()
    if not eq:
        raise UserError(f"override {ov!r}: expected key=value")
    if not _KEY.fullmatch(key):
        raise UserError(f"override {ov!r}: expected a dotted config key before '=' like retrain.epochs=3"
                        + (" (the key is empty)" if not key else ""))
    if raw == "":
        return key, None
    try:
        return key, yaml_load(raw)
    except StrictYAMLError as e:  # duplicate keys or an alias bomb inside the value
        raise UserError(f"override {key}: {e.problem}") from None
    except yaml.YAMLError:  # not YAML: the text itself (e.g. "a: b" stays a string)
        return key, raw


def read_config_file(path: str | Path) -> dict:
    """The YAML mapping of config file ``path`` (unvalidated); bad files are one UserError."""
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: top level must be a mapping of config keys, "
                        f"got a {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set every ``key=value`` of ``overrides`` in the nested dict ``data`` (in place); returns it."""
    for ov in overrides:
        key, value = parse_override(ov)
        _set(data, key, value, what=f"override {ov!r}")
    return data


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML ``path`` (or defaults), apply ``key=value`` overrides, validate."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides))


def from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(e)) from None
    except UserError as e:  # raised outside pydantic's wrapping (it turns ValueErrors into the above)
        raise UserError(_prefixed(str(e))) from None


def to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def dump(cfg: Config) -> str:
    return dump_yaml(to_dict(cfg))


def cli_show(args) -> int:
    print(dump(load(args.config, args.overrides)), end="")
    return 0
