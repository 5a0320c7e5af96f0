"""dist.static_graph=auto with 2 real processes (gloo): DDP's static graph is on for a plain
step and for a loss on weights outside forward (TPP's), off with gradient accumulation (whose
no_sync micro-steps the static reducer refuses), and the ranks stay identical either way."""
import os
import socket

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    from distributed_prune import models
    from distributed_prune.train.engine import build_engine
    from distributed_prune.train.loop import train_epoch
    from distributed_prune.train.optim import build_optimizer
    from distributed_prune.train.schedules import EpochIterLR

    result = {}
    for accum, extra in ((1, True), (2, False)):
        torch.manual_seed(0)
        model = models.create("resnet20", num_classes=10)
        opt = build_optimizer(model, name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
        engine = build_engine("ddp", model, opt, device="cpu", static_graph="auto", grad_accum=accum)
        g = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))] * 4
        lr = EpochIterLR(engine, "0:0.05", 2, 4 // accum)
        weights = [p for p in engine.module.parameters() if p.dim() == 4]
        loss = (lambda: 1e-3 * sum(w.square().sum() for w in weights)) if extra else None
        for epoch in range(2):
            train_epoch(engine, batches, epoch=epoch, lr_driver=lr, grad_accum=accum, extra_loss=loss)
        flat = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
        both = [torch.zeros_like(flat) for _ in range(2)]
        tdist.all_gather(both, flat)
        result[accum] = {"static_graph": engine.static_graph, "identical": bool(torch.equal(*both))}
    if rank == 0:
        torch.save(result, out)
    tdist.destroy_process_group()


def test_static_graph_auto_two_processes(tmp_path):
    out = tmp_path / "result.pt"
    mp.spawn(_worker, args=(_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    assert res[1]["static_graph"] is True and res[2]["static_graph"] is False
    assert res[1]["identical"] and res[2]["identical"]
