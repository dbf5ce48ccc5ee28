"""The automatic brain mask over echo times, SNR and both heads (chisep.sim.simulate_head).

The automatic mask cuts the brain from the head where the field says skull and
air are (qsm.reliability, qsm.mask.brain_region). Its thresholds are multiples
of medians, so they depend on what the head holds and on the acquisition: with
the whole head's medians, scalp fat made echoes at 4, 9, ..., 29 ms leak into the
scalp (chi NRMSE 167 / 274 % on the two heads). This grid runs the default
pipeline (QSM only) with the automatic mask for each echo-time set, SNR and head
and reports the brain mask's Dice against the truth (the reconstruction region
and the output mask after background removal), its volume, and chi NRMSE (%,
demeaned, over the true brain: voxels the mask misses count as zero).

Usage::

    python benchmarks/bench_mask.py [--resolution 2] [--heads A,B] [--snr 30,100]
        [--echo-sets "5,11,17,23,29;4,9,14,19,24,29"] [--flip-angles 8,15,25]
        [--reliability "default;echo_spread_over_noise=off"] [--field-strength 7]

``--reliability`` runs each simulated head once per variant of the reliability factors
(``criterion=value,...``, or ``default``), so a criterion's effect is measured on the same data.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import numpy as np

from chisep import metrics, pipeline
from chisep.sim import simulate_head

#: echo times (ms): the heads' default, the set that once leaked, fat in phase at 3 T (2.3 ms period),
#: short spacing with eight echoes, long spacing, an uneven set
ECHO_SETS = ("5,11,17,23,29", "4,9,14,19,24,29", "4.6,9.2,13.8,18.4,23,27.6", "3,6,9,12,15,18,21,24",
             "6,14,22,30,38", "3,7,13,20,28")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0, help="output voxel size in mm (default 2)")
    parser.add_argument("--heads", default="A,B", help="heads (default A,B; B is the holdout)")
    parser.add_argument("--snr", default="30,100", help="SNRs of the first echo's brain signal (default 30,100)")
    parser.add_argument("--echo-sets", default=";".join(ECHO_SETS), metavar="MS,MS;MS,...",
                        help="echo-time sets in ms, separated by ';'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flip-angles", default="15", help="flip angles in degrees, comma separated (default 15)")
    parser.add_argument("--field-strength", type=float, default=3.0, help="B0 in tesla (default 3)")
    parser.add_argument("--reliability", default="default", metavar="NAME=VALUE,...;...",
                        help="variants of the reliability factors, separated by ';' (default: the defaults)")
    args = parser.parse_args(argv)
    variants = [(text.strip(), _factors(text)) for text in args.reliability.split(";")]
    warnings.simplefilter("ignore")
    print(f"# automatic mask, {args.resolution} mm, {args.field_strength:g} T, seed {args.seed}; "
          "Dice against the true brain; chi NRMSE % over the true brain\n")
    print("| echo times (ms) | flip (deg) | SNR | head | reliability | Dice region / output | mask mL (true) | chi % "
          "| seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = []
    for echo_set in args.echo_sets.split(";"):
        tes = tuple(float(te) / 1000 for te in echo_set.split(","))
        for flip, snr, head in itertools.product((float(f) for f in args.flip_angles.split(",")),
                                                 [float(s) for s in args.snr.split(",")], args.heads.split(",")):
            sim = simulate_head(args.resolution, head=head, scenario="all", snr=snr, seed=args.seed,
                                echo_times=tes, repetition_time=max(0.035, tes[-1] + 0.006),
                                flip_angle_deg=flip, field_strength=args.field_strength)
            for label, factors in variants:
                t0 = time.perf_counter()
                qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition,
                                               settings=pipeline.QsmSettings(reliability=factors))
                seconds = time.perf_counter() - t0
                brain = sim.truth.brain_mask
                voxel_ml = float(np.prod(sim.acquisition.voxel_size) / 1000)
                dice = metrics.dice(qsm.reconstruction_mask, brain)
                chi = metrics.nrmse(qsm.chi, sim.truth.chi, brain)
                worst.append((dice, echo_set, flip, snr, head, label))
                print(f"| {echo_set} | {flip:g} | {snr:g} | {head} | {label} | {dice:.3f} / "
                      f"{metrics.dice(qsm.mask, brain):.3f} | {qsm.reconstruction_mask.sum() * voxel_ml:.0f} "
                      f"({brain.sum() * voxel_ml:.0f}) | {chi:.1f} | {seconds:.0f} |", flush=True)
    for label, _ in variants:
        dice, echo_set, flip, snr, head, _ = min(case for case in worst if case[-1] == label)
        print(f"\n{label}: lowest region Dice {dice:.3f}: echoes {echo_set} ms, flip {flip:g} deg, SNR {snr:g}, "
              f"head {head}")


def _factors(text: str) -> dict:
    """``criterion=value,...`` (values: numbers or off) as QsmSettings.reliability; ``default``: {}."""
    if text.strip() == "default":
        return {}
    factors = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        factors[name.strip()] = "off" if value.strip() == "off" else float(value)
    return factors


if __name__ == "__main__":
    main()
