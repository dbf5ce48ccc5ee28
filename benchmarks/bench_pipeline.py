"""End-to-end accuracy and speed on the built-in phantom (issue targets: 1 mm, 3 T, 6 echoes, SNR 100).

Runs simulate -> mask -> field fit -> R2* -> inversion (single-step, or background removal + inversion)
-> every separation model, scores each stage against the simulator's ground
truth and prints a markdown table (wall time per stage, peak memory); the stages then
run a second time in the same process, compiled, to show the share of JIT compilation.

    python benchmarks/bench_pipeline.py [--resolution 1.0] [--scenario all] [--models ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np

from chisep import metrics, pipeline, workflows
from chisep.qsm import inversion
from chisep.separation.baseline import THRESHOLDED_QSM, thresholded_qsm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--scenario", default="healthy")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--models", default="chi-separation,linear,decompose")
    parser.add_argument("--background", default=pipeline.QsmSettings().background)
    parser.add_argument("--inversion", default=pipeline.QsmSettings().inversion)
    parser.add_argument("--allocator", choices=("keep", "default"), default="keep",
                        help="keep: reuse freed memory as the command line does (pipeline.keep_freed_memory); "
                             "default: glibc's own behaviour, as a library call in a notebook")
    args = parser.parse_args()
    kept = pipeline.keep_freed_memory() if args.allocator == "keep" else False

    t0 = time.perf_counter()
    sim = workflows.simulate(resolution=args.resolution, scenario=args.scenario, snr=args.snr)
    t_sim = time.perf_counter() - t0
    truth = sim.truth
    settings = pipeline.QsmSettings(background=args.background, inversion=args.inversion)
    t0 = time.perf_counter()
    qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition, settings=settings)
    t_qsm = time.perf_counter() - t0
    timings = dict(qsm.timings)
    models = tuple(m for m in args.models.split(",") if m)
    results = pipeline.separate(sim.acquisition, qsm.separation_inputs(magnitude=qsm.magnitude),
                                settings=pipeline.SeparationSettings(models=models), timings=timings)
    mask = qsm.mask & truth.brain_mask
    wrapped_err = np.abs(qsm.field_total - truth.field_total_hz)[mask]
    te_max = max(sim.acquisition.echo_times)
    n_2pi = int(np.sum(wrapped_err * te_max > 0.5))  # a 2 pi error at the last echo shifts f by 1/TE
    labels = {name: value for value, name in truth.label_names.items()}

    def roi(values):
        return metrics.roi_means(values, truth.labels * mask, {k: labels[k] for k in
                                 ("globus_pallidus", "putamen", "caudate", "thalamus", "white_matter")})

    print(f"## End-to-end on the phantom: {args.resolution} mm, scenario {args.scenario}, SNR {args.snr:g}\n")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; date {time.strftime('%Y-%m-%d')}")
    print(f"allocator: {'freed memory kept for reuse' if kept else 'default'}")
    print(f"grid {sim.magnitude.shape}, brain voxels {int(truth.brain_mask.sum())}, final mask {int(mask.sum())}\n")
    print("| stage | metric | value |\n|---|---|---|")
    print(f"| mask | Dice vs truth brain: output mask / head mask (the field fit's, scalp included) | "
          f"{metrics.dice(qsm.mask, truth.brain_mask):.3f} / {metrics.dice(qsm.head_mask, truth.brain_mask):.3f} |")
    print(f"| field fit | voxels with a 2 pi error (eroded mask) | {n_2pi} |")
    print(f"| field fit | median abs error (Hz) | {np.median(wrapped_err):.3f} |")
    print(f"| R2* | median relative error | {np.median(np.abs(qsm.r2star[mask] / truth.r2star[mask] - 1)):.4f} |")
    source = "D chi" if args.inversion in inversion.TOTAL_FIELD_METHODS else args.background
    print(f"| local field ({source}) | NRMSE % | {metrics.nrmse(qsm.field_local, truth.field_local_hz, mask):.1f} |")
    for name, est, tru in [("chi (" + args.inversion + ")", qsm.chi, truth.chi)]:
        print(f"| {name} | NRMSE % | {metrics.nrmse(est, tru, mask):.1f} |")
        print(f"| {name} | HFEN % | {metrics.hfen(est, tru, mask):.1f} |")
        print(f"| {name} | XSIM | {metrics.xsim(est, tru, mask):.3f} |")
    baseline = dict(zip(("chi_para", "chi_dia"), thresholded_qsm(qsm.chi)))
    for model, res in results.items():
        for comp in ("chi_para", "chi_dia"):
            est, tru = getattr(res, comp), getattr(truth, comp)
            print(f"| {model} {comp} | NRMSE % | {metrics.nrmse(est, tru, mask):.1f} |")
    for comp in ("chi_para", "chi_dia"):
        print(f"| {THRESHOLDED_QSM} {comp} (baseline) | NRMSE % | "
              f"{metrics.nrmse(baseline[comp], getattr(truth, comp), mask):.1f} |")
    print("\n| ROI (ppm) | " + " | ".join(roi(truth.chi)) + " |")
    print("|---" * (1 + len(roi(truth.chi))) + "|")
    print("| true chi | " + " | ".join(f"{v:.3f}" for v in roi(truth.chi).values()) + " |")
    print("| chi | " + " | ".join(f"{v:.3f}" for v in roi(qsm.chi - qsm.chi[mask].mean() + truth.chi[mask].mean()).values()) + " |")
    for comp in ("chi_para", "chi_dia"):
        print(f"| true {comp} | " + " | ".join(f"{v:.3f}" for v in roi(getattr(truth, comp)).values()) + " |")
        for model, res in results.items():
            print(f"| {model} {comp} | " + " | ".join(f"{v:.3f}" for v in roi(getattr(res, comp)).values()) + " |")
        print(f"| {THRESHOLDED_QSM} {comp} | " + " | ".join(f"{v:.3f}" for v in roi(baseline[comp]).values()) + " |")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    # the same stages again in this process: every program is compiled now, so the difference
    # between the columns is JIT compilation (what the persistent cache saves a later run)
    t0 = time.perf_counter()
    again = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition, settings=settings)
    t_again = time.perf_counter() - t0
    timings_again = dict(again.timings)
    pipeline.separate(sim.acquisition, again.separation_inputs(magnitude=again.magnitude),
                      settings=pipeline.SeparationSettings(models=models), timings=timings_again)
    print("\n| step | wall s, first run (with compilation) | wall s, second run (compiled) |\n|---|---|---|")
    print(f"| simulate | {t_sim:.1f} | |")
    for step, t in timings.items():
        print(f"| {step} | {t:.1f} | {timings_again.get(step, float('nan')):.1f} |")
    fit_steps = [name for name in timings if name.startswith("field")]  # over the head, then the brain
    print(f"| field fit ({' + '.join(fit_steps)}) | {sum(timings[n] for n in fit_steps):.1f} | "
          f"{sum(timings_again.get(n, float('nan')) for n in fit_steps):.1f} |")
    print(f"| QSM total (mask to chi) | {t_qsm:.1f} | {t_again:.1f} |")
    if models:  # the figure: magnitude and phase to chi_para / chi_dia of the first model
        print(f"| magnitude and phase to {models[0]} | {t_qsm + timings[f'separation:{models[0]}']:.1f} | "
              f"{t_again + timings_again[f'separation:{models[0]}']:.1f} |")
    print(f"\npeak resident memory {peak_gb:.2f} GB (before the second run)")


if __name__ == "__main__":
    main()
