"""``run(cfg)``: pretrain -> prune -> retrain (or scratch), as DESIGN.md's data flow.

    dprune run configs/debug_cpu.yaml
    torchrun --nproc_per_node 8 -m distributed_prune run configs/paper/resnet50_imagenet_l1.yaml
    deepspeed --num_gpus 8 --no_local_rank --module distributed_prune run CONFIG dist.engine=deepspeed

Every stage checkpoints atomically each epoch; re-running into the same ``output.dir`` (or
``resume=true``) continues from the newest readable checkpoint, with every epoch logged once.
"""
from __future__ import annotations

import inspect
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import dist, flops, models, prune
from .errors import UserError
from .eval import evaluate
from .train.engine import amp_dtype, build_engine
from .train.loop import train_epoch
from .train.optim import build_optimizer
from .train.schedules import EpochIterLR, parse_schedule

STAGES = ("pretrain", "prune", "retrain")
ONE_SHOT = {"l1", "l2", "random", "bn_scale", "taylor"}


# --------------------------------------------------------------------------- data and model
@dataclass
class Data:
    train: object
    val: object
    info: object
    n_train: int
    example: torch.Tensor  # one normalized sample batch (1, ...) for tracing / JSV inputs


def build_data(cfg, ctx, micro_batch: int) -> Data:
    """Train / val loaders for this rank (the val loader covers every sample exactly once)."""
    flatten = cfg.data.flatten if cfg.data.flatten is not None else cfg.model.name.startswith("mlp")
    if cfg.data.format == "ffcv":
        from .data.ffcv import build_ffcv_loaders

        pipeline = cfg.data.ffcv_pipeline or {"digits": "digits", "cifar10": "cifar",
                                              "cifar100": "cifar"}.get(cfg.data.name, "imagenet")
        if not cfg.data.train_path or not cfg.data.val_path:
            raise UserError("data.format=ffcv needs data.train_path and data.val_path (.beton files)")
        res = None
        if cfg.data.res_start:
            res = (cfg.data.res_start, cfg.data.res_end or cfg.data.res_start,
                   cfg.data.res_start_epoch, cfg.data.res_end_epoch)
        train, val, info = build_ffcv_loaders(
            cfg.data.train_path, cfg.data.val_path, pipeline=pipeline, batch_size=micro_batch,
            val_batch_size=cfg.data.val_batch_size, num_workers=max(cfg.data.num_workers, 1),
            device=str(ctx.device), distributed=ctx.distributed, seed=cfg.seed,
            os_cache=cfg.data.os_cache, res=res, channels_last=cfg.train.channels_last,
            dtype=cfg.train.amp if cfg.train.amp != "none" else "fp32", flatten=flatten,
            **({"image_size": cfg.data.input_size} if cfg.data.input_size else {}))
        x, _ = next(iter(val))
        n_train = train.num_samples * ctx.world_size  # per-rank shard x ranks
        return Data(train, val, info, n_train, x[:1].detach().clone().float().cpu())
    from .data import build_datasets, build_loader

    train_ds, val_ds, info = build_datasets(
        cfg.data.name, train_path=cfg.data.train_path, val_path=cfg.data.val_path,
        input_size=cfg.data.input_size, flatten=flatten, seed=cfg.seed,
        synthetic_size=(cfg.data.synthetic_train, cfg.data.synthetic_val),
        num_classes=cfg.model.num_classes)
    common = dict(num_workers=cfg.data.num_workers, seed=cfg.seed, distributed=ctx.distributed,
                  rank=ctx.rank, world_size=ctx.world_size, pin_memory=ctx.device.type == "cuda")
    train = build_loader(train_ds, batch_size=micro_batch, shuffle=True, **common)
    val = build_loader(val_ds, batch_size=cfg.data.val_batch_size, shuffle=False, **common)
    return Data(train, val, info, len(train_ds), val_ds[0][0].unsqueeze(0).float())


