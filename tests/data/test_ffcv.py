"""FFCV .beton writing and loading: exact round trips, sharding, bad files, atomic writes.

Each FFCV pipeline is JIT-compiled (numba) on its first epoch, so loaders are reused within a
test and the JPEG pipeline is compiled once.
"""
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from distributed_prune.data.beton import (  # noqa: E402
    SyntheticImages, write_beton, write_dataset)
from distributed_prune.data.digits import digits_split  # noqa: E402
from distributed_prune.data.ffcv import (  # noqa: E402
    build_ffcv_loaders, resolution_at, validate_beton)
from distributed_prune.errors import UserError  # noqa: E402

SYN = dict(num_samples=40, image_size=(72, 56))


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp("betons")
    paths = {}
    for split in ("train", "val"):
        paths[f"digits_{split}"] = d / f"digits_{split}.beton"
        write_beton("digits", split=split, out=paths[f"digits_{split}"], mode="raw",
                    num_workers=1, progress=False)
    paths["syn"] = d / "syn.beton"
    summary = write_beton("synthetic", split="val", out=paths["syn"], mode="jpg",
                          num_workers=1, progress=False, **SYN)
    assert summary["num_samples"] == SYN["num_samples"] and summary["num_classes"] == 10
    return paths


def _source(split):
    """(N, 8, 8) pixels 0..16 and labels: what the digits pipeline gives with normalize=False."""
    return digits_split(split)


def _rows(images, labels):
    """Hashable (pixels, label) rows of a uint8 (B, 1, 8, 8) batch."""
    return [(im.tobytes(), int(y)) for im, y in zip(images.numpy(), labels.numpy())]


def test_digits_raw_round_trip(betons):
    train, val, info = build_ffcv_loaders(betons["digits_train"], betons["digits_val"],
                                          pipeline="digits", batch_size=100, num_workers=1,
                                          normalize=False, drop_last_train=False)
    assert info.num_classes == 10 and info.input_shape == (1, 8, 8)
    # val: sequential, every sample once, pixels and labels identical to the source
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in val])
    images, labels = torch.cat(images), torch.cat(labels)
    src_x, src_y = _source("val")
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert len(val) == 5 and val.num_samples == len(src_y)
    np.testing.assert_array_equal(images[:, 0].numpy(), src_x)
    np.testing.assert_array_equal(labels.numpy(), src_y)
    # train: a new permutation each epoch, still every sample exactly once
    src_x, src_y = _source("train")
    want = Counter(_rows(torch.from_numpy(src_x[:, None]), torch.from_numpy(src_y)))
    orders = []
    for epoch in range(2):
        train.set_epoch(epoch)
        rows = [r for x, y in train for r in _rows(x, y)]
        assert Counter(rows) == want
        orders.append(rows)
    assert orders[0] != orders[1]


def test_digits_normalized_matches_torchvision_path(betons):
    from distributed_prune.data import build_datasets

    _, val_ds, tv_info = build_datasets("digits", flatten=True)
    _, val, info = build_ffcv_loaders(None, betons["digits_val"], pipeline="digits",
                                      batch_size=128, num_workers=1, flatten=True)
    got = torch.cat([x.clone() for x, _ in val])
    assert info.mean == tv_info.mean and info.input_shape == (64,)
    torch.testing.assert_close(got, val_ds.tensors[0], rtol=0, atol=1e-6)


# Freeing two JPEG-decoding pipelines in one process makes numba's dispatcher finalizer raise
# an ignored KeyError (harmless; a training process keeps its loaders): collect it here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_synthetic_jpeg_and_progressive_resizing(betons):
    src = SyntheticImages(SYN["num_samples"], SYN["image_size"], split=1)
    train, _, info = build_ffcv_loaders(betons["syn"], None, pipeline="imagenet", batch_size=16,
                                        num_workers=1, res=(32, 64, 0, 1), normalize=False,
                                        drop_last_train=False)
    assert info.num_classes == 10
    for epoch, size in ((0, 32), (1, 64)):
        train.set_epoch(epoch)
        batches = [(x.clone(), y.clone()) for x, y in train]
        assert all(x.shape[1:] == (3, size, size) and x.dtype == torch.uint8 for x, _ in batches)
        labels = torch.cat([y for _, y in batches]).tolist()
        assert Counter(labels) == Counter(src[i][1] for i in range(len(src)))
    # the stored JPEGs decode close to the source (same order: sequential val, no crop loss)
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(betons["syn"]), batch_size=40, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()]})
    (images, labels), = list(loader)
    for i in range(len(src)):
        ref, label = src[i]
        assert int(labels[i]) == label
        err = np.abs(images[i].astype(np.int16) - ref).mean()
        other = np.abs(images[(i + 1) % len(src)].astype(np.int16) - ref).mean()
        assert err < 8.0 < 3 * err < other  # q90 JPEG of noisy images: a few levels off
    del train, loader
    gc.collect()


