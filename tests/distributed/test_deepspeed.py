"""DeepSpeed engine on CPU (DS_ACCELERATOR=cpu, gloo) with 2 real processes: config resolution,
equivalence with DDP, ZeRO-1 bf16 resume after a killed worker, checkpoints readable without
deepspeed, and the deepspeed launcher itself. Skipped when deepspeed is not installed."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from dist_launch import DEBUG, ROOT, SMALL, TIMEOUT, env, metrics, ok, summary, torchrun  # noqa: E402
from distributed_prune.errors import UserError  # noqa: E402
from distributed_prune.train.deepspeed_engine import resolve_config  # noqa: E402

DS = ROOT / "configs" / "deepspeed"
CPU = torch.device("cpu")


def _resolve(raw, **kw):
    args = dict(micro_batch=16, grad_accum=2, world_size=2, amp="none", device=CPU, source="cfg.json")
    args.update(kw)
    return resolve_config(raw, **args)


def test_config_batch_keys_come_from_our_config():
    c = _resolve({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}})
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (16, 2, 64)
    assert c["managed_gradient_accumulation"] is False
    assert c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False
    for key, bad in (("train_batch_size", 128), ("gradient_accumulation_steps", 4),
                     ("train_micro_batch_size_per_gpu", 8)):
        with pytest.raises(UserError, match=key):
            _resolve({key: bad})


def test_config_precision_is_train_amp():
    assert _resolve(None, amp="bf16")["bf16"]["enabled"] is True           # default dict: from train.amp
    assert _resolve(None, amp="bf16")["data_types"]["buffer_dtype"] == "bf16"
    with pytest.raises(UserError, match="bf16.enabled=true conflicts with train.amp=none"):
        _resolve({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    with pytest.raises(UserError, match="needs a GPU"):
        _resolve({"fp16": {"enabled": True}}, amp="fp16")
    with pytest.raises(UserError, match="stage=3"):
        _resolve({"zero_optimization": {"stage": 3}})
    with pytest.raises(UserError, match="optimizer"):
        _resolve({"optimizer": {"type": "Adam"}})


def test_shipped_configs_resolve():
    import json

    for name, amp in (("zero0_fp32", "none"), ("zero1_bf16", "bf16"), ("zero2_bf16", "bf16")):
        c = _resolve(json.loads((DS / f"{name}.json").read_text()), amp=amp)
        assert c["train_batch_size"] == 64
    c = _resolve(json.loads((DS / "zero2_fp16.json").read_text()), amp="fp16", device=torch.device("cuda"))
    assert c["fp16"]["enabled"] and c["zero_optimization"]["stage"] == 2


def _load_without_deepspeed(path: Path) -> dict:
    """torch.load(weights_only=True) in a fresh interpreter where `import deepspeed` fails."""
    code = ("import sys, torch; sys.modules['deepspeed'] = None\n"
            f"o = torch.load({str(path)!r}, map_location='cpu', weights_only=True)\n"
            "print(sorted(o), sorted({str(v.dtype) for v in o['state_dict'].values()}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_zero0_matches_ddp(tmp_path, ddp_run):
    """ZeRO-0 fp32 takes the same steps as DDP: same losses, bit for bit (no double loss scaling
    over gradient accumulation, LR reaching the optimizer that steps)."""
    out = tmp_path / "run"
    ok(torchrun([DEBUG, f"output.dir={out}", *SMALL, "dist.engine=deepspeed",
                 f"dist.deepspeed_config={DS / 'zero0_fp32.json'}"], cwd=tmp_path))
    s = summary(out)
    assert s["world_size"] == 2 and s["engine"] == "deepspeed" and s["final"]["top1"] > 0.75
    for a, b in zip(metrics(ddp_run["out"]), metrics(out)):
        assert (a["stage"], a["epoch"], a["lr"]) == (b["stage"], b["epoch"], b["lr"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6), (a, b)
    for name in ("final.pt", "retrain-0001.pt"):
        printed = _load_without_deepspeed(out / "checkpoints" / name)
        assert "'state_dict'" in printed and "float32" in printed and "bfloat16" not in printed


def test_zero1_bf16_killed_worker_resumes(tmp_path):
    out = tmp_path / "run"
    r = ok(torchrun([DEBUG, f"output.dir={out}", *SMALL, "dist.engine=deepspeed", "train.amp=bf16",
                     f"dist.deepspeed_config={DS / 'zero1_bf16.json'}"],
                    torchrun_args=["--max-restarts", "1"], cwd=tmp_path,
                    DPRUNE_FAULT="retrain:0", DPRUNE_FAULT_RANK="1"))
    assert (out / ".fault-injected").exists() and "after retrain-0000.pt" in r.stdout
    assert [(m["stage"], m["epoch"]) for m in metrics(out)] == [
        ("pretrain", 0), ("pretrain", 1), ("retrain", 0), ("retrain", 1)]
    s = summary(out)
    assert s["world_size"] == 2 and s["final"]["top1"] > 0.75
    # the checkpoint is the project's format: fp32 weights (DeepSpeed's bf16 copy is not what is
    # saved at the end), and the ZeRO-partitioned optimizer state gathered into torch's format
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    assert {v.dtype for v in final["state_dict"].values()} <= {torch.float32, torch.int64}
    ep = torch.load(out / "checkpoints" / "retrain-0001.pt", weights_only=True)["engine"]
    assert set(ep["optimizer"]) == {"state", "param_groups"}
    assert "momentum_buffer" in ep["optimizer"]["state"][0]
    assert ep["master"] and all(v.dtype == torch.float32 for v in ep["master"].values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher(tmp_path):
    """launch/deepspeed_hostfile.sh: `deepspeed --no_local_rank --module distributed_prune run ...`
    on the local node (no hostfile), 2 CPU processes."""
    bindir = Path(sys.executable).parent
    if not (bindir / "deepspeed").exists() and not shutil.which("deepspeed"):
        pytest.skip("no deepspeed launcher on PATH")
    out = tmp_path / "run"
    e = env(NUM_GPUS=2, MASTER_PORT=_free_port(), HOSTFILE=tmp_path / "no-hostfile",
            PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    r = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed_hostfile.sh"), DEBUG, f"output.dir={out}",
                        *SMALL, "pretrain.epochs=1", "retrain.epochs=1",
                        f"dist.deepspeed_config={DS / 'zero0_fp32.json'}"],
                       capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env=e)
    ok(r)
    s = summary(out)
    assert s["world_size"] == 2 and s["engine"] == "deepspeed"
    assert [(m["stage"], m["epoch"]) for m in metrics(out)] == [("pretrain", 0), ("retrain", 0)]
