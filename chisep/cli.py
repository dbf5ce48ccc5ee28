"""The ``chisep`` command line.

Each sub-command parses its options, calls :mod:`chisep.pipeline` (pure
computation) and :mod:`chisep.io` (files). Errors end with a one-paragraph
message and a non-zero exit status; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Sequence

from chisep import __version__, signals
from chisep.acquisition import check_echo_times
from chisep.errors import ChisepError, InputError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


# ---------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------
def parse_echo_times_ms(text: str) -> tuple[float, ...]:
    """Comma-separated echo times in milliseconds -> seconds.

    Values that look like seconds (all below 0.5) are refused with a hint,
    since a silent factor of 1000 would scale every field map.
    """
    try:
        # commas and/or spaces separate values; never join "4 10" into 410
        values = [float(v) for v in re.split(r"[,\s]+", str(text).strip()) if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--echo-times expects comma-separated numbers in ms (e.g. 4,10,16), got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("--echo-times is empty; give e.g. 4,10,16 (ms)")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--echo-times must be positive finite numbers (ms), got {text!r}")
    if max(values) < 0.5:
        raise argparse.ArgumentTypeError(
            f"--echo-times {text!r} look like seconds; the command line takes milliseconds "
            f"(e.g. {','.join(f'{v * 1000:g}' for v in values)})"
        )
    if max(values) > 1000:
        raise argparse.ArgumentTypeError(
            f"--echo-times {text!r}: gradient-echo times are below 1000 ms; give milliseconds (e.g. 4,10,16)"
        )
    if any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"--echo-times must be strictly increasing, got {text!r}")
    seconds = tuple(v / 1000.0 for v in values)
    try:  # what the parser lets through, Acquisition must accept (e.g. no underflow to 0 s)
        check_echo_times(seconds)
    except InputError as exc:
        raise argparse.ArgumentTypeError(f"--echo-times {text!r} (ms): {exc}") from None
    return seconds


def _positive_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a number, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text!r}")
        return value

    return parse


def _resolution(text: str):
    """One size (isotropic) or three comma-separated sizes in mm."""
    parts = str(text).split(",")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(
            f"--resolution expects one size or three comma-separated sizes in mm, got {text!r}"
        )
    values = [_positive_float("--resolution")(p) for p in parts]
    return values[0] if len(values) == 1 else tuple(values)


def _model_list(text: str) -> tuple[str, ...]:
    from chisep.settings import MODEL_NAMES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in MODEL_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(bad) or repr(text)}; valid: {', '.join(MODEL_NAMES)}"
        )
    return names


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------
def _add_inputs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs (files, or a BIDS folder)")
    g.add_argument("--magnitude", nargs="+", metavar="FILE", help="4D NIfTI or one 3D NIfTI per echo")
    g.add_argument("--phase", nargs="+", metavar="FILE", help="4D NIfTI or one 3D NIfTI per echo")
    g.add_argument("--echo-times", type=parse_echo_times_ms, metavar="MS,MS,...",
                   help="echo times in ms (overrides JSON sidecars, which are in s)")
    g.add_argument("--field-strength", type=_positive_float("--field-strength"), metavar="T",
                   help="B0 in tesla (overrides sidecars)")
    g.add_argument("--bids", metavar="DIR", help="BIDS root, subject folder or anat folder")
    g.add_argument("--subject", metavar="LABEL", help="BIDS subject (with or without sub-)")
    g.add_argument("--session", metavar="LABEL", help="BIDS session")
    g.add_argument("--phase-sign", type=int, choices=(1, -1), default=1,
                   help="multiply the stored phase by this (vendor convention; default 1)")
    g.add_argument("--mask", metavar="FILE",
                   help="brain mask NIfTI, used instead of the automatic mask as the outer limit; voxels "
                        "inside it whose field is unreliable (skull, air) are still left out, and the log says so")


def _add_qsm_options(p: argparse.ArgumentParser) -> None:
    from chisep import settings  # the settings alone: no JAX for --help

    g = p.add_argument_group("QSM reconstruction")
    d = settings.QsmSettings()
    g.add_argument("--unwrap", choices=settings.UNWRAP_METHODS, default=d.unwrap,
                   help="phase unwrapping: romeo (quality-guided region growing), laplacian, or none "
                        "(the phase files are already unwrapped, e.g. by ROMEO)")
    g.add_argument("--field-fit", choices=settings.FIELD_FIT_METHODS, default=d.field_fit,
                   help="multi-echo field estimate: nonlinear complex fit, weighted linear fit or echo average")
    g.add_argument("--r2star-method", choices=settings.R2STAR_METHODS, default=d.r2star,
                   help="R2* fit (auto: arlo with 3+ equally spaced echoes, else log-linear)")
    g.add_argument("--background", choices=settings.BACKGROUND_METHODS, default=d.background,
                   help="background field removal, for the two-step inversions (medi, tv, ...); single-step "
                        "takes the total field")
    g.add_argument("--inversion", choices=settings.INVERSION_METHODS, default=d.inversion,
                   help="dipole inversion (single-step: of the total field, no background step; medi: "
                        "morphology-enabled, after --background)")
    g.add_argument("--denoise", choices=settings.DENOISE_METHODS, default=d.denoise,
                   help="denoise the multi-echo magnitude before R2* and separation (MP-PCA, Veraart et al. "
                        "2016; the phase is not touched)")
    g.add_argument("--mask-erode", type=float, default=d.mask_erode_mm, metavar="MM",
                   help="erode the automatic brain mask by this many mm")
    g.add_argument("--reference", choices=("mean", "csf"), default=d.reference,
                   help="zero of chi: mean of the mask, or CSF (voxels with R2* < 5 1/s)")


def _add_compile_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", metavar="DIR",
                   help="folder where JAX keeps compiled programs, so a second run on data of the same size does "
                        "not compile again (default: $CHISEP_COMPILE_CACHE, else ~/.cache/chisep/jax; 'off': none)")


#: commands that compute with JAX (the batch command has its own cache option, shared by its workers)
_COMPUTING = ("qsm", "separate", "run", "demo")


def _use_compile_cache(args) -> None:
    from chisep import pipeline

    value = args.compile_cache
    path = pipeline.default_compilation_cache() if value is None else (None if value == "off" else Path(value))
    if path is not None:
        pipeline.use_compilation_cache(path)


def _keep_freed_memory() -> None:
    import os

    from chisep import pipeline

    if os.environ.get(pipeline.KEEP_FREED_MEMORY_ENV, "").strip().lower() != "off":
        pipeline.keep_freed_memory()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress output")


class _Parser(argparse.ArgumentParser):
    """Errors as two short lines (what is wrong, where the help is), not the whole usage block first."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n(see: {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends every option's default to its help text (unless the text already names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and not action.required and default is not None and default is not False
                and default != argparse.SUPPRESS
                and "default" not in text):
            shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            text += f" (default: {str(shown).replace('%', '%%')})"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chisep", formatter_class=_HelpFormatter,
        description="QSM and susceptibility source separation (iron vs myelin/calcium).",
        epilog="Units: echo times on the command line in ms; maps in ppm (chi), Hz (fields), 1/s (R2*).",
    )
    parser.add_argument("--version", action="version", version=f"chisep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate the built-in head phantom as a BIDS dataset")
    from chisep.sim.phantom import SCENARIOS

    p.add_argument("--out", required=True, metavar="DIR", help="BIDS folder to write (sub-LABEL/anat/ inside)")
    p.add_argument("--resolution", type=_resolution, default=2.0, metavar="MM",
                   help="voxel size in mm: one value or three (e.g. 1,1,2)")
    _add_phantom_options(p)
    p.add_argument("--snr", type=_positive_float("--snr"), default=100.0,
                   help="first-echo signal-to-noise ratio in brain tissue (clinical 1 mm scans: about 30)")
    p.add_argument("--field-strength", type=_positive_float("--field-strength"), default=3.0, metavar="T",
                   help="B0 in tesla")
    p.add_argument("--echo-times", type=parse_echo_times_ms, default=None, metavar="MS,MS,...",
                   help="echo times in ms (default: 5,11,17,23,29 for the head, 4,10,...,34 for the simple phantom)")
    p.add_argument("--b0-angle", type=float, default=0.0, metavar="DEG",
                   help="oblique acquisition: tilt of the slab against B0 in degrees")
    p.add_argument("--scenario", choices=SCENARIOS, default="healthy",
                   help="pathology added to the healthy head (all: every one of them)")
    p.add_argument("--seed", type=int, default=0, help="random seed of noise and textures")
    p.add_argument("--subject", default="phantom", metavar="LABEL", help="BIDS subject label")
    p.add_argument("--integer-phase", action="store_true",
                   help="store phase as integers -4096..4095 (as many scanners do)")
    _add_common(p)

    p = sub.add_parser("qsm", help="QSM reconstruction: mask, field, R2*, local field, chi")
    _add_inputs(p)
    _add_qsm_options(p)
    p.add_argument("--out", metavar="DIR", help="output folder (BIDS input: default derivatives/chisep/)")
    _add_compile_cache(p)
    _add_common(p)

    p = sub.add_parser("separate", help="susceptibility source separation from QSM outputs")
    p.add_argument("--chi", required=True, metavar="FILE", help="QSM map (ppm)")
    p.add_argument("--local-field", metavar="FILE", help="local field (Hz); chi-separation needs it or --total-field")
    p.add_argument("--total-field", metavar="FILE",
                   help="total field (Hz), e.g. field_total.nii.gz of `chisep qsm`: chi-separation then fits it "
                        "(background included) as the single-step inversion does")
    p.add_argument("--r2star", metavar="FILE", help="R2* map (1/s); required for linear and chi-separation")
    p.add_argument("--r2", metavar="FILE", help="measured R2 map (1/s); else a nominal R2 is used")
    p.add_argument("--field-noise", metavar="FILE", help="field noise map (Hz), used as data weights")
    p.add_argument("--mask", metavar="FILE", help="brain mask NIfTI (default: the voxels where --chi is non-zero)")
    p.add_argument("--field-strength", type=_positive_float("--field-strength"), required=True, metavar="T",
                   help="B0 in tesla")
    p.add_argument("--magnitude", nargs="+", metavar="FILE", help="multi-echo magnitude (DECOMPOSE)")
    p.add_argument("--phase", nargs="+", metavar="FILE", help="multi-echo phase (optional for DECOMPOSE)")
    p.add_argument("--echo-times", type=parse_echo_times_ms, metavar="MS,MS,...",
                   help="echo times in ms of --magnitude (DECOMPOSE)")
    p.add_argument("--model", type=_model_list, required=True, metavar="NAME[,NAME]",
                   help="linear, chi-separation or decompose (comma-separated for several)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_compile_cache(p)
    _add_common(p)

    p = sub.add_parser("run", help="files -> QSM -> source separation, with report")
    _add_inputs(p)
    _add_qsm_options(p)
    p.add_argument("--models", type=_model_list, default=None, metavar="NAME[,NAME]",
                   help="separation models, the first gives chi_para/chi_dia "
                        "(default: chi-separation,linear; decompose is experimental)")
    p.add_argument("--config", metavar="FILE", help="TOML settings ([qsm], [separation] tables)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="JAX device (default: JAX's choice, the GPU when one is installed)")
    p.add_argument("--r2", metavar="FILE", help="measured R2 map (1/s) for R2' (else a nominal R2)")
    p.add_argument("--labels", metavar="FILE", help="label image for roi_stats.csv (else the whole mask)")
    p.add_argument("--out", metavar="DIR", help="output folder (BIDS input: default derivatives/chisep/)")
    _add_compile_cache(p)
    _add_common(p)

    p = sub.add_parser("demo", help="simulate the phantom, run everything, print accuracy")
    p.add_argument("--out", default="chisep-demo", metavar="DIR", help="output folder (about 100 MB)")
    p.add_argument("--resolution", type=_resolution, default=2.0, metavar="MM", help="voxel size in mm")
    p.add_argument("--models", type=_model_list, default=None, metavar="NAME[,NAME]",
                   help="separation models to run and score (default: chi-separation,linear; add decompose "
                        "to see the experimental model, about 10 s more at 2 mm)")
    _add_phantom_options(p)
    _add_compile_cache(p)
    _add_common(p)
    _add_batch_parser(sub)
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
    return parser


def _add_phantom_options(p) -> None:
    p.add_argument("--phantom", choices=("head", "simple"), default="head",
                   help="head (default): realistic whole head simulated on a twice finer grid (skull, scalp fat, "
                        "coil bias, static-dephasing R2', a measured R2 map); simple: the label phantom on the "
                        "output grid (fast, for coarse tests; flatters every method)")
    p.add_argument("--head", choices=("A", "B"), default="A",
                   help="which realistic head: A (default) or the holdout B (other anatomy and tissue values)")


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------
def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def cmd_simulate(args) -> int:
    from chisep import workflows

    out = workflows.simulate_dataset(
        args.out,
        resolution=args.resolution,
        snr=args.snr,
        field_strength=args.field_strength,
        echo_times=args.echo_times,
        b0_angle_deg=args.b0_angle,
        scenario=args.scenario,
        seed=args.seed,
        subject=args.subject,
        integer_phase=args.integer_phase,
        phantom=args.phantom,
        head=args.head,
        overwrite=args.overwrite,
        log=lambda s: _say(args, s),
    )
    _say(args, f"wrote BIDS dataset {out['bids_root']} and ground truth {out['truth_dir']}")
    return 0


def _load_inputs(args, *, phase_unwrapped: bool = False):
    from chisep import io

    if args.bids and (args.magnitude or args.phase):
        raise InputError("give either --bids or --magnitude/--phase, not both")
    if args.bids:
        return io.load_bids(args.bids, args.subject, session=args.session, echo_times=args.echo_times,
                            field_strength=args.field_strength, phase_sign=args.phase_sign,
                            phase_unwrapped=phase_unwrapped)
    if not args.magnitude or not args.phase:
        raise InputError(
            "no input data: give --magnitude FILE... and --phase FILE... (with --echo-times and "
            "--field-strength unless JSON sidecars hold them), or --bids DIR"
        )
    return io.load_gre(args.magnitude, args.phase, echo_times=args.echo_times,
                       field_strength=args.field_strength, phase_sign=args.phase_sign,
                       phase_unwrapped=phase_unwrapped)


def _run(args, settings) -> None:
    from chisep import outputs, workflows

    data = _load_inputs(args, phase_unwrapped=settings.qsm.unwrap == "none")
    out, prefix = outputs.bids_output_dir(data.sources, args.out)
    run = workflows.run_files(data, out, settings=settings, mask_path=args.mask,
                             r2_path=getattr(args, "r2", None), labels_path=getattr(args, "labels", None),
                             bids_prefix=prefix, overwrite=args.overwrite, log=lambda s: _say(args, s),
                             progress_bars=not args.quiet)
    _say(args, run.summary)


def cmd_qsm(args) -> int:
    from chisep import pipeline

    settings = pipeline.PipelineSettings.from_sources(args=args, models=())
    _run(args, settings)
    return 0


def cmd_run(args) -> int:
    from chisep import pipeline

    if args.device:
        pipeline.select_device(args.device)
    settings = pipeline.PipelineSettings.from_sources(args=args, config_path=args.config, models=args.models)
    _run(args, settings)
    return 0


def cmd_separate(args) -> int:
    from chisep import workflows

    summary = workflows.separate_files(
        chi=args.chi, local_field=args.local_field, total_field=args.total_field, r2star=args.r2star, r2=args.r2,
        field_noise=args.field_noise, mask=args.mask, field_strength=args.field_strength,
        magnitude=args.magnitude, phase=args.phase, echo_times=args.echo_times,
        models=args.model, out_dir=args.out, overwrite=args.overwrite, log=lambda s: _say(args, s),
    )
    _say(args, summary)
    return 0


def cmd_demo(args) -> int:
    from chisep import settings, workflows

    summary = workflows.demo(args.out, resolution=args.resolution, overwrite=args.overwrite,
                             models=args.models or settings.DEFAULT_MODELS, phantom=args.phantom, head=args.head,
                             log=lambda s: _say(args, s))
    _say(args, summary)
    return 0


# --- batch (cohort processing on Dask; Dask is imported only by chisep.batch, when there is work) ---
def _add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="run every subject/session of a BIDS dataset as Dask tasks, with a cohort table",
                       description="Runs `chisep run` for every multi-echo GRE run under BIDS_ROOT on a Dask "
                                   "cluster; complete runs (provenance and input checksums match) are skipped. "
                                   "Outputs under BIDS_ROOT/derivatives/chisep/. Needs: pip install chisep[batch]")
    p.add_argument("bids_root", metavar="BIDS_ROOT")
    p.add_argument("--scheduler", metavar="ADDRESS", help="existing Dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, metavar="N", help="local worker processes (default: sized to the machine)")
    p.add_argument("--threads-per-worker", type=int, metavar="N", help="compute threads per local worker")
    p.add_argument("--retries", type=int, default=1, metavar="N", help="extra attempts for a failed run (default 1)")
    p.add_argument("--subject", nargs="+", metavar="LABEL", help="only these subjects")
    p.add_argument("--labels", metavar="PATTERN",
                   help="label image per run for the ROI tables, relative to BIDS_ROOT, with {subject}, {session}, "
                        "{prefix} (e.g. derivatives/labels/sub-{subject}/anat/{prefix}_dseg.nii.gz)")
    _add_qsm_options(p)
    p.add_argument("--models", type=_model_list, default=None, metavar="NAME[,NAME]",
                   help="separation models, the first gives chi_para/chi_dia "
                        "(default: chi-separation,linear; decompose is experimental)")
    p.add_argument("--config", metavar="FILE", help="TOML settings ([qsm], [separation] tables)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="JAX compilation cache shared by the workers (default BIDS_ROOT/derivatives/chisep/"
                        ".jax_cache; 'off': none)")
    _add_common(p)


def cmd_batch(args) -> int:
    """Exit status 0 when every run is complete, 1 when some failed (they are listed)."""
    from chisep import batch, pipeline

    settings = pipeline.PipelineSettings.from_sources(args=args, config_path=args.config, models=args.models)
    summary = batch.run_batch(args.bids_root, subjects=args.subject, scheduler=args.scheduler,
                              workers=args.workers, threads_per_worker=args.threads_per_worker,
                              retries=args.retries, settings=settings, labels=args.labels, force=args.overwrite,
                              compilation_cache={None: True, "off": False}.get(args.compile_cache, args.compile_cache),
                              progress=lambda s: _say(args, s))
    return 1 if summary.n_failed else 0
# --- end batch ---


COMMANDS = {"simulate": cmd_simulate, "qsm": cmd_qsm, "separate": cmd_separate, "run": cmd_run,
            "demo": cmd_demo, "batch": cmd_batch}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"chisep: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_ERROR
    signals.install()
    try:
        with warnings.catch_warnings():
            if not args.debug:  # one line in the user's terms, not a Python warning with a source line
                warnings.showwarning = _one_line_warning
            if args.command in _COMPUTING:
                _use_compile_cache(args)
                _keep_freed_memory()
            return COMMANDS[args.command](args)
    except (KeyboardInterrupt, signals.Terminated) as exc:
        print(f"chisep: {'terminated' if isinstance(exc, signals.Terminated) else 'interrupted'}; finished outputs "
              "are complete, nothing partial was left (a run without provenance.json is unfinished)",
              file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, signals.Terminated) else EXIT_INTERRUPTED
    except (ChisepError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        if args.debug:
            raise
        message = textwrap.fill(f"chisep {args.command}: error: {exc}", width=100)
        print(message + ("\n(run with --debug for a traceback)"
                         if not isinstance(exc, ChisepError) else ""), file=sys.stderr)
        return EXIT_ERROR
    finally:
        signals.restore()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
