"""Planning scores every layer with ONE filter_norms call (one Triton launch) and ONE transfer."""
import torch

from distributed_prune import models, prune
from distributed_prune.kernels import reference
from distributed_prune.prune import importance


def test_plan_scores_all_layers_in_one_launch_and_one_transfer(monkeypatch):
    from distributed_prune.kernels.triton import filter_norms as tfn
    net = models.create("resnet20", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    launches, transfers, tensors = [], [], []
    real_launch, real_host = tfn.filter_norms, importance._to_host

    def launch(ws, *a, **k):
        launches.append(1)
        tensors.append(len(ws))
        return real_launch(ws, *a, **k)
    monkeypatch.setattr(tfn, "filter_norms", launch)
    monkeypatch.setattr(importance, "_to_host", lambda s: transfers.append(1) or real_host(s))
    p = prune.plan(net, "0.5", criterion="l1", example_input=x)
    assert launches == [1] and transfers == [1]
    assert tensors[0] >= len(p.groups) > 5
    # same decisions as scoring each group with the reference, one by one
    with monkeypatch.context() as m:
        m.setattr(tfn, "filter_norms", lambda ws, pp, grads=None: reference.filter_norms(ws, pp, grads))
        m.setattr(importance, "score_groups", lambda c, groups, seed=0: [
            importance._accumulate(importance._weight_members(ms), reference.filter_norms(
                [mb.module.weight for mb in importance._weight_members(ms)], 1), n)
            for _, ms, n in groups])
        q = prune.plan(net, "0.5", criterion="l1", example_input=x)
    assert p.sha256() == q.sha256()