def build_model(cfg, info) -> nn.Module:
    """Create ``model.name`` for the dataset's classes and input shape."""
    kw = dict(cfg.model.kwargs)
    factory_params = _factory_params(cfg.model.name)
    if "in_features" in factory_params and len(info.input_shape) == 1:
        kw.setdefault("in_features", info.input_shape[0])
    if "in_channels" in factory_params and len(info.input_shape) == 3:
        kw.setdefault("in_channels", info.input_shape[0])
    return models.create(cfg.model.name, num_classes=cfg.model.num_classes or info.num_classes, **kw)


def _factory_params(name):
    models.list_models(include_torchvision=False)
    fn = models._REGISTRY.get(name)
    return set(inspect.signature(fn).parameters) if fn else set()


# --------------------------------------------------------------------------- run directory
class RunDir:
    """Files of one run; only the primary rank writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        self.primary = dist.is_primary()

    def write_text(self, name, text):
        if self.primary:
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.path / name)

    def log(self, row: dict):
        if self.primary:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()

    def metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        rows = []
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: everything after is redone
                break
        return rows

    def truncate_metrics(self, upto: tuple[int, int]):
        """Keep rows logged at or before (stage index, epoch): the resumed run logs the rest."""
        if self.primary:
            keep = [r for r in self.metrics() if (STAGES.index(r["stage"]), r["epoch"]) <= upto]
            self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))

    def save(self, name, model, **kw):
        if self.primary:
            ckpt.save(self.ckpt / name, model, **kw)

    def prune_old(self, stage: str, keep: int):
        if self.primary:
            files = sorted(self.ckpt.glob(f"{stage}-*.pt"))
            for f in files[:-keep]:
                f.unlink(missing_ok=True)


def _sort_key(p: Path):
    stem = p.stem
    if stem == "base":
        return (0, 10**9)
    if stem == "pruned":
        return (1, 10**9)
    stage, ep = stem.rsplit("-", 1)
    return (STAGES.index(stage), int(ep))


def latest_checkpoint(rd: RunDir):
    """Newest readable checkpoint (a truncated or corrupt one is skipped: the previous is used)."""
    if not rd.ckpt.is_dir():
        return None
    names = [p for p in rd.ckpt.glob("*.pt") if p.stem in ("base", "pruned")
             or (p.stem.rsplit("-", 1)[0] in STAGES and p.stem.rsplit("-", 1)[-1].isdigit())]
    for p in sorted(names, key=_sort_key, reverse=True):
        try:
            return p, ckpt.load(p)
        except UserError as e:
            if rd.primary:
                print(f"dprune: warning: {e}; using the previous checkpoint")
    return None


def _rng_state():
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _maybe_fault(stage: str, epoch: int, rd: RunDir):
    """Test hook: ``DPRUNE_FAULT=stage:epoch`` kills this process (SIGKILL) once, right after that
    epoch's checkpoint, on rank ``DPRUNE_FAULT_RANK`` (default 0). Used by the resume tests."""
    spec = os.environ.get("DPRUNE_FAULT")
    if not spec or spec != f"{stage}:{epoch}":
        return
    if dist.get_rank() != int(os.environ.get("DPRUNE_FAULT_RANK", "0")):
        return
    marker = rd.path / ".fault-injected"
    if marker.exists():
        return
    marker.write_text("1")
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- stages
@dataclass
class State:
    """What a resumed run must know besides the weights."""
    record: dict = field(default_factory=dict)   # dense/pruned results, base sha, times
    plan_json: str | None = None


