"""ROI statistics, accuracy tables and figures for chisep outputs.

Everything here is computation on arrays: tables come back as lists of dicts
or as text, figures as :class:`matplotlib.figure.Figure` objects drawn on an
Agg canvas (no pyplot, so no global backend or figure registry is touched).
:func:`figure_png_bytes` renders a figure to PNG bytes; writing them to disk is
the caller's job (through :mod:`chisep.io`, which owns every file write).

Tables
    :func:`roi_statistics` -> rows ``label, name, map, mean, median, std,
    n_voxels, volume_ml`` per labelled region and map; :func:`roi_table_csv`
    writes them as CSV text; :func:`regions_from_mask` gives a one-region
    label image when no atlas is at hand. :func:`accuracy_table` scores
    estimates against a ground truth (NRMSE, ROI means, ROI slope) and
    :func:`format_table` prints any list of rows as an aligned Markdown table.
Figures
    :func:`montage_figure`: orthogonal slices of every map with a colorbar in
    its unit; :func:`mask_figure`: the brain mask's outline over the magnitude;
    :func:`quality_figure`: the quality flags over the magnitude. The cuts
    (:func:`report_slices`) pass through the basal ganglia. :func:`comparison_figure`: truth, estimate and error per
    separation model on one axial slice.

Display conventions: arrays are in (x, y, z) voxel order as stored. A slice is
shown transposed with ``origin="lower"`` (first index to the right, second
index up) and an extent in mm, so anisotropic voxels keep their true aspect.
No reorientation is done: for RAS-stored data axial slices show anterior up.
Fixed display windows (:data:`WINDOWS`) make figures of different subjects
and models comparable.
"""

from __future__ import annotations

import csv
import io as _io
import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from chisep import metrics, validate
from chisep.errors import InputError

__all__ = [
    "WINDOWS",
    "UNITS",
    "DISPLAY_ORDER",
    "DEFAULT_ROIS",
    "ROI_COLUMNS",
    "display_window",
    "regions_from_mask",
    "roi_statistics",
    "roi_table_csv",
    "accuracy_table",
    "format_table",
    "montage_figure",
    "mask_figure",
    "quality_figure",
    "comparison_figure",
    "figure_png_bytes",
    "orientation_codes",
    "report_slices",
    "axial_thumbnail",
]

#: Fixed display windows ``(low, high)`` per map name, in the map's unit.
#: ``None`` means a robust window from the data (see :func:`display_window`).
#: chi: +-0.15 ppm covers deep grey matter (globus pallidus ~0.13 ppm) and
#: white matter (~-0.03 ppm); sources share 0-0.15 ppm so that para and dia
#: are visually comparable; R2* 0-50 1/s and R2' 0-30 1/s span brain tissue at
#: 3 T; the local field +-5 Hz spans tissue contrast at 3 T after background
#: removal. Fields are in Hz, so at 7 T the local-field window saturates
#: earlier; it is still fixed so that runs at one field strength compare.
WINDOWS: dict[str, tuple[float, float] | None] = {
    "magnitude": None,
    "chi": (-0.15, 0.15),
    "chi_para": (0.0, 0.15),
    "chi_dia": (0.0, 0.15),
    "r2star": (0.0, 50.0),
    "r2prime": (0.0, 30.0),
    "r2": (0.0, 30.0),
    "field_local": (-5.0, 5.0),
    "field_total": None,
}

#: Unit of each known map, used in colorbar labels.
UNITS: dict[str, str] = {
    "magnitude": "a.u.",
    "chi": "ppm",
    "chi_para": "ppm",
    "chi_dia": "ppm",
    "r2star": "1/s",
    "r2prime": "1/s",
    "r2": "1/s",
    "field_local": "Hz",
    "field_total": "Hz",
}

#: Order of known maps in figures and tables; other maps follow in input order.
DISPLAY_ORDER = (
    "magnitude",
    "chi",
    "chi_para",
    "chi_dia",
    "r2star",
    "r2prime",
    "r2",
    "field_local",
    "field_total",
)

#: Deep-grey-matter and white-matter regions of the built-in phantom
#: (names as in ``chisep/sim/data/tissues.toml``) scored by :func:`accuracy_table`.
DEFAULT_ROIS = (
    "globus_pallidus",
    "putamen",
    "caudate",
    "thalamus",
    "substantia_nigra",
    "red_nucleus",
    "dentate",
    "white_matter",
)

#: Columns of :func:`roi_statistics` rows and of :func:`roi_table_csv`.
ROI_COLUMNS = ("label", "name", "map", "mean", "median", "std", "n_voxels", "volume_ml")

# Robust window percentiles for maps without a fixed window.
_ROBUST_PERCENTILES = (1.0, 99.0)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def _as_map(name: str, array, shape=None, *, against: str = "the other maps") -> np.ndarray:
    if np.asarray(array).dtype == bool:
        raise InputError(f"map {name!r} must hold real numbers, found dtype bool")
    arr = validate.as_volume(array, f"map {name!r}", dtype=None, hint=f"pass one echo, e.g. {name}[..., 0]")
    if shape is not None:
        validate.check_same_grid(arr.shape, shape, f"map {name!r}", against)
    return arr


