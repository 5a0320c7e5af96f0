"""LR schedules: the paper's epoch:lr dictionaries, cosine, warmup, multistep, PxFy offsets."""

import pytest
import torch

from distributed_prune.errors import UserError
from distributed_prune.train.schedules import EpochIterLR, parse_schedule


@pytest.mark.parametrize("text, expected", [
    ("0:0.01,60:0.001,90:0.0001",
     {0: 0.01, 59: 0.01, 60: 0.001, 89: 0.001, 90: 1e-4, 119: 1e-4}),
    ("0:0.001,80:0.0001", {0: 1e-3, 79: 1e-3, 80: 1e-4, 119: 1e-4}),
    ("0:0.1,30:0.01,60:0.001,90:1e-4,105:1e-5",
     {0: 0.1, 29: 0.1, 30: 0.01, 60: 1e-3, 90: 1e-4, 104: 1e-4, 105: 1e-5, 119: 1e-5}),
    ("0.01", {0: 0.01, 500: 0.01}),
])
def test_step_dictionaries(text, expected):
    s = parse_schedule(text)
    for epoch, lr in expected.items():
        assert s.lr_at(epoch) == lr
        assert s.lr_at(epoch, it=7, iters_per_epoch=10) == lr  # constant within an epoch


def test_canonical_text_and_equality():
    s = parse_schedule(" 0:0.01, 60:1e-3 ")
    assert s.text == "0:0.01,60:0.001"
    assert s == parse_schedule(s.text) == "0:0.01,60:0.001"
    assert s != parse_schedule("0:0.01,61:0.001")
    assert parse_schedule("0.1") == parse_schedule("0:0.1")
    assert parse_schedule(0.1) == parse_schedule("0:0.1")  # YAML may deliver a float


def test_as_dict_and_first_stage():
    s = parse_schedule("0:0.01,60:0.001,90:0.0001")
    assert s.as_dict(120) == {0: 0.01, 60: 0.001, 90: 0.0001}
    assert s.as_dict(70) == {0: 0.01, 60: 0.001}
    assert s.first_stage_epochs(120) == 60
    assert s.first_stage_epochs(40) == 40
    assert parse_schedule("0.1").first_stage_epochs(30) == 30
    assert parse_schedule("cosine:0.1:0").first_stage_epochs(90) == 90


def test_cosine_endpoints_midpoint_and_per_iteration():
    s = parse_schedule("cosine:0.01:0.0001")
    assert s.lr_at(0, total_epochs=100) == pytest.approx(0.01)
    assert s.lr_at(50, total_epochs=100) == pytest.approx((0.01 + 0.0001) / 2)
    assert s.lr_at(100, total_epochs=100) == pytest.approx(0.0001)
    a = s.lr_at(10, 0, 4, 100)
    b = s.lr_at(10, 2, 4, 100)
    assert a > b > s.lr_at(11, 0, 4, 100)
    assert b == pytest.approx(s.lr_at(10.5, total_epochs=100))
    with pytest.raises(ValueError, match="total_epochs"):
        s.lr_at(3)
    d = s.as_dict(4)
    assert list(d) == [0, 1, 2, 3]


def test_warmup():
    s = parse_schedule("warmup:5+cosine:0.1:0")
    assert s.text == "warmup:5+cosine:0.1:0"
    n, total = 10, 100
    lrs = [s.lr_at(e, i, n, total) for e in range(5) for i in range(n)]
    assert lrs[0] == pytest.approx(0.1 / 50)  # ~0 at the start: 1/(E*iters) of the LR
    assert all(b > a for a, b in zip(lrs, lrs[1:]))  # increases through the warmup
    cos = parse_schedule("cosine:0.1:0")
    assert s.lr_at(5, 0, n, total) == cos.lr_at(5, 0, n, total)
    assert s.lr_at(4, n - 1, n, total) == pytest.approx(cos.lr_at(4, n - 1, n, total))
    w = parse_schedule("warmup:2+0:0.1,30:0.01")
    assert w.lr_at(0, 0, 2) == pytest.approx(0.025) and w.lr_at(31) == 0.01


def test_multistep_equals_dictionary():
    m = parse_schedule("multistep:0.1:0.1:30/60")
    d = parse_schedule("0:0.1,30:0.01,60:0.001")
    assert m == d and m.text == d.text
    for e in (0, 29, 30, 59, 60, 200):
        assert m.lr_at(e) == d.lr_at(e)


def test_offset_pxfy():
    s = parse_schedule("0:0.1,30:0.01,60:0.001")
    o = s.offset(30)
    assert o.lr_at(0) == 0.01 and o.lr_at(29) == 0.01 and o.lr_at(30) == 0.001
    assert o.text == "0:0.01,30:0.001"
    assert s.offset(45).text == "0:0.01,15:0.001"
    assert s.offset(0) == s
    # cosine: the retrain run's epochs e of T - x equal epochs x + e of the overall schedule
    c = parse_schedule("cosine:0.1:0")
    co = c.offset(30)
    for e in (0, 10, 59):
        assert co.lr_at(e, 1, 3, 60) == pytest.approx(c.lr_at(30 + e, 1, 3, 90))
    assert parse_schedule(co.text) == co and co.offset(5) == c.offset(35)
    assert co.first_stage_epochs(60) == 60
    # warmup already over at the offset: only the wrapped schedule remains
    assert parse_schedule("warmup:5+0:0.1,30:0.01").offset(30) == "0:0.01"


