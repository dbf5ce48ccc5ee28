"""What limits R2*: the noise, the estimator, the gradient-dephasing correction or the one-exponential model.

Each head is simulated twice with the same anatomy, with noise (``--snr``) and without. The default chain
runs on the noisy data (automatic mask, MP-PCA, field fit). R2* is then fitted

- on the chain's decay (MP-PCA's magnitude, corrected for gradient dephasing with the measured field) by
  each estimator (ARLO is the chain's);
- on the noise-free magnitude, corrected with the measured field, with the simulator's true total field,
  and not corrected: what is left there is model error, the floor no denoising can lower.

Scores: NRMSE % (qsm-ci, demeaned) over the output mask's healthy tissue, as the SNR-30 issue scores R2*;
for the chain's map and the noise-free floor, each tissue's bias, RMS error (1/s) and share of the squared error.

    python benchmarks/bench_r2star_limits.py [--resolution 2] [--heads A,B] [--snr 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from bench_head import healthy_tissue

from chisep import metrics, pipeline, relax, workflows

TISSUES = ("white_matter", "grey_matter", "csf", "veins", "globus_pallidus")


def tissue_rows(estimate, truth, inner) -> list[str]:
    """Per tissue: bias, RMS error and share of the squared error over ``inner``."""
    error = estimate - truth.r2star
    total = float(np.sum(error[inner] ** 2))
    names = {name: label for label, name in truth.label_names.items()}
    rows = []
    for tissue in TISSUES:
        if tissue not in names:
            continue
        m = inner & (truth.labels == names[tissue])
        if not m.any():
            continue
        e = error[m]
        rows.append(f"{tissue} {e.mean():+.2f} / {np.sqrt(np.mean(e**2)):.2f} / {np.sum(e**2) / total:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snr", type=float, default=100.0)
    args = parser.parse_args()
    print(f"## What limits R2*: {args.resolution:g} mm, SNR {args.snr:g}, healthy heads\n")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; date {time.strftime('%Y-%m-%d')}")
    print("R2* NRMSE % over the output mask's healthy tissue; tissues: bias / RMS error (1/s) / share of the "
          "squared error\n")
    for head in args.heads.split(","):
        sim = workflows.simulate(resolution=args.resolution, snr=args.snr, head=head, scenario="healthy")
        clean = workflows.simulate(resolution=args.resolution, snr=None, head=head, scenario="healthy")
        truth, tes = sim.truth, sim.acquisition.echo_times
        qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition)
        inner = qsm.tissue_relaxation_mask & healthy_tissue(truth)

        def r2star(magnitude, field, method="arlo"):
            decay = magnitude if field is None else relax.gradient_dephasing_correction(
                magnitude, field, tes, qsm.reconstruction_mask)
            return relax.r2star_map(decay, tes, qsm.head_mask, method=method)

        def score(estimate):
            return f"{metrics.nrmse(estimate, truth.r2star, inner):.1f}"

        cells = {"the chain's map": score(qsm.r2star)}
        for method in relax.R2STAR_METHODS:
            cells[f"chain's decay, {method}"] = score(r2star(qsm.magnitude, qsm.field_total, method))
        floor = r2star(clean.magnitude, qsm.field_total)
        cells["noise-free, measured field"] = score(floor)
        cells["noise-free, true total field"] = score(r2star(clean.magnitude, truth.field_total_hz))
        cells["noise-free, no correction"] = score(r2star(clean.magnitude, None))
        print(f"### head {head}\n")
        print("| " + " | ".join(cells) + " |")
        print("|" + "---|" * len(cells))
        print("| " + " | ".join(cells.values()) + " |\n")
        print(f"- the chain's map: {'; '.join(tissue_rows(qsm.r2star, truth, inner))}")
        print(f"- noise-free floor (measured field): {'; '.join(tissue_rows(floor, truth, inner))}\n", flush=True)


if __name__ == "__main__":
    main()
