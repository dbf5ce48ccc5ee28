"""User masks on the realistic heads: chi with the masks of ``bench_reliability.user_masks`` (automatic,
true brain, the true mask dilated into skull and scalp by 1-3 voxels, a BET-style mask that bridges sulci,
dark holes), for each set of single-step options given.

Scored qsm-ci style over the true brain mask (NRMSE % after demeaning; voxels the output mask leaves out
count as zero). ``--options`` takes ';'-separated sets of ``name=value`` inversion options, '' for the
defaults.

    python benchmarks/bench_user_masks_realistic.py [--resolution 2] [--heads A,B] [--snr 100]
        [--options ";mu_data=0.5,max_iter=30"]
"""

from __future__ import annotations

import argparse
import time
import warnings

from bench_reliability import user_masks

from chisep import metrics, pipeline, workflows


def parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        name, value = item.split("=")
        options[name] = int(value) if value.isdigit() else float(value)
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--options", default=";mu_data=0.5,max_iter=30")
    args = parser.parse_args()
    option_sets = [parse_options(text) for text in args.options.split(";")]
    print(f"## User masks on the realistic heads: {args.resolution:g} mm, SNR {args.snr:g}, "
          f"date {time.strftime('%Y-%m-%d')}\n")
    for number, head in enumerate(args.heads.split(",")):
        sim = workflows.simulate(resolution=args.resolution, scenario="healthy", snr=args.snr, head=head)
        brain = sim.truth.brain_mask
        masks = user_masks(sim)
        if number == 0:
            print("| head | inversion options | " + " | ".join(masks) + " |\n|---|---|" + "---|" * len(masks))
        for options in option_sets:
            scores = []
            for mask in masks.values():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # phase-wrap alarms from scalp in the dilated masks
                    qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition, mask=mask,
                                                   settings=pipeline.QsmSettings(inversion_options=options))
                scores.append(metrics.nrmse(qsm.chi, sim.truth.chi, brain))
            print(f"| {head} | {options or 'defaults'} | " + " | ".join(f"{s:.1f}" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
