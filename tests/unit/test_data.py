"""Datasets and loaders: fixed digits split, synthetic determinism, ImageFolder, samplers."""
import numpy as np
import pytest
import torch

from distributed_prune.data import DATASETS, build_datasets, build_loader
from distributed_prune.errors import UserError


def test_registry():
    assert {"digits", "synthetic", "cifar10", "cifar100", "mnist", "imagefolder",
            "imagenet"} <= set(DATASETS)
    with pytest.raises(UserError, match="'nope'"):
        build_datasets("nope")


def test_digits_split_fixed_stratified_normalized():
    train, val, info = build_datasets("digits", seed=0)
    train2, val2, _ = build_datasets("digits", seed=123)  # the split ignores the run seed
    assert len(train) + len(val) == 1797 and len(val) == 450
    assert torch.equal(train.tensors[0], train2.tensors[0])
    assert torch.equal(val.tensors[1], val2.tensors[1])
    x, y = train.tensors
    assert x.shape == (1347, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert info.num_classes == 10 and info.input_shape == (1, 8, 8)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4
    assert 0 < info.mean[0] < 1 and 0 < info.std[0] < 1
    tr_frac = np.bincount(y.numpy()) / len(y)
    va_frac = np.bincount(val.tensors[1].numpy()) / len(val)
    assert np.abs(tr_frac - va_frac).max() < 0.01  # stratified


def test_digits_flatten_and_resize():
    tr, _, info = build_datasets("digits", flatten=True)
    assert tr[0][0].shape == (64,) and info.input_shape == (64,)
    tr, va, info = build_datasets("digits", input_size=32)
    assert tr[0][0].shape == (1, 32, 32) and va[0][0].shape == (1, 32, 32)
    assert info.input_shape == (1, 32, 32)
    tr, _, info = build_datasets("digits", input_size=32, flatten=True)
    assert tr.tensors[0].shape[1:] == (1024,) and info.input_shape == (1024,)
    with pytest.raises(UserError, match="data.train_path"):
        build_datasets("digits", train_path="/somewhere")


def test_synthetic_deterministic_and_learnable():
    a_tr, a_va, info = build_datasets("synthetic", seed=3, input_size=(2, 6, 6),
                                      synthetic_size=(40, 10), num_classes=4)
    b_tr, _, _ = build_datasets("synthetic", seed=3, input_size=(2, 6, 6),
                                synthetic_size=(40, 10), num_classes=4)
    c_tr, _, _ = build_datasets("synthetic", seed=4, input_size=(2, 6, 6),
                                synthetic_size=(40, 10), num_classes=4)
    assert len(a_tr) == 40 and len(a_va) == 10 and info.input_shape == (2, 6, 6)
    assert torch.equal(a_tr[7][0], b_tr[7][0]) and a_tr[7][1] == b_tr[7][1]
    assert not torch.equal(a_tr[7][0], c_tr[7][0])
    assert not torch.equal(a_tr[0][0], a_va[0][0])
    # nearest-class-mean on train means classifies val well: the data is learnable
    xs = torch.stack([a_tr[i][0] for i in range(40)]).flatten(1)
    ys = torch.stack([a_tr[i][1] for i in range(40)])
    means = torch.stack([xs[ys == c].mean(0) for c in range(4)])
    xv = torch.stack([a_va[i][0] for i in range(10)]).flatten(1)
    yv = torch.stack([a_va[i][1] for i in range(10)])
    assert (torch.cdist(xv, means).argmin(1) == yv).float().mean() >= 0.8
    v_tr, _, v_info = build_datasets("synthetic", input_size=(20,), synthetic_size=8)
    assert v_tr[0][0].shape == (20,) and v_info.input_shape == (20,)
    f_tr, _, f_info = build_datasets("synthetic", input_size=4, flatten=True, synthetic_size=8)
    assert f_tr[0][0].shape == (48,) and f_info.input_shape == (48,)


def test_imagefolder_tiny_tree(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 24), (40 * i, 100, 200)).save(d / f"{i}.png")
    train, val, info = build_datasets("imagefolder", train_path=str(tmp_path / "train"),
                                      val_path=str(tmp_path / "val"), input_size=16)
    assert len(train) == 4 and len(val) == 4 and info.num_classes == 2
    x, y = train[0]
    assert x.shape == (3, 16, 16) and info.input_shape == (3, 16, 16) and y == 0
    assert val[3][0].shape == (3, 16, 16) and val[3][1] == 1


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagefolder"])
def test_missing_path_names_it(tmp_path, name):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(UserError) as exc:
        build_datasets(name, train_path=missing, val_path=missing)
    assert missing in str(exc.value) and "no download" in str(exc.value)


def test_cifar_empty_dir_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no download"):
        build_datasets("cifar10", train_path=str(tmp_path))


def test_eval_shards_cover_each_index_once():
    ds = torch.utils.data.TensorDataset(torch.arange(7))
    seen = []
    for rank in range(2):
        loader = build_loader(ds, batch_size=2, shuffle=False, distributed=True, rank=rank,
                              world_size=2)
        seen += [int(v) for (b,) in loader for v in b]
    assert sorted(seen) == list(range(7))


def test_train_loaders_seeded_and_set_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(10))

    def order(epoch, **kw):
        loader = build_loader(ds, batch_size=4, shuffle=True, seed=5, **kw)
        loader.sampler.set_epoch(epoch)
        return [int(v) for (b,) in loader for v in b]

    assert order(0) == order(0) and sorted(order(0)) == list(range(10))
    assert order(0) != order(1)
    assert order(0) == order(0, distributed=True, rank=0, world_size=1)
    r0 = order(2, distributed=True, rank=0, world_size=3)
    r1 = order(2, distributed=True, rank=1, world_size=3)
    assert len(r0) == len(r1) == 4  # DistributedSampler pads so every rank steps equally