def _maps(maps, shape=None, *, what: str = "maps", against: str = "the other maps") -> dict[str, np.ndarray]:
    if not isinstance(maps, Mapping):
        raise InputError(f"{what} must be a mapping name -> 3D array, got {type(maps).__name__}")
    if not maps:
        raise InputError(f"{what} is empty; give at least one map, e.g. {{'chi': chi}}")
    out = {}
    for name, array in maps.items():
        if not isinstance(name, str):
            raise InputError(f"{what} keys must be map names (str), found {name!r}")
        arr = _as_map(name, array, shape, against=against)
        shape = arr.shape if shape is None else shape
        out[name] = arr
    return out


def _mask(mask, shape, *, required: bool = False, allow_empty: bool = False) -> np.ndarray:
    return validate.as_mask(mask, shape, default_all=not required, allow_empty=allow_empty)


def _labels(labels, shape=None) -> np.ndarray:
    labs = np.asarray(labels)
    if labs.ndim != 3:
        raise InputError(f"labels must be a 3D (x, y, z) integer array, found shape {labs.shape}")
    if shape is not None and labs.shape != tuple(shape):
        raise InputError(f"labels have shape {labs.shape} but the maps have shape {tuple(shape)}")
    if np.issubdtype(labs.dtype, np.floating):
        # Label maps read from NIfTI often come back as float; accept whole numbers only.
        if not np.all(np.isfinite(labs)) or np.any(labs != np.round(labs)):
            raise InputError("labels must hold whole numbers; found non-integer or NaN values")
    elif not (np.issubdtype(labs.dtype, np.integer) or labs.dtype == bool):
        raise InputError(f"labels must be an integer array, found dtype {labs.dtype}")
    labs = labs.astype(np.int64)
    if labs.size and labs.min() < 0:
        raise InputError(f"labels must be non-negative (0 = background), found {labs.min()}")
    return labs


def _label_names(label_names) -> dict[int, str]:
    if label_names is None:
        return {}
    if not isinstance(label_names, Mapping):
        raise InputError(f"label_names must be a mapping label value -> name, got {type(label_names).__name__}")
    out = {}
    for key, name in label_names.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not isinstance(name, str):
            raise InputError(
                f"label_names must map integer label values to names (e.g. {{6: 'globus_pallidus'}}), "
                f"found {key!r}: {name!r}"
            )
        out[int(key)] = name
    return out


def _ordered(names) -> list[str]:
    """Known maps in DISPLAY_ORDER, then the others in their given order."""
    names = list(names)
    return [n for n in DISPLAY_ORDER if n in names] + [n for n in names if n not in DISPLAY_ORDER]


# ---------------------------------------------------------------------------
# ROI statistics
# ---------------------------------------------------------------------------
def regions_from_mask(mask) -> tuple[np.ndarray, dict[int, str]]:
    """One-region label image for when no atlas is available.

    Parameters
    ----------
    mask : (x, y, z) bool or 0/1 array

    Returns
    -------
    labels : (x, y, z) uint8, 1 inside the mask, 0 outside
    label_names : ``{1: "brain"}``
    """
    msk = np.asarray(mask)
    if msk.ndim != 3:
        raise InputError(f"mask must be a 3D (x, y, z) array, found shape {msk.shape}")
    return msk.astype(bool).astype(np.uint8), {1: "brain"}


