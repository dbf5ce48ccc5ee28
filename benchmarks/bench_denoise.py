"""MP-PCA denoising of the multi-echo magnitude on the realistic heads: noise level, R2*, speed per patch.

For each head and SNR the realistic head (scenario "all") is simulated and the default
pipeline runs once (automatic mask, field); then MP-PCA runs on the head mask with each
patch setting (patch radius r: (2 r + 1)^3 voxels; stride: every stride-th voxel is a
patch centre), and R2* (ARLO after the gradient-dephasing correction, as the pipeline
does) is scored against the truth in healthy tissue of the output mask (qsm-ci NRMSE,
demeaned). Also: the median noise sigma in the brain against the simulator's, and the
wall time of the denoising alone. With ``--dipy`` (pip install dipy), dipy's
``localpca.mppca`` (r = 2, every voxel) runs on the same volume and mask for comparison.

Usage::

    python benchmarks/bench_denoise.py [--resolution 2] [--heads A,B] [--snr 30,100]
        [--patches 2:2,1:2,1:1] [--dipy]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

# the scripts run from this folder (python benchmarks/...), which is then on the import path
from bench_head import healthy_tissue

from chisep import metrics, pipeline, relax
from chisep.denoise import mppca
from chisep.sim import simulate_head


def r2star_error(magnitude, qsm, sim) -> float:
    """R2* NRMSE % in healthy tissue of the output mask, R2* as the pipeline maps it."""
    tes = np.asarray(sim.acquisition.echo_times)
    decay = relax.gradient_dephasing_correction(magnitude, qsm.field_total, tes, qsm.reconstruction_mask)
    r2star = relax.r2star_map(decay, tes, qsm.head_mask, method="arlo")
    return metrics.nrmse(r2star, sim.truth.r2star, qsm.tissue_relaxation_mask & healthy_tissue(sim.truth))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snr", default="30,100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patches", default="2:2,1:2,1:1", help="radius:stride pairs, comma separated")
    parser.add_argument("--dipy", action="store_true", help="also time dipy's mppca (pip install dipy)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    patches = [tuple(int(v) for v in p.split(":")) for p in args.patches.split(",")]
    print(f"# MP-PCA on the realistic heads at {args.resolution:g} mm, scenario all, seed {args.seed}, "
          f"{time.strftime('%Y-%m-%d')}; R2* NRMSE % in healthy tissue of the output mask\n")
    print("| head | SNR | denoising | noise sigma / true | time (s) | R2* |")
    print("|---|---|---|---|---|---|")
    for head in args.heads.split(","):
        for snr in (float(v) for v in args.snr.split(",")):
            sim = simulate_head(args.resolution, head=head, scenario="all", snr=snr, seed=args.seed)
            qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition,
                                           settings=pipeline.QsmSettings(denoise="off"))
            brain, true_sigma = sim.truth.brain_mask, sim.truth.noise_sigma
            print(f"| {head} | {snr:g} | off | | | {r2star_error(sim.magnitude, qsm, sim):.1f} |", flush=True)
            for radius, stride in patches:
                t0 = time.perf_counter()
                out = mppca(sim.magnitude, qsm.head_mask, patch_radius=radius, stride=stride)
                seconds = time.perf_counter() - t0
                print(f"| {head} | {snr:g} | MP-PCA {2 * radius + 1}^3, stride {stride} | "
                      f"{np.median(out.sigma[brain]) / true_sigma:.3f} | {seconds:.1f} | "
                      f"{r2star_error(out.magnitude, qsm, sim):.1f} |", flush=True)
            if args.dipy:
                from dipy.denoise.localpca import mppca as dipy_mppca

                t0 = time.perf_counter()
                theirs, sigma = dipy_mppca(sim.magnitude, mask=qsm.head_mask, patch_radius=2, return_sigma=True)
                seconds = time.perf_counter() - t0
                print(f"| {head} | {snr:g} | dipy localpca.mppca 5^3, stride 1 | "
                      f"{np.median(sigma[brain]) / true_sigma:.3f} | {seconds:.1f} | "
                      f"{r2star_error(theirs, qsm, sim):.1f} |", flush=True)


if __name__ == "__main__":
    main()