def test_resolution_schedule():
    assert [resolution_at(e, 160, 192, 2, 4) for e in range(6)] == [160, 160, 160, 192, 192, 192]
    assert resolution_at(3, 160, 224, 0, 10) == 192  # 179.2 -> nearest multiple of 32


CHILD = textwrap.dedent("""
    import sys, numpy as np, torch, torch.distributed as dist
    from distributed_prune.data.ffcv import build_ffcv_loaders
    rank, init, train_path, val_path, out = int(sys.argv[1]), *sys.argv[2:]
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    train, val, _ = build_ffcv_loaders(train_path, val_path, pipeline="digits", batch_size=64,
                                       num_workers=1, normalize=False, distributed=True,
                                       drop_last_train=False)
    val_x = torch.cat([x[:, 0].clone() for x, _ in val]).numpy()
    val_y = torch.cat([y.clone() for _, y in val]).numpy()
    train_y = torch.cat([y.clone() for _, y in train]).numpy()
    np.savez(out, val_x=val_x, val_y=val_y, train_y=train_y, val_len=len(val))
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_ranks_cover_val_exactly_once(betons, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(r), str(tmp_path / "init"),
                               str(betons["digits_train"]), str(betons["digits_val"]),
                               str(tmp_path / f"r{r}.npz")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-2000:]
    res = [np.load(tmp_path / f"r{r}.npz") for r in range(2)]
    # val: contiguous disjoint slices, concatenated in rank order == the whole split
    src_x, src_y = _source("val")
    np.testing.assert_array_equal(np.concatenate([r["val_y"] for r in res]), src_y)
    np.testing.assert_array_equal(np.concatenate([r["val_x"] for r in res]), src_x)
    assert [len(r["val_y"]) for r in res] == [225, 225]
    # train: FFCV's DistributedSampler shards (padded to equal size; 1,347 is odd)
    _, train_y = _source("train")
    assert [len(r["train_y"]) for r in res] == [674, 674]
    counts = Counter(np.concatenate([r["train_y"] for r in res]).tolist())
    want = Counter(train_y.tolist())
    assert sum(counts.values()) == len(train_y) + 1
    assert all(counts[k] - want[k] in (0, 1) for k in want)


def test_bad_betons_are_user_errors(betons, tmp_path):
    assert validate_beton(betons["digits_val"])["num_samples"] == 450
    with pytest.raises(UserError, match="not found"):
        validate_beton(tmp_path / "missing.beton")
    cut = tmp_path / "cut.beton"
    data = betons["digits_val"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.beton.*truncated"):
        validate_beton(cut)
    with pytest.raises(UserError, match="cut.beton"):
        build_ffcv_loaders(None, cut, pipeline="digits", batch_size=8)
    with pytest.raises(UserError, match="torch.distributed"):
        build_ffcv_loaders(None, betons["digits_val"], pipeline="digits", batch_size=8,
                           distributed=True)

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    wrong = tmp_path / "wrong.beton"
    samples = [(np.zeros((4, 4, 3), np.uint8), i) for i in range(4)]
    DatasetWriter(str(wrong), {"image": RGBImageField(), "target": IntField()},
                  num_workers=1).from_indexed_dataset(samples)
    with pytest.raises(UserError, match="wrong.beton.*no field 'label'"):
        validate_beton(wrong)
    assert "\n" not in str(pytest.raises(UserError, validate_beton, wrong).value)


class _Broken:
    """8 images whose sample 5 cannot be read."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 5:
            raise OSError("cannot open img5.jpg")
        return np.full((6, 6, 3), i, np.uint8), i


def test_atomic_write_and_source_errors(tmp_path):
    out = tmp_path / "x.beton"
    with pytest.raises(UserError, match="sample 5: OSError: cannot open img5.jpg"):
        write_dataset(_Broken(), out, mode="raw", num_workers=1, progress=False)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"previous")  # a failed write leaves an existing file untouched
    with pytest.raises(UserError):
        write_dataset(_Broken(), out, mode="raw", num_workers=1, progress=False)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["x.beton"]
    with pytest.raises(UserError, match="nope"):
        write_beton("imagefolder", root=tmp_path / "nope", out=out)
    with pytest.raises(UserError, match="--root is required"):
        write_beton("cifar10", out=out)


def test_cli_arguments(tmp_path, capsys):
    import argparse

    from distributed_prune.data import beton

    parser = argparse.ArgumentParser()
    beton.add_arguments(parser)
    args = parser.parse_args(["--dataset", "synthetic", "--out", str(tmp_path / "s.beton"),
                              "--num-samples", "12", "--image-size", "40x30", "--mode", "raw",
                              "--num-workers", "1", "--no-progress"])
    assert beton.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 12
    assert summary["bytes"] == (tmp_path / "s.beton").stat().st_size
