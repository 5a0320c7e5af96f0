"""Launch helpers for the distributed tests: real processes (torchrun / the deepspeed launcher,
gloo on CPU), one thread each, every output under pytest's tmp_path."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
# debug_cpu.yaml shortened: 2 + 2 epochs on digits (about 10 s with 2 processes on 2 cores); CPU
# and gloo even where a GPU exists (2 processes may share one GPU, which nccl refuses)
SMALL = ["pretrain.epochs=2", "pretrain.lr_schedule=0:0.05,1:0.005", "retrain.epochs=2",
         "retrain.lr_schedule=0:0.01,1:0.001", "trainability.samples=8", "train.device=cpu"]
TIMEOUT = int(os.environ.get("DPRUNE_DIST_TEST_TIMEOUT", "300"))


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CI="true",
             DPRUNE_DIST_TIMEOUT_MIN="3")     # a hung collective fails the test, not CI
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DPRUNE_FAULT",
              "DPRUNE_FAULT_RANK", "DPRUNE_DUMP_RANK_STATE"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def torchrun(args, *, nproc=2, torchrun_args=(), cwd, **extra_env) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m distributed_prune run
    ...``; ``cwd`` should be a tmp dir (nothing may be written into the repository)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), *torchrun_args, "-m", "distributed_prune", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
                          env=env(**extra_env))


def single(args, *, cwd, **extra_env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distributed_prune", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
                          env=env(**extra_env))


def ok(r: subprocess.CompletedProcess):
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}"
    assert "terminate called" not in r.stderr, r.stderr[-3000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())
