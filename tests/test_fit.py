"""Tests of the voxelwise fitting engine (chisep.fit): one table of problems through every optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chisep.errors import InputError
from chisep.fit import (
    OPTIMIZERS,
    VoxelModel,
    _to_theta,
    _to_u,
    fit_voxelwise,
    grid_init,
    numerical_gradient,
    voxel_loss,
)

TE = np.linspace(0.005, 0.04, 8)
X = np.linspace(-1.0, 2.0, 7)


def decay(p, te):
    return p[0] * jnp.exp(-p[1] * te)


def line(p, x):
    return p[0] + p[1] * x


def clipped_line(p, x):
    return p[0] * x + p[1]


DECAY = VoxelModel(decay, ("s0", "r2"), (0.0, 0.0), (np.inf, 200.0))
LINE = VoxelModel(line, ("a", "b"), (-np.inf, -np.inf), (np.inf, np.inf))
BOUNDED = VoxelModel(clipped_line, ("slope", "offset"), (0.0, -np.inf), (1.0, np.inf))


def _decay_problem(n=64, seed=0):
    rng = np.random.default_rng(seed)
    truth = np.stack([rng.uniform(0.5, 2.0, n), rng.uniform(10.0, 80.0, n)], -1)
    return DECAY, truth[:, 0:1] * np.exp(-truth[:, 1:2] * TE), truth, jnp.asarray(TE), (1.0, 30.0)


def _line_problem(n=64, seed=1):
    rng = np.random.default_rng(seed)
    truth = np.stack([rng.uniform(-2, 2, n), rng.uniform(-3, 3, n)], -1)
    return LINE, truth[:, 0:1] + truth[:, 1:2] * X, truth, jnp.asarray(X), (0.0, 0.0)


def _bounded_problem(n=64, seed=2):
    # data slope 2 > upper bound 1: the constrained optimum is slope = 1, offset = mean(y - x)
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-1, 1, n)
    data = 2.0 * X + offsets[:, None]
    truth = np.stack([np.ones(n), np.mean(data - X, axis=1)], -1)
    return BOUNDED, data, truth, jnp.asarray(X), (0.5, 0.0)


PROBLEMS = {"decay": _decay_problem, "line": _line_problem, "bounded": _bounded_problem}
RTOL = {"gauss-newton": 1e-4, "lbfgs": 1e-3, "adam": 1e-2}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_known_problems_every_optimizer(problem, optimizer):
    model, data, truth, aux, start = PROBLEMS[problem]()
    fit = fit_voxelwise(model, data, aux=aux, init=start, optimizer=optimizer, std_errors=False)
    est = fit.param_array()
    err = np.abs(est - truth) / np.maximum(np.abs(truth), 1.0)
    assert err.max() < RTOL[optimizer], (problem, optimizer, err.max())
    if optimizer != "adam":  # adam has no reliable stopping rule; it runs to max_steps
        assert fit.converged.mean() > 0.95
    assert np.all(est >= np.asarray(model.lower) - 1e-7) and np.all(est <= np.asarray(model.upper) + 1e-7)


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        te = jnp.asarray(TE, jnp.float64)
        y = 1.3 * np.exp(-25.0 * TE) + 0.01 * np.cos(np.arange(TE.size))
        w = jnp.asarray(np.linspace(0.5, 2.0, TE.size))
        for theta in ([1.0, 30.0], [2.0, 5.0], [0.3, 120.0]):
            grad = jax.grad(lambda t: voxel_loss(DECAY, t, jnp.asarray(y), w, te))(jnp.asarray(theta))
            fd = numerical_gradient(lambda t: voxel_loss(DECAY, jnp.asarray(t), jnp.asarray(y), w, te), theta)
            np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-6, atol=1e-10)
        # through the reparameterisation used by lbfgs/adam (sigmoid and softplus)
        u = jnp.asarray([0.3, -0.7])
        loss_u = lambda u: voxel_loss(DECAY, _to_theta(DECAY, u), jnp.asarray(y), w, te)  # noqa: E731
        np.testing.assert_allclose(np.asarray(jax.grad(loss_u)(u)), numerical_gradient(lambda v: loss_u(jnp.asarray(v)), u),
                                   rtol=1e-6, atol=1e-10)
        # the transforms invert each other strictly inside the bounds
        theta = jnp.asarray([0.7, 55.0])
        np.testing.assert_allclose(np.asarray(_to_theta(DECAY, _to_u(DECAY, theta))), theta, rtol=1e-9)


def test_standard_errors_match_monte_carlo():
    rng = np.random.default_rng(3)
    n, sigma = 1500, 0.02
    clean = 1.0 * np.exp(-30.0 * TE)
    data = clean + sigma * rng.standard_normal((n, TE.size))
    fit = fit_voxelwise(DECAY, data, aux=jnp.asarray(TE), init=(1.0, 30.0))
    for name in ("s0", "r2"):
        mc = np.std(fit.params[name])
        assert abs(np.median(fit.std_errors[name]) / mc - 1) < 0.2, name
        # known noise level gives the same answer
    fit_known = fit_voxelwise(DECAY, data[:200], aux=jnp.asarray(TE), init=(1.0, 30.0), noise_sigma=sigma)
    assert abs(np.median(fit_known.std_errors["r2"]) / np.std(fit.params["r2"]) - 1) < 0.2


def test_no_recompile_across_chunks():
    traces = []

    def counted(p, te):
        traces.append(1)  # Python side effect: runs only while tracing
        return p[0] * jnp.exp(-p[1] * te)

    model = VoxelModel(counted, ("s0", "r2"), (0.0, 0.0), (np.inf, 200.0))
    rng = np.random.default_rng(4)
    data = rng.uniform(0.5, 1.0, (64 * 3 + 5, 1)) * np.exp(-30.0 * TE)
    calls = []
    fit_voxelwise(model, data, aux=jnp.asarray(TE), init=(1.0, 20.0), chunk_size=64, std_errors=False,
                  progress=lambda done, total: calls.append((done, total)))
    first = len(traces)
    assert first > 0
    assert calls == [(64, 197), (128, 197), (192, 197), (197, 197)]
    # a different number of voxels (and chunks) with the same chunk shape: no new trace
    fit_voxelwise(model, data[:130], aux=jnp.asarray(TE * 1.1), init=(1.0, 20.0), chunk_size=64, std_errors=False)
    assert len(traces) == first


def test_masked_voxels_untouched_and_predict():
    rng = np.random.default_rng(5)
    truth = np.stack([rng.uniform(0.5, 2.0, (6, 5)), rng.uniform(10.0, 80.0, (6, 5))], -1)
    data = truth[..., 0:1] * np.exp(-truth[..., 1:2] * TE)
    mask = np.zeros((6, 5), bool)
    mask[1:4, 2:] = True
    data[~mask] = np.nan  # outside the mask anything goes
    fit = fit_voxelwise(DECAY, data, aux=jnp.asarray(TE), mask=mask, init=(1.0, 30.0))
    for maps in (fit.params, fit.std_errors):
        for m in maps.values():
            assert m.shape == (6, 5) and np.all(m[~mask] == 0) and np.all(np.isfinite(m))
    assert np.all(fit.residual[~mask] == 0) and not fit.converged[~mask].any() and np.all(fit.steps[~mask] == 0)
    np.testing.assert_allclose(fit.param_array()[mask], truth[mask], rtol=1e-4)
    pred = fit.predict()
    np.testing.assert_allclose(pred[mask], data[mask], rtol=1e-4, atol=1e-6)
    assert np.all(pred[~mask] == 0)


def test_fully_masked_input():
    data = np.ones((3, 4, TE.size))
    fit = fit_voxelwise(DECAY, data, aux=jnp.asarray(TE), mask=np.zeros((3, 4), bool))
    assert np.all(fit.params["r2"] == 0) and fit.residual.shape == (3, 4)


def _sine(p, x):
    return jnp.sin(p[0] * x)


def test_multistart_keeps_best_and_grid_init():
    model = VoxelModel(_sine, ("f",), (0.0,), (12.0,))
    x = jnp.asarray(np.linspace(0, 3, 25))
    f_true = np.array([1.3, 4.2, 7.7, 10.1])
    data = np.sin(f_true[:, None] * np.asarray(x))
    single = fit_voxelwise(model, data, aux=x, init=(1.0,), std_errors=False)
    assert np.abs(single.params["f"] - f_true).max() > 1.0  # a single start gets stuck in local minima
    multi = fit_voxelwise(model, data, aux=x, init=np.arange(0.5, 12, 1.0)[:, None], std_errors=False)
    np.testing.assert_allclose(multi.params["f"], f_true, rtol=1e-4)
    start = grid_init(model, data, {"f": np.arange(0.25, 12, 0.5)}, aux=x)
    assert start.shape == (4, 1) and np.abs(start[:, 0] - f_true).max() <= 0.25 + 1e-9
    from_grid = fit_voxelwise(model, data, aux=x, init=start, std_errors=False)
    np.testing.assert_allclose(from_grid.params["f"], f_true, rtol=1e-4)


def _complex_decay(p, te):
    return p[0] * jnp.exp(-p[1] * te) * jnp.exp(1j * 2 * jnp.pi * p[2] * te)


def test_complex_model_and_weights():
    model = VoxelModel(_complex_decay, ("s0", "r2", "f"), (0.0, 0.0, -100.0), (np.inf, 200.0, 100.0))
    truth = np.array([[1.0, 20.0, 12.0], [0.5, 60.0, -30.0]])
    data = np.stack([np.asarray(_complex_decay(jnp.asarray(t), jnp.asarray(TE))) for t in truth])
    weights = np.linspace(1.0, 0.2, TE.size)
    fit = fit_voxelwise(model, data, aux=jnp.asarray(TE), init=(0.8, 30.0, 0.0), weights=weights)
    np.testing.assert_allclose(fit.param_array(), truth, rtol=1e-4, atol=1e-4)
    assert np.iscomplexobj(fit.predict())


def test_bad_inputs():
    data = np.ones((4, TE.size))
    with pytest.raises(InputError, match="gauss-newton, lbfgs, adam"):
        fit_voxelwise(DECAY, data, aux=jnp.asarray(TE), optimizer="newton")
    bad = data.copy()
    bad[2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit_voxelwise(DECAY, bad, aux=jnp.asarray(TE))
    with pytest.raises(InputError, match="mask shape"):
        fit_voxelwise(DECAY, data, aux=jnp.asarray(TE), mask=np.ones(3, bool))
    with pytest.raises(InputError, match="init"):
        fit_voxelwise(DECAY, data, aux=jnp.asarray(TE), init=(1.0, 2.0, 3.0))
    with pytest.raises(InputError, match="sigmoid"):
        VoxelModel(decay, ("s0", "r2"), (0.0, 0.0), (np.inf, 200.0), transform="sigmoid")


def test_map_rows_gives_what_one_call_gives_over_any_number_of_rows():
    """Blocks, the padded last block, small inputs and no rows at all."""
    from chisep.fit import map_rows

    @jax.jit
    def kernel(a, b, scale):
        return (a * b).sum(-1) * scale, a.max(-1)

    rng = np.random.default_rng(0)
    for n in (0, 1, 63, 64, 65, 1000, 2 * 128 + 5):
        a, b = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
        weighted, peak = map_rows(kernel, (a, b), args=(2.0,), block=128)
        assert weighted.shape == peak.shape == (n,)
        np.testing.assert_allclose(weighted, 2.0 * (a * b).sum(-1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(peak, a.max(-1) if n else peak, rtol=1e-6)
    single = map_rows(jax.jit(lambda a: a.sum(-1)), (np.ones((300, 3)),), block=128)
    assert isinstance(single, np.ndarray) and np.all(single == 3.0)
