"""Bad run directories (``output.dir``): each case is one line on stderr naming the path, exit
status 2, no traceback, and nothing created or changed. Also the run-time reliability cases of
the run directory: one writer (a lock, two real processes), a damaged metrics.jsonl, divergence
(exit 3), SIGTERM (exit 143) and a full disk."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distributed_prune import checkpoint, fileio, rundir
from distributed_prune.cli import main
from distributed_prune.errors import TrainingDiverged
from distributed_prune.train.stage import EngineSettings, OptimSettings, train_epochs

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug_cpu.yaml")
TINY = ["pretrain.epochs=1", "pretrain.lr_schedule=0:0.05", "retrain.epochs=1", "retrain.lr_schedule=0:0.01",
        "trainability.jsv=false", "train.device=cpu", "output.verbose=true"]


def snapshot(d: Path) -> dict:
    """Every file's bytes and mode under ``d`` (and the set of names): "nothing changed" is
    an equal snapshot."""
    if not d.exists():
        return {}
    if d.is_file():
        return {".": (d.read_bytes(), d.stat().st_mode)}
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
            for p in sorted(d.rglob("*"))}


def refused(capsys, out, *needles, extra=()):
    """``dprune run`` into ``out`` fails with one line naming ``needles``, exit 2, no change."""
    before = snapshot(out)
    code = main(["run", DEBUG, f"output.dir={out}", *TINY, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert snapshot(out) == before
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run; each test restores it afterwards (see ``pristine``)."""
    out = tmp_path_factory.mktemp("fin") / "run"
    assert main(["run", DEBUG, f"output.dir={out}", *TINY]) == 0
    return out


@pytest.fixture
def pristine(finished, tmp_path):
    keep = tmp_path / "keep"
    shutil.copytree(finished, keep)
    yield finished
    shutil.rmtree(finished)
    shutil.copytree(keep, finished)


# --------------------------------------------------------------------------- output.dir itself
def test_output_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    refused(capsys, f, f, "is a file")


def test_output_dir_below_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    refused(capsys, f / "a" / "b", f, "is a file")
    assert f.read_text() == "x"


def test_output_dir_is_a_symlink_to_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    (tmp_path / "link").symlink_to(f)
    refused(capsys, tmp_path / "link", "link", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (chmod); the same check "
                    "is exercised by test_output_dir_not_writable_reported_by_access")
def test_output_dir_under_read_only_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, ro / "run", ro, "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_output_dir_not_writable_reported_by_access(tmp_path, capsys, monkeypatch):
    """A read-only mount or an immutable directory, as os.access reports it (works as root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, m, **kw: False if Path(p) == ro else real(p, m, **kw))
    refused(capsys, ro / "run", ro, "not writable")
    assert list(ro.iterdir()) == []


def test_full_disk_when_creating_the_run_dir(tmp_path, capsys, monkeypatch):
    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fileio, "write_with", full)
    out = tmp_path / "new" / "run"
    refused(capsys, out, out, "No space left")
    assert not (tmp_path / "new").exists()     # the parents it created are gone too


def _fsync_full_for(monkeypatch, suffix):
    """os.fsync fails with ENOSPC (as a full disk does) for files whose name ends in ``suffix``."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{suffix}."):  # the temp file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)


