"""Built-in numerical head phantom: a label map plus a tissue table.

The label map (``data/head_labels_1mm.npz``) was built on the MNI ICBM152 2009a
grid (197 x 233 x 189, 1 mm, MNI affine) by ``scripts/build_phantom_labels.py``
from the template's grey/white-matter probabilities, with deep nuclei, veins,
skull, scalp and paranasal sinuses added as shapes (see ``data/LICENSE_MNI.txt``).
Tissue properties at 3 T come from ``data/tissues.toml`` with references.

Other resolutions are made by resampling the *labels* (plurality vote over the
1 mm voxels that a coarser voxel covers, nearest neighbour along axes that are
refined) before properties are assigned, so that every map of one phantom is
consistent with its labels.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from scipy import ndimage

from chisep.errors import InputError

SCENARIOS = ("healthy", "paradoxical-calcification", "microbleeds", "calcified-lesion", "all")
COMPARTMENTS = ("brain", "head", "outside")
RESOLUTION_RANGE_MM = (0.5, 10.0)  # 0.5 mm iso is already ~70 M voxels per map

# Scenario geometry in MNI mm. The globus pallidus ellipsoid of the label map is
# centred at |x| = 18.5 mm (scripts/build_phantom_labels.py); its medial part is
# where pallidal calcification with iron is seen (Oshima et al., Radiology 2020).
_GP_CENTRE_ABS_X_MM = 18.5
# (centre, radius): lobar and deep locations, both hemispheres, plus the cerebellum.
_MICROBLEEDS = (
    ((30.0, 20.0, 25.0), 2.0),
    ((40.0, -20.0, 10.0), 1.5),
    ((-20.0, -60.0, 30.0), 2.0),
    ((12.0, -20.0, 2.0), 1.5),
    ((-25.0, 5.0, 0.0), 1.5),
    ((20.0, -70.0, -30.0), 1.5),
    ((-40.0, -50.0, 20.0), 2.5),
)
# Dense calcified lesion in right parietal white matter, next to the trigone.
_CALCIFIED_LESION = ((28.0, -40.0, 28.0), 4.0)
_TEXTURE_SIGMA_MM = 3.0
_TEXTURE_CLIP = 2.5


@dataclass(frozen=True)
class Tissue:
    """One row of the tissue table (see data/tissues.toml for units and references)."""

    name: str
    label: int
    compartment: str
    chi_para: float
    chi_dia: float
    chi: float
    r2: float
    t1: float
    m0: float
    texture: float
    is_source_split: bool
    fat_fraction: float = 0.0


@dataclass(frozen=True, eq=False)
class Phantom:
    """Numerical head phantom on a voxel grid.

    Attributes
    ----------
    labels : (x, y, z) uint8
    label_names : dict int -> str
    chi_para, chi_dia : (x, y, z) float32, ppm, non-negative; zero in air and bone
    chi : (x, y, z) float32, ppm relative to water; chi_para - chi_dia in tissue,
        the tabulated value in air (+9.4) and bone (-2)
    r2 : (x, y, z) float32, 1/s (1 / T2)
    t1 : (x, y, z) float32, s
    m0 : (x, y, z) float32, proton density relative to CSF
    brain_mask : (x, y, z) bool, intracranial tissue: brain, CSF, nuclei, veins, lesions
    affine : (4, 4) voxel index -> MNI mm
    voxel_size : (3,) mm
    scenario : str
    seed : int
    tissues : dict str -> Tissue, the table the maps were built from
    """

    labels: np.ndarray
    label_names: dict
    chi_para: np.ndarray
    chi_dia: np.ndarray
    chi: np.ndarray
    r2: np.ndarray
    t1: np.ndarray
    m0: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    voxel_size: np.ndarray
    scenario: str = "healthy"
    seed: int = 0
    tissues: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)

    def label_of(self, name: str) -> int:
        """Label value of a tissue name (e.g. ``"globus_pallidus"``)."""
        for value, label_name in self.label_names.items():
            if label_name == name:
                return value
        raise InputError(f"unknown tissue {name!r}; valid names: {', '.join(self.label_names.values())}")


# ---------------------------------------------------------------------------
# packaged data
# ---------------------------------------------------------------------------
def load_tissue_table() -> dict[str, Tissue]:
    """Read ``data/tissues.toml`` into Tissue rows keyed by name (validated)."""
    source = "chisep/sim/data/tissues.toml"
    data = tomllib.loads(resources.files("chisep.sim").joinpath("data/tissues.toml").read_text())
    table = {}
    for name, row in data["tissues"].items():
        split = "chi_para" in row and "chi_dia" in row
        if split == ("chi" in row):
            raise InputError(f"{source}: tissue {name!r} needs either chi_para and chi_dia, or chi")
        if row.get("compartment") not in COMPARTMENTS:
            raise InputError(f"{source}: tissue {name!r} compartment must be one of {COMPARTMENTS}")
        for key in ("t2_ms", "t1_ms"):
            if not row[key] > 0:
                raise InputError(f"{source}: tissue {name!r} {key} must be > 0, found {row[key]}")
        chi_para = float(row.get("chi_para", 0.0))
        chi_dia = float(row.get("chi_dia", 0.0))
        if not 0.0 <= float(row.get("fat_fraction", 0.0)) <= 1.0:
            raise InputError(f"{source}: tissue {name!r} fat_fraction must lie in [0, 1]")
        if chi_para < 0 or chi_dia < 0:
            raise InputError(f"{source}: tissue {name!r} chi_para and chi_dia are magnitudes (>= 0)")
        table[name] = Tissue(
            name=name,
            label=int(row["label"]),
            compartment=row["compartment"],
            chi_para=chi_para,
            chi_dia=chi_dia,
            chi=float(row["chi"]) if "chi" in row else chi_para - chi_dia,
            r2=1000.0 / float(row["t2_ms"]),
            t1=float(row["t1_ms"]) / 1000.0,
            m0=float(row["m0"]),
            texture=float(row.get("texture", 0.0)),
            is_source_split=split,
            fat_fraction=float(row.get("fat_fraction", 0.0)),
        )
    values = [t.label for t in table.values()]
    if len(set(values)) != len(values):
        raise InputError(f"{source}: label values are not unique: {sorted(values)}")
    return table


def load_labels_1mm() -> tuple[np.ndarray, np.ndarray]:
    """The shipped 1 mm label map (uint8, MNI grid) and its affine."""
    with resources.files("chisep.sim").joinpath("data/head_labels_1mm.npz").open("rb") as handle:
        with np.load(handle) as data:
            return data["labels"].astype(np.uint8), data["affine"].astype(np.float64)


# ---------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------
def _validate_resolution(resolution) -> np.ndarray:
    res = np.asarray(resolution, dtype=np.float64).reshape(-1)
    if res.size == 1:
        res = np.repeat(res, 3)
    lo, hi = RESOLUTION_RANGE_MM
    if res.shape != (3,) or not np.all(np.isfinite(res)) or np.any(res < lo) or np.any(res > hi):
        raise InputError(
            f"resolution must be one voxel size or three (x, y, z) in mm, each between {lo} and {hi}; "
            f"got {resolution!r}. Example: head_phantom(2.0) or head_phantom((0.6, 0.6, 2.0))"
        )
    return res


def _axis_plan(n_old: int, step: float):
    """How one axis is resampled: ``("blocks", starts)`` or ``("nearest", indices)``.

    Coarsened axes (step >= 1): new voxel i covers the old voxels whose centres
    fall in it, [starts[i], starts[i + 1]). Refined axes: the old voxel nearest
    to each new centre. ``step`` is in old voxels.
    """
    n_new = max(1, int(np.floor(n_old / step + 1e-6)))
    if step >= 1.0:
        starts = np.ceil(np.arange(n_new) * step - 0.5 - 1e-6).astype(np.intp)
        return "blocks", np.clip(starts, 0, n_old - 1)
    centres = (np.arange(n_new) + 0.5) * step - 0.5  # new voxel centres in old index units
    return "nearest", np.clip(np.round(centres).astype(np.intp), 0, n_old - 1)


def _sub_plan(plan, n_old: int, lo: int, hi: int):
    """Restrict an axis plan to the old index range [lo, hi): (old slice, new slice, plan)."""
    kind, index = plan
    if kind == "blocks":
        b0 = int(np.searchsorted(index, lo, side="right")) - 1
        b1 = int(np.searchsorted(index, hi - 1, side="right"))
        old_stop = int(index[b1]) if b1 < index.size else n_old
        old = slice(int(index[b0]), old_stop)
        return old, slice(b0, b1), (kind, index[b0:b1] - index[b0])
    i0, i1 = int(np.searchsorted(index, lo)), int(np.searchsorted(index, hi))
    return slice(lo, hi), slice(i0, i1), (kind, index[i0:i1] - lo)


def _block_counts(volume: np.ndarray, plans) -> np.ndarray:
    """Per new voxel, the sum of ``volume`` over the old voxels it covers."""
    for axis, (kind, index) in enumerate(plans):
        if kind == "nearest":
            volume = np.take(volume, index, axis=axis)
            continue
        # block sums as differences of a cumulative sum (several times faster than reduceat)
        total = np.cumsum(volume, axis=axis, dtype=np.int32)
        stops = np.append(index[1:], volume.shape[axis]) - 1
        before = np.take(total, index[1:] - 1, axis=axis)
        zero = np.zeros_like(np.take(total, [0], axis=axis))
        volume = np.take(total, stops, axis=axis) - np.concatenate([zero, before], axis=axis)
    return volume


def resample_labels(labels: np.ndarray, affine: np.ndarray, resolution) -> tuple[np.ndarray, np.ndarray]:
    """Resample a label map to ``resolution`` mm, keeping the field of view.

    Along coarsened axes each new voxel takes the label that covers most of the
    old voxels it contains (plurality vote, so thin structures survive where
    they dominate; ties go to the lower label); along refined axes it takes the
    nearest old voxel.

    Parameters
    ----------
    labels : (x, y, z) integer array
    affine : (4, 4) array, voxel index -> world mm
    resolution : float or 3 floats, mm

    Returns
    -------
    labels : uint8 array of the new shape
    affine : (4, 4) affine of the new grid (same world extent, voxel size = resolution)
    """
    res = _validate_resolution(resolution)
    old_size = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    steps = res / old_size
    if np.allclose(steps, 1.0):
        return labels.astype(np.uint8, copy=True), np.array(affine, dtype=np.float64)
    plans = [_axis_plan(n, s) for n, s in zip(labels.shape, steps)]
    new_shape = tuple(index.size for _, index in plans)
    out = np.zeros(new_shape, np.uint8)
    best = np.zeros(new_shape, np.int32)
    # One vectorised count per label, restricted to the label's bounding box:
    # most labels (nuclei, veins, lesions) are small, so this is cheap.
    boxes = [tuple(slice(0, n) for n in labels.shape)] + list(ndimage.find_objects(labels))
    for value, box in enumerate(boxes):
        if box is None:
            continue
        parts = [_sub_plan(plan, n, s.start, s.stop) for plan, n, s in zip(plans, labels.shape, box)]
        if any(new.stop <= new.start for _, new, _ in parts):
            continue
        old = tuple(p[0] for p in parts)
        new = tuple(p[1] for p in parts)
        count = _block_counts((labels[old] == value).astype(np.uint8), [p[2] for p in parts])
        better = count > best[new]
        out[new][better] = value
        best[new] = np.maximum(best[new], count)
    scale = np.diag(np.append(steps, 1.0))
    scale[:3, 3] = 0.5 * steps - 0.5  # new voxel 0 centre in old index units
    return out, np.asarray(affine, dtype=np.float64) @ scale


def _axis_coordinates(shape, affine):
    """World (MNI mm) coordinate of voxel centres along each axis (the phantom grid is axis-aligned)."""
    return [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(shape)]


def _paint_sphere(labels, coords, centre, radius, value, allowed_values):
    """Set ``value`` inside a sphere (world mm) over voxels whose label is allowed.

    Works on the sphere's bounding box only; on coarse grids the voxel nearest
    to the centre is always included, so a lesion smaller than a voxel still shows.
    """
    box, axes = [], []
    for c, axis_coords in zip(centre, coords):
        nearest = int(np.argmin(np.abs(axis_coords - c)))
        inside = np.flatnonzero(np.abs(axis_coords - c) <= radius)
        lo = min(nearest, inside.min()) if inside.size else nearest
        hi = max(nearest, inside.max()) if inside.size else nearest
        box.append(slice(lo, hi + 1))
        axes.append(axis_coords[lo : hi + 1] - c)
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = x**2 + y**2 + z**2 <= radius**2
    inside[tuple(int(np.argmin(np.abs(a))) for a in axes)] = True
    region = labels[tuple(box)]  # a view: assignments below change ``labels``
    region[inside & np.isin(region, allowed_values)] = value


def _apply_scenario(labels, affine, scenario, table):
    """Relabel voxels for a scenario (labels only; properties follow from the table)."""
    components = {
        "all": ("paradoxical-calcification", "microbleeds", "calcified-lesion"),
    }.get(scenario, (scenario,))
    if "healthy" in components:
        return labels
    labels = labels.copy()
    brain_labels = [t.label for t in table.values() if t.compartment == "brain"]
    coords = _axis_coordinates(labels.shape, affine)
    if "paradoxical-calcification" in components:
        medial = (np.abs(coords[0]) < _GP_CENTRE_ABS_X_MM)[:, None, None]
        gp = labels == table["globus_pallidus"].label
        labels[gp & medial] = table["pallidal_calcification"].label
    if "calcified-lesion" in components:
        centre, radius = _CALCIFIED_LESION
        _paint_sphere(labels, coords, centre, radius, table["calcification"].label, brain_labels)
    if "microbleeds" in components:
        for centre, radius in _MICROBLEEDS:
            _paint_sphere(labels, coords, centre, radius, table["microbleed"].label, brain_labels)
    return labels


def _smooth_texture(shape, voxel_size, seed):
    """Zero-mean, unit-variance smooth random field (Gaussian-filtered white noise), clipped."""
    rng = np.random.default_rng([seed, 7])
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = _TEXTURE_SIGMA_MM / np.asarray(voxel_size, dtype=np.float64)
    smooth = ndimage.gaussian_filter(noise, sigma=sigma, mode="reflect")
    smooth /= max(float(smooth.std()), 1e-12)
    return np.clip(smooth, -_TEXTURE_CLIP, _TEXTURE_CLIP)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def head_phantom(resolution=1.0, *, scenario: str = "healthy", seed: int = 0) -> Phantom:
    """Numerical head phantom with susceptibility sources and relaxation properties at 3 T.

    Parameters
    ----------
    resolution : float or 3 floats, mm
        Voxel size; isotropic when one number. The 1 mm MNI label map is
        resampled (labels first, then properties), e.g. ``(0.6, 0.6, 2.0)``.
    scenario : {"healthy", "paradoxical-calcification", "microbleeds", "calcified-lesion", "all"}
        "paradoxical-calcification": the medial globus pallidus holds
        co-deposited iron and calcium (chi_para +0.15, chi_dia +0.10 ppm, net
        chi positive; Oshima et al., Radiology 2020). "microbleeds": seven
        haemosiderin spheres (chi_para 1 ppm, radius 1.5-2.5 mm).
        "calcified-lesion": a 4 mm-radius calcification (chi_dia 3 ppm) in
        right parietal white matter. "all": the three together.
    seed : int
        Seed of the smooth tissue texture (white and grey matter chi vary by a
        few per cent); the same seed gives the same phantom.

    Returns
    -------
    Phantom
        Maps on the (x, y, z) grid in MNI orientation; chi in ppm relative
        to water (air +9.4, bone -2), relaxation in SI units (1/s, s).

    Raises
    ------
    InputError
        Unknown scenario, invalid resolution or seed.

    Examples
    --------
    >>> ph = head_phantom(4.0, scenario="all")
    >>> ph.labels.shape
    (49, 58, 47)
    """
    if scenario not in SCENARIOS:
        raise InputError(f"scenario must be one of {', '.join(SCENARIOS)}; got {scenario!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    table = load_tissue_table()
    labels_1mm, affine_1mm = load_labels_1mm()
    labels, affine = resample_labels(labels_1mm, affine_1mm, resolution)
    labels = _apply_scenario(labels, affine, scenario, table)
    voxel_size = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))

    n = max(t.label for t in table.values()) + 1
    lut = {key: np.zeros(n, np.float32) for key in ("chi_para", "chi_dia", "chi", "r2", "t1", "m0", "texture")}
    in_brain = np.zeros(n, bool)
    for t in table.values():
        for key in lut:
            lut[key][t.label] = getattr(t, key)
        in_brain[t.label] = t.compartment == "brain"
    maps = {key: lut[key][labels] for key in lut}

    amplitude = maps.pop("texture")
    textured = amplitude > 0
    if textured.any():
        factor = 1.0 + amplitude * _smooth_texture(labels.shape, voxel_size, int(seed))
        for key in ("chi_para", "chi_dia"):
            maps[key] = np.where(textured, maps[key] * factor, maps[key]).astype(np.float32)
        maps["chi"] = np.where(textured, maps["chi_para"] - maps["chi_dia"], maps["chi"]).astype(np.float32)

    return Phantom(
        labels=labels,
        label_names={t.label: t.name for t in sorted(table.values(), key=lambda t: t.label)},
        brain_mask=in_brain[labels],
        affine=affine,
        voxel_size=voxel_size,
        scenario=scenario,
        seed=int(seed),
        tissues=table,
        **maps,
    )
