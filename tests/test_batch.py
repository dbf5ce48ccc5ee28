"""Tests for chisep.batch: planning and completion checks (pure), and a real local Dask
cluster (2 worker processes) on a simulated 3-subject BIDS cohort with one corrupted subject."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chisep import batch, io, pipeline
from chisep.cli import main
from chisep.errors import InputError

pytestmark = pytest.mark.slow  # a Dask cluster over a simulated cohort

import distributed  # noqa: E402,F401  the test extra installs Dask: missing, it is a failure, not a skip

LABELS = "derivatives/truth/sub-{subject}/labels.nii.gz"
# cheap but complete pipeline: every stage runs, on 8 mm voxels
SETTINGS = pipeline.PipelineSettings(
    qsm=pipeline.QsmSettings(field_fit="weighted-linear", inversion="tkd"),
    separation=pipeline.SeparationSettings(models=("linear",)),
)
CLI_SETTINGS = ["--field-fit", "weighted-linear", "--inversion", "tkd", "--models", "linear"]


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated gzip, as after an interrupted copy


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Simulate sub-01..03, truncate one phase file of sub-03, run the batch once."""
    root = tmp_path_factory.mktemp("cohort") / "bids"
    batch.simulate_cohort(root, ("01", "02", "03"), resolution=8.0, snr=50.0, phantom="simple")
    bad = root / "sub-03" / "anat" / "sub-03_echo-2_part-phase_MEGRE.nii.gz"
    _corrupt(bad)
    log: list[str] = []
    summary = batch.run_batch(root, workers=2, retries=1, settings=SETTINGS, labels=LABELS,
                              dashboard_address=":0", progress=log.append)
    return {"root": root, "summary": summary, "log": log, "bad": bad}


def _rows(summary):
    return {r["subject"]: r for r in summary.rows}


# ---------------------------------------------------------------------------
# real cluster
# ---------------------------------------------------------------------------
def test_good_subjects_complete_and_the_corrupted_one_fails_cleanly(cohort):
    root, summary = cohort["root"], cohort["summary"]
    rows = _rows(summary)
    assert [rows[s]["status"] for s in ("01", "02", "03")] == ["done", "done", "failed"]
    assert summary.n_failed == 1 and summary.workers == 2
    # the failure was retried once, then reported with the file that caused it
    assert rows["03"]["attempt"] == 2
    assert "InputError" in rows["03"]["error"] and cohort["bad"].name in rows["03"]["error"]
    assert any("attempt 1 failed" in line for line in cohort["log"])
    assert any(line.startswith("Dask: 2 worker(s)") and "dashboard http" in line for line in cohort["log"])
    assert any("done 2, failed 1, running 0, queued 0" in line for line in cohort["log"])
    for s in ("01", "02"):
        out = root / "derivatives" / "chisep" / f"sub-{s}" / "anat"
        assert (out / "provenance.json").is_file() and not (out / batch.FAILED_MARKER).exists()
        assert (out / f"sub-{s}_Chimap.nii.gz").is_file()
        # the worker saw the thread limits set by the local cluster
        assert "intra_op_parallelism_threads=1" in rows[s]["xla_flags"]
        assert rows[s]["peak_rss_mb"] > 100
    assert any((root / "derivatives" / "chisep" / ".jax_cache").iterdir())  # compiled programs shared by workers
    failed_dir = root / "derivatives" / "chisep" / "sub-03" / "anat"
    assert not (failed_dir / "provenance.json").exists()  # never presented as complete
    marker = json.loads((failed_dir / batch.FAILED_MARKER).read_text())
    assert marker["attempt"] == 2 and "Traceback" in marker["traceback"]


