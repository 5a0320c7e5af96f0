"""Backend selection: auto rules, forcing, measured tuning table, lazy imports."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_prune import kernels
from distributed_prune.errors import UserError
from distributed_prune.kernels import dispatch, reference

CPU = torch.device("cpu")


def test_auto_rule_without_measurements(monkeypatch):
    """filter_norms: Triton when it can run; masked_conv2d with no tuning entry: gather when a
    channel is masked, reference when nothing is - never an unmeasured Triton kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select("filter_norms", CPU) == "triton"
    assert dispatch.select("masked_conv2d", CPU) == "gather"
    assert dispatch.select("masked_conv2d", CPU, masked=False) == "reference"
    assert dispatch.select("masked_conv2d", CPU, gatherable=False) == "reference"


def test_auto_falls_back_to_reference_without_gpu_or_interpreter(monkeypatch):
    """No GPU and no interpreter: a Triton launch would fail ("0 active drivers")."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.select("filter_norms", CPU) == "reference"
    assert dispatch.select("masked_conv2d", CPU) == "gather"
    w = [torch.randn(4, 3, 3, 3)]
    torch.testing.assert_close(kernels.filter_norms(w, 1), reference.filter_norms(w, 1))
    x, m = torch.randn(1, 3, 5, 5), torch.tensor([1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(kernels.masked_conv2d(x, w[0], None, m),
                               reference.masked_conv2d(x, w[0], None, m))


def test_forcing_by_env_and_context_manager(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")      # so that "triton" is runnable on CPU
    monkeypatch.setenv("DPRUNE_KERNELS", "reference")
    assert dispatch.select("filter_norms", CPU) == "reference"
    with kernels.set_backend("triton"):          # set_backend wins over the variable
        assert dispatch.get_backend() == "triton"
        assert dispatch.select("filter_norms", CPU) == "triton"
        with kernels.set_backend("reference"):
            assert dispatch.select("filter_norms", CPU) == "reference"
        assert dispatch.get_backend() == "triton"
    assert dispatch.get_backend() == "reference"
    monkeypatch.setenv("DPRUNE_KERNELS", "auto")
    assert dispatch.get_backend() == "auto"
    kernels.set_backend("reference")               # plain call: stays until cleared
    assert dispatch.get_backend() == "reference"
    kernels.set_backend(None)
    assert dispatch.get_backend() == "auto"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(UserError, match="backend"):
        kernels.set_backend("cuda")
    monkeypatch.setenv("DPRUNE_KERNELS", "fast")
    with pytest.raises(UserError, match="DPRUNE_KERNELS"):
        dispatch.get_backend()


def test_forced_triton_without_a_way_to_run_it_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.set_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        kernels.filter_norms([torch.ones(2, 2)], 1)


def test_tuning_table_picks_backend_per_bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x_shape, w_shape = (2, 8, 16, 16), (16, 8, 3, 3)
    key = dispatch.shape_bucket(x_shape, w_shape, (1, 1), 1, 0.5)
    other = dispatch.shape_bucket(x_shape, w_shape, (2, 2), 1, 0.5)
    assert key != other
    table = tmp_path / "tuning.json"
    table.write_text(json.dumps({"version": 1, "entries": {f"cpu|masked_conv2d|{key}": "reference"}}))
    monkeypatch.setenv("DPRUNE_TUNING_FILE", str(table))
    assert dispatch.select("masked_conv2d", CPU, lambda: key) == "reference"
    assert dispatch.select("masked_conv2d", CPU, lambda: other) == "gather"   # no data: rule
    # end to end: the measured choice is honoured by masked_conv2d itself
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    mask = (torch.arange(16) % 2).float()
    calls = []
    monkeypatch.setattr(reference, "masked_conv2d",
                        lambda *a, **k: calls.append(1) or torch.zeros(1))
    kernels.masked_conv2d(x, w, None, mask, padding=1)
    assert calls == [1]


def test_import_has_no_side_effects():
    code = ("import sys, distributed_prune.kernels as k; "
            "assert 'triton' not in sys.modules and 'torch' not in sys.modules; "
            "k.filter_norms; k.MaskedConv2d; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; print('ok')")
    import distributed_prune
    root = Path(distributed_prune.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
