"""Cohort processing on Dask: one ``chisep run`` per BIDS subject/session, as independent tasks.

Workflow
    :func:`plan_batch` (pure, no Dask) lists every multi-echo GRE run of a BIDS
    dataset as a :class:`Job` and decides whether it still needs to run: a run
    is complete when its ``provenance.json`` exists (written last by
    :func:`chisep.workflows.run_files`), the SHA-256 of every input recorded
    there still matches the input files, every output it lists exists and
    (optionally) its settings equal the requested ones.
    :func:`run_batch` submits the jobs that need to run to a Dask cluster (a
    local one sized to the machine, or an existing one by address), retries
    failures, shows a live count and writes the cohort outputs.
    :func:`run_subject` is the task one worker runs: it never raises, it returns
    a result row (status ``done`` or ``failed`` with the error text).

Outputs (under ``<bids_root>/derivatives/chisep/``)
    ``sub-X[/ses-Y]/anat/``      the outputs of ``chisep run`` with BIDS-derivatives names
    ``sub-X[/ses-Y]/anat/FAILED.json``  error and traceback of a failed run (removed on success)
    ``cohort_roi_stats.csv``     every complete run's ROI table with ``subject, session, prefix`` columns
    ``cohort_summary.png``       ROI means of chi, chi_para and chi_dia per subject
    ``batch_summary.json``       status, attempts, error, time and memory of every run
    ``index.html``               links to every run's report.html, thumbnails, values that stand out

A failed or interrupted run never looks complete: its folder has no
``provenance.json`` (a stale one is removed before a run starts), so the next
invocation runs it again and the cohort table leaves it out.

Dask is an optional extra (``pip install chisep[batch]``): it is imported only
inside the functions here that need it, and nothing else in chisep imports
this module at import time.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from chisep import io
from chisep.errors import ChisepError, InputError

PathLike = "str | os.PathLike[str]"
Progress = Callable[[str], None]

#: Folder of chisep's derivatives under a BIDS root.
DERIVATIVES = Path("derivatives") / "chisep"
COHORT_TABLE = "cohort_roi_stats.csv"
COHORT_FIGURE = "cohort_summary.png"
BATCH_SUMMARY = "batch_summary.json"
COHORT_INDEX = "index.html"
#: a region mean stands out when it lies this many robust standard deviations (1.4826 MAD) from the
#: cohort median of the same region and map (Iglewicz & Hoaglin's modified z-score cut-off)
OUTLIER_ROBUST_Z = 3.5
FAILED_MARKER = "FAILED.json"
#: Columns added in front of :data:`chisep.report.ROI_COLUMNS` in the cohort table.
COHORT_KEYS = ("subject", "session", "prefix")

#: Memory of one run, for sizing the local cluster (:func:`default_workers`):
#: ``WORKER_BASE_BYTES + BYTES_PER_VOXEL_ECHO * voxels * echoes``. Fitted to the
#: peak RSS of a worker measured with benchmarks/bench_batch.py (6 echoes, all
#: three models): 650 MB at 8 mm (0.10 M voxel-echoes), 894 MB at 4 mm (0.80 M),
#: 1568 MB at 2 mm (6.4 M): about 150 bytes per voxel-echo above ~0.62 GB of
#: JAX, compiled code and imports; rounded up. A 1 mm whole-head 6-echo scan
#: (~52 M voxel-echoes) thus needs about 9 GB.
BYTES_PER_VOXEL_ECHO = 160
WORKER_BASE_BYTES = 650 * 2**20


# ---------------------------------------------------------------------------
# planning (pure: no Dask)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One multi-echo GRE run of the cohort and whether it still needs to run.

    Attributes
    ----------
    subject, session : str, str or None
        BIDS labels without ``sub-``/``ses-``.
    prefix : str
        Entities shared by the run's files (``sub-01_ses-1``): stem of the output names.
    out_dir : Path
        ``<root>/derivatives/chisep/sub-X[/ses-Y]/anat`` (plus a sub-folder named
        after the other entities when a session holds several runs).
    magnitude, phase : tuple of Path
        Input files, one per echo.
    labels : Path or None
        Label image for the ROI table, if any (names from the ``.tsv`` beside it).
    needs_run : bool
        False when the outputs are complete for these inputs (and settings).
    reason : str
        Why it needs to run, or why it counts as complete.
    """

    subject: str
    session: str | None
    prefix: str
    out_dir: Path
    magnitude: tuple[Path, ...]
    phase: tuple[Path, ...]
    labels: Path | None = None
    needs_run: bool = True
    reason: str = ""

    @property
    def name(self) -> str:
        return self.prefix

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The files whose checksums decide completion (data, and the label image if any)."""
        return self.magnitude + self.phase + ((self.labels,) if self.labels is not None else ())


def _normalised(obj) -> Any:
    """JSON round trip, so that tuples and lists (and numpy scalars) compare equal to a reread file."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def check_complete(out_dir: PathLike, inputs: Sequence[PathLike], *,
                   settings: Mapping | None = None) -> tuple[bool, str]:
    """Whether ``out_dir`` holds a finished run for exactly these inputs.

    Parameters
    ----------
    out_dir : path
        Output folder of one run.
    inputs : sequence of paths
        The run's input files. Each must appear in ``provenance.json`` with the
        same file name and SHA-256 (the dataset may have moved, so absolute
        paths are not compared), and no other input may be recorded.
    settings : mapping, optional
        ``PipelineSettings.to_dict()`` of the intended run; if given, the
        recorded settings must be equal.

    Returns
    -------
    complete : bool
    reason : str
        What was found: ``"complete (...)"`` or why the run must be (re)done.
    """
    out = Path(out_dir)
    prov_path = out / "provenance.json"
    if not prov_path.is_file():
        failed = io.read_json_or_none(out / FAILED_MARKER)
        if failed is not None:
            return False, f"failed before: {failed.get('error', 'unknown error')}"
        return False, "not run yet" if not out.exists() else "unfinished (no provenance.json)"
    prov = io.read_json_or_none(prov_path)
    if prov is None:
        return False, "provenance.json is unreadable"
    missing = [name for name in prov.get("outputs", []) if not (out / name).is_file()]
    if missing or not prov.get("outputs"):
        return False, (f"{len(missing)} output(s) missing, e.g. {missing[0]}" if missing
                       else "provenance.json lists no outputs")
    recorded = sorted((Path(r.get("path", "")).name, r.get("sha256")) for r in prov.get("inputs", []))
    current = []
    for p in inputs:
        p = Path(p)
        if not p.is_file():
            return False, f"input {p} is missing"
        current.append((p.name, io.file_sha256(p)))
    current.sort()
    if current != recorded:
        names = {n for n, _ in recorded}
        changed = [n for n, s in current if (n, s) not in recorded]
        if changed:
            what = "changed since the run (checksum differs)" if changed[0] in names else "not used by the run"
            return False, f"input {changed[0]} {what}"
        extra = [n for n, _ in recorded if n not in {c for c, _ in current}]
        return False, f"the run used input(s) no longer given: {', '.join(extra)}"
    if settings is not None and _normalised(dict(settings)) != prov.get("settings"):
        return False, "settings differ from the recorded run"
    return True, f"complete ({prov.get('created_utc', 'time unknown')})"


