"""DECOMPOSE-QSM: three-pool voxelwise separation of multi-echo GRE signal.

Signal model per voxel (chisep sign convention, chi_dia a magnitude)::

    S(TE) = C_para exp(-(R2*0 + a chi_para) TE) exp(+i k omega0 chi_para TE)
          + C_dia  exp(-(R2*0 + a chi_dia)  TE) exp(-i k omega0 chi_dia  TE)
          + C_0    exp(-R2*0 TE)

with omega0 = 2 pi CF 1e-6 (rad/s per ppm), a = dephasing_factor * omega0
(the static-dephasing constant of spheres, 323.5 1/s per ppm at 3 T) and
k = frequency_factor (2/3); both factors come from ``models/decompose.toml``.
C >= 0, R2*0 >= 0, 0 <= chi_para, chi_dia <= 0.5 ppm.

Data: the measured magnitude with its phase replaced by the phase implied by
the QSM value, ``k omega0 chi_QSM TE`` (a voxel holding one susceptible pool
of susceptibility chi then has exactly that pool's phase). Amplitudes are fitted
on data normalised by each voxel's largest echo magnitude and scaled back.

Fit: a coarse grid over (R2*0, chi_para, chi_dia) with the three amplitudes
solved linearly at every grid point (variable projection, vectorised) gives
the ``n_starts`` best starts; each is refined by the engine's bounded
Levenberg-Marquardt (:func:`chisep.fit.fit_voxelwise`), keeping the best.

The model has 6 real parameters against 2 x n_echoes real data points, but
the information is much smaller than that count suggests: the pools differ
only through slightly different decays and frequencies, so the problem is
poorly conditioned (and a pool with chi = 0 is indistinguishable from the
neutral pool). Uncertainty maps are therefore essential output.

References
----------
Chen J, Gong N-J, Chaim KT, Otaduy MCG, Liu C. Decompose quantitative
susceptibility mapping (QSM) to sub-voxel diamagnetic and paramagnetic
components based on gradient-echo MRI data. NeuroImage 2021;242:118477.
Yablonskiy DA, Haacke EM. Theory of NMR signal behavior in magnetically
inhomogeneous tissues: the static dephasing regime. MRM 1994;32:749-763.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from chisep import validate
from chisep.acquisition import Acquisition
from chisep.errors import InputError, ModelFileError
from chisep.fit import FitResult, VoxelModel, _effective_chunk, _pad_rows, fit_voxelwise
from chisep.physics import centre_frequency_hz
from chisep.separation.base import MODELS, SeparationFit, SeparationInputs, SeparationModel
from chisep.separation.constants import load_model_file, require_number

PARAM_NAMES = ("c_para", "c_dia", "c_0", "r2star0", "chi_para", "chi_dia")
CONSTANT_KEYS = ("dephasing_factor", "frequency_factor", "chi_para_max_ppm", "chi_dia_max_ppm",
                 "r2star0_max_per_s", "n_starts", "max_steps", "tol", "min_echoes", "max_abs_chi_ppm",
                 "max_component_std_ppm")


def _pools(p, aux):
    """Real and imaginary parts of the three-pool signal for params p (6,)."""
    te, omega, a = aux["te"], aux["omega"], aux["a"]
    c_para, c_dia, c_0, r0, x_para, x_dia = (p[i] for i in range(6))
    base = jnp.exp(-r0 * te)
    amp_p = c_para * jnp.exp(-a * x_para * te)
    amp_d = c_dia * jnp.exp(-a * x_dia * te)
    ph_p = omega * x_para * te
    ph_d = omega * x_dia * te
    re = base * (amp_p * jnp.cos(ph_p) + amp_d * jnp.cos(ph_d) + c_0)
    im = base * (amp_p * jnp.sin(ph_p) - amp_d * jnp.sin(ph_d))
    return re, im


def decompose_forward(p, aux):
    """Complex DECOMPOSE signal at the echo times ``aux["te"]`` (s) for p = PARAM_NAMES values.

    ``aux`` holds ``te`` (M,), ``omega`` = k omega0 (rad/s per ppm) and ``a``
    (1/s per ppm). Module-level so that every DecomposeModel shares one
    compiled solver per shape.
    """
    re, im = _pools(p, aux)
    return jax.lax.complex(re, im)


def decompose_jacobian(p, aux):
    """Analytic Jacobian (M, 6) of :func:`decompose_forward`, complex (shares its exponentials)."""
    te, omega, a = aux["te"], aux["omega"], aux["a"]
    c_para, c_dia, c_0, r0, x_para, x_dia = (p[i] for i in range(6))
    base = jnp.exp(-r0 * te)
    amp_p = jnp.exp(-a * x_para * te)
    amp_d = jnp.exp(-a * x_dia * te)
    ep = base * jax.lax.complex(amp_p * jnp.cos(omega * x_para * te), amp_p * jnp.sin(omega * x_para * te))
    ed = base * jax.lax.complex(amp_d * jnp.cos(omega * x_dia * te), -amp_d * jnp.sin(omega * x_dia * te))
    b0 = base.astype(ep.dtype)
    signal = c_para * ep + c_dia * ed + c_0 * b0
    return jnp.stack([
        ep,
        ed,
        b0,
        -te * signal,
        c_para * ep * jax.lax.complex(-a * te, omega * te),
        c_dia * ed * jax.lax.complex(-a * te, -omega * te),
    ], axis=-1)


def component_susceptibilities(p, aux):
    """PCS and DCS (ppm; DCS a magnitude) of one voxel's pool parameters p = PARAM_NAMES values.

    The outputs of DECOMPOSE-QSM are not the pool susceptibilities but the
    susceptibility each pool's sub-signal implies, with the other pools left
    undephased (Chen et al. 2021; SCIENCE.md, DECOMPOSE-QSM):

        S_p(t) = C_para exp(-a chi_para t + i k omega0 chi_para t) + C_dia + C_0
        S_d(t) = C_dia  exp(-a chi_dia t  - i k omega0 chi_dia t)  + C_para + C_0
        PCS = sum_n unwrap(arg S_p(TE_n)) / (k omega0 sum_n TE_n),   DCS = -(same for S_d)

    (the common decay exp(-R2*0 t) does not change the phase). A pool with
    C ~ 0 thus contributes ~0 whatever its fitted susceptibility, which is then
    undetermined; a voxel holding one pool gets that pool's susceptibility.

    Parameters
    ----------
    p : (6,) array
        c_para, c_dia, c_0, r2star0, chi_para, chi_dia of one voxel.
    aux : dict
        ``DecomposeModel.aux()``: echo times, pool frequency and dephasing factors.

    Returns
    -------
    (2,) array: PCS, DCS (ppm)
    """
    te, omega, a = aux["te"], aux["omega"], aux["a"]
    c_para, c_dia, c_0, _, x_para, x_dia = (p[i] for i in range(6))
    sub_p = c_para * jnp.exp(-a * x_para * te) * jax.lax.complex(jnp.cos(omega * x_para * te),
                                                                 jnp.sin(omega * x_para * te)) + (c_dia + c_0)
    sub_d = c_dia * jnp.exp(-a * x_dia * te) * jax.lax.complex(jnp.cos(omega * x_dia * te),
                                                               -jnp.sin(omega * x_dia * te)) + (c_para + c_0)
    norm = omega * jnp.sum(te)
    return jnp.stack([jnp.sum(jnp.unwrap(jnp.angle(sub_p))) / norm, -jnp.sum(jnp.unwrap(jnp.angle(sub_d))) / norm])


@jax.jit
def _components_with_errors(params, aux, sigma2):
    """PCS, DCS (N, 2) and their standard errors (N, 2): g^T sigma^2 (J^T J)^+ g per voxel.

    J is the real Jacobian of the model at the fit and g the gradient of
    (PCS, DCS), so the errors carry the strong correlations between pool
    amplitudes and susceptibilities that the per-parameter errors ignore. The
    pseudo-inverse (Jacobi-scaled, relative cut-off) keeps directions the data
    do not determine (an empty pool's susceptibility) out: PCS and DCS hardly
    depend on them.
    """

    def one(p, s2):
        value = component_susceptibilities(p, aux)
        g = jax.jacfwd(component_susceptibilities)(p, aux)           # (2, 6)
        jac = decompose_jacobian(p, aux)
        jr = jnp.concatenate([jnp.real(jac), jnp.imag(jac)], axis=0)  # (2M, 6)
        h = jr.T @ jr
        scale = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(h), jnp.finfo(h.dtype).tiny))
        cov = jnp.linalg.pinv(h * scale[:, None] * scale[None, :], rtol=1e-6) * scale[:, None] * scale[None, :]
        var = s2 * jnp.einsum("ij,jk,ik->i", g, cov, g)
        return value, jnp.sqrt(jnp.maximum(var, 0.0))

    return jax.vmap(one)(params, sigma2)


def bound_by_qsm(result: SeparationFit, chi_ppm, mask) -> SeparationFit:
    """chi_para >= max(chi, 0) and chi_dia >= max(-chi, 0): the published PCS/DCS made consistent with QSM.

    Non-negative sources with chi = chi_para - chi_dia cannot have chi_para below chi nor
    chi_dia below -chi. PCS and DCS come from each pool's phase and do not obey that: a
    -3 ppm calcification, beyond the pools' 0.5 ppm bound, gets a DCS of a few tenths of a
    ppm. This lifts each component to its lower bound where it falls below (chisep's
    addition, not in Chen et al.); the published PCS and DCS stay in ``extra`` as ``pcs``
    and ``dcs``, and ``extra["bound_active"]`` (0 none, 1 chi_para, 2 chi_dia, 3 both lifted)
    says where it acted. On the realistic heads it changes chi_dia's NRMSE from worse
    than the thresholded QSM to better (benchmarks/RESULTS.md).

    Parameters
    ----------
    result : SeparationFit
        With PCS / DCS as chi_para / chi_dia.
    chi_ppm : array, ppm
        The QSM map the fit used.
    mask : bool array

    Returns
    -------
    SeparationFit
        chi_para, chi_dia lifted; ``extra`` gains ``pcs``, ``dcs`` and ``bound_active``.
    """
    chi = np.where(mask, np.asarray(chi_ppm, np.float32), 0.0)
    para = np.maximum(result.chi_para, np.maximum(chi, 0.0)).astype(np.float32)
    dia = np.maximum(result.chi_dia, np.maximum(-chi, 0.0)).astype(np.float32)
    extra = dict(result.extra, pcs=result.chi_para, dcs=result.chi_dia,
                 bound_active=((para > result.chi_para).astype(np.uint8) + 2 * (dia > result.chi_dia)).astype(np.uint8))
    info = dict(result.info, outputs="chi_para = max(PCS, chi, 0), chi_dia = max(DCS, -chi, 0): the component "
                "susceptibilities of Chen et al. 2021 lifted to the bounds non-negative sources set (pcs, dcs: "
                "as published)")
    return dataclasses.replace(result, chi_para=para, chi_dia=dia, extra=extra, info=info)


@MODELS.register("decompose")
class DecomposeModel(SeparationModel):
    """DECOMPOSE-QSM (Chen et al. 2021): three pools fitted to the multi-echo ``magnitude`` and the QSM ``chi``.

    Parameters
    ----------
    acquisition : Acquisition
        Field strength and echo times (s), at least ``min_echoes`` (4) of them.
    constants : mapping, optional
        Overrides of the model-file keys (``dephasing_factor``,
        ``frequency_factor``, ``chi_para_max_ppm``, ``chi_dia_max_ppm``,
        ``r2star0_max_per_s``, ``n_starts``, ``max_steps``, ``tol``, ``min_echoes``,
        ``max_abs_chi_ppm``).
    constants_file : path, optional
        A TOML file with the layout of ``models/decompose.toml``.
    n_starts : int, optional
        Number of best grid points refined per voxel (default from the model file).
    optimizer : {"gauss-newton", "lbfgs", "adam"}
    chunk_size : int
        Voxels per compiled batch.

    Raises
    ------
    InputError
        Too few echoes, echo times not in s or not increasing.
    ModelFileError
        The model file lacks a constant (the message names it).
    """

    name = "decompose"
    requires = ("magnitude", "chi")

    def __init__(self, acquisition: Acquisition, *, constants: Mapping[str, float] | None = None,
                 constants_file: str | Path | None = None, n_starts: int | None = None,
                 optimizer: str = "gauss-newton", chunk_size: int = 65536):
        super().__init__(acquisition)
        field_strength = acquisition.field_strength
        self.constants, self.grid, self.source = _load_constants(constants_file)
        for key, value in dict(constants or {}).items():
            if key not in CONSTANT_KEYS:
                raise InputError(f"constants: unknown key {key!r}; valid keys: {', '.join(CONSTANT_KEYS)}")
            self.constants[key] = float(value)
        te = np.asarray(acquisition.echo_times, np.float64)
        min_echoes = int(self.constants["min_echoes"])
        if te.size < min_echoes:
            raise InputError(
                f"echo_times: DECOMPOSE-QSM needs at least {min_echoes} echoes (6 real parameters per voxel), "
                f"got {te.size}; use a multi-echo acquisition or another separation model (linear, chi-separation)")
        self.echo_times = te
        self.n_starts = validate.check_count(self.constants["n_starts"] if n_starts is None else n_starts,
                                             "n_starts")
        self.optimizer, self.chunk_size = optimizer, validate.check_count(chunk_size, "chunk_size")
        omega0 = 2.0 * np.pi * centre_frequency_hz(field_strength) * 1e-6  # rad/s per ppm
        self.omega0 = omega0
        self.a = self.constants["dephasing_factor"] * omega0  # 1/s per ppm
        self.omega = self.constants["frequency_factor"] * omega0  # rad/s per ppm, pool frequency
        c = self.constants
        self.voxel_model = VoxelModel(
            decompose_forward, PARAM_NAMES,
            lower=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
            upper=(np.inf, np.inf, np.inf, c["r2star0_max_per_s"], c["chi_para_max_ppm"], c["chi_dia_max_ppm"]),
            default_init=(0.3, 0.3, 0.4, 15.0, 0.05, 0.05),
            jacobian=decompose_jacobian,
        )

    # ------------------------------------------------------------------
    def aux(self, dtype=np.float32) -> dict:
        """Arrays passed to :func:`decompose_forward`."""
        return {"te": jnp.asarray(self.echo_times, dtype), "omega": jnp.asarray(self.omega, dtype),
                "a": jnp.asarray(self.a, dtype)}

    def forward(self, c_para, c_dia, c_0, r2star0, chi_para, chi_dia) -> np.ndarray:
        """Complex signal (..., n_echoes) for parameter maps (any common shape); NumPy, float64."""
        p = np.broadcast_arrays(*[np.asarray(v, np.float64) for v in (c_para, c_dia, c_0, r2star0, chi_para, chi_dia)])
        te = self.echo_times
        cp, cd, c0, r0, xp, xd = (v[..., None] for v in p)
        return np.exp(-r0 * te) * (cp * np.exp(-self.a * xp * te + 1j * self.omega * xp * te)
                                   + cd * np.exp(-self.a * xd * te - 1j * self.omega * xd * te) + c0)

    def predict(self, fit) -> dict[str, np.ndarray]:
        """Multi-echo magnitude (x, y, z, echo) of the fitted pools and the chi they imply, PCS - DCS (ppm)."""
        e = fit.extra
        signal = self.forward(e["c_para"], e["c_dia"], e["c_0"], e["r2star0"], e["pool_chi_para"],
                              e["pool_chi_dia"])
        return {"magnitude": np.abs(signal).astype(np.float32), "chi": (e["pcs"] - e["dcs"]).astype(np.float32)}

    def data_from_qsm(self, magnitude, chi_ppm) -> np.ndarray:
        """Complex data: magnitude with the phase k omega0 chi TE implied by the QSM map."""
        phase = self.omega * np.asarray(chi_ppm, np.float64)[..., None] * self.echo_times
        return np.asarray(magnitude, np.float64) * np.exp(1j * phase)

    def _fit(self, inputs: SeparationInputs, *, progress=None) -> SeparationFit:
        """Returns chi_para = max(PCS, chi, 0), chi_dia = max(DCS, -chi, 0) (ppm, magnitude;
        :func:`bound_by_qsm`), the standard errors of PCS and DCS, residual (RMS complex residual,
        magnitude units) and extra maps pcs, dcs (as published), bound_active, c_para, c_dia, c_0
        (magnitude units), r2star0 (1/s), their ``*_std``, ``converged`` and ``steps``.
        """
        magnitude, chi, mask = inputs.magnitude, inputs.chi, inputs.mask
        self._check_shapes(magnitude, chi.shape)
        validate.check_chi_ppm(chi, mask, self.constants["max_abs_chi_ppm"])
        result = self.fit_signal(self.data_from_qsm(magnitude, chi), mask, progress=progress)
        result.info["data"] = "magnitude with QSM-implied phase k*omega0*chi*TE"
        return bound_by_qsm(result, chi, mask)

    def fit_signal(self, signal, mask=None, *, progress: Callable[[int, int], None] | None = None,
                   init=None) -> SeparationFit:
        """Fit the pools to complex multi-echo data (..., n_echoes) directly: the published PCS/DCS, no QSM bound."""
        signal = np.asarray(signal)
        self._check_shapes(signal, signal.shape[:-1])
        mask = validate.as_mask(mask, signal.shape[:-1], default_all=True, allow_empty=True)
        validate.check_finite(signal, "signal", mask)
        n_starts, optimizer, chunk_size = self.n_starts, self.optimizer, self.chunk_size
        use64 = bool(jax.config.jax_enable_x64) and signal.dtype == np.complex128
        real_dtype = np.float64 if use64 else np.float32
        cplx_dtype = np.complex128 if use64 else np.complex64

        scale = np.max(np.abs(signal), axis=-1)
        scale = np.where(mask & (scale > 0), scale, 1.0)
        data = (signal / scale[..., None]).astype(cplx_dtype)
        aux = self.aux(real_dtype)
        if init is None:
            init = self._grid_starts(data, mask, n_starts, real_dtype)
        fit = fit_voxelwise(self.voxel_model, data, aux=aux, mask=mask, init=init, optimizer=optimizer,
                            max_steps=int(self.constants["max_steps"]), tol=self.constants["tol"],
                            chunk_size=chunk_size, progress=progress)
        return self._to_result(fit, scale, mask, n_starts)

    # ------------------------------------------------------------------
    def _check_shapes(self, arr, spatial):
        m = self.echo_times.size
        if arr.ndim < 2 or arr.shape[-1] != m:
            raise InputError(f"multi-echo data must have shape (..., {m}) (one volume per echo time), got {arr.shape}; "
                             "check that the number of echo times matches the data")
        if arr.shape[:-1] != tuple(spatial):
            raise InputError(f"multi-echo data spatial shape {arr.shape[:-1]} does not match the chi map shape {tuple(spatial)}")

    def _grid_candidates(self) -> np.ndarray:
        g = self.grid
        r0, xp, xd = np.meshgrid(g["r2star0_per_s"], g["chi_para_ppm"], g["chi_dia_ppm"], indexing="ij")
        cands = np.stack([r0.ravel(), xp.ravel(), xd.ravel()], axis=-1)
        hi = np.array([self.constants["r2star0_max_per_s"], self.constants["chi_para_max_ppm"],
                       self.constants["chi_dia_max_ppm"]])
        return np.clip(cands, 0.0, hi)

    def _grid_starts(self, data, mask, n_starts, real_dtype, block: int = 65536) -> np.ndarray:
        """Best n_starts grid points per voxel (amplitudes by linear least squares): (S,) + spatial + (6,)."""
        cands = self._grid_candidates()
        values = data[mask]
        n = values.shape[0]
        out = np.broadcast_to(np.asarray(self.voxel_model.start(), real_dtype),
                              (n_starts,) + data.shape[:-1] + (6,)).copy()
        if n == 0:
            return out
        n_starts = min(n_starts, cands.shape[0])
        best = []
        aux = self.aux(real_dtype)
        cj = jnp.asarray(cands, real_dtype)
        size = min(block, 1 << max(6, int(n - 1).bit_length()))
        for lo in range(0, n, size):
            chunk = values[lo:lo + size]
            pad = np.pad(chunk, ((0, size - chunk.shape[0]), (0, 0)), mode="edge")
            idx, amps = _varpro_grid(jnp.asarray(pad), cj, aux, n_starts)
            idx, amps = np.asarray(idx)[: chunk.shape[0]], np.asarray(amps)[: chunk.shape[0]]
            best.append(np.concatenate([amps, cands[idx].astype(real_dtype)], axis=-1))  # (n, S, 6)
        best = np.concatenate(best)
        for s in range(n_starts):
            out[s][mask] = best[:, s]
        return out

    def components(self, params: Mapping[str, np.ndarray], mask, *, rms_residual=None,
                   chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """PCS and DCS maps (..., 2) and their standard errors from fitted pool parameters.

        ``params``: PARAM_NAMES -> maps with amplitudes on the scale the fit saw
        (the engine's normalised data); ``rms_residual``: RMS complex residual
        per voxel on that scale (noise per real channel from RSS / (2M - 6)); no
        errors (zeros) without it. See :func:`component_susceptibilities`.
        """
        mask = np.asarray(mask, bool)
        theta = np.stack([np.asarray(params[n], np.float64)[mask] for n in PARAM_NAMES], axis=-1)
        m = self.echo_times.size
        s2 = (np.zeros(theta.shape[0]) if rms_residual is None
              else np.asarray(rms_residual, np.float64)[mask] ** 2 * m / (2 * m - 6))
        dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
        aux = self.aux(dtype)
        values, errors = np.zeros((theta.shape[0], 2)), np.zeros((theta.shape[0], 2))
        chunk = _effective_chunk(theta.shape[0], chunk_size)  # the engine's chunks: few compiled shapes
        for lo in range(0, theta.shape[0], chunk):
            part = slice(lo, lo + chunk)
            n = theta[part].shape[0]
            v, e = _components_with_errors(jnp.asarray(_pad_rows(theta[part], chunk), dtype), aux,
                                           jnp.asarray(_pad_rows(s2[part], chunk), dtype))
            values[part], errors[part] = np.asarray(v)[:n], np.asarray(e)[:n]
        out_v = np.zeros(mask.shape + (2,), np.float32)
        out_e = np.zeros(mask.shape + (2,), np.float32)
        out_v[mask], out_e[mask] = values, errors
        return out_v, out_e

    def _to_result(self, fit: FitResult, scale, mask, n_starts) -> SeparationFit:
        p, se = fit.params, fit.std_errors
        extra = {}
        for name in ("c_para", "c_dia", "c_0"):
            extra[name] = (p[name] * scale * mask).astype(np.float32)
            extra[name + "_std"] = (se[name] * scale * mask).astype(np.float32)
        extra["r2star0"] = p["r2star0"].astype(np.float32)
        extra["r2star0_std"] = se["r2star0"].astype(np.float32)
        # the pool susceptibilities themselves: undetermined where their pool is empty
        for name in ("chi_para", "chi_dia"):
            extra[f"pool_{name}"] = (p[name] * mask).astype(np.float32)
            extra[f"pool_{name}_std"] = (se[name] * mask).astype(np.float32)
        extra["converged"] = fit.converged.astype(np.uint8)
        extra["steps"] = fit.steps.astype(np.int32)
        value, error = self.components(p, mask, rms_residual=fit.residual)
        # what the quality map flags: PCS/DCS the data do not determine. Not the solver's own test,
        # which fails in most voxels along directions PCS/DCS do not depend on (an empty pool's chi)
        limit = self.constants["max_component_std_ppm"]
        extra["separable"] = (mask & np.all(np.isfinite(error) & (error <= limit), axis=-1)).astype(np.uint8)
        return SeparationFit(
            chi_para=np.maximum(value[..., 0], 0.0) * mask,
            chi_dia=np.maximum(value[..., 1], 0.0) * mask,
            chi_para_std=error[..., 0],
            chi_dia_std=error[..., 1],
            residual=(fit.residual * scale * mask).astype(np.float32),
            extra=extra,
            info={
                "model": "decompose",
                "field_strength_t": self.field_strength,
                "echo_times_s": self.echo_times.tolist(),
                "constants": dict(self.constants),
                "a_per_s_per_ppm": self.a,
                "omega_pool_rad_per_s_per_ppm": self.omega,
                "source": self.source,
                "n_starts": n_starts,
                "optimizer": fit.info["optimizer"],
                "fraction_converged": float(fit.converged[mask].mean()) if mask.any() else 1.0,
                "units": {"chi_para": "ppm (PCS: paramagnetic component susceptibility)",
                          "chi_dia": "ppm (DCS: diamagnetic component susceptibility, magnitude)", "r2star0": "1/s",
                          "pool_chi_para": "ppm (fitted pool susceptibility; undetermined where c_para ~ 0)",
                          "c_para": "magnitude units", "residual": "magnitude units (RMS over echoes)"},
                "outputs": "chi_para/chi_dia are PCS/DCS, the susceptibility each pool's sub-signal implies "
                           "(Chen et al. 2021), not the fitted pool susceptibilities (pool_chi_para/pool_chi_dia)",
                "std_errors": "Gauss-Newton sigma^2 (J^T J)^-1, sigma^2 = RSS / (2 n_echoes - 6), propagated to "
                              "PCS/DCS with their gradients; inf = not identifiable",
            },
        )


@partial(jax.jit, static_argnames=("n_best",))
def _varpro_grid(data, cands, aux, n_best):
    """For every voxel and grid point (R2*0, chi_para, chi_dia): amplitudes by least squares, clipped at 0.

    data (N, M) complex, cands (G, 3). Returns the indices (N, n_best) of the
    best grid points and their amplitudes (N, n_best, 3).
    """
    te, omega, a = aux["te"], aux["omega"], aux["a"]
    r0, xp, xd = cands[:, 0:1], cands[:, 1:2], cands[:, 2:3]
    base = jnp.exp(-r0 * te)
    bp = base * jnp.exp(-a * xp * te) * jnp.exp(1j * omega * xp * te)
    bd = base * jnp.exp(-a * xd * te) * jnp.exp(-1j * omega * xd * te)
    b0 = base + 0j
    basis = jnp.stack([bp, bd, b0], axis=-1)  # (G, M, 3) complex
    br = jnp.concatenate([basis.real, basis.imag], axis=1)  # (G, 2M, 3) real
    gram = jnp.einsum("gmi,gmj->gij", br, br) + 1e-6 * jnp.eye(3, dtype=br.dtype)
    pinv = jnp.linalg.solve(gram, jnp.swapaxes(br, 1, 2))  # (G, 3, 2M), once per grid point
    y = jnp.concatenate([data.real, data.imag], axis=-1)  # (N, 2M)
    amps = jnp.maximum(jnp.einsum("gim,nm->ngi", pinv, y), 0.0)  # (N, G, 3)
    pred = jnp.einsum("gmi,ngi->ngm", br, amps)
    cost = jnp.sum((pred - y[:, None, :]) ** 2, axis=-1)  # (N, G)
    _, idx = jax.lax.top_k(-cost, n_best)
    return idx, jnp.take_along_axis(amps, idx[..., None], axis=1)


def _load_constants(path) -> tuple[dict, dict, str]:
    table = load_model_file("decompose", path)
    source = table["_source"]
    out = {}
    for section, keys in (("constants", ("dephasing_factor", "frequency_factor")),
                          ("bounds", ("chi_para_max_ppm", "chi_dia_max_ppm", "r2star0_max_per_s")),
                          ("fit", ("n_starts", "max_steps", "tol", "min_echoes", "max_abs_chi_ppm",
                                   "max_component_std_ppm"))):
        sub = table.get(section)
        if not isinstance(sub, dict):
            raise ModelFileError(f"{source}: table [{section}] is missing; see models/decompose.toml")
        for key in keys:
            out[key] = require_number(sub, key, source=f"{source} [{section}]", positive=True)
    grid_t = table.get("grid")
    if not isinstance(grid_t, dict):
        raise ModelFileError(f"{source}: table [grid] is missing; see models/decompose.toml")
    grid = {}
    for key in ("chi_para_ppm", "chi_dia_ppm", "r2star0_per_s"):
        values = grid_t.get(key)
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ModelFileError(f"{source} [grid]: {key} must be a non-empty list of numbers, e.g. `{key} = [0.0, 0.1]`")
        grid[key] = np.asarray(values, dtype=np.float64)
    return out, grid, source