class Runner:
    """The stages of one run and what they share (config, data, run directory, state)."""

    def __init__(self, cfg, ctx, rd: RunDir, data: Data, micro_batch: int):
        self.cfg, self.ctx, self.rd, self.data = cfg, ctx, rd, data
        self.device = ctx.device
        self.micro_batch = micro_batch
        self.amp = amp_dtype(cfg.train.amp)
        self.progress = cfg.train.progress and os.environ.get("CI") != "true"
        self.jsv_inputs = _jsv_inputs(data.val, cfg.trainability.samples)
        self.example = data.example.to(ctx.device)
        self.state = State()
        self.resume_obj = None      # training state of the checkpoint resumed from, if any
        self.t_start = time.time()
        self.pre_epochs, self.pre_sched = cfg.effective_pretrain()
        self.re_epochs, self.re_sched = cfg.effective_retrain()

    def _resume_for(self, stage, where):
        """(first epoch, checkpoint training state) for ``stage`` given the resume point."""
        if where[0] == stage:
            return where[1] + 1, self.resume_obj
        return 0, None

    def resume(self, model):
        """Load the newest readable checkpoint, if any: (model, (stage, epoch) resumed after)."""
        cfg, rd, state = self.cfg, self.rd, self.state
        found = latest_checkpoint(rd) if cfg.resume is not False else None
        if not found:
            if rd.primary and (rd.path / "metrics.jsonl").exists():
                rd.truncate_metrics((-1, -1))
            return model.to(self.device), ("start", -1)
        path, obj = found
        stage = path.stem if path.stem in ("base", "pruned") else path.stem.rsplit("-", 1)[0]
        where = (stage, obj.get("epoch", -1))
        state.record = json.loads(obj.get("record") or "{}")
        state.plan_json = obj.get("plan")
        if state.plan_json:
            model = prune.replay(model, prune.Plan.from_json(state.plan_json))
        ckpt.load_state(model, obj["state_dict"], source=f"checkpoint {path}")
        self.resume_obj = obj if "engine" in obj else None
        rd.truncate_metrics({"base": (0, 10**9), "pruned": (1, 10**9)}.get(stage, (STAGES.index(stage), where[1])))
        if rd.primary:
            print(f"dprune: resuming {rd.path} after {path.name}")
        return model.to(self.device), where

    def pretrain(self, model, where):
        """Pretrain (or load ``pretrain.checkpoint``), then evaluate and save the dense base."""
        cfg, state = self.cfg, self.state
        base = _base_path(cfg)
        if base:
            obj = ckpt.load(base)
            if obj.get("plan"):
                raise UserError(f"pretrain.checkpoint {base}: holds a pruned model, not a dense base")
            ckpt.load_state(model, obj["state_dict"], source=f"pretrain.checkpoint {base}")
        else:
            start, obj = self._resume_for("pretrain", where)
            model = self.train_stage("pretrain", model, epochs=self.pre_epochs, schedule=self.pre_sched,
                                     scfg=cfg.pretrain, state=state, start_epoch=start, resume_obj=obj)
        model.to(self.device)
        state.record["dense"] = {"top1": self.evaluate(model), **flops.count(model, self.example)}
        state.record["base_model_sha256"] = ckpt.weights_sha256(model)
        if cfg.trainability.jsv:
            state.record["dense"]["jsv_mean"] = self.jsv(model)["mean"]
        self.rd.save("base.pt", model, config=config_mod.to_dict(cfg), stage="base", epoch=-1,
                     record=json.dumps(state.record))
        return model, ("base", -1)

    def prune(self, model, where):
        """Plan (rank 0, broadcast, verified), regularization phase, surgery, reinit; evaluate."""
        cfg, state, rd, example = self.cfg, self.state, self.rd, self.example
        if cfg.prune.method == "none":
            plan = prune.Plan([], list(example.shape[1:]), "none", cfg.prune.ratios)
        else:
            plan = _decide(cfg, model, self.data, example, self.ctx)
        state.plan_json = None  # the dense weights go with no plan until surgery
        if cfg.prune.method in ("greg", "tpp"):
            start, obj = self._resume_for("prune", where)
            first_lr = parse_schedule(self.re_sched).lr_at(0, total_epochs=max(self.re_epochs, 1))
            model = self.train_stage("prune", model, epochs=cfg.prune.epochs,
                                     schedule=cfg.prune.lr_schedule or f"0:{first_lr}", scfg=cfg.retrain,
                                     state=state, start_epoch=start, resume_obj=obj,
                                     regularizer=_regularizer(cfg, model, plan))
        model = prune.apply(model, plan, mode="physical")
        model, plan = _iterative(cfg, self, model, plan, self.data, example, self.ctx, state)
        from .prune.reinit import reinit

        if cfg.prune.reinit == "scratch":
            torch.manual_seed(cfg.seed + 1)
        model = reinit(cfg.prune.reinit, model, activation=cfg.model.activation).to(self.device)
        state.plan_json = plan.to_json()
        rd.write_text("plan.json", state.plan_json)
        pf = flops.count(model, example)
        state.record["pruned"] = {"top1": self.evaluate(model), **pf,
                                  "speedup": state.record["dense"]["macs"] / max(pf["macs"], 1)}
        if cfg.trainability.jsv:
            j = self.jsv(model)
            state.record["pruned"].update(jsv_mean=j["mean"], jsv=j)
        rd.save("pruned.pt", model, plan=state.plan_json, config=config_mod.to_dict(cfg), stage="pruned",
                epoch=-1, record=json.dumps(state.record))
        if rd.primary:
            p = state.record["pruned"]
            print(f"[pruned] top1 {100 * p['top1']:.2f}%  MACs x{p['speedup']:.2f}  params {p['params']}"
                  + (f"  mean JSV {p['jsv_mean']:.4g}" if "jsv_mean" in p else ""), flush=True)
        return model, ("pruned", -1)

    def retrain(self, model, where):
        self.retrain_epochs = _retrain_epochs(self.cfg, self.re_epochs, self.pre_epochs, self.state)
        start, obj = self._resume_for("retrain", where)
        return self.train_stage("retrain", model, epochs=self.retrain_epochs, schedule=self.re_sched,
                                scfg=self.cfg.retrain, state=self.state, start_epoch=start, resume_obj=obj,
                                jsv_every=self.cfg.trainability.every_epoch)

    def finish(self, model) -> dict:
        """Final evaluation, final checkpoint, summary.json and report.md."""
        cfg, rd, state = self.cfg, self.rd, self.state
        final_top1 = self.evaluate(model)
        _dump_rank_state(model, state)
        rd.save("final.pt", model, plan=state.plan_json, config=config_mod.to_dict(cfg), stage="final",
                epoch=self.retrain_epochs, record=json.dumps(state.record))
        summary = _summary(cfg, self.ctx, state, rd, final_top1, self.retrain_epochs, self.re_sched,
                           self.pre_epochs, self.pre_sched, self.data, time.time() - self.t_start)
        if rd.primary:
            rd.write_text("summary.json", json.dumps(summary, indent=1))
            from .report import write_run_report

            write_run_report(rd.path, summary, rd.metrics())
            print(f"dprune: done: final top1 {100 * final_top1:.2f}%  -> {rd.path / 'summary.json'}")
        dist.barrier()
        return summary

    # one generic stage: pretrain, prune (regularization phase) or retrain
    def train_stage(self, stage, model, *, epochs, schedule, scfg, state: State, start_epoch=0,
                    resume_obj=None, regularizer=None, jsv_every=False):
        if epochs <= 0 or start_epoch >= epochs:
            return model
        cfg = self.cfg
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        first_lr = parse_schedule(schedule).lr_at(0, total_epochs=epochs)
        opt = build_optimizer(model, name=scfg.optimizer, lr=first_lr, momentum=scfg.momentum,
                              weight_decay=scfg.weight_decay, nesterov=scfg.nesterov)
        engine = build_engine(cfg.dist.engine, model, opt, device=self.device, amp=cfg.train.amp,
                              sync_bn=cfg.dist.sync_bn, bucket_cap_mb=cfg.dist.bucket_cap_mb,
                              static_graph=cfg.dist.static_graph, compile=cfg.train.compile,
                              grad_accum=cfg.train.grad_accum, ds_config=cfg.dist.deepspeed_config,
                              micro_batch=self.micro_batch, world_size=self.ctx.world_size)
        iters = max(1, -(-len(self.data.train) // cfg.train.grad_accum))
        lr_driver = EpochIterLR(engine, schedule, epochs, iters)
        if resume_obj is not None:
            engine.load_state_dict(resume_obj["engine"])
            lr_driver.load_state_dict(resume_obj["lr"])
            _set_rng_state(resume_obj["rng"])
        extra_loss = grad_hook = None
        if regularizer is not None:
            module = engine.module
            if hasattr(regularizer, "loss"):  # TPP: an extra loss term
                extra_loss = lambda: regularizer.loss(module)  # noqa: E731
            apply_fn = getattr(regularizer, "apply_", None)  # GReg: penalty gradient on pruned filters

            def _reg_hook(it):
                regularizer.step(it)
                if apply_fn is not None:
                    apply_fn(module)

            grad_hook = _reg_hook
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            if hasattr(self.data.train, "sampler") and hasattr(self.data.train.sampler, "set_epoch"):
                self.data.train.sampler.set_epoch(epoch)
            elif hasattr(self.data.train, "set_epoch"):
                self.data.train.set_epoch(epoch)
            stats = train_epoch(engine, self.data.train, epoch=epoch, lr_driver=lr_driver,
                                grad_accum=cfg.train.grad_accum, label_smoothing=scfg.label_smoothing,
                                channels_last=cfg.train.channels_last, extra_loss=extra_loss,
                                grad_hook=grad_hook, iteration0=epoch * iters, progress=self.progress,
                                desc=f"{stage} {epoch + 1}/{epochs}")
            engine.sync_buffers()  # rank 0's BN statistics on every rank: eval == checkpoint
            top1 = evaluate(engine.module, self.data.val, device=self.device, amp_dtype=self.amp,
                            channels_last=cfg.train.channels_last)
            row = {"stage": stage, "epoch": epoch,
                   "lr": parse_schedule(schedule).lr_at(epoch, total_epochs=epochs),
                   "train_loss": stats["train_loss"], "train_top1": stats["train_top1"], "top1": top1,
                   "time_s": round(time.time() - t0, 3)}
            if regularizer is not None:
                row["reg"] = regularizer.reg_at(epoch * iters + iters - 1)
            if jsv_every:
                row["jsv_mean"] = self.jsv(engine.module)["mean"]
            self.rd.log(row)
            if self.rd.primary:
                print(f"[{stage} {epoch + 1}/{epochs}] loss {stats['train_loss']:.4f} "
                      f"top1 {100 * top1:.2f}% lr {row['lr']:.3g}", flush=True)
            # engine.state_dict() runs on EVERY rank (only rank 0 writes): with DeepSpeed ZeRO it
            # gathers the partitioned optimizer state, a collective
            self.rd.save(f"{stage}-{epoch:04d}.pt", engine.module, plan=state.plan_json,
                         config=config_mod.to_dict(cfg), stage=stage, epoch=epoch,
                         engine=engine.state_dict(), lr=lr_driver.state_dict(), rng=_rng_state(),
                         record=json.dumps(state.record))
            self.rd.prune_old(stage, cfg.output.keep_checkpoints)
            dist.barrier()
            _maybe_fault(stage, epoch, self.rd)
        model = engine.finish()  # the plain module (DeepSpeed: fp32 master weights, hooks removed)
        del engine
        return model

    def jsv(self, model):
        from .trainability import jsv

        n = self.cfg.trainability.samples
        xs = self.jsv_inputs[:n].to(self.device)
        return jsv(model, xs, method=self.cfg.trainability.method, seed=self.cfg.seed)

    def evaluate(self, model):
        return evaluate(model.to(self.device), self.data.val, device=self.device, amp_dtype=self.amp,
                        channels_last=self.cfg.train.channels_last)


def _taylor_grads(model, loader, batches, device):
    """Accumulate dL/dw over a few batches (eval-mode BN), all-reduced so every rank agrees."""
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.train(was)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce_mean(p.grad)


def _regularizer(cfg, model, plan):
    """GReg or TPP over the plan's pruned filters (PAPER.md section 3)."""
    from .prune.regularize import GReg, TPP

    r = cfg.prune.reg
    common = dict(reg_granularity=r.granularity, reg_ceiling=r.ceiling,
                  update_reg_interval=r.update_interval, stabilize_interval=r.stabilize_interval)
    if cfg.prune.method == "greg":
        return GReg(model, _targets(plan, model), **common)
    return TPP(model, _targets(plan, model), lw_opp=r.lw_opp, **common)


def _targets(plan, model):
    """Regularization targets (root layer, pruned filters, its BN) from a plan."""
    from .prune.regularize import Target

    out = []
    for g in plan.groups:
        pruned = plan.pruned(g)
        if not pruned:
            continue
        bn = next((m.split(":")[0] for m in g.members if m.endswith(":out")
                   and isinstance(model.get_submodule(m.split(":")[0]), nn.modules.batchnorm._BatchNorm)), None)
        out.append(Target(g.root, pruned, bn))
    return out


def compose_plans(first, second):
    """A plan equal to applying ``first`` then ``second`` (whose indices refer to the already
    pruned model): kept channels are mapped back to the original numbering."""
    by_root = {g.root: g for g in first.groups}
    groups = []
    for g2 in second.groups:
        g1 = by_root.pop(g2.root, None)
        if g1 is None:
            groups.append(g2)
            continue
        groups.append(prune.GroupPlan(g1.root, g1.n, [g1.keep[i] for i in g2.keep], g2.ratio, g1.members))
    groups += list(by_root.values())
    order = list(first.layer_ratios) or [g.root for g in groups]
    groups.sort(key=lambda g: order.index(g.root) if g.root in order else len(order))
    return prune.Plan(groups, first.input_shape, first.criterion, first.ratios, first.pick,
                      first.round_to, first.layer_ratios)


# --------------------------------------------------------------------------- the pipeline
def prepare_run_dir(cfg) -> tuple[RunDir, bool]:
    """Create or reopen ``output.dir``. Returns (run dir, already complete)."""
    rd = RunDir(Path(cfg.output.dir))
    saved = rd.path / "config.yaml"
    if saved.is_file():
        if cfg.resume is False:
            raise UserError(f"output.dir {rd.path} already holds a run; pass resume=true or choose another dir")
        old = config_mod.yaml_load(saved.read_text()) or {}
        new = config_mod.to_dict(cfg)
        for key in ("resume",):
            old.pop(key, None)
            new.pop(key, None)
        if old != new:
            diff = _first_diff(old, new)
            raise UserError(f"output.dir {rd.path} holds a run with a different config ({diff}); "
                            "choose another output.dir")
        summ = rd.path / "summary.json"
        if summ.is_file() and json.loads(summ.read_text()).get("status") == "complete":
            return rd, True
    elif rd.primary:
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_text("config.yaml", config_mod.dump(cfg))
    dist.barrier()
    return rd, False


def _first_diff(a, b, prefix=""):
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_diff(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k}: {va!r} -> {vb!r}"
    return ""


def run(cfg) -> dict:
    """Run the pipeline described by a validated :class:`~distributed_prune.config.Config`."""
    ctx = dist.init(cfg.train.device, cfg.dist.backend, cfg.dist.engine)
    ok = False
    try:
        summary = _run(cfg, ctx)
        ok = True
        return summary
    finally:
        # after an error, no barrier: the other ranks may never reach it (the error is printed
        # and the launcher stops them instead of everyone waiting for the collective timeout)
        dist.shutdown(barrier=ok)


def _run(cfg, ctx) -> dict:
    """DESIGN.md's data flow, one line per stage (each stage resumes where a checkpoint left off)."""
    _set_backends(cfg, ctx)
    micro = _micro_batch(cfg, ctx)
    data = build_data(cfg, ctx, micro)   # bad paths fail here, before any directory exists
    model = build_model(cfg, data.info)
    _check_before_run_dir(cfg, ctx, model, data)
    rd, complete = prepare_run_dir(cfg)
    if complete:
        if rd.primary:
            print(f"dprune: {rd.path} is already complete")
        return json.loads((rd.path / "summary.json").read_text())
    runner = Runner(cfg, ctx, rd, data, micro)
    model, where = runner.resume(model)
    if where[0] in ("start", "pretrain"):
        model, where = runner.pretrain(model, where)      # or load the base model; evaluate dense
    if where[0] in ("base", "prune"):
        model, where = runner.prune(model, where)         # plan, [reg. phase], surgery, reinit
    elif runner.state.plan_json:
        rd.write_text("plan.json", runner.state.plan_json)
    model = runner.retrain(model, where)                  # engine built after surgery
    return runner.finish(model)                           # summary.json, report.md


def _set_backends(cfg, ctx):
    torch.manual_seed(cfg.seed)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _micro_batch(cfg, ctx) -> int:
    denom = ctx.world_size * cfg.train.grad_accum
    if cfg.data.batch_size % denom:
        raise UserError(f"data.batch_size={cfg.data.batch_size} is not divisible by world size x "
                        f"train.grad_accum = {denom}")
    return cfg.data.batch_size // denom


def _base_path(cfg):
    """``pretrain.checkpoint`` with "{seed}" filled in (one base per seed shared by a sweep)."""
    return cfg.pretrain.checkpoint.format(seed=cfg.seed) if cfg.pretrain.checkpoint else None


def _check_before_run_dir(cfg, ctx, model, data):
    """Input errors that need the model or data, raised before anything is written."""
    if cfg.prune.method in ("greg", "tpp") and cfg.prune.epochs == 0:
        raise UserError(f"prune.epochs must be > 0 for prune.method={cfg.prune.method} (regularization phase)")
    base = _base_path(cfg)
    if base and not Path(base).is_file():
        raise UserError(f"pretrain.checkpoint {base}: file not found")
    if cfg.dist.sync_bn and ctx.device.type != "cuda":
        raise UserError("dist.sync_bn=true needs CUDA (SyncBatchNorm refuses CPU modules)")
    if cfg.retrain.scratch_budget != "none" and cfg.prune.reinit != "scratch":
        raise UserError("retrain.scratch_budget needs prune.reinit=scratch")
    if cfg.prune.method != "none":  # a spec that does not fit this model fails now, not after pretraining
        prune.plan(model, cfg.prune.ratios, criterion="random", example_input=data.example,
                   skip=cfg.prune.skip, round_to=cfg.prune.round_to)


def _dump_rank_state(model, state):
    """Test hook: ``DPRUNE_DUMP_RANK_STATE=DIR`` makes EVERY rank save its final weights and plan
    hash to DIR/rank{r}.pt (the distributed tests check that all ranks agree)."""
    out = os.environ.get("DPRUNE_DUMP_RANK_STATE")
    if out:
        sha = prune.Plan.from_json(state.plan_json).sha256() if state.plan_json else None
        ckpt.atomic_save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                          "plan_sha256": sha}, Path(out) / f"rank{dist.get_rank()}.pt")