def _label_file(pattern: str | None, root: Path, run: "io.BidsRun") -> Path | None:
    if pattern is None:
        return None
    try:
        rel = pattern.format(subject=run.subject, session=run.session or "", prefix=run.prefix)
    except (KeyError, IndexError) as exc:
        raise InputError(f"labels pattern {pattern!r}: unknown field {exc}; use {{subject}}, {{session}} "
                         "or {prefix}") from None
    return Path(rel) if Path(rel).is_absolute() else root / rel


def _wanted_subjects(subjects: Sequence[str], present: set, root: Path) -> set:
    wanted = {io.bids_label(s, "sub") for s in subjects}
    absent = sorted(wanted - present)
    if absent:
        raise InputError(f"BIDS root {root}: subject(s) {', '.join(absent)} not found; subjects with MEGRE "
                         f"data: {', '.join(sorted(present))}")
    return wanted


def plan_batch(bids_root: PathLike, *, subjects: Sequence[str] | None = None,
               settings: Mapping | None = None, labels: str | None = None,
               force: bool = False) -> list[Job]:
    """Every multi-echo GRE run of a BIDS dataset as a :class:`Job`, with what remains to do.

    Parameters
    ----------
    bids_root : path
        Folder holding ``dataset_description.json`` and ``sub-*`` folders.
    subjects : sequence of str, optional
        Keep only these subjects (``"01"`` or ``"sub-01"``).
    settings : mapping, optional
        ``PipelineSettings.to_dict()``: runs recorded with other settings need to run.
    labels : str, optional
        Label image per run for the ROI tables, relative to ``bids_root`` (or
        absolute), with fields ``{subject}``, ``{session}``, ``{prefix}``, e.g.
        ``"derivatives/labels/sub-{subject}/anat/{prefix}_dseg.nii.gz"``. A
        ``.tsv`` of the same stem (columns ``index``, ``name``) names the labels.
        Without it the ROI table has one region, the brain mask.
    force : bool
        Mark every run as needing to run.

    Returns
    -------
    list of Job, sorted by subject, session and prefix.

    Raises
    ------
    InputError
        ``bids_root`` is not a folder, holds no MEGRE data, or a requested subject is absent.
    """
    root = Path(bids_root).absolute()
    runs = io.find_megre_runs(root)
    if subjects:
        wanted = _wanted_subjects(subjects, {r.subject for r in runs}, root)
        runs = [r for r in runs if r.subject in wanted]
    folders: dict[Path, list] = {}
    for run in runs:
        anat = root / DERIVATIVES / f"sub-{run.subject}"
        if run.session:
            anat = anat / f"ses-{run.session}"
        folders.setdefault(anat / "anat", []).append(run)
    jobs = []
    for anat, group in folders.items():
        for run in group:
            out = anat
            if len(group) > 1:  # several runs in one session: one folder each, named by the other entities
                base = f"sub-{run.subject}" + (f"_ses-{run.session}" if run.session else "")
                out = anat / (run.prefix[len(base) + 1:] or run.prefix)
            lab = _label_file(labels, root, run)
            job = Job(subject=run.subject, session=run.session, prefix=run.prefix, out_dir=out,
                      magnitude=tuple(run.magnitude), phase=tuple(run.phase), labels=lab)
            if force:
                needs, reason = True, "forced re-run"
            else:
                done, reason = check_complete(out, job.inputs, settings=settings)
                needs = not done
            jobs.append(dataclasses.replace(job, needs_run=needs, reason=reason))
    jobs.sort(key=lambda j: (j.subject, j.session or "", j.prefix))
    return jobs