def _grouped_statistics(values: np.ndarray, groups: np.ndarray, n_groups: int):
    """Count, mean, median and population std of ``values`` per group index.

    Vectorised: bincount for sums, one lexsort (group, value) for the medians.
    Empty groups give NaN statistics.
    """
    counts = np.bincount(groups, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(groups, weights=values, minlength=n_groups) / counts
        # Two-pass variance: stable for maps with a large offset (e.g. magnitude).
        dev = values - mean[groups]
        std = np.sqrt(np.bincount(groups, weights=dev * dev, minlength=n_groups) / counts)
    median = np.full(n_groups, np.nan)
    if values.size:
        ordered = values[np.lexsort((values, groups))]
        starts = np.cumsum(counts) - counts
        filled = counts > 0
        lo = starts[filled] + (counts[filled] - 1) // 2
        hi = starts[filled] + counts[filled] // 2
        median[filled] = 0.5 * (ordered[lo] + ordered[hi])
    return counts, mean, median, std


def roi_statistics(
    maps: Mapping[str, np.ndarray],
    labels,
    label_names: Mapping[int, str] | None = None,
    *,
    voxel_size=(1.0, 1.0, 1.0),
    mask=None,
) -> list[dict]:
    """Mean, median and standard deviation of every map in every labelled region.

    Parameters
    ----------
    maps : mapping name -> (x, y, z) array
        E.g. ``{"chi": chi, "chi_para": para, "chi_dia": dia}`` (ppm), ``"r2star"`` (1/s).
    labels : (x, y, z) non-negative integer array
        Region label per voxel; 0 is background. Float arrays holding whole
        numbers (as read from NIfTI) are accepted.
    label_names : mapping label value -> name, optional
        E.g. ``Phantom.label_names``. Unnamed labels are called ``"label_<k>"``.
        Label 0 is reported only when it is named here.
    voxel_size : 3 floats, mm
        Voxel dimensions, for the region volume.
    mask : (x, y, z) bool array, optional
        Only voxels inside the mask count (e.g. the eroded brain mask of the
        maps); regions with no voxel inside the mask are left out.

    Returns
    -------
    list of dict, one per (map, region), maps in :data:`DISPLAY_ORDER` then
    input order, regions by label value, keys :data:`ROI_COLUMNS`:

    - ``mean``, ``median``, ``std`` (population, ddof = 0): over the finite
      voxels of the map in the region, in the map's unit; NaN if none is finite.
    - ``n_voxels``: number of finite voxels of this map used for the statistics.
    - ``volume_ml``: volume of the region inside the mask (all its voxels,
      finite or not), in ml (1 ml = 1000 mm^3).

    NaN and inf voxels are ignored (e.g. outside a reconstruction's support).

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.zeros((4, 4, 4), int); labels[:2] = 1; labels[2:] = 2
    >>> chi = np.where(labels == 1, 0.1, -0.02)
    >>> rows = roi_statistics({"chi": chi}, labels, {1: "gp", 2: "wm"}, voxel_size=(1, 1, 2))
    >>> [(r["name"], round(r["mean"], 3), r["n_voxels"], r["volume_ml"]) for r in rows]
    [('gp', 0.1, 32, 0.064), ('wm', -0.02, 32, 0.064)]
    """
    labs = _labels(labels)
    arrays = _maps(maps, labs.shape, against="labels")
    names = _label_names(label_names)
    vox = validate.check_voxel_size(voxel_size)
    inside = _mask(mask, labs.shape)

    region_of_voxel = labs[inside]
    n_groups = int(region_of_voxel.max()) + 1 if region_of_voxel.size else 1
    region_counts = np.bincount(region_of_voxel, minlength=n_groups)
    present = [int(k) for k in np.flatnonzero(region_counts) if k != 0 or 0 in names]
    voxel_ml = float(np.prod(vox)) / 1000.0

    rows = []
    for map_name in _ordered(arrays):
        values = arrays[map_name][inside].astype(np.float64)
        finite = np.isfinite(values)
        counts, mean, median, std = _grouped_statistics(values[finite], region_of_voxel[finite], n_groups)
        for k in present:
            rows.append(
                {
                    "label": k,
                    "name": names.get(k, f"label_{k}"),
                    "map": map_name,
                    "mean": float(mean[k]),
                    "median": float(median[k]),
                    "std": float(std[k]),
                    "n_voxels": int(counts[k]),
                    "volume_ml": float(region_counts[k] * voxel_ml),
                }
            )
    return rows


#: BIDS sidecar of the ROI table (one entry per column, as BIDS asks of a TSV's JSON)
ROI_COLUMN_DESCRIPTIONS = {
    "label": {"Description": "label value in the label image (1 = the whole mask without --labels)"},
    "name": {"Description": "region name"},
    "map": {"Description": "map the statistics are taken of; its unit is in that map's sidecar "
                           "(chi, chi_para, chi_dia: ppm; r2star, r2prime: 1/s)"},
    "mean": {"Description": "mean of the map over the region", "Units": "unit of the map"},
    "median": {"Description": "median of the map over the region", "Units": "unit of the map"},
    "std": {"Description": "standard deviation of the map over the region", "Units": "unit of the map"},
    "n_voxels": {"Description": "voxels of the region inside the brain mask"},
    "volume_ml": {"Description": "volume of the region inside the brain mask", "Units": "mL"},
}


def roi_table_csv(rows: Sequence[Mapping], *, delimiter: str = ",") -> str:
    """CSV text (TSV with ``delimiter="\\t"``) of :func:`roi_statistics` rows (header :data:`ROI_COLUMNS`).

    Floats are written with full precision (``repr``), NaN as ``nan`` (``n/a`` in TSV, as
    BIDS writes missing values), so the table reads back exactly with :mod:`csv` and ``float``.
    """
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", delimiter=delimiter)
    writer.writerow(ROI_COLUMNS)
    for i, row in enumerate(rows):
        missing = [c for c in ROI_COLUMNS if c not in row]
        if missing:
            raise InputError(f"ROI row {i} lacks column(s) {', '.join(missing)}; rows come from roi_statistics()")
        cells = [repr(float(row[c])) if isinstance(row[c], float) else row[c] for c in ROI_COLUMNS]
        if delimiter == "\t":
            cells = ["n/a" if c == "nan" else c for c in cells]
        writer.writerow(cells)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# accuracy against ground truth
# ---------------------------------------------------------------------------
def _roi_ids(labels, label_names, rois, shape) -> dict[str, int]:
    """ROI name -> label value; unknown names are an error unless the default list is used."""
    if labels is None:
        if rois is not None:
            raise InputError("rois were given but labels are missing; pass labels= and label_names=")
        return {}
    names = _label_names(label_names)
    if not names:
        raise InputError("labels were given without label_names; pass e.g. Phantom.label_names")
    by_name = {name: value for value, name in names.items()}
    if rois is None:
        return {name: by_name[name] for name in DEFAULT_ROIS if name in by_name}
    unknown = [r for r in rois if r not in by_name]
    if unknown:
        raise InputError(f"unknown ROI name(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(by_name)}")
    return {name: by_name[name] for name in rois}


def accuracy_table(
    truth: Mapping[str, np.ndarray],
    estimates: Mapping[str, Mapping[str, np.ndarray]],
    *,
    mask,
    labels=None,
    label_names: Mapping[int, str] | None = None,
    rois: Sequence[str] | None = None,
) -> list[dict]:
    """Score estimated maps against ground truth: NRMSE and ROI means.

    Parameters
    ----------
    truth : mapping map name -> (x, y, z) array
        E.g. ``{"chi": ph.chi, "chi_para": ph.chi_para, "chi_dia": ph.chi_dia}`` (ppm).
    estimates : mapping model name -> (mapping map name -> (x, y, z) array)
        Maps missing from a model, or from ``truth``, are not scored.
    mask : (x, y, z) bool array
        Region scored (e.g. the eroded brain mask of the reconstruction).
    labels : (x, y, z) integer array, optional
        Region labels, e.g. ``Phantom.labels``.
    label_names : mapping label value -> name, optional
        E.g. ``Phantom.label_names``; required with ``labels``.
    rois : sequence of str, optional
        Region names to report; default :data:`DEFAULT_ROIS` (those present
        in ``label_names``). Given names must exist.

    Returns
    -------
    list of dict with keys ``model``, ``map``, ``nrmse``, ``roi_slope`` and
    one key per ROI name. For each map, a ``model = "truth"`` row (NRMSE 0,
    slope 1) gives the true ROI means, then one row per model with the
    estimated ROI means.

    - ``nrmse``: :func:`chisep.metrics.nrmse` in the mask (%, after demeaning).
    - ROI means: mean of the map over the region's voxels inside the mask
      (:func:`chisep.metrics.roi_means`), in the map's unit; NaN if empty.
    - ``roi_slope``: slope of estimated against true ROI means
      (:func:`chisep.metrics.linear_fit_slope`; QSM challenge 2.0 scores
      ``|1 - slope|``); NaN with fewer than two usable regions.
    """
    truth_maps = _maps(truth, what="truth")
    shape = next(iter(truth_maps.values())).shape
    if not isinstance(estimates, Mapping) or not estimates:
        raise InputError("estimates must be a non-empty mapping model name -> {map name: array}")
    model_maps = {}
    for model, maps in estimates.items():
        model_maps[model] = _maps(maps, shape, what=f"estimates[{model!r}]", against="the truth maps")
    inside = _mask(mask, shape, required=True)
    labs = None if labels is None else _labels(labels, shape)
    roi_ids = _roi_ids(labs, label_names, rois, shape)
    # Voxels outside the mask get a label no ROI uses, so ROI means stay inside the mask.
    roi_labels = None if labs is None else np.where(inside, labs, -1)

    def finite_in_mask(arr, what):
        if not np.all(np.isfinite(arr[inside])):
            raise InputError(f"{what} holds NaN/inf inside the mask; fill or mask them before scoring")

    def roi_values(arr):
        return metrics.roi_means(arr, roi_labels, roi_ids) if roi_ids else {}

    rows = []
    scored = set().union(*(m.keys() for m in model_maps.values()))
    for map_name in _ordered(n for n in truth_maps if n in scored):
        tru = truth_maps[map_name]
        finite_in_mask(tru, f"truth[{map_name!r}]")
        true_means = roi_values(tru)
        rows.append({"model": "truth", "map": map_name, "nrmse": 0.0, "roi_slope": 1.0, **true_means})
        for model, maps in model_maps.items():
            if map_name not in maps:
                continue
            est = maps[map_name]
            finite_in_mask(est, f"estimates[{model!r}][{map_name!r}]")
            est_means = roi_values(est)
            rows.append(
                {
                    "model": model,
                    "map": map_name,
                    "nrmse": metrics.nrmse(est, tru, inside),
                    "roi_slope": _slope(est_means, true_means),
                    **est_means,
                }
            )
    return rows


def _slope(estimated: Mapping[str, float], true: Mapping[str, float]) -> float:
    names = [n for n in true if math.isfinite(true[n]) and math.isfinite(estimated[n])]
    t = [true[n] for n in names]
    if len(names) < 2 or max(t) == min(t):
        return float("nan")
    return metrics.linear_fit_slope([estimated[n] for n in names], t)[0]


def _cell(value, digits: int) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def format_table(rows: Sequence[Mapping], *, columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """Aligned Markdown table of rows (dicts), e.g. from :func:`accuracy_table` or :func:`roi_statistics`.

    Parameters
    ----------
    rows : sequence of mappings
    columns : sequence of str, optional
        Columns in order; default: every key, in first-seen order.
    digits : int
        Significant digits of floats; NaN/inf print as ``n/a``.

    Returns
    -------
    str, one line per row plus a header and a separator line; numbers are
    right-aligned, text left-aligned. Missing cells are blank.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = [str(c) for c in columns]
    cells = [[_cell(row[c], digits) if c in row else "" for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), (int, float, np.number)) for row in rows if c in row) and any(c in r for r in rows)
        for c in columns
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    separator = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(columns), separator] + [line(r) for r in cells]) + "\n"


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
def display_window(name: str, array, mask=None) -> tuple[float, float]:
    """Display range ``(low, high)`` of a map: fixed from :data:`WINDOWS`, else robust.

    Magnitude: 0 to the 99.5th percentile inside the mask. Other maps without a
    fixed window: 1st to 99th percentile inside the mask (symmetric about 0
    for field maps). Non-finite voxels are ignored.
    """
    fixed = WINDOWS.get(name)
    if fixed is not None:
        return fixed
    arr = np.asarray(array, dtype=np.float64)
    values = arr[mask] if mask is not None else arr.reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    if name == "magnitude":  # 99.5th: bright vessels and fat may saturate, brain tissue must not
        low, high = 0.0, float(np.percentile(values, 99.5))
    elif name.startswith("field"):
        half = float(np.percentile(np.abs(values), 99.0))
        low, high = -half, half
    else:
        low, high = (float(v) for v in np.percentile(values, _ROBUST_PERCENTILES))
    if not high > low:  # constant map: any non-empty range shows it
        low, high = low - 0.5, low + 0.5
    return (low, high)


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: rendering without pyplot
    return fig


def _default_centre(mask, shape) -> tuple[int, int, int]:
    if mask is None or not np.any(mask):
        return tuple(n // 2 for n in shape)
    com = ndimage.center_of_mass(np.asarray(mask, dtype=bool))
    return tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(com, shape))


def _slices_arg(slices, shape) -> tuple[int, int, int]:
    try:
        idx = tuple(int(s) for s in slices)
    except (TypeError, ValueError):
        raise InputError(f"slices must be three voxel indices (x, y, z), got {slices!r}") from None
    if len(idx) != 3 or any(not 0 <= i < n for i, n in zip(idx, shape)):
        raise InputError(f"slices must be three voxel indices inside the shape {shape}, got {slices!r}")
    return idx


# view name -> (axis cut, axes shown horizontally/vertically)
_VIEWS = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))


def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice ready for ``imshow(..., origin="lower")``: rows = vertical axis."""
    return np.take(volume, index, axis=axis).T


def _extent(shape, vox, axes) -> tuple[float, float, float, float]:
    h, v = axes
    return (0.0, shape[h] * vox[h], 0.0, shape[v] * vox[v])


def _show(ax, image, extent, window, cmap):
    ax.set_facecolor("black")  # masked-out (NaN) voxels
    im = ax.imshow(
        image, origin="lower", extent=extent, aspect="equal", cmap=cmap,
        vmin=window[0], vmax=window[1], interpolation="nearest",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _overlay(ax, layers, extent) -> None:
    """Paint 2D boolean ``layers`` ((selection, RGBA) pairs, later ones on top) over a panel."""
    layers = list(layers)
    image = np.zeros(layers[0][0].shape + (4,), np.float32)
    for selection, rgba in layers:
        image[selection] = rgba
    ax.imshow(image, origin="lower", extent=extent, aspect="equal", interpolation="nearest")


def _masked(name: str, array: np.ndarray, mask) -> np.ndarray:
    """Float copy with NaN outside the mask (the magnitude keeps its anatomy)."""
    arr = np.asarray(array, dtype=np.float32)
    if mask is None or name == "magnitude":
        return arr
    return np.where(mask, arr, np.nan)


def _label_text(name: str) -> str:
    return f"{name} ({UNITS[name]})" if name in UNITS else name


def _colorbar(fig, image, axes, label: str) -> None:
    bar = fig.colorbar(image, ax=axes, shrink=0.9, pad=0.02)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)


#: offsets (mm) of the report's cuts from the brain's centre of mass, towards (right, anterior, superior):
#: the centre of mass lies near the thalamus' top; these cuts pass through the basal ganglia (putamen,
#: globus pallidus, caudate head) and the internal capsule, instead of the midline's falx and sinus
REPORT_CUT_OFFSETS_MM = (22.0, 10.0, -10.0)
_TOWARDS = ("R", "A", "S")
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def orientation_codes(affine) -> tuple[str, str, str] | None:
    """Anatomical direction (``R/L``, ``A/P``, ``S/I``) each array axis increases towards, or None.

    None when the affine is missing or not invertible.
    """
    if affine is None:
        return None
    try:
        import nibabel as nib

        return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))
    except (ValueError, np.linalg.LinAlgError):
        return None


