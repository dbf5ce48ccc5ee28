"""What a new user waits for: ``chisep --help`` and ``chisep demo``.

Times the installed ``chisep`` command (run it from the environment a user would
have, e.g. a fresh virtual environment with ``pip install .``): ``--help`` and
``run --help`` five times each (median and worst), and with ``--demo`` the whole
demo in a temporary folder, twice: with an empty JAX compilation cache and with the
cache the first run filled (wall times and peak memory of the child processes).

Usage::

    python benchmarks/bench_cli.py [--demo] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import tempfile
import time


def timed(command: list[str], cwd: str | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also time `chisep demo` (about a minute)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    chisep = shutil.which("chisep")
    if chisep is None:
        raise SystemExit("no `chisep` command on PATH: pip install . first")
    print(f"chisep at {chisep}")
    for command in (["--help"], ["run", "--help"]):
        times = [timed([chisep, *command]) for _ in range(args.repeats)]
        print(f"chisep {' '.join(command)}: median {statistics.median(times):.2f} s, worst {max(times):.2f} s "
              f"({args.repeats} runs)")
    if args.demo:
        with tempfile.TemporaryDirectory() as folder:
            # an empty compilation cache (a first run), then the same run again (what every later run sees)
            cache = ["--compile-cache", f"{folder}/jax-cache"]
            cold = timed([chisep, "demo", "--quiet", "--out", "first", *cache], cwd=folder)
            warm = timed([chisep, "demo", "--quiet", "--out", "second", *cache], cwd=folder)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        print(f"chisep demo: {cold:.0f} s wall with an empty compilation cache, {warm:.0f} s with the cache of "
              f"that run; peak memory {peak_gb:.1f} GB")


if __name__ == "__main__":
    main()