def _jsv_inputs(val, n):
    """The first ``n`` validation samples in dataset order: the same on every rank and for any
    world size (each rank's val loader holds only its shard). FFCV loaders have no indexable
    dataset: rank 0's first samples, broadcast."""
    ds = getattr(val, "dataset", None)
    if ds is not None and hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        return torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).float()
    return dist.broadcast_object(torch.cat([x for x, _ in _take(val, n)]))


def _take(loader, n):
    got = 0
    for x, y in loader:
        x = x[: n - got].detach().clone().float().cpu()
        yield x, y
        got += len(x)
        if got >= n:
            break


def _decide(cfg, model, data, example, ctx):
    """The plan, computed on rank 0 and broadcast; every rank checks the hash. With iterative
    pruning the first step uses the per-step ratio (see :func:`_iterative`)."""
    criterion = cfg.prune.method if cfg.prune.method in ONE_SHOT else "l1"
    ratios = cfg.prune.ratios
    if cfg.prune.iterative_steps > 1:
        table = prune.plan(model, ratios, criterion="random", example_input=example,
                           skip=cfg.prune.skip).layer_ratios
        k = cfg.prune.iterative_steps
        ratios = ",".join(f"{n}:{1 - (1 - r) ** (1 / k):.6f}" for n, r in table.items() if r > 0)
    if criterion == "taylor":
        _taylor_grads(model, data.train, cfg.prune.taylor_batches, ctx.device)
    plan_json = None
    if dist.is_primary():
        plan_json = prune.plan(model, ratios, criterion=criterion, example_input=example,
                               pick=cfg.prune.pick, round_to=cfg.prune.round_to, skip=cfg.prune.skip,
                               seed=cfg.seed).to_json()
    plan_json = dist.broadcast_object(plan_json)
    plan = prune.Plan.from_json(plan_json)
    hashes = dist.all_gather_object(plan.sha256())
    if len(set(hashes)) != 1:
        raise RuntimeError(f"plan hashes differ across ranks: {hashes}")
    model.zero_grad(set_to_none=True)
    return plan


