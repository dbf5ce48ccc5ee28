"""chi-separation: paramagnetic and diamagnetic susceptibility from the local field and R2'.

Model (Shin et al., NeuroImage 2021;240:118371), chi_para, chi_dia >= 0 (ppm,
chi_dia as a magnitude)::

    R2'(r)          = Dr_para * chi_para(r) + Dr_dia * chi_dia(r)              (1/s)
    local field(r)  = CF * 1e-6 * [D * (chi_para - chi_dia)](r)                (Hz)

``closed_form`` inverts the model voxelwise when a QSM map stands in for the
field equation (initialiser and test oracle). ``solve_chi_separation`` solves it
jointly over the volume::

    minimise  1/2 sum_r || W_f,r (K_r (x_p - x_d) - f_r / (CF 1e-6)) ||^2
            + 1/2 || W_r ((Dr_p x_p + Dr_d x_d - R2') / Dr_mean) ||^2
            + lambda * sum_c || M o grad x_c ||_{2,1}          (edge-weighted TV, c = p, d)
            + lambda_csf / 2 * sum_c || M_csf (x_c - mean_csf(x_c)) ||^2
    subject to 0 <= x_c <= chi_max_c inside the mask, x_c = 0 outside.

The field term takes the local field (one term: K = D, f the local field, W_f over the mask) or the
total field, background included (chi-separation from the total field, new in chisep): one term per
sphere radius r of the single-step inversion (chisep.qsm.inversion.single_step), K_r = (1 - S_r) D
and f_r = (1 - S_r) f, weighted on the band of voxels whose largest sphere inside the mask has radius
r. (1 - S_r) takes out every field harmonic in the sphere, so the background drops out of data and
model alike, and the part of the brain's own field that background removal would take out stays in the
model instead of biasing the fit (Chatnuntawech et al., NMR Biomed 2017;30:e3570, for one map).

Scaling of the two data terms: both residuals are expressed in ppm of
susceptibility (the field divided by CF * 1e-6, R2' divided by the mean Dr)
and both weight maps have unit value for a typical voxel (W_f: inverse field
noise normalised to mean 1 in the mask; W_r: 1 inside the plausible R2' band),
so one ppm of misfit costs the same in either term and ``lambda`` does not
depend on the field strength. At 3 T the two conversions are similar anyway
(CF * 1e-6 = 127.7 Hz/ppm, Dr = 137 Hz/ppm).

The default solver is ADMM (Boyd et al., FnTML 2011) with the splitting used
by FANSI (Milovic et al., MRM 2018) extended to two maps: the field residual,
the gradients and the constrained copy of (x_p, x_d) are split off, so every
subproblem is closed form: the coupled quadratic step is a 2x2 system per
spatial frequency (diagonal in sum and difference of the maps), the field and
R2' data steps and the sign/bound projection are voxelwise, and the TV step is
a shrinkage. Over-relaxation (alpha = 1.7) roughly halves the iterations. One
iteration costs four real FFTs on the padded grid plus two per field term. The CSF term uses the CSF
means of the current iterate (fixed point, as MEDI+0 does) and the upper bounds
are applied by clipping in the voxelwise step. There is no separate TV on
chi_para + chi_dia (the toolbox has one): the R2' term already fixes the sum
voxelwise. The
alternative ``solver="fista"`` (accelerated projected gradient on a smoothed
TV, Beck & Teboulle 2009) is kept for comparison (benchmarks/bench_chi_separation.py):
it needs a step of order eps/lambda and converges far more slowly.

FFTs run on the mask's bounding box zero-padded by ``pad_factor`` so the
periodic convolution does not wrap fields from one side onto the other.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from chisep import grid, physics, validate
from chisep.acquisition import Acquisition
from chisep.errors import InputError, ModelFileError
from chisep.qsm.inversion import SINGLE_STEP_RADII_MM, median_field_noise_ppm, single_step_terms
from chisep.separation.base import MODELS, SeparationFit, SeparationInputs, SeparationModel
from chisep.separation.constants import load_model_file, require_number, scale_with_field

#: the field chi-separation's field term fits (see ChiSeparation)
FIELD_CHOICES = ("auto", "total", "local")
SOLVERS = ("admm", "fista")

#: Effective dipole gain sqrt(<D^2>) over all directions (= sqrt(4/45)), used in the
#: voxelwise uncertainty estimate to turn field noise into chi noise.
_DIPOLE_RMS_GAIN = float(np.sqrt(4.0 / 45.0))

#: Length of the per-iteration history buffer (a shape, fixed so that max_iter does not recompile).
_HISTORY_LEN = 512


# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ChiSeparationConstants:
    """Constants of the chi-separation model at one field strength (from models/chi_separation.toml).

    Relaxometric constants (Hz/ppm) and the R2' weighting band (Hz) are already
    scaled linearly from the file's reference field to ``field_strength_t``.
    """

    field_strength_t: float
    dr_para: float
    dr_dia: float
    dr_relative_uncertainty: float
    nominal_r2: float
    r2_rule_uncertainty: float
    r2prime_low: float
    r2prime_high: float
    out_of_band_weight: float
    balance_by_noise: bool
    lam: float
    lam_per_field_noise: float
    lam_csf: float
    r2prime_smoothing: float
    r2prime_smoothing_range: float
    edge_fraction: float
    tv_epsilon: float
    max_iter: int
    tol: float
    rho: tuple
    pad_factor: float
    over_relaxation: float
    chi_para_max: float
    chi_dia_max: float
    source: str


def load_constants(field_strength: float, path: str | Path | Mapping | None = None) -> ChiSeparationConstants:
    """Read the chi-separation constants and scale them to ``field_strength`` (T).

    Parameters
    ----------
    field_strength : float, T
    path : str, Path, dict or None
        A user TOML file with the same keys as models/chi_separation.toml, an
        already-parsed dict, or None for the packaged file.

    Raises
    ------
    ModelFileError
        A table or constant is missing or invalid (the message names the key).
    """
    if isinstance(path, Mapping):
        data = dict(path)
        data.setdefault("_source", "<dict>")
    else:
        data = load_model_file("chi-separation", path)
    src = data.get("_source", "chi_separation.toml")

    def table(name):
        value = data.get(name)
        if not isinstance(value, dict):
            raise ModelFileError(f"{src}: table [{name}] is missing; see models/chi_separation.toml")
        return value

    b_ref = require_number(data, "reference_field_strength_t", source=src, positive=True)
    rel, r2, wts = table("relaxometric"), table("r2"), table("weights")
    reg, sol, bnd = table("regularisation"), table("solver"), table("bounds")
    scale = partial(scale_with_field, reference_field_t=b_ref, field_strength_t=float(field_strength))
    edge_fraction = require_number(reg, "edge_fraction", source=src, minimum=0.0)
    if edge_fraction >= 1:
        raise ModelFileError(f"{src}: edge_fraction must be in [0, 1), found {edge_fraction}")
    balance_by_noise = wts.get("balance_by_noise", True)
    if not isinstance(balance_by_noise, bool):
        raise ModelFileError(f"{src}: [weights] balance_by_noise must be true or false, found {balance_by_noise!r}")
    return ChiSeparationConstants(
        field_strength_t=float(field_strength),
        dr_para=scale(require_number(rel, "dr_para_hz_per_ppm", source=src, positive=True)),
        dr_dia=scale(require_number(rel, "dr_dia_hz_per_ppm", source=src, positive=True)),
        dr_relative_uncertainty=require_number(rel, "dr_relative_uncertainty", source=src, minimum=0.0),
        nominal_r2=require_number(r2, "nominal_r2_per_s", source=src, minimum=0.0),
        r2_rule_uncertainty=require_number(r2, "rule_uncertainty_per_s", source=src, minimum=0.0),
        r2prime_low=scale(require_number(wts, "r2prime_low_hz", source=src, minimum=0.0)),
        r2prime_high=scale(require_number(wts, "r2prime_high_hz", source=src, positive=True)),
        out_of_band_weight=require_number(wts, "out_of_band_weight", source=src, minimum=0.0),
        balance_by_noise=balance_by_noise,
        lam=require_number(reg, "lambda", source=src, minimum=0.0),
        lam_per_field_noise=require_number(reg, "lambda_per_field_noise", source=src, minimum=0.0),
        lam_csf=require_number(reg, "lambda_csf", source=src, minimum=0.0),
        r2prime_smoothing=require_number(reg, "r2prime_smoothing_voxels", source=src, minimum=0.0),
        r2prime_smoothing_range=require_number(reg, "r2prime_smoothing_range", source=src, positive=True),
        edge_fraction=edge_fraction,
        tv_epsilon=require_number(reg, "tv_epsilon", source=src, positive=True),
        max_iter=int(require_number(sol, "max_iter", source=src, positive=True)),
        tol=require_number(sol, "tolerance", source=src, minimum=0.0),
        rho=tuple(require_number(sol, key, source=src, positive=True) for key in ("rho_field", "rho_tv", "rho_box")),
        pad_factor=require_number(sol, "pad_factor", source=src, minimum=1.0),
        over_relaxation=require_number(sol, "over_relaxation", source=src, positive=True),
        chi_para_max=require_number(bnd, "chi_para_max_ppm", source=src, positive=True),
        chi_dia_max=require_number(bnd, "chi_dia_max_ppm", source=src, positive=True),
        source=str(src),
    )


# ---------------------------------------------------------------------------
# voxelwise closed form
# ---------------------------------------------------------------------------
def closed_form(chi_total, r2prime, *, dr_para: float, dr_dia: float, r2prime_weight=None):
    """Voxelwise chi-separation given a total-susceptibility (QSM) map.

    Solves ``chi_total = chi_para - chi_dia`` and ``R2' = Dr_para chi_para +
    Dr_dia chi_dia`` exactly::

        chi_para = (Dr_dia * chi_total + R2') / (Dr_para + Dr_dia)
        chi_dia  = (R2' - Dr_para * chi_total) / (Dr_para + Dr_dia)

    Where one component comes out negative it is set to 0 and the other is
    re-solved from both equations in the least-squares sense, each residual in
    ppm (R2' divided by the mean Dr), the R2' equation weighted by ``w`` =
    ``r2prime_weight``: e.g. with chi_dia = 0, chi_para = (w^2 a_p r + chi_total)
    / (w^2 a_p^2 + 1), with a_p = Dr_para / Dr_mean and r = R2' / Dr_mean, then
    clipped at 0. With w = 0 (R2' unknown, e.g. a signal void) this is the
    thresholded QSM in every voxel, also where the exact solution is non-negative;
    with w = 1 (default) both equations count alike.

    Parameters
    ----------
    chi_total : array, ppm
    r2prime : array, 1/s (>= 0; R2' = max(R2* - R2, 0))
    dr_para, dr_dia : float, Hz/ppm (at the data's field strength)
    r2prime_weight : float or array, optional
        w >= 0, the weight of the R2' equation relative to the chi equation (default 1);
        the joint solver's start takes W_r / W_f.

    Returns
    -------
    chi_para, chi_dia : arrays, ppm, both >= 0, broadcast shape of the inputs.
    """
    if not (dr_para > 0 and dr_dia > 0):
        raise InputError(f"dr_para and dr_dia must be > 0 Hz/ppm, got {dr_para}, {dr_dia}")
    xp = jnp if any(isinstance(a, jax.Array) for a in (chi_total, r2prime, r2prime_weight)) else np
    chi = xp.asarray(chi_total)
    rp = xp.asarray(r2prime)
    w2 = 1.0 if r2prime_weight is None else xp.asarray(r2prime_weight) ** 2
    dr_mean = 0.5 * (dr_para + dr_dia)
    a_p, a_d, r = dr_para / dr_mean, dr_dia / dr_mean, rp / dr_mean
    chi_para = (a_d * chi + r) / (a_p + a_d)
    chi_dia = (r - a_p * chi) / (a_p + a_d)
    para_only = xp.maximum((w2 * a_p * r + chi) / (w2 * a_p**2 + 1.0), 0.0)
    dia_only = xp.maximum((w2 * a_d * r - chi) / (w2 * a_d**2 + 1.0), 0.0)
    neg_para, neg_dia = chi_para < 0, chi_dia < 0
    out_para = xp.where(neg_dia, para_only, xp.where(neg_para, 0.0, chi_para))
    out_dia = xp.where(neg_para, dia_only, xp.where(neg_dia, 0.0, chi_dia))
    # w = 0: R2' says nothing, and chi alone leaves the split open; the thresholded QSM is its
    # smallest non-negative split. (The exact solution above would still use R2': measured on a
    # microbleed whose R2' is unknown, chi_dia 0.17 ppm where the truth is 0.01.)
    unknown = w2 == 0
    out_para = xp.where(unknown, xp.maximum(chi, 0.0), out_para)
    out_dia = xp.where(unknown, xp.maximum(-chi, 0.0), out_dia)
    return out_para, out_dia


# ---------------------------------------------------------------------------
# operators on the padded grid (chisep.grid: periodic forward differences, in 1/mm)
# ---------------------------------------------------------------------------
def _box_qp(y, rp, wr2, a_p, a_d, rho, csf_w, mu, upper):
    """Voxelwise min_v 1/2 wr2 (a.v - rp)^2 + rho/2 |v - y|^2 + csf_w/2 |v - mu|^2, 0 <= v <= upper.

    Exact for the lower bounds (candidate active sets compared by objective),
    the upper bound is applied by clipping afterwards. ``y``, ``mu``, ``upper``
    are pairs (para, dia).
    """
    d = rho + csf_w
    b_p = wr2 * rp * a_p + rho * y[0] + csf_w * mu[0]
    b_d = wr2 * rp * a_d + rho * y[1] + csf_w * mu[1]
    # (d I + wr2 a a^T) v = b, Sherman-Morrison
    ab = a_p * b_p + a_d * b_d
    coef = wr2 * ab / (d + wr2 * (a_p**2 + a_d**2))
    v_p, v_d = (b_p - coef * a_p) / d, (b_d - coef * a_d) / d
    # one component at 0: 1D optimum of the other
    only_p = jnp.maximum(b_p / (d + wr2 * a_p**2), 0.0)
    only_d = jnp.maximum(b_d / (d + wr2 * a_d**2), 0.0)

    def cost(p, q):  # the objective up to a constant (b already holds the R2' cross term)
        return 0.5 * wr2 * (a_p * p + a_d * q) ** 2 + 0.5 * d * (p**2 + q**2) - b_p * p - b_d * q

    inside = (v_p >= 0) & (v_d >= 0)
    pick_p = cost(only_p, 0.0) <= cost(0.0, only_d)
    out_p = jnp.where(inside, v_p, jnp.where(pick_p, only_p, 0.0))
    out_d = jnp.where(inside, v_d, jnp.where(pick_p, 0.0, only_d))
    return jnp.minimum(out_p, upper[0]), jnp.minimum(out_d, upper[1])


def _csf_means(x_p, x_d, csf):
    n = jnp.maximum(jnp.sum(csf), 1.0)
    return jnp.sum(csf * x_p) / n, jnp.sum(csf * x_d) / n


def objective(x_p, x_d, prob, *, lam, lam_csf, a_p, a_d, tv_epsilon=0.0):
    """Value of the chi-separation objective (see module docstring) on the padded grid.

    ``tv_epsilon > 0`` smooths ``|grad x|`` as ``sqrt(|grad x|^2 + eps^2) - eps``
    (differentiable; used by the FISTA solver and the gradient test).
    """
    h = prob["h"]
    t = _apply_kernels(x_p - x_d, prob["kernels"])
    data_f = 0.5 * jnp.sum(prob["wf2s"] * (t - prob["phis"]) ** 2)
    data_r = 0.5 * jnp.sum(prob["wr2"] * (a_p * x_p + a_d * x_d - prob["rp"]) ** 2)
    tv = 0.0
    for x in (x_p, x_d):
        g2 = sum((e * g) ** 2 for e, g in zip(prob["edge"], grid.gradient(x, h)))
        tv = tv + jnp.sum(jnp.sqrt(g2 + tv_epsilon**2) - tv_epsilon)
    mu_p, mu_d = _csf_means(x_p, x_d, prob["csf"])
    csf = 0.5 * jnp.sum(prob["csf"] * ((x_p - mu_p) ** 2 + (x_d - mu_d) ** 2))
    return data_f + data_r + lam * tv + lam_csf * csf


def _apply_kernels(x, kernels):
    """Each half-spectrum kernel of the stack applied to x: (terms, x, y, z)."""
    return jnp.fft.irfftn(kernels * jnp.fft.rfftn(x)[None], s=x.shape, axes=(-3, -2, -1))


#: the objective as one compiled program (op by op, its dozens of full-grid passes cost about 1 s at 1 mm)
_objective_compiled = jax.jit(objective)


@jax.jit
def _admm(prob, x_p, x_d, params):
    """ADMM iterations (lax.while_loop); returns the feasible maps, iteration count and update history."""
    h, kernels, lap = prob["h"], prob["kernels"], prob["lap"]
    lam, lam_csf = params["lam"], params["lam_csf"]
    rho_f, rho_g, rho_v = params["rho_f"], params["rho_g"], params["rho_v"]
    a_p, a_d = params["a_p"], params["a_d"]
    upper = (params["max_p"] * prob["mask"], params["max_d"] * prob["mask"])
    shape = x_p.shape
    terms = (-3, -2, -1)  # the spatial axes of a stack of field terms
    denom_s = rho_g * lap + rho_v
    denom_t = 2.0 * rho_f * jnp.sum(kernels**2, axis=0) + rho_g * lap + rho_v
    tau = lam / rho_g
    history0 = jnp.full((_HISTORY_LEN,), jnp.nan, jnp.float32)

    alpha = params["alpha"]

    def project(y_p, y_d, x_p, x_d):
        mu = _csf_means(x_p, x_d, prob["csf"])
        return _box_qp((y_p, y_d), prob["rp"], prob["wr2"], a_p, a_d, rho_v, lam_csf * prob["csf"], mu, upper)

    def relax(new, old):
        # over-relaxation (Boyd et al. 2011, sec. 3.4.3): alpha * A x + (1 - alpha) * z_old
        return alpha * new + (1.0 - alpha) * old

    def body(state):
        k, x_p, x_d, dt, z_f, u_f, g_old, u_g, v_old, u_v, _, history = state
        # field data step (voxelwise, per term), W_f = 0 outside the mask (outside its band)
        d_rel = relax(dt, z_f)
        z_f = (prob["wf2s"] * prob["phis"] + rho_f * (d_rel + u_f)) / (prob["wf2s"] + rho_f)
        u_f = u_f + d_rel - z_f
        q_f = z_f - u_f
        # TV step: isotropic shrinkage of the non-edge gradient components
        new_g, new_ug, rhs = [], [], []
        for x, g_prev, u in zip((x_p, x_d), g_old, u_g):
            a = tuple(relax(gi, gp) + ui for gi, gp, ui in zip(grid.gradient(x, h), g_prev, u))
            norm = jnp.sqrt(sum((e * ai) ** 2 for e, ai in zip(prob["edge"], a)))
            shrink = jnp.minimum(tau / jnp.maximum(norm, 1e-12), 1.0)
            g = tuple(ai - e * ai * shrink for e, ai in zip(prob["edge"], a))
            new_g.append(g)
            new_ug.append(tuple(ai - gi for ai, gi in zip(a, g)))
            rhs.append(rho_g * grid.divergence_adjoint(tuple(2.0 * gi - ai for gi, ai in zip(g, a)), h))
        g_old, u_g = tuple(new_g), tuple(new_ug)
        # R2' data step + sign/bound/support projection + CSF (voxelwise)
        y = (relax(x_p, v_old[0]) + u_v[0], relax(x_d, v_old[1]) + u_v[1])
        v = project(y[0], y[1], x_p, x_d)
        u_v = (y[0] - v[0], y[1] - v[1])
        r_p = rhs[0] + rho_v * (v[0] - u_v[0])
        r_d = rhs[1] + rho_v * (v[1] - u_v[1])
        # coupled quadratic step: per frequency, sum and difference decouple
        f_p, f_d, f_z = jnp.fft.rfftn(r_p), jnp.fft.rfftn(r_d), jnp.fft.rfftn(q_f, axes=terms)
        s_hat = (f_p + f_d) / denom_s
        t_hat = (2.0 * rho_f * jnp.sum(kernels * f_z, axis=0) + f_p - f_d) / denom_t
        s = jnp.fft.irfftn(s_hat, s=shape)
        t = jnp.fft.irfftn(t_hat, s=shape)
        dt = jnp.fft.irfftn(kernels * t_hat[None], s=shape, axes=terms)
        new_p, new_d = 0.5 * (s + t), 0.5 * (s - t)
        num = jnp.sum(prob["mask"] * ((new_p - x_p) ** 2 + (new_d - x_d) ** 2))
        den = jnp.sum(prob["mask"] * (new_p**2 + new_d**2))
        delta = jnp.sqrt(num / jnp.maximum(den, 1e-30))
        history = history.at[jnp.minimum(k, history.shape[0] - 1)].set(delta)
        return k + 1, new_p, new_d, dt, z_f, u_f, g_old, u_g, v, u_v, delta, history

    def cond(state):
        k, delta = state[0], state[10]
        return (k < params["max_iter"]) & (delta > params["tol"])

    zeros = jnp.zeros_like(x_p)
    dt0 = _apply_kernels(x_p - x_d, kernels)
    state0 = (
        jnp.asarray(0, jnp.int32), x_p, x_d, dt0, dt0, jnp.zeros_like(dt0),
        (grid.gradient(x_p, h), grid.gradient(x_d, h)), ((zeros,) * 3, (zeros,) * 3), (x_p, x_d), (zeros, zeros),
        jnp.asarray(jnp.inf, jnp.float32), history0,
    )
    k, x_p, x_d, _, _, _, _, _, _, u_v, _, history = jax.lax.while_loop(cond, body, state0)
    v_p, v_d = project(x_p + u_v[0], x_d + u_v[1], x_p, x_d)
    return v_p, v_d, k, history


@jax.jit
def _fista(prob, x_p, x_d, params):
    """Accelerated projected gradient (FISTA with adaptive restart) on the smoothed objective."""
    a_p, a_d = params["a_p"], params["a_d"]
    upper = (params["max_p"] * prob["mask"], params["max_d"] * prob["mask"])
    f = partial(objective, prob=prob, lam=params["lam"], lam_csf=params["lam_csf"],
                a_p=a_p, a_d=a_d, tv_epsilon=params["tv_epsilon"])
    grad_f = jax.grad(lambda x: f(x[0], x[1]))
    h = prob["h"]
    # Lipschitz bound of the smoothed objective's gradient
    lip = (jnp.max(prob["wf2s"]) * 2.0 * jnp.max(jnp.sum(prob["kernels"] ** 2, axis=0))
           + jnp.max(prob["wr2"]) * (a_p**2 + a_d**2)
           + params["lam"] * 4.0 * jnp.sum(1.0 / h**2) / params["tv_epsilon"] + params["lam_csf"])
    step = 1.0 / lip
    history0 = jnp.full((_HISTORY_LEN,), jnp.nan, jnp.float32)

    def proj(x):
        return jnp.stack([jnp.clip(x[0], 0.0, upper[0]), jnp.clip(x[1], 0.0, upper[1])])

    def body(state):
        k, x, y, tk, _, history = state
        x_new = proj(y - step * grad_f(y))
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * tk**2))
        # restart the momentum when it points uphill (O'Donoghue & Candes 2015)
        restart = jnp.sum((y - x_new) * (x_new - x)) > 0
        t_new = jnp.where(restart, 1.0, t_new)
        y_new = x_new + jnp.where(restart, 0.0, (tk - 1.0) / t_new) * (x_new - x)
        delta = jnp.sqrt(jnp.sum((x_new - x) ** 2) / jnp.maximum(jnp.sum(x_new**2), 1e-30))
        history = history.at[jnp.minimum(k, history.shape[0] - 1)].set(delta)
        return k + 1, x_new, y_new, t_new, delta, history

    def cond(state):
        return (state[0] < params["max_iter"]) & (state[4] > params["tol"])

    x0 = proj(jnp.stack([x_p, x_d]))
    state0 = (jnp.asarray(0, jnp.int32), x0, x0, jnp.asarray(1.0, jnp.float32),
              jnp.asarray(jnp.inf, jnp.float32), history0)
    k, x, _, _, _, history = jax.lax.while_loop(cond, body, state0)
    return x[0], x[1], k, history


@jax.jit
def _tkd(phi, mask, kernel, threshold):
    """Truncated k-space division (Shmueli et al., MRM 2009): quick QSM for the initial guess."""
    return mask * jnp.fft.irfftn(jnp.fft.rfftn(phi) * grid.tkd_inverse(kernel, threshold), s=phi.shape)


@partial(jax.jit, static_argnames=("dr_para", "dr_dia", "chi_max"))
def _start(prob, chi0, *, dr_para, dr_dia, chi_max):
    """The solver's start: the closed form from chi0, within the bounds, on the mask (one program)."""
    # the start weighs the R2' equation as the solver does, relative to the field's: where R2' is
    # unknown (a signal void, W_r = 0) chi alone decides, i.e. a calcification starts at chi_dia = -chi
    ratio = jnp.sqrt(prob["wr2"] / jnp.maximum(prob["wf2"], 1e-6))
    x_p, x_d = closed_form(chi0, prob["rp"] * (0.5 * (dr_para + dr_dia)), dr_para=dr_para, dr_dia=dr_dia,
                           r2prime_weight=ratio)
    return jnp.minimum(x_p, chi_max[0]) * prob["mask"], jnp.minimum(x_d, chi_max[1]) * prob["mask"]


@jax.jit
def _field_residual_hz(v_p, v_d, prob, cf):
    """Data minus model of the field terms, each on its band (Hz)."""
    return jnp.sum(prob["bands"] * (prob["phis"] - _apply_kernels(v_p - v_d, prob["kernels"])), axis=0) * cf


# ---------------------------------------------------------------------------
# pure core
# ---------------------------------------------------------------------------
_dipole = jax.jit(grid.dipole_half, static_argnums=0)
_laplacian = jax.jit(grid.laplacian_half, static_argnums=0)


def _padded_problem(field_hz, r2prime, mask, *, field_strength, voxel_size, b0_direction, dr_para, dr_dia,
                    field_weight=None, r2prime_weight=None, edge_weight=None, csf_mask=None, pad_factor=1.1,
                    total_field: bool = False, radii_mm=SINGLE_STEP_RADII_MM):
    """Arrays of one problem on the padded grid (a plain dict: a JAX pytree) and the grid."""
    mask = np.asarray(mask, bool)
    # pad_factor - 1 of the mask's extent in all, half on each side (the QSM stages' PAD_FRACTION rule); from
    # the total field at least the largest sphere, so that (1 - S_r) does not wrap the far side's field in
    radii = sorted((float(r) for r in np.atleast_1d(radii_mm)), reverse=True) if total_field else [0.0]
    work = grid.Grid.around(mask, grid.margin_voxels(mask, voxel_size, margin_mm=radii[0],
                                                     fraction=(pad_factor - 1.0) / 2.0))
    big = work.shape
    h = np.asarray(voxel_size, np.float32)
    cf = physics.centre_frequency_hz(field_strength) * 1e-6
    dr_mean = 0.5 * (dr_para + dr_dia)

    def pad(a, fill=0.0):
        return work.embed(np.where(mask, a, fill) if np.ndim(a) else np.full(mask.shape, a), fill)

    m = pad(mask)
    wf = pad(field_weight) if field_weight is not None else m
    wr = pad(r2prime_weight) if r2prime_weight is not None else m
    if edge_weight is None:
        edge = (np.ones(big, np.float32),) * 3
    else:
        edge = tuple(work.embed(e, fill=1.0) for e in np.asarray(edge_weight))
    h_j, b0_j = grid.as_jax(h), grid.as_jax(b0_direction)
    phi, wf2 = jnp.asarray(pad(field_hz) / cf), jnp.asarray((wf * m) ** 2)
    if total_field:
        # one term per radius on its band (chisep.qsm.inversion.single_step's data terms)
        kernels, phis, bands = single_step_terms(phi, jnp.asarray(m), jnp.asarray(radii, jnp.float32), big, h_j, b0_j)
        bands = bands.astype(jnp.float32)
    else:
        kernels, phis, bands = _dipole(big, h_j, b0_j)[None], phi[None], jnp.asarray(m)[None]
    prob = dict(
        phis=phis, kernels=kernels, bands=bands, wf2s=wf2[None] * bands, wf2=wf2,
        rp=jnp.asarray(pad(r2prime) / dr_mean), wr2=jnp.asarray((wr * m) ** 2),
        mask=jnp.asarray(m), csf=jnp.asarray(pad(csf_mask if csf_mask is not None else 0.0) * m),
        edge=tuple(jnp.asarray(e) for e in edge),
        lap=_laplacian(big, h_j), h=h_j,
    )
    return prob, work


def solve_chi_separation(
    field_hz,
    r2prime,
    mask,
    *,
    field_strength: float,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    dr_para: float,
    dr_dia: float,
    chi_init=None,
    field_weight=None,
    r2prime_weight=None,
    edge_weight=None,
    csf_mask=None,
    lam: float,
    lam_csf: float = 0.0,
    max_iter: int = 30,
    tol: float = 0.0,
    solver: str = "admm",
    chi_max: tuple[float, float] = (2.0, 2.0),
    pad_factor: float = 1.1,
    rho: tuple[float, float, float] = (0.3, 0.1, 0.03),
    over_relaxation: float = 1.7,
    tv_epsilon: float = 1e-4,
    report_objective: bool = False,
    total_field: bool = False,
    radii_mm: Sequence[float] = SINGLE_STEP_RADII_MM,
) -> dict:
    """Joint chi-separation over the volume (pure function; inputs assumed validated).

    Parameters
    ----------
    field_hz : (x, y, z) array, Hz
        The local field, or with ``total_field`` the total field (background included; voxels of
        zero ``field_weight`` filled from their neighbours first, as the single-step inversion does).
    r2prime : (x, y, z) array, 1/s, >= 0
    mask : (x, y, z) bool array
    field_strength : float, T
    voxel_size : 3 floats, mm
    b0_direction : 3 floats, unit B0 direction in voxel axes
    dr_para, dr_dia : float, Hz/ppm at ``field_strength``
    chi_init : (x, y, z) array, ppm, optional
        QSM map; the start is its voxelwise ``closed_form`` with R2'. None:
        truncated k-space division (threshold 0.19) of the local field (required from the total field).
    field_weight, r2prime_weight : (x, y, z) arrays, optional
        W_f and W_r (dimensionless, ~1 for a typical voxel); 1 in the mask if None.
    edge_weight : (3, x, y, z) array of 0/1, optional
        TV weight of each forward-difference component (0 on edges); 1 if None.
    csf_mask : (x, y, z) bool array, optional
    lam, lam_csf : float
        TV and CSF-uniformity weights (objective in ppm^2 units, see module doc).
    max_iter : int
        ADMM or FISTA iterations at most.
    tol : float
        Stop when the relative update of (x_p, x_d) in the mask falls below tol.
    solver : {"admm", "fista"}
    chi_max : (float, float), ppm
        Upper bounds of chi_para and chi_dia.
    pad_factor : float
        FFT grid = mask bounding box times this factor (fast sizes).
    rho : (rho_field, rho_tv, rho_box)
        ADMM penalties relative to the unit-normalised data terms (the model
        file's [solver] values; see benchmarks/bench_chi_separation.py).
    over_relaxation : float
        ADMM over-relaxation alpha in (0, 2); 1 is plain ADMM. 1.7 halves the
        iterations needed on the head phantom.
    tv_epsilon : float, ppm/mm
        TV smoothing of the FISTA solver.
    report_objective : bool
        Also evaluate the objective at the result (for comparing solvers; a program of its own
        whose tracing and lowering alone cost 0.4 s per process, so the model does not ask for it).
    total_field : bool
        ``field_hz`` is the total field: one data term per sphere radius of ``radii_mm`` (mm), K_r =
        (1 - S_r) D on the band of voxels whose largest sphere inside the mask has radius r (module
        docstring); the grid's margin is at least the largest radius.

    Returns
    -------
    dict with chi_para, chi_dia (ppm, float32 arrays of the input shape),
    iterations (int), history (relative update per iteration), the
    field term's residual ``field_residual_hz`` (data minus model, Hz: f - D (x_p - x_d) in CF 1e-6
    units, from the total field (1 - S_r)(f - D (x_p - x_d)) on each voxel's band),
    ``objective`` (its value at the result, TV not smoothed; None unless
    ``report_objective``) and ``padded_shape``.
    """
    validate.check_choice(solver, SOLVERS, "solver")
    mask = np.asarray(mask, bool)
    if total_field and chi_init is None:
        raise InputError("chi-separation from the total field starts from a QSM map: give chi_init (e.g. the "
                         "single-step inversion's chi)")
    if total_field and field_weight is not None:
        field_hz = grid.fill_unweighted(np.asarray(field_hz, np.float32), mask, np.asarray(field_weight))
    prob, work = _padded_problem(
        field_hz, r2prime, mask, field_strength=field_strength, voxel_size=voxel_size,
        b0_direction=b0_direction, dr_para=dr_para, dr_dia=dr_dia, field_weight=field_weight,
        r2prime_weight=r2prime_weight, edge_weight=edge_weight, csf_mask=csf_mask, pad_factor=pad_factor,
        total_field=total_field, radii_mm=radii_mm,
    )
    big = work.shape

    def unpad(a):
        return np.where(mask, work.extract(np.asarray(a, np.float32)), 0.0).astype(np.float32)

    cf = physics.centre_frequency_hz(field_strength) * 1e-6
    dr_mean = 0.5 * (dr_para + dr_dia)
    a_p, a_d = dr_para / dr_mean, dr_dia / dr_mean
    if chi_init is None:
        chi0 = _tkd(prob["phis"][0], prob["mask"], prob["kernels"][0], 0.19)
    else:
        chi0 = jnp.asarray(work.embed(np.where(mask, chi_init, 0.0)))
    x_p, x_d = _start(prob, chi0, dr_para=float(dr_para), dr_dia=float(dr_dia),
                      chi_max=tuple(float(c) for c in chi_max))
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    params = dict(
        lam=f32(lam), lam_csf=f32(lam_csf), rho_f=f32(rho[0]), rho_g=f32(rho[1]), rho_v=f32(rho[2]),
        a_p=f32(a_p), a_d=f32(a_d), max_p=f32(chi_max[0]), max_d=f32(chi_max[1]),
        max_iter=jnp.asarray(int(max_iter), jnp.int32), tol=f32(tol), tv_epsilon=f32(tv_epsilon),
        alpha=f32(over_relaxation),
    )
    run = _admm if solver == "admm" else _fista
    v_p, v_d, k, history = run(prob, x_p, x_d, params)
    residual = _field_residual_hz(v_p, v_d, prob, jnp.float32(cf))
    value = (float(_objective_compiled(v_p, v_d, prob, lam=lam, lam_csf=lam_csf, a_p=a_p, a_d=a_d))
             if report_objective else None)
    k = int(k)
    return dict(
        chi_para=unpad(v_p), chi_dia=unpad(v_d), iterations=k,
        history=np.asarray(history)[: min(k, _HISTORY_LEN)], field_residual_hz=unpad(residual),
        padded_shape=big, objective=value,
    )


# ---------------------------------------------------------------------------
# weights and edge masks
# ---------------------------------------------------------------------------
def field_weight_from_noise(field_noise_hz, mask, *, cap: float = 5.0) -> np.ndarray:
    """W_f from a field-noise map (Hz): inverse noise normalised to mean 1 in the mask, capped.

    Voxels with infinite noise get weight 0; the cap (in units of the mean)
    keeps a few near-zero noise estimates from dominating the fit.
    """
    noise = np.broadcast_to(np.asarray(field_noise_hz, np.float64), np.shape(mask))
    valid = mask & np.isfinite(noise) & (noise > 0)
    w = np.zeros(noise.shape)
    w[valid] = 1.0 / noise[valid]
    if valid.any():
        w /= w[valid].mean()
    w[mask & (noise == 0)] = cap
    w = np.minimum(w, cap)
    return (w * mask).astype(np.float32)


#: limits of :func:`noise_balance` (a noiseless map must not turn one data term off)
NOISE_BALANCE_LIMITS = (0.01, 100.0)


def noise_balance(field_noise_hz, r2prime_noise, mask, *, field_strength: float, dr_mean: float) -> float:
    """Weight of the R2' term relative to the field term from their noise, both in ppm (1 when unknown).

    The field term's weight W_f is 1 / field noise normalised to mean 1, so W_f = 1 stands for the
    harmonic mean of the field noise, sigma_f / (CF 1e-6) in ppm; the R2' residual is in ppm after
    dividing by the mean Dr, so its noise is sigma_R / Dr_mean. Least squares weighted by the inverse
    noise (maximum likelihood for Gaussian noise) then weights the R2' term by their ratio, clipped
    to :data:`NOISE_BALANCE_LIMITS`.
    """
    if field_noise_hz is None:
        return 1.0
    noise = np.broadcast_to(np.asarray(field_noise_hz, np.float64), np.shape(mask))[mask]
    noise = noise[np.isfinite(noise) & (noise > 0)]
    sigma_r = float(np.median(np.asarray(r2prime_noise, np.float64)[mask] if np.ndim(r2prime_noise)
                              else r2prime_noise))
    if noise.size == 0 or not (np.isfinite(sigma_r) and sigma_r > 0):
        return 1.0
    sigma_f_ppm = 1.0 / np.mean(1.0 / noise) / (physics.centre_frequency_hz(field_strength) * 1e-6)
    return float(np.clip(sigma_f_ppm / (sigma_r / dr_mean), *NOISE_BALANCE_LIMITS))


def r2prime_weight(r2prime, mask, *, low: float, high: float, out_of_band: float) -> np.ndarray:
    """W_r: 1 where low <= R2' <= high (Hz), ``out_of_band`` elsewhere in the mask, 0 outside."""
    r2prime = np.asarray(r2prime)
    inside = (r2prime >= low) & (r2prime <= high)
    return (np.where(inside, 1.0, out_of_band) * mask).astype(np.float32)


# ---------------------------------------------------------------------------
# uncertainty
# ---------------------------------------------------------------------------
def voxelwise_std(field_noise_hz, r2prime_noise, *, field_strength: float, dr_para: float, dr_dia: float):
    """Standard deviations of chi_para and chi_dia (ppm) from the voxelwise linearisation.

    The closed form is linear in (chi_total, R2'), so with independent noise
    sigma_chi (ppm) and sigma_R (1/s)::

        var(chi_para) = (Dr_dia^2 sigma_chi^2 + sigma_R^2) / (Dr_para + Dr_dia)^2
        var(chi_dia)  = (Dr_para^2 sigma_chi^2 + sigma_R^2) / (Dr_para + Dr_dia)^2

    sigma_chi = sigma_f / (CF 1e-6 g), with g = sqrt(<D^2>) = sqrt(4/45) the
    direction-averaged dipole gain. This is the Gauss-Newton covariance of the
    local 2x2 problem. Limits: it ignores the regularisation (which lowers the
    variance and adds bias), the spatial coupling of the dipole inversion
    (noise near the magic-angle cone is amplified more than g suggests) and
    the bounds (at chi = 0 it describes the unconstrained linearisation).

    Parameters
    ----------
    field_noise_hz : float or array, Hz
    r2prime_noise : float or array, 1/s
    field_strength : float, T
    dr_para, dr_dia : float, Hz/ppm

    Returns
    -------
    std_para, std_dia : float32 arrays (broadcast of the inputs), ppm
    """
    cf = physics.centre_frequency_hz(field_strength) * 1e-6
    sigma_chi = np.asarray(field_noise_hz, np.float32) / (cf * _DIPOLE_RMS_GAIN)
    sigma_r = np.asarray(r2prime_noise, np.float32)
    total = dr_para + dr_dia
    std_p = np.sqrt(dr_dia**2 * sigma_chi**2 + sigma_r**2) / total
    std_d = np.sqrt(dr_para**2 * sigma_chi**2 + sigma_r**2) / total
    return std_p.astype(np.float32), std_d.astype(np.float32)


def _robust_std(values) -> float:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def estimate_noise(image, mask) -> float:
    """Robust white-noise standard deviation of a map from its 6-neighbour high-pass.

    d = x - mean of the 6 neighbours has variance 7/6 sigma^2 for white noise
    and is ~0 in smooth or piecewise-constant regions; the median absolute
    deviation (times 1.4826) ignores the minority of voxels on edges. Uses the
    voxels whose 6 neighbours are all inside ``mask``. Used for the
    uncertainty maps when no noise level is given (the fit residual would
    underestimate it: the R2' term is matched almost exactly, see ``fit``).
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0
    # on the mask's box with a one-voxel rim (outside the mask): the same voxels and neighbours
    box = grid.bounding_box(mask, margin=1)
    x = np.asarray(image, np.float64)[box]
    mask = mask[box]
    inner = mask.copy()
    neighbours = np.zeros_like(x)
    for axis in range(3):
        for shift in (-1, 1):
            neighbours += np.roll(x, shift, axis=axis)
            inner &= np.roll(mask, shift, axis=axis)
    for axis in range(3):  # np.roll wraps: drop the faces of the grid
        idx = [slice(None)] * 3
        idx[axis] = [0, -1]
        inner[tuple(idx)] = False
    d = (x - neighbours / 6.0)[inner]
    if d.size == 0:
        return 0.0
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / np.sqrt(7.0 / 6.0))


def prepare_r2prime(r2prime, mask, *, noise=None, from_rule: bool = False, unknown=None,
                    rule_uncertainty: float = 0.0, relative_uncertainty: float = 0.0,
                    smoothing_voxels: float = 0.0, smoothing_range: float = 2.0):
    """R2''s expected error, and R2' averaged over the neighbours that agree with it within that error.

    The models that take R2' as data (chi-separation, the linear model) see it the same way:

    - error: ``noise`` (1/s, a number or a map) if given, else the map's own high-pass
      (:func:`estimate_noise`; a fit residual would not do, R2' is matched almost exactly); with the
      R2*-only rule's R2 (``from_rule``) ``rule_uncertainty`` adds in quadrature (the rule is off by
      tissue, smoothly, which the high-pass misses); then ``relative_uncertainty`` times R2' (Dr or
      a_para / a_dia is a model of R2', good to that share) makes it a map;
    - smoothing: :func:`chisep.grid.bilateral_within` with distance sigma ``smoothing_voxels`` (0: off)
      and difference sigma ``smoothing_range`` times the error, so noise is averaged and a step beyond
      the error (a calcified pallidum) is kept; ``unknown`` voxels (a dark source's R2' reads ~0) lend
      nothing and keep their own value. R2' holds the noise of R2* and R2, which no spatial prior of the
      models takes out (models/chi_separation.toml, benchmarks/RESULTS.md session 20).

    Returns
    -------
    sigma : float or (x, y, z) float32 array, 1/s
    r2prime : (x, y, z) float32 array, 1/s, smoothed (a copy when smoothing is off)

    Examples
    --------
    >>> import numpy as np
    >>> r2p = np.full((5, 5, 5), 8.0, np.float32); r2p[2, 2, 2] = 9.0
    >>> sigma, smoothed = prepare_r2prime(r2p, np.ones(r2p.shape, bool), noise=1.0, smoothing_voxels=0.75)
    >>> sigma, 8.0 < float(smoothed[2, 2, 2]) < 8.5
    (1.0, True)
    """
    m = np.asarray(mask, bool)
    r2p = np.asarray(r2prime, np.float32)
    sigma = noise if noise is not None else estimate_noise(r2p, m)
    if from_rule and noise is None:
        sigma = float(np.hypot(sigma, rule_uncertainty))
    if relative_uncertainty > 0:
        sigma = np.hypot(sigma, relative_uncertainty * np.abs(np.where(m, r2p, 0.0))).astype(np.float32)
    if smoothing_voxels > 0:
        usable = m if unknown is None else m & ~np.asarray(unknown, bool)
        spread = np.maximum(smoothing_range * np.broadcast_to(np.asarray(sigma, np.float32), m.shape), 1e-6)
        return sigma, grid.bilateral_within(r2p, usable, sigma_voxels=smoothing_voxels, range_sigma=spread)
    return sigma, r2p.copy()


# ---------------------------------------------------------------------------
# unit checks (the model's own: values the other models do not see)
# ---------------------------------------------------------------------------
def _warn_on_units(field, r2p, m, field_strength, chi_init, *, total=False):
    cf = physics.centre_frequency_hz(field_strength) * 1e-6
    # a total field's background makes it as large as it likes: its units go unchecked
    p99_ppm = 1.0 if total else float(np.percentile(np.abs(field[m]), 99)) / cf
    if p99_ppm == 0:
        warnings.warn("local_field_hz is zero everywhere in the mask; chi_para - chi_dia will be ~0.",
                      stacklevel=4)
    elif p99_ppm < 2e-3:
        warnings.warn(
            f"local_field_hz looks too small for a local field in Hz at {field_strength:g} T (99th percentile "
            f"{p99_ppm * cf:.3g} Hz = {p99_ppm:.2g} ppm). If it is in ppm, multiply by CF*1e-6 = "
            f"{cf:.1f} Hz/ppm; if it is phase in rad, divide by 2*pi*TE.", stacklevel=4)
    elif p99_ppm > 3.0:
        warnings.warn(
            f"local_field_hz looks too large for a local (background-removed) field in Hz at {field_strength:g} T "
            f"(99th percentile {p99_ppm * cf:.3g} Hz = {p99_ppm:.2g} ppm). If it is in rad/s divide by 2*pi; "
            "if the background field was not removed, run chisep.qsm.background first.", stacklevel=4)
    p99_r2p = float(np.percentile(r2p[m], 99))
    if 0 < p99_r2p < 0.5:
        warnings.warn(f"r2prime looks like it is in 1/ms (99th percentile {p99_r2p:.3g}); chisep expects 1/s "
                      "(multiply by 1000).", stacklevel=4)
    if chi_init is not None and np.percentile(np.abs(chi_init[m]), 99) > 5:
        warnings.warn("chi has values above 5 ppm (99th percentile); chisep expects ppm, not ppb "
                      "(divide by 1000).", stacklevel=4)


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------
@MODELS.register("chi-separation")
class ChiSeparation(SeparationModel):
    """chi-separation (Shin et al., NeuroImage 2021): chi_para, chi_dia from the local field and R2'.

    Uses ``local_field_hz`` and R2' (``r2prime``, or ``r2star`` with ``r2``
    or the R2*-only rule) of the :class:`SeparationInputs`, R2' first averaged over the neighbours that
    agree with it within its expected error (model file: ``r2prime_smoothing_voxels``,
    ``r2prime_smoothing_range``; :func:`chisep.grid.bilateral_within`); ``chi`` (QSM)
    when given is the start (its closed-form split; TKD otherwise),
    ``field_noise_hz`` weights the field term, the first echo of
    ``magnitude`` adds MEDI edges to R2''s, ``csf_mask`` the CSF term.

    Parameters
    ----------
    acquisition : Acquisition
        Field strength, voxel size and B0 direction.
    dr_para, dr_dia : float, Hz/ppm, optional
        Relaxometric constants at the field strength; default: the model
        file's value (137 Hz/ppm at 3 T) scaled linearly with B0.
    constants : str, Path or dict, optional
        A user TOML file (same keys as models/chi_separation.toml) or a parsed dict.
    lam, lam_csf, max_iter, tol, pad_factor : optional
        Override the model file's [regularisation] and [solver] values
        (pad_factor: FFT grid size relative to the mask's bounding box, >= 1).
    solver : {"admm", "fista"}
    r2prime_noise : float or (x, y, z) array, 1/s, optional
        R2' measurement noise for the uncertainty maps and, with the field noise, the balance of the
        two data terms (:func:`noise_balance`); default: ``estimate_noise`` of R2'. The model's own
        error, ``dr_relative_uncertainty`` (model file) times R2', adds to it in quadrature.
    field : {"auto", "total", "local"}
        The field the field term fits: "total" the inputs' ``total_field_hz`` (background included,
        the single-step inversion's data terms; module docstring), "local" their ``local_field_hz``;
        "auto" (default) the total field when the inputs hold one. The pipeline hands the total field
        on after a total-field inversion (its default): on the realistic heads chi_para / chi_dia
        NRMSE fell by 0.5-1.2 points at 1 and 2 mm, SNR 100, and moved by at most 0.2 at SNR 30
        (benchmarks/RESULTS.md, session 21).

    Examples
    --------
    >>> from chisep.acquisition import Acquisition
    >>> model = ChiSeparation(Acquisition(echo_times=(), field_strength=3.0))
    >>> round(model.constants.dr_para, 1)
    137.0
    >>> round(ChiSeparation(Acquisition(echo_times=(), field_strength=7.0)).constants.dr_para, 1)
    319.7
    """

    name = "chi-separation"
    requires = (("local_field_hz", "total_field_hz"), "r2prime")

    def __init__(self, acquisition: Acquisition, *, dr_para: float | None = None, dr_dia: float | None = None,
                 constants: str | Path | Mapping | None = None, lam: float | None = None,
                 lam_csf: float | None = None, max_iter: int | None = None, tol: float | None = None,
                 solver: str = "admm", pad_factor: float | None = None, r2prime_noise=None,
                 field: str = "auto"):
        super().__init__(acquisition)
        self.field = validate.check_choice(field, FIELD_CHOICES, "field")
        c = load_constants(acquisition.field_strength, constants)
        for name, value in (("dr_para", dr_para), ("dr_dia", dr_dia)):
            if value is not None:
                validate.check_positive(value, f"{name} (Hz/ppm)")
        self.constants = replace(c, dr_para=float(dr_para) if dr_para is not None else c.dr_para,
                                 dr_dia=float(dr_dia) if dr_dia is not None else c.dr_dia)
        self.solver = validate.check_choice(solver, SOLVERS, "solver")
        self.lam = validate.check_positive(c.lam if lam is None else lam, "lam", allow_zero=True)
        self.lam_given = lam is not None  # else from the total field the weight follows the field noise
        self.lam_csf = validate.check_positive(c.lam_csf if lam_csf is None else lam_csf, "lam_csf", allow_zero=True)
        self.tol = validate.check_positive(c.tol if tol is None else tol, "tol", allow_zero=True)
        self.max_iter = validate.check_count(c.max_iter if max_iter is None else max_iter, "max_iter")
        self.pad_factor = c.pad_factor if pad_factor is None else validate.check_positive(pad_factor, "pad_factor")
        if self.pad_factor < 1:
            raise InputError(f"pad_factor must be >= 1; got {pad_factor!r}")
        if r2prime_noise is not None:
            validate.check_finite(r2prime_noise, "r2prime_noise (1/s)")
            validate.check_non_negative(r2prime_noise, "r2prime_noise (1/s)", fix="give a noise level, >= 0")
        self.r2prime_noise = r2prime_noise

    def __repr__(self) -> str:
        c = self.constants
        return f"ChiSeparation(field_strength={c.field_strength_t:g}, dr_para={c.dr_para:.4g}, dr_dia={c.dr_dia:.4g})"

    def predict(self, fit) -> dict[str, np.ndarray]:
        """Local field (Hz, CF 1e-6 D (chi_para - chi_dia), zero-padded FFT) and R2' (1/s) of ``fit``'s maps."""
        c, acq = self.constants, self.acquisition
        mask = fit.inputs.mask if fit.inputs is not None else np.ones(np.shape(fit.chi_para), bool)
        field = physics.forward_field_hz(np.asarray(fit.chi_total, np.float32), acq.field_strength,
                                         acq.voxel_size, acq.b0_direction)
        r2prime = c.dr_para * np.asarray(fit.chi_para) + c.dr_dia * np.asarray(fit.chi_dia)
        return {"local_field_hz": np.where(mask, np.asarray(field), 0.0).astype(np.float32),
                "r2prime": np.where(mask, r2prime, 0.0).astype(np.float32)}

    def _fit(self, inputs: SeparationInputs, *, progress=None) -> SeparationFit:
        """Solve the joint problem (module docstring); see the class docstring for the inputs used.

        Returns a fit with chi_para, chi_dia (ppm, >= 0), their std (ppm,
        voxelwise linearisation, see ``voxelwise_std``), residual (ppm: root
        sum of squares of the field misfit / (CF 1e-6) and the R2' misfit /
        mean Dr), extra maps ``residual_field_hz`` (Hz; from the total field the high-passed residual,
        (1 - S_r)(f - D chi) on each voxel's band) and ``residual_r2prime`` (1/s), info (settings,
        constants, iterations, units, ``field``: which field was fitted, ``lam``: the TV weight used).
        """
        c, acq = self.constants, self.acquisition
        b0 = c.field_strength_t
        m = inputs.mask
        shape = m.shape
        total = self.field == "total" or (self.field == "auto" and inputs.total_field_hz is not None)
        if not total and inputs.local_field_hz is None:
            raise InputError("chi-separation: field='local' needs the inputs' local_field_hz; or give total_field_hz "
                             "with field='auto' or 'total'")
        if total and inputs.total_field_hz is None:
            raise InputError("chi-separation: field='total' needs the inputs' total_field_hz (e.g. "
                             "QsmMaps.separation_inputs after a single-step inversion); or use field='local'")
        if total and inputs.chi is None:
            raise InputError("chi-separation from the total field starts from the QSM map: give the inputs' chi")
        field = inputs.total_field_hz if total else inputs.local_field_hz
        r2p, chi_init = inputs.r2prime, inputs.chi
        voxel_size, b0_dir = validate.check_geometry(acq.voxel_size, acq.b0_direction)
        _warn_on_units(field, r2p, m, b0, chi_init, total=total)
        r2p_data = r2p  # as given: the noise estimate and the residual refer to it
        # sigma_r balances the data terms (its median in the mask) and feeds the std maps
        sigma_r, r2p = prepare_r2prime(
            r2p, m, noise=self.r2prime_noise, from_rule=inputs.r2_from_rule, unknown=inputs.r2prime_unknown,
            rule_uncertainty=c.r2_rule_uncertainty, relative_uncertainty=c.dr_relative_uncertainty,
            smoothing_voxels=c.r2prime_smoothing, smoothing_range=c.r2prime_smoothing_range)
        noise_map = inputs.field_noise_hz
        weight_f = field_weight_from_noise(noise_map, m) if noise_map is not None else None
        weight_r = r2prime_weight(r2p, m, low=c.r2prime_low, high=c.r2prime_high, out_of_band=c.out_of_band_weight)
        if inputs.r2prime_unknown is not None:
            # a dark source's R2' reads ~0 where the truth is hundreds of 1/s: it would pull both
            # components of a calcification to zero (measured: chi_dia 1.1 of a true 2.7 ppm)
            weight_r = np.where(inputs.r2prime_unknown, 0.0, weight_r).astype(np.float32)
        dr_mean = 0.5 * (c.dr_para + c.dr_dia)
        balance = (noise_balance(noise_map, sigma_r, m, field_strength=b0, dr_mean=dr_mean)
                   if c.balance_by_noise else 1.0)
        weight_r = (weight_r * np.float32(balance)).astype(np.float32)
        edges = grid.edge_mask(r2p, m, voxel_size, edge_fraction=c.edge_fraction)
        if inputs.magnitude is not None:
            edges = edges * grid.edge_mask(inputs.magnitude[..., 0], m, voxel_size, edge_fraction=c.edge_fraction)

        lam = self.lam
        if total and not self.lam_given and noise_map is not None and c.lam_per_field_noise > 0:
            noise_ppm = median_field_noise_ppm(noise_map, m, field_strength=b0)
            if noise_ppm is not None:
                lam = c.lam_per_field_noise * noise_ppm
        out = solve_chi_separation(
            field, r2p, m, field_strength=b0, voxel_size=voxel_size, b0_direction=b0_dir,
            dr_para=c.dr_para, dr_dia=c.dr_dia, chi_init=chi_init, field_weight=weight_f,
            r2prime_weight=weight_r, edge_weight=edges, csf_mask=inputs.csf_mask, lam=lam,
            lam_csf=self.lam_csf, max_iter=self.max_iter, tol=self.tol, solver=self.solver,
            chi_max=(c.chi_para_max, c.chi_dia_max), pad_factor=self.pad_factor, tv_epsilon=c.tv_epsilon,
            rho=c.rho, over_relaxation=c.over_relaxation, total_field=total,
        )
        chi_p, chi_d = out["chi_para"], out["chi_dia"]
        cf = physics.centre_frequency_hz(b0) * 1e-6
        res_f = out["field_residual_hz"]
        res_r = np.where(m, r2p_data - c.dr_para * chi_p - c.dr_dia * chi_d, 0.0).astype(np.float32)
        residual = np.sqrt((res_f / cf) ** 2 + (res_r / dr_mean) ** 2).astype(np.float32)
        # field: the fit residual (the dipole term cannot follow white noise)
        sigma_f = noise_map if noise_map is not None else _robust_std(res_f[m])
        # voxels with infinite field noise (unusable) get an infinite std
        std_p, std_d = voxelwise_std(sigma_f, sigma_r, field_strength=b0, dr_para=c.dr_para, dr_dia=c.dr_dia)
        std_p = np.where(m, np.broadcast_to(std_p, shape), 0.0).astype(np.float32)
        std_d = np.where(m, np.broadcast_to(std_d, shape), 0.0).astype(np.float32)
        info = dict(
            model=self.name,
            reference="Shin H-G et al., NeuroImage 2021;240:118371",
            units=dict(chi_para="ppm", chi_dia="ppm (non-negative magnitude; chi_total = chi_para - chi_dia)",
                       chi_para_std="ppm", chi_dia_std="ppm",
                       residual="ppm (sqrt((field misfit / (CF*1e-6))^2 + (R2' misfit / mean Dr)^2))",
                       residual_field_hz="Hz", residual_r2prime="1/s"),
            constants=asdict(c), solver=self.solver, lam=lam, lam_csf=self.lam_csf, max_iter=self.max_iter,
            tol=self.tol, iterations=out["iterations"], update_history=out["history"].tolist(),
            field="total (single-step data terms, radii " + ", ".join(f"{r:g}" for r in SINGLE_STEP_RADII_MM)
            + " mm)" if total else "local",
            padded_shape=list(out["padded_shape"]), voxel_size=voxel_size.tolist(),
            b0_direction=b0_dir.tolist(), initialiser="chi closed form" if chi_init is not None else "TKD closed form",
            field_noise_hz_used=float(np.median(np.asarray(sigma_f)[m])) if np.ndim(sigma_f) == 3 else float(sigma_f),
            r2prime_noise_used=float(np.median(np.asarray(sigma_r)[m])) if np.ndim(sigma_r) else float(sigma_r),
            r2prime_term_weight=balance,
            std_note="voxelwise linearisation of the closed form; ignores regularisation and spatial coupling",
        )
        return SeparationFit(
            chi_para=chi_p, chi_dia=chi_d, chi_para_std=std_p, chi_dia_std=std_d,
            residual=residual, extra=dict(residual_field_hz=res_f, residual_r2prime=res_r), info=info,
        )
