"""The multi-echo field fit alone: time per pass and agreement with a generic Levenberg-Marquardt fit.

The nonlinear field fit (``chisep.qsm.echoes``, complex least squares) runs a dedicated
Gauss-Newton (``PHASOR_STEPS`` steps in one jit-compiled pass). This script times it on a
realistic head (the automatic head mask, as the pipeline's first pass), first call (with
compilation) and second call, and refits the same voxels from the same start with the generic
voxelwise Levenberg-Marquardt of ``chisep.fit.fit_voxelwise`` (up to 100 steps, the method the
field fit used before) to show that the answers agree:

    python benchmarks/bench_field_fit.py [--resolution 2] [--head A]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jax.numpy as jnp
import numpy as np

from chisep.fit import VoxelModel, fit_voxelwise
from chisep.qsm import echoes
from chisep.qsm import mask as qmask
from chisep.qsm.unwrap import unwrap
from chisep.sim import simulate_head


def _phasor(params, tes):
    return jnp.exp(1j * (params[0] + 2 * jnp.pi * params[1] * tes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--head", default="A")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    sim = simulate_head(args.resolution, head=args.head, scenario="all")
    acq, brain = sim.acquisition, sim.truth.brain_mask
    head = qmask.brain_mask(sim.magnitude, voxel_size=acq.voxel_size)
    tes = np.asarray(acq.echo_times)
    run = dict(magnitude=sim.magnitude, phase=sim.phase, echo_times=tes, mask=head, voxel_size=acq.voxel_size)
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        fit = echoes.fit_multi_echo_field(**run)
        seconds.append(time.perf_counter() - t0)

    # the reference: the same start (weighted-linear fit of the unwrapped phase), generic LM
    u = unwrap(sim.phase, head, method="romeo", voxel_size=acq.voxel_size, magnitude=sim.magnitude, echo_times=tes)
    m = sim.magnitude[head].astype(np.float64)
    phi0, omega, _, _ = echoes._weighted_linear(u[head].astype(np.float64), m, tes)
    t0 = time.perf_counter()
    start = np.zeros(head.shape + (2,), np.float32)
    start[head, 0], start[head, 1] = phi0, omega / (2 * np.pi)
    model = VoxelModel(_phasor, ("phase_offset", "field_hz"), (-np.inf, -np.inf), (np.inf, np.inf))
    lm = fit_voxelwise(model, np.exp(1j * sim.phase).astype(np.complex64), aux=jnp.asarray(tes, jnp.float32),
                       mask=head, weights=sim.magnitude**2, init=start, std_errors=False)
    lm_seconds = time.perf_counter() - t0
    gn = echoes._phasor_gauss_newton(jnp.asarray(sim.phase[head]), jnp.asarray(m**2, jnp.float32),
                                     jnp.asarray(tes, jnp.float32), jnp.asarray(phi0, jnp.float32),
                                     jnp.asarray(omega / (2 * np.pi), jnp.float32), echoes.PHASOR_STEPS)[1]
    gn_map = np.zeros(head.shape, np.float32)
    gn_map[head] = np.asarray(gn)
    diff = np.abs(gn_map - lm.params["field_hz"])[head & brain]
    print(f"# field fit, head {args.head}, {args.resolution} mm, {int(head.sum())} voxels in the head mask; "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}\n")
    print("| | wall s |\n|---|---|")
    print(f"| fit_multi_echo_field, first call (with compilation) | {seconds[0]:.1f} |")
    print(f"| fit_multi_echo_field, second call | {seconds[1]:.1f} |")
    print(f"| the complex fit by generic Levenberg-Marquardt (reference, same start) | {lm_seconds:.1f} |")
    print(f"\nGauss-Newton ({echoes.PHASOR_STEPS} steps) against Levenberg-Marquardt in the brain's "
          f"{diff.size} voxels: median |difference| {np.median(diff):.2g} Hz, 99.9th percentile "
          f"{np.percentile(diff, 99.9):.2g} Hz, {int(np.sum(diff > 0.1))} voxels above 0.1 Hz; field of the "
          f"fit against the truth (median |error| in the brain, after the median offset): "
          f"{np.median(np.abs((fit.field_hz - sim.truth.field_total_hz)[brain] - np.median((fit.field_hz - sim.truth.field_total_hz)[brain]))):.3f} Hz")


if __name__ == "__main__":
    main()