def test_cohort_table_figure_and_summary(cohort):
    root, summary = cohort["root"], cohort["summary"]
    with open(summary.cohort_table, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:4] == ["subject", "session", "prefix", "label"]
    assert {r["subject"] for r in table} == {"01", "02"}  # the failed subject is left out
    # the cohort table is exactly the concatenation of the subjects' ROI tables
    for s in ("01", "02"):
        with open(root / "derivatives" / "chisep" / f"sub-{s}" / "anat" / f"sub-{s}_roistats.tsv", newline="") as f:
            own = [{k: "nan" if v == "n/a" else v for k, v in r.items()} for r in csv.DictReader(f, delimiter="\t")]
        mine = [{k: v for k, v in r.items() if k not in batch.COHORT_KEYS} for r in table if r["subject"] == s]
        assert mine == own
    # ROIs come from the phantom labels; physics sanity: the iron-rich globus pallidus is
    # more paramagnetic than white matter in both subjects
    means = {(r["subject"], r["name"], r["map"]): float(r["mean"]) for r in table}
    for s in ("01", "02"):
        assert means[(s, "globus_pallidus", "chi")] > means[(s, "white_matter", "chi")] + 0.03
        assert means[(s, "globus_pallidus", "linear:chi_para")] > means[(s, "white_matter", "linear:chi_para")]
    assert summary.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(summary.summary_path.read_text())
    assert doc["counts"] == {"done": 2, "skipped": 0, "failed": 1, "not selected": 0}
    assert doc["settings"]["separation"]["models"] == ["linear"]
    assert [r["status"] for r in doc["runs"]] == ["done", "done", "failed"]
    assert (root / "derivatives" / "chisep" / "dataset_description.json").is_file()
    # the cohort's index links every complete run's report (links resolve) and lists the failed one
    index = (root / "derivatives" / "chisep" / batch.COHORT_INDEX).read_text()
    links = re.findall(r'href="([^"#]+)"', index)
    assert len(links) == 2 and all((root / "derivatives" / "chisep" / link).is_file() for link in links)
    assert index.count('class="thumb"') == 2 and "sub-03" in index


def test_cohort_outliers_flag_the_run_that_stands_out():
    rows = [{"prefix": f"sub-{i:02d}", "name": "globus_pallidus", "map": "chi", "mean": str(v)}
            for i, v in enumerate([0.12, 0.13, 0.125, 0.118, 0.131, 0.45])]
    rows += [{"prefix": f"sub-{i:02d}", "name": "white_matter", "map": "chi", "mean": str(-0.03 + 0.001 * i)}
             for i in range(6)]
    found = batch.cohort_outliers(rows)
    assert [(r["run"], r["region"]) for r in found] == [("sub-05", "globus_pallidus")]
    assert found[0]["robust_z"] > 3.5
    assert batch.cohort_outliers(rows[:3]) == []  # too few runs to say what stands out


def test_second_invocation_skips_complete_runs(cohort):
    root = cohort["root"]
    provs = {s: root / "derivatives" / "chisep" / f"sub-{s}" / "anat" / "provenance.json" for s in ("01", "02")}
    before = {s: p.stat().st_mtime_ns for s, p in provs.items()}
    plan = batch.plan_batch(root, settings=SETTINGS.to_dict(), labels=LABELS)
    assert [(j.subject, j.needs_run) for j in plan] == [("01", False), ("02", False), ("03", True)]
    assert plan[2].reason.startswith("failed before: InputError")
    log: list[str] = []
    # this time through an existing cluster (the --scheduler path)
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, env=batch.thread_environment(1),
                      dashboard_address=":0", silence_logs=40) as cluster:
        summary = batch.run_batch(root, scheduler=cluster.scheduler_address, retries=0, settings=SETTINGS,
                                  labels=LABELS, progress=log.append)
    rows = _rows(summary)
    assert [rows[s]["status"] for s in ("01", "02", "03")] == ["skipped", "skipped", "failed"]
    assert rows["03"]["attempt"] == 1  # retries=0
    assert any(line.startswith("Dask: 1 worker(s) at tcp://") for line in log)
    assert {s: p.stat().st_mtime_ns for s, p in provs.items()} == before  # not run again
    assert "1 to run, 2 complete" in log[0]
    with open(summary.cohort_table, newline="") as f:
        assert {r["subject"] for r in csv.DictReader(f)} == {"01", "02"}