def _iterative(cfg, runner, model, plan, data, example, ctx, state):
    """Iterative pruning (``prune.iterative_steps`` = k > 1): after the first cut, k-1 more cycles
    of (retrain ``prune.iterative_epochs`` epochs at the retrain LR, then prune the survivors).
    Every step removes the same fraction of each layer's remaining channels,
    1 - (1 - r)^(1/k), so the k steps reach ratio r (up to per-step ceil rounding); the first cut
    used the full-ratio plan rescaled the same way. Intermediate cycles are not resumable."""
    steps = cfg.prune.iterative_steps
    if steps <= 1 or not plan.groups:
        state.plan_json = None
        return model, plan
    # the first plan was made with the per-step ratios (see _decide): reuse them
    spec = ",".join(f"{n}:{r:.6f}" for n, r in plan.layer_ratios.items() if r > 0)
    full = plan
    for s in range(1, steps):
        if cfg.prune.iterative_epochs:
            state.plan_json = full.to_json()
            lr = parse_schedule(cfg.retrain.lr_schedule).lr_at(0, total_epochs=max(cfg.retrain.epochs, 1))
            model = runner.train_stage("prune", model, epochs=cfg.prune.iterative_epochs * (s + 1),
                                       start_epoch=cfg.prune.iterative_epochs * s, schedule=f"0:{lr}",
                                       scfg=cfg.retrain, state=state)
        step_plan = prune.plan(model, spec, criterion="l1", example_input=example, seed=cfg.seed)
        model = prune.apply(model, step_plan, mode="physical")
        full = compose_plans(full, step_plan)
    return model, full


