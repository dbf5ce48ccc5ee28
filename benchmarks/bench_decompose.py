"""Speed and accuracy of DECOMPOSE-QSM voxel fits (chisep.separation.decompose).

Simulates voxels with tissue-like three-pool parameters (3 T, 6 echoes
4-34 ms), adds complex Gaussian noise, fits from magnitude + QSM-implied phase
(and, for accuracy against a consistent truth, from the complex signal), and
prints voxels per second (wall and CPU time; on a shared machine CPU time / cores
estimates the unloaded wall time), convergence and errors.

Target (design brief): a whole brain, ~1.5 M voxels, in <= 120 s on 2 cores,
i.e. >= ~12 k voxels/s.

With ``--head R`` it instead times DECOMPOSE on a whole brain: the realistic
heads (chisep.sim.simulate_head, static-dephasing multi-pool sources) at R mm,
reconstructed by chisep's default chain with the automatic mask, then DECOMPOSE
on the output mask with the model file's budget and with a given one
(``--budget STARTS:STEPS``), printing wall time, peak memory of the process and
PCS / DCS NRMSE against the truth beside the thresholded-QSM baseline.

Usage::

    python benchmarks/bench_decompose.py [--voxels 131072] [--snr 100] [--n-starts 2] [--chunk-size 65536]
    python benchmarks/bench_decompose.py --head 1 [--heads A,B] [--budget 2:40]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def simulate(model, n, snr, seed):
    rng = np.random.default_rng(seed)
    truth = {
        "c_para": rng.uniform(0.1, 0.5, n), "c_dia": rng.uniform(0.1, 0.5, n), "c_0": rng.uniform(0.2, 0.6, n),
        "r2star0": rng.uniform(8.0, 25.0, n), "chi_para": rng.uniform(0.02, 0.3, n),
        "chi_dia": rng.uniform(0.02, 0.2, n),
    }
    clean = 1000.0 * model.forward(**truth)
    sigma = np.abs(clean[:, 0]).mean() / snr
    noisy = clean + sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    return truth, noisy


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def whole_brain(resolution: float, heads: str, budget: str | None) -> None:
    import resource
    import warnings

    from chisep import metrics, pipeline
    from chisep.separation import SeparationInputs
    from chisep.separation.baseline import thresholded_qsm
    from chisep.separation.decompose import DecomposeModel
    from chisep.sim import simulate_head

    warnings.simplefilter("ignore")
    budgets = {"model file": None}
    if budget:
        starts, steps = (int(v) for v in budget.split(":"))
        budgets[f"{starts} start(s), {steps} steps"] = {"n_starts": starts, "max_steps": steps}
    print(f"| head | {resolution:g} mm voxels | budget | DECOMPOSE wall s | PCS / DCS NRMSE % | thresholded % |")
    print("|---|---|---|---|---|---|")
    for head in heads.split(","):
        sim = simulate_head(resolution, head=head, scenario="all", snr=100, seed=0)
        qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition)
        t, acq = sim.truth, sim.acquisition
        base = thresholded_qsm(qsm.chi)
        base_text = (f"{metrics.nrmse(base[0], t.chi_para, t.brain_mask):.0f} / "
                     f"{metrics.nrmse(base[1], t.chi_dia, t.brain_mask):.0f}")
        for label, constants in budgets.items():
            model = DecomposeModel(acq, constants=constants)
            corner = (slice(0, 16),) * 3
            model.fit(SeparationInputs(mask=qsm.mask[corner], chi=qsm.chi[corner],
                                       magnitude=qsm.magnitude[corner]))  # compile
            inputs = SeparationInputs(mask=qsm.mask, chi=qsm.chi, magnitude=qsm.magnitude)
            res, wall, _ = timed(lambda: model.fit(inputs))
            print(f"| {head} | {int(qsm.mask.sum()):,} | {label} | {wall:.0f} | "
                  f"{metrics.nrmse(res.chi_para, t.chi_para, t.brain_mask):.1f} / "
                  f"{metrics.nrmse(res.chi_dia, t.chi_dia, t.brain_mask):.1f} | {base_text} |", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"\npeak memory of the process (simulation, reconstruction and fits): {peak_gb:.1f} GB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=float, default=None, metavar="MM",
                        help="time a whole brain of the realistic heads at this resolution instead")
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--budget", default=None, metavar="STARTS:STEPS", help="a second solver budget (--head)")
    parser.add_argument("--voxels", type=int, default=131072)
    parser.add_argument("--snr", type=float, default=100.0, help="first-echo SNR (magnitude / noise sigma)")
    parser.add_argument("--n-starts", type=int, default=None, help="default: the model file's n_starts")
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.head is not None:
        whole_brain(args.head, args.heads, args.budget)
        return

    import jax

    from chisep.acquisition import Acquisition
    from chisep.separation import SeparationInputs
    from chisep.separation.decompose import DecomposeModel

    te = 0.004 + 0.006 * np.arange(6)
    model = DecomposeModel(Acquisition(echo_times=te, field_strength=3.0), n_starts=args.n_starts,
                           chunk_size=args.chunk_size)

    def fit_maps(magnitude, chi):  # voxels as an (n, 1, 1) volume: the model interface takes maps
        n = chi.shape[0]
        return model.fit(SeparationInputs(mask=np.ones((n, 1, 1), bool), chi=chi.reshape(n, 1, 1),
                                          magnitude=magnitude.reshape(n, 1, 1, -1)))
    truth, noisy = simulate(model, args.voxels, args.snr, args.seed)
    chi_qsm = truth["chi_para"] - truth["chi_dia"]
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.1f}")

    # warm-up: compiles the grid search and the solver for the chunk shape
    _, wall, cpu = timed(lambda: fit_maps(np.abs(noisy[: args.chunk_size]), chi_qsm[: args.chunk_size]))
    print(f"warm-up (incl. compilation) on {min(args.chunk_size, args.voxels)} voxels: {wall:.1f} s wall")

    for label, run in (
        ("magnitude + QSM phase", lambda: fit_maps(np.abs(noisy), chi_qsm)),
        ("complex signal", lambda: model.fit_signal(noisy)),
    ):
        res, wall, cpu = timed(run)
        n = args.voxels
        conv = res.extra["converged"].astype(bool)
        print(f"\n{label}: {n} voxels, {wall:.1f} s wall ({n / wall:,.0f} voxels/s), {cpu:.1f} s CPU "
              f"({n / cpu:,.0f} voxels per CPU-second); whole brain 1.5 M voxels ~ {1.5e6 / n * wall:.0f} s wall here, "
              f"~{1.5e6 / n * cpu / 2:.0f} s on 2 unloaded cores (CPU time / 2)")
        print(f"  converged {conv.mean():.3f}, steps median {np.median(res.extra['steps']):.0f} "
              f"max {res.extra['steps'].max()}, n_starts {res.info['n_starts']}")
        if label == "complex signal":
            # outputs: PCS / DCS against the truth's component susceptibilities; pool values against the pools
            true_components, _ = model.components(truth, np.ones(args.voxels, bool))
            rows = (("PCS (chi_para)", res.chi_para, true_components[:, 0], res.chi_para_std),
                    ("DCS (chi_dia)", res.chi_dia, true_components[:, 1], res.chi_dia_std),
                    ("pool chi_para", res.extra["pool_chi_para"], truth["chi_para"], res.extra["pool_chi_para_std"]),
                    ("pool chi_dia", res.extra["pool_chi_dia"], truth["chi_dia"], res.extra["pool_chi_dia_std"]),
                    ("r2star0", res.extra["r2star0"], truth["r2star0"], res.extra["r2star0_std"]))
            for name, est, true, std in rows:
                err = est - true
                ok = np.isfinite(std)
                print(f"  {name}: median |error| {np.median(np.abs(err)):.4f}, RMSE {np.sqrt(np.mean(err ** 2)):.4f}, "
                      f"median reported std {np.median(std[ok]):.4f}")
    import resource

    print(f"\npeak memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")


if __name__ == "__main__":
    main()
