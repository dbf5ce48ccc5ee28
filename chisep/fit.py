"""Voxelwise nonlinear least squares in JAX: one engine for every voxelwise model.

A model is written for one voxel (``forward(params, aux) -> prediction``);
:func:`fit_voxelwise` vmaps it over voxels, jit-compiles the solver once per
``(chunk_size, n_measurements)`` shape and walks the masked voxels chunk by
chunk, so memory stays bounded and the last (padded) chunk does not trigger a
second compilation.

Loss of one voxel::

    L(theta) = 0.5 * sum_m w_m * |f_m(theta) - y_m|^2

Complex predictions are allowed: real and imaginary residuals are stacked.

Optimisers (``optimizer=``):

``"gauss-newton"`` (default)
    Levenberg-Marquardt (Marquardt diagonal scaling, Nielsen's damping update)
    in the original parameters. Bounds are handled by projection with an active
    set: a parameter sitting on a bound whose gradient points outwards is frozen
    for that step. The P x P normal equations are solved with an unrolled
    Cholesky factorisation, which vmaps to plain elementwise arithmetic (fast on
    CPU and GPU for the small P of voxelwise models). Stops when the
    Gauss-Newton decrement ``g^T (J^T W J)^-1 g`` falls below ``tol * L`` (no
    step can reduce the loss by more than that fraction), when the loss reaches
    the floating-point floor, or when the damping grows past 1e10 (no descent
    at working precision).
``"lbfgs"``
    ``optax.lbfgs`` with its zoom line search, on unconstrained parameters
    (bounds by reparameterisation, see :class:`VoxelModel`). Stops on relative
    loss change ``<= tol`` or gradient norm ``<= gtol``.
``"adam"``
    ``optax.adam`` on unconstrained parameters; a slow first-order baseline.

All three run per voxel inside ``jax.lax.while_loop``; under ``vmap`` each voxel
stops updating once it has converged (the loop runs until the slowest voxel
of the chunk is done or ``max_steps`` is reached).

Standard errors come from the Gauss-Newton covariance at the optimum,
``sigma^2 (J^T W J)^-1`` with J taken with respect to the original parameters
and ``sigma^2 = 2 L / (n_real_residuals - P)`` (or ``noise_sigma**2`` when the
noise level is known).

References
----------
Marquardt DW. An algorithm for least-squares estimation of nonlinear
parameters. J Soc Ind Appl Math 1963;11:431-441.
Nielsen HB. Damping parameter in Marquardt's method. IMM-REP-1999-05, DTU.
Nocedal J, Wright SJ. Numerical Optimization, 2nd ed., Springer 2006
(L-BFGS, ch. 7; Gauss-Newton covariance, ch. 10).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chisep.errors import InputError

OPTIMIZERS = ("gauss-newton", "lbfgs", "adam")
TRANSFORMS = ("auto", "sigmoid", "softplus", "clip", "none")
_DEFAULT_MAX_STEPS = {"gauss-newton": 100, "lbfgs": 200, "adam": 3000}
_DEFAULT_TOL = {"gauss-newton": 1e-6, "lbfgs": 1e-7, "adam": 1e-10}
_LAMBDA_MAX = 1e10
_GN_SLOTS = 4096  # voxels in flight per Gauss-Newton work queue (see _gauss_newton_queue)


# ---------------------------------------------------------------------------
# model description
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VoxelModel:
    """A per-voxel forward model with bounded parameters.

    Instances are hashable (tuples and a function), so they are static
    arguments of the jitted solver: build the model from a module-level
    ``forward`` and pass anything array-valued (echo times, constants) as
    ``aux`` to :func:`fit_voxelwise`; two equal models then share one
    compilation.

    Parameters
    ----------
    forward : callable
        ``forward(params, aux) -> prediction``; ``params`` has shape (P,)
        in the original units, the prediction shape (M,), real or complex.
    param_names : tuple of str
        Names of the P parameters (keys of the result maps).
    lower, upper : tuple of float
        Bounds (``-inf`` / ``inf`` for none).
    transform : str or tuple of str
        How the first-order optimisers (lbfgs, adam) keep a parameter inside
        its bounds: ``"sigmoid"`` (scaled logistic between finite bounds),
        ``"softplus"`` (one finite bound), ``"clip"`` (projection, i.e. the
        loss is evaluated at the clipped value), ``"none"`` (unbounded) or
        ``"auto"`` (sigmoid / softplus / none by which bounds are finite).
        Gauss-Newton always works in the original parameters with projection.
    default_init : tuple of float, optional
        Start used when ``init`` is not given (default: the midpoint of finite
        bounds, else the finite bound + 1, else 0).
    jacobian : callable, optional
        ``jacobian(params, aux) -> (M, P)`` derivative of the prediction with
        respect to the original parameters (complex for complex predictions).
        Optional: by default forward-mode autodiff (``jax.jacfwd``) is used;
        a hand-written one sharing subexpressions with the forward model is
        several times cheaper and makes Gauss-Newton iterations faster. Test it
        against ``jax.jacfwd``.
    """

    forward: Callable[[jax.Array, Any], jax.Array]
    param_names: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    transform: str | tuple[str, ...] = "auto"
    default_init: tuple[float, ...] | None = None
    jacobian: Callable[[jax.Array, Any], jax.Array] | None = None

    def __post_init__(self):
        names = tuple(str(n) for n in self.param_names)
        n = len(names)
        lower = tuple(float(v) for v in np.broadcast_to(np.asarray(self.lower, float), (n,)))
        upper = tuple(float(v) for v in np.broadcast_to(np.asarray(self.upper, float), (n,)))
        transform = (self.transform,) * n if isinstance(self.transform, str) else tuple(self.transform)
        if len(transform) != n:
            raise InputError(f"VoxelModel: transform needs {n} entries (one per parameter), got {len(transform)}")
        for name, lo, hi, tr in zip(names, lower, upper, transform):
            if tr not in TRANSFORMS:
                raise InputError(f"VoxelModel: transform {tr!r} of {name!r} is unknown; valid: {', '.join(TRANSFORMS)}")
            if not lo < hi:
                raise InputError(f"VoxelModel: bounds of {name!r} must satisfy lower < upper, got [{lo}, {hi}]")
            if tr == "sigmoid" and not (np.isfinite(lo) and np.isfinite(hi)):
                raise InputError(f"VoxelModel: sigmoid transform of {name!r} needs two finite bounds")
            if tr == "softplus" and np.isfinite(lo) == np.isfinite(hi):
                raise InputError(f"VoxelModel: softplus transform of {name!r} needs exactly one finite bound")
        object.__setattr__(self, "param_names", names)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        resolved = tuple(_resolve_transform(t, lo, hi) for t, lo, hi in zip(transform, lower, upper))
        object.__setattr__(self, "transform", resolved)
        if self.default_init is not None:
            init = tuple(float(v) for v in self.default_init)
            if len(init) != n:
                raise InputError(f"VoxelModel: default_init needs {n} entries, got {len(init)}")
            object.__setattr__(self, "default_init", init)

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def start(self) -> np.ndarray:
        """The default start (P,)."""
        if self.default_init is not None:
            return np.asarray(self.default_init, dtype=np.float64)
        out = []
        for lo, hi in zip(self.lower, self.upper):
            if np.isfinite(lo) and np.isfinite(hi):
                out.append(0.5 * (lo + hi))
            elif np.isfinite(lo):
                out.append(lo + 1.0)
            elif np.isfinite(hi):
                out.append(hi - 1.0)
            else:
                out.append(0.0)
        return np.asarray(out)


def _resolve_transform(tr, lo, hi):
    if tr != "auto":
        if tr == "none" and (np.isfinite(lo) or np.isfinite(hi)):
            return "clip"  # 'none' with bounds means projected steps
        return tr
    if np.isfinite(lo) and np.isfinite(hi):
        return "sigmoid"
    if np.isfinite(lo) or np.isfinite(hi):
        return "softplus"
    return "none"


def _to_theta(model: VoxelModel, u):
    """Unconstrained u (P,) -> original parameters (P,), per the model's transforms."""
    out = []
    for i, (tr, lo, hi) in enumerate(zip(model.transform, model.lower, model.upper)):
        x = u[i]
        if tr == "sigmoid":
            out.append(lo + (hi - lo) * jax.nn.sigmoid(x))
        elif tr == "softplus":
            out.append(lo + jax.nn.softplus(x) if np.isfinite(lo) else hi - jax.nn.softplus(x))
        elif tr == "clip":
            out.append(jnp.clip(x, lo, hi))
        else:
            out.append(x)
    return jnp.stack(out)


