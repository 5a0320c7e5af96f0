"""The repository stands on its own documents.

Every repository path named in the README, the configs, the launch scripts and docs/ exists (a
glob names at least one file), and no tracked file points at a document that is not in the
repository or at a path of one particular machine.
"""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: A path is recognised by its first component, one of the repository's top-level folders.
PATH = re.compile(r"(?<![\w./-])((?:configs|launch|docs|distributed_prune|tests|csrc|\.ci)/"
                  r"[\w.*\[\]/+${}-]*[\w*\]/}])")
SHELL_VAR = re.compile(r"\$\{?\w+\}?")   # configs/repro/digits_$model.yaml: any file it can be
LINK = re.compile(r"\]\(([^)\s#]+)")   # a markdown link target

# Spelled in pieces so that this file does not name them itself.
FOREIGN_DOCS = [name + ".md" for name in ("PAPER", "DESIGN", "ENV")] + [".." + "/shared"]
MACHINE_PATHS = ["/" + d + "/" for d in ("work", "home", "tmp")]

def documents() -> list[Path]:
    files = [REPO / "README.md"]
    files += [p for p in sorted((REPO / "configs").rglob("*")) if p.is_file()]
    files += [p for p in sorted((REPO / "launch").iterdir()) if p.is_file()]
    files += [p for p in sorted((REPO / "docs").rglob("*")) if p.suffix in (".md", ".sh")]
    return files


def named_paths(text: str) -> set[str]:
    return set(PATH.findall(text))


def missing(doc: Path) -> list[str]:
    text = doc.read_text()
    out = [p for p in named_paths(text) if not _exists(REPO, p)]
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
            out.append(target)
    return sorted(out)


def _exists(root: Path, path: str) -> bool:
    path = SHELL_VAR.sub("*", path)
    if any(c in path for c in "*["):
        return any(root.glob(path))
    return (root / path).exists()


def tracked_files() -> list[str]:
    r = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [f for f in r.stdout.decode().split("\0") if f]


def mentions(rel: str, needles: list[str]) -> list[str]:
    data = (REPO / rel).read_bytes() if (REPO / rel).is_file() else b""
    if b"\0" in data:   # binary (plots)
        return []
    text = data.decode(errors="replace")
    return [n for n in needles if n in text]


def test_the_scan_finds_paths():
    """Not vacuous: the README names shipped configs and launch scripts."""
    found = named_paths((REPO / "README.md").read_text())
    assert {"configs/debug_cpu.yaml", "launch/env.sh", "docs/science.md"} <= found
    assert len(documents()) > 40


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_named_paths_exist(doc):
    assert not missing(doc), f"{doc.relative_to(REPO)} names paths that do not exist"


def test_missing_paths_are_found(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("")
    text = ("run configs/a.yaml, then configs/b.yaml; all of configs/*.yaml but none of "
            "configs/*.json; cfg=configs/$name.yaml, configs/${name}.json; "
            "output.dir=runs/configs/x.yaml is an output")
    paths = named_paths(text)
    assert paths == {"configs/a.yaml", "configs/b.yaml", "configs/*.yaml", "configs/*.json",
                     "configs/$name.yaml", "configs/${name}.json"}
    assert sorted(p for p in paths if not _exists(tmp_path, p)) == [
        "configs/${name}.json", "configs/*.json", "configs/b.yaml"]


def test_no_foreign_documents_or_machine_paths():
    bad = {f: hits for f in tracked_files()
           for hits in [mentions(f, FOREIGN_DOCS + MACHINE_PATHS)] if hits}
    assert not bad, bad
