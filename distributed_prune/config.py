"""One typed config: YAML file + dotted ``key=value`` overrides, validated by pydantic.

Unknown keys, wrong types and bad values (ratio spec, LR schedule, model name) are a
:class:`UserError` naming the dotted key; nothing is created before the config validates.
The resolved config is saved as ``config.yaml`` in every run directory.

Over 400 lines on purpose: every section of the config is declared here, with its defaults and
validators, so that one file answers "which keys exist and what do they accept".

    dprune config show configs/debug_cpu.yaml retrain.epochs=3 prune.ratios="[0,0.5,0.5,0.5,0]"
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_schedule(v):
    from .train.schedules import parse_schedule

    return parse_schedule(str(v)).text


def _check_ratios(v):
    from .prune.ratios import parse

    return parse(v).text


class OutputCfg(_Section):
    dir: str = "runs/default"
    keep_checkpoints: int = Field(2, ge=1)   # per stage; older epoch checkpoints are deleted
    verbose: bool = True                     # per-epoch / pruned / done lines on stdout
    # per-epoch scalars (every metrics.jsonl value) and the config in <dir>/tensorboard, from
    # rank 0; needs the tensorboard extra (pip install 'distributed_prune[tensorboard]')
    tensorboard: bool = False


class ModelCfg(_Section):
    name: str = "resnet56"
    num_classes: Optional[int] = None        # default: from the dataset
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
    input_size: Optional[int] = None
    flatten: Optional[bool] = None            # default: True for MLPs
    batch_size: int = Field(128, ge=1)        # per optimizer step, global (split over ranks)
    val_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    synthetic_train: int = Field(1024, ge=1)
    synthetic_val: int = Field(256, ge=1)
    # FFCV options
    ffcv_pipeline: Optional[Literal["imagenet", "cifar", "digits"]] = None
    os_cache: Optional[bool] = None
    res_start: Optional[int] = None           # progressive resizing (FFCV)
    res_end: Optional[int] = None
    res_start_epoch: int = 0
    res_end_epoch: int = 0


class StageCfg(_Section):
    epochs: int = Field(0, ge=0)
    lr_schedule: str = "0:0.1"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"

    _sched = field_validator("lr_schedule", mode="before")(classmethod(lambda cls, v: _check_schedule(v)))


class PretrainCfg(StageCfg):
    checkpoint: Optional[str] = None          # load this base model instead of pretraining
    # K1 for Scratch-E/B: the epochs that trained the checkpoint's base model, when the checkpoint
    # does not record them (bases written by `dprune run` do; torchvision weight files do not)
    base_epochs: Optional[float] = Field(None, ge=0)


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


class PruneCfg(_Section):
    # the rows of prune.methods.METHODS (spelled out so loading a config needs no torch;
    # tests/unit/test_methods.py keeps the two equal)
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
    bucket_cap_mb: int = Field(25, ge=1)
    # "auto": on unless train.compile or train.grad_accum > 1 (see train.engine.resolve_static_graph)
    static_graph: Union[bool, Literal["auto"]] = "auto"


class TrainabilityCfg(_Section):
    jsv: bool = True
    every_epoch: bool = False
    samples: int = Field(32, ge=1)
    method: Literal["auto", "exact", "randomized"] = "auto"


class Config(_Section):
    seed: int = 0
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


# --- YAML without YAML 1.1's sexagesimal numbers ("0:0.1" must stay a string) -------------
class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf)$|^\.(?:nan|NaN)$"),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _set(d: dict, dotted: str, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        nxt = d.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise UserError(f"config: {'.'.join(keys[:keys.index(k) + 1])} is not a section")
        d = nxt
    d[keys[-1]] = value


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"config: unknown key {key!r}"
    msg = err["msg"].removeprefix("Value error, ").removeprefix(f"{key}: ")
    named = re.match(r"[a-z_]+(\.[a-z_]+)+\b", msg)
    if named and (key == "config" or named.group(0).startswith(key + ".")):
        return f"config: {msg}"  # a section-level check whose message names its own key(s)
    inp = err.get("input")
    shown = f" (got {inp!r})" if not isinstance(inp, dict) and inp is not None and len(repr(inp)) < 80 else ""
    return f"config: {key}: {msg}{shown}"


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML ``path`` (or defaults), apply ``key=value`` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p}: not found")
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {p}: top level must be a mapping")
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"override {ov!r}: expected key=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set(data, key.strip(), value)
    return from_dict(data)


def from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(e)) from None
    except UserError as e:  # raised inside a validator (ratio or schedule parser)
        raise UserError(f"config: {e}") from None


def to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def cli_show(args) -> int:
    print(dump(load(args.config, args.overrides)), end="")
    return 0
