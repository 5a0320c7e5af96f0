"""``run(cfg)``: pretrain -> prune -> retrain (or scratch), one line per stage in :func:`_run`.

    dprune run configs/debug_cpu.yaml
    torchrun --nproc_per_node 8 -m distributed_prune run configs/paper/resnet50_imagenet_l1.yaml
    deepspeed --num_gpus 8 --no_local_rank --module distributed_prune run CONFIG dist.engine=deepspeed

The work is done by the modules each stage calls: :mod:`.data` (loaders), :mod:`.models`,
:mod:`.prune` (plan, method table, surgery, reinit), :mod:`.train` (the epoch loop),
:mod:`.rundir` (files, metrics, checkpoints, resume) and :mod:`.report`. This module turns the
config into their arguments and keeps what the stages share (the record of results, the plan).

Over 400 lines on purpose: the stages share one record (results, K1, the regularization phase's
progress) that every checkpoint carries, and reading them in one place is the point.

Every stage checkpoints atomically each epoch; re-running into the same ``output.dir`` (or
``resume=true``) continues from the newest readable checkpoint, with every epoch logged once.

Over 400 lines on purpose: the stages share one record (results, plan, resume state) and are
read best as one class; what each stage calls lives in the modules above.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import config as config_mod
from . import dist, flops, models, prune, rundir, tblog
from .data.loaders import RunData, build_run_data, first_samples
from .dtypes import amp_dtype
from .errors import UserError
from .eval import evaluate
from .prune.decide import compose_plans, decide, step_ratios, taylor_grads
from .prune.masked import MaskedPhase, resolve_execution
from .prune.methods import Method, Phase, method, targets
from .prune.regularize import check_phase
from .prune.reinit import reinit
from .run_report import write_run_report
from .rundir import Point, RunDir, Stage
from .setups import scratch_recipe
from .train.budget import retrain_trainability_accuracy, total_train_macs
from .train.schedules import parse_schedule
from .train.stage import (EngineSettings, EpochEnd, EpochHook, OptimSettings, micro_batch,
                          setup_backends, train_epochs)
from .trainability import jsv

__all__ = ["run", "run_from_cli", "cli_run", "build_data", "build_model"]


# --------------------------------------------------------------------------- the pipeline
def run(cfg, *, epoch_hooks: Sequence[EpochHook] = ()) -> dict:
    """Run the pipeline described by a validated :class:`~distributed_prune.config.Config`.
    ``epoch_hooks`` run after each trained epoch, after it was logged and checkpointed (on
    every rank; e.g. a progress bar)."""
    ctx = dist.init(cfg.train.device, cfg.dist.backend, cfg.dist.engine)
    ok = False
    try:
        summary = _run(cfg, ctx, tuple(epoch_hooks))
        ok = True
        return summary
    finally:
        # after an error, no barrier: the other ranks may never reach it (the error is printed
        # and the launcher stops them instead of everyone waiting for the collective timeout)
        dist.shutdown(barrier=ok)


def _run(cfg, ctx, epoch_hooks=()) -> dict:
    """The data flow (each stage resumes where a checkpoint left off or skips itself)."""
    setup_backends(ctx.device, seed=cfg.seed, cudnn_benchmark=cfg.train.cudnn_benchmark,
                   deterministic=cfg.train.deterministic)
    micro = micro_batch(cfg.data.batch_size, ctx.world_size, cfg.train.grad_accum)
    data = build_data(cfg, ctx, micro)       # data: bad paths fail here, before any directory exists
    model = build_model(cfg, data.info)      # models
    _check_inputs(cfg, ctx, model, data)     # prune: a ratio spec that does not fit fails now
    with _open_run_dir(cfg) as rd:           # run directory: create or reopen; its lock held
        if rd.complete:
            return _already_complete(rd)
        stages = Stages(cfg, ctx, rd, data, micro, epoch_hooks)
        model, at = stages.resume(model)         # run directory: the newest readable checkpoint
        model, at = stages.pretrain(model, at)   # train (or load pretrain.checkpoint); evaluate dense
        model, at = stages.prune(model, at)      # prune: plan, [method's phase], surgery, reinit
        model = stages.retrain(model, at)        # train: engine built after surgery
        return stages.finish(model)              # run directory + report: report.md, summary.json


def build_data(cfg, ctx, micro: int) -> RunData:
    """Loaders of this rank for the config's data section."""
    flatten = cfg.data.flatten if cfg.data.flatten is not None else cfg.model.name.startswith("mlp")
    return build_run_data(cfg.data, flatten=flatten, seed=cfg.seed, micro_batch=micro,
                          num_classes=cfg.model.num_classes, device=ctx.device,
                          distributed=ctx.distributed, rank=ctx.rank, world_size=ctx.world_size,
                          channels_last=cfg.train.channels_last, amp=cfg.train.amp)


