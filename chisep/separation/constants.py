"""Model constants from models/*.toml (shipped as the ``chisep.models`` package).

Each file holds constants at a reference field strength with literature
references; relaxometric constants (Hz/ppm) scale linearly with B0, as the
static-dephasing regime predicts (Yablonskiy & Haacke, MRM 1994).
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from chisep.errors import ModelFileError

MODEL_FILES = {
    "linear": "linear_r2star_chi.toml",
    "chi-separation": "chi_separation.toml",
    "decompose": "decompose.toml",
}


def _packaged_models():
    """The models folder: the installed ``chisep.models``, or ``models/`` beside a source checkout.

    The wheel maps the top-level models/ to ``chisep.models``; a script run from
    the repository root imports the source ``chisep/`` instead, which has no
    such subpackage, so fall back to the checkout's folder.
    """
    try:
        return resources.files("chisep.models")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parents[2] / "models"
        if not checkout.is_dir():
            raise ModelFileError("the packaged model files (chisep.models) are missing; reinstall chisep") from None
        return checkout


def load_model_file(model: str, path: str | Path | None = None) -> dict:
    """Read a model's TOML (the packaged one, or ``path`` for user-calibrated constants)."""
    if model not in MODEL_FILES:
        raise ModelFileError(f"unknown model {model!r}; valid models: {', '.join(MODEL_FILES)}")
    try:
        if path is None:
            text = _packaged_models().joinpath(MODEL_FILES[model]).read_text()
            source = f"chisep.models/{MODEL_FILES[model]}"
        else:
            text = Path(path).read_text()
            source = str(path)
        data = tomllib.loads(text)
    except FileNotFoundError as exc:
        raise ModelFileError(f"model file for {model!r} not found: {exc.filename}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelFileError(f"model file {source} is not valid TOML: {exc}") from exc
    data.setdefault("_source", source)
    return data


def require_number(table: dict, key: str, *, source: str, minimum: float | None = None,
                   positive: bool = False) -> float:
    """Fetch a numeric constant, with an error naming the file, the key and the fix."""
    if key not in table:
        raise ModelFileError(f"{source}: constant {key!r} is missing; add `{key} = <number>`")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFileError(f"{source}: {key} must be a number, found {value!r}")
    value = float(value)
    if positive and not value > 0:
        raise ModelFileError(f"{source}: {key} must be > 0, found {value}")
    if minimum is not None and value < minimum:
        raise ModelFileError(f"{source}: {key} must be >= {minimum}, found {value}")
    return value


def scale_with_field(value_at_reference: float, reference_field_t: float, field_strength_t: float) -> float:
    """Linear scaling of a relaxometric constant (Hz/ppm) from the reference field to B0."""
    return value_at_reference * field_strength_t / reference_field_t
