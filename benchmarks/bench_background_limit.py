"""What two-step QSM loses to background removal on the realistic heads, and why (input for the total-field issue).

Background removal keeps what is not harmonic in the brain; the field of the brain's own
sources has a harmonic part too, which every two-step method (V-SHARP, LBV, PDF) throws
away with the background. This script measures that loss on chisep's realistic heads,
separately from noise and from the measured field's errors:

- the default chain (V-SHARP + MEDI) and LBV + MEDI on the measured total field;
- the same background methods on the simulator's TRUE total field (no fit error);
- MEDI on the TRUE local field (everything background removal could at best hand on);
- the field of the true chi inside the reconstruction region alone, ``f_R = D * (chi 1_region)``
  (no source outside the region, no partial volume, no noise): MEDI on ``f_R`` directly, and
  after LBV / V-SHARP on ``f_R``. The difference is background removal's own loss: the
  harmonic part of the brain's field. ``f_R`` uses the reconstruction's grid and kernel on
  purpose: this isolates one effect, it is not an accuracy claim;
- the local field's error by depth below the region's surface;
- what the separation needs (``--separation``): chi-separation and the thresholded-QSM baseline
  fed the true chi / local field and the true R2', each in turn replaced by the measured one
  (R2' = R2* - measured R2), scored in healthy tissue.

Scores: chi NRMSE % (demeaned, over the true brain; whole brain / healthy tissue), and the
local field error's standard deviation (Hz) in healthy tissue, beside the true local
field's.

    python benchmarks/bench_background_limit.py [--resolution 2] [--heads A,B] [--oblique 30 [--tilt-axis y]]
        [--separation]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

# the scripts run from this folder (python benchmarks/...), which is then on the import path
from bench_head import healthy_tissue  # one definition of "healthy tissue" for both scripts
from scipy import ndimage

from chisep import metrics, physics, pipeline
from chisep.qsm import background, inversion
from chisep.separation import MODELS
from chisep.separation.base import SeparationInputs
from chisep.separation.baseline import thresholded_qsm
from chisep.sim import simulate_head

DEPTHS_MM = ((0, 4), (4, 8), (8, 16), (16, 30), (30, 1000))


def separation_needs(sim, qsm) -> list[str]:
    """chi_para / chi_dia NRMSE % in healthy tissue with true and measured chi and R2'."""
    t, acq = sim.truth, sim.acquisition
    healthy = healthy_tissue(t) & qsm.mask

    def scores(para, dia):
        return f"{metrics.nrmse(para, t.chi_para, healthy):.0f} / {metrics.nrmse(dia, t.chi_dia, healthy):.0f}"

    measured_r2prime = np.maximum(qsm.r2star - sim.r2_measured, 0)
    rows = [f"| thresholded QSM, true chi | {scores(*thresholded_qsm(t.chi))} |",
            f"| thresholded QSM, measured chi (the baseline) | {scores(*thresholded_qsm(qsm.chi))} |"]
    model = MODELS.build("chi-separation", acq)
    for field_name, chi, field in (("true", t.chi, t.field_local_hz), ("measured", qsm.chi, qsm.field_local)):
        for r2_name, r2prime in (("true", t.r2prime), ("measured", measured_r2prime)):
            fit = model.fit(SeparationInputs(mask=qsm.mask, chi=chi, local_field_hz=field, r2prime=r2prime,
                                             field_noise_hz=qsm.field_noise_used, magnitude=qsm.magnitude,
                                             r2prime_unknown=qsm.reliability.enclosed))
            rows.append(f"| chi-separation, {field_name} local field, {r2_name} R2' | "
                        f"{scores(fit.chi_para, fit.chi_dia)} |")
    return rows


