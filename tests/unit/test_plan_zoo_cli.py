"""`dprune plan` shows what the default rule skipped and grouped-conv rounding; plans that a
grouped conv cannot honour are refused naming the layer; the CLI answers --help and argument
errors without importing torch; `dprune bench plan` output contract (timings never checked)."""
import json
import subprocess
import sys

import pytest
import torch

from distributed_prune import models, prune
from distributed_prune.cli import main
from distributed_prune.errors import UserError


def test_plan_text_shows_rounding(capsys):
    assert main(["plan", "--model", "resnext50_32x4d", "--ratios", "layer1.0.conv1:0.3",
                 "--num-classes", "10", "--input-size", "3,32,32"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("layer1.0.conv1 ")]
    assert "rounded from 89" in line and line.split()[3] == "96"


def test_plan_json_lists_skipped(capsys):
    assert main(["plan", "--model", "shufflenet_v2_x0_5", "--ratios", "0.5", "--num-classes", "10",
                 "--input-size", "3,32,32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] and all(out["layer_ratios"][n] == 0 for n in out["skipped"])
    assert any(r["kept"] < r["channels"] for r in out["layers"])
    assert main(["plan", "--model", "shufflenet_v2_x0_5", "--ratios", "0.5", "--num-classes", "10",
                 "--input-size", "3,32,32"]) == 0
    text = capsys.readouterr().out
    assert f"skipped {len(out['skipped'])} layer(s)" in text


def test_explicit_spec_through_channel_shuffle_is_one_line(capsys):
    name = "stage2.0.branch1.2"  # its output is concatenated, then shuffled
    assert main(["plan", "--model", "shufflenet_v2_x0_5", "--ratios", f"{name}:0.5",
                 "--num-classes", "10", "--input-size", "3,32,32"]) == 2
    err = capsys.readouterr().err
    assert f"'{name}'" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_non_uniform_grouped_plan_is_refused(mode):
    """A plan (e.g. hand-written JSON) removing different positions from different conv groups
    would give a wrong grouped conv: refused, naming it, in both modes."""
    net = models.create("resnext50_32x4d", num_classes=10).eval()
    x = torch.zeros(1, 3, 32, 32)
    p = prune.plan(net, "layer1.0.conv1:0.25", example_input=x)
    g = p.groups[0]
    g.keep = [i for i in range(g.n) if i != 5]  # one channel of one group only
    with pytest.raises(UserError, match=r"'layer1\.0\.conv2'"):
        prune.apply(net, p, mode=mode)


def _imported(argv):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "distributed_prune", *argv],
                       capture_output=True, text=True, timeout=120)
    mods = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    return r, mods


def test_help_and_argument_errors_do_not_import_torch():
    r, mods = _imported(["--help"])
    assert r.returncode == 0 and "plan" in r.stdout and "torch" not in mods
    r, mods = _imported(["plan", "--ratios", "0.5"])
    assert r.returncode == 2 and "--model" in r.stderr and "torch" not in mods
    r, mods = _imported(["data", "write-beton", "--help"])  # the data options are still there
    assert r.returncode == 0 and "--dataset" in r.stdout


def test_bench_plan_contract(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--model", "resnet18", "--ratios", "0.5", "--input-size", "3,32,32",
                 "--num-classes", "10", "--reps", "1", "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == res and res["cpu_threads"] == 1
    (row,) = res["rows"]
    assert row["same_shapes"] and row["groups"] == 8
    for k in ("dprune_s", "dprune_plan_s", "dprune_cut_s", "tp_s", "tp_build_s", "tp_cut_s", "ratio"):
        assert row[k] > 0
    assert main(["bench", "plan", "--reps", "0"]) == 2
