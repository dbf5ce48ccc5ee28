"""Linear R2*/chi source separation, solved per voxel in closed form.

Model (per voxel, c_para, c_dia >= 0 in ppm)::

    R2* = R2*_0 + a_para * c_para + a_dia * c_dia        (1/s)
    chi = chi_0 + b_para * c_para - b_dia * c_dia        (ppm)

With a = Dr and b = 1 (the defaults) this is chi-separation without spatial
coupling, driven by R2* instead of R2'. The 2 x 2 system is never singular
for positive coefficients (det = -(a_para b_dia + a_dia b_para)).

Non-negativity is exact: the weighted least-squares problem in two variables
under c >= 0 is solved by enumerating its active sets (both free, only c_para,
only c_dia, none), keeping the feasible candidate with the lowest weighted cost
(the KKT solution of this convex problem). The weights are the inverse noise
variances of R2* and chi, so clipping one component solves the other from
both equations in consistent units.

References
----------
Schweser F, et al. SEMI-TWInS. Proc ISMRM 2011.
Stueber C, et al. Myelin and iron concentration in the human brain: a
quantitative study of MRI contrast. NeuroImage 2014;93:95-106.
Shin H-G, et al. chi-separation. NeuroImage 2021;240:118371.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from chisep import validate
from chisep.acquisition import Acquisition
from chisep.errors import InputError, ModelFileError
from chisep.separation.base import MODELS, SeparationFit, SeparationInputs, SeparationModel
from chisep.separation.chi_separation import prepare_r2prime
from chisep.separation.constants import load_model_file, require_number, scale_with_field

COEFFICIENT_KEYS = ("a_para", "a_dia", "b_para", "b_dia", "r2star0", "chi0")


def _load_coefficients(field_strength: float, path) -> tuple[dict, dict, dict, dict, str]:
    table = load_model_file("linear", path)
    source = table["_source"]
    ref = require_number(table, "reference_field_strength_t", source=source, positive=True)
    coef_t = table.get("coefficients")
    if not isinstance(coef_t, dict):
        raise ModelFileError(f"{source}: table [coefficients] is missing; see models/linear_r2star_chi.toml")
    src = f"{source} [coefficients]"
    coefficients = {
        "a_para": scale_with_field(require_number(coef_t, "a_para_hz_per_ppm", source=src, positive=True), ref, field_strength),
        "a_dia": scale_with_field(require_number(coef_t, "a_dia_hz_per_ppm", source=src, positive=True), ref, field_strength),
        "b_para": require_number(coef_t, "b_para", source=src, positive=True),
        "b_dia": require_number(coef_t, "b_dia", source=src, positive=True),
        "r2star0": require_number(coef_t, "r2star0_per_s", source=src, minimum=0.0),
        "chi0": require_number(coef_t, "chi0_ppm", source=src),
    }
    noise_t = table.get("noise", {})
    noise = {
        "r2star": require_number(noise_t, "r2star_sigma_per_s", source=f"{source} [noise]", positive=True),
        "chi": require_number(noise_t, "chi_sigma_ppm", source=f"{source} [noise]", positive=True),
    }
    r2p_t, src = table.get("r2prime"), f"{source} [r2prime]"
    if r2p_t is None:  # a calibration file holds coefficients: how R2' is taken comes from the packaged file
        packaged = load_model_file("linear", None)
        r2p_t, src = packaged.get("r2prime", {}), f"{packaged['_source']} [r2prime]"
    r2prime = dict(
        relative_uncertainty=require_number(r2p_t, "relative_uncertainty", source=src, minimum=0.0),
        rule_uncertainty=require_number(r2p_t, "rule_uncertainty_per_s", source=src, minimum=0.0),
        smoothing_voxels=require_number(r2p_t, "smoothing_voxels", source=src, minimum=0.0),
        smoothing_range=require_number(r2p_t, "smoothing_range", source=src, positive=True),
    )
    checks_t = table.get("checks", {})
    checks = {
        "max_abs_chi_ppm": require_number(checks_t, "max_abs_chi_ppm", source=f"{source} [checks]", positive=True),
        "min_median_r2star_per_s": require_number(checks_t, "min_median_r2star_per_s", source=f"{source} [checks]",
                                                  minimum=0.0),
    }
    return coefficients, noise, r2prime, checks, source


@MODELS.register("linear")
class LinearModel(SeparationModel):
    """Linear R2*/chi separation, per voxel in closed form (uses ``r2star``, ``chi`` and ``r2`` of the inputs).

    With a measured R2 (or the R2*-only rule of :class:`SeparationInputs`),
    R2* - R2 = R2' drives the relaxometric equation in place of the nominal
    R2*_0.

    Parameters
    ----------
    acquisition : Acquisition
        Field strength (relaxometric coefficients from the model file are
        scaled linearly from its reference field).
    coefficients : mapping, optional
        Overrides of ``a_para``, ``a_dia`` (Hz/ppm at this field, no scaling),
        ``b_para``, ``b_dia`` (dimensionless), ``r2star0`` (1/s), ``chi0`` (ppm).
    coefficients_file : path, optional
        A TOML file with the keys of ``models/linear_r2star_chi.toml``
        (calibrated coefficients); default: the packaged file.
    r2star_sigma, chi_sigma : float or (x, y, z) array, optional
        Noise standard deviations (1/s, ppm) used as weights and for the
        uncertainty maps; default from the model file's ``[noise]``. ``r2star_sigma`` (the noise of
        R2* - R2) also sets the R2' smoothing's range; by default that comes from the map's high-pass.
    r2prime : mapping, optional
        Overrides of the model file's ``[r2prime]`` table: ``relative_uncertainty``,
        ``rule_uncertainty`` (1/s), ``smoothing_voxels`` (0: no smoothing), ``smoothing_range``.
        R2' = R2* - R2 is averaged over its neighbours that agree with it within its expected error
        before the voxelwise solve (:func:`chisep.separation.chi_separation.prepare_r2prime`, as
        chi-separation does); data that are the model's exactly want ``relative_uncertainty=0,
        smoothing_voxels=0``.

    Examples
    --------
    >>> import numpy as np
    >>> from chisep.acquisition import Acquisition
    >>> from chisep.separation.base import SeparationInputs
    >>> model = LinearModel(Acquisition(echo_times=(), field_strength=3.0))
    >>> r2s, chi = model.forward(np.full((1, 1, 1), 0.1), np.full((1, 1, 1), 0.02), r2=np.full((1, 1, 1), 12.0))
    >>> fit = model.fit(SeparationInputs(mask=np.ones((1, 1, 1), bool), r2star=r2s, chi=chi, r2=np.full((1, 1, 1), 12.0)))
    >>> bool(np.allclose([fit.chi_para[0, 0, 0], fit.chi_dia[0, 0, 0]], [0.1, 0.02], atol=1e-5))
    True
    """

    name = "linear"
    requires = ("r2star", "chi")

    def __init__(self, acquisition: Acquisition, *, coefficients: Mapping[str, float] | None = None,
                 coefficients_file: str | Path | None = None, r2star_sigma=None, chi_sigma=None,
                 r2prime: Mapping[str, float] | None = None):
        super().__init__(acquisition)
        field_strength = acquisition.field_strength
        coef, noise, loaded_r2prime, checks, source = _load_coefficients(field_strength, coefficients_file)
        for key, value in dict(coefficients or {}).items():
            if key not in COEFFICIENT_KEYS:
                raise InputError(f"coefficients: unknown key {key!r}; valid keys: {', '.join(COEFFICIENT_KEYS)}")
            value = float(value)
            if key in ("a_para", "a_dia", "b_para", "b_dia") and not value > 0:
                raise InputError(f"coefficients: {key} must be > 0 (the 2x2 system needs positive coefficients), got {value}")
            coef[key] = value
        self.coefficients = coef
        self.noise = noise
        for key, value in dict(r2prime or {}).items():
            if key not in loaded_r2prime:
                raise InputError(f"r2prime: unknown key {key!r}; valid keys: {', '.join(loaded_r2prime)}")
            value = float(value)
            if not (np.isfinite(value) and (value > 0 if key == "smoothing_range" else value >= 0)):
                raise InputError(f"r2prime: {key} must be a finite number {'> 0' if key == 'smoothing_range' else '>= 0'}, "
                                 f"got {value}")
            loaded_r2prime[key] = value
        self.r2prime = loaded_r2prime  # how R2' = R2* - R2 is taken ([r2prime] of the model file)
        self.checks = checks
        self.source = source
        self.r2star_sigma, self.chi_sigma = r2star_sigma, chi_sigma

    # ------------------------------------------------------------------
    def forward(self, chi_para, chi_dia, *, r2=None):
        """The model's equations: (R2* in 1/s, chi in ppm) from the two components (ppm)."""
        c = self.coefficients
        chi_para, chi_dia = np.asarray(chi_para, float), np.asarray(chi_dia, float)
        r2star0 = c["r2star0"] if r2 is None else np.asarray(r2, float)
        r2star = r2star0 + c["a_para"] * chi_para + c["a_dia"] * chi_dia
        chi = c["chi0"] + c["b_para"] * chi_para - c["b_dia"] * chi_dia
        return r2star.astype(np.float32), chi.astype(np.float32)

    def predict(self, fit) -> dict[str, np.ndarray]:
        """R2* (1/s) and chi (ppm) implied by ``fit``'s components (0 outside the mask)."""
        mask = fit.inputs.mask if fit.inputs is not None else np.ones(np.shape(fit.chi_para), bool)
        r2 = fit.inputs.r2 if fit.inputs is not None else None
        r2star, chi = self.forward(fit.chi_para, fit.chi_dia, r2=r2)
        return {"r2star": np.where(mask, r2star, 0.0).astype(np.float32),
                "chi": np.where(mask, chi, 0.0).astype(np.float32)}

    def _fit(self, inputs: SeparationInputs, *, progress=None) -> SeparationFit:
        """Returns chi_para, chi_dia (ppm, >= 0), chi_para_std / chi_dia_std (ppm, first-order
        propagation of the two noise levels through the unconstrained 2 x 2 inverse), residual
        (normalised weighted residual sqrt(r_R2*^2/s_R2*^2 + r_chi^2/s_chi^2), noise units; 0 where
        both components are positive), extra maps ``r2star_fit`` and ``chi_fit``, info with
        coefficients and sources. Refuses chi that looks like Hz or ppb, R2* that looks like
        1/ms, R2 above R2* in most voxels.
        """
        r2star = inputs.r2star.astype(np.float64)
        chi = inputs.chi.astype(np.float64)
        mask = inputs.mask
        shape = mask.shape
        r2_arr = None if inputs.r2 is None else inputs.r2.astype(np.float64)
        self._check_inputs(r2star, chi, r2_arr, mask)
        r2star_sigma, chi_sigma = self.r2star_sigma, self.chi_sigma

        c = self.coefficients
        s1 = self._sigma(r2star_sigma, self.noise["r2star"], shape, mask, "r2star_sigma")
        s2 = self._sigma(chi_sigma, self.noise["chi"], shape, mask, "chi_sigma")
        r2star0 = c["r2star0"] if r2_arr is None else r2_arr
        # R2' = R2* - R2 taken as chi-separation takes it: averaged where neighbours agree within its
        # expected error (the 2 x 2 solve is exact where both components are positive, so R2''s noise
        # went straight into both), and a_para c_para + a_dia c_dia good to a share of it
        rp = self.r2prime
        _, r2prime = prepare_r2prime(np.where(mask, r2star - r2star0, 0.0), mask, noise=r2star_sigma,
                                     from_rule=inputs.r2_from_rule, unknown=inputs.r2prime_unknown,
                                     rule_uncertainty=rp["rule_uncertainty"],
                                     relative_uncertainty=rp["relative_uncertainty"],
                                     smoothing_voxels=rp["smoothing_voxels"], smoothing_range=rp["smoothing_range"])
        y1 = r2prime[mask].astype(np.float64)
        s1 = np.hypot(s1, rp["relative_uncertainty"] * np.abs(y1))
        y2 = chi[mask] - c["chi0"]
        c_para, c_dia, resid = _nnls_2x2(y1, y2, c["a_para"], c["a_dia"], c["b_para"], c["b_dia"], s1, s2)
        if inputs.r2prime_unknown is not None:
            # no usable R2* (a dark source's signal is gone by the first echo): chi alone, whose
            # sign is all it says about the split
            unknown = inputs.r2prime_unknown[mask]
            c_para = np.where(unknown, np.maximum(y2, 0.0) / c["b_para"], c_para)
            c_dia = np.where(unknown, np.maximum(-y2, 0.0) / c["b_dia"], c_dia)
            resid = np.where(unknown, 0.0, resid)

        # first-order uncertainty of the unconstrained inverse A^-1 diag(s1^2, s2^2) A^-T
        det = c["a_para"] * c["b_dia"] + c["a_dia"] * c["b_para"]
        std_para = np.sqrt((c["b_dia"] * s1) ** 2 + (c["a_dia"] * s2) ** 2) / det
        std_dia = np.sqrt((c["b_para"] * s1) ** 2 + (c["a_para"] * s2) ** 2) / det

        def to_map(values):
            out = np.zeros(shape, np.float32)
            out[mask] = values
            return out

        chi_para_m, chi_dia_m = to_map(c_para), to_map(c_dia)
        r2s_fit, chi_fit = self.forward(chi_para_m, chi_dia_m, r2=r2_arr)
        r2s_fit[~mask] = 0
        chi_fit[~mask] = 0
        return SeparationFit(
            chi_para=chi_para_m,
            chi_dia=chi_dia_m,
            chi_para_std=to_map(np.broadcast_to(std_para, c_para.shape)),
            chi_dia_std=to_map(np.broadcast_to(std_dia, c_dia.shape)),
            residual=to_map(resid),
            extra={"r2star_fit": r2s_fit, "chi_fit": chi_fit},
            info={
                "model": self.name,
                "field_strength_t": self.field_strength,
                "coefficients": dict(c),
                "coefficient_units": {"a_para": "Hz/ppm", "a_dia": "Hz/ppm", "b_para": "1", "b_dia": "1",
                                      "r2star0": "1/s", "chi0": "ppm"},
                "r2star0": "r2 map" if r2_arr is not None else f"nominal {c['r2star0']} 1/s",
                "noise": {"r2star_sigma_per_s": r2star_sigma if np.isscalar(r2star_sigma) else
                          ("map" if r2star_sigma is not None else self.noise["r2star"]),
                          "chi_sigma_ppm": chi_sigma if np.isscalar(chi_sigma) else
                          ("map" if chi_sigma is not None else self.noise["chi"])},
                "r2prime": dict(self.r2prime),
                "source": self.source,
                "units": {"chi_para": "ppm", "chi_dia": "ppm (magnitude, chi_total = chi_para - chi_dia)",
                          "residual": "noise standard deviations (weighted residual norm)"},
                "n_clipped": int(np.sum((c_para == 0) | (c_dia == 0))),
            },
        )

    # ------------------------------------------------------------------
    def _check_inputs(self, r2star, chi, r2, mask):
        if not mask.any():
            return
        validate.check_chi_ppm(chi, mask, self.checks["max_abs_chi_ppm"])
        med = float(np.median(r2star[mask]))
        if med < self.checks["min_median_r2star_per_s"]:
            raise InputError(
                f"r2star: median in the mask is {med:.3g} 1/s, expected tens of 1/s; the map looks like 1/ms "
                "(multiply by 1000) or like T2* (take the reciprocal)")
        if r2 is not None:
            frac = float(np.mean(r2[mask] > r2star[mask]))
            if frac > 0.5:
                raise InputError(
                    f"r2: R2 exceeds R2* in {100 * frac:.0f}% of the masked voxels, but R2* = R2 + R2' >= R2; "
                    "check that the r2 and r2star inputs are not swapped and are both in 1/s")

    @staticmethod
    def _sigma(value, default, shape, mask, name):
        if value is None:
            return np.float64(default)
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim:
            if arr.shape != shape:
                raise InputError(f"{name} must be a number or a map of shape {shape}, got shape {arr.shape}")
            arr = arr[mask]
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise InputError(f"{name} must be finite and > 0")
        return arr