def _retrain_epochs(cfg, re_epochs, pre_epochs, state):
    b = cfg.retrain.scratch_budget
    if b == "none":
        return re_epochs
    from .setups import scratch_budgets

    s = scratch_budgets(pre_epochs, re_epochs, state.record["pruned"]["speedup"])
    return s["scratch_e"] if b == "E" else s["scratch_b_epochs"]


def _summary(cfg, ctx, state, rd, final_top1, re_epochs, re_sched, pre_epochs, pre_sched, data, elapsed):
    from .trainability import trainability_accuracy

    rows = [r for r in rd.metrics() if r["stage"] == "retrain"] if rd.primary else []
    ta = None
    if rows:
        n = parse_schedule(re_sched).first_stage_epochs(re_epochs)
        ta = trainability_accuracy([r["top1"] for r in rows], min(n, len(rows)))
    dense, pruned = state.record["dense"], state.record["pruned"]
    prune_epochs = cfg.prune.epochs if cfg.prune.method in ("greg", "tpp") else 0
    n = data.n_train
    train_macs = 3 * n * (dense["macs"] * (pre_epochs + prune_epochs) + pruned["macs"] * re_epochs)
    return {
        "status": "complete", "label": cfg.label(), "model": cfg.model.name, "dataset": cfg.data.name,
        "seed": cfg.seed, "world_size": ctx.world_size, "engine": cfg.dist.engine,
        "dense": {k: dense.get(k) for k in ("top1", "params", "macs", "jsv_mean")},
        "pruned": {k: pruned.get(k) for k in ("top1", "params", "macs", "speedup", "jsv_mean")},
        "final": {"top1": final_top1},
        "trainability_accuracy": ta,
        "setup": {
            "base_model_sha256": state.record["base_model_sha256"], "prune_method": cfg.prune.method,
            "reinit": cfg.prune.reinit, "ratios": cfg.prune.ratios, "pretrain_epochs": pre_epochs,
            "pretrain_lr_schedule": pre_sched, "prune_epochs": prune_epochs,
            "prune_lr_schedule": cfg.prune.lr_schedule if prune_epochs else None,
            "retrain_epochs": re_epochs, "retrain_lr_schedule": re_sched,
            "total_epochs": pre_epochs + prune_epochs + re_epochs, "total_train_macs": train_macs,
            "train_samples": n, "batch_size": cfg.data.batch_size,
        },
        "plan_sha256": prune.Plan.from_json(state.plan_json).sha256() if state.plan_json else None,
        "time_s": round(elapsed, 2),
    }


# --------------------------------------------------------------------------- CLI
def run_from_cli(config_path, overrides) -> int:
    cfg = config_mod.load(config_path, overrides)
    run(cfg)
    return 0


def cli_run(args) -> int:
    return run_from_cli(args.config, args.overrides)
