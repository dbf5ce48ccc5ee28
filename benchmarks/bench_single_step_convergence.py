"""How far single-step's ADMM gets: early iterates against the minimiser, by data penalty and iteration count.

For each head the default chain runs once; the single-step inversion is then rerun on the same
inputs (total field, reconstruction region, noise weights, magnitude) for each TV weight (``rule``:
the one the pipeline takes from the field noise), with a long run at penalty 0.25 as the reference
minimiser and with each data penalty (``mu_data``) and iteration cap (relative-change stop off).
Printed per run: seconds (compiled), distance to the reference minimiser (% of its norm), and chi
NRMSE % over the output mask within the true brain and over its 5 mm next to the brain's surface
(demeaned, healthy head). The default is 0.5 and 30 iterations.

    python benchmarks/bench_single_step_convergence.py [--resolution 1] [--heads A,B] [--snr 100] [--b0-angle 0]
        [--penalties 0.1,0.25,0.5] [--iterations 10,20,30,45] [--reference-iterations 150] [--alphas rule,3e-4]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
from scipy import ndimage

from chisep import metrics, pipeline, workflows
from chisep.qsm import inversion

SURFACE_BAND_MM = 5.0


def single_step_case(resolution: float, head: str, snr: float, b0_angle: float) -> SimpleNamespace:
    """One healthy head through the default chain, kept as the single-step inversion's inputs: the total
    field, the reconstruction region, the keyword inputs (geometry, noise weights, magnitude), the
    pipeline's TV weight, the output mask, the truth, and the scored voxels (output mask within the true
    brain) and their 5 mm next to the brain's surface."""
    sim = workflows.simulate(resolution=resolution, scenario="healthy", snr=snr, head=head, b0_angle_deg=b0_angle)
    qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition)
    acq, truth = sim.acquisition, sim.truth
    region, noise = qsm.reconstruction_mask, qsm.field_noise_used
    scored = qsm.mask & truth.brain_mask
    depth = ndimage.distance_transform_edt(truth.brain_mask, sampling=acq.voxel_size)
    return SimpleNamespace(
        field=qsm.field_total, region=region, output_mask=qsm.mask, truth=truth, scored=scored,
        band=scored & (depth <= SURFACE_BAND_MM),
        alpha=inversion.single_step_alpha(noise, region, field_strength=acq.field_strength),
        inputs=dict(voxel_size=acq.voxel_size, b0_direction=acq.b0_direction, field_strength=acq.field_strength,
                    weights=pipeline._noise_weights(noise, region), magnitude=sim.magnitude[..., 0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--b0-angle", type=float, default=0.0, help="B0 angle from voxel z, degrees")
    parser.add_argument("--penalties", default="0.1,0.25,0.5")
    parser.add_argument("--iterations", default="10,20,30,45")
    parser.add_argument("--reference-iterations", type=int, default=150)
    parser.add_argument("--alphas", default="rule", help="TV weights, 'rule' for the pipeline's (default)")
    args = parser.parse_args()
    penalties = [float(p) for p in args.penalties.split(",")]
    iterations = [int(n) for n in args.iterations.split(",")]
    print(f"## single-step convergence: {args.resolution:g} mm, SNR {args.snr:g}, B0 {args.b0_angle:g} degrees, "
          f"date {time.strftime('%Y-%m-%d')}\n")
    print("| head | alpha | mu_data | iterations | seconds | to the minimiser % | chi % | 5 mm band % |")
    print("|---|---|---|---|---|---|---|---|")
    for head in args.heads.split(","):
        case = single_step_case(args.resolution, head, args.snr, args.b0_angle)
        truth, scored, band = case.truth, case.scored, case.band
        # one compilation per grid: the iteration count and the weights are traced, not static
        inversion.single_step(case.field, case.region, max_iter=1, **case.inputs)
        for name in args.alphas.split(","):
            alpha = case.alpha if name == "rule" else float(name)

            def run(mu_data, max_iter):
                t0 = time.perf_counter()
                chi = inversion.single_step(case.field, case.region, mu_data=mu_data, max_iter=max_iter, alpha=alpha,
                                            tol=0.0, **case.inputs)
                return inversion.reference(chi, case.output_mask), time.perf_counter() - t0

            minimiser, seconds = run(0.25, args.reference_iterations)
            rows = [("0.25 (reference)", args.reference_iterations, minimiser, seconds)]
            rows += [(mu, n, *run(mu, n)) for mu in penalties for n in iterations]
            for mu, n, chi, seconds in rows:
                distance = 100 * np.linalg.norm((chi - minimiser)[scored]) / np.linalg.norm(minimiser[scored])
                print(f"| {head} | {alpha:.3g} | {mu} | {n} | {seconds:.1f} | {distance:.1f} | "
                      f"{metrics.nrmse(chi, truth.chi, scored):.2f} | {metrics.nrmse(chi, truth.chi, band):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