def _to_u(model: VoxelModel, theta):
    """Inverse of :func:`_to_theta` (starts are moved strictly inside the bounds)."""
    out = []
    for i, (tr, lo, hi) in enumerate(zip(model.transform, model.lower, model.upper)):
        x = theta[i]
        if tr == "sigmoid":
            p = jnp.clip((x - lo) / (hi - lo), 1e-4, 1 - 1e-4)
            out.append(jnp.log(p) - jnp.log1p(-p))
        elif tr == "softplus":
            y = jnp.maximum(x - lo if np.isfinite(lo) else hi - x, 1e-4)
            out.append(y + jnp.log(-jnp.expm1(-y)))  # softplus^-1, stable for large y
        elif tr == "clip":
            out.append(jnp.clip(x, lo, hi))
        else:
            out.append(x)
    return jnp.stack(out)


# ---------------------------------------------------------------------------
# per-voxel pieces
# ---------------------------------------------------------------------------
def weighted_residual(model: VoxelModel, theta, data, sqrt_w, aux):
    """Real residual vector sqrt(w) * (f(theta) - y), real and imaginary parts stacked."""
    r = model.forward(theta, aux) - data
    if jnp.iscomplexobj(r):
        r = jnp.concatenate([r.real, r.imag])
        sqrt_w = jnp.concatenate([sqrt_w, sqrt_w])
    return sqrt_w * r


def weighted_jacobian(model: VoxelModel, theta, sqrt_w, aux):
    """Jacobian (R, P) of :func:`weighted_residual` w.r.t. the original parameters."""
    if model.jacobian is None:
        return jax.jacfwd(lambda t: weighted_residual(model, t, jnp.zeros((), sqrt_w.dtype), sqrt_w, aux))(theta)
    jac = model.jacobian(theta, aux)
    if jnp.iscomplexobj(jac):
        return jnp.concatenate([jac.real, jac.imag]) * jnp.concatenate([sqrt_w, sqrt_w])[:, None]
    return jac * sqrt_w[:, None]


def voxel_loss(model: VoxelModel, theta, data, weights, aux):
    """Loss of one voxel, 0.5 * sum(w * |f(theta) - y|^2), original parameters."""
    r = weighted_residual(model, theta, data, jnp.sqrt(weights), aux)
    return 0.5 * jnp.sum(r * r)


