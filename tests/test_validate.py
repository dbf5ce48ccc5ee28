"""One validator per kind of input (chisep.validate) and one registry per kind of method (chisep.registry)."""

import numpy as np
import pytest

from chisep import validate as v
from chisep.errors import InputError
from chisep.registry import Registry

SHAPE = (4, 5, 6)


@pytest.mark.parametrize("call, match", [
    (lambda: v.as_volume(np.zeros((4, 5)), "chi"), r"chi must be a 3D array \(x, y, z\), got shape \(4, 5\)"),
    (lambda: v.as_volume(np.zeros(SHAPE, complex), "phase"), "np.angle"),
    (lambda: v.as_volume(np.zeros((4, 5, 7)), "r2star", shape=SHAPE), "does not match .* same voxel grid"),
    (lambda: v.as_volume(np.array([["a"]]), "chi", ndims=(2,)), "must hold numbers"),
    (lambda: v.as_mask(np.zeros(SHAPE), SHAPE), "mask is empty"),
    (lambda: v.as_mask(np.full(SHAPE, 0.5), SHAPE), r"0/1, found values such as \[0.5\]"),
    (lambda: v.as_mask(np.ones((4, 5, 7)), SHAPE), "resample the mask"),
    (lambda: v.as_mask(None, SHAPE), "mask is required"),
    (lambda: v.as_multi_echo(np.zeros(SHAPE + (3,)), "magnitude", n_echoes=4), "3 echoes .* 4 echo times"),
    (lambda: v.as_magnitude(-np.ones(SHAPE)), "negative .*not real parts or phase"),
    (lambda: v.check_finite(np.full(SHAPE, np.nan), "field", np.ones(SHAPE, bool)), "120 voxel.* inside the mask"),
    (lambda: v.check_choice("qsmnet", ("tv", "medi"), "method"), "valid choices are: tv, medi"),
    (lambda: v.check_voxel_size((1, 1)), "voxel_size must be three positive numbers"),
    (lambda: v.check_voxel_size((1, 0, 1)), "voxel_size"),
    (lambda: v.check_b0_direction((0, 0, 0)), "non-zero"),
    (lambda: v.check_positive(-1, "alpha"), "alpha must be a finite positive number"),
    (lambda: v.check_positive("x", "alpha"), "alpha must be a number"),
    (lambda: v.check_count(0, "max_iter"), "max_iter must be a positive integer"),
    (lambda: v.check_count(2.5, "max_iter"), "max_iter"),
    (lambda: v.check_count(True, "max_iter"), "max_iter"),
    (lambda: v.check_optional_map(-np.ones(SHAPE), SHAPE, name="weights"), "weights has .* negative"),
])
def test_each_check_names_the_input_and_the_fix(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_finiteness_and_sign_checks_agree_with_the_exact_test_on_every_kind_of_volume():
    """The checks' fast path (a sum, a minimum) never changes their verdict."""
    big = np.full(SHAPE, np.finfo(np.float32).max / 2, np.float32)  # finite, but its float32 sum overflows
    v.check_finite(big, "magnitude")
    v.check_non_negative(big, "magnitude", fix="")
    mixed = np.ones(SHAPE + (3,), np.float32)
    mixed[0, 0, 0, 1] = -1.0
    mixed[1, 1, 1, 0] = np.nan  # a NaN must not hide the negative value (its minimum is NaN)
    with pytest.raises(InputError, match="1 negative"):
        v.check_non_negative(mixed, "magnitude", fix="")
    with pytest.raises(InputError, match="1 voxel"):
        v.check_finite(mixed, "magnitude")
    inside = np.ones(SHAPE, bool)
    inside[1, 1, 1] = False  # the NaN lies outside the mask: tolerated
    v.check_finite(mixed, "magnitude", inside)
    cancelling = np.zeros(SHAPE)
    cancelling[0, 0, 0], cancelling[0, 0, 1] = np.inf, -np.inf
    with pytest.raises(InputError, match="2 voxel"):
        v.check_finite(cancelling, "field")
    v.check_finite(np.arange(8).reshape(2, 2, 2), "labels")  # integers are always finite


def test_valid_inputs_pass_and_are_normalised():
    assert v.as_mask(np.ones(SHAPE, np.uint8), SHAPE).dtype == bool
    assert v.as_mask(None, SHAPE, default_all=True).all()
    assert not v.as_mask(np.zeros(SHAPE), SHAPE, allow_empty=True).any()
    assert v.as_multi_echo(np.ones(SHAPE), "magnitude", allow_3d=True).shape == SHAPE + (1,)
    np.testing.assert_allclose(v.as_magnitude(np.full(SHAPE, 3 + 4j)), 5.0)
    np.testing.assert_allclose(v.check_voxel_size(0.7), [0.7, 0.7, 0.7])
    np.testing.assert_allclose(v.check_b0_direction((0, 0, 2)), [0, 0, 1])
    field = np.ones(SHAPE)
    field[0, 0, 0] = np.nan  # outside the mask: tolerated, zeroed
    mask = np.ones(SHAPE, bool)
    mask[0, 0, 0] = False
    out, msk = v.check_volume_and_mask(field, mask)
    assert out.dtype == np.float32 and out[0, 0, 0] == 0 and msk.sum() == mask.sum()
    assert v.check_count(3.0, "n") == 3


def test_registry_dispatches_by_name_and_checks_settings():
    methods = Registry("smoothing method")

    @methods.register("box")
    def box(x, *, voxel_size=1.0, width=3):
        return x * width

    assert methods.names() == ("box",) and "box" in methods and len(methods) == 1
    assert methods.build("box", 2, width=5) == 10
    assert methods.settings_of("box", shared=("voxel_size",)) == ("width",)
    methods.check_settings("box", {"width": 2}, shared=("voxel_size",))
    with pytest.raises(InputError, match=r"unknown setting\(s\) \['sigma'\] for smoothing method 'box'; "
                                         "valid settings: width"):
        methods.check_settings("box", {"sigma": 2}, shared=("voxel_size",))
    with pytest.raises(InputError, match="unknown smoothing method 'gauss'; valid choices are: box"):
        methods.get("gauss")
    with pytest.raises(ValueError, match="registered twice"):
        methods.register("box", lambda x: x)


def test_every_stage_registry_matches_the_names_the_cli_offers():
    from chisep import relax, settings
    from chisep.qsm import background, inversion, unwrap
    from chisep.separation import MODELS

    assert tuple(background.BACKGROUND_METHODS) == settings.BACKGROUND_METHODS
    assert tuple(inversion.INVERSION_METHODS) == settings.INVERSION_METHODS
    assert tuple(unwrap.UNWRAP_METHODS) == settings.UNWRAP_METHODS
    assert set(relax.R2STAR_METHODS) | {"auto"} == set(settings.R2STAR_METHODS)
    assert tuple(MODELS) == settings.MODEL_NAMES
