"""Citations of every method chisep runs, by stage and method name.

The report, provenance.json and the README cite from here, so a method added
to a stage without a reference is caught by a test (tests/test_report_html.py).
"""

from __future__ import annotations

from typing import Mapping

from chisep.settings import TOTAL_FIELD_METHODS

#: stage -> method name (as in chisep.settings) -> citation
REFERENCES: dict[str, dict[str, str]] = {
    "denoise": {
        "mppca": "Veraart J et al. Denoising of diffusion MRI using random matrix theory. "
                 "NeuroImage 2016;142:394-406",
    },
    "unwrap": {
        "romeo": "Dymerska B et al. Phase unwrapping with a rapid opensource minimum spanning tree algorithm "
                 "(ROMEO). Magn Reson Med 2021;85:2294-2308",
        "laplacian": "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications. "
                     "Opt Lett 2003;28:1194-1196",
    },
    "field_fit": {
        "nonlinear": "Liu T et al. Nonlinear formulation of the magnetic field to source relationship for robust "
                     "quantitative susceptibility mapping. Magn Reson Med 2013;69:467-476",
        "weighted-linear": "Wu B et al. Fast and tissue-optimized mapping of magnetic susceptibility and T2* with "
                           "multi-echo and multi-shot spirals. NeuroImage 2012;59:297-305",
        "echo-average": "Robinson SD et al. An illustrated comparison of processing methods for MR phase imaging "
                        "and QSM: combining array coil signals and phase unwrapping. NMR Biomed 2017;30:e3601",
    },
    "reliability": {
        "field reliability": "Stewart AW et al. QSMxT: Robust masking and artifact reduction for quantitative "
                             "susceptibility mapping. Magn Reson Med 2022;87:1289-1300",
    },
    "r2star": {
        "arlo": "Pei M et al. Algorithm for fast monoexponential fitting based on Auto-Regression on Linear "
                "Operations (ARLO) of data. Magn Reson Med 2015;73:843-850",
        "loglinear": "log-linear least squares of the multi-echo magnitude (weighted by signal squared)",
        "nonlinear": "mono-exponential least squares (Levenberg-Marquardt) of the multi-echo magnitude",
        "gradient correction": "Yablonskiy DA. Quantitation of intrinsic magnetic susceptibility-related effects in "
                               "a tissue matrix. Phantom study. Magn Reson Med 1998;39:417-428",
    },
    "background": {
        "vsharp": "Li W et al. Quantitative susceptibility mapping of human brain reflects spatial variation in "
                  "tissue composition. NeuroImage 2011;55:1645-1656",
        "sharp": "Schweser F et al. Quantitative imaging of intrinsic magnetic tissue properties using MRI signal "
                 "phase. NeuroImage 2011;54:2789-2807",
        "resharp": "Sun H, Wilman AH. Background field removal using spherical mean value filtering and Tikhonov "
                   "regularization. Magn Reson Med 2014;71:1151-1157",
        "pdf": "Liu T et al. A novel background field removal method for MRI using projection onto dipole fields "
               "(PDF). NMR Biomed 2011;24:1129-1136",
        "lbv": "Zhou D et al. Background field removal by solving the Laplacian boundary value problem. "
               "NMR Biomed 2014;27:312-319",
    },
    "inversion": {
        "medi": "Liu T et al. Morphology enabled dipole inversion (MEDI) from a single-angle acquisition. "
                "Magn Reson Med 2011;66:777-783",
        "tv": "Bilgic B et al. Fast quantitative susceptibility mapping with L1-regularization and automatic "
              "parameter selection. Magn Reson Med 2014;72:1444-1459",
        "ilsqr": "Li W et al. A method for estimating and removing streaking artifacts in quantitative "
                 "susceptibility mapping. NeuroImage 2015;108:111-122",
        "tikhonov": "Kressler B et al. Nonlinear regularization for per voxel estimation of magnetic "
                    "susceptibility distributions from MRI field maps. IEEE Trans Med Imaging 2010;29:273-281",
        "tkd": "Shmueli K et al. Magnetic susceptibility mapping of brain tissue in vivo using MRI phase data. "
               "Magn Reson Med 2009;62:1510-1522",
        "single-step": "Chatnuntawech I et al. Single-step quantitative susceptibility mapping with variational "
                       "penalties. NMR Biomed 2017;30:e3570",
    },
    "separation": {
        "chi-separation": "Shin H-G et al. chi-separation: Magnetic susceptibility source separation toward iron "
                          "and myelin mapping in the brain. NeuroImage 2021;240:118371",
        "linear": "Schweser F et al. Differentiation between diamagnetic and paramagnetic cerebral lesions based "
                  "on magnetic susceptibility mapping. Med Phys 2010;37:5165-5178; Stuber C et al. Myelin and "
                  "iron concentration in the human brain: a quantitative study of MRI contrast. "
                  "NeuroImage 2014;93:95-106",
        "decompose": "Chen J et al. Decompose quantitative susceptibility mapping (QSM) to sub-voxel diamagnetic "
                     "and paramagnetic components based on gradient-echo MRI data. NeuroImage 2021;242:118477",
        "R2' from R2*": "Ji S et al. (R2' as a fixed fraction of R2*) NMR Biomed 2024; Yablonskiy DA, Haacke EM. "
                        "Theory of NMR signal behavior in magnetically inhomogeneous tissues: the static dephasing "
                        "regime. Magn Reson Med 1994;32:749-763",
    },
}


def references_for(settings: Mapping, models=()) -> dict[str, str]:
    """``"stage: method" -> citation`` for the methods a run used.

    ``settings`` is the ``qsm`` part of the run settings as a mapping (``unwrap``,
    ``field_fit``, ``r2star``, ``background``, ``inversion``, ``denoise``,
    ``gradient_correction``); ``models`` the separation models that ran.
    """
    total_field = settings.get("inversion") in TOTAL_FIELD_METHODS  # no background step ran
    used = {"unwrap": settings.get("unwrap"), "field_fit": settings.get("field_fit"),
            "background": None if total_field else settings.get("background"),
            "inversion": settings.get("inversion"), "denoise": settings.get("denoise")}
    out = {}
    for stage, method in used.items():
        if method in REFERENCES[stage]:
            out[f"{stage}: {method}"] = REFERENCES[stage][method]
    r2star = settings.get("r2star")
    for method in ("arlo", "loglinear") if r2star == "auto" else (r2star,):
        if method in REFERENCES["r2star"]:
            out[f"r2star: {method}"] = REFERENCES["r2star"][method]
    if settings.get("gradient_correction", True):
        out["r2star: gradient correction"] = REFERENCES["r2star"]["gradient correction"]
    out["reliability: field reliability"] = REFERENCES["reliability"]["field reliability"]
    for model in models:
        out[f"separation: {model}"] = REFERENCES["separation"][model]
    if models:
        out["separation: R2' from R2*"] = REFERENCES["separation"]["R2' from R2*"]
    return out
