"""Where single-step's ADMM should stop: chi accuracy and data residual per iteration, and stopping rules scored.

For each head and SNR the default chain runs once; the single-step inversion is then rerun on its
inputs (total field, reconstruction region, noise weights, magnitude, the pipeline's TV weight)
with data penalty ``--mu-data`` for 1, 2, ... ``--iterations`` iterations (relative-change stop
off). Printed: per iteration the weighted data residual (Hz), its fall from the previous
iteration (%) and chi NRMSE % over the output mask within the true brain and over its 5 mm next
to the brain's surface (demeaned, healthy head); then, for each residual-drop rule (stop after
the first iteration from ``min_iter`` on whose residual fell by less than ``drop``), where it
stops and what it scores, beside the best iterate, the default and the default before 2026-12-07
(penalty 0.5, 30 iterations).

    python benchmarks/bench_single_step_stop.py [--resolution 1] [--heads A,B] [--snrs 100,30] [--b0-angle 0]
        [--mu-data 0.1] [--iterations 20] [--drops 0.05,0.1,0.15] [--min-iters 3,5]
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
from bench_single_step_convergence import single_step_case

from chisep import metrics
from chisep.qsm import inversion

DEFAULTS = {name: p.default for name, p in inspect.signature(inversion.single_step).parameters.items()}


def stop_iteration(residuals: list[float], drop: float, min_iter: int) -> int:
    """The iteration (1-based) a residual-drop rule stops at, given the residual after each iteration."""
    for k in range(max(min_iter, 2), len(residuals) + 1):
        if residuals[k - 2] - residuals[k - 1] < drop * residuals[k - 2]:
            return k
    return len(residuals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snrs", default="100,30")
    parser.add_argument("--b0-angle", type=float, default=0.0, help="B0 angle from voxel z, degrees")
    parser.add_argument("--mu-data", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--drops", default="0.05,0.1,0.15")
    parser.add_argument("--min-iters", default="3,5")
    args = parser.parse_args()
    drops = [float(d) for d in args.drops.split(",")]
    min_iters = [int(n) for n in args.min_iters.split(",")]
    print(f"## single-step stopping rules: {args.resolution:g} mm, B0 {args.b0_angle:g} degrees, data penalty "
          f"{args.mu_data:g}, date {time.strftime('%Y-%m-%d')}\n")
    summary = []
    for snr in [float(s) for s in args.snrs.split(",")]:
        for head in args.heads.split(","):
            case = single_step_case(args.resolution, head, snr, args.b0_angle)

            def run(**options):
                info: dict = {}
                t0 = time.perf_counter()
                chi = inversion.single_step(case.field, case.region, alpha=case.alpha, info=info, **case.inputs,
                                            **options)
                seconds = time.perf_counter() - t0
                chi = inversion.reference(chi, case.output_mask)
                return (info["iterations"], info["residual"], metrics.nrmse(chi, case.truth.chi, case.scored),
                        metrics.nrmse(chi, case.truth.chi, case.band), seconds)

            run(max_iter=1)  # compile once per grid (the iteration count is traced)
            default, previous = run(), run(mu_data=0.5, max_iter=30)
            print(f"### head {head}, SNR {snr:g}\n")
            print("| iteration | residual Hz | fall % | chi % | 5 mm band % |")
            print("|---|---|---|---|---|")
            trajectory = []
            for k in range(1, args.iterations + 1):
                _, residual, whole, edge, _ = run(mu_data=args.mu_data, max_iter=k, tol=0.0)
                fall = 100 * (1 - residual / trajectory[-1][0]) if trajectory else float("nan")
                trajectory.append((residual, whole, edge))
                print(f"| {k} | {residual:.4g} | {fall:.1f} | {whole:.2f} | {edge:.2f} |", flush=True)
            residuals = [r for r, _, _ in trajectory]
            best = int(np.argmin([w for _, w, _ in trajectory]))
            rows = [(f"default ({DEFAULTS['mu_data']}, {DEFAULTS['max_iter']}, tol {DEFAULTS['tol']})", default[0],
                     default[2], default[3]),
                    ("before 2026-12-07 (0.5, 30, tol 0.01)", previous[0], previous[2], previous[3]),
                    ("best iterate", best + 1, trajectory[best][1], trajectory[best][2])]
            for drop in drops:
                for min_iter in min_iters:
                    k = stop_iteration(residuals, drop, min_iter)
                    # the solver's own rule must agree with the one replayed here
                    stopped = run(mu_data=args.mu_data, max_iter=args.iterations, tol=0.0, residual_drop=drop,
                                  min_iter=min_iter)
                    assert stopped[0] == k, (stopped[0], k)
                    rows.append((f"drop {drop:g}, from {min_iter}", k, trajectory[k - 1][1], trajectory[k - 1][2]))
            print("\n| rule | stops at | chi % | 5 mm band % |\n|---|---|---|---|")
            for name, k, whole, edge in rows:
                print(f"| {name} | {k} | {whole:.2f} | {edge:.2f} |")
                summary.append((head, snr, name, k, whole, edge))
            print(flush=True)
    print("### summary\n\n| head | SNR | rule | stops at | chi % | 5 mm band % |\n|---|---|---|---|---|---|")
    for head, snr, name, k, whole, edge in summary:
        print(f"| {head} | {snr:g} | {name} | {k} | {whole:.2f} | {edge:.2f} |")


if __name__ == "__main__":
    main()
