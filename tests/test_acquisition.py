import numpy as np
import pytest

from chisep.acquisition import Acquisition


def test_defaults_from_affine():
    affine = np.diag([0.6, 0.6, 2.0, 1.0])
    acq = Acquisition(echo_times=[0.004, 0.010, 0.016], field_strength=3, affine=affine)
    assert acq.n_echoes == 3
    np.testing.assert_allclose(acq.voxel_size, [0.6, 0.6, 2.0])
    np.testing.assert_allclose(acq.b0_direction, [0, 0, 1])
    assert acq.echo_spacing == pytest.approx(0.006)
    assert acq.centre_frequency == pytest.approx(127.7e6, rel=1e-3)
    assert acq.to_dict()["echo_times_s"] == [0.004, 0.010, 0.016]


def test_uneven_echoes_have_no_spacing_and_override_direction():
    acq = Acquisition(echo_times=[0.004, 0.010, 0.020], field_strength=7.0, b0_direction=(0, 1, 1))
    assert acq.echo_spacing is None
    np.testing.assert_allclose(acq.b0_direction, [0, 2**-0.5, 2**-0.5])
    assert acq.b0_angle_deg == pytest.approx(45.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(echo_times=[0.01, 0.005], field_strength=3), "strictly increasing"),
        (dict(echo_times=[0.01, 0.01], field_strength=3), "strictly increasing"),
        (dict(echo_times=[4.0, 10.0], field_strength=3), "milliseconds"),
        (dict(echo_times=[-0.001], field_strength=3), "positive"),
        (dict(echo_times=[0.005], field_strength=0.05), "between 0.1 and 20"),
        (dict(echo_times=[0.005], field_strength=30.0), "between 0.1 and 20"),
        (dict(echo_times=[0.005], field_strength=float("nan")), "between 0.1 and 20"),
        (dict(echo_times=[0.005], field_strength=3, affine=np.zeros((4, 4))), "singular"),
        (dict(echo_times=[0.005], field_strength=3, phase_sign=0), "phase_sign"),
    ],
)
def test_invalid_acquisitions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Acquisition(**kwargs)


def test_maps_without_echoes_have_an_acquisition_with_no_echo_times():
    # separation from QSM and R2* maps needs field strength and geometry only
    acq = Acquisition(echo_times=(), field_strength=3.0, voxel_size=(1, 1, 2))
    assert acq.n_echoes == 0 and acq.echo_spacing is None
    np.testing.assert_allclose(acq.voxel_size, [1, 1, 2])
    from chisep.errors import InputError
    from chisep.separation import DecomposeModel

    with pytest.raises(InputError, match="at least 4 echoes"):
        DecomposeModel(acq)
    with pytest.raises(InputError, match="voxel_size"):
        Acquisition(echo_times=(), field_strength=3.0, voxel_size=(1, 1))
