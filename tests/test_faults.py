"""Fault injection and determinism of ``chisep run``/``chisep qsm`` on a small simulated dataset.

A run that fails or is interrupted must never leave a file that looks complete
but is not (every map under its final name loads; temporary files are gone;
``provenance.json``, written last, is absent); a re-run with ``--overwrite``
finishes the job; existing outputs are never replaced without ``--overwrite``.
The same inputs and settings give bit-identical maps, in this process and in a
fresh one, and the provenance alone is enough to repeat the run.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from chisep import cli, io, pipeline, workflows

# 8 mm keeps each run at a second or two; the checks here are about files, not accuracy
FAST = ["--background", "pdf", "--inversion", "tikhonov", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "bids"
    workflows.simulate_dataset(root, resolution=8.0, seed=3, phantom="simple", echo_times=(0.003, 0.006, 0.009, 0.012))
    return root


def _args(dataset, out, *extra):
    return ["run", "--bids", str(dataset), "--out", str(out), "--models", "linear", *FAST, *extra]


def _temp_files(out: Path):
    return [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith(".chisep-write-test")]


def _assert_only_complete_files(out: Path):
    """Every NIfTI under its final name loads in full, every JSON parses, no temp files, no provenance."""
    assert not (out / "provenance.json").exists()
    assert _temp_files(out) == []
    for path in out.rglob("*.nii.gz"):
        np.asarray(nib.load(path).dataobj)  # a truncated gzip raises here
    for path in out.rglob("*.json"):
        json.loads(path.read_text())


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _fail_on_call(n: int, exc: BaseException, real):
    """A stand-in for ``real`` that raises ``exc`` on its n-th call (1-based) and works otherwise."""
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize("where", ["rename", "write"])
def test_disk_full_mid_run_leaves_no_partial_file_and_rerun_completes(dataset, tmp_path, monkeypatch, capsys, where):
    out = tmp_path / "out"
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "rename":
        # the 5th file reaches its final name: the failure hits after a few maps are finished
        monkeypatch.setattr(os, "replace", _fail_on_call(5, full, os.replace))
    else:
        from chisep.io import write as io_write

        real_writer = io_write._nifti_writer

        def half_then_full(img, path):
            write = real_writer(img, path)

            def partial(f):
                if "local_fieldmap" in path.name:
                    f.write(b"\x1f\x8b partial")
                    raise full
                write(f)

            return partial

        monkeypatch.setattr(io_write, "_nifti_writer", half_then_full)
    assert cli.main(_args(dataset, out)) == cli.EXIT_ERROR
    assert "No space left on device" in capsys.readouterr().err
    _assert_only_complete_files(out)
    assert any(out.glob("*.nii.gz"))  # some maps were finished before the failure
    monkeypatch.undo()

    before = _snapshot(out)
    # without --overwrite, the finished maps of the failed run are kept as they are
    assert cli.main(_args(dataset, out)) == cli.EXIT_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert cli.main(_args(dataset, out, "--overwrite")) == 0
    assert (out / "provenance.json").exists() and _temp_files(out) == []
    assert (out / "sub-phantom_Chimap.nii.gz").exists()
    assert (out / "sub-phantom_desc-linearParamagnetic_Chimap.nii.gz").exists()


def test_interrupt_during_a_step_exits_130_and_leaves_nothing_partial(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(pipeline._inversion, "invert", _fail_on_call(1, KeyboardInterrupt(), None))
    assert cli.main(_args(dataset, out)) == cli.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    _assert_only_complete_files(out)
    assert not any(out.rglob("*.nii.gz"))  # maps are written only after the computation


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, on purpose
def test_ctrl_c_swallowed_by_a_finaliser_still_stops_the_run(dataset, tmp_path, monkeypatch, capsys):
    """Python prints and drops an exception raised inside __del__; the checkpoints catch it."""
    out = tmp_path / "out"
    real_invert = pipeline._inversion.invert

    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler raises here, inside __del__

    def invert_with_swallowed_interrupt(*args, **kwargs):
        Finaliser()  # collected at once: its KeyboardInterrupt is printed and swallowed
        return real_invert(*args, **kwargs)

    monkeypatch.setattr(pipeline._inversion, "invert", invert_with_swallowed_interrupt)
    assert cli.main(_args(dataset, out)) == cli.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "provenance.json").exists()
    _assert_only_complete_files(out)


def test_interrupt_while_writing_exits_130_and_rerun_finishes(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", _fail_on_call(4, KeyboardInterrupt(), os.replace))
    assert cli.main(_args(dataset, out)) == cli.EXIT_INTERRUPTED
    _assert_only_complete_files(out)
    monkeypatch.undo()
    assert cli.main(_args(dataset, out, "--overwrite")) == 0
    assert (out / "provenance.json").exists()


def test_read_only_output_folder_is_refused_before_any_work(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):
        # running as root: permissions do not stop writes, so the refusal is simulated by making
        # the folder's write probe fail the way a read-only file system makes it fail
        real_touch = Path.touch

        def touch(self, *a, **k):
            if self.name.startswith(".chisep-write-test"):
                raise PermissionError(errno.EROFS, "Read-only file system", str(self))
            return real_touch(self, *a, **k)

        monkeypatch.setattr(Path, "touch", touch)

    def must_not_run(*a, **k):
        raise AssertionError("the computation started although the output folder is not writable")

    monkeypatch.setattr(workflows, "reconstruct_qsm", must_not_run)
    try:
        assert cli.main(_args(dataset, out)) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert "not writable" in err and "Traceback" not in err
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_finished_run_is_not_touched_without_overwrite(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(dataset, out)) == 0
    before = _snapshot(out)
    monkeypatch.setattr(workflows, "reconstruct_qsm",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran although outputs exist")))
    assert cli.main(_args(dataset, out)) == cli.EXIT_ERROR
    assert "provenance.json" in capsys.readouterr().err
    assert _snapshot(out) == before


def _maps(out: Path) -> dict:
    return {k: v for k, v in _snapshot(out).items() if k.endswith((".nii.gz", ".csv")) or
            (k.endswith(".json") and k != "provenance.json")}


def test_same_inputs_give_bit_identical_maps_and_provenance_reproduces_the_run(dataset, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli.main(_args(dataset, a)) == 0
    assert cli.main(_args(dataset, b)) == 0
    first = _maps(a)
    assert len([k for k in first if k.endswith(".nii.gz")]) >= 10
    quality = np.asarray(nib.load(a / "sub-phantom_desc-quality_dseg.nii.gz").dataobj)
    assert quality.dtype == np.uint8 and "Flags" in json.loads((a / "sub-phantom_desc-quality_dseg.json").read_text())
    assert _maps(b) == first

    # a fresh process (new JAX compilation) gives the same bytes
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "chisep", *_args(dataset, c)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _maps(c) == first

    # the provenance holds what is needed to repeat the run: inputs with checksums, every setting,
    # the acquisition (echo times, B0, affine, phase sign), versions
    prov = json.loads((a / "provenance.json").read_text())
    for record in prov["inputs"]:
        assert io.file_sha256(record["path"]) == record["sha256"]
    acq = prov["acquisition"]
    assert acq["phase_sign"] == 1 and acq["field_strength_t"] == 3.0 and len(acq["echo_times_s"]) == 4
    assert len(acq["affine"]) == 4 and len(acq["b0_direction_voxel_axes"]) == 3
    assert {"numpy", "jax", "nibabel", "chisep"} <= set(prov["versions"])
    settings = pipeline.PipelineSettings(qsm=pipeline.QsmSettings(**prov["settings"]["qsm"]),
                                         separation=pipeline.SeparationSettings(**prov["settings"]["separation"]))
    data = io.load_bids(dataset, phase_sign=acq["phase_sign"])
    workflows.run_files(data, tmp_path / "d", settings=settings, bids_prefix=prov["sources"]["bids"]["prefix"])
    # (the first run used --out, so names are BIDS-prefixed there as here)
    assert _maps(tmp_path / "d") == first


_SLOW_WRITES = """
import os, sys, time
real_replace = os.replace
def replace(src, dst):
    print("WRITING", dst, flush=True)
    time.sleep(0.3)  # the temporary file is complete on disk, the final name not yet taken
    return real_replace(src, dst)
os.replace = replace
from chisep import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_writing_never_leaves_a_partial_file(dataset, tmp_path, signum):
    """A real signal arrives in another process while it writes its 3rd file."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, *_args(dataset, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        for _ in range(3):
            line = proc.stdout.readline()
            assert line.startswith("WRITING"), (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == (cli.EXIT_INTERRUPTED if signum == signal.SIGINT else cli.EXIT_TERMINATED)
    assert not (out / "provenance.json").exists()
    for path in out.rglob("*.nii.gz"):
        np.asarray(nib.load(path).dataobj)
    # cli.main turns SIGTERM into an exception, so the writer removes its temporary file too
    assert _temp_files(out) == []