def build_model(cfg, info) -> nn.Module:
    """Create ``model.name`` for the dataset's classes and input shape; with ``model.weights``,
    torchvision's pretrained weights (from the torch.hub cache, downloaded once)."""
    return models.create_for_input(cfg.model.name, cfg.model.num_classes or info.num_classes,
                                   info.input_shape, weights=cfg.model.weights,
                                   new_head=cfg.model.new_head, **cfg.model.kwargs)


def _open_run_dir(cfg) -> RunDir:
    return rundir.open_run_dir(cfg.output.dir, config=config_mod.to_dict(cfg),
                               config_text=config_mod.dump(cfg), saved_config=config_mod.yaml_load,
                               resume=cfg.resume)


def _already_complete(rd: RunDir) -> dict:
    if rd.primary:
        print(f"dprune: {rd.path} is already complete")
    return rd.summary()


def _base_path(cfg):
    """``pretrain.checkpoint`` with "{seed}" filled in (one base per seed shared by a sweep)."""
    return cfg.pretrain.checkpoint.format(seed=cfg.seed) if cfg.pretrain.checkpoint else None


def _base_epochs(cfg, obj):
    """K1 of a loaded base checkpoint ``obj``: ``pretrain.base_epochs`` when set, else what the
    checkpoint records (bases written by this pipeline), else the pretraining epochs of the config
    saved with it when that config trained from scratch; None when unknown."""
    if cfg.pretrain.base_epochs is not None:
        return cfg.pretrain.base_epochs
    rec = json.loads(obj.get("record") or "{}")
    if rec.get("base_epochs") is not None:
        return rec["base_epochs"]
    saved = obj.get("config")
    if isinstance(saved, dict) and saved and not (saved.get("pretrain") or {}).get("checkpoint"):
        try:
            return config_mod.from_dict(saved).effective_pretrain()[0]
        except UserError:
            return None
    return None


