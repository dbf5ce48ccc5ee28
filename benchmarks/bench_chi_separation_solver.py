"""chi-separation's solver on the realistic heads: where the ADMM starts, how many iterations, which TV weight.

For each head and SNR the default chain runs once (automatic mask); then chi-separation is refitted from
its QSM with a measured R2 and in R2*-only mode:

- start: the voxelwise closed form weighted as the solver weighs R2' against the field (the default),
  or with both equations weighted alike (the start before session 14; reproduced here by dropping the
  weight), each cut after a number of ADMM iterations (tolerance 0);
- the data terms' weights: balanced by their noise (the default) or alike (before session 14,
  ``[weights] balance_by_noise = false``), beside the linear model;
- TV weight ``lam`` at the default iterations.

Scores are qsm-ci NRMSE % over the true brain and over its healthy tissue (lesions and 3 voxels around
them left out), beside the thresholded QSM that separation has to beat.

    python benchmarks/bench_chi_separation_solver.py [--resolution 2] [--heads A,B] [--snrs 100,30]
        [--iterations 5,10,15,20,40] [--lams 2.5e-4,5e-4,1e-3,2e-3,4e-3]

(``--iterations ""`` or ``--lams ""`` skip those tables.)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from bench_head import healthy_tissue

from chisep import metrics, pipeline, workflows
from chisep.separation import chi_separation
from chisep.separation.baseline import thresholded_qsm
from chisep.separation.constants import load_model_file

_weighted_closed_form = chi_separation.closed_form


def _equal_weight_closed_form(chi_total, r2prime, *, dr_para, dr_dia, r2prime_weight=None):
    """The start before session 14: both equations weighted alike wherever a component clips."""
    return _weighted_closed_form(chi_total, r2prime, dr_para=dr_para, dr_dia=dr_dia)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snrs", default="100,30")
    parser.add_argument("--scenario", default="all")
    parser.add_argument("--iterations", default="5,10,15,20,40")
    parser.add_argument("--lams", default="2.5e-4,5e-4,1e-3,2e-3,4e-3")
    args = parser.parse_args()
    iterations = [int(n) for n in args.iterations.split(",") if n]
    lams = [float(v) for v in args.lams.split(",") if v]
    default_iter = chi_separation.load_constants(3.0).max_iter

    print(f"## chi-separation's solver: {args.resolution:g} mm, scenario {args.scenario}\n")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; date {time.strftime('%Y-%m-%d')}")
    print("chi_para / chi_dia NRMSE %, whole brain (healthy tissue); seconds of the separation call\n")
    for head in args.heads.split(","):
        for snr in (float(s) for s in args.snrs.split(",")):
            sim = workflows.simulate(resolution=args.resolution, scenario=args.scenario, snr=snr, head=head)
            t = sim.truth
            brain, healthy = t.brain_mask, healthy_tissue(t)
            qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition)

            def score(para, dia):
                return (f"{metrics.nrmse(para, t.chi_para, brain):.1f} / {metrics.nrmse(dia, t.chi_dia, brain):.1f} "
                        f"({metrics.nrmse(para, t.chi_para, healthy):.1f} / "
                        f"{metrics.nrmse(dia, t.chi_dia, healthy):.1f})")

            print(f"### head {head}, SNR {snr:g} (chi {metrics.nrmse(qsm.chi, t.chi, brain):.1f} %; thresholded QSM "
                  f"{score(*thresholded_qsm(qsm.chi))})\n")
            modes = {mode: qsm.separation_inputs(r2=r2, magnitude=qsm.magnitude)
                     for mode, r2 in (("measured", sim.r2_measured), ("R2*-only", None))}
            if iterations:
                iteration_table(sim, modes, iterations, score)
            weights_table(sim, modes, score)
            if lams:
                print(f"\nTV weight lam (weighted start, {default_iter} iterations, default tolerance):\n")
                print("| R2 | " + " | ".join(f"lam {v:g}" for v in lams) + " |")
                print("|---|" + "---|" * len(lams))
                for mode, inputs in modes.items():
                    cells = [score(*_fit(sim, inputs, lam=lam)) for lam in lams]
                    print(f"| {mode} | " + " | ".join(cells) + " |", flush=True)
            print()


def _fit(sim, inputs, **options):
    fit = pipeline.separate(sim.acquisition, inputs, settings=pipeline.SeparationSettings(
        models=("chi-separation",), chi_separation=options))["chi-separation"]
    return fit.chi_para, fit.chi_dia


def iteration_table(sim, modes, iterations, score) -> None:
    """Both starts, each cut after every iteration count (tolerance 0)."""
    print("| R2 | start | " + " | ".join(f"{n} iterations" for n in iterations) + " |")
    print("|---|---|" + "---|" * len(iterations))
    for mode, inputs in modes.items():
        for start, form in (("weighted (default)", _weighted_closed_form),
                            ("equal weights (before)", _equal_weight_closed_form)):
            chi_separation.closed_form = form
            # the start is one compiled program that read closed_form when it was traced: trace it again
            chi_separation._start.clear_cache()
            cells = []
            try:
                for n in iterations:
                    t0 = time.perf_counter()
                    para, dia = _fit(sim, inputs, max_iter=n, tol=0.0)
                    cells.append(f"{score(para, dia)}, {time.perf_counter() - t0:.1f} s")
            finally:
                chi_separation.closed_form = _weighted_closed_form
                chi_separation._start.clear_cache()
            print(f"| {mode} | {start} | " + " | ".join(cells) + " |", flush=True)


def weights_table(sim, modes, score) -> None:
    """The data terms balanced by their noise (default) against weighted alike, and the linear model."""
    alike = load_model_file("chi-separation", None)
    alike["weights"]["balance_by_noise"] = False
    print("\nData-term weights (default start and iterations), and the linear model:\n")
    print("| R2 | balanced by noise (default): R2' term weight, iterations run, scores | alike (before) | linear |")
    print("|---|---|---|---|")
    for mode, inputs in modes.items():
        fits = pipeline.separate(sim.acquisition, inputs,
                                 settings=pipeline.SeparationSettings(models=("chi-separation", "linear")))
        fit, linear = fits["chi-separation"], fits["linear"]
        print(f"| {mode} | {fit.info['r2prime_term_weight']:.3f}, {fit.info['iterations']}: "
              f"{score(fit.chi_para, fit.chi_dia)} | "
              f"{score(*_fit(sim, inputs, constants=alike))} | {score(linear.chi_para, linear.chi_dia)} |", flush=True)


if __name__ == "__main__":
    main()