def _nnls_2x2(y1, y2, a_p, a_d, b_p, b_d, s1, s2):
    """Weighted NNLS of [[a_p, a_d], [b_p, -b_d]] c = [y1, y2], c >= 0, vectorised over voxels.

    Returns c_para, c_dia and the weighted residual norm of the chosen solution.
    """
    w1, w2 = 1.0 / s1**2, 1.0 / s2**2
    det = a_p * b_d + a_d * b_p
    # active set {}: exact solution
    cand = []
    p_free = (b_d * y1 + a_d * y2) / det
    d_free = (b_p * y1 - a_p * y2) / det
    cand.append((p_free, d_free))
    # only c_para (c_dia = 0): weighted LS on both equations
    p_only = np.maximum((w1 * a_p * y1 + w2 * b_p * y2) / (w1 * a_p**2 + w2 * b_p**2), 0.0)
    cand.append((p_only, np.zeros_like(p_only)))
    # only c_dia (c_para = 0)
    d_only = np.maximum((w1 * a_d * y1 - w2 * b_d * y2) / (w1 * a_d**2 + w2 * b_d**2), 0.0)
    cand.append((np.zeros_like(d_only), d_only))
    costs = []
    for cp, cd in cand:
        r1 = y1 - a_p * cp - a_d * cd
        r2 = y2 - b_p * cp + b_d * cd
        cost = w1 * r1**2 + w2 * r2**2
        costs.append(np.where((cp >= 0) & (cd >= 0), cost, np.inf))
    costs = np.stack(np.broadcast_arrays(*costs))
    best = np.argmin(costs, axis=0)
    cp = np.choose(best, [np.broadcast_to(c[0], best.shape) for c in cand])
    cd = np.choose(best, [np.broadcast_to(c[1], best.shape) for c in cand])
    resid = np.sqrt(np.take_along_axis(costs, best[None], axis=0)[0])
    return cp, cd, resid