def test_full_disk_during_the_run_is_one_line(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing a checkpoint mid-run: one line naming the file, exit 2, the
    previous checkpoint intact and no temp file left."""
    _fsync_full_for(monkeypatch, "base.pt")
    out = tmp_path / "run"
    assert main(["run", DEBUG, f"output.dir={out}", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left" in err[0] and str(out / "checkpoints" / "base.pt") in err[0], err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["pretrain-0000.pt"]
    checkpoint.load(out / "checkpoints" / "pretrain-0000.pt")


def test_fileio_names_the_target_not_the_temp_file(tmp_path, monkeypatch):
    def fail(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        fileio.write_with(tmp_path / "x.pt", fail)
    assert e.value.filename == str(tmp_path / "x.pt") and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []     # the temp file is gone


# --------------------------------------------------------------------------- existing run directory
@pytest.mark.parametrize("name, content, needle", [
    ("summary.json", b'{"status": "compl', "unreadable"),
    ("summary.json", b'["complete"]', "list"),
    ("summary.json", b"\xff\xfe\x00garbage", "unreadable"),
    ("config.yaml", b"- 1\n- 2\n", "list"),
    ("config.yaml", b"\x00\x01\x02\xff\xfe binary", "config.yaml"),
    ("config.yaml", b"seed: [1, 2\nmodel: {", "not a readable config"),
    ("config.yaml", b"42\n", "int"),
])
def test_corrupt_file_in_existing_run_dir(pristine, capsys, name, content, needle):
    (pristine / name).write_bytes(content)
    refused(capsys, pristine, pristine / name, needle)


@pytest.mark.parametrize("name", ["summary.json", "config.yaml"])
def test_directory_in_place_of_a_run_file(pristine, capsys, name):
    (pristine / name).unlink()
    (pristine / name).mkdir()
    refused(capsys, pristine, pristine / name)


@pytest.mark.parametrize("content, needle", [(b"{not json", "not a plan"), (b"[]", "not a plan")])
def test_corrupt_plan_of_a_finished_run(pristine, capsys, content, needle):
    (pristine / "plan.json").write_bytes(content)
    refused(capsys, pristine, pristine / "plan.json", needle)


def test_plan_of_another_run_in_a_finished_run(pristine, capsys):
    from distributed_prune import prune

    other = prune.Plan.from_json((pristine / "plan.json").read_text())
    other.groups = other.groups[:-1]
    (pristine / "plan.json").write_text(other.to_json())
    refused(capsys, pristine, pristine / "plan.json", "differs")


def test_resume_false_into_existing_run(pristine, capsys):
    refused(capsys, pristine, pristine, "resume=true", extra=["resume=false"])


def test_different_config_into_existing_run(pristine, capsys):
    refused(capsys, pristine, pristine, "retrain.epochs", extra=["retrain.epochs=2"])


def test_rerun_of_finished_run_changes_nothing(pristine, capsys):
    before = snapshot(pristine)
    assert main(["run", DEBUG, f"output.dir={pristine}", *TINY]) == 0
    assert "already complete" in capsys.readouterr().out
    assert snapshot(pristine) == before


# --------------------------------------------------------------------------- one writer
def test_lock_held_by_a_live_process_refuses_and_a_dead_holder_does_not(tmp_path, capsys):
    """A real second process holds the lock: refused with its pid; once it died (SIGKILL, no
    cleanup) the lock is free again."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from distributed_prune.rundir import RunDir; rd = RunDir(sys.argv[1]); "
        "rd.lock(); print('locked', flush=True); time.sleep(600)"), str(out)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = refused(capsys, out, out, f"pid {holder.pid}", "in use")
        assert "another run" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)   # stale: the dead holder's pid
    rd = rundir.RunDir(out)
    rd.lock()                                                       # the kernel released it
    assert (out / ".lock").read_text().strip() == str(os.getpid())
    rd.close()


def test_two_runs_into_one_dir_and_sigterm(tmp_path):
    """The issue's case: two ``dprune run`` into one output.dir, the second started while the
    first runs: the second stops at once (exit 2, one line with the first's pid, nothing
    touched). Then SIGTERM stops the first like Ctrl-C: one line, exit 143, the newest
    checkpoint intact, every epoch logged once; a re-run resumes from that checkpoint."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="true")
    cmd = [sys.executable, "-m", "distributed_prune", "run", DEBUG, f"output.dir={out}", *TINY,
           "pretrain.epochs=400", "pretrain.lr_schedule=0:0.05"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints").is_dir() or not list((out / "checkpoints").glob("pretrain-*.pt")):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        assert (out / ".lock").read_text().strip() == str(first.pid)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert first.poll() is None, "the first run should still be training"
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"pid {first.pid}" in err[0] and str(out) in err[0], err
        assert "resuming" not in second.stdout
        first.send_signal(signal.SIGTERM)
        fo, fe = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 143, fe[-2000:]
    lines = fe.strip().splitlines()
    assert len(lines) == 1 and "terminated" in lines[0] and "Traceback" not in fe, fe
    newest = sorted((out / "checkpoints").glob("pretrain-*.pt"))[-1]
    checkpoint.load(newest)                                             # intact
    assert not list((out / "checkpoints").glob(".*.tmp"))               # no temp file left
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in rows]
    assert epochs == list(range(len(epochs))) and {r["stage"] for r in rows} == {"pretrain"}


# --------------------------------------------------------------------------- metrics.jsonl
def test_damaged_metrics_line_is_kept_aside_and_reported(tmp_path, capsys):
    rd = rundir.RunDir(tmp_path)
    rows = [{"stage": "pretrain", "epoch": e, "top1": 0.1 * e} for e in range(4)]
    for r in rows:
        rd.log(r)
    text = (tmp_path / "metrics.jsonl").read_text().splitlines()
    text[1] = text[1][:10] + "\x00garbage"
    (tmp_path / "metrics.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(Exception, match=r"metrics.jsonl: line 2 is not valid JSON"):
        rundir.read_metrics(tmp_path, strict=True)
    rd.truncate_metrics(rundir.Point(rundir.Stage.PRETRAIN, 3))
    err = capsys.readouterr().err
    assert "metrics.jsonl: line 2" in err and "metrics.jsonl.damaged" in err
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == "\n".join(text) + "\n"   # kept whole
    assert rd.metrics() == [rows[0], rows[2], rows[3]]   # every readable row kept, none after it lost


def test_resume_with_damaged_metrics_line_keeps_rows(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="true")
    cmd = [sys.executable, "-m", "distributed_prune", "run", DEBUG, f"output.dir={out}", *TINY,
           "pretrain.epochs=3", "pretrain.lr_schedule=0:0.05"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, DPRUNE_FAULT="pretrain:2"), cwd=tmp_path)
    assert r.returncode == -signal.SIGKILL
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[0] = "{broken"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metrics.jsonl: line 1 is not valid JSON" in r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["epoch"]) for x in rows] == [("pretrain", 1), ("pretrain", 2), ("retrain", 0)]
    assert (out / "metrics.jsonl.damaged").read_text().splitlines()[0] == "{broken"


def test_metrics_rows_are_strict_json(tmp_path):
    rd = rundir.RunDir(tmp_path)
    rd.log({"stage": "retrain", "epoch": 0, "train_loss": float("nan"), "top1": float("inf"), "lr": 0.1})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == \
        {"stage": "retrain", "epoch": 0, "train_loss": None, "top1": None, "lr": 0.1}


# --------------------------------------------------------------------------- divergence
def test_nonfinite_loss_is_caught_at_its_step():
    """The 3rd optimizer step of epoch 1 sees an inf input: the epoch stops right after that step
    (no later batch is fetched) and raises naming it; the hook (log + checkpoint) never runs for it."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    x_bad = x.clone()
    x_bad[2 * 8] = float("inf")               # batch index 2 of 6 (batch size 8)

    class Switch(torch.utils.data.Dataset):   # clean in epoch 0, poisoned in epoch 1
        epoch = 0
        fetched = 0                           # samples read in epoch 1

        def __len__(self):
            return 48

        def __getitem__(self, i):
            self.fetched += self.epoch
            return (x if self.epoch == 0 else x_bad)[i], y[i]

    ds = Switch()
    seen = []

    def hook(end):
        seen.append(end.epoch)
        ds.epoch = 1

    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(TrainingDiverged, match=r"retrain epoch 1 .*step 3 of 6"):
        train_epochs(model, DataLoader(ds, batch_size=8), stage="retrain", epochs=3, schedule="0:0.1",
                     optim=OptimSettings(), engine=EngineSettings(device=torch.device("cpu")),
                     evaluate=lambda m: 0.5, hooks=[hook])
    assert seen == [0]
    assert ds.fetched == 3 * 8                # steps 4-6 of epoch 1 never ran


