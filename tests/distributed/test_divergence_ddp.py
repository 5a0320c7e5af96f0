"""Divergence under DDP: only rank 1 sees a non-finite loss (an inf input at its 3rd step). Both
ranks must stop right after that step, name the same step, and not hang in a collective (real
processes under torchrun, gloo)."""
import json
import subprocess
import sys
import textwrap

from dist_launch import TIMEOUT, env

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as tdist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from distributed_prune.train.engine import DDPEngine
    from distributed_prune.train.loop import train_epoch

    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    if rank == 1:
        x[2 * 8] = float("inf")          # batch 2 of 6: optimizer step 3

    class Counting(TensorDataset):
        fetched = 0
        def __getitem__(self, i):
            Counting.fetched += 1
            return super().__getitem__(i)

    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    eng = DDPEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")

    class LR:
        def step(self, epoch, it):
            pass

    stats = train_epoch(eng, DataLoader(Counting(x, y), batch_size=8), epoch=0, lr_driver=LR())
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"bad": stats["nonfinite_step"], "iterations": stats["iterations"],
                   "fetched": Counting.fetched}, f)
    tdist.destroy_process_group()
""")


def test_one_rank_diverging_stops_both_after_that_step(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        "2", str(script), str(tmp_path)], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=tmp_path, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    # both ranks agree on the step, ran exactly 3 optimizer steps and fetched only 3 batches
    assert ranks == [{"bad": 3, "iterations": 3, "fetched": 24}] * 2, ranks
