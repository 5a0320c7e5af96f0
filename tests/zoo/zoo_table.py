"""Render the per-model table of docs/benchmarks/zoo.md from the JSON lines the zoo test writes:

    DPRUNE_ZOO_RESULTS=zoo.jsonl pytest -m zoo tests/zoo/test_zoo.py -k test_zoo_all
    python tests/zoo/zoo_table.py zoo.jsonl > table.md

Every torchvision classifier gets a row; a model with no record is "not run". The last line
printed to stderr counts ok / refused / not run.
"""
import json
import sys

import torchvision

HEADER = ("| model | status | params (M) | dense MACs (M) | pruned MACs (M) | MAC speedup | groups cut "
          "| layers skipped | groups rounded | hook reference | plan / cut (s) | message |\n"
          + "|---" * 12 + "|")


def row(name: str, r: dict | None) -> str:
    if r is None:
        return f"| {name} | not run |" + " |" * 10
    if r["status"] == "refused":
        return (f"| {name} | refused | {r['params'] / 1e6:.1f} |" + " |" * 7
                + f" {r.get('plan_s', 0):.1f} | {r['message']} |")
    speedup = r["dense_macs"] / max(r["pruned_macs"], 1)
    ref = "yes" if r["hook_reference"] else "masked only"
    return (f"| {name} | ok | {r['params'] / 1e6:.1f} | {r['dense_macs'] / 1e6:.1f} | "
            f"{r['pruned_macs'] / 1e6:.1f} | {speedup:.2f}x | {r['groups']} | {r['skipped']} | "
            f"{r['rounded']} | {ref} | {r['plan_s']:.1f} / {r['cut_s']:.2f} | |")


def main(paths: list[str]) -> int:
    recs = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    recs[r["model"]] = r      # a later file (a re-run) wins
    names = torchvision.models.list_models(module=torchvision.models)
    print(HEADER)
    for name in names:
        print(row(name, recs.get(name)))
    status = [recs[n]["status"] if n in recs else "not run" for n in names]
    print(f"{len(names)} models: {status.count('ok')} ok, {status.count('refused')} refused, "
          f"{status.count('not run')} not run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