def _check_inputs(cfg, ctx, model, data):
    """Input errors that need the model or data, raised before anything is written."""
    m = method(cfg.prune.method)
    if m.trains_before_cut and cfg.prune.epochs == 0:
        raise UserError(f"prune.epochs must be > 0 for prune.method={m.name} ({m.phase.value} phase)")
    if m.phase is Phase.REGULARIZATION:  # long enough to reach the ceiling and stabilize
        r = cfg.prune.reg
        check_phase(m.name, epochs=cfg.prune.epochs,
                    iters_per_epoch=max(1, -(-len(data.train) // cfg.train.grad_accum)),
                    reg_granularity=r.granularity, reg_ceiling=r.ceiling,
                    update_reg_interval=r.update_interval, stabilize_interval=r.stabilize_interval)
    base = _base_path(cfg)
    if base and not Path(base).is_file():
        raise UserError(f"pretrain.checkpoint {base}: file not found")
    if cfg.output.tensorboard:
        tblog.require()
    budget = cfg.retrain.scratch_budget
    if budget != "none" and cfg.retrain.epochs == 0:
        raise UserError(f"retrain.scratch_budget={budget} needs retrain.epochs > 0 (K2, the retraining "
                        "epochs of the pruning run it is compared with)")
    if budget != "none" and base and _base_epochs(cfg, ckpt.load(base)) is None:
        raise UserError(f"retrain.scratch_budget={budget} needs K1, the epochs that trained the base "
                        f"model: {base} does not record them; set pretrain.base_epochs")
    if cfg.dist.sync_bn and ctx.device.type != "cuda":
        raise UserError("dist.sync_bn=true needs CUDA (SyncBatchNorm refuses CPU modules)")
    if cfg.retrain.scratch_budget != "none" and cfg.prune.reinit != "scratch":
        raise UserError("retrain.scratch_budget needs prune.reinit=scratch")
    if m.phase is Phase.MASKED:
        _execution(cfg)                       # refuses compact where it cannot run
    if m.criterion is not None:
        prune.plan(model, cfg.prune.ratios, criterion="random", example_input=data.example,
                   skip=cfg.prune.skip, round_to=cfg.prune.round_to)


def _execution(cfg) -> str:
    return resolve_execution(cfg.prune.masked.execution, cfg.prune.method, cfg.dist.engine)


# --------------------------------------------------------------------------- the stages
class Stages:
    """The stages of one run and what they share: the record of results (dense / pruned
    metrics, base hash) and the plan, both saved in every checkpoint so a re-run gets them back."""

    def __init__(self, cfg, ctx, rd: RunDir, data: RunData, micro: int, epoch_hooks=()):
        self.cfg, self.ctx, self.rd, self.data = cfg, ctx, rd, data
        self.device = ctx.device
        self.method: Method = method(cfg.prune.method)
        self.amp = amp_dtype(cfg.train.amp)
        self.progress = cfg.train.progress and os.environ.get("CI") != "true"
        self.verbose = cfg.output.verbose
        self.epoch_hooks = tuple(epoch_hooks)
        self.config = config_mod.to_dict(cfg)
        self.engine = EngineSettings(
            device=ctx.device, name=cfg.dist.engine, amp=cfg.train.amp, sync_bn=cfg.dist.sync_bn,
            bucket_cap_mb=cfg.dist.bucket_cap_mb, static_graph=cfg.dist.static_graph,
            compile=cfg.train.compile, grad_accum=cfg.train.grad_accum,
            ds_config=cfg.dist.deepspeed_config, micro_batch=micro, world_size=ctx.world_size,
            channels_last=cfg.train.channels_last)
        self.jsv_inputs = first_samples(data.val, cfg.trainability.samples)
        self.example = data.example.to(ctx.device)
        self.record: dict = {}
        self.plan_json: str | None = None
        self.train_state = None       # training state of the epoch checkpoint resumed from
        self.ckpt_extra: dict = {}    # more keys for the epoch checkpoints (the masked phase's state)
        self.t_start = time.time()
        self.pre_epochs, self.pre_sched = cfg.effective_pretrain()
        self.re_epochs, self.re_sched = cfg.effective_retrain()
        self.retrain_epochs = self.re_epochs
        self.epoch_checkpoints = True

    # ---- one line each in _run
    def resume(self, model):
        model, r = self.rd.resume(model, enabled=self.cfg.resume is not False)
        self.record, self.plan_json, self.train_state = r.record, r.plan_json, r.train_state
        if self.cfg.output.tensorboard:
            self.rd.open_tensorboard(config_mod.dump(self.cfg))
        return model.to(self.device), r.point

    def pretrain(self, model, at: Point):
        """Pretrain (or load ``pretrain.checkpoint``), then evaluate and save the dense base."""
        if at >= Point(Stage.BASE):
            return model, at
        cfg = self.cfg
        base = _base_path(cfg)
        if base:
            obj = ckpt.load(base)
            if obj.get("plan"):
                raise UserError(f"pretrain.checkpoint {base}: holds a pruned model, not a dense base")
            ckpt.load_state(model, obj["state_dict"], source=f"pretrain.checkpoint {base}")
            self.record["base_epochs"] = _base_epochs(cfg, obj)  # K1, for Scratch-E/B and SX-A/B
        else:
            model = self._train(Stage.PRETRAIN, model, at, epochs=self.pre_epochs,
                                schedule=self.pre_sched, optim=OptimSettings.of(cfg.pretrain))
            self.record["base_epochs"] = self.pre_epochs
        model.to(self.device)
        self.record["dense"] = {"top1": self.evaluate(model), **flops.count(model, self.example)}
        self.record["base_model_sha256"] = ckpt.weights_sha256(model)
        if cfg.trainability.jsv:
            self.record["dense"]["jsv_mean"] = self.jsv(model)["mean"]
        self._save("base.pt", model, stage="base", epoch=-1)
        self.rd.maybe_fault("after-base")
        return model, Point(Stage.BASE)

    def prune(self, model, at: Point):
        """Plan (rank 0, broadcast, verified), the method's phase, surgery, reinit; evaluate."""
        rd = self.rd
        if at >= Point(Stage.PRUNED):
            if self.plan_json:
                rd.write_text("plan.json", self.plan_json)
            return model, at
        if at.stage == Stage.PRUNE and "phase_plan" in self.record:
            # resumed inside the regularization or masked phase: the plan chosen before it,
            # not a new one from the weights the phase changed
            plan = prune.Plan.from_json(self.record["phase_plan"])
        else:
            plan = self._plan(model)
        self.plan_json = None  # the dense weights go with no plan until surgery
        if self.method.phase in (Phase.REGULARIZATION, Phase.MASKED):
            self.record["phase_plan"] = plan.to_json()   # saved in each epoch checkpoint
        if self.method.phase is Phase.REGULARIZATION:
            model = self._regularize(model, at, plan)
        elif self.method.phase is Phase.MASKED:
            model, plan = self._masked(model, at, plan)
        self.record.pop("phase_plan", None)
        model = prune.apply(model, plan, mode="physical")
        model, plan = self._iterative(model, plan)
        model = self._reinit(model, plan)
        self.plan_json = plan.to_json()
        rd.write_text("plan.json", self.plan_json)
        rd.maybe_fault("inside-prune")
        pf = flops.count(model, self.example)
        pruned = self.record["pruned"] = {"top1": self.evaluate(model), **pf,
                                          "speedup": self.record["dense"]["macs"] / max(pf["macs"], 1)}
        if self.cfg.trainability.jsv:
            j = self.jsv(model)
            pruned.update(jsv_mean=j["mean"], jsv=j)
        self._save("pruned.pt", model, stage="pruned", epoch=-1)
        rd.maybe_fault("after-pruned")
        if rd.primary and self.verbose:
            print(f"[pruned] top1 {100 * pruned['top1']:.2f}%  MACs x{pruned['speedup']:.2f}  "
                  f"params {pruned['params']}"
                  + (f"  mean JSV {pruned['jsv_mean']:.4g}" if "jsv_mean" in pruned else ""), flush=True)
        return model, Point(Stage.PRUNED)

    def retrain(self, model, at: Point):
        cfg = self.cfg
        self.retrain_epochs, self.re_sched = self._retrain_recipe()
        return self._train(Stage.RETRAIN, model, at, epochs=self.retrain_epochs, schedule=self.re_sched,
                           optim=OptimSettings.of(cfg.retrain), jsv_every=cfg.trainability.every_epoch)

    def finish(self, model) -> dict:
        """Final evaluation, final checkpoint, summary.json and report.md."""
        rd = self.rd
        final_top1 = self.evaluate(model)
        rundir.dump_rank_state(model, self.plan_json)
        self._save("final.pt", model, stage="final", epoch=self.retrain_epochs)
        rd.maybe_fault("before-summary")
        summary = self._summary(final_top1)
        if rd.primary:
            # report.md and its plots first, summary.json (the mark of a complete run) last: a
            # run killed in between finishes again on re-run instead of staying without a report
            write_run_report(rd.path, summary, rd.metrics())
            rd.maybe_fault("inside-report")
            rd.write_text("summary.json", json.dumps(summary, indent=1))
            if self.verbose:
                print(f"dprune: done: final top1 {100 * final_top1:.2f}%  -> {rd.path / 'summary.json'}")
        rd.close_tensorboard()
        dist.barrier()
        return summary

    # ---- pruning steps
    def _plan(self, model) -> prune.Plan:
        """The plan of ``prune.method``; with iterative pruning the first step uses the per-step
        ratio (see :meth:`_iterative`)."""
        cfg, m = self.cfg, self.method
        if m.criterion is None:
            return prune.Plan([], list(self.example.shape[1:]), "none", cfg.prune.ratios)
        ratios = cfg.prune.ratios
        if cfg.prune.iterative_steps > 1:
            ratios = step_ratios(model, ratios, cfg.prune.iterative_steps, example=self.example,
                                 skip=cfg.prune.skip)
        if m.needs_grads:
            taylor_grads(model, self.data.train, cfg.prune.taylor_batches, self.device)
        return decide(model, ratios, criterion=m.criterion, example=self.example, pick=cfg.prune.pick,
                      round_to=cfg.prune.round_to, skip=cfg.prune.skip, seed=cfg.seed)

    def _regularize(self, model, at: Point, plan):
        """The regularization phase at ``prune.lr_schedule`` with the method's regularizer on
        the plan's pruned filters: it ends when the regularizer is done (the penalty reached its
        ceiling and stabilized), at most ``prune.epochs`` epochs (checked before the run)."""
        cfg, r = self.cfg, self.cfg.prune.reg
        if at is not None and at.stage == Stage.PRUNE and (self.train_state or {}).get("reg_done"):
            return model  # resumed after the phase ended mid-epoch: nothing left to train
        reg = self.method.regularizer(model, targets(plan, model), granularity=r.granularity,
                                      ceiling=r.ceiling, update_interval=r.update_interval,
                                      stabilize_interval=r.stabilize_interval, lw_opp=r.lw_opp,
                                      lw_opp_schedule=r.lw_opp_schedule, weight_reg=r.weight_reg,
                                      bn_reg=r.bn_reg, zero_out_interval=r.zero_out_interval,
                                      mag_ratio_limit=r.mag_ratio_limit)
        return self._train(Stage.PRUNE, model, at, epochs=cfg.prune.epochs,
                           schedule=cfg.prune.lr_schedule, optim=OptimSettings.of(cfg.retrain),
                           regularizer=reg)

    def _masked(self, model, at: Point, plan):
        """The masked phase (``prune.method`` gradual or soft, :mod:`.prune.masked`):
        ``prune.epochs`` epochs at ``prune.lr_schedule`` with channel masks that the phase
        updates before optimizer steps (gradual: every ``prune.masked.update_interval`` steps;
        soft: every epoch). Returns the model with the final masks applied and their plan (its
        physical cut computes what the masked model computes). The mask state goes into every
        epoch checkpoint, so a resumed run continues the phase exactly."""
        cfg, mc = self.cfg, self.cfg.prune.masked
        iters = max(1, -(-len(self.data.train) // cfg.train.grad_accum))
        phase = MaskedPhase(model, plan, kind=self.method.name, criterion=mc.criterion,
                            schedule=mc.schedule,
                            update_interval=iters if self.method.name == "soft" else mc.update_interval,
                            total_iterations=cfg.prune.epochs * iters,
                            ramp_fraction=mc.ramp_fraction, kernel=mc.kernel,
                            execution=_execution(cfg))
        state = (self.train_state or {}).get("masked") if at.stage == Stage.PRUNE else None
        if state:
            phase.load_state_dict(json.loads(state), model)

        channels = max(sum(g.n for g in plan.groups), 1)

        def record_masks(end: EpochEnd):
            end.row["masked_channels"] = phase.n_pruned()
            end.row["mask_sparsity"] = phase.n_pruned() / channels  # of the plan's prunable channels
            self.ckpt_extra = {"masked": json.dumps(phase.state_dict())}

        compact = phase.execution == "compact"
        model = self._train(Stage.PRUNE, model, at, epochs=cfg.prune.epochs,
                            schedule=cfg.prune.lr_schedule, optim=OptimSettings.of(cfg.retrain),
                            step_hook=None if compact else phase.step,
                            compact=phase if compact else None, pre_hooks=[record_masks])
        self.ckpt_extra = {}
        model.to(self.device)
        return model, phase.finish(model)

    def _iterative(self, model, plan):
        """Iterative pruning (``prune.iterative_steps`` = k > 1): after the first cut, k-1 more
        cycles of (retrain ``prune.iterative_epochs`` epochs at the retrain LR, then prune the
        survivors). Every step removes the same fraction of each layer's remaining channels,
        1 - (1 - r)^(1/k), so the k steps reach ratio r (up to per-step ceil rounding); the first
        cut used the full-ratio plan rescaled the same way. Intermediate cycles are not resumable."""
        cfg = self.cfg
        steps, every = cfg.prune.iterative_steps, cfg.prune.iterative_epochs
        if steps <= 1 or not plan.groups:
            return model, plan
        # the first plan was made with the per-step ratios (see _plan): reuse them
        spec = ",".join(f"{n}:{r:.6f}" for n, r in plan.layer_ratios.items() if r > 0)
        full = plan
        # the cycles log their epochs but write no epoch checkpoints: a run killed during them
        # resumes from base.pt and redoes the pruning stage (its rows are cut back with it)
        self.epoch_checkpoints = False
        for s in range(1, steps):
            if every:
                self.plan_json = full.to_json()
                lr = parse_schedule(cfg.retrain.lr_schedule).lr_at(0, total_epochs=max(cfg.retrain.epochs, 1))
                model = self._train(Stage.PRUNE, model, None, epochs=every * (s + 1),
                                    start_epoch=every * s, schedule=f"0:{lr}",
                                    optim=OptimSettings.of(cfg.retrain))
            step_plan = prune.plan(model, spec, criterion="l1", example_input=self.example, seed=cfg.seed)
            model = prune.apply(model, step_plan, mode="physical")
            full = compose_plans(full, step_plan)
        self.plan_json = None
        self.epoch_checkpoints = True
        return model, full

    def _reinit(self, model, plan):
        cfg = self.cfg
        if cfg.prune.reinit != "scratch":
            return reinit(cfg.prune.reinit, model, activation=cfg.model.activation).to(self.device)
        torch.manual_seed(cfg.seed + 1)
        # the pruned architecture, re-initialised at its own (pruned) shapes by reinit("scratch")
        fresh = lambda: prune.replay(build_model(cfg, self.data.info), plan)  # noqa: E731
        return reinit("scratch", model, activation=cfg.model.activation, fresh=fresh).to(self.device)

    def _retrain_recipe(self):
        """(epochs, schedule) of retraining: Scratch-E/B budgets from K1 (setups.scratch_recipe)."""
        b = self.cfg.retrain.scratch_budget
        if b == "none":
            return self.re_epochs, self.re_sched
        return scratch_recipe(b, base_epochs=self.record.get("base_epochs"), retrain_epochs=self.re_epochs,
                              retrain_schedule=self.re_sched, speedup=self.record["pruned"]["speedup"])

    # ---- training, evaluation, files
    def _train(self, stage: Stage, model, at: Point | None, *, epochs, schedule, optim,
               regularizer=None, jsv_every=False, start_epoch=None, step_hook=None,
               compact=None, pre_hooks=()):
        """One stage of :func:`~distributed_prune.train.stage.train_epochs`, resumed from ``at``
        (None: from ``start_epoch``, without a saved training state)."""
        if start_epoch is None:
            start_epoch = at.start_epoch(stage)
        resume = self.train_state if at is not None and at.stage == stage else None
        hooks = (([self._log_jsv] if jsv_every else []) + list(pre_hooks)
                 + [self._end_epoch, *self.epoch_hooks])
        return train_epochs(model, self.data.train, stage=stage.label, epochs=epochs,
                            schedule=schedule, optim=optim, engine=self.engine,
                            evaluate=self.evaluate, start_epoch=start_epoch, resume=resume,
                            regularizer=regularizer, hooks=hooks, progress=self.progress,
                            step_hook=step_hook, compact=compact)

    def _log_jsv(self, end: EpochEnd):
        end.row["jsv_mean"] = self.jsv(end.module)["mean"]

    def _end_epoch(self, end: EpochEnd):
        """Log the row, print it, checkpoint the epoch; every rank takes part."""
        rd, row = self.rd, end.row
        if "epochs_done" in row:  # the regularization phase: how far it got (it may end mid-epoch)
            self.record["prune_epochs"] = row["epochs_done"]
        rd.log(row)
        rd.maybe_fault(f"{end.stage}:{end.epoch}:logged")
        if rd.primary and self.verbose:
            print(f"[{end.stage} {end.epoch + 1}/{end.epochs}] loss {row['train_loss']:.4f} "
                  f"top1 {100 * row['top1']:.2f}% lr {row['lr']:.3g}", flush=True)
        stage = Stage.from_label(end.stage)
        if not self.epoch_checkpoints:
            return
        rd.save_epoch(stage, end.epoch, end.module, keep=self.cfg.output.keep_checkpoints,
                      plan=self.plan_json, config=self.config, record=json.dumps(self.record),
                      **self.ckpt_extra, **end.training_state())
        dist.barrier()
        rd.maybe_fault(f"{end.stage}:{end.epoch}")

    def _save(self, name, model, **kw):
        self.rd.save(name, model, plan=self.plan_json, config=self.config,
                     record=json.dumps(self.record), **kw)

    def jsv(self, model):
        t = self.cfg.trainability
        return jsv(model, self.jsv_inputs[:t.samples].to(self.device), method=t.method, seed=self.cfg.seed)

    def evaluate(self, model):
        return evaluate(model.to(self.device), self.data.val, device=self.device, amp_dtype=self.amp,
                        channels_last=self.cfg.train.channels_last)

    def _summary(self, final_top1) -> dict:
        cfg, record = self.cfg, self.record
        dense, pruned = record["dense"], record["pruned"]
        rows = [r["top1"] for r in self.rd.metrics() if r["stage"] == "retrain"] if self.rd.primary else []
        ta = retrain_trainability_accuracy(rows, self.re_sched, self.retrain_epochs)
        pre, re_ = self.pre_epochs, self.retrain_epochs
        prune_epochs = record.get("prune_epochs", cfg.prune.epochs) if self.method.trains_before_cut else 0
        if cfg.prune.reinit == "scratch":  # only the scratch training counts: the base was discarded
            pre, prune_epochs = 0, 0
        elif record.get("base_epochs") is not None:  # K1, also for a base loaded from a file
            pre = record["base_epochs"]
        n = self.data.n_train
        return {
            "status": "complete", "label": cfg.label(), "model": cfg.model.name, "dataset": cfg.data.name,
            "seed": cfg.seed, "world_size": self.ctx.world_size, "engine": cfg.dist.engine,
            "dense": {k: dense.get(k) for k in ("top1", "params", "macs", "jsv_mean")},
            "pruned": {k: pruned.get(k) for k in ("top1", "params", "macs", "speedup", "jsv_mean")},
            "final": {"top1": final_top1},
            "trainability_accuracy": ta,
            "setup": {
                "base_model_sha256": record["base_model_sha256"], "prune_method": cfg.prune.method,
                "reinit": cfg.prune.reinit, "ratios": cfg.prune.ratios, "pretrain_epochs": pre,
                "pretrain_lr_schedule": self.pre_sched, "prune_epochs": prune_epochs,
                "prune_lr_schedule": parse_schedule(cfg.prune.lr_schedule).text if prune_epochs else None,
                "retrain_epochs": re_, "retrain_lr_schedule": self.re_sched,
                "total_epochs": pre + prune_epochs + re_,
                "total_train_macs": total_train_macs(n, dense_macs=dense["macs"], pruned_macs=pruned["macs"],
                                                     dense_epochs=pre + prune_epochs, pruned_epochs=re_),
                "train_samples": n, "batch_size": cfg.data.batch_size,
            },
            "plan_sha256": prune.Plan.from_json(self.plan_json).sha256() if self.plan_json else None,
            "time_s": round(time.time() - self.t_start, 2),
        }


# --------------------------------------------------------------------------- CLI
def run_from_cli(config_path, overrides) -> int:
    cfg = config_mod.load(config_path, overrides)
    run(cfg)
    return 0


def cli_run(args) -> int:
    return run_from_cli(args.config, args.overrides)
