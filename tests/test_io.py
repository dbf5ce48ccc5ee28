"""Tests for chisep.io: real NIfTI files written with nibabel into tmp_path."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import chisep
from chisep import io, physics
from chisep.acquisition import Acquisition
from chisep.errors import InputError, OutputExistsError

SHAPE = (8, 7, 6)
TES = [0.004, 0.008, 0.012]
AFFINE = np.array([[1.0, 0, 0, -4], [0, 1.2, 0, -3], [0, 0, 2.0, 5], [0, 0, 0, 1]])


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def write_nifti(path, data, affine=AFFINE, sidecar=None, slope=None, inter=None):
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(data), affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    nib.save(img, str(path))
    if sidecar is not None:
        io.sidecar_path(path).write_text(json.dumps(sidecar))
    return path


def make_data(shape=SHAPE, n=3, seed=0):
    rng = np.random.default_rng(seed)
    mag = (rng.random(shape + (n,)) + 0.1).astype(np.float32)
    phase = rng.uniform(-np.pi, np.pi, shape + (n,)).astype(np.float32)
    return mag, phase


def write_4d(tmp_path, mag, phase, *, tes=TES, b0=3.0, affine=AFFINE, sidecar=True):
    side = {"EchoTime": list(tes), "MagneticFieldStrength": b0} if sidecar else None
    m = write_nifti(tmp_path / "mag.nii.gz", mag, affine, side)
    p = write_nifti(tmp_path / "phase.nii.gz", phase, affine, side)
    return m, p


def write_per_echo(tmp_path, mag, phase, *, tes=TES, b0=3.0, affine=AFFINE, sidecar=True):
    mags, phases = [], []
    for i in range(mag.shape[3]):
        side = {"EchoTime": tes[i], "MagneticFieldStrength": b0} if sidecar else None
        mags.append(write_nifti(tmp_path / f"mag_e{i + 1}.nii.gz", mag[..., i], affine, side))
        phases.append(write_nifti(tmp_path / f"phase_e{i + 1}.nii.gz", phase[..., i], affine, side))
    return mags, phases


def wrapped_diff(a, b):
    return np.abs(np.angle(np.exp(1j * (np.asarray(a, np.float64) - np.asarray(b, np.float64)))))


def leftover_temp_files(folder):
    return [p for p in Path(folder).rglob("*") if ".tmp-" in p.name]


def rotation_x(deg):
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------
def test_round_trip_4d_with_sidecars(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase)
    data = io.load_gre(m, p)
    assert data.magnitude.dtype == np.float32 and data.phase.dtype == np.float32
    np.testing.assert_array_equal(data.magnitude, mag)
    np.testing.assert_array_equal(data.phase, phase)
    assert data.acquisition.echo_times == tuple(TES)
    assert data.acquisition.field_strength == 3.0
    np.testing.assert_allclose(data.acquisition.voxel_size, [1.0, 1.2, 2.0])
    np.testing.assert_allclose(data.affine, AFFINE, atol=1e-6)
    assert data.shape == SHAPE + (3,) and data.n_echoes == 3
    assert "mag.json" in data.sources["echo_times"]
    assert "MagneticFieldStrength" in data.sources["field_strength"]
    assert data.sources["phase_scaling"].startswith("radians")
    assert data.sources["checksums"][str(m)] == io.file_sha256(m)
    assert isinstance(data.header, nib.Nifti1Header)


def test_phase_unwrapped_elsewhere_is_read_as_it_is(tmp_path):
    mag, _ = make_data()
    unwrapped = np.linspace(-40.0, 60.0, mag.size, dtype=np.float32).reshape(mag.shape)  # rad, far beyond pi
    m, p = write_4d(tmp_path, mag, unwrapped)
    data = io.load_gre(m, p, phase_unwrapped=True)
    np.testing.assert_array_equal(data.phase, unwrapped)
    assert "unwrapped" in data.sources["phase_scaling"]
    flipped = io.load_gre(m, p, phase_unwrapped=True, phase_sign=-1)
    np.testing.assert_array_equal(flipped.phase, -unwrapped)
    # read as a scanner phase instead it would be rescaled to nonsense: refused, with the way out named
    with pytest.raises(InputError, match="--unwrap none"):
        io.load_gre(m, p)


def test_round_trip_per_echo_files(tmp_path):
    mag, phase = make_data()
    mags, phases = write_per_echo(tmp_path, mag, phase)
    data = io.load_gre(mags, phases)
    np.testing.assert_array_equal(data.magnitude, mag)
    np.testing.assert_array_equal(data.phase, phase)
    assert data.acquisition.echo_times == tuple(TES)
    assert len(data.sources["checksums"]) == 6
    # echoes last and contiguous (NIfTI volumes come in Fortran order): the layout the stages want
    assert data.magnitude.flags["C_CONTIGUOUS"] and data.phase.flags["C_CONTIGUOUS"]
    m, p = write_4d(tmp_path, mag, phase)
    data = io.load_gre(m, p)
    assert data.magnitude.flags["C_CONTIGUOUS"] and data.phase.flags["C_CONTIGUOUS"]


def test_mixed_4d_magnitude_and_per_echo_phase(tmp_path):
    mag, phase = make_data()
    m, _ = write_4d(tmp_path, mag, phase)
    _, phases = write_per_echo(tmp_path, mag, phase, sidecar=False)
    data = io.load_gre(m, phases)
    np.testing.assert_array_equal(data.phase, phase)


def test_single_3d_file_is_one_echo(tmp_path):
    mag, phase = make_data(n=1)
    m = write_nifti(tmp_path / "m.nii", mag[..., 0])
    p = write_nifti(tmp_path / "p.nii", phase[..., 0])
    data = io.load_gre(m, p, echo_times=[0.02], field_strength=7)
    assert data.magnitude.shape == SHAPE + (1,)
    assert data.acquisition.echo_times == (0.02,)


def test_three_d_file_with_several_echo_times_explains(tmp_path):
    mag, phase = make_data(n=1)
    m = write_nifti(tmp_path / "m.nii.gz", mag[..., 0])
    p = write_nifti(tmp_path / "p.nii.gz", phase[..., 0])
    with pytest.raises(InputError, match="3D") as err:
        io.load_gre(m, p, echo_times=TES, field_strength=3)
    assert "m.nii.gz" in str(err.value) and "expected 1 echo time" in str(err.value)


# ---------------------------------------------------------------------------
# sidecars and overrides
# ---------------------------------------------------------------------------
def test_arguments_override_sidecars(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase, tes=TES, b0=3.0)
    data = io.load_gre(m, p, echo_times=[0.005, 0.010, 0.020], field_strength=7.0)
    assert data.acquisition.echo_times == (0.005, 0.010, 0.020)
    assert data.acquisition.field_strength == 7.0
    assert data.sources["echo_times"] == "argument"
    assert data.sources["field_strength"] == "argument"


def test_imaging_frequency_gives_field_strength(tmp_path):
    mag, phase = make_data()
    side = {"EchoTime": TES, "ImagingFrequency": 123.2}
    m = write_nifti(tmp_path / "m.nii.gz", mag, sidecar=side)
    p = write_nifti(tmp_path / "p.nii.gz", phase)
    data = io.load_gre(m, p)
    assert data.acquisition.field_strength == pytest.approx(123.2 / 42.577478518, rel=1e-9)
    assert "ImagingFrequency" in data.sources["field_strength"]


def test_phase_sidecars_used_when_magnitude_has_none(tmp_path):
    mag, phase = make_data()
    m = write_nifti(tmp_path / "m.nii.gz", mag)
    p = write_nifti(tmp_path / "p.nii.gz", phase, sidecar={"EchoTime": TES, "MagneticFieldStrength": 3})
    data = io.load_gre(m, p)
    assert data.acquisition.echo_times == tuple(TES)
    assert "p.json" in data.sources["echo_times"]


def test_sidecar_echo_times_disagreeing_between_parts(tmp_path):
    mag, phase = make_data()
    m = write_nifti(tmp_path / "m.nii.gz", mag, sidecar={"EchoTime": TES, "MagneticFieldStrength": 3})
    p = write_nifti(tmp_path / "p.nii.gz", phase,
                    sidecar={"EchoTime": [0.004, 0.009, 0.012], "MagneticFieldStrength": 3})
    with pytest.raises(InputError, match="disagree") as err:
        io.load_gre(m, p)
    assert "m.json" in str(err.value) and "p.json" in str(err.value)
    # an explicit argument settles it
    assert io.load_gre(m, p, echo_times=TES).acquisition.echo_times == tuple(TES)


def test_invalid_json_sidecar(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase)
    io.sidecar_path(m).write_text("{not json")
    with pytest.raises(InputError, match="mag.json"):
        io.load_gre(m, p)


def test_phase_sign_negates_and_stays_half_open(tmp_path):
    mag, phase = make_data()
    phase[0, 0, 0, 0] = -np.float32(np.pi)
    m, p = write_4d(tmp_path, mag, phase)
    data = io.load_gre(m, p, phase_sign=-1)
    assert data.acquisition.phase_sign == -1
    assert wrapped_diff(data.phase, -phase).max() < 1e-6
    assert data.phase.min() >= -np.float32(np.pi) and data.phase.max() < np.float32(np.pi)
    with pytest.raises(InputError, match="phase_sign"):
        io.load_gre(m, p, phase_sign=2)


def test_nifti_scaling_is_applied(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(-4096, 4096, SHAPE + (3,)).astype(np.int16)
    codes.flat[0], codes.flat[1] = -4096, 4095
    mag_codes = rng.integers(1, 1000, SHAPE + (3,)).astype(np.int16)
    # Philips-like: integers with scl_slope/scl_inter giving radians
    p = write_nifti(tmp_path / "p.nii.gz", codes, slope=np.pi / 4096, inter=0.0)
    m = write_nifti(tmp_path / "m.nii.gz", mag_codes, slope=2.0, inter=1.0)
    data = io.load_gre(m, p, echo_times=TES, field_strength=3)
    np.testing.assert_allclose(data.magnitude, mag_codes * 2.0 + 1.0)
    assert data.sources["phase_scaling"].startswith("radians")
    assert wrapped_diff(data.phase, codes * np.pi / 4096).max() < 1e-5


# ---------------------------------------------------------------------------
# phase scaling detection
# ---------------------------------------------------------------------------
TRUE_PHASE = np.linspace(-np.pi, np.pi, 4096, endpoint=False)


def test_rescale_radians_kept():
    phase, how = io.rescale_phase(TRUE_PHASE.astype(np.float32))
    assert how.startswith("radians in [-pi, pi)")
    np.testing.assert_array_equal(phase, TRUE_PHASE.astype(np.float32))


def test_rescale_radians_zero_to_two_pi():
    phase, how = io.rescale_phase((TRUE_PHASE + np.pi).astype(np.float32))
    assert how.startswith("radians in [0, 2 pi)")
    assert wrapped_diff(phase, TRUE_PHASE + np.pi).max() < 1e-5  # the value is the angle: only wrapped
    assert phase.min() >= -np.float32(np.pi) and phase.max() < np.float32(np.pi)


def test_rescale_unsigned_12_bit():
    codes = np.round((TRUE_PHASE + np.pi) / (2 * np.pi) * 4096).astype(np.uint16)
    assert codes.min() == 0 and codes.max() == 4095
    phase, how = io.rescale_phase(codes)
    assert "0..4095" in how
    assert wrapped_diff(phase, TRUE_PHASE).max() < 1e-5


def test_rescale_signed_12_bit():
    codes = np.round(TRUE_PHASE / np.pi * 4096).astype(np.int16)
    phase, how = io.rescale_phase(codes)
    assert "-4096..4095" in how
    assert wrapped_diff(phase, TRUE_PHASE).max() < 1e-5
    # the same codes stored as floats (e.g. after a tool rewrote the file)
    phase_f, how_f = io.rescale_phase(codes.astype(np.float32))
    assert "-4096..4095" in how_f
    np.testing.assert_allclose(phase_f, phase, atol=1e-6)


def test_rescale_milliradians_and_unknown_range():
    phase, how = io.rescale_phase(np.round(TRUE_PHASE * 1000))
    assert "milliradians" in how
    assert wrapped_diff(phase, TRUE_PHASE).max() < 2e-3
    odd = np.linspace(-100000.0, 100000.0, 11)
    phase, how = io.rescale_phase(odd)
    assert "unrecognised" in how and phase.min() >= -np.float32(np.pi)


def test_rescale_integer_array_never_radians():
    phase, how = io.rescale_phase(np.array([0, 1, 2, 3], dtype=np.int16))
    assert "0..4095" in how
    np.testing.assert_allclose(phase, np.arange(4) * 2 * np.pi / 4096 - np.pi, atol=1e-6)


def test_rescale_rejects_nan():
    with pytest.raises(InputError, match="NaN"):
        io.rescale_phase(np.array([0.0, np.nan]))


# ---------------------------------------------------------------------------
# bad inputs to load_gre: each refused, naming the problem and the file at fault
# ---------------------------------------------------------------------------
def _four_d(tmp, mag=None, phase=None, **kw):
    m0, p0 = make_data()
    return write_4d(tmp, m0 if mag is None else mag, p0 if phase is None else phase, **kw)


def _echoes(tmp, **kw):
    return write_per_echo(tmp, *make_data(), **kw)


def _replace(path, array, affine=AFFINE, sidecar=None):
    write_nifti(path, array, affine, sidecar)
    return path


def _cut(path, keep):
    raw = path.read_bytes()
    path.write_bytes(keep(raw))
    return path


def _case_shape_mismatch(tmp):
    mag, phase = make_data()
    return (write_nifti(tmp / "m.nii.gz", mag), write_nifti(tmp / "p.nii.gz", phase[:, :, :4]),
            dict(echo_times=TES, field_strength=3))


def _case_nan_magnitude(tmp):
    mag, phase = make_data()
    mag[1, 2, 3, 1] = np.nan
    return (*write_4d(tmp, mag, phase), {})


def _case_inf_phase(tmp):
    mag, phase = make_data()
    phase[0, 0, 0, 2] = np.inf
    return (*write_4d(tmp, mag, phase), {})


def _case_different_shapes(tmp):
    mags, phases = _echoes(tmp)
    _replace(mags[1], make_data()[0][:, :, :5, 1], sidecar={"EchoTime": TES[1], "MagneticFieldStrength": 3})
    return mags, phases, {}


def _case_different_affines(tmp):
    mags, phases = _echoes(tmp)
    other = AFFINE.copy()
    other[2, 2] = 2.5
    _replace(phases[2], make_data()[1][..., 2], other)
    return mags, phases, {}


def _case_per_echo_file_4d(tmp):
    mags, phases = _echoes(tmp)
    _replace(mags[0], make_data()[0][..., :2])
    return mags, phases, {}


def _case_missing_echo_time_one_sidecar(tmp):
    mags, phases = _echoes(tmp)
    io.sidecar_path(mags[1]).write_text(json.dumps({"MagneticFieldStrength": 3}))
    io.sidecar_path(phases[1]).unlink()
    return mags, phases, {}


def _case_not_nifti(tmp):
    m, _ = _four_d(tmp)
    fake = tmp / "notes.nii.gz"
    fake.write_text("this is not an image")
    return m, fake, {}


def _case_mgh(tmp):
    m, _ = _four_d(tmp)
    mgh = tmp / "phase.mgz"
    nib.save(nib.MGHImage(make_data()[1], AFFINE), str(mgh))
    return m, mgh, dict(echo_times=TES)


def _case_truncated_uncompressed(tmp):
    mag, phase = make_data()
    p = _cut(write_nifti(tmp / "p.nii", phase), lambda raw: raw[: len(raw) - 500])
    return write_nifti(tmp / "m.nii", mag), p, dict(echo_times=TES, field_strength=3)


LOAD_ERRORS = [
    # id, files and arguments, expected message, file named in it
    ("shape mismatch", _case_shape_mismatch, "differ in shape", "p.nii.gz"),
    ("echo time count", lambda t: (*_four_d(t, sidecar=False), dict(echo_times=[0.004, 0.008], field_strength=3)),
     r"expected 3 echo time.*found 2: 4, 8 ms", "mag.nii.gz"),
    ("sidecar echo time count", lambda t: (*_four_d(t, tes=[0.004, 0.008]), {}), "echo time", "mag.json"),
    ("echo times not increasing",
     lambda t: (*_four_d(t, sidecar=False), dict(echo_times=[0.004, 0.012, 0.008], field_strength=3)),
     "strictly increasing", None),
    ("per-echo files in wrong order", lambda t: (*[f[::-1] for f in _echoes(t)], {}), "strictly increasing",
     "mag_e3.nii.gz"),
    ("echo times in ms", lambda t: (*_four_d(t, sidecar=False), dict(echo_times=[4, 8, 12], field_strength=3)),
     "milliseconds", None),
    ("sidecar echo times in ms", lambda t: (*_echoes(t, tes=[4.0, 8.0, 12.0]), {}), "milliseconds", "mag_e1.json"),
    ("NaN in magnitude", _case_nan_magnitude, "NaN.*magnitude|magnitude.*NaN", "mag.nii.gz"),
    ("inf in phase", _case_inf_phase, "NaN or inf", "phase.nii.gz"),
    ("all-zero magnitude", lambda t: (*_four_d(t, mag=np.zeros(SHAPE + (3,), np.float32)), {}), "all voxels 0",
     "mag.nii.gz"),
    ("2D data", lambda t: (write_nifti(t / "m.nii.gz", np.ones((8, 8), np.float32)),
                           write_nifti(t / "p.nii.gz", np.zeros((8, 8), np.float32)),
                           dict(echo_times=[0.01], field_strength=3)), "2D", "m.nii.gz"),
    ("single slice", lambda t: (write_nifti(t / "m.nii.gz", np.ones((8, 8, 1, 2), np.float32)),
                                write_nifti(t / "p.nii.gz", np.zeros((8, 8, 1, 2), np.float32)),
                                dict(echo_times=[0.01, 0.02], field_strength=3)), "single-slice", None),
    ("5D data", lambda t: (write_nifti(t / "m.nii.gz", np.ones((4, 4, 4, 1, 3), np.float32)),
                           write_nifti(t / "p.nii.gz", np.zeros((4, 4, 4, 1, 3), np.float32)),
                           dict(echo_times=TES, field_strength=3)), "5D", "m.nii.gz"),
    ("per-echo files of different shapes", _case_different_shapes, "different shapes", "mag_e2.nii.gz"),
    ("per-echo files on different grids", _case_different_affines, "different grids", "phase_e3.nii.gz"),
    ("a per-echo file that is 4D", _case_per_echo_file_4d, "must each be 3D", "mag_e1.nii.gz"),
    ("echo times missing", lambda t: (*_four_d(t, sidecar=False), dict(field_strength=3)), "echo times missing",
     "mag.json"),
    ("echo time missing in one sidecar", _case_missing_echo_time_one_sidecar, "echo times missing", "mag_e2.json"),
    ("field strength missing", lambda t: (*_four_d(t, sidecar=False), dict(echo_times=TES)),
     "field strength missing", "mag.json"),
    ("field strength 3000 T", lambda t: (*_four_d(t, sidecar=False), dict(echo_times=TES, field_strength=3000.0)),
     "between 0.1 and 20", None),
    ("field strength 0.05 T", lambda t: (*_four_d(t, sidecar=False), dict(echo_times=TES, field_strength=0.05)),
     "between 0.1 and 20", None),
    ("field strength NaN", lambda t: (*_four_d(t, sidecar=False), dict(echo_times=TES, field_strength=float("nan"))),
     "between 0.1 and 20", None),
    ("field strength in sidecar out of range", lambda t: (*_four_d(t, b0=3000), {}), "between 0.1 and 20",
     "mag.json"),
    ("truncated gzip", lambda t: (lambda m, p: (_cut(m, lambda raw: raw[: len(raw) // 2]), p, {}))(
        *write_4d(t, *make_data(shape=(16, 16, 16)))), "truncated", "mag.nii.gz"),
    ("truncated uncompressed", _case_truncated_uncompressed, "truncated", "p.nii"),
    ("cut inside the header", lambda t: (lambda m, p: (
        _cut(m, lambda raw: gzip.compress(gzip.decompress(raw)[:100])), p, {}))(*_four_d(t)),
     "could not be read as NIfTI", "mag.nii.gz"),
    ("not a NIfTI file", _case_not_nifti, "could not be read as NIfTI", "notes.nii.gz"),
    ("another image format", _case_mgh, "MGHImage", "phase.mgz"),
]


@pytest.mark.parametrize("make, match, named", [c[1:] for c in LOAD_ERRORS], ids=[c[0] for c in LOAD_ERRORS])
def test_bad_inputs_are_refused_naming_the_problem_and_the_file(tmp_path, make, match, named):
    magnitude, phase, kwargs = make(tmp_path)
    with pytest.raises(InputError, match=match) as err:
        io.load_gre(magnitude, phase, **kwargs)
    if named is not None:
        assert named in str(err.value)


# ---------------------------------------------------------------------------
# bad inputs with more to check than the message
# ---------------------------------------------------------------------------


def test_swapped_magnitude_and_phase_are_refused_naming_both_files(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase)
    with pytest.raises(InputError, match="looks like a phase image") as err:
        io.load_gre(p, m)  # swapped
    assert "mag.nii.gz" in str(err.value) and "phase.nii.gz" in str(err.value) and "swapped" in str(err.value)


def test_magnitude_given_as_phase_is_refused(tmp_path):
    """Float magnitude in [0, 0.12] fits the radian range: it must still not pass as phase."""
    mag, _ = make_data()
    m = write_nifti(tmp_path / "mag.nii.gz", mag, sidecar={"EchoTime": TES, "MagneticFieldStrength": 3.0})
    p = write_nifti(tmp_path / "mag_again.nii.gz", 0.1 * mag + 1e-6)
    with pytest.raises(InputError, match="looks like a magnitude image") as err:
        io.load_gre(m, p)
    assert "mag_again.nii.gz" in str(err.value)
    # integer magnitude codes as phase: scaled as 0..4095, still a narrow band of the circle
    p = write_nifti(tmp_path / "mag_int.nii.gz", np.round(mag * 300).astype(np.int16))
    with pytest.raises(InputError, match="looks like a magnitude image"):
        io.load_gre(m, p)
    # the same file twice
    with pytest.raises(InputError, match="hold the same data"):
        io.load_gre(m, m)


def test_swapped_inputs_are_refused_before_any_output_is_written(tmp_path, capsys):
    from chisep import cli

    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase)
    out = tmp_path / "run"
    code = cli.main(["qsm", "--magnitude", str(p), "--phase", str(m), "--out", str(out), "--quiet"])
    assert code != 0 and "swapped" in capsys.readouterr().err
    assert not out.exists()


def test_magnitude_phase_affine_mismatch(tmp_path):
    mag, phase = make_data()
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    m = write_nifti(tmp_path / "m.nii.gz", mag)
    p = write_nifti(tmp_path / "p.nii.gz", phase, shifted)
    with pytest.raises(InputError, match="different grids") as err:
        io.load_gre(m, p, echo_times=TES, field_strength=3)
    assert "p.nii.gz" in str(err.value) and "m.nii.gz" in str(err.value)
    # within the 1e-3 mm tolerance: accepted
    close = AFFINE.copy()
    close[0, 3] += 5e-4
    p2 = write_nifti(tmp_path / "p2.nii.gz", phase, close)
    io.load_gre(m, p2, echo_times=TES, field_strength=3)










def test_echo_times_in_milliseconds(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase, sidecar=False)
    with pytest.raises(InputError, match="milliseconds"):
        io.load_gre(m, p, echo_times=[4, 8, 12], field_strength=3)
    m2, p2 = write_per_echo(tmp_path, mag, phase, tes=[4.0, 8.0, 12.0])
    with pytest.raises(InputError, match="milliseconds") as err:
        io.load_gre(m2, p2)
    assert "mag_e1.json" in str(err.value)


























@pytest.mark.parametrize("value", [3000.0, 0.05, float("nan")])
def test_field_strength_out_of_range(tmp_path, value):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase, sidecar=False)
    with pytest.raises(InputError, match="between 0.1 and 20"):
        io.load_gre(m, p, echo_times=TES, field_strength=value)














def test_missing_files(tmp_path):
    mag, phase = make_data()
    m, _ = write_4d(tmp_path, mag, phase)
    with pytest.raises(InputError, match="not found") as err:
        io.load_gre(m, tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(err.value)
    with pytest.raises(InputError, match="empty"):
        io.load_gre([], [m])


def test_bad_b0_direction(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase)
    with pytest.raises(InputError, match="b0_direction"):
        io.load_gre(m, p, b0_direction=[0, 0, 0])


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def test_oblique_affine_gives_b0_direction(tmp_path):
    affine = np.eye(4)
    affine[:3, :3] = rotation_x(20.0) @ np.diag([1.0, 1.0, 2.0])
    affine[:3, 3] = [10, -20, 30]
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase, affine=affine)
    data = io.load_gre(m, p)
    assert data.acquisition.b0_angle_deg == pytest.approx(20.0, abs=1e-4)
    np.testing.assert_allclose(data.acquisition.b0_direction,
                               [0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))], atol=1e-6)
    np.testing.assert_allclose(data.acquisition.voxel_size, [1, 1, 2], atol=1e-6)
    override = io.load_gre(m, p, b0_direction=[0, 0, 2])
    np.testing.assert_allclose(override.acquisition.b0_direction, [0, 0, 1])
    assert override.sources["b0_direction"] == "argument"


def test_voxel_order_is_kept(tmp_path):
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS storage: must not be reoriented
    mag, phase = make_data()
    mag[0, 0, 0, :] = 99.0
    m, p = write_4d(tmp_path, mag, phase, affine=flipped)
    data = io.load_gre(m, p)
    assert np.all(data.magnitude[0, 0, 0] == 99.0)
    np.testing.assert_allclose(data.affine, flipped)


# ---------------------------------------------------------------------------
# BIDS
# ---------------------------------------------------------------------------
def make_bids(root, subjects=("01",), session=None, n=3, phase=None):
    mag, ph = make_data(n=n)
    acq = Acquisition(echo_times=TES[:n] if n <= 3 else [0.004 * (i + 1) for i in range(n)],
                      field_strength=3.0, affine=AFFINE)
    runs = [io.write_bids_megre(root, s, mag, ph if phase is None else phase, acq, session=session)
            for s in subjects]
    return mag, ph, runs


def test_write_bids_megre_layout_and_sidecars(tmp_path):
    root = tmp_path / "bids"
    _, _, (run,) = make_bids(root, session="1")
    anat = root / "sub-01" / "ses-1" / "anat"
    assert run.magnitude[0] == anat / "sub-01_ses-1_echo-1_part-mag_MEGRE.nii.gz"
    assert run.prefix == "sub-01_ses-1"
    side = json.loads((anat / "sub-01_ses-1_echo-2_part-phase_MEGRE.json").read_text())
    assert side["EchoTime"] == TES[1] and side["EchoNumber"] == 2
    assert side["MagneticFieldStrength"] == 3.0
    assert side["ImagingFrequency"] == pytest.approx(3.0 * 42.577478518)
    assert side["Units"] == "rad"
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"
    assert not leftover_temp_files(root)


@pytest.mark.parametrize("level", ["root", "subject", "anat"])
def test_find_megre_runs_from_any_level(tmp_path, level):
    root = tmp_path / "bids"
    make_bids(root)
    start = {"root": root, "subject": root / "sub-01", "anat": root / "sub-01" / "anat"}[level]
    (run,) = io.find_megre_runs(start)
    assert run.subject == "01" and run.session is None and run.prefix == "sub-01"
    assert [p.name for p in run.phase] == [f"sub-01_echo-{i}_part-phase_MEGRE.nii.gz" for i in (1, 2, 3)]
    assert run.bids_root == root
    data = io.load_bids(start)
    assert data.acquisition.echo_times == tuple(TES)
    assert data.sources["bids"]["prefix"] == "sub-01"


def test_bids_echoes_sorted_numerically(tmp_path):
    root = tmp_path / "bids"
    _, _, (run,) = make_bids(root, n=11)
    (found,) = io.find_megre_runs(root)
    assert found.echo_numbers == tuple(range(1, 12))
    assert found.magnitude[9].name == "sub-01_echo-10_part-mag_MEGRE.nii.gz"
    assert io.load_bids(root).acquisition.n_echoes == 11


def test_bids_several_subjects(tmp_path):
    root = tmp_path / "bids"
    mag, _, _ = make_bids(root, subjects=("01", "02"))
    assert [r.subject for r in io.find_megre_runs(root)] == ["01", "02"]
    with pytest.raises(InputError, match="several subjects") as err:
        io.load_bids(root)
    assert "01" in str(err.value) and "02" in str(err.value)
    data = io.load_bids(root, subject="sub-02")
    np.testing.assert_array_equal(data.magnitude, mag)
    assert data.sources["bids"]["subject"] == "02"
    with pytest.raises(InputError, match="'03' not found"):
        io.find_megre_runs(root, subject="03")


def test_bids_sessions(tmp_path):
    root = tmp_path / "bids"
    make_bids(root, session="1")
    make_bids(root, session="2")
    assert [r.prefix for r in io.find_megre_runs(root)] == ["sub-01_ses-1", "sub-01_ses-2"]
    with pytest.raises(InputError, match="several MEGRE runs"):
        io.load_bids(root)
    assert io.load_bids(root, session="ses-2").sources["bids"]["session"] == "2"
    assert io.load_bids(root / "sub-01" / "ses-1" / "anat").sources["bids"]["prefix"] == "sub-01_ses-1"


def test_bids_overrides_beat_sidecars(tmp_path):
    root = tmp_path / "bids"
    make_bids(root)
    data = io.load_bids(root, echo_times=[0.005, 0.01, 0.02], field_strength=7.0)
    assert data.acquisition.echo_times == (0.005, 0.01, 0.02)
    assert data.acquisition.field_strength == 7.0


def test_bids_skips_derivatives_and_reports_empty(tmp_path):
    root = tmp_path / "bids"
    make_bids(root / "derivatives" / "other")
    (root / "dataset_description.json").write_text("{}")
    with pytest.raises(InputError, match="found none"):
        io.find_megre_runs(root)
    with pytest.raises(InputError, match="does not exist"):
        io.find_megre_runs(tmp_path / "missing")


def test_bids_missing_phase_echo(tmp_path):
    root = tmp_path / "bids"
    _, _, (run,) = make_bids(root)
    run.phase[2].unlink()
    with pytest.raises(InputError, match=r"phase echoes \[1, 2\]") as err:
        io.find_megre_runs(root)
    assert "sub-01" in str(err.value)


def test_bids_integer_phase_written_with_its_dtype(tmp_path):
    rng = np.random.default_rng(3)
    codes = rng.integers(-4096, 4096, SHAPE + (3,)).astype(np.int16)
    codes.flat[0], codes.flat[1] = -4096, 4095
    _, _, (run,) = make_bids(tmp_path / "bids", phase=codes)
    assert nib.load(str(run.phase[0])).get_data_dtype() == np.int16
    assert json.loads(io.sidecar_path(run.phase[0]).read_text())["Units"] == "arbitrary"
    data = io.load_bids(tmp_path / "bids")
    assert "-4096..4095" in data.sources["phase_scaling"]
    assert wrapped_diff(data.phase, codes * np.pi / 4096).max() < 1e-5


def test_write_bids_refuses_overwrite_and_validates_first(tmp_path):
    root = tmp_path / "bids"
    mag, ph, (run,) = make_bids(root)
    before = run.magnitude[0].stat().st_mtime_ns
    acq = Acquisition(echo_times=TES, field_strength=3.0, affine=AFFINE)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        io.write_bids_megre(root, "01", mag, ph, acq)
    assert run.magnitude[0].stat().st_mtime_ns == before
    io.write_bids_megre(root, "01", mag * 2, ph, acq, overwrite=True)
    np.testing.assert_array_equal(io.load_bids(root).magnitude, mag * 2)
    with pytest.raises(InputError, match="2 echo"):
        io.write_bids_megre(tmp_path / "new", "01", mag[..., :2], ph[..., :2], acq)
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------
# maps, JSON, provenance, output folders
# ---------------------------------------------------------------------------
def test_save_and_load_map_round_trip(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase)
    data = io.load_gre(m, p)
    chi = np.random.default_rng(2).normal(size=SHAPE)
    out = io.save_map(tmp_path / "out" / "chi.nii.gz", chi, affine=data.affine, header=data.header,
                      unit="ppm", description="QSM", convention="positive = paramagnetic",
                      extra={"Method": "tkd"})
    arr, affine, header = io.load_map(out, name="chi")
    assert arr.dtype == np.float32 and arr.shape == SHAPE
    np.testing.assert_allclose(arr, chi.astype(np.float32))
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    assert header.get_data_dtype() == np.float32
    side = json.loads((tmp_path / "out" / "chi.json").read_text())
    assert side == {"Units": "ppm", "Description": "QSM", "Convention": "positive = paramagnetic",
                    "ChisepVersion": chisep.__version__, "Method": "tkd"}


def test_save_map_integer_types(tmp_path):
    mask = np.zeros(SHAPE, bool)
    mask[2:5, 2:5, 2:5] = True
    out = io.save_map(tmp_path / "mask.nii.gz", mask, affine=AFFINE, unit="1", description="mask")
    assert nib.load(str(out)).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(io.load_map(out)[0], mask.astype(np.float32))
    labels = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    out = io.save_map(tmp_path / "labels.nii", labels, affine=AFFINE, unit="1", description="labels")
    assert nib.load(str(out)).get_data_dtype() == np.int32
    np.testing.assert_array_equal(io.load_map(out)[0], labels)


def test_save_map_refuses_overwrite_and_leaves_no_temp_files(tmp_path):
    first = np.ones(SHAPE, np.float32)
    out = io.save_map(tmp_path / "r2star.nii.gz", first, affine=AFFINE, unit="1/s", description="R2*")
    with pytest.raises(OutputExistsError, match="--overwrite") as err:
        io.save_map(out, first * 2, affine=AFFINE, unit="1/s", description="R2*")
    assert "r2star.nii.gz" in str(err.value)
    np.testing.assert_array_equal(io.load_map(out)[0], first)
    # a leftover sidecar alone also blocks (nothing is written then)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        io.save_map(tmp_path / "other.nii.gz", first, affine=AFFINE, unit="1/s", description="x")
    assert not (tmp_path / "other.nii.gz").exists()
    io.save_map(out, first * 2, affine=AFFINE, unit="1/s", description="R2*", overwrite=True)
    np.testing.assert_array_equal(io.load_map(out)[0], first * 2)
    assert not leftover_temp_files(tmp_path)


def test_atomic_write_removes_temp_file_on_failure(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.save_map(tmp_path / "chi.nii.gz", np.ones(SHAPE), affine=AFFINE, unit="ppm", description="x")
    assert list(tmp_path.iterdir()) == []


def test_temp_file_name_does_not_look_final(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    io.write_json(tmp_path / "a.json", {"x": 1}, overwrite=False)
    assert seen and seen[0].startswith(".a.json.tmp-") and not seen[0].endswith(".json")


def test_save_map_rejects_bad_inputs(tmp_path):
    with pytest.raises(InputError, match=r"\.nii\.gz"):
        io.save_map(tmp_path / "chi.img", np.ones(SHAPE), affine=AFFINE, unit="ppm", description="x")
    with pytest.raises(InputError, match="3D or 4D"):
        io.save_map(tmp_path / "chi.nii.gz", np.ones((4, 4)), affine=AFFINE, unit="ppm", description="x")
    with pytest.raises(InputError, match="4x4"):
        io.save_map(tmp_path / "chi.nii.gz", np.ones(SHAPE), affine=np.eye(3), unit="ppm", description="x")
    with pytest.raises(InputError, match="JSON"):
        io.save_map(tmp_path / "chi.nii.gz", np.ones(SHAPE), affine=AFFINE, unit="ppm", description="x",
                    extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_map_errors(tmp_path):
    four_d = write_nifti(tmp_path / "f.nii.gz", np.ones(SHAPE + (2,), np.float32))
    with pytest.raises(InputError, match="expected a 3D image") as err:
        io.load_map(four_d, name="local field")
    assert "local field" in str(err.value) and "f.nii.gz" in str(err.value)
    bad = np.ones(SHAPE, np.float32)
    bad[0, 0, 0] = np.nan
    nan_file = write_nifti(tmp_path / "n.nii.gz", bad)
    with pytest.raises(InputError, match="NaN"):
        io.load_map(nan_file)
    assert np.isnan(io.load_map(nan_file, allow_nonfinite=True)[0][0, 0, 0])
    with pytest.raises(InputError, match="not found"):
        io.load_map(tmp_path / "missing.nii.gz")


def test_write_json_atomic_and_sanitised(tmp_path):
    path = io.write_json(tmp_path / "sub" / "x.json",
                         {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"), "p": tmp_path},
                         overwrite=False)
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": None, "p": str(tmp_path)}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        io.write_json(path, {}, overwrite=False)
    io.write_json(path, {"d": 1}, overwrite=True)
    assert json.loads(path.read_text()) == {"d": 1}
    assert not leftover_temp_files(tmp_path)


def test_write_provenance(tmp_path):
    mag, phase = make_data()
    m, p = write_4d(tmp_path, mag, phase)
    out = io.write_provenance(tmp_path / "out", inputs=[m, p], settings={"lambda": np.float64(0.1)},
                              timings={"inversion": 1.25}, extra={"acquisition": Acquisition(
                                  echo_times=TES, field_strength=3.0)})
    doc = json.loads(out.read_text())
    assert doc["chisep_version"] == chisep.__version__
    for key in ("python", "numpy", "jax", "nibabel"):
        assert doc["versions"][key]
    assert doc["created_utc"].endswith("+00:00")
    assert doc["inputs"][0]["sha256"] == io.file_sha256(m)
    assert doc["settings"] == {"lambda": 0.1} and doc["timings_s"] == {"inversion": 1.25}
    assert doc["acquisition"]["echo_times_s"] == TES
    with pytest.raises(OutputExistsError):
        io.write_provenance(tmp_path / "out", inputs=[], settings={}, timings={})
    with pytest.raises(InputError, match="missing.nii"):
        io.write_provenance(tmp_path / "o2", inputs=[tmp_path / "missing.nii"], settings={}, timings={})


def test_prepare_output_dir(tmp_path):
    out = io.prepare_output_dir(tmp_path / "a" / "b", overwrite=False)
    assert out.is_dir() and not list(out.iterdir())
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="existing file") as err:
        io.prepare_output_dir(a_file, overwrite=False)
    assert "file.txt" in str(err.value)
    with pytest.raises(InputError, match="file is in the way"):
        io.prepare_output_dir(a_file / "sub", overwrite=False)
    (out / "provenance.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        io.prepare_output_dir(out, overwrite=False)
    assert io.prepare_output_dir(out, overwrite=True) == out


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_prepare_output_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            io.prepare_output_dir(locked, overwrite=False)
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------
# property test: write/load round trips or InputError, never anything else
# ---------------------------------------------------------------------------
def random_affine(angles, scales, shift, shear):
    ax, ay, az = np.deg2rad(angles)
    rx = rotation_x(np.rad2deg(ax))
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    linear = rz @ ry @ rx @ np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]]) @ np.diag(scales)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = shift
    return affine


@pytest.mark.parametrize("layout", ["4d", "per-echo", "bids"])
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    shape=st.tuples(st.integers(2, 5), st.integers(2, 5), st.integers(2, 4)),
    flat_axis=st.sampled_from([None] * 6 + [0, 1, 2]),
    n_echoes=st.integers(1, 4),
    mag_dtype=st.sampled_from(["float32", "float64", "int16", "uint8"]),
    phase_kind=st.sampled_from(["rad", "signed12", "unsigned12"]),
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    scales=st.tuples(*[st.floats(0.5, 3.0)] * 3),
    shift=st.tuples(*[st.floats(-100, 100)] * 3),
    shear=st.sampled_from([0.0, 0.0, 0.2]),
    echo_kind=st.sampled_from(["ok"] * 6 + ["unsorted", "ms", "count"]),
    defect=st.sampled_from([None] * 6 + ["nan", "zero-magnitude"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_round_trip_or_input_error(shape, flat_axis, n_echoes, layout, mag_dtype, phase_kind,
                                            angles, scales, shift, shear, echo_kind, defect, seed):
    rng = np.random.default_rng(seed)
    if flat_axis is not None:  # a single slice (or row): 2D data, to be refused
        shape = tuple(1 if i == flat_axis else n for i, n in enumerate(shape))
    full = shape + (n_echoes,)
    affine = random_affine(angles, scales, shift, shear)
    tes = list(np.cumsum(rng.uniform(0.001, 0.01, n_echoes)))
    bad_tes = {"ok": tes, "unsorted": tes[::-1] if n_echoes > 1 else tes,
               "ms": [t * 1000 for t in tes], "count": tes + [tes[-1] + 0.01]}[echo_kind]
    if np.dtype(mag_dtype).kind == "f":
        mag = rng.uniform(0.0, 100.0, full).astype(mag_dtype)
    else:
        mag = rng.integers(0, 100, full).astype(mag_dtype)
    true_phase = rng.uniform(-np.pi, np.pi, full)
    if phase_kind == "rad":
        stored = true_phase.astype(np.float32)
    elif phase_kind == "signed12":
        stored = np.clip(np.round(true_phase / np.pi * 4096), -4096, 4095).astype(np.int16)
        stored.flat[0], stored.flat[-1] = -4096, 4095  # real data span the whole range
        true_phase = stored * np.pi / 4096
    else:
        stored = (np.round((true_phase + np.pi) / (2 * np.pi) * 4096) % 4096).astype(np.int16)
        stored.flat[0], stored.flat[-1] = 0, 4095
        true_phase = stored * 2 * np.pi / 4096 - np.pi
    if defect == "nan":
        if mag.dtype.kind == "f":
            mag.flat[rng.integers(mag.size)] = np.nan
        elif phase_kind == "rad":
            stored.flat[rng.integers(stored.size)] = np.nan
        else:
            defect = None
    elif defect == "zero-magnitude":
        mag[...] = 0
    echoes_ok = echo_kind == "ok" or (echo_kind == "unsorted" and n_echoes == 1)
    valid = min(shape) >= 2 and echoes_ok and defect is None and bool(np.any(mag))
    event(f"{layout}, valid={valid}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            if layout == "bids":
                acq = Acquisition(echo_times=tes, field_strength=3.0, affine=affine)
                io.write_bids_megre(tmp / "bids", "s1", mag, stored, acq)
                data = io.load_bids(tmp / "bids", echo_times=None if echo_kind == "ok" else bad_tes)
            elif layout == "4d":
                side = {"EchoTime": bad_tes, "MagneticFieldStrength": 3.0}
                m = write_nifti(tmp / "m.nii.gz", mag, affine, side)
                p = write_nifti(tmp / "p.nii.gz", stored, affine)
                data = io.load_gre(m, p)
            else:
                ms, ps = [], []
                for i in range(n_echoes):
                    ms.append(write_nifti(tmp / f"m{i}.nii.gz", mag[..., i], affine))
                    ps.append(write_nifti(tmp / f"p{i}.nii.gz", stored[..., i], affine))
                data = io.load_gre(ms, ps, echo_times=bad_tes, field_strength=3.0)
        except InputError:
            assert not valid, "valid input was refused"
            return
    assert valid, "invalid input was accepted"
    assert data.magnitude.shape == full and data.phase.shape == full
    np.testing.assert_allclose(data.magnitude, mag.astype(np.float32), rtol=1e-6)
    assert wrapped_diff(data.phase, true_phase).max() < 1e-4
    assert data.phase.min() >= -np.float32(np.pi) and data.phase.max() < np.float32(np.pi)
    np.testing.assert_allclose(data.acquisition.echo_times, tes, rtol=1e-12)
    np.testing.assert_allclose(data.affine, affine, atol=1e-4)
    np.testing.assert_allclose(data.acquisition.b0_direction, physics.b0_direction_from_affine(affine),
                               atol=1e-5)
