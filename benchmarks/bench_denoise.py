"""MP-PCA denoising of the multi-echo magnitude: speed, noise level, and what it does to R2* and separation.

For each SNR the healthy phantom is simulated, denoised with chisep's MP-PCA
(and with dipy's ``localpca.mppca`` when dipy is installed, side by side on
the same volume and mask), then the default pipeline runs with denoising off
and on. Scores: noise sigma against the simulator's, R2* NRMSE, chi NRMSE,
chi_para / chi_dia NRMSE of chi-separation and the linear model, and the
thresholded-QSM baseline (chi_para = max(chi, 0), chi_dia = max(-chi, 0)),
over the true brain mask (R2* over the output mask).

Usage::

    python benchmarks/bench_denoise.py --resolution 2 [--snr 30,100] [--dipy]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from chisep import metrics, pipeline
from chisep.denoise import mppca
from chisep.separation.baseline import thresholded_qsm
from chisep.sim import head_phantom, simulate_gre


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--snr", default="30,100")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--dipy", action="store_true", help="also time dipy's mppca (pip install dipy)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    phantom = head_phantom(args.resolution, scenario="healthy", seed=args.seed)
    print(f"# MP-PCA at {args.resolution} mm, healthy phantom seed {args.seed}, {time.strftime('%Y-%m-%d')}\n")
    print("| SNR | denoising | noise sigma / true | time (s) | R2* | chi | chi-separation para / dia | "
          "linear para / dia | thresholded QSM para / dia |")
    print("|---|---|---|---|---|---|---|---|---|")
    for snr in (float(v) for v in args.snr.split(",")):
        sim = simulate_gre(phantom, snr=snr, seed=args.seed)
        brain = sim.truth.brain_mask
        head = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition,
                                        settings=pipeline.QsmSettings(denoise="off")).head_mask
        t0 = time.perf_counter()
        ours = mppca(sim.magnitude, head)
        t_ours = time.perf_counter() - t0
        if args.dipy:
            from dipy.denoise.localpca import mppca as dipy_mppca

            t0 = time.perf_counter()
            theirs, sigma = dipy_mppca(sim.magnitude, mask=head, patch_radius=2, return_sigma=True)
            t_dipy = time.perf_counter() - t0
            diff = np.abs(ours.magnitude[head] - theirs[head]).max() / theirs[head].max()
            print(f"| {snr:g} | dipy localpca.mppca | {np.median(sigma[brain]) / sim.truth.noise_sigma:.3f} | "
                  f"{t_dipy:.1f} | (chisep vs dipy: max difference {100 * diff:.2f} % of the maximum) | | | | |")
        for setting in ("off", "mppca"):
            qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition,
                                           settings=pipeline.QsmSettings(denoise=setting))
            sep = pipeline.separate(sim.acquisition, qsm.separation_inputs(magnitude=qsm.magnitude),
                                    settings=pipeline.SeparationSettings(models=("chi-separation", "linear")))
            cells = []
            for result in sep.values():
                cells.append(f"{metrics.nrmse(result.chi_para, sim.truth.chi_para, brain):.1f} / "
                             f"{metrics.nrmse(result.chi_dia, sim.truth.chi_dia, brain):.1f}")
            para, dia = thresholded_qsm(qsm.chi)
            cells.append(f"{metrics.nrmse(para, sim.truth.chi_para, brain):.1f} / "
                         f"{metrics.nrmse(dia, sim.truth.chi_dia, brain):.1f}")
            sigma_cell = (f"{np.median(ours.sigma[brain]) / sim.truth.noise_sigma:.3f}" if setting == "mppca" else "")
            time_cell = f"{t_ours:.1f}" if setting == "mppca" else ""
            print(f"| {snr:g} | {setting} | {sigma_cell} | {time_cell} | "
                  f"{metrics.nrmse(qsm.r2star, sim.truth.r2star, brain & qsm.mask):.1f} | "
                  f"{metrics.nrmse(qsm.chi, sim.truth.chi, brain):.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