def test_cli_batch_with_nothing_to_do_starts_no_cluster(cohort, capsys):
    root = cohort["root"]
    code = main(["batch", str(root), "--subject", "01", "sub-02", "--labels", LABELS, *CLI_SETTINGS])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 run(s) selected" in out and "0 to run, 2 complete" in out and "Dask:" not in out
    # the cohort outputs still describe the whole dataset; the failed subject was not selected
    doc = json.loads((root / "derivatives" / "chisep" / batch.BATCH_SUMMARY).read_text())
    assert [r["status"] for r in doc["runs"]] == ["skipped", "skipped", "not selected"]
    assert doc["runs"][2]["reason"].startswith("failed before")
    assert "1 incomplete not selected" in out
    # other settings make the runs incomplete (they would run again)
    plan = batch.plan_batch(root, subjects=["01"], settings=pipeline.PipelineSettings().to_dict(), labels=LABELS)
    assert plan[0].needs_run and plan[0].reason == "settings differ from the recorded run"


def test_default_workers_follow_cores_and_memory(cohort):
    jobs = batch.plan_batch(cohort["root"])
    need = batch.estimate_job_memory(jobs[0])
    # the estimate sizes workers: it must cover what a run takes (a worker over its limit is killed) without
    # wasting the machine. Measured: the peak memory of one run of this cohort in its own process
    run = [sys.executable, "-m", "chisep", "run", "--bids", str(cohort["root"]), "--subject", "01",
           "--out", str(cohort["root"].parent / "memory-probe"), "--quiet", *CLI_SETTINGS]
    # a fresh parent whose only child is the run: RUSAGE_CHILDREN is then that run's peak (Linux: kB)
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, *run], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.split()[-1]) * 1024
    assert 0.4 * need < peak < need, (peak / 2**20, need / 2**20)  # measured 370 MB of 665 MB
    assert batch.default_workers(jobs, cores=8, memory=10**12) == (3, 2)  # never more workers than jobs
    assert batch.default_workers(jobs, cores=2, memory=10**12) == (2, 1)
    assert batch.default_workers(jobs, cores=8, memory=int(2.6 * need)) == (2, 4)  # memory-bound: 80 % of it
    assert batch.default_workers(jobs, cores=8, memory=1) == (1, 8)