# ---------------------------------------------------------------------------
# one subject (runs in a worker)
# ---------------------------------------------------------------------------
def thread_environment(threads: int) -> dict[str, str]:
    """Environment variables that cap a worker process at ``threads`` compute threads.

    They must be set before NumPy's BLAS and JAX's XLA backend start in the
    worker (the local cluster sets them when it spawns each worker process).
    BLAS/OpenMP pools take the number directly. XLA has no N-thread cap: with
    one thread its CPU backend is made single-threaded
    (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``);
    with more, XLA's flags are left as they are (XLA then sizes its pool to
    the cores the process may use, e.g. a SLURM job's cgroup or ``taskset``).
    User flags in ``XLA_FLAGS`` are kept. ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
    stops each worker on a GPU machine from reserving 75 % of the GPU memory.
    """
    n = str(int(threads))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.lstrip("-").startswith(("xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads"))]
    if int(threads) == 1:
        # "--" first: XLA reads a first token without it as a file name of flags
        flags = ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"] + flags
    env = {name: n for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover (Windows)
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def _worker_name() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return None




def settings_from_dict(settings: Mapping | None):
    """``PipelineSettings`` from its ``to_dict()`` form (how settings travel to workers)."""
    from chisep import pipeline

    if settings is None:
        return pipeline.PipelineSettings()
    if isinstance(settings, pipeline.PipelineSettings):
        return settings
    try:
        return pipeline.PipelineSettings(qsm=pipeline.QsmSettings(**settings.get("qsm", {})),
                                         separation=pipeline.SeparationSettings(**settings.get("separation", {})))
    except TypeError as exc:
        raise InputError(f"batch settings: unknown setting ({exc})") from None


def run_subject(job: Job, settings: Mapping | None = None, *, attempt: int = 1,
                compilation_cache: PathLike | None = None) -> dict:
    """Run the whole pipeline for one job and write its outputs; never raises.

    A stale ``provenance.json`` and ``FAILED.json`` are removed first, so that
    until this run finishes the folder does not look complete. On failure
    ``FAILED.json`` records the error and traceback.

    Parameters
    ----------
    job : Job
    settings : mapping, optional
        ``PipelineSettings.to_dict()`` (default settings if None).
    attempt : int
        Attempt number, recorded in the result.
    compilation_cache : path, optional
        Shared JAX compilation cache folder (see :func:`chisep.pipeline.use_compilation_cache`).

    Returns
    -------
    dict with ``subject, session, prefix, out_dir, status ("done" | "failed"),
    attempt, error, elapsed_s, timings, peak_rss_mb`` (of the worker process
    so far, MB), ``worker`` (Dask worker name) and ``xla_flags`` (as the worker saw them).
    """
    t0 = time.perf_counter()
    row = {"subject": job.subject, "session": job.session, "prefix": job.prefix, "out_dir": str(job.out_dir),
           "attempt": attempt, "started_unix": round(time.time(), 3), "worker": _worker_name(), "error": None,
           "timings": {}}
    try:
        from chisep import workflows
        from chisep.pipeline import use_compilation_cache

        if compilation_cache is not None:
            use_compilation_cache(compilation_cache)
        for stale in ("provenance.json", FAILED_MARKER):
            try:
                (job.out_dir / stale).unlink()
            except FileNotFoundError:
                pass
        data = io.load_gre(list(job.magnitude), list(job.phase))
        sources = dict(data.sources)
        sources["bids"] = {"subject": job.subject, "session": job.session, "prefix": job.prefix, "root": None}
        data = dataclasses.replace(data, sources=sources)
        # run_files reads the label names from the .tsv beside the label image
        run = workflows.run_files(data, job.out_dir, settings=settings_from_dict(settings),
                                 labels_path=job.labels, bids_prefix=job.prefix, overwrite=True)
        row.update(status="done", timings=run.timings)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a result row, reported, not raised
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        try:
            io.write_json(job.out_dir / FAILED_MARKER,
                          {"error": row["error"], "attempt": attempt, "traceback": row["traceback"],
                           "note": "this run did not finish; its outputs, if any, are incomplete"},
                          overwrite=True)
        except Exception:  # noqa: BLE001 - the marker is a courtesy; the result row carries the error
            pass
    row["elapsed_s"] = round(time.perf_counter() - t0, 2)
    row["peak_rss_mb"] = _peak_rss_mb()
    row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return row


# ---------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------
def _import_distributed():
    try:
        import dask
        import distributed
    except ImportError as exc:
        raise InputError(f"chisep batch needs Dask ({exc}); install the extra with: "
                         "pip install chisep[batch]") from None
    return dask, distributed


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


def voxel_echoes(job: Job) -> int:
    """Voxels x echoes of a job's data (from the first magnitude file's header)."""
    shape = io.image_shape(job.magnitude[0], "magnitude")
    n_echoes = len(job.magnitude) * (shape[3] if len(shape) > 3 else 1)
    return int(math.prod(shape[:3])) * n_echoes


def estimate_job_memory(job: Job) -> int:
    """Bytes one worker needs for a run: :data:`WORKER_BASE_BYTES` + voxel-echoes x :data:`BYTES_PER_VOXEL_ECHO`."""
    return WORKER_BASE_BYTES + voxel_echoes(job) * BYTES_PER_VOXEL_ECHO


def default_workers(jobs: Sequence[Job], *, cores: int | None = None,
                    memory: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for a local cluster on this machine.

    One run per worker, one compute thread per run: runs are independent, so
    throughput is highest with as many single-threaded workers as there are
    cores, unless memory allows fewer; then the spare cores are shared out
    as threads. Never more workers than jobs.
    """
    cores = cores or _cpu_count()
    memory = memory if memory is not None else _available_memory()
    n = min(cores, max(1, len(jobs)))
    if memory and jobs:
        need = max(estimate_job_memory(j) for j in jobs)
        n = max(1, min(n, int(0.8 * memory // need)))
    return n, max(1, cores // n)


# ---------------------------------------------------------------------------
# the batch
# ---------------------------------------------------------------------------
@dataclass
class BatchSummary:
    """What :func:`run_batch` did.

    Attributes
    ----------
    rows : list of dict
        One per run of the dataset: ``status`` is ``done`` (ran now),
        ``skipped`` (complete before), ``failed`` (after all attempts;
        ``error`` holds the message) or ``not selected`` (incomplete, but
        outside ``subjects``).
    cohort_table, figure, summary_path : Path
    wall_s : float
        Wall time of the whole invocation, s.
    dashboard : str or None
        Dask dashboard address, if a cluster was used.
    workers : int
        Number of Dask workers used (0 if nothing had to run).
    """

    rows: list
    cohort_table: Path
    figure: Path
    summary_path: Path
    wall_s: float
    dashboard: str | None = None
    workers: int = 0

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def n_failed(self) -> int:
        return self.count("failed")

    def text(self) -> str:
        lines = [f"chisep batch: {self.count('done')} run, {self.count('skipped')} already complete, "
                 f"{self.n_failed} failed in {self.wall_s:.0f} s"
                 + (f", {self.count('not selected')} incomplete not selected" if self.count("not selected") else "")]
        lines += [f"  FAILED {r['prefix']} after {r['attempt']} attempt(s): {r['error']}"
                  for r in self.rows if r["status"] == "failed"]
        lines.append(f"  cohort table {self.cohort_table}\n  figure {self.figure}\n  summary {self.summary_path}")
        return "\n".join(lines)


class _Counter:
    """Live count of done / failed / running / queued runs, printed when it changes."""

    def __init__(self, total: int, progress: Progress):
        self.total, self.progress, self.t0, self.last = total, progress, time.perf_counter(), None

    def show(self, done: int, failed: int, running: int, force: bool = False) -> None:
        state = (done, failed, running)
        if state == self.last and not force:
            return
        self.last = state
        queued = self.total - done - failed - running
        self.progress(f"[{time.perf_counter() - self.t0:6.0f} s] done {done}, failed {failed}, running {running}, "
                      f"queued {max(queued, 0)} (of {self.total})")


def _running(client, keys: set) -> int:
    """How many of ``keys`` a worker is executing now (its queue is capped by its thread count)."""
    try:
        processing = client.processing()
        threads = client.nthreads()
    except Exception:  # noqa: BLE001 - the count is cosmetic; never let it stop the batch
        return 0
    return sum(min(sum(k in keys for k in tasks), threads.get(w, 1)) for w, tasks in processing.items())


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401 - the Dask dashboard needs it
    except ImportError:
        return False
    return True


def _start_client(scheduler: str | None, workers: int, threads: int, dashboard_address: str):
    dask, distributed = _import_distributed()
    if scheduler:
        return distributed.Client(scheduler, timeout="60s"), None
    env = thread_environment(threads)
    blas = {k: v for k, v in env.items() if k.endswith("_THREADS")}
    # BLAS pools start when NumPy is imported, before a worker could set its own
    # environment, so these go in pre-spawn-environ; the XLA flags are read when
    # JAX starts its backend at the first task, so env= is early enough.
    with dask.config.set({"distributed.nanny.pre-spawn-environ":
                          {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **blas}}):
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, env=env,
                                           dashboard_address=dashboard_address, silence_logs=40)
    return distributed.Client(cluster), cluster


def run_batch(bids_root: PathLike, *, subjects: Sequence[str] | None = None, scheduler: str | None = None,
              workers: int | None = None, threads_per_worker: int | None = None, retries: int = 1,
              settings=None, labels: str | None = None, force: bool = False,
              compilation_cache: PathLike | bool | None = True, dashboard_address: str = ":8787",
              poll_s: float = 1.0, progress: Progress = print) -> BatchSummary:
    """Process every multi-echo GRE run of a BIDS dataset as independent Dask tasks.

    Runs that are complete (see :func:`check_complete`) are skipped; the
    others run through :func:`run_subject`, each failure is retried up to
    ``retries`` times and then reported, without stopping the other runs.
    Finally writes the cohort ROI table, the summary figure and
    ``batch_summary.json`` under ``<bids_root>/derivatives/chisep/``.

    Parameters
    ----------
    bids_root : path
    subjects : sequence of str, optional
        Run only these subjects. The cohort table, figure and summary still
        cover every complete run of the dataset.
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``), e.g. of a
        dask-jobqueue cluster. Default: a local cluster of worker processes.
    workers, threads_per_worker : int, optional
        Size of the local cluster; default :func:`default_workers` (one
        single-threaded worker per core, as memory allows).
    retries : int
        Extra attempts after a failure (0: fail at once).
    settings : PipelineSettings or its ``to_dict()``, optional
        Pipeline settings (default settings if None); runs recorded with other
        settings are run again.
    labels : str, optional
        Per-run label image pattern (see :func:`plan_batch`).
    force : bool
        Run every subject, complete or not.
    compilation_cache : path or bool
        JAX compilation cache shared by the workers (a folder all of them can
        reach): True (default) for ``derivatives/chisep/.jax_cache``, False or
        None for none.
    dashboard_address : str
        Where the local cluster serves its dashboard (``":0"``: any free port).
    poll_s : float
        Seconds between progress updates.
    progress : callable
        Receives progress lines (``print`` by default).

    Returns
    -------
    BatchSummary

    Raises
    ------
    InputError
        Bad arguments, no MEGRE data, or Dask missing while there is work to do.
    """
    t0 = time.perf_counter()
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InputError(f"retries must be an integer >= 0, got {retries!r}")
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    settings_dict = settings_from_dict(settings).to_dict()
    root = Path(bids_root).absolute()  # workers may run elsewhere (another cwd, another node)
    if compilation_cache is True:
        cache = str(root / DERIVATIVES / ".jax_cache")
    else:
        cache = str(Path(compilation_cache).absolute()) if compilation_cache else None
    # every run is planned, selected or not: the cohort outputs cover the whole dataset
    jobs = plan_batch(root, settings=settings_dict, labels=labels)
    wanted = _wanted_subjects(subjects, {j.subject for j in jobs}, root) if subjects else None
    selected = [j for j in jobs if wanted is None or j.subject in wanted]
    if force:
        forced = {j.prefix for j in selected}
        jobs = [dataclasses.replace(j, needs_run=True, reason="forced re-run") if j.prefix in forced else j
                for j in jobs]
        selected = [j for j in jobs if j.prefix in forced]
    todo = [j for j in selected if j.needs_run]
    progress(f"chisep batch: {len(selected)} run(s) selected in {root}: {len(todo)} to run, "
             f"{len(selected) - len(todo)} complete")
    for j in selected:
        progress(f"  {j.prefix}: {'run' if j.needs_run else 'skip'} ({j.reason})")
    rows = {j.prefix: {"subject": j.subject, "session": j.session, "prefix": j.prefix, "out_dir": str(j.out_dir),
                       "status": "not selected" if j.needs_run else "skipped", "attempt": 0, "error": None,
                       "reason": j.reason} for j in jobs}
    dashboard, n_workers = None, 0
    if todo:
        if workers is None and scheduler is None:
            workers, auto_threads = default_workers(todo)
            threads_per_worker = threads_per_worker or auto_threads
        workers = workers or 1
        threads_per_worker = threads_per_worker or max(1, _cpu_count() // workers)
        client, cluster = _start_client(scheduler, workers, threads_per_worker, dashboard_address)
        try:
            dashboard = client.dashboard_link
            n_workers = len(client.scheduler_info(n_workers=-1).get("workers", {})) if scheduler else workers
            hint = "" if scheduler or _has_bokeh() else " (served only with bokeh installed: pip install bokeh)"
            progress(f"Dask: {n_workers} worker(s)"
                     + (f" x {threads_per_worker} thread(s)" if not scheduler else f" at {scheduler}")
                     + f"; dashboard {dashboard}{hint}")
            rows.update(_run_jobs(client, todo, settings_dict, retries, poll_s, progress, cache))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    ordered = [rows[j.prefix] for j in jobs]
    # what ran now is checked again from the files (skipped runs were checked by the plan):
    # only complete runs enter the cohort table
    complete = []
    for j in jobs:
        row = rows[j.prefix]
        if row["status"] == "done":
            done, reason = check_complete(j.out_dir, j.inputs, settings=settings_dict)
            if not done:
                row.update(status="failed", error=f"the run returned but its outputs are incomplete: {reason}")
        if row["status"] in ("done", "skipped"):
            complete.append(j)
    return _write_cohort(root, jobs, complete, ordered, settings_dict, wall_s=time.perf_counter() - t0,
                         dashboard=dashboard, workers=n_workers, progress=progress)


def _run_jobs(client, jobs: Sequence[Job], settings: dict, retries: int, poll_s: float,
              progress: Progress, cache: str | None) -> dict[str, dict]:
    from distributed import wait

    by_key = {}

    def submit(job: Job, attempt: int):
        future = client.submit(run_subject, job, settings, attempt=attempt, compilation_cache=cache, pure=False,
                               key=f"chisep-{job.prefix}-attempt{attempt}-{os.urandom(4).hex()}")
        by_key[future.key] = (job, attempt)
        return future

    pending = {submit(j, 1) for j in jobs}
    results: dict[str, dict] = {}
    counter = _Counter(len(jobs), progress)
    counter.show(0, 0, 0, force=True)
    try:
        while pending:
            try:
                finished, pending = wait(pending, timeout=poll_s, return_when="FIRST_COMPLETED")
            except (TimeoutError, asyncio.TimeoutError):  # nothing finished in poll_s: just update the count
                finished = set()
            for future in finished:
                job, attempt = by_key.pop(future.key)
                try:
                    row = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker died (memory, crash): count as a failure
                    row = {"subject": job.subject, "session": job.session, "prefix": job.prefix,
                           "out_dir": str(job.out_dir), "status": "failed", "attempt": attempt,
                           "error": f"the worker failed: {type(exc).__name__}: {exc}"}
                if row["status"] == "failed" and attempt <= retries:
                    progress(f"  {job.prefix}: attempt {attempt} failed ({row['error']}); retrying")
                    pending.add(submit(job, attempt + 1))
                    continue
                row.setdefault("reason", job.reason)
                results[job.prefix] = row
                tail = f"in {row.get('elapsed_s', 0):.1f} s" if row["status"] == "done" else row["error"]
                progress(f"  {job.prefix}: {row['status']} (attempt {attempt}) {tail}")
            done = sum(r["status"] == "done" for r in results.values())
            counter.show(done, len(results) - done, _running(client, {f.key for f in pending}))
    except KeyboardInterrupt:
        client.cancel(list(pending))
        raise
    return results


# ---------------------------------------------------------------------------
# cohort outputs
# ---------------------------------------------------------------------------
def _roi_rows(job: Job) -> list[dict]:
    from chisep.outputs import ROI_TABLE_SUFFIX

    rows = io.read_csv_rows(job.out_dir / f"{job.prefix}_{ROI_TABLE_SUFFIX}.tsv")
    # the per-run TSV writes missing values as BIDS's n/a; the cohort CSV keeps nan (it reads back as float)
    return [{"subject": job.subject, "session": job.session or "", "prefix": job.prefix,
             **{k: "nan" if v == "n/a" else v for k, v in row.items()}} for row in rows]


def cohort_table(jobs: Sequence[Job]) -> list[dict]:
    """The ROI tables of complete jobs, concatenated, with ``subject, session, prefix`` first (strings)."""
    rows = []
    for job in jobs:
        rows += _roi_rows(job)
    return rows


def _csv_text(rows: Sequence[Mapping]) -> str:
    import io as _io

    from chisep.report import ROI_COLUMNS

    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COHORT_KEYS) + list(ROI_COLUMNS), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _summary_maps(rows: Sequence[Mapping]) -> list[str]:
    """chi and the first separation model's chi_para and chi_dia, as named in the ROI tables."""
    names = list(dict.fromkeys(r["map"] for r in rows))
    model = next((n.split(":")[0] for n in names if n.endswith(":chi_para")), None)
    wanted = ["chi"] + ([f"{model}:chi_para", f"{model}:chi_dia"] if model else [])
    return [n for n in wanted if n in names]


def cohort_figure(rows: Sequence[Mapping], *, failed: Sequence[str] = ()):
    """Strip plot of ROI means per run: one panel per map (chi, chi_para, chi_dia), ROIs along x.

    Each dot is one run's ROI mean (ppm); the bar is the cohort mean.
    Returns a matplotlib Figure on an Agg canvas (no pyplot).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = _summary_maps(rows)
    rois = list(dict.fromkeys(r["name"] for r in rows))
    runs = list(dict.fromkeys(r["prefix"] for r in rows))
    # one row per map, ROIs along x: stays legible from 2 to ~40 ROIs
    fig = Figure(figsize=(min(16.0, max(5.0, 1.2 + 0.45 * len(rois))), 0.8 + 2.4 * max(1, len(maps))),
                 layout="constrained")
    FigureCanvasAgg(fig)
    title = f"chisep cohort: {len(runs)} complete run(s)" + (f", {len(failed)} failed" if failed else "")
    if failed:
        title += " (" + ", ".join(list(failed)[:4]) + (", ..." if len(failed) > 4 else "") + ")"
    fig.suptitle(title, fontsize=9)
    if not maps:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no complete runs with chi maps", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(maps), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)  # fixed jitter: identical figures for identical tables
    colours = {p: f"C{i % 10}" for i, p in enumerate(runs)}
    for ax, name in zip(axes, maps):
        for x, roi in enumerate(rois):
            sel = [r for r in rows if r["map"] == name and r["name"] == roi]
            values = np.array([float(r["mean"]) for r in sel])
            if values.size == 0:
                continue
            jitter = rng.uniform(-0.18, 0.18, values.size) if values.size > 1 else np.zeros(1)
            ax.scatter(x + jitter, values, s=14, c=[colours[r["prefix"]] for r in sel], zorder=3)
            finite = values[np.isfinite(values)]
            if finite.size:
                ax.hlines(finite.mean(), x - 0.3, x + 0.3, colors="k", linewidth=1.5, zorder=4)
        ax.axhline(0.0, color="0.7", linewidth=0.8, zorder=1)
        ax.set_xticks(range(len(rois)))
        ax.set_xticklabels(rois if ax is axes[-1] else [], rotation=45, ha="right", fontsize=7)
        ax.set_title(name.replace(":", ": "), fontsize=8)
        ax.set_ylabel("ROI mean (ppm)", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    if len(runs) <= 12:
        handles = [axes[0].scatter([], [], s=14, c=colours[p], label=p) for p in runs]
        axes[0].legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def _write_cohort(root: Path, jobs, complete, rows, settings, *, wall_s, dashboard, workers, progress):
    from chisep import __version__, report
    from chisep.outputs import write_derivatives_description

    out = root / DERIVATIVES
    write_derivatives_description(out)
    table = cohort_table(complete)
    table_path = io.write_bytes(out / COHORT_TABLE, _csv_text(table).encode(), overwrite=True)
    failed = [r["prefix"] for r in rows if r["status"] == "failed"]
    figure_path = io.write_bytes(out / COHORT_FIGURE, report.figure_png_bytes(cohort_figure(table, failed=failed)),
                                 overwrite=True)
    ran = [r for r in rows if r["status"] == "done"]
    doc = {
        "chisep_version": __version__,
        "bids_root": str(root.resolve()),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(wall_s, 2),
        "workers": workers,
        "dashboard": dashboard,
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed", "not selected")},
        "runs_per_hour": round(3600 * len(ran) / wall_s, 2) if ran and wall_s > 0 else None,
        "settings": settings,
        "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in rows],
        "cohort_table": COHORT_TABLE,
        "figure": COHORT_FIGURE,
    }
    summary_path = io.write_json(out / BATCH_SUMMARY, doc, overwrite=True)
    io.write_bytes(out / COHORT_INDEX, cohort_index_html(out, complete, table, failed, figure_path).encode("utf-8"),
                   overwrite=True)
    summary = BatchSummary(rows=rows, cohort_table=table_path, figure=figure_path, summary_path=summary_path,
                           wall_s=wall_s, dashboard=dashboard, workers=workers)
    progress(summary.text())
    return summary


def cohort_outliers(table: Sequence[Mapping], threshold: float = OUTLIER_ROBUST_Z) -> list[dict]:
    """Region means that stand out from the cohort: robust z = (mean - median) / (1.4826 MAD) per
    (region, map), over at least 4 runs; |z| > ``threshold`` is returned, largest first."""
    groups: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for row in table:
        value = float(row["mean"])
        if math.isfinite(value):
            groups.setdefault((row["name"], row["map"]), []).append((row["prefix"], value))
    found = []
    for (region, name), values in groups.items():
        if len(values) < 4:
            continue
        means = [v for _, v in values]
        median = float(np.median(means))
        spread = 1.4826 * float(np.median(np.abs(np.asarray(means) - median)))
        if spread <= 0:
            continue
        for prefix, value in values:
            z = (value - median) / spread
            if abs(z) > threshold:
                found.append({"run": prefix, "region": region, "map": name, "mean": value,
                              "cohort_median": median, "robust_z": round(z, 1)})
    return sorted(found, key=lambda r: -abs(r["robust_z"]))


def _thumbnail(job: Job) -> bytes | None:
    """Axial chi slice of a run through the brain's centre, as a small PNG (None if unreadable)."""
    from chisep import report
    from chisep.outputs import output_name

    try:
        chi, _, _ = io.load_map(job.out_dir / f"{output_name('chi', job.prefix)}.nii.gz", name="chi")
        mask, _, _ = io.load_map(job.out_dir / f"{output_name('mask', job.prefix)}.nii.gz", name="mask")
    except (OSError, ValueError, ChisepError):
        return None
    fig = report.axial_thumbnail("chi", chi, mask > 0.5)
    return report.figure_png_bytes(fig, dpi=80)


def cohort_index_html(out: Path, complete: Sequence[Job], table: Sequence[Mapping], failed: Sequence[str],
                      figure_path: Path | None) -> str:
    """index.html of the cohort: a link to each run's report, a chi thumbnail, brain means, outliers."""
    from chisep import __version__, html_report

    runs = []
    for job in complete:
        means = {r["map"]: float(r["mean"]) for r in table
                 if r["prefix"] == job.prefix and r["map"] in ("chi", "r2star") and r["name"] == "brain"}
        runs.append({"prefix": job.prefix, "report": (job.out_dir / f"{job.prefix}_report.html").relative_to(out)
                     .as_posix(), "thumbnail": _thumbnail(job), "values": means})
    cohort_png = figure_path.read_bytes() if figure_path is not None and figure_path.exists() else None
    return html_report.cohort_index(title="chisep cohort", subtitle=f"chisep {__version__}, "
                                    f"{time.strftime('%Y-%m-%d %H:%M')}, {len(complete)} complete runs",
                                    runs=runs, outliers=cohort_outliers(table), failed=failed,
                                    cohort_png=cohort_png)


# ---------------------------------------------------------------------------
# a simulated cohort (tests, benchmarks, tutorials)
# ---------------------------------------------------------------------------
def simulate_cohort(bids_root: PathLike, subjects: Sequence[str] = ("01", "02", "03"), *,
                    overwrite: bool = False, **simulation) -> list[Path]:
    """Simulate the head phantom for several subjects into one BIDS dataset.

    Subject ``i`` gets seed ``seed + i`` (noise differs between subjects).
    Its ground truth goes to ``derivatives/truth/sub-<label>/`` (labels with
    ``labels.tsv``, usable as the batch ``labels`` pattern
    ``"derivatives/truth/sub-{subject}/labels.nii.gz"``).

    Parameters
    ----------
    bids_root : path
    subjects : sequence of str
        Labels without ``sub-``.
    overwrite : bool
    **simulation
        Keywords of :func:`chisep.workflows.simulate` (``resolution``, ``snr``, ``seed``, ...).

    Returns
    -------
    list of Path, each subject's truth folder.
    """
    from chisep import workflows
    from chisep.errors import OutputExistsError

    root = Path(bids_root)
    base_seed = int(simulation.pop("seed", 0))
    truths = []
    for i, label in enumerate(subjects):
        label = io.bids_label(label, "sub")
        target, truth = root / f"sub-{label}", root / "derivatives" / "truth" / f"sub-{label}"
        if (target.exists() or truth.exists()) and not overwrite:
            raise OutputExistsError(f"{target} exists; pass overwrite=True or choose another folder")
        workflows.simulate_dataset(root, subject=label, seed=base_seed + i, truth_dir=truth, overwrite=overwrite,
                                   **simulation)
        truths.append(truth)
    return truths