@pytest.mark.parametrize("text, fragment", [
    ("60:0.1", "start at epoch 0"),
    ("0:0.1,0:0.2", "strictly increasing"),
    ("0:0.1,60:0.01,30:0.001", "strictly increasing"),
    ("abc", "'abc'"),
    ("0:-0.1", "> 0"),
    ("-0.1", "> 0"),
    ("", "empty"),
    ("0:0.1,", "EPOCH:LR"),
    ("cosine:0.1", "cosine:LR0:LRMIN"),
    ("cosine:0.1:0.2", "LRMIN"),
    ("warmup:0+0.1", "warmup epochs"),
    ("multistep:0.1:0.1:60/30", "strictly increasing"),
    ("0:nan", "finite"),
])
def test_errors_name_the_text(text, fragment):
    with pytest.raises(UserError) as exc:
        parse_schedule(text)
    msg = str(exc.value)
    assert fragment in msg and repr(text) in msg and "\n" not in msg


def test_epoch_iter_lr_driver_respects_lr_scale_and_resumes():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_scale": 0.1}], lr=1.0)
    sched = EpochIterLR(opt, "0:0.1,2:0.01", total_epochs=4, iters_per_epoch=3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])
    assert sched.step(2, 1) == 0.01
    assert sched.get_last_lr() == pytest.approx([0.01, 0.001])
    state = sched.state_dict()
    opt2 = torch.optim.SGD([p1], lr=1.0)
    sched2 = EpochIterLR(opt2, parse_schedule("multistep:0.1:0.1:2"), 4, 3)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(UserError, match="does not match"):
        EpochIterLR(opt2, "0:0.1", 4, 3).load_state_dict(state)


def test_pxfy_cosine_anneals_over_the_whole_run():
    from distributed_prune import config as config_mod

    total, x, n = 40, 10, 7
    cfg = config_mod.Config(pxfy={"total_epochs": total, "prune_at": x,
                                  "lr_schedule": "cosine:0.1:0"})
    (pe, ps), (re, rs) = cfg.effective_pretrain(), cfg.effective_retrain()
    assert (pe, re) == (x, total - x) and ps == "over:40+cosine:0.1:0"
    pre, post = parse_schedule(ps), parse_schedule(rs)
    import math
    def ref(e, it):  # the cosine formula over all T epochs, per iteration
        t = (e + it / n) / total
        return 0.1 * (1 + math.cos(math.pi * t)) / 2
    for e in range(pe):  # the stage passes its own length as total_epochs
        for it in (0, 3):
            assert pre.lr_at(e, it, n, pe) == pytest.approx(ref(e, it), abs=1e-12)
    for e in range(re):
        for it in (0, 5):
            assert post.lr_at(e, it, n, re) == pytest.approx(ref(x + e, it), abs=1e-12)
    # a step dictionary needs no wrapping; `over` round-trips through its text
    assert parse_schedule("0:0.1,30:0.01").over(90).text == "0:0.1,30:0.01"
    assert parse_schedule(ps) == ps and parse_schedule(ps).first_stage_epochs(x) == x


@pytest.mark.parametrize("text, factor, expected", [
    ("0:0.1,30:0.01,60:0.001,75:0.0001", 321 / 90, "0:0.1,107:0.01,214:0.001,268:0.0001"),
    ("0:0.1,100:0.01,150:0.001", 1.6, "0:0.1,160:0.01,240:0.001"),
    ("cosine:0.1:0", 2.5, "cosine:0.1:0"),
    ("warmup:5+0:0.1,30:0.01", 2.0, "warmup:10+0:0.1,60:0.01"),
    ("over:40+cosine:0.1:0", 1.5, "over:60+cosine:0.1:0"),
])
def test_stretch_scales_epoch_positions(text, factor, expected):
    s = parse_schedule(text).stretch(factor)
    assert s.text == expected
    base = parse_schedule(text)
    if text[0].isdigit():  # dictionaries: each LR holds for f times as many epochs (+-1)
        total = 200
        for lr in set(base.table.values()):
            n0 = sum(base.lr_at(e) == lr for e in range(total))
            n1 = sum(s.lr_at(e) == lr for e in range(round(total * factor)))
            assert abs(n1 - n0 * factor) <= 1, (lr, n0, n1)
    if text.startswith("over"):  # position t of the run has the same LR, stretched or not
        for e in (0, 10, 30):
            assert s.lr_at(int(e * factor), total_epochs=1) == pytest.approx(base.lr_at(e, total_epochs=1))
    with pytest.raises(ValueError, match="factor"):
        parse_schedule(text).stretch(0)