def test_divergence_watch_reads_lag_steps_late_and_names_the_first_bad_step():
    """The GPU setting (lag 2) exercised on CPU: step 3's mark is read after step 5, and the
    step reported is the first bad one even though later steps are bad too."""
    from distributed_prune.train.loop import DivergenceWatch

    watch = DivergenceWatch(torch.device("cpu"), lag=2)
    seen = []
    for step in range(1, 9):
        watch.mark(torch.tensor(float("nan") if step >= 3 else 1.0), step)
        seen.append(watch.poll(step))
    assert seen == [None, None, None, None, 3, 3, 3, 3]
    clean = DivergenceWatch(torch.device("cpu"), lag=2)
    for step in range(1, 4):
        clean.mark(torch.tensor(2.0), step)
        assert clean.poll(step) is None
    clean.mark(torch.tensor(float("inf")), 4)   # the last step: only the end-of-epoch read sees it
    assert clean.poll(4) is None and clean.final() == 4


def test_divergent_run_stops_with_exit_3(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "distributed_prune", "run", DEBUG, f"output.dir={out}", *TINY,
                        "retrain.epochs=2", "retrain.lr_schedule=0:1e6"], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", CI="true"), cwd=tmp_path, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "retrain epoch 0" in err[0] and "step" in err[0], err
    assert not (out / "summary.json").exists() and not (out / "checkpoints" / "final.pt").exists()
    assert not list((out / "checkpoints").glob("retrain-*.pt"))
    obj = checkpoint.load(out / "checkpoints" / "pruned.pt")           # the last good checkpoint
    assert all(torch.isfinite(v).all() for v in obj["state_dict"].values() if v.is_floating_point())
    text = (out / "metrics.jsonl").read_text()
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(c)) for x in text.splitlines()]
    assert [(x["stage"], x["epoch"]) for x in rows] == [("pretrain", 0)]


def test_finished_run_in_read_only_directory_is_still_complete(pristine, capsys, monkeypatch):
    """Re-running a finished run only reads it: a read-only directory is no error then."""
    real = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, m, **kw: False if Path(p) == pristine else real(p, m, **kw))
    before = snapshot(pristine)
    assert main(["run", DEBUG, f"output.dir={pristine}", *TINY]) == 0
    assert "already complete" in capsys.readouterr().out and snapshot(pristine) == before
    (pristine / "summary.json").unlink()          # not finished: it would write, so it is refused
    refused(capsys, pristine, pristine, "not writable")
