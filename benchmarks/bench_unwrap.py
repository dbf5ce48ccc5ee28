"""Speed and exactness of phase unwrapping on a 1 mm phantom-like volume.

Builds a 197 x 233 x 189 volume (the MNI 1 mm grid) with an ellipsoidal
"brain" mask of about 1.5 M voxels and a smooth phase of ramps and Gaussian
blobs (up to +-30 rad) plus Gaussian noise, wraps it, and times
chisep's ROMEO-style and Laplacian unwrapping against
``skimage.restoration.unwrap_phase`` (Herraez et al. 2002) on the same masked
volume. Prints a markdown table (one row per method): runtime and the number
of in-mask voxels whose error is not the global 2 pi multiple.

Run: ``python benchmarks/bench_unwrap.py [--no-skimage] [--noise RAD]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from chisep.physics import wrap_phase
from chisep.qsm.unwrap import unwrap_laplacian, unwrap_romeo

SHAPE = (197, 233, 189)


def phantom(noise_rad: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    axes = [np.arange(n, dtype=np.float32) - n / 2 for n in SHAPE]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    mask = (x / 70.0) ** 2 + (y / 88.0) ** 2 + (z / 62.0) ** 2 < 1.0
    truth = 0.04 * x - 0.03 * y + 0.02 * z
    blobs = [((20, 30, 0), 30.0, 14.0), ((-30, -20, 10), -25.0, 12.0),
             ((0, 50, -20), 20.0, 10.0), ((10, -50, 20), -30.0, 15.0)]
    for (cx, cy, cz), amp, sigma in blobs:
        truth = truth + amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    truth = truth.astype(np.float32)
    magnitude = np.where(mask, 1.0, 0.05).astype(np.float32)
    phase = wrap_phase(truth + rng.normal(0.0, noise_rad, SHAPE).astype(np.float32)).astype(np.float32)
    return truth, phase, magnitude, mask


def wrong_voxels(unwrapped, truth, mask) -> int:
    diff = (unwrapped - truth)[mask]
    k = np.rint((diff - np.median(diff)) / (2 * np.pi))
    return int(np.count_nonzero(k))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-skimage", action="store_true")
    parser.add_argument("--noise", type=float, default=0.2, help="phase noise std (rad)")
    args = parser.parse_args()

    truth, phase, magnitude, mask = phantom(args.noise)
    print(f"grid {SHAPE}, {int(mask.sum())} voxels in mask, phase noise {args.noise} rad\n")
    rows = []

    t0 = time.perf_counter()
    u = unwrap_romeo(phase, mask, magnitude=magnitude)
    rows.append(("chisep romeo (MST)", time.perf_counter() - t0, wrong_voxels(u, truth, mask)))

    t0 = time.perf_counter()
    u = unwrap_laplacian(phase, mask)
    t_lap = time.perf_counter() - t0
    diff = (u - truth)[mask]
    rms = float(np.sqrt(np.mean((diff - diff.mean()) ** 2)))
    rows.append((f"chisep laplacian (rms error {rms:.2f} rad)", t_lap, None))

    if not args.no_skimage:
        from skimage.restoration import unwrap_phase

        t0 = time.perf_counter()
        u = np.asarray(unwrap_phase(np.ma.masked_array(phase, mask=~mask)).filled(0.0))
        rows.append(("skimage unwrap_phase", time.perf_counter() - t0, wrong_voxels(u, truth, mask)))

    print("| method | runtime (s) | voxels off by 2 pi |")
    print("|---|---|---|")
    for name, seconds, wrong in rows:
        print(f"| {name} | {seconds:.1f} | {'n/a' if wrong is None else wrong} |")
    if not args.no_skimage:
        print(f"\nspeed-up of romeo over skimage: {rows[2][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