def _chol_solve(a, b):
    """Solve a x = b for a small SPD matrix (P, P) with an unrolled Cholesky.

    Python loops over the static size P: under vmap this becomes elementwise
    arithmetic over voxels, far cheaper than a batched LAPACK call per voxel.
    Non-positive pivots (singular directions) are floored so that the solve
    stays finite; the caller regularises the matrix.
    """
    n = a.shape[0]
    tiny = jnp.finfo(a.dtype).tiny * 1e6
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        s = a[j, j] - sum(L[j][k] * L[j][k] for k in range(j))
        L[j][j] = jnp.sqrt(jnp.maximum(s, tiny))
        for i in range(j + 1, n):
            L[i][j] = (a[i, j] - sum(L[i][k] * L[j][k] for k in range(j))) / L[j][j]
    vector = b.ndim == 1
    bb = b[:, None] if vector else b
    y = [None] * n
    for i in range(n):
        y[i] = (bb[i] - sum(L[i][k] * y[k] for k in range(i))) / L[i][i]
    x = [None] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - sum(L[k][i] * x[k] for k in range(i + 1, n))) / L[i][i]
    out = jnp.stack(x)
    return out[:, 0] if vector else out


def _loss_floor(data, weights):
    """Loss below which float rounding dominates: (8 eps)^2 of the data energy."""
    eps = jnp.finfo(jnp.real(data).dtype).eps
    energy = 0.5 * jnp.sum(weights * jnp.abs(data) ** 2)
    return (8 * eps) ** 2 * energy + jnp.finfo(jnp.real(data).dtype).tiny


def _gn_init(model, theta0):
    """Levenberg-Marquardt state of one voxel at its start."""
    lo = jnp.asarray(model.lower, theta0.dtype)
    hi = jnp.asarray(model.upper, theta0.dtype)
    return {
        "theta": jnp.clip(theta0, lo, hi),
        "loss": jnp.asarray(jnp.inf, theta0.dtype),
        "lam": jnp.asarray(1e-3, theta0.dtype),
        "nu": jnp.asarray(2.0, theta0.dtype),
        "step": jnp.asarray(0, jnp.int32),
        "done": jnp.asarray(False),
    }


def _gn_step(model, state, data, weights, aux, tol, gtol):
    """One projected Levenberg-Marquardt iteration of one voxel (Nielsen damping update).

    Convergence (``done``): the Gauss-Newton decrement is below ``2 tol L``,
    the loss is at the rounding floor, the free gradient is below ``gtol``, or
    the damping exceeds 1e10 (no descent at working precision).
    """
    theta, lam, nu = state["theta"], state["lam"], state["nu"]
    lo = jnp.asarray(model.lower, theta.dtype)
    hi = jnp.asarray(model.upper, theta.dtype)
    sqrt_w = jnp.sqrt(weights)
    floor = _loss_floor(data, weights)
    r = weighted_residual(model, theta, data, sqrt_w, aux)
    jac = weighted_jacobian(model, theta, sqrt_w, aux)
    loss = 0.5 * jnp.sum(r * r)
    # elementwise products + sums instead of per-voxel matmuls: under vmap a tiny batched
    # dot_general is a library call per voxel on CPU, while these fuse into one loop
    g = jnp.sum(jac * r[:, None], axis=0)
    h = jnp.sum(jac[:, :, None] * jac[:, None, :], axis=0)
    # active set: a parameter on a bound whose descent direction leaves the box is frozen
    frozen = ((theta <= lo) & (g > 0)) | ((theta >= hi) & (g < 0))
    free = (~frozen).astype(theta.dtype)
    hf = h * free[:, None] * free[None, :] + jnp.diag(1.0 - free)
    gf = g * free
    d = jnp.diag(hf)
    d = d + 1e-9 * jnp.max(d) + jnp.finfo(d.dtype).tiny * 1e6
    # Gauss-Newton decrement (how much the linearised model can still gain)
    newton = _chol_solve(hf + 1e-7 * jnp.diag(d), gf)
    decrement = jnp.sum(gf * newton)
    stationary = (decrement <= 2 * tol * loss) | (loss <= floor) | (jnp.max(jnp.abs(gf)) <= gtol)
    # once stationary, finish with an undamped Gauss-Newton step (it is reliable in the
    # quadratic basin and resolves parameters below what a float32 loss comparison can)
    delta = jnp.where(stationary, -newton, -_chol_solve(hf + lam * jnp.diag(d), gf))
    theta_new = jnp.clip(theta + delta, lo, hi)
    step = theta_new - theta
    r_new = weighted_residual(model, theta_new, data, sqrt_w, aux)
    loss_new = 0.5 * jnp.sum(r_new * r_new)
    predicted = -(jnp.sum(g * step) + 0.5 * jnp.sum(step * jnp.sum(h * step[None, :], axis=1)))
    rho = (loss - loss_new) / jnp.maximum(predicted, jnp.finfo(theta.dtype).tiny)
    # the step is taken even when this iteration detects convergence: one more
    # (quadratically convergent) step costs nothing extra and tightens the result
    slack = 16 * jnp.finfo(loss.dtype).eps * loss
    accept = jnp.isfinite(loss_new) & ((loss_new < loss) | (stationary & (loss_new <= loss + slack)))
    lam_new = jnp.where(accept, lam * jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), lam * nu)
    nu_new = jnp.where(accept, 2.0, 2.0 * nu)
    done = stationary | (lam_new > _LAMBDA_MAX)
    return {
        "theta": jnp.where(accept, theta_new, theta),
        "loss": jnp.where(accept, loss_new, loss),
        "lam": jnp.maximum(lam_new, 1e-12),
        "nu": nu_new,
        "step": state["step"] + 1,
        "done": done,
    }


