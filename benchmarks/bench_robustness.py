"""Robustness matrix: end-to-end QSM on the simulator across acquisitions, with ground truth.

Each case changes one thing against the standard case (3 T, six echoes 4-34 ms,
SNR 100, axial, whole head, healthy phantom) and reports the accuracy of the
total field, R2* and chi against the truth, plus whether every output map is
finite inside the mask. ``tests/test_robustness.py`` runs the same cases at
5 mm and asserts bounds relative to the standard case; this script runs them
at a chosen resolution and prints a markdown table.

Usage::

    python benchmarks/bench_robustness.py --resolution 2 [--cases standard,7T,...] [--phantom head --head B]

The cases, their simulation and their scoring live in :mod:`chisep.robustness`.
"""

from __future__ import annotations

import argparse
import sys
import time

from chisep import pipeline
from chisep.robustness import CASE_NAMES, CASES, prepare, run_case


def markdown_table(rows: list[dict]) -> str:
    head = ("| case | shape | field median err (Hz) | field >5 Hz off (%) | R2* median rel err (%) | "
            "chi corr | lesion chi est/true (ppm) | non-finite | warnings | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lesion = (f"{r['lesion_mean_chi']:.2f}/{r['lesion_true_chi']:.2f}" if "lesion_mean_chi" in r else "")
        nonfinite = sum(r["nonfinite_in_mask"].values())
        warn = "; ".join(w[:60] for w in r["warnings"] + r["notes"])
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['field_median_err_hz']:.3f} | "
                     f"{100 * r['field_wrong_fraction']:.2f} | {100 * r['r2star_median_rel_err']:.1f} | "
                     f"{r['chi_corr']:.3f} | {lesion} | {nonfinite} | {warn} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=float, default=1.5, help="isotropic voxel size in mm")
    parser.add_argument("--anisotropic", default="0.6,0.6,2", help="voxel size of the anisotropic case (mm)")
    parser.add_argument("--cases", default=",".join(CASE_NAMES))
    parser.add_argument("--background", default="pdf")
    parser.add_argument("--inversion", default="tv")
    parser.add_argument("--phantom", choices=("simple", "head"), default="simple",
                        help="simple: label phantom on the output grid (as the tests); head: the realistic head")
    parser.add_argument("--head", choices=("A", "B"), default="A")
    args = parser.parse_args(argv)
    chosen = [c for c in CASES if c.name in args.cases.split(",")]
    settings = pipeline.QsmSettings(background=args.background, inversion=args.inversion)
    aniso = tuple(float(v) for v in args.anisotropic.split(","))
    rows = []
    for case in chosen:
        t0 = time.perf_counter()
        prep = prepare(case, args.resolution, anisotropic=aniso, phantom=args.phantom, head=args.head)
        row = run_case(prep, settings)
        row.pop("qsm"), row.pop("maps")
        rows.append(row)
        # one line per case as it finishes, so a long run that is stopped still reports
        print(f"{case.name} ({time.perf_counter() - t0:.0f} s): {markdown_table([row]).splitlines()[-1]}",
              file=sys.stderr, flush=True)
    print(f"\nResolution {args.resolution} mm (anisotropic case {args.anisotropic} mm), background "
          f"{args.background}, inversion {args.inversion}, phantom {args.phantom}"
          f"{' ' + args.head if args.phantom == 'head' else ''}; masks: pipeline mask & true brain.\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
