"""Single-step's TV weight against the SNR: fixed alphas and the noise rule, on the realistic heads.

For each head and SNR the default chain runs with each alpha (``rule``: the pipeline's
``inversion.single_step_alpha`` of the field noise, the default), then chi-separation with the
measured R2. NRMSE % after demeaning over the output mask within the true brain (healthy head).

    python benchmarks/bench_single_step_alpha.py [--resolution 2] [--heads A,B] [--snrs 100,30]
        [--alphas rule,3e-4,1.5e-4,1e-4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from chisep import metrics, pipeline, workflows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--snrs", default="100,30")
    parser.add_argument("--alphas", default="rule,3e-4,1.5e-4,1e-4")
    args = parser.parse_args()
    print(f"## single-step alpha: {args.resolution:g} mm, date {time.strftime('%Y-%m-%d')}\n")
    print("| head | SNR | field noise (Hz, median) | alpha | chi % | chi-separation (measured R2) para / dia % |")
    print("|---|---|---|---|---|---|")
    for head in args.heads.split(","):
        for snr in (float(s) for s in args.snrs.split(",")):
            sim = workflows.simulate(resolution=args.resolution, snr=snr, head=head)
            t = sim.truth
            for alpha in args.alphas.split(","):
                options = {} if alpha == "rule" else {"alpha": float(alpha)}
                qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition,
                                               settings=pipeline.QsmSettings(inversion_options=options))
                if alpha == "rule":  # the weight taken is in the notes
                    alpha = next(n.split("alpha ")[1].split()[0] for n in qsm.notes if "from the field noise" in n)
                m = qsm.mask & t.brain_mask
                fit = pipeline.separate(sim.acquisition, qsm.separation_inputs(magnitude=qsm.magnitude,
                                                                                r2=sim.r2_measured),
                                        settings=pipeline.SeparationSettings(models=("chi-separation",)))
                fit = fit["chi-separation"]
                noise = float(np.median(qsm.field_noise_used[qsm.reconstruction_mask]))
                print(f"| {head} | {snr:g} | {noise:.3f} | {alpha}{' (rule)' if not options else ''} | "
                      f"{metrics.nrmse(qsm.chi, t.chi, m):.1f} | {metrics.nrmse(fit.chi_para, t.chi_para, m):.1f} / "
                      f"{metrics.nrmse(fit.chi_dia, t.chi_dia, m):.1f} |", flush=True)


if __name__ == "__main__":
    main()