def _gauss_newton_queue(model, data, weights, theta0, aux, max_steps, tol, gtol, slots):
    """Levenberg-Marquardt over a chunk with a work queue of ``slots`` voxels in flight.

    A plain vmapped while_loop runs every voxel of the chunk until the slowest
    one is done (most voxels need ~10 iterations, a few need ``max_steps``).
    Here ``slots`` voxels are iterated together (vmapped); whenever some finish,
    their results are scattered out and the next voxels of the chunk take their
    slots, so the work is close to the sum of the voxels' iterations rather
    than chunk size x the worst voxel's. Shapes are static: one compilation.
    """
    n = data.shape[0]
    init = jax.vmap(lambda t: _gn_init(model, t))
    step = jax.vmap(lambda st, d, w: _gn_step(model, st, d, w, aux, tol, gtol))
    idx0 = jnp.arange(slots)
    carry = {
        "state": init(theta0[idx0]),
        "idx": idx0,  # voxel of the chunk held by each slot
        "active": jnp.ones(slots, bool),
        "next": jnp.asarray(slots, jnp.int32),
        "theta": jnp.zeros_like(theta0),
        "loss": jnp.zeros(n, theta0.dtype),
        "converged": jnp.zeros(n, bool),
        "steps": jnp.zeros(n, jnp.int32),
    }

    def cond(c):
        return jnp.any(c["active"])

    def body(c):
        st = step(c["state"], data[c["idx"]], weights[c["idx"]])
        finished = c["active"] & (st["done"] | (st["step"] >= max_steps))
        out = jnp.where(finished, c["idx"], n)  # n: out of bounds, dropped
        theta = c["theta"].at[out].set(st["theta"], mode="drop")
        loss = c["loss"].at[out].set(st["loss"], mode="drop")
        converged = c["converged"].at[out].set(st["done"], mode="drop")
        steps = c["steps"].at[out].set(st["step"], mode="drop")
        # refill finished slots with the next voxels in the queue
        new_idx = c["next"] + jnp.cumsum(finished) - 1
        refill = finished & (new_idx < n)
        idx = jnp.where(refill, new_idx, c["idx"])
        fresh = init(theta0[jnp.minimum(idx, n - 1)])
        st = jax.tree.map(lambda a, b: jnp.where(refill.reshape((-1,) + (1,) * (a.ndim - 1)), b, a), st, fresh)
        return {
            "state": st,
            "idx": idx,
            "active": (c["active"] & ~finished) | refill,
            "next": c["next"] + jnp.sum(finished).astype(jnp.int32),
            "theta": theta,
            "loss": loss,
            "converged": converged,
            "steps": steps,
        }

    out = jax.lax.while_loop(cond, body, carry)
    return out["theta"], out["loss"], out["converged"], out["steps"]


