"""train.stage.train_epochs: the same weights as a hand-written SGD loop, hooks once per epoch,
resume from a training state, and early stop from a hook."""
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distributed_prune.train.stage import EngineSettings, OptimSettings, train_epochs

OPT = OptimSettings(momentum=0.9, weight_decay=0.0)
ENGINE = EngineSettings(device=torch.device("cpu"))
SCHEDULE = "0:0.1,1:0.02"


def _setup():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), DataLoader(TensorDataset(x, y), batch_size=8)


def _reference(model, loader, epochs):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = 0.1 if epoch == 0 else 0.02
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return model


def _evaluate(model):
    return 0.5


def test_matches_a_plain_sgd_loop_and_calls_hooks():
    model, loader = _setup()
    expected = _reference(copy.deepcopy(model), loader, 2)
    rows = []
    got = train_epochs(model, loader, stage="retrain", epochs=2, schedule=SCHEDULE, optim=OPT,
                       engine=ENGINE, evaluate=_evaluate, hooks=[lambda e: rows.append(e.row)])
    for a, b in zip(got.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)
    assert [(r["stage"], r["epoch"], r["lr"], r["top1"]) for r in rows] == \
        [("retrain", 0, 0.1, 0.5), ("retrain", 1, 0.02, 0.5)]


def test_resume_from_training_state_equals_uninterrupted():
    model, loader = _setup()
    full = train_epochs(copy.deepcopy(model), loader, stage="pretrain", epochs=2, schedule=SCHEDULE,
                        optim=OPT, engine=ENGINE, evaluate=_evaluate)
    saved = {}

    def keep(end):
        saved.update(state=end.training_state(), weights=copy.deepcopy(end.module.state_dict()))
        end.stop = True   # end the stage after the first epoch, as an end condition would

    train_epochs(model, loader, stage="pretrain", epochs=2, schedule=SCHEDULE, optim=OPT, engine=ENGINE,
                 evaluate=_evaluate, hooks=[keep])
    _, loader = _setup()
    fresh, _ = _setup()
    fresh.load_state_dict(saved["weights"])
    seen = []
    resumed = train_epochs(fresh, loader, stage="pretrain", epochs=2, schedule=SCHEDULE, optim=OPT,
                           engine=ENGINE, evaluate=_evaluate, start_epoch=1, resume=saved["state"],
                           hooks=[lambda e: seen.append(e.epoch)])
    assert seen == [1]
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b)
