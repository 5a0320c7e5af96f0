"""The single owners of cross-cutting concerns: the registry, the dtype names, the command-line
error path."""
import subprocess
import sys

import pytest
import torch

from distributed_prune import cmdline, dtypes
from distributed_prune.errors import UserError
from distributed_prune.registry import Registry


# ------------------------------------------------------------------------------------- registry

def test_registry_add_lookup_and_errors():
    reg = Registry("widget", "thing.name")
    assert reg.register("b")(len) is len           # the decorator returns what it registers
    reg.add("a", max)
    assert list(reg) == ["a", "b"] and len(reg) == 2 and reg["a"] is max and "b" in reg
    assert reg.lookup("b") is len and reg.get("zz") is None
    with pytest.raises(ValueError, match="'a' registered twice"):
        reg.add("a", min)
    with pytest.raises(UserError) as e:
        reg.lookup("zz")
    assert str(e.value) == "thing.name: unknown widget 'zz'; choose one of a, b"


def test_registry_lazy_entry_loads_once_on_lookup():
    calls = []
    reg = Registry("engine", "dist.engine")
    reg.add_lazy("heavy", lambda: calls.append(1) or "loaded")
    assert "heavy" in reg and list(reg) == ["heavy"] and calls == []   # listing loads nothing
    assert reg.lookup("heavy") == "loaded" and reg["heavy"] == "loaded" and calls == [1]
    with pytest.raises(ValueError):
        reg.add("heavy", "again")


def test_project_registries_share_the_error():
    from distributed_prune.data import build_datasets
    from distributed_prune.prune.reinit import reinit
    from distributed_prune.train.engine import build_engine

    for call, key in ((lambda: build_datasets("nope"), "data.name"),
                      (lambda: reinit("nope", torch.nn.Linear(2, 2)), "prune.reinit"),
                      (lambda: build_engine("nope", None, None), "dist.engine")):
        with pytest.raises(UserError, match=f"^{key}: unknown .* 'nope'; choose one of "):
            call()


def test_deepspeed_is_listed_without_being_imported():
    code = ("import sys\nfrom distributed_prune.train import engine\n"
            "assert sorted(engine.ENGINES) == ['ddp', 'deepspeed'], list(engine.ENGINES)\n"
            "assert 'deepspeed' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("name,dtype", [
    ("fp32", torch.float32), ("float32", torch.float32), ("float", torch.float32),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
    ("float16", torch.float16), ("half", torch.float16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_names(name, dtype):
    assert dtypes.parse(name) is dtype


def test_dtype_errors_and_amp_modes():
    with pytest.raises(UserError, match="^--dtype: unknown dtype 'fp8'; choose one of fp32, bf16, fp16$"):
        dtypes.parse("fp8", "--dtype")
    assert dtypes.amp_dtype("none") is None and dtypes.amp_dtype("bf16") is torch.bfloat16
    assert dtypes.amp_dtype("fp16") is torch.float16
    with pytest.raises(UserError, match="train.amp"):
        dtypes.amp_dtype("fp32")
    assert [dtypes.amp_mode(n) for n in ("fp32", "bfloat16", torch.float16)] == ["none", "bf16", "fp16"]


# -------------------------------------------------------------------------------------- cmdline

def test_argument_errors_are_one_line_exit_2(capsys):
    p = cmdline.ArgumentParser(prog="dprune thing")
    p.add_argument("--size", type=cmdline.parse_image_size)
    assert p.parse_args(["--size", "40x30"]).size == (40, 30)
    assert cmdline.run(lambda: p.parse_args(["--size", "big"])) == 2
    err = capsys.readouterr().err
    assert err == "dprune: error: dprune thing: argument --size: expected WIDTHxHEIGHT, got 'big'\n"


def test_run_exit_status():
    assert cmdline.run(lambda: None) == 0 and cmdline.run(lambda: 3) == 3

    def interrupted():
        raise KeyboardInterrupt

    assert cmdline.run(interrupted) == 130
    with pytest.raises(RuntimeError):   # a bug stays a traceback
        cmdline.run(lambda: (_ for _ in ()).throw(RuntimeError("bug")))


@pytest.mark.parametrize("text,ok", [("3,32,32", (3, 32, 32)), ("64", (64,)), ("3,x", None),
                                     ("3,0,4", None), ("", None)])
def test_parse_input_size(text, ok):
    if ok is None:
        with pytest.raises(UserError, match="--input-size"):
            cmdline.parse_input_size(text)
    else:
        assert cmdline.parse_input_size(text) == ok