def _solve_optax(model, data, weights, theta0, aux, max_steps, tol, gtol, *, optimizer, learning_rate):
    sqrt_w = jnp.sqrt(weights)
    floor = _loss_floor(data, weights)

    def value_fn(u):
        r = weighted_residual(model, _to_theta(model, u), data, sqrt_w, aux)
        return 0.5 * jnp.sum(r * r)

    if optimizer == "lbfgs":
        opt = optax.lbfgs(memory_size=10, linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
        value_and_grad = optax.value_and_grad_from_state(value_fn)
    else:
        opt = optax.adam(learning_rate)
        value_and_grad = lambda u, state: jax.value_and_grad(value_fn)(u)  # noqa: E731

    u0 = _to_u(model, theta0)

    def cond(carry):
        return (~carry["done"]) & (carry["step"] < max_steps)

    def body(carry):
        u, opt_state = carry["u"], carry["opt_state"]
        value, grad = value_and_grad(u, state=opt_state)
        updates, opt_state = opt.update(grad, opt_state, u, value=value, grad=grad, value_fn=value_fn)
        u_new = optax.apply_updates(u, updates)
        value_new = value_fn(u_new) if optimizer == "adam" else optax.tree.get(opt_state, "value")
        change = jnp.abs(value - value_new)
        done = (change <= tol * jnp.maximum(value, floor)) | (value_new <= floor) | (optax.tree.norm(grad) <= gtol)
        done = done | ~jnp.isfinite(value_new)
        # a non-finite step is not taken
        keep = jnp.isfinite(value_new)
        return {
            "u": jnp.where(keep, u_new, u),
            "opt_state": opt_state,
            "loss": jnp.where(keep, value_new, value),
            "step": carry["step"] + 1,
            "done": done,
            "converged": done & keep,
        }

    carry = {
        "u": u0,
        "opt_state": opt.init(u0),
        "loss": value_fn(u0),
        "step": jnp.asarray(0, jnp.int32),
        "done": jnp.asarray(False),
        "converged": jnp.asarray(False),
    }
    out = jax.lax.while_loop(cond, body, carry)
    return _to_theta(model, out["u"]), out["loss"], out["converged"], out["step"]


@partial(jax.jit, static_argnames=("model", "optimizer", "max_steps"))
def _fit_chunk(model, optimizer, max_steps, data, weights, theta0, aux, tol, gtol, learning_rate):
    """Fit one chunk: data (C, M), weights (C, M), theta0 (C, P). Compiled once per shape."""
    if optimizer == "gauss-newton":
        slots = max(1, min(data.shape[0], _GN_SLOTS))
        return _gauss_newton_queue(model, data, weights, theta0, aux, max_steps, tol, gtol, slots)
    solve = partial(_solve_optax, optimizer=optimizer, learning_rate=learning_rate)
    one = lambda d, w, t: solve(model, d, w, t, aux, max_steps, tol, gtol)  # noqa: E731
    # voxels on the last (minor) axis: every per-voxel scalar becomes a contiguous vector,
    # which XLA vectorises better than strided voxel-major layouts (~30% faster on CPU)
    out = jax.vmap(one, in_axes=-1, out_axes=-1)(data.T, weights.T, theta0.T)
    return jax.tree.map(lambda x: x.T, out)


@partial(jax.jit, static_argnames=("model",))
def _std_errors_chunk(model, data, weights, theta, aux, noise_var):
    """Gauss-Newton standard errors sqrt(diag(sigma^2 (J^T W J)^-1)), J w.r.t. original parameters."""

    def one(d, w, t, s2):
        sqrt_w = jnp.sqrt(w)
        r = weighted_residual(model, t, d, sqrt_w, aux)
        jac = weighted_jacobian(model, t, sqrt_w, aux)
        h = jnp.sum(jac[:, :, None] * jac[:, None, :], axis=0)
        dof = r.shape[0] - t.shape[0]
        sigma2 = jnp.where(s2 > 0, s2, jnp.sum(r * r) / max(dof, 1))
        diag = jnp.diag(h)
        # Jacobi scaling makes the inverse well conditioned across parameter units
        scale = 1.0 / jnp.sqrt(jnp.maximum(diag, jnp.finfo(diag.dtype).tiny))
        hs = h * scale[:, None] * scale[None, :]
        inv = _chol_solve(hs + 1e-7 * jnp.eye(t.shape[0], dtype=t.dtype), jnp.eye(t.shape[0], dtype=t.dtype))
        var = sigma2 * jnp.diag(inv) * scale**2
        identifiable = diag > 1e-12 * jnp.max(diag)
        std = jnp.where(identifiable & jnp.isfinite(var), jnp.sqrt(jnp.maximum(var, 0.0)), jnp.inf)
        if dof <= 0:
            std = jnp.where(s2 > 0, std, jnp.inf)
        return std

    return jax.vmap(one)(data, weights, theta, noise_var)


@partial(jax.jit, static_argnames=("model",))
def _predict_chunk(model, theta, aux):
    return jax.vmap(lambda t: model.forward(t, aux))(theta)


# ---------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------
@dataclass
class FitResult:
    """Parameter maps and diagnostics of :func:`fit_voxelwise`.

    Attributes
    ----------
    params : dict[str, ndarray]
        One map per parameter, spatial shape of the data, 0 outside the mask.
    residual : ndarray
        Final RMS residual per voxel, sqrt(sum w |f - y|^2 / M) (data units).
    loss : ndarray
        Final loss 0.5 * sum w |f - y|^2.
    converged : ndarray of bool
        True where a stopping criterion (not ``max_steps``) ended the fit.
    steps : ndarray of int
        Iterations used by the kept start.
    std_errors : dict[str, ndarray]
        Gauss-Newton standard errors per parameter (``inf`` where a parameter
        is not identifiable at the optimum or there are no spare degrees of
        freedom and no ``noise_sigma``); empty when not requested.
    mask : ndarray of bool
    """

    model: VoxelModel
    params: dict[str, np.ndarray]
    residual: np.ndarray
    loss: np.ndarray
    converged: np.ndarray
    steps: np.ndarray
    std_errors: dict[str, np.ndarray]
    mask: np.ndarray
    aux: Any = None
    info: dict = field(default_factory=dict)

    def param_array(self) -> np.ndarray:
        """Parameters stacked on a last axis: spatial shape + (P,)."""
        return np.stack([self.params[n] for n in self.model.param_names], axis=-1)

    def predict(self, *, chunk_size: int = 65536) -> np.ndarray:
        """Model prediction at the fitted parameters, spatial shape + (M,); 0 outside the mask."""
        theta = self.param_array()[self.mask]
        pred = _chunked_predict(self.model, theta, self.aux, chunk_size)
        out = np.zeros(self.mask.shape + pred.shape[1:], dtype=pred.dtype)
        out[self.mask] = pred
        return out


def _chunked_predict(model, theta, aux, chunk_size):
    n = theta.shape[0]
    if n == 0:
        probe = np.asarray(model.forward(jnp.asarray(model.start(), jnp.float32), aux))
        return np.zeros((0,) + probe.shape, probe.dtype)
    chunk = _effective_chunk(n, chunk_size)
    out = []
    for start in range(0, n, chunk):
        block = _pad_rows(theta[start:start + chunk], chunk)
        out.append(np.asarray(_predict_chunk(model, jnp.asarray(block), aux))[: min(chunk, n - start)])
    return np.concatenate(out)


# ---------------------------------------------------------------------------
# drivers
# ---------------------------------------------------------------------------
def _effective_chunk(n_voxels: int, chunk_size: int) -> int:
    """Chunk length: ``chunk_size``, or the next power of two (>= 64) for small problems.

    Small problems would otherwise be padded to a full chunk; powers of two keep
    the number of distinct compiled shapes logarithmic.
    """
    if n_voxels >= chunk_size:
        return chunk_size
    return min(chunk_size, max(64, 1 << max(0, int(n_voxels - 1).bit_length())))


#: rows per call of :func:`map_rows`: a few MB per operand, so that a fused kernel works in cache
#: (a five-echo statistic over 3.5 M voxels: 0.16 s in blocks, 0.35 s in one call, 1.0 s in NumPy)
ROW_BLOCK = 262144


def map_rows(kernel: Callable, rows, *, args: tuple = (), block: int = ROW_BLOCK):
    """Apply a jit-compiled voxelwise ``kernel(*row_blocks, *args)`` block by block.

    One fused pass per block instead of a NumPy temporary per operation; blocks of a fixed
    length (the last padded; small inputs a power of two) keep it to one compilation per shape.

    Parameters
    ----------
    kernel : jitted callable
        Takes one block of each array in ``rows`` (float32, ``block`` rows) and then ``args``;
        returns an array or a tuple of arrays whose first axis is the block's rows.
    rows : sequence of arrays with a common first dimension (voxels)
    args : tuple
        Passed after the blocks unchanged (echo times, scalars).

    Returns
    -------
    numpy array, or a tuple of them, with the rows' first dimension
    """
    rows = [np.asarray(r, np.float32) for r in rows]
    n = rows[0].shape[0]
    size = _effective_chunk(max(n, 1), block)
    outputs = None
    for start in range(0, max(n, 1), size):
        stop = min(start + size, n)
        blocks = [_pad_rows(r[start:stop], size) if stop > start else np.zeros((size,) + r.shape[1:], np.float32)
                  for r in rows]
        result = kernel(*(jnp.asarray(b) for b in blocks), *args)
        parts = result if isinstance(result, tuple) else (result,)
        if outputs is None:
            outputs = [np.empty((n,) + p.shape[1:], p.dtype) for p in parts]
        for out, part in zip(outputs, parts):
            out[start:stop] = np.asarray(part)[: stop - start]
    return tuple(outputs) if isinstance(result, tuple) else outputs[0]


def weighted_line(w, y, t):
    """Per row, the weighted least-squares line ``y_e = a + b t_e`` (weights ``w_e``), in JAX.

    ``w, y``: (rows, n); ``t``: (n,), best centred (the normal equations are then well conditioned
    in float32). Returns ``(a, b, sum of w, det)``, ``det`` the normal matrix's determinant, so that
    ``var(b) = sigma^2 sum(w) / det`` per unit weight; rows with ``det = 0`` give inf or nan.
    """
    sw, st, stt = w.sum(-1), w @ t, w @ (t * t)
    sy, sty = (w * y).sum(-1), (w * y) @ t
    det = sw * stt - st * st
    slope = (sw * sty - st * sy) / det
    return (stt * sy - st * sty) / det, slope, sw, det


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """Pad along axis 0 to ``rows`` by repeating the last row (padded voxels fit like a real one)."""
    if a.shape[0] == rows:
        return a
    pad = [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
    return np.pad(a, pad, mode="edge")


def _working_dtypes(data: np.ndarray):
    use64 = bool(jax.config.jax_enable_x64) and data.dtype in (np.float64, np.complex128)
    real = np.float64 if use64 else np.float32
    cplx = np.complex128 if use64 else np.complex64
    return real, (cplx if np.iscomplexobj(data) else real)


def _validate_common(model, data, mask):
    if not isinstance(model, VoxelModel):
        raise InputError(f"model must be a chisep.fit.VoxelModel, got {type(model).__name__}")
    data = np.asarray(data)
    if data.ndim < 2:
        raise InputError(f"data must have shape (..., M) with voxels first and measurements last, got shape {data.shape}")
    spatial = data.shape[:-1]
    if mask is None:
        mask = np.ones(spatial, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise InputError(f"mask shape {mask.shape} does not match the data's spatial shape {spatial}; "
                             "pass a mask on the same grid")
        mask = mask.astype(bool)
    values = data[mask]
    if not np.all(np.isfinite(values)):
        bad = int((~np.isfinite(values)).any(axis=-1).sum())
        raise InputError(f"data holds NaN or inf in {bad} masked voxel(s); fix the input or exclude those voxels from the mask")
    return data, mask, values


def _voxel_weights(weights, spatial, mask, n_meas):
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape == (n_meas,):
        w = np.broadcast_to(w, spatial + (n_meas,))
    elif w.shape != spatial + (n_meas,):
        raise InputError(f"weights must have shape ({n_meas},) or {spatial + (n_meas,)}, got {w.shape}")
    w = w[mask]
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError("weights must be finite and >= 0")
    return w


def _starts(model, init, spatial, mask) -> np.ndarray:
    """Starts as (S, N, P) for the N masked voxels."""
    n_vox = int(mask.sum())
    p = model.n_params
    if init is None:
        init = model.start()
    init = np.asarray(init, dtype=np.float64)
    if init.shape[-1:] != (p,):
        raise InputError(f"init must end with an axis of {p} parameters {model.param_names}, got shape {init.shape}")
    if init.shape[:-1] == spatial:  # per voxel, one start
        starts = init[mask][None]
    elif init.ndim >= 2 and init.shape[1:-1] == spatial and init.ndim == len(spatial) + 2:  # per voxel, S starts
        starts = init[:, mask]
    elif init.ndim == 1:  # global, one start
        starts = np.broadcast_to(init, (1, n_vox, p))
    elif init.ndim == 2:  # global, S starts
        starts = np.broadcast_to(init[:, None, :], (init.shape[0], n_vox, p))
    else:
        raise InputError(
            f"init shape {init.shape} not understood; use (P,), (n_starts, P), spatial + (P,) "
            f"or (n_starts,) + spatial + (P,) with spatial = {spatial}, P = {p}")
    if not np.all(np.isfinite(starts)):
        raise InputError("init holds NaN or inf")
    return starts


def fit_voxelwise(
    model: VoxelModel,
    data,
    *,
    aux: Any = None,
    mask=None,
    weights=None,
    init=None,
    optimizer: str = "gauss-newton",
    max_steps: int | None = None,
    tol: float | None = None,
    gtol: float = 0.0,
    learning_rate: float = 0.05,
    chunk_size: int = 65536,
    noise_sigma=None,
    std_errors: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Fit a voxelwise model by weighted nonlinear least squares.

    Parameters
    ----------
    model : VoxelModel
        Forward model for one voxel with parameter bounds.
    data : ndarray, shape (..., M), real or complex
        Measurements, voxels first (any spatial shape), measurements last.
    aux : pytree of arrays, optional
        Passed unchanged to ``model.forward`` (e.g. echo times); traced, so
        changing its values does not recompile.
    mask : ndarray of bool, shape (...), optional
        Voxels to fit (default all). Outside it every output map is 0.
    weights : ndarray, shape (M,) or (..., M), optional
        Non-negative weights w of the loss 0.5 * sum w |f - y|^2 (default 1).
    init : ndarray, optional
        Starts: (P,) or (n_starts, P) for every voxel, or spatial + (P,) /
        (n_starts,) + spatial + (P,) per voxel (see :func:`grid_init`). With
        several starts each is fitted and the lowest loss is kept per voxel.
        A shape equal to spatial + (P,) is read as per voxel (this matters
        only for 1-D spatial shapes, where (n_voxels, P) could also be read as
        n_voxels global starts). Default: ``model.start()``.
    optimizer : {"gauss-newton", "lbfgs", "adam"}
        See the module docstring; Gauss-Newton (Levenberg-Marquardt) is the
        fastest and most accurate for small least-squares problems.
    max_steps : int, optional
        Iteration cap per voxel and start (default 100 / 200 / 3000).
    tol : float, optional
        Relative tolerance (default 1e-6 / 1e-7 / 1e-10): on the Gauss-Newton
        decrement for Gauss-Newton, on the loss change for lbfgs and adam.
    gtol : float
        Gradient (max-norm for Gauss-Newton, 2-norm otherwise) tolerance; 0 disables.
    learning_rate : float
        Adam step size on the unconstrained parameters.
    chunk_size : int
        Voxels per compiled batch; bounds memory. Problems smaller than a
        chunk use the next power of two (>= 64).
    noise_sigma : float or ndarray (...), optional
        Known noise standard deviation at unit weight, for the standard
        errors; default: estimated per voxel as RSS / (n_real_residuals - P).
    std_errors : bool
        Compute Gauss-Newton standard errors (one more Jacobian per voxel).
    progress : callable(done, total), optional
        Called after each chunk with voxel-start units done and in total.

    Returns
    -------
    FitResult

    Raises
    ------
    InputError
        Unknown optimizer, shape mismatches, NaN/inf data in the mask.

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp
    >>> def decay(p, te):
    ...     return p[0] * jnp.exp(-p[1] * te)
    >>> model = VoxelModel(decay, ("s0", "r2"), (0.0, 0.0), (np.inf, 200.0))
    >>> te = np.linspace(0.005, 0.04, 6)
    >>> data = 2.0 * np.exp(-30.0 * te)[None, :]
    >>> fit = fit_voxelwise(model, data, aux=jnp.asarray(te), init=(1.0, 10.0))
    >>> bool(abs(fit.params["r2"][0] - 30.0) < 1e-3)
    True
    """
    if optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer {optimizer!r} is unknown; valid choices: {', '.join(OPTIMIZERS)}")
    data, mask, values = _validate_common(model, data, mask)
    spatial, n_meas = data.shape[:-1], data.shape[-1]
    real_dtype, data_dtype = _working_dtypes(data)
    w = _voxel_weights(weights, spatial, mask, n_meas)
    starts = _starts(model, init, spatial, mask)
    max_steps = int(_DEFAULT_MAX_STEPS[optimizer] if max_steps is None else max_steps)
    tol = float(_DEFAULT_TOL[optimizer] if tol is None else tol)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")

    n_vox, n_starts, p = values.shape[0], starts.shape[0], model.n_params
    theta_best = np.zeros((n_vox, p), real_dtype)
    loss_best = np.full(n_vox, np.inf, real_dtype)
    conv_best = np.zeros(n_vox, bool)
    steps_best = np.zeros(n_vox, np.int32)
    std_best = np.zeros((n_vox, p), real_dtype)
    if noise_sigma is None:
        noise_var = np.zeros(n_vox, real_dtype)
    else:
        ns = np.asarray(noise_sigma, dtype=np.float64)
        ns = np.broadcast_to(ns, spatial)[mask] if ns.ndim else np.full(n_vox, float(ns))
        noise_var = (ns**2).astype(real_dtype)

    chunk = _effective_chunk(max(n_vox, 1), int(chunk_size))
    total, done = n_vox * n_starts, 0
    for lo in range(0, n_vox, chunk):
        hi = min(lo + chunk, n_vox)
        d = jnp.asarray(_pad_rows(values[lo:hi].astype(data_dtype), chunk))
        wc = jnp.asarray(_pad_rows((np.ones((hi - lo, n_meas)) if w is None else w[lo:hi]).astype(real_dtype), chunk))
        for s in range(n_starts):
            t0 = jnp.asarray(_pad_rows(starts[s, lo:hi].astype(real_dtype), chunk))
            theta, loss, conv, steps = _fit_chunk(model, optimizer, max_steps, d, wc, t0, aux,
                                                  tol, gtol, learning_rate)
            theta, loss = np.asarray(theta)[: hi - lo], np.asarray(loss)[: hi - lo]
            better = np.isfinite(loss) & (loss < loss_best[lo:hi])
            theta_best[lo:hi][better] = theta[better]
            loss_best[lo:hi][better] = loss[better]
            conv_best[lo:hi][better] = np.asarray(conv)[: hi - lo][better]
            steps_best[lo:hi][better] = np.asarray(steps)[: hi - lo][better]
            done += hi - lo
            if progress is not None:
                progress(done, total)
        if std_errors:
            std = _std_errors_chunk(model, d, wc, jnp.asarray(_pad_rows(theta_best[lo:hi], chunk)), aux,
                                    jnp.asarray(_pad_rows(noise_var[lo:hi], chunk)))
            std_best[lo:hi] = np.asarray(std)[: hi - lo]

    failed = ~np.isfinite(loss_best)
    loss_best[failed] = 0.0  # every start failed (non-finite): parameters stay 0, not converged

    def to_map(v, dtype=None):
        out = np.zeros(spatial + v.shape[1:], dtype or v.dtype)
        out[mask] = v
        return out

    rms = np.sqrt(2.0 * loss_best / n_meas)
    names = model.param_names
    return FitResult(
        model=model,
        params={n: to_map(theta_best[:, i]) for i, n in enumerate(names)},
        residual=to_map(rms.astype(real_dtype)),
        loss=to_map(loss_best),
        converged=to_map(conv_best & ~failed),
        steps=to_map(steps_best),
        std_errors={n: to_map(std_best[:, i]) for i, n in enumerate(names)} if std_errors else {},
        mask=mask,
        aux=aux,
        info={"optimizer": optimizer, "max_steps": max_steps, "tol": tol, "gtol": gtol,
              "n_starts": n_starts, "chunk_size": chunk, "n_voxels": n_vox},
    )


def grid_init(model: VoxelModel, data, grid, *, aux: Any = None, mask=None, weights=None,
              chunk_size: int = 16384) -> np.ndarray:
    """Best start per voxel from a coarse parameter grid (vectorised).

    The loss of every grid candidate is evaluated in every voxel through the
    expansion ``sum w (f - y)^2 = sum w y^2 - 2 sum w y f + sum w f^2`` (two
    matrix products per chunk), and the best candidate is returned.

    Parameters
    ----------
    model : VoxelModel
    data : ndarray (..., M)
    grid : mapping name -> 1-D values, or ndarray (G, P)
        Candidates: the Cartesian product of the given values (parameters not
        named take the model's default start), or explicit parameter vectors.
    aux, mask, weights : as in :func:`fit_voxelwise`.
    chunk_size : int
        Voxels per block (memory is chunk_size x G).

    Returns
    -------
    ndarray, spatial shape + (P,)
        Best candidate per voxel (the default start outside the mask); pass
        it as ``init`` to :func:`fit_voxelwise`.
    """
    data, mask, values = _validate_common(model, data, mask)
    spatial, n_meas = data.shape[:-1], data.shape[-1]
    real_dtype, _ = _working_dtypes(data)
    if isinstance(grid, Mapping):
        unknown = set(grid) - set(model.param_names)
        if unknown:
            raise InputError(f"grid names {sorted(unknown)} are not parameters of the model {model.param_names}")
        start = model.start()
        axes = [np.atleast_1d(np.asarray(grid.get(n, [start[i]]), float)) for i, n in enumerate(model.param_names)]
        cands = np.array(list(itertools.product(*axes)), dtype=np.float64)
    else:
        cands = np.asarray(grid, dtype=np.float64)
        if cands.ndim != 2 or cands.shape[1] != model.n_params:
            raise InputError(f"grid array must have shape (G, {model.n_params}), got {cands.shape}")
    pred = np.asarray(_predict_chunk(model, jnp.asarray(cands.astype(real_dtype)), aux))  # (G, M)
    w = _voxel_weights(weights, spatial, mask, n_meas)
    if np.iscomplexobj(pred) or np.iscomplexobj(values):
        pred = np.concatenate([np.real(pred), np.imag(pred)], axis=-1)
        values = np.concatenate([np.real(values), np.imag(values)], axis=-1)
        w = None if w is None else np.concatenate([w, w], axis=-1)
    pred = pred.astype(np.float64)
    best = np.empty(values.shape[0], dtype=np.int64)
    p2 = (pred**2).T  # (2M, G)
    for lo in range(0, values.shape[0], chunk_size):
        y = values[lo:lo + chunk_size].astype(np.float64)
        wy = y if w is None else w[lo:lo + chunk_size] * y
        quad = np.broadcast_to(p2.sum(0), (y.shape[0], p2.shape[1])) if w is None else w[lo:lo + chunk_size] @ p2
        cost = quad - 2.0 * wy @ pred.T  # the sum w y^2 term is the same for all candidates
        cost[~np.isfinite(cost)] = np.inf
        best[lo:lo + chunk_size] = np.argmin(cost, axis=1)
    out = np.broadcast_to(model.start(), spatial + (model.n_params,)).copy()
    out[mask] = cands[best]
    return out


def numerical_gradient(fun: Callable[[np.ndarray], float], x, *, step: float = 1e-6) -> np.ndarray:
    """Central finite-difference gradient of a scalar function (a test oracle)."""
    x = np.asarray(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in range(x.size):
        h = step * max(1.0, abs(x.flat[i]))
        e = np.zeros_like(x)
        e.flat[i] = h
        g.flat[i] = (float(fun(x + e)) - float(fun(x - e))) / (2 * h)
    return g


__all__ = ["VoxelModel", "FitResult", "fit_voxelwise", "grid_init", "map_rows", "weighted_line", "voxel_loss", "weighted_residual",
           "numerical_gradient", "OPTIMIZERS"]