# ---------------------------------------------------------------------------
# pure planning and completion checks (no cluster)
# ---------------------------------------------------------------------------
def _fake_bids(root: Path, runs) -> None:
    """MEGRE file names only (planning never reads the voxels); contents differ per file."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    for prefix, folder in runs:
        anat = root / folder / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for echo in (1, 2):
            for part in ("mag", "phase"):
                name = f"{prefix}_echo-{echo}_part-{part}_MEGRE.nii.gz"
                (anat / name).write_bytes(name.encode())


def test_plan_batch_folders_sessions_and_several_runs(tmp_path):
    root = tmp_path / "bids"
    _fake_bids(root, [("sub-01_ses-a", "sub-01/ses-a"), ("sub-01_ses-b_run-1", "sub-01/ses-b"),
                      ("sub-01_ses-b_run-2", "sub-01/ses-b"), ("sub-02", "sub-02")])
    jobs = batch.plan_batch(root)
    base = root / "derivatives" / "chisep"
    assert [(j.prefix, j.out_dir) for j in jobs] == [
        ("sub-01_ses-a", base / "sub-01/ses-a/anat"),
        ("sub-01_ses-b_run-1", base / "sub-01/ses-b/anat/run-1"),  # one folder per run: no clash
        ("sub-01_ses-b_run-2", base / "sub-01/ses-b/anat/run-2"),
        ("sub-02", base / "sub-02/anat"),
    ]
    assert all(j.needs_run and j.reason == "not run yet" for j in jobs)
    assert [j.prefix for j in batch.plan_batch(root, subjects=["sub-02"])] == ["sub-02"]
    with pytest.raises(InputError, match="subject.*07.*not found.*01, 02"):
        batch.plan_batch(root, subjects=["07"])
    labelled = batch.plan_batch(root, subjects=["02"], labels="derivatives/seg/{prefix}_dseg.nii.gz")[0]
    assert labelled.labels == root / "derivatives/seg/sub-02_dseg.nii.gz"
    assert labelled.inputs[-1] == labelled.labels  # label image counts as an input
    with pytest.raises(InputError, match="unknown field"):
        batch.plan_batch(root, labels="{subjet}.nii.gz")


def test_check_complete_detects_every_kind_of_change(tmp_path):
    root = tmp_path / "bids"
    _fake_bids(root, [("sub-01", "sub-01")])
    job = batch.plan_batch(root)[0]
    out = job.out_dir
    settings = SETTINGS.to_dict()
    assert batch.check_complete(out, job.inputs) == (False, "not run yet")
    out.mkdir(parents=True)
    (out / "sub-01_Chimap.nii.gz").write_bytes(b"x")
    assert batch.check_complete(out, job.inputs) == (False, "unfinished (no provenance.json)")
    io.write_json(out / batch.FAILED_MARKER, {"error": "InputError: boom"})
    assert batch.check_complete(out, job.inputs) == (False, "failed before: InputError: boom")
    io.write_provenance(out, inputs=job.inputs, settings=settings, timings={},
                        extra={"outputs": ["sub-01_Chimap.nii.gz"]})
    done, reason = batch.check_complete(out, job.inputs, settings=settings)
    assert done and reason.startswith("complete")
    # a moved dataset is still complete: file names and checksums are compared, not paths
    moved = tmp_path / "moved"
    root.rename(moved)
    moved_job = batch.plan_batch(moved, settings=settings)[0]
    assert not moved_job.needs_run
    moved.rename(root)
    # settings, input contents, input list and outputs are all checked
    other = pipeline.PipelineSettings().to_dict()
    assert batch.check_complete(out, job.inputs, settings=other)[1] == "settings differ from the recorded run"
    assert batch.check_complete(out, job.inputs[:-1])[1].startswith("the run used input(s) no longer given")
    job.phase[0].write_bytes(b"changed")
    assert batch.check_complete(out, job.inputs)[1] == (
        f"input {job.phase[0].name} changed since the run (checksum differs)")
    (out / "sub-01_Chimap.nii.gz").unlink()
    assert batch.check_complete(out, job.inputs)[1] == "1 output(s) missing, e.g. sub-01_Chimap.nii.gz"
    (out / "provenance.json").write_text("{not json")
    assert batch.check_complete(out, job.inputs)[1] == "provenance.json is unreadable"
    assert batch.plan_batch(root, force=True)[0].reason == "forced re-run"


def test_thread_environment():
    one = batch.thread_environment(1)
    assert one["OMP_NUM_THREADS"] == "1" and one["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "--xla_cpu_multi_thread_eigen=false" in one["XLA_FLAGS"].split()
    assert "intra_op_parallelism_threads=1" in one["XLA_FLAGS"].split()
    four = batch.thread_environment(4)
    assert four["OPENBLAS_NUM_THREADS"] == "4"
    assert "multi_thread_eigen=false" not in four.get("XLA_FLAGS", "")


def test_thread_environment_keeps_user_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x intra_op_parallelism_threads=3")
    env = batch.thread_environment(1)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1",
                                        "--xla_dump_to=/tmp/x"]
    assert batch.thread_environment(2)["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"


def test_bad_arguments_are_refused(tmp_path):
    root = tmp_path / "bids"
    _fake_bids(root, [("sub-01", "sub-01")])
    for kwargs, match in [({"retries": -1}, "retries"), ({"workers": 0}, "workers"),
                          ({"threads_per_worker": 1.5}, "threads_per_worker")]:
        with pytest.raises(InputError, match=match):
            batch.run_batch(root, progress=lambda s: None, **kwargs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="found none"):
        batch.run_batch(empty, progress=lambda s: None)


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import now fails as if not installed
    with pytest.raises(InputError, match=r"pip install chisep\[batch\]"):
        batch._import_distributed()


def test_core_package_does_not_import_dask_and_jax_accepts_the_worker_flags():
    # one fresh interpreter, with the environment of a single-threaded worker (XLA aborts the
    # process on flags it cannot parse, so the JAX computation checks them)
    code = ("import sys, chisep, chisep.io, chisep.pipeline, chisep.report, chisep.cli, chisep.batch; "
            "chisep.cli.build_parser(); "
            "bad = [m for m in ('dask', 'distributed') if m in sys.modules]; assert not bad, bad; "
            "import jax.numpy as jnp; assert float(jnp.ones(4).sum()) == 4.0")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP", "XLA_FLAGS")}
    env.update(batch.thread_environment(1))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
