"""What limits the separation: chi, R2' or the relaxometric model? (realistic heads, measured R2)

For each head, the default chain runs once; chi-separation and the linear model are then
refit with each of their two inputs taken from the reconstruction or from the simulator's
truth: chi (and its field D chi) estimated or true, R2' estimated (R2* minus the measured
spin-echo R2) or true. With both true, what is left is the model itself: the simulator makes
R2' by static dephasing of sub-voxel spheres and cylinders (orientation-dependent), which no
separation model assumes. The thresholded-QSM baseline is scored from the estimated and from
the true chi. The linear model fits R2* (not R2'), so the R2' input does not reach it. Also printed: how far the true R2' is from Dr (chi_para + chi_dia) with the
model's Dr, and the least-squares Dr the simulator's R2' implies.

NRMSE % after demeaning, over the output mask within the true brain (healthy scenario).

    python benchmarks/bench_separation_limits.py [--resolution 1] [--heads A,B] [--snr 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from chisep import metrics, pipeline, workflows
from chisep.qsm import inversion
from chisep.separation.baseline import thresholded_qsm
from chisep.separation.chi_separation import load_constants

MODELS = ("chi-separation", "linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"## Separation limits: {args.resolution:g} mm, SNR {args.snr:g}, seed {args.seed}, "
          f"date {time.strftime('%Y-%m-%d')}\n")
    print("| head | chi input | R2' input | chi-separation para / dia | linear para / dia |\n|---|---|---|---|---|")
    notes = []
    for head in args.heads.split(","):
        sim = workflows.simulate(resolution=args.resolution, snr=args.snr, head=head, seed=args.seed)
        t, acq = sim.truth, sim.acquisition
        qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, acq)
        out = qsm.mask
        scored = out & t.brain_mask
        estimated = qsm.separation_inputs(magnitude=qsm.magnitude, r2=sim.r2_measured)
        true_chi = np.where(out, t.chi, 0).astype(np.float32)
        true_field = inversion.dipole_field_hz(true_chi, out, voxel_size=acq.voxel_size,
                                               b0_direction=acq.b0_direction, field_strength=acq.field_strength)
        true_r2prime = np.where(out, t.r2prime, 0).astype(np.float32)
        cases = {("estimated", "estimated"): estimated,
                 ("estimated", "true"): dataclasses.replace(estimated, r2prime=true_r2prime),
                 ("true", "estimated"): dataclasses.replace(estimated, chi=true_chi, local_field_hz=true_field),
                 ("true", "true"): dataclasses.replace(estimated, chi=true_chi, local_field_hz=true_field,
                                                       r2prime=true_r2prime)}
        for (chi_src, r2p_src), inputs in cases.items():
            fits = pipeline.separate(acq, inputs, settings=pipeline.SeparationSettings(models=MODELS))
            cells = [f"{metrics.nrmse(fits[m].chi_para, t.chi_para, scored):.1f} / "
                     f"{metrics.nrmse(fits[m].chi_dia, t.chi_dia, scored):.1f}" for m in MODELS]
            print(f"| {head} | {chi_src} | {r2p_src} | " + " | ".join(cells) + " |", flush=True)
        for source, chi in (("estimated", qsm.chi), ("true", true_chi)):
            para, dia = thresholded_qsm(chi)
            notes.append(f"head {head}: thresholded QSM from the {source} chi: "
                         f"{metrics.nrmse(para, t.chi_para, scored):.1f} / {metrics.nrmse(dia, t.chi_dia, scored):.1f}")
        dr = load_constants(acq.field_strength).dr_para
        design = np.c_[t.chi_para[scored], t.chi_dia[scored], np.ones(int(scored.sum()))]
        fitted = np.linalg.lstsq(design, t.r2prime[scored], rcond=None)[0]
        notes.append(f"head {head}: chi {metrics.nrmse(qsm.chi, t.chi, scored):.1f} %, R2' (measured R2) "
                     f"{metrics.nrmse(estimated.r2prime, t.r2prime, scored):.1f} %; true R2' against "
                     f"{dr:g} (chi_para + chi_dia): {metrics.nrmse(t.r2prime, dr * (t.chi_para + t.chi_dia), scored):.1f} %; "
                     f"least squares R2' = {fitted[0]:.0f} chi_para + {fitted[1]:.0f} chi_dia {fitted[2]:+.2f} 1/s")
    print()
    for line in notes:
        print(f"- {line}")


if __name__ == "__main__":
    main()