def report_slices(mask, voxel_size, axcodes=None) -> tuple[int, int, int]:
    """Voxel indices (x, y, z) of the report's sagittal, coronal and axial cuts.

    The brain's centre of mass moved by :data:`REPORT_CUT_OFFSETS_MM`, when the
    array axes run along left-right, anterior-posterior and inferior-superior (in
    any sign; ``axcodes`` from :func:`orientation_codes`); otherwise the centre of
    mass. Each cut stays inside the mask's extent.
    """
    msk = np.asarray(mask, dtype=bool)
    vox = validate.check_voxel_size(voxel_size)
    centre = list(_default_centre(msk, msk.shape))
    anatomical = axcodes is not None and all(code in (towards, _OPPOSITE[towards])
                                             for code, towards in zip(axcodes, _TOWARDS))
    if not anatomical or not msk.any():
        return tuple(centre)
    for axis, (code, towards, offset) in enumerate(zip(axcodes, _TOWARDS, REPORT_CUT_OFFSETS_MM)):
        sign = 1.0 if code == towards else -1.0
        present = np.flatnonzero(msk.any(axis=tuple(a for a in range(3) if a != axis)))
        moved = int(round(centre[axis] + sign * offset / vox[axis]))
        centre[axis] = int(np.clip(moved, present.min(), present.max()))
    return tuple(centre)


