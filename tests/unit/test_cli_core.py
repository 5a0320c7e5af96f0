import json
import subprocess
import sys

import pytest
import torch

from distributed_prune import checkpoint, models, prune
from distributed_prune.cli import main
from distributed_prune.errors import UserError


def test_plan_json_matches_paper(capsys):
    assert main(["plan", "--model", "resnet56", "--ratios", "[0,0.7,0.7,0.7,0]", "--num-classes", "10",
                 "--input-size", "3,32,32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("dense_macs", "pruned_macs", "dense_params", "pruned_params", "speedup"):
        assert k in out
    assert abs(out["speedup"] / 3.59 - 1) < 0.01
    assert len(out["layers"]) == 27 and all(r["kept"] == 4 for r in out["layers"] if r["channels"] == 16)


def test_plan_table_text(capsys):
    assert main(["plan", "--model", "vgg19_c", "--ratios", "[1-15:0.5]", "--num-classes", "100",
                 "--input-size", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "speedup 3.61x" in out and "features.3" in out


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--model", "resnet56", "--ratios", "[0,1.2,0.7,0.7,0]", "--input-size", "3,32,32"], "outside [0, 1)"),
    (["plan", "--model", "nonet", "--ratios", "0.5"], "nonet"),
    (["plan", "--model", "resnet56", "--ratios", "*zzz*:0.5", "--input-size", "3,32,32"], "*zzz*"),
    (["plan", "--model", "resnet56", "--ratios", "0.5", "--input-size", "3,x"], "--input-size"),
    (["plan", "--model", "lenet5", "--ratios", "0.5", "--input-size", "3,8,8"], "cannot run on it"),
    (["plan", "--ratios", "0.5"], "--model"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_module_entry_point_subprocess():
    r = subprocess.run([sys.executable, "-m", "distributed_prune", "plan", "--model", "mlp_7_linear",
                        "--ratios", "[0-5:0.8,6:0]", "--num-classes", "10", "--input-size", "64", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pruned_params"] < json.loads(r.stdout)["dense_params"]
    r = subprocess.run([sys.executable, "-m", "distributed_prune", "plan", "--model", "mlp_7_linear",
                        "--ratios", "[0-5:1.5]", "--input-size", "64"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_checkpoint_roundtrip_weights_only(tmp_path):
    net = models.create("resnet20", num_classes=10)
    p = prune.plan(net, "[0,0.5,0.5,0.5,0]", example_input=torch.zeros(1, 3, 32, 32))
    small = prune.apply(net, p)
    path = checkpoint.save(tmp_path / "ck.pt", small, plan=p, config={"model": {"name": "resnet20"}}, epoch=3)
    obj = torch.load(path, weights_only=True)
    assert obj["epoch"] == 3 and obj["config"]["model"]["name"] == "resnet20"
    fresh = prune.replay(models.create("resnet20", num_classes=10), prune.Plan.from_json(obj["plan"]))
    checkpoint.load_state(fresh, obj["state_dict"])
    assert checkpoint.weights_sha256(fresh) == checkpoint.weights_sha256(small)
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_checkpoint_wrong_architecture_names_key(tmp_path):
    small = prune.apply(models.create("resnet20"), prune.plan(models.create("resnet20"), "[0,0.5,0.5,0.5,0]",
                                                              example_input=torch.zeros(1, 3, 32, 32)))
    path = checkpoint.save(tmp_path / "ck.pt", small)
    with pytest.raises(UserError, match="layer1.0.conv1.weight"):
        checkpoint.load_state(models.create("resnet20"), checkpoint.load(path)["state_dict"])
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.pt"
    checkpoint.atomic_save({"a": torch.ones(2)}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_save({"a": Boom()}, target)
    torch.testing.assert_close(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [f.name for f in tmp_path.iterdir()] == ["x.pt"]


def test_launcher_local_rank_argument_is_ignored(capsys):
    assert main(["--local_rank=1", "models"]) == 0
    assert "resnet56" in capsys.readouterr().out


def test_plan_reports_widths_off_multiples_of_8_and_the_round_to_8_cost(capsys):
    args = ["plan", "--model", "resnet56", "--ratios", "[0,0.7,0.7,0.7,0]", "--num-classes", "10",
            "--input-size", "3,32,32"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    odd = {r["layer"]: r["kept"] for r in out["not_multiple_of_8"]}
    assert odd == {r["layer"]: r["kept"] for r in out["layers"] if r["kept"] % 8 and r["kept"] != r["channels"]}
    assert odd and all(k % 8 for k in odd.values())         # resnet56 at 0.7 keeps 4 / 9 / 19 channels
    # the cost: the same plan with round_to=8, counted independently
    net = models.create("resnet56", num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    from distributed_prune import flops

    p8 = prune.plan(net, "[0,0.7,0.7,0.7,0]", criterion="l1", example_input=x, round_to=8)
    macs8 = flops.count(prune.apply(net, p8, mode="physical"), x)["macs"]
    assert out["round_to_8"]["pruned_macs"] == macs8 > out["pruned_macs"]
    assert out["round_to_8"]["speedup"] == pytest.approx(out["dense_macs"] / macs8)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "not a multiple of 8" in text and f"-> {out['round_to_8']['speedup']:.2f}x" in text
    # already rounded: nothing to report
    assert main([*args, "--round-to", "8", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["not_multiple_of_8"] == [] and again["round_to_8"] is None
