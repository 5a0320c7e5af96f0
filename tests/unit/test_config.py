from pathlib import Path

import pytest

from distributed_prune import config
from distributed_prune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_base_yaml_is_every_default():
    assert config.load(ROOT / "configs" / "base.yaml") == config.Config()


def test_schedules_stay_strings_not_sexagesimal():
    cfg = config.load(None, ["retrain.lr_schedule=0:0.1", "seed=3"])
    assert cfg.retrain.lr_schedule == "0:0.1" and cfg.seed == 3
    assert config.yaml_load("a: 0:0.1\nb: 1:20\nc: 0.5\nd: 3") == {"a": "0:0.1", "b": "1:20", "c": 0.5, "d": 3}


def test_ratio_list_from_yaml_becomes_canonical_text():
    cfg = config.load(None, ["prune.ratios=[0,0.7,0.7,0.7,0]"])
    assert cfg.prune.ratios == "[0,0.7,0.7,0.7,0]"


@pytest.mark.parametrize("ov,needle", [
    ("prune.reg.lw_opx=1", "prune.reg.lw_opx"), ("dist.engine=horovod", "dist.engine"),
    ("pxfy.total_epochs=10", "pxfy.lr_schedule"), ("seed.x=1", "seed"), ("data.batch_size=0", "data.batch_size"),
])
def test_errors_name_the_key(ov, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        config.load(None, [ov])


def test_pxfy_effective_schedules():
    cfg = config.load(None, ["pxfy.total_epochs=120", "pxfy.prune_at=30",
                             "pxfy.lr_schedule=0:0.1,30:0.01,60:0.001,90:0.0001,105:0.00001"])
    assert cfg.effective_pretrain() == (30, "0:0.1,30:0.01,60:0.001,90:0.0001,105:1e-05")
    assert cfg.effective_retrain() == (90, "0:0.01,30:0.001,60:0.0001,75:1e-05")
