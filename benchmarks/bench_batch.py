"""Cohort throughput of ``chisep batch``: runs per hour with 1 and 2 local Dask workers.

Simulates ``--subjects`` phantom subjects at ``--resolution`` mm into one BIDS
dataset, then runs :func:`chisep.batch.run_batch` on it once per worker count
(``force=True``: every subject runs each time, one compute thread per
worker). Prints a markdown table: wall time of the invocation (cluster start,
JAX compilation in each new worker process, the runs, the cohort outputs),
runs per hour, the mean time of a worker's first run (it compiles) and of its
later runs (compiled code reused), and the peak resident memory of a worker.
``--json FILE`` keeps the raw rows.

Run: ``python benchmarks/bench_batch.py [--subjects 4] [--resolution 4] [--workers 1,2]
[--models linear,chi-separation,decompose] [--cache cold|warm|off] [--keep DIR]``

How throughput scales on a cluster (on paper)
---------------------------------------------
Runs are independent (no communication between tasks), so a cohort is
embarrassingly parallel and throughput is

    runs/hour = 3600 * W / t_run      (once every worker is busy)

with W concurrent workers and t_run the steady-state time of one run on one
worker. Three resources bound W on a node and t_run per worker:

* CPU. One single-threaded worker per core is the most efficient layout:
  multithreading usually speeds up one run sub-linearly (serial steps, sync), while
  separate runs scale linearly until memory bandwidth saturates. More
  threads per run only help when memory allows fewer runs than cores (the
  local cluster then shares the spare cores out as threads).
* Memory. One run needs about ``WORKER_BASE_BYTES + BYTES_PER_VOXEL_ECHO *
  voxels * echoes`` (chisep.batch: about 0.65 GB + 160 bytes per voxel-echo,
  fitted to this script's peak RSS at 8, 4 and 2 mm: 650, 894 and 1568 MB).
  A 1 mm whole-head 6-echo acquisition (8.7 M voxels, 52 M voxel-echoes)
  needs about 9 GB per worker, so on a node with 4 GB per core, memory
  rather than cores limits W (fewer than half the cores busy); dask-jobqueue
  jobs should request memory per worker accordingly (``memory=`` per job
  with ``processes=`` workers per job).
* GPU (not measured here). The FFT-heavy inversions, chi-separation's
  iterations and the voxelwise fits are bandwidth-bound JAX kernels that run
  on a GPU unchanged, so t_run should drop; workers sharing one GPU contend
  for it, so the useful layout is one worker per GPU (``CUDA_VISIBLE_DEVICES``
  per worker, e.g. one dask-jobqueue job per GPU), with
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (set by the local cluster) so that
  several processes can share a GPU when its memory allows. The CPU parts of
  a run (file I/O and gzip, ROMEO unwrapping's region growing, the report
  figure) then bound t_run; give each GPU worker 2-4 CPU cores for them.

Fixed costs per worker process: JAX import and one compilation per problem
shape (tens of seconds, the "first run" column); they are paid once per
worker, so long-lived workers (a cohort of one grid size) amortise them, and
the shared compilation cache (``derivatives/chisep/.jax_cache``) lets later
workers load what the first one compiled.
Per invocation: cluster start-up and the SHA-256 of every input file for the
completion check (of the order of 1 s per GB read).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from chisep import batch, pipeline


def _worker_stats(rows):
    """Mean first-run and later-run time per worker, max peak RSS (MB)."""
    by_worker: dict = {}
    for r in rows:
        by_worker.setdefault(r.get("worker"), []).append(r)
    first, later = [], []
    for runs in by_worker.values():
        runs.sort(key=lambda r: r["started_unix"])
        first.append(runs[0]["elapsed_s"])
        later += [r["elapsed_s"] for r in runs[1:]]
    rss = max((r.get("peak_rss_mb") or 0) for r in rows) if rows else None
    return (statistics.mean(first) if first else None, statistics.mean(later) if later else None, rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--resolution", type=float, default=4.0, help="voxel size of the phantom, mm")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--models", default="linear,chi-separation,decompose")
    parser.add_argument("--json", metavar="FILE", help="write the raw rows here")
    parser.add_argument("--keep", metavar="DIR", help="simulate into DIR and keep it (default: a temporary folder)")
    parser.add_argument("--cache", choices=("cold", "warm", "off"), default="cold",
                        help="JAX compilation cache shared by the workers: emptied before each worker count "
                             "(cold, default), kept (warm) or not used (off)")
    args = parser.parse_args()

    settings = pipeline.PipelineSettings(
        separation=pipeline.SeparationSettings(models=tuple(m for m in args.models.split(",") if m)))
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="chisep-bench-batch-"))
    root = base / "bids"
    labels = [f"{i + 1:02d}" for i in range(args.subjects)]
    if not root.exists():
        t0 = time.perf_counter()
        batch.simulate_cohort(root, labels, resolution=args.resolution, snr=100.0)
        print(f"simulated {args.subjects} subjects at {args.resolution} mm in {time.perf_counter() - t0:.0f} s")
    print(f"{batch.voxel_echoes(batch.plan_batch(root)[0])} voxel-echoes per subject; "
          f"models {settings.separation.models}; cores available {batch._cpu_count()}\n")

    results = []
    for w in (int(v) for v in args.workers.split(",")):
        if args.cache == "cold":
            shutil.rmtree(root / batch.DERIVATIVES / ".jax_cache", ignore_errors=True)
        t0 = time.perf_counter()
        summary = batch.run_batch(root, workers=w, threads_per_worker=1, retries=0, settings=settings,
                                  labels="derivatives/truth/sub-{subject}/labels.nii.gz", force=True,
                                  compilation_cache=args.cache != "off", dashboard_address=":0",
                                  progress=lambda s: None)
        wall = time.perf_counter() - t0
        ran = [r for r in summary.rows if r["status"] == "done"]
        first, later, rss = _worker_stats(ran)
        results.append({"workers": w, "subjects": len(ran), "failed": summary.n_failed, "wall_s": round(wall, 1),
                        "runs_per_hour": round(3600 * len(ran) / wall, 1), "first_run_s": first,
                        "later_run_s": later, "peak_rss_mb": rss, "rows": summary.rows})
        print(f"workers {w}: {len(ran)} runs in {wall:.0f} s", flush=True)

    print("\n| workers | runs | wall s | runs/hour | first run s | later runs s | "
          "steady runs/hour | peak RSS MB |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        steady = f"{3600 * r['workers'] / r['later_run_s']:.0f}" if r["later_run_s"] else "n/a"
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {r['workers']} | {r['subjects']} | {r['wall_s']:.0f} | {r['runs_per_hour']:.0f} | "
              f"{fmt(r['first_run_s'])} | {fmt(r['later_run_s'])} | {steady} | {fmt(r['peak_rss_mb'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":  # guard required: Dask spawns worker processes that import this module
    main()
