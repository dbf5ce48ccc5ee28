"""Property-based tests (hypothesis): argument parsing, units and loaders never crash with a traceback.

Whatever the user types or whatever the files hold, chisep either works or
stops with a clear error: an argparse usage error (exit 2), a ChisepError
message (exit 2), never another exception. Heavy work is stubbed out; the
only files are under pytest's tmp_path.
"""

import argparse
import json
import math
import re

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chisep import cli, io, workflows
from chisep.acquisition import Acquisition
from chisep.errors import ChisepError
from chisep.sim import phantom as _phantom
from chisep.sim.gre import DEFAULT_ECHO_TIMES

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-50, max_value=100).map(lambda v: f"{v:g}"),
    st.integers(-5, 60).map(str),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "", " ", "ms", "4ms", "0.004s", "1,2", "4;10",
                     "0x10", "１０", "--", "-1", "0", "1e-9"]),
).filter(lambda t: not any(c.isspace() for c in t))
# whitespace inside the list is tested on its own (test_spaces_between_echo_times_are_not_joined)
separator = st.sampled_from([",", ",,", ";", "/", ",-"])


@st.composite
def echo_text(draw):
    values = draw(st.lists(number_text, min_size=0, max_size=6))
    return draw(separator).join(values)


def _acceptable_ms(text: str) -> bool:
    """The rule in words: numbers in ms separated by commas or spaces, finite, positive, strictly
    increasing, the longest between 0.5 and 1000 ms (below: seconds given; above: not a GRE echo)."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return False
    return (bool(values) and all(math.isfinite(v) and v > 0 for v in values) and 0.5 <= max(values) <= 1000
            and all(b > a for a, b in zip(values, values[1:])))


@SETTINGS
@given(text=echo_text())
def test_echo_times_parse_to_valid_seconds_or_a_usage_error(text):
    try:
        values = cli.parse_echo_times_ms(text)
    except argparse.ArgumentTypeError as exc:
        assert str(exc).startswith("--echo-times")
        assert not _acceptable_ms(text), f"{text!r} is acceptable yet refused: {exc}"
        return
    assert _acceptable_ms(text), f"{text!r} was accepted"
    assert len(values) >= 1 and all(b > a for a, b in zip(values, values[1:])) and values[0] > 0
    if not all(math.isfinite(v) for v in values):
        return  # known gap, see test_infinite_echo_times_are_a_usage_error
    Acquisition(echo_times=values, field_strength=3.0)  # what the parser lets through, chisep accepts


@pytest.mark.parametrize("text", ["4 10", "4 10 16", "4, 10 16", "1 0"])
def test_spaces_between_echo_times_are_not_joined(text):
    try:
        values = cli.parse_echo_times_ms(text)
    except argparse.ArgumentTypeError:
        return
    assert len(values) == len(text.replace(",", " ").split())


@SETTINGS
@given(text=echo_text())
def test_resolution_parses_to_positive_sizes_or_a_usage_error(text):
    try:
        value = cli._resolution(text)
    except argparse.ArgumentTypeError:
        return
    values = value if isinstance(value, tuple) else (value,)
    assert len(values) in (1, 3) and all(v > 0 and math.isfinite(v) for v in values)


def _stub_simulate(**kwargs):
    """Runs what ``chisep simulate`` validates, without simulating a head."""
    _phantom._validate_resolution(kwargs["resolution"])
    Acquisition(echo_times=kwargs["echo_times"] or DEFAULT_ECHO_TIMES,
                field_strength=kwargs["field_strength"])
    return {"bids_root": "x", "truth_dir": "y"}


def _main_outcome(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        assert exc.code == 2, exc.code
        return 2


@SETTINGS
@given(tes=echo_text(), b0=number_text, res=st.one_of(number_text, st.lists(number_text, min_size=2, max_size=4)
                                                     .map(",".join)),
       snr=number_text, angle=number_text)
def test_simulate_command_line_ends_with_0_or_2(tmp_path, monkeypatch, capsys, tes, b0, res, snr, angle):
    monkeypatch.setattr(workflows, "simulate_dataset", lambda out, **kw: _stub_simulate(**kw))
    argv = ["simulate", "--out", str(tmp_path / "sim"), "--quiet", f"--echo-times={tes}", f"--field-strength={b0}",
            f"--resolution={res}", f"--snr={snr}", f"--b0-angle={angle}"]
    code = _main_outcome(argv)
    assert code in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert err.strip()  # a message says why


@SETTINGS
@given(tes=echo_text(), b0=number_text, sign=st.sampled_from(["1", "-1", "0", "2", "x"]),
       flags=st.lists(st.sampled_from(["--overwrite", "--debug", "--mask-erode=-1", "--unwrap=none",
                                       "--inversion=tikhonov", "--models=linear", "--models=bogus"]), max_size=3))
def test_run_command_line_with_missing_files_ends_with_2(tmp_path, capsys, tes, b0, sign, flags):
    flags = [f for f in flags if f != "--debug"]  # --debug re-raises by design
    argv = ["run", "--magnitude", str(tmp_path / "m.nii.gz"), "--phase", str(tmp_path / "p.nii.gz"),
            "--out", str(tmp_path / "o"), f"--echo-times={tes}", f"--field-strength={b0}", f"--phase-sign={sign}",
            "--quiet", *flags]
    assert _main_outcome(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# loaders: random shapes, dtypes, affines and sidecars give data or an InputError
# --------------------------------------------------------------------------------------------
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
              st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=4), max_leaves=6)
sidecar = st.dictionaries(
    st.sampled_from(["EchoTime", "MagneticFieldStrength", "ImagingFrequency", "EchoNumber", "Units", "Other"]),
    st.one_of(json_value, st.floats(min_value=1e-4, max_value=0.05), st.floats(0.5, 12)), max_size=4)
dtypes = st.sampled_from(["uint8", "int16", "uint16", "int32", "float32", "float64"])


@st.composite
def affines(draw):
    kind = draw(st.sampled_from(["diag", "random", "singular"]))
    if kind == "diag":
        sizes = draw(st.lists(st.floats(0.1, 8), min_size=3, max_size=3))
        a = np.diag([*sizes, 1.0])
    elif kind == "random":
        m = draw(st.lists(st.floats(-3, 3), min_size=9, max_size=9))
        a = np.eye(4)
        a[:3, :3] = np.reshape(m, (3, 3))
    else:
        a = np.diag([1.0, 1.0, 0.0, 1.0])
    return a


def _nifti_bytes(data, affine) -> bytes:
    """NIfTI with the affine in the sform only, so that singular or sheared affines can be stored too."""
    img = nib.Nifti1Image(data, None)
    header = img.header
    header.set_qform(None, code=0)
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    return img.to_bytes()


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=5), dtype=dtypes, affine=affines(),
       mag_side=sidecar, pha_side=sidecar, n_files=st.integers(1, 3), scale=st.sampled_from([1.0, 1000.0, 4096.0]),
       override_te=st.one_of(st.none(), st.lists(st.one_of(st.floats(-1, 1), st.just(math.nan)), max_size=4)),
       override_b0=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_load_gre_returns_data_or_a_clear_error(tmp_path_factory, shape, dtype, affine, mag_side, pha_side, n_files,
                                                scale, override_te, override_b0):
    folder = tmp_path_factory.mktemp("load")
    rng = np.random.default_rng(len(shape) * 7 + n_files)
    mags, phas = [], []
    for i in range(n_files):
        for part, side, values in [("mag", mag_side, rng.uniform(0, 100, shape)),
                                   ("pha", pha_side, rng.uniform(-1, 1, shape) * scale)]:
            data = values.astype(dtype) if dtype.startswith("float") else np.clip(
                values, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
            path = folder / f"{part}{i}.nii"
            path.write_bytes(_nifti_bytes(data, affine))
            (folder / f"{part}{i}.json").write_text(json.dumps(side))
            (mags if part == "mag" else phas).append(path)
    try:
        data = io.load_gre(mags, phas, echo_times=override_te, field_strength=override_b0)
    except ChisepError as exc:
        assert str(exc)
        return
    assert data.magnitude.ndim == 4 and data.magnitude.shape == data.phase.shape
    assert data.magnitude.shape[3] == data.acquisition.n_echoes
    assert np.all(np.isfinite(data.phase)) and np.abs(data.phase).max() <= np.pi + 1e-5
    assert 0.1 <= data.acquisition.field_strength <= 20


@SETTINGS
@given(array=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=64)
       .map(lambda v: np.asarray(v, np.float32)),
       as_int=st.booleans())
def test_rescale_phase_gives_radians_or_a_clear_error(array, as_int):
    raw = np.clip(np.nan_to_num(array, nan=0, posinf=0, neginf=0), -2**31, 2**31 - 128).astype(np.int32) \
        if as_int else array
    try:
        phase, description = io.rescale_phase(raw)
    except ChisepError as exc:
        assert str(exc)
        return
    assert phase.shape == raw.shape and isinstance(description, str) and description
    assert np.all(np.isfinite(phase)) and np.all(phase >= -np.pi - 1e-5) and np.all(phase < np.pi + 1e-5)


@pytest.mark.parametrize("text", ["inf", "1e400", "4,inf"])
def test_infinite_echo_times_are_a_usage_error(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_echo_times_ms(text)


def test_infinite_echo_time_still_ends_with_a_clear_error(tmp_path, capsys):
    argv = ["simulate", "--out", str(tmp_path / "s"), "--echo-times", "4,inf", "--resolution", "10", "--quiet"]
    assert _main_outcome(argv) == 2
    assert "echo" in capsys.readouterr().err
