"""Masks users bring, on heads with noise-only skull: chi and chi-separation against the truth.

For each head (resolution, B0 angle, with or without intra-voxel dephasing)
the default pipeline runs with the automatic mask, the true brain mask, the
true mask dilated by 1-3 voxels into skull and scalp, a BET-style mask (a
smooth surface bridging sulci, two voxels into the skull) and a mask with
holes where the brain is dark; then once more with the automatic and the
dilated-by-2 mask and the reliability step switched off (the behaviour
before it existed). Scores: NRMSE (%) of chi and of chi-separation's
chi_para / chi_dia (default R2*-only mode, nominal R2) over the *true* brain
mask, so that voxels an output mask leaves out count as zero; the share of
the brain the output mask covers; the volume excluded as unreliable; and the
baseline every separation must beat, thresholded QSM (chi_para = max(chi, 0),
chi_dia = max(-chi, 0)).

Intra-voxel dephasing: the head is simulated at half the voxel size and the
complex signal averaged into the output voxels
(:func:`chisep.sim.simulate_gre_partial_volume`), so partial-volume bone,
scalp and air carry biased fields; the truth is the fine-grid average.

Usage::

    python benchmarks/bench_reliability.py --resolution 2 [--oblique 30] [--partial-volume] [--quick]
        [--snr 30] [--factors echo_spread=5,decay_residual=5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import ndimage

from chisep import metrics, pipeline
from chisep.qsm import reliability
from chisep.separation.baseline import thresholded_qsm
from chisep.sim import head_phantom, simulate_gre, simulate_gre_partial_volume

OFF = {name: None for name in reliability.CRITERIA}


def user_masks(sim, quick: bool = False) -> dict:
    brain = sim.truth.brain_mask
    masks = {"automatic": None, "true brain": brain}
    for k in ((3,) if quick else (1, 2, 3)):
        masks[f"true dilated {k}"] = ndimage.binary_dilation(brain, iterations=k)
    masks["BET-style"] = ndimage.binary_closing(ndimage.binary_dilation(brain, iterations=2), iterations=4)
    first = sim.magnitude[..., 0]
    masks["dark holes"] = brain & (first > 0.3 * np.median(first[brain]))
    return masks


def score(sim, mask, reliability_factors) -> dict:
    t0 = time.perf_counter()
    settings = pipeline.QsmSettings(reliability=reliability_factors)
    qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition, mask=mask, settings=settings)
    sep = pipeline.separate(sim.acquisition, qsm.separation_inputs(),
                            settings=pipeline.SeparationSettings(models=("chi-separation",)))["chi-separation"]
    brain = sim.truth.brain_mask
    rel = qsm.reliability
    baseline_para, baseline_dia = thresholded_qsm(qsm.chi)
    return {
        "threshold_para": metrics.nrmse(baseline_para, sim.truth.chi_para, brain),
        "threshold_dia": metrics.nrmse(baseline_dia, sim.truth.chi_dia, brain),
        "chi": metrics.nrmse(qsm.chi, sim.truth.chi, brain),
        "chi_para": metrics.nrmse(sep.chi_para, sim.truth.chi_para, brain),
        "chi_dia": metrics.nrmse(sep.chi_dia, sim.truth.chi_dia, brain),
        "coverage": float((qsm.mask & brain).sum() / brain.sum()),
        "outside": float((qsm.mask & ~brain).sum() * rel.voxel_volume_ml),
        "excluded_ml": rel.volume_ml(rel.excluded),
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size of the data in mm (default 2)")
    parser.add_argument("--oblique", type=float, default=0.0, help="B0 angle from voxel z in degrees (default 0)")
    parser.add_argument("--partial-volume", action="store_true",
                        help="simulate at half the voxel size and average the complex signal")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="fewer masks (for 1 mm)")
    parser.add_argument("--factors", default="",
                        help="reliability factors for the 'on' rows, e.g. echo_spread=5,decay_residual=5 "
                             "(default: chisep's defaults)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    t0 = time.perf_counter()
    b0 = (0.0, np.sin(np.deg2rad(args.oblique)), np.cos(np.deg2rad(args.oblique))) if args.oblique else None
    if args.partial_volume:
        sim = simulate_gre_partial_volume(head_phantom(args.resolution / 2, scenario="all", seed=args.seed), 2,
                                          snr=args.snr, seed=args.seed, b0_direction=b0)
    else:
        sim = simulate_gre(head_phantom(args.resolution, scenario="all", seed=args.seed), snr=args.snr,
                           seed=args.seed, b0_direction=b0)
    print(f"# head: {args.resolution} mm, B0 {args.oblique:g} deg, "
          f"{'intra-voxel dephasing (simulated at half the voxel size)' if args.partial_volume else 'no intra-voxel dephasing'}, "
          f"SNR {args.snr:g}, seed {args.seed}, shape {sim.magnitude.shape}; simulated in {time.perf_counter() - t0:.0f} s\n")
    print("| mask | reliability | chi | chi_para | chi_dia | thresholded QSM para / dia | brain covered | "
          "mask outside brain (mL) | excluded (mL) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    masks = user_masks(sim, quick=args.quick)
    factors = {k: float(v) for k, v in (item.split("=") for item in args.factors.split(",") if item)}
    runs = [(name, factors) for name in masks] + [("automatic", OFF),
                                                  ("true dilated 3" if args.quick else "true dilated 2", OFF)]
    for name, factors in runs:
        r = score(sim, masks[name], factors)
        state = "off" if factors is OFF else ("on" + (f" ({args.factors})" if factors else ""))
        print(f"| {name} | {state} | {r['chi']:.1f} | {r['chi_para']:.1f} | {r['chi_dia']:.1f} | "
              f"{r['threshold_para']:.1f} / {r['threshold_dia']:.1f} | {100 * r['coverage']:.1f} % | {r['outside']:.1f} | {r['excluded_ml']:.1f} | {r['seconds']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
