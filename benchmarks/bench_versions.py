"""Two chisep checkouts side by side on the same data: the speed of each stage, old against new.

Single benchmark runs on a shared 2-core machine vary by 20 % from one to the next, so a change
measured by two runs an hour apart can show noise. This simulates one head once, then runs the
pipeline (``reconstruct_qsm``, then chi-separation) in a fresh process per checkout, alternating
old and new ``--repeats`` times, each process twice (the second pass is compiled). Every process
reuses freed memory as the command line does when its checkout has ``keep_freed_memory``.

    python benchmarks/bench_versions.py OLD_CHECKOUT NEW_CHECKOUT [--resolution 1] [--repeats 2]
        [--compilation-cache]

e.g. ``git worktree add /tmp/old <commit>`` for the old checkout. Prints a markdown table of the
second passes (one value per process) and the first passes' totals; with ``--compilation-cache``
each checkout gets a persistent compilation cache as the command line does, so the first pass of
every process after the first starts warm.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from chisep import workflows

_CHILD = """
import json, pickle, sys, time, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from chisep import pipeline
from chisep.separation import constants
if hasattr(constants, "_packaged_models") and Path("models").is_dir():
    # the checkout's own model files: an editable install elsewhere would otherwise serve its models/
    constants._packaged_models = lambda: Path("models").resolve()
kept = pipeline.keep_freed_memory() if hasattr(pipeline, "keep_freed_memory") else False
if len(sys.argv) > 2:  # the checkout's own persistent compilation cache, as the command line keeps one
    pipeline.use_compilation_cache(sys.argv[2])
magnitude, phase, acquisition = pickle.load(open(sys.argv[1], "rb"))
passes = []
for _ in range(2):
    t0 = time.perf_counter()
    qsm = pipeline.reconstruct_qsm(magnitude, phase, acquisition)
    timings = dict(qsm.timings, qsm=time.perf_counter() - t0)
    pipeline.separate(acquisition, qsm.separation_inputs(magnitude=qsm.magnitude),
                      settings=pipeline.SeparationSettings(models=("chi-separation",)), timings=timings)
    timings["total"] = time.perf_counter() - t0
    passes.append(timings)
print(json.dumps({"kept": kept, "passes": passes}))
"""


def run(checkout: Path, data: Path, cache: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-c", _CHILD, str(data)] + ([] if cache is None else [str(cache)])
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=checkout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--head", default="A")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compilation-cache", action="store_true",
                        help="give each checkout a persistent compilation cache (new and empty), as the command "
                             "line keeps one: the first process compiles into it, the later ones start warm")
    args = parser.parse_args()
    sim = workflows.simulate(resolution=args.resolution, head=args.head, scenario="healthy", snr=100.0)
    results: dict[str, list] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.pkl"
        with open(data, "wb") as f:
            pickle.dump((sim.magnitude, sim.phase, sim.acquisition), f)
        caches = {name: Path(tmp) / f"cache-{name}" if args.compilation_cache else None for name in ("old", "new")}
        for _ in range(args.repeats):
            for name in ("old", "new"):
                results[name].append(run(getattr(args, name).resolve(), data, caches[name]))
    steps = []
    for name in ("new", "old"):  # the new checkout's step order first
        for res in results[name]:
            steps += [s for s in res["passes"][1] if s not in steps and s not in ("qsm", "total")]
    print(f"{args.resolution} mm head {args.head}, healthy, SNR 100; old {args.old}, new {args.new}; "
          f"freed memory reused: old {results['old'][0]['kept']}, new {results['new'][0]['kept']}\n")
    print("| step (wall s, compiled pass; one value per process) | old | new |\n|---|---|---|")

    def cells(name, key, index=1):
        return ", ".join(f"{res['passes'][index][key]:.1f}" if key in res["passes"][index] else "-"
                         for res in results[name])

    for step in steps + ["qsm", "total"]:
        label = {"qsm": "QSM, mask to chi", "total": "magnitude and phase to chi-separation"}.get(step, step)
        print(f"| {label} | {cells('old', step)} | {cells('new', step)} |")
    first = ("first pass (the first process compiling into the empty cache, the later ones reading it)"
             if args.compilation_cache else "first pass (compiling)")
    print(f"| magnitude and phase to chi-separation, {first} | {cells('old', 'total', 0)} | "
          f"{cells('new', 'total', 0)} |")


if __name__ == "__main__":
    main()
