"""The chain on JAX's default device (a GPU when there is one) against the same chain on the CPU.

The script to run when a GPU machine is lent: it simulates one head (default 1 mm, head A, 5 echoes,
SNR 100, healthy), then runs magnitude and phase to chi-separation's maps in two fresh processes, one on
JAX's default backend and one with ``JAX_PLATFORMS=cpu``, each twice (the second pass compiled), and
prints the wall time of every stage on both and how far the maps of the two differ (masks voxel for
voxel; fields, R2*, chi, chi_para and chi_dia as the largest difference and as NRMSE of one against
the other). The goal the speed issue sets: the whole chain, DECOMPOSE excluded, under 10 s on an H200.
On a machine without a GPU both processes run on the CPU, which checks the script itself.

    python benchmarks/bench_gpu.py [--resolution 1] [--head A]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from chisep import metrics, workflows

_CHILD = """
import json, pickle, sys, time, warnings
warnings.simplefilter("ignore")
import jax
import numpy as np
from chisep import pipeline
pipeline.keep_freed_memory()
magnitude, phase, acquisition = pickle.load(open(sys.argv[1], "rb"))
passes = []
for _ in range(2):
    t0 = time.perf_counter()
    qsm = pipeline.reconstruct_qsm(magnitude, phase, acquisition)
    timings = dict(qsm.timings, qsm=time.perf_counter() - t0)
    fits = pipeline.separate(acquisition, qsm.separation_inputs(magnitude=qsm.magnitude),
                             settings=pipeline.SeparationSettings(models=("chi-separation",)), timings=timings)
    timings["total"] = time.perf_counter() - t0
    passes.append(timings)
sep = fits["chi-separation"]
np.savez(sys.argv[2], mask=qsm.mask, region=qsm.reconstruction_mask, field=qsm.field_total, r2star=qsm.r2star,
         chi=qsm.chi, chi_para=sep.chi_para, chi_dia=sep.chi_dia)
print(json.dumps({"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "passes": passes}))
"""

MASKS = ("mask", "region")
MAPS = ("field", "r2star", "chi", "chi_para", "chi_dia")


def run(data: Path, maps: Path, cpu: bool) -> dict:
    env = dict(os.environ)
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _CHILD, str(data), str(maps)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--head", default="A")
    args = parser.parse_args()
    sim = workflows.simulate(resolution=args.resolution, head=args.head, scenario="healthy", snr=100.0,
                             echo_times=(0.005, 0.011, 0.017, 0.023, 0.029))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.pkl"
        with open(data, "wb") as f:
            pickle.dump((sim.magnitude, sim.phase, sim.acquisition), f)
        device = run(data, Path(tmp) / "device.npz", cpu=False)
        cpu = run(data, Path(tmp) / "cpu.npz", cpu=True)
        a, b = np.load(Path(tmp) / "device.npz"), np.load(Path(tmp) / "cpu.npz")
        print(f"{args.resolution} mm head {args.head}, healthy, SNR 100, 5 echoes; default backend "
              f"{device['backend']} ({', '.join(device['devices'])}), against the CPU\n")
        print(f"| step (wall s: compiled pass; first pass) | {device['backend']} | cpu |\n|---|---|---|")
        for step in device["passes"][1]:
            cells = [f"{r['passes'][1].get(step, float('nan')):.2f}; {r['passes'][0].get(step, float('nan')):.2f}"
                     for r in (device, cpu)]
            print(f"| {step} | {cells[0]} | {cells[1]} |")
        print(f"\n| map | {device['backend']} against cpu |\n|---|---|")
        for name in MASKS:
            print(f"| {name} | {int(np.count_nonzero(a[name] != b[name]))} voxels differ of "
                  f"{int(np.count_nonzero(b[name]))} |")
        both = a["mask"] & b["mask"]
        for name in MAPS:
            diff = np.abs(a[name].astype(np.float64) - b[name])[both]
            print(f"| {name} | largest difference {diff.max():.3g}, NRMSE {metrics.nrmse(a[name], b[name], both):.3f} % |")


if __name__ == "__main__":
    main()