def _mark_orientation(ax, axcodes, shown) -> None:
    """Letters at the panel edges: where the horizontal and vertical axes point (e.g. L ... R)."""
    if axcodes is None:
        return
    h, v = shown
    style = dict(color="yellow", fontsize=7, fontweight="bold", transform=ax.transAxes)
    ax.text(0.02, 0.5, _OPPOSITE[axcodes[h]], ha="left", va="center", **style)
    ax.text(0.98, 0.5, axcodes[h], ha="right", va="center", **style)
    ax.text(0.5, 0.98, axcodes[v], ha="center", va="top", **style)


def montage_figure(
    maps: Mapping[str, np.ndarray],
    *,
    mask=None,
    voxel_size=(1.0, 1.0, 1.0),
    slices=None,
    title: str | None = None,
    highlight=None,
    highlight_label: str = "highlighted voxels",
    axcodes: Sequence[str] | None = None,
) -> Figure:
    """Orthogonal-slice montage: one row per map, axial / coronal / sagittal columns.

    Parameters
    ----------
    maps : mapping name -> (x, y, z) array
        Known names (``magnitude, chi, chi_para, chi_dia, r2star, r2prime, r2,
        field_local, field_total``) come first in that order with their fixed
        windows (:data:`WINDOWS`) and units; others follow with robust windows.
    mask : (x, y, z) bool array, optional
        Voxels outside are shown black (except in the magnitude); also sets
        the default slices and the robust windows.
    voxel_size : 3 floats, mm
        Gives each panel its physical aspect ratio.
    slices : 3 ints (x, y, z), optional
        Voxel indices of the sagittal, coronal and axial cuts; default: the
        mask's centre of mass (the volume centre without a mask).
    title : str, optional
    highlight : (x, y, z) bool array, optional
        Voxels to show in red over the first map (e.g. the voxels excluded as
        unreliable), in an extra last row whose slices cut through most of
        them; no row when it is empty.
    highlight_label : str
        Row label of the highlight row.
    axcodes : 3 letters, optional
        Direction each array axis points to (:func:`orientation_codes`); marks
        the panel edges (L/R, A/P, S/I).

    Returns
    -------
    matplotlib.figure.Figure on an Agg canvas; see :func:`figure_png_bytes`.
    """
    arrays = _maps(maps)
    shape = next(iter(arrays.values())).shape
    vox = validate.check_voxel_size(voxel_size)
    msk = None if mask is None else _mask(mask, shape)
    centre = _default_centre(msk, shape) if slices is None else _slices_arg(slices, shape)
    names = _ordered(arrays)
    marked = None if highlight is None else _mask(highlight, shape, allow_empty=True)
    if marked is not None and not marked.any():
        marked = None  # nothing to show: no row
    n_rows = len(names) + (marked is not None)

    title_lines = title.count("\n") + 1 if title else 0
    fig, axes = _panels(shape, vox, n_rows, extra_width=1.6, extra_height=0.6 + 0.25 * title_lines)
    for row, name in enumerate(names):
        data = _masked(name, arrays[name], msk)
        window = display_window(name, arrays[name], msk)
        for col, (view, axis, shown) in enumerate(_VIEWS):
            im = _show(axes[row, col], _view(data, axis, centre[axis]), _extent(shape, vox, shown), window, "gray")
            _mark_orientation(axes[row, col], axcodes, shown)
            if row == 0:
                axes[row, col].set_title(f"{view} {'xyz'[axis]}={centre[axis]}", fontsize=9)
        _colorbar(fig, im, list(axes[row]), _label_text(name))
    if marked is not None:
        _highlight_row(fig, axes[-1], arrays[names[0]], names[0], marked, msk, vox, highlight_label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _highlight_row(fig, row_axes, background, name, marked, mask, vox, label) -> None:
    """Grey ``background`` with ``marked`` voxels in red, cut where most of them lie."""
    shape = marked.shape
    if marked.any():
        # per axis, the slice holding the most marked voxels
        centre = tuple(int(np.argmax(marked.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))
    else:
        centre = _default_centre(mask, shape)
    data = _masked(name, background, None)
    window = display_window(name, background, mask)
    for col, (view, axis, shown) in enumerate(_VIEWS):
        ax = row_axes[col]
        extent = _extent(shape, vox, shown)
        im = _show(ax, _view(data, axis, centre[axis]), extent, window, "gray")
        _overlay(ax, [(_view(marked, axis, centre[axis]), (1.0, 0.1, 0.1, 0.9))], extent)
        ax.set_title(f"{view} {'xyz'[axis]}={centre[axis]}", fontsize=8)
    _colorbar(fig, im, list(row_axes), f"{_label_text(name)}; red: {label}")


def axial_thumbnail(name: str, volume, mask, *, size_in: float = 2.4) -> Figure:
    """One axial slice of a map through the report's axial cut, in its window, outside the mask black."""
    vol = _as_map(name, volume)
    msk = _mask(mask, vol.shape, allow_empty=True)
    z = report_slices(msk, (1.0, 1.0, 1.0))[2]
    fig = _new_figure(size_in, size_in)
    ax = fig.add_subplot()
    _show(ax, np.where(msk[..., z], vol[..., z], np.nan).T, None, display_window(name, vol, msk if msk.any() else None),
          "gray")
    return fig


def _panels(shape, vox, n_rows: int, extra_width: float = 0.4, extra_height: float = 0.5):
    """Figure and (n_rows, 3) axes (axial, coronal, sagittal) with panels in physical proportions,
    2.6 in for the longest side; ``extra_*`` inches for colour bars and titles."""
    widths = [shape[h] * vox[h] for _, _, (h, _) in _VIEWS]
    heights = [shape[v] * vox[v] for _, _, (_, v) in _VIEWS]
    scale = 2.6 / max(max(widths), max(heights))
    fig = _new_figure(sum(w * scale for w in widths) + extra_width, n_rows * max(heights) * scale + extra_height)
    return fig, fig.subplots(n_rows, 3, squeeze=False, width_ratios=widths)


def mask_figure(magnitude, mask, *, voxel_size=(1.0, 1.0, 1.0), head_mask=None, excluded=None, slices=None,
                axcodes=None, title: str | None = None) -> Figure:
    """Brain-mask check: the mask's outline (yellow) over the magnitude in three planes.

    ``head_mask`` (cyan outline): the wider mask the field was fitted in;
    ``excluded`` (red): voxels left out as unreliable. The magnitude is shown
    everywhere, so scalp or brain on the wrong side of the outline is visible.
    """
    mag = _as_map("magnitude", magnitude)
    shape, vox = mag.shape, validate.check_voxel_size(voxel_size)
    brain = _mask(mask, shape, allow_empty=True)
    head = None if head_mask is None else _mask(head_mask, shape, allow_empty=True)
    marked = None if excluded is None else _mask(excluded, shape, allow_empty=True)
    centre = report_slices(brain, vox, axcodes) if slices is None else _slices_arg(slices, shape)
    window = display_window("magnitude", mag, head if head is not None and head.any() else None)
    fig, axes = _panels(shape, vox, 1, extra_height=0.6 + 0.3 * bool(title))
    for col, (view, axis, shown) in enumerate(_VIEWS):
        ax, extent = axes[0, col], _extent(shape, vox, shown)
        _show(ax, _view(mag.astype(np.float32), axis, centre[axis]), extent, window, "gray")
        if marked is not None and marked.any():
            _overlay(ax, [(_view(marked, axis, centre[axis]), (1.0, 0.1, 0.1, 0.8))], extent)
        for outline, colour in ((head, "cyan"), (brain, "yellow")):
            if outline is not None and _view(outline, axis, centre[axis]).any():
                ax.contour(_view(outline, axis, centre[axis]).astype(np.float32), levels=[0.5], colors=colour,
                           linewidths=0.8, origin="lower", extent=extent)
        _mark_orientation(ax, axcodes, shown)
        ax.set_title(f"{view} {'xyz'[axis]}={centre[axis]}", fontsize=8)
    fig.text(0.01, 0.01, "yellow: brain mask" + ("; cyan: head mask" if head is not None else "")
             + ("; red: excluded (unreliable field)" if marked is not None and marked.any() else ""), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


#: colours of the quality flags' overlay (RGBA), by bit
QUALITY_COLOURS = {1: (1.0, 0.1, 0.1, 0.85), 2: (1.0, 0.8, 0.0, 0.85), 4: (0.2, 0.6, 1.0, 0.85),
                   8: (1.0, 0.0, 1.0, 0.85), 16: (0.2, 1.0, 0.3, 0.85), 32: (1.0, 0.5, 0.0, 0.85),
                   64: (0.55, 0.55, 0.8, 0.35)}  # the rim (R2* borrowed from inside): informative, faint


def quality_figure(magnitude, quality, *, flags: Mapping[int, str], voxel_size=(1.0, 1.0, 1.0), mask=None,
                   slices=None, axcodes=None) -> Figure:
    """The quality map's flags as colours (:data:`QUALITY_COLOURS`) over the magnitude.

    The lowest set bit wins a voxel's colour; the legend is the caller's (the HTML report lists
    every flag with its colour and voxel count).
    """
    mag = _as_map("magnitude", magnitude)
    q = np.asarray(quality).astype(np.int64)
    shape, vox = mag.shape, validate.check_voxel_size(voxel_size)
    msk = None if mask is None else _mask(mask, shape, allow_empty=True)
    centre = (report_slices(msk, vox, axcodes) if msk is not None else _default_centre(None, shape)) \
        if slices is None else _slices_arg(slices, shape)
    window = display_window("magnitude", mag, msk if msk is not None and msk.any() else None)
    fig, axes = _panels(shape, vox, 1)
    for col, (view, axis, shown) in enumerate(_VIEWS):
        ax, extent = axes[0, col], _extent(shape, vox, shown)
        _show(ax, _view(mag.astype(np.float32), axis, centre[axis]), extent, window, "gray")
        cut = _view(q, axis, centre[axis])
        _overlay(ax, [((cut & bit) != 0, QUALITY_COLOURS.get(bit, (1.0, 1.0, 1.0, 0.85)))
                      for bit in sorted(flags, reverse=True)], extent)  # the lowest bit is painted last
        _mark_orientation(ax, axcodes, shown)
        ax.set_title(f"{view} {'xyz'[axis]}={centre[axis]}", fontsize=8)
    return fig


def _default_axial_slice(mask, labels, label_names, shape) -> int:
    """Axial slice with the most globus pallidus voxels, else the mask's centre."""
    if labels is not None and label_names:
        gp = [value for value, name in _label_names(label_names).items() if name == "globus_pallidus"]
        if gp:
            per_slice = np.isin(labels, gp) & mask
            counts = per_slice.sum(axis=(0, 1))
            if counts.max() > 0:
                return int(np.argmax(counts))
    return _default_centre(mask, shape)[2]


def comparison_figure(
    truth: Mapping[str, np.ndarray],
    estimates: Mapping[str, Mapping[str, np.ndarray]],
    *,
    mask,
    voxel_size=(1.0, 1.0, 1.0),
    slice_index: int | None = None,
    labels=None,
    label_names: Mapping[int, str] | None = None,
    maps: Sequence[str] = ("chi", "chi_para", "chi_dia"),
    title: str | None = None,
) -> Figure:
    """Truth, estimate and error (estimate - truth) per model on one axial slice.

    Rows: the truth, then for each model its estimate and its error; columns:
    the entries of ``maps`` present in ``truth`` (by default chi, chi_para,
    chi_dia). Estimates use the truth's window; errors a symmetric window of
    half the map window's width, in a diverging colormap. Each estimate panel
    shows the model's NRMSE (%) over the whole mask (:func:`chisep.metrics.nrmse`).
    A map a model does not provide is left blank.

    Parameters
    ----------
    truth : mapping map name -> (x, y, z) array
    estimates : mapping model name -> (mapping map name -> (x, y, z) array)
    mask : (x, y, z) bool array
    voxel_size : 3 floats, mm
    slice_index : int, optional
        Axial (z) slice; default: the slice with the most globus pallidus
        voxels when ``labels`` and ``label_names`` are given (the basal
        ganglia), else the mask's centre of mass.
    labels, label_names : optional
        E.g. ``Phantom.labels`` and ``Phantom.label_names``.
    maps : sequence of str
        Map names to show, in order.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure on an Agg canvas.
    """
    truth_maps = _maps(truth, what="truth")
    shape = next(iter(truth_maps.values())).shape
    if not isinstance(estimates, Mapping) or not estimates:
        raise InputError("estimates must be a non-empty mapping model name -> {map name: array}")
    model_maps = {
        model: _maps(m, shape, what=f"estimates[{model!r}]", against="the truth maps") for model, m in estimates.items()
    }
    msk = _mask(mask, shape, required=True)
    vox = validate.check_voxel_size(voxel_size)
    labs = None if labels is None else _labels(labels, shape)
    columns = [name for name in maps if name in truth_maps]
    if not columns:
        raise InputError(f"truth holds none of the maps {list(maps)}; it has {list(truth_maps)}")
    if slice_index is None:
        z = _default_axial_slice(msk, labs, label_names, shape)
    elif isinstance(slice_index, (int, np.integer)) and 0 <= slice_index < shape[2]:
        z = int(slice_index)
    else:
        raise InputError(f"slice_index must be an axial slice index in [0, {shape[2] - 1}], got {slice_index!r}")

    extent = _extent(shape, vox, (0, 1))
    width, height = extent[1], extent[3]
    panel = 2.0 / max(width, height)
    n_rows = 1 + 2 * len(model_maps)
    fig = _new_figure(len(columns) * (width * panel + 0.6) + 0.8, n_rows * height * panel + 0.5 + 0.3 * bool(title))
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    for col, name in enumerate(columns):
        window = display_window(name, truth_maps[name], msk)
        half = 0.5 * (window[1] - window[0])
        tru = _masked(name, truth_maps[name], msk)
        im = _show(axes[0, col], _view(tru, 2, z), extent, window, "gray")
        axes[0, col].set_title(name, fontsize=9)
        _colorbar(fig, im, axes[0, col], _label_text(name))
        for m, (model, estimate) in enumerate(model_maps.items()):
            ax_est, ax_err = axes[1 + 2 * m, col], axes[2 + 2 * m, col]
            if name not in estimate:
                for ax in (ax_est, ax_err):  # blank, but keep the row's y label
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_visible(False)
                ax_est.text(0.5, 0.5, f"{model}: no {name}", ha="center", va="center", transform=ax_est.transAxes, fontsize=8)
                continue
            est = _masked(name, estimate[name], msk)
            im = _show(ax_est, _view(est, 2, z), extent, window, "gray")
            _colorbar(fig, im, ax_est, _label_text(name))
            im = _show(ax_err, _view(est - tru, 2, z), extent, (-half, half), "RdBu_r")
            _colorbar(fig, im, ax_err, f"{name} error ({UNITS[name]})" if name in UNITS else f"{name} error")
            score = _nrmse_or_none(estimate[name], truth_maps[name], msk)
            ax_est.set_title(f"{model}" + ("" if score is None else f"  NRMSE {score:.1f} %"), fontsize=8)
            ax_err.set_title(f"{model} error", fontsize=8)
    axes[0, 0].set_ylabel("truth", fontsize=9)
    for m, model in enumerate(model_maps):
        axes[1 + 2 * m, 0].set_ylabel(model, fontsize=9)
        axes[2 + 2 * m, 0].set_ylabel(f"{model} - truth", fontsize=9)
    fig.suptitle(title or f"axial slice z={z}", fontsize=10)
    return fig


def _nrmse_or_none(estimate, truth, mask) -> float | None:
    """NRMSE for a panel caption; a caption is optional, so undefined scores are skipped."""
    try:
        return metrics.nrmse(estimate, truth, mask)
    except InputError:
        return None


def figure_png_bytes(fig: Figure, *, dpi: int = 120) -> bytes:
    """Render a figure to PNG bytes (write them with chisep.io).

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    dpi : int
        Resolution; 120 keeps a 7-map montage legible and under a few hundred kB.

    Returns
    -------
    bytes, a PNG image.
    """
    if not isinstance(fig, Figure):
        raise InputError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, np.integer)) or dpi <= 0:
        raise InputError(f"dpi must be a positive integer, got {dpi!r}")
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=int(dpi))
    return buffer.getvalue()
