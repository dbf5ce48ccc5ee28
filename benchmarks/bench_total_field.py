"""Two-step QSM against the single-step inversion of the total field, on the realistic heads.

Each case (resolution, head, B0 angle) is simulated once and reconstructed once with chisep's
defaults up to the total field (automatic mask, field fit, reliability); every chain then
starts from the same total field, region and field noise:

- V-SHARP + MEDI and LBV + MEDI (two steps);
- ``single-step`` (``chisep.qsm.inversion.single_step``: variable-radius SMV-filtered data
  term, MEDI's weights and edge prior, no background step, no erosion).

Scores against the simulator's truth (chi NRMSE %, demeaned, over the true brain): whole
brain, healthy tissue (lesions and 3 voxels around them left out), the 5 mm of brain next to
its surface (where background removal erodes and errs most); the worst deep-grey region's
mean error (% of its true mean); the slope of the deep-grey region means against the truth;
seconds of the chain (background removal + inversion; compiled once beforehand on the same
grid, so the times compare the methods, not JAX's compiler).

    python benchmarks/bench_total_field.py [--resolutions 2,1] [--heads A,B] [--angles 0,30] [--snr 100]
        [--chains "single-step,LBV + MEDI"]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from bench_head import DEEP_GREY, healthy_tissue, region_fit
from scipy import ndimage

from chisep import metrics, pipeline
from chisep.sim import simulate_head

CHAINS = {"V-SHARP + MEDI": {"background": "vsharp", "inversion": "medi"},
          "LBV + MEDI": {"background": "lbv", "inversion": "medi"},
          "single-step": {"inversion": "single-step"}}
SURFACE_MM = 5.0


def surface_band(brain, voxel_size, depth_mm=SURFACE_MM):
    """The brain voxels within ``depth_mm`` of its surface."""
    return brain & (ndimage.distance_transform_edt(brain, sampling=voxel_size) <= depth_mm)


def deep_grey(chi, truth, mask):
    """(worst region's |mean error| / |true mean| in %, its name, slope of region means)."""
    errors = {}
    for name in DEEP_GREY:
        label = [k for k, v in truth.label_names.items() if v == name][0]
        region = (truth.labels == label) & mask & truth.brain_mask
        if region.sum() >= 3:
            true_mean = float(truth.chi[region].mean())
            errors[name] = abs(float(chi[region].mean()) - true_mean) / abs(true_mean)
    worst = max(errors, key=errors.get)
    slope, _ = region_fit(chi, truth.chi, truth, mask & healthy_tissue(truth), DEEP_GREY)
    return 100 * errors[worst], worst, slope


def run_case(resolution, head, angle, snr, seed, chains=tuple(CHAINS)):
    b0 = None
    if angle:
        a = np.deg2rad(angle)
        b0 = (0.0, float(np.sin(a)), float(np.cos(a)))
    sim = simulate_head(resolution, head=head, scenario="all", snr=snr, seed=seed, b0_direction=b0)
    t, acq = sim.truth, sim.acquisition
    qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, acq)
    brain, healthy = t.brain_mask, healthy_tissue(t)
    band = surface_band(brain, acq.voxel_size)
    rows = {}
    for name in chains:
        settings = pipeline.QsmSettings(**CHAINS[name])

        def chain():
            return pipeline.qsm_from_field(qsm.field_total, qsm.reconstruction_mask, acq,
                                           field_noise_hz=qsm.field_noise_used, magnitude=sim.magnitude[..., 0],
                                           r2star=qsm.r2star, settings=settings)

        chain()  # compile on this grid
        t0 = time.perf_counter()
        _, out_mask, chi = chain()
        seconds = time.perf_counter() - t0
        worst, region, slope = deep_grey(chi, t, out_mask)
        rows[name] = {"all": metrics.nrmse(chi, t.chi, brain), "healthy": metrics.nrmse(chi, t.chi, healthy),
                      "surface": metrics.nrmse(chi, t.chi, band), "deep_grey_worst": worst,
                      "deep_grey_region": region, "slope": slope, "seconds": seconds,
                      "dice": metrics.dice(out_mask, brain)}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="2,1", help="output voxel sizes in mm (default 2,1)")
    parser.add_argument("--heads", default="A,B", help="heads (default A,B; B is the holdout)")
    parser.add_argument("--angles", default="0,30", help="B0 angles from voxel z about x, degrees (default 0,30)")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chains", default=",".join(CHAINS), help=f"chains to run (default: all of {', '.join(CHAINS)})")
    args = parser.parse_args(argv)
    chains = [c.strip() for c in args.chains.split(",")]
    unknown = set(chains) - set(CHAINS)
    if unknown:
        parser.error(f"unknown chain(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHAINS)}")
    warnings.simplefilter("ignore")
    print(f"# SNR {args.snr:g}, seed {args.seed}, automatic mask; chi NRMSE % over the true brain: whole / healthy "
          f"/ {SURFACE_MM:g} mm next to the surface; deep grey: worst region's mean error %, slope of region means\n")
    print("| mm | head | B0 deg | chain | all | healthy | surface | deep grey worst | slope | output Dice | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for resolution in (float(r) for r in args.resolutions.split(",")):
        for head in args.heads.split(","):
            for angle in (float(a) for a in args.angles.split(",")):
                for name, r in run_case(resolution, head, angle, args.snr, args.seed, chains).items():
                    print(f"| {resolution:g} | {head} | {angle:g} | {name} | {r['all']:.1f} | {r['healthy']:.1f} | "
                          f"{r['surface']:.1f} | {r['deep_grey_worst']:.0f} ({r['deep_grey_region']}) | "
                          f"{r['slope']:.2f} | {r['dice']:.3f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
