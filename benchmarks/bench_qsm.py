"""Accuracy and speed of every background-removal and dipole-inversion method on the head phantom.

Background removal starts from the simulated total field and is scored
against the simulated local field (NRMSE inside the mask each method returns,
and inside that mask minus a 5 mm rim); the simulator makes its background
with the finite-difference kernel, so it is harmonic inside the brain, and
the row "local only" (no background at all) shows the floor set by the part
of the local field that is itself harmonic in the mask (CSF rim, surface
veins). Dipole inversion starts from the
true local field and is scored by NRMSE, HFEN and XSIM inside the brain mask,
deep-grey-matter ROI means (both maps referenced to their mean in the mask)
and the slope of estimated against true ROI means.

Times are wall-clock seconds of a second (compiled) call; the first call,
which includes JIT compilation, is shown in brackets.

Usage::

    python benchmarks/bench_qsm.py [--resolution 1.0] [--background vsharp,pdf] [--inversion tv,medi]

Prints markdown tables; it writes no files.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from chisep import metrics, physics
from chisep.qsm import background as bg
from chisep.qsm import inversion as inv
from chisep.sim.gre import simulate_gre
from chisep.sim.phantom import head_phantom

DEEP_GREY = ("caudate", "putamen", "globus_pallidus", "thalamus", "substantia_nigra", "red_nucleus", "dentate")


def timed(func, repeat):
    start = time.perf_counter()
    out = func()
    first = time.perf_counter() - start
    best = first
    for _ in range(repeat - 1):
        start = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - start)
    return out, first, best


def bench_background(fields, mask, voxel_size, b0, methods, repeat, rim_mm):
    depth = ndimage.distance_transform_edt(mask, sampling=voxel_size)
    rows = []
    for method in methods:
        row = [method]
        for name, (total, local) in fields.items():
            (out, used), first, best = timed(
                lambda: bg.remove_background(total, mask, method=method, voxel_size=voxel_size, b0_direction=b0),
                repeat)
            row += [f"{metrics.nrmse(out, local, used):.1f}", f"{metrics.nrmse(out, local, used & (depth > rim_mm)):.1f}"]
        row += [f"{used.sum() / mask.sum():.3f}", f"{best:.1f} ({first:.1f})"]
        rows.append(row)
    head = ["method"]
    for name in fields:
        head += [f"NRMSE % ({name})", f"NRMSE % ({name}, >{rim_mm:g} mm deep)"]
    head += ["mask kept", "time s"]
    return head, rows


def bench_inversion(local, truth, sim, voxel_size, b0, field_strength, methods, repeat):
    mask = sim.truth.brain_mask
    labels = sim.truth.labels
    names = {name: value for value, name in sim.truth.label_names.items() if name in DEEP_GREY}
    truth_ref = inv.reference(truth, mask)
    true_rois = metrics.roi_means(truth_ref, labels, names)
    magnitude = sim.magnitude[..., 0]
    rows = []
    for method in methods:
        chi, first, best = timed(
            lambda: inv.invert(local, mask, method=method, voxel_size=voxel_size, b0_direction=b0,
                               field_strength=field_strength, magnitude=magnitude), repeat)
        chi_ref = inv.reference(chi, mask)
        rois = metrics.roi_means(chi_ref, labels, names)
        slope, _ = metrics.linear_fit_slope([rois[n] for n in names], [true_rois[n] for n in names])
        rows.append([method, f"{metrics.nrmse(chi, truth, mask):.1f}", f"{metrics.detrended_nrmse(chi, truth, mask):.1f}",
                     f"{metrics.hfen(chi, truth, mask):.1f}", f"{metrics.xsim(chi, truth, mask):.3f}", f"{slope:.2f}"]
                    + [f"{1000 * rois[n]:.0f}" for n in names] + [f"{best:.1f} ({first:.1f})"])
    head = ["method", "NRMSE %", "dNRMSE %", "HFEN %", "XSIM", "DGM slope"] + [f"{n} ppb" for n in names] + ["time s"]
    truth_row = ["truth", "", "", "", "", ""] + [f"{1000 * true_rois[n]:.0f}" for n in names] + [""]
    return head, [truth_row] + rows


def markdown(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0, help="voxel size in mm (default 1)")
    parser.add_argument("--field-strength", type=float, default=3.0, help="T (default 3)")
    parser.add_argument("--background", default=",".join(bg.BACKGROUND_METHODS), help="comma-separated methods")
    parser.add_argument("--inversion", default=",".join(inv.INVERSION_METHODS), help="comma-separated methods")
    parser.add_argument("--repeat", type=int, default=2, help="calls per method; the fastest is reported")
    parser.add_argument("--rim-mm", type=float, default=5.0, help="rim excluded in the deep score (mm)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    phantom = head_phantom(args.resolution)
    sim = simulate_gre(phantom, field_strength=args.field_strength, snr=None)
    truth = sim.truth
    vs = tuple(float(v) for v in phantom.voxel_size)
    b0 = tuple(physics.b0_direction_from_affine(sim.acquisition.affine))
    mask = truth.brain_mask
    print(f"phantom {phantom.shape} at {args.resolution:g} mm, {args.field_strength:g} T, B0 {np.round(b0, 3)}; "
          f"simulated in {time.perf_counter() - start:.1f} s")
    print(f"local field rms {np.std(truth.field_local_hz[mask]):.2f} Hz, "
          f"background rms {np.std(truth.field_background_hz[mask]):.2f} Hz inside the mask\n")

    methods = [m for m in args.background.split(",") if m]
    if methods:
        fields = {"sim": (truth.field_total_hz, truth.field_local_hz),
                  "local only": (truth.field_local_hz, truth.field_local_hz)}
        head, rows = bench_background(fields, mask, vs, b0, methods, args.repeat, args.rim_mm)
        print("### Background removal (true total field -> local field)\n")
        print(markdown(head, rows) + "\n")

    methods = [m for m in args.inversion.split(",") if m]
    if methods:
        head, rows = bench_inversion(truth.field_local_hz, truth.chi, sim, vs, b0, args.field_strength, methods,
                                     args.repeat)
        print("### Dipole inversion (true local field -> chi)\n")
        print(markdown(head, rows))


if __name__ == "__main__":
    main()