def run(sim, qsm) -> tuple[list[str], list[str]]:
    """Rows of the chain table and of the depth table."""
    t, acq = sim.truth, sim.acquisition
    brain, healthy = t.brain_mask, healthy_tissue(t)
    region, noise, mag = qsm.reconstruction_mask, qsm.field_noise_used, qsm.magnitude[..., 0]
    kw = dict(voxel_size=acq.voxel_size, b0_direction=acq.b0_direction, field_strength=acq.field_strength)

    def chi_score(chi, mask):
        chi = inversion.reference(chi, mask, method="mean")
        return f"{metrics.nrmse(chi, t.chi, brain):.1f} / {metrics.nrmse(chi, t.chi, healthy):.1f}"

    def medi(field, mask):
        return inversion.medi(field, mask, weights=pipeline._noise_weights(noise, mask), magnitude=mag, **kw)

    def local_error(local, mask, reference):
        scored = healthy & mask
        err = (local - reference)[scored]
        return f"{np.std(err):.3f} ({np.std(reference[scored]):.3f})"

    rows = [f"| default (V-SHARP + MEDI), measured total field | {chi_score(qsm.chi, qsm.mask)} | "
            f"{local_error(qsm.field_local, qsm.mask, t.field_local_hz)} |"]
    weights = pipeline._noise_weights(noise, region)
    for label, field in (("measured", qsm.field_total), ("TRUE", t.field_total_hz)):
        for method in ("vsharp", "lbv"):
            if label == "measured" and method == "vsharp":
                continue  # the default row
            local, out = background.remove_background(field, region, method=method, voxel_size=acq.voxel_size,
                                                      b0_direction=acq.b0_direction, weights=weights)
            rows.append(f"| {method} + MEDI, {label} total field | {chi_score(medi(local, out), out)} | "
                        f"{local_error(local, out, t.field_local_hz)} |")
    rows.append(f"| MEDI on the TRUE local field (no background removal) | "
                f"{chi_score(medi(t.field_local_hz, region), region)} | 0 |")
    own = np.asarray(physics.forward_field_hz(np.where(region, t.chi, 0), acq.field_strength, acq.voxel_size,
                                              acq.b0_direction))
    rows.append(f"| MEDI on f_R (the region's own sources' field) | {chi_score(medi(own, region), region)} | 0 |")
    depth_rows = []
    distance = ndimage.distance_transform_edt(region, sampling=acq.voxel_size)
    for method in ("vsharp", "lbv"):
        local, out = background.remove_background(own, region, method=method, voxel_size=acq.voxel_size,
                                                  b0_direction=acq.b0_direction)
        rows.append(f"| {method} on f_R, then MEDI | {chi_score(medi(local, out), out)} | "
                    f"{local_error(local, out, own)} |")
        scored = healthy & out
        err = np.where(scored, local - own, 0)
        err[scored] -= err[scored].mean()
        cells = []
        for lo, hi in DEPTHS_MM:
            shell = scored & (distance > lo) & (distance <= hi)
            cells.append(f"{np.sqrt(np.mean(err[shell] ** 2)):.2f}" if shell.any() else "-")
        depth_rows.append(f"| {method} on f_R | " + " | ".join(cells) + " |")
    return rows, depth_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--heads", default="A,B")
    parser.add_argument("--oblique", type=float, default=0.0, help="B0 angle from voxel z in degrees")
    parser.add_argument("--tilt-axis", choices=("x", "y"), default="x")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--separation", action="store_true", help="also what the separation needs")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    sin, cos = np.sin(np.deg2rad(args.oblique)), np.cos(np.deg2rad(args.oblique))
    b0 = None if not args.oblique else (0.0, sin, cos) if args.tilt_axis == "x" else (sin, 0.0, cos)
    print(f"# {args.resolution:g} mm, B0 {args.oblique:g} deg about {args.tilt_axis}, SNR {args.snr:g}, "
          "automatic mask; chi NRMSE % (whole brain / healthy) and local field error SD in Hz (true local SD)\n")
    for head in args.heads.split(","):
        sim = simulate_head(args.resolution, head=head, scenario="all", snr=args.snr, seed=0, b0_direction=b0)
        qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, sim.acquisition)
        rows, depth_rows = run(sim, qsm)
        print(f"## head {head}\n\n| chain | chi NRMSE % | local field error SD, Hz (truth SD) |\n|---|---|---|")
        print("\n".join(rows))
        header = " | ".join(f"{lo}-{hi}" if hi < 1000 else f">{lo}" for lo, hi in DEPTHS_MM)
        print("\nLocal field error (RMS, Hz) of background removal on f_R by depth below the region's surface (mm)\n")
        print(f"| method | {header} |\n|---" + "|---" * len(DEPTHS_MM) + "|")
        print("\n".join(depth_rows) + "\n", flush=True)
        if args.separation:
            print("chi_para / chi_dia NRMSE % in healthy tissue (output mask) with true or measured inputs\n\n"
                  "| inputs | chi_para / chi_dia |\n|---|---|")
            print("\n".join(separation_needs(sim, qsm)) + "\n", flush=True)


if __name__ == "__main__":
    main()
