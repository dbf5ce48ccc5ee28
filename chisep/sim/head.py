"""Realistic whole-head simulation: what a scanner would give, not what chisep assumes.

The built-in phantom (:mod:`chisep.sim.phantom`) is simulated on the grid that
the reconstruction inverts, with the separation model's own R2' and with edges
shared by every map; it flatters every method. This module builds a head that
avoids those crimes (see ../shared/SCIENCE.md, "Simulating without the inverse
crime or the model crime"):

* computed on a grid ``oversampling`` times finer than the output (continuous
  dipole kernel, zero padding), output voxels formed from the complex signal
  (box average), so data carry partial volume and intra-voxel dephasing; the
  anatomy is resampled through a rigid (head "A") or deformed (head "B",
  the holdout) transform, so no edge is aligned with the output grid;
* non-brain tissue built around the MNI brain from distance maps, with
  thicknesses that vary over the head: dura, cortical tables (no GRE signal,
  phase is noise), fatty diploic marrow, muscle (thick temporalis), subcutaneous
  fat with its six-peak chemical shift, skin, eyes and orbital fat, air in
  sinuses, mastoids and ear canals, and a receive-coil bias field;
* M0, T1, R2, chi_para and chi_dia with independent textures, chi maps blurred
  across label edges that relaxation maps keep sharp;
* R2' from static dephasing of sub-voxel sources (spheres for iron,
  cylinders along a fibre field for myelin; Yablonskiy & Haacke 1994), a
  mechanism no separation model assumes (``r2prime="linear"`` gives the old
  Dr * chi relation for comparison);
* a noisy spin-echo R2 map, as users measure it.

Constants are in ``data/head.toml`` (with references); tissue values in
``data/tissues.toml``.

>>> from chisep.sim import simulate_head
>>> sim = simulate_head(4.0, head="A", snr=100, seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, special

from chisep import physics
from chisep.acquisition import Acquisition
from chisep.errors import InputError
from chisep.sim import phantom as _phantom
from chisep.sim.gre import (
    DEFAULT_PAD_FACTOR,
    GreSimulation,
    GroundTruth,
    _block_mean,
    _smooth_phase_offset,
    _validated_settings,
    b0_and_affine,
    check_phase_sign,
    relaxometric_constants,
    simulate_fields,
)
from chisep.sim.phantom import SCENARIOS, Phantom, Tissue

HEADS = ("A", "B")
R2PRIME_MODELS = ("static-dephasing", "linear")
#: 5 echoes, 5-29 ms, a common clinical QSM protocol at 3 T.
DEFAULT_HEAD_ECHO_TIMES = (0.005, 0.011, 0.017, 0.023, 0.029)
# Head geometry (distance maps, thickness fields) is worked out on a 1 mm grid and
# interpolated to the simulation grid: layers are smooth, and a 0.5 mm EDT would cost minutes.
_WORK_MM = 1.0
# Head "A": the template under a small rigid motion, so that no label edge lies on the
# output grid (a head never sits exactly on the scanner's grid).
_HEAD_A_ROTATION_DEG = (2.0, -1.5, 1.0)
_HEAD_A_SHIFT_MM = (0.3, -0.4, 0.25)
_HEAD_CENTRE_MM = np.array([0.0, -18.0, 10.0])
_TEXTURE_CLIP = 2.5
_LESIONS_AS_SPHERES = ("calcification", "pallidal_calcification", "microbleed")
_HEAD_SEEDS = {"A": 11, "B": 23}


@lru_cache(maxsize=1)
def load_head_settings() -> dict:
    """``data/head.toml`` (geometry, textures, fat, static dephasing, coil, holdout)."""
    return tomllib.loads(resources.files("chisep.sim").joinpath("data/head.toml").read_text())


@dataclass(frozen=True, eq=False)
class HeadModel:
    """A whole head on the simulation (fine) grid.

    Attributes
    ----------
    phantom : Phantom
        Its ``brain_mask`` is the intracranial volume (brain, ventricles, subarachnoid
        CSF), chi relative to water, fat included in ``chi``.
    fat_fraction : (x, y, z) float32
        Share of the proton density in fat.
    fibre : (x, y, z, 3) float16
        Unit vectors (axon direction, used for cylinders).
    dia_spheres : (x, y, z) bool
        Where diamagnetic sources are spheres (calcifications).
    head : "A" or "B"
    """

    phantom: Phantom
    fat_fraction: np.ndarray
    fibre: np.ndarray
    dia_spheres: np.ndarray
    head: str


# ---------------------------------------------------------------------------
# static dephasing (Yablonskiy & Haacke 1994)
# ---------------------------------------------------------------------------
_X_MAX = 200.0


@lru_cache(maxsize=1)
def dephasing_functions():
    """Tables (x, F_sphere(x), F_cylinder(x)) of the static-dephasing decay functions.

    F(x) = x * int_0^x g(v) / v^2 dv (substituting v = x s in SCIENCE.md's
    integrals), with g_sphere(v) = 1 - int_0^1 cos(v (3 mu^2 - 1)) dmu (the real
    part: the sources' mean frequency is the macroscopic field already) and
    g_cylinder(v) = 1 - J0(v). Limits: 0.4 x^2 and 2 pi/(3 sqrt 3) x for
    spheres, x^2/4 and x for cylinders.
    """
    v = np.linspace(0.0, _X_MAX, 40001)
    mu = np.linspace(0.0, 1.0, 2001)
    w_mu = np.full(mu.size, mu[1] - mu[0])
    w_mu[[0, -1]] *= 0.5
    g_sphere = np.empty_like(v)
    for start in range(0, v.size, 4000):
        chunk = v[start:start + 4000, None]
        g_sphere[start:start + 4000] = 1.0 - np.cos(chunk * (3 * mu**2 - 1)) @ w_mu
    g_cyl = 1.0 - special.j0(v)
    out = [v.astype(np.float32)]
    for g, small in ((g_sphere, 0.4), (g_cyl, 0.25)):
        ratio = np.empty_like(v)
        ratio[1:] = g[1:] / v[1:] ** 2
        ratio[0] = small
        cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (ratio[1:] + ratio[:-1]) * np.diff(v))])
        out.append((v * cumulative).astype(np.float32))
    return tuple(out)


_SPHERE_SLOPE = 2 * np.pi / (3 * np.sqrt(3))  # long-time slope of F_sphere; F_cylinder's is 1


def _lookup(table_x, table, x, slope, xp=np):
    """F(x) from its table, continued linearly (its asymptote) beyond the table's end; ``xp``: np or jnp."""
    return xp.interp(x, table_x, table) + slope * xp.maximum(x - table_x[-1], 0.0)


def dephasing_decay(chi_ppm, dchi_ppm, time_s, field_strength, *, geometry: str, sin2_theta=1.0):
    """-log of the signal attenuation by sub-voxel sources (static dephasing), numpy.

    chi_ppm : voxel-mean source susceptibility (volume fraction * dchi)
    dchi_ppm : susceptibility difference of one source from its surroundings
    geometry : "sphere" or "cylinder" (then ``sin2_theta`` of the axis against B0)
    """
    x_table, f_sphere, f_cyl = dephasing_functions()
    d_omega = 2 * np.pi * physics.ppm_to_hz(np.asarray(dchi_ppm, np.float64), field_strength)
    if geometry == "sphere":
        x, table, slope = d_omega * time_s / 3.0, f_sphere, _SPHERE_SLOPE
    else:
        x, table, slope = d_omega * np.asarray(sin2_theta) * time_s / 2.0, f_cyl, 1.0
    return np.asarray(chi_ppm) / np.asarray(dchi_ppm) * _lookup(x_table, table, x, slope)


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def _rotation(degrees) -> np.ndarray:
    rx, ry, rz = np.deg2rad(np.asarray(degrees, np.float64))
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def _smooth_noise(shape, spacing_mm, sigma_mm, rng) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered white noise on a grid (float32, clipped)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, np.asarray(sigma_mm) / np.asarray(spacing_mm), mode="reflect")
    smooth /= max(float(smooth.std()), 1e-12)
    return np.clip(smooth, -_TEXTURE_CLIP, _TEXTURE_CLIP)


class _Transform:
    """Output world mm -> template (MNI) mm for one head."""

    def __init__(self, head: str, settings: dict):
        if head == "A":
            self.rotation = _rotation(_HEAD_A_ROTATION_DEG)
            self.scale = np.ones(3)
            self.shift = np.asarray(_HEAD_A_SHIFT_MM)
            self.displacement = None
            return
        hold = settings["holdout"]
        self.rotation = _rotation(hold["rotation_deg"])
        self.scale = np.asarray(hold["scale"], np.float64)
        self.shift = np.zeros(3)
        # smooth random displacement on an 8 mm grid over the template field of view
        rng = np.random.default_rng([_HEAD_SEEDS[head], 5])
        self.grid_origin, self.grid_step = np.array([-104.0, -140.0, -78.0]), 8.0
        shape = (28, 32, 27)
        fields = [_smooth_noise(shape, self.grid_step, hold["displacement_sigma_mm"], rng) for _ in range(3)]
        norm = np.sqrt(np.mean(sum(f**2 for f in fields)))
        self.displacement = [f * np.float32(hold["displacement_mm"] / norm) for f in fields]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """points (n, 3) world mm -> (n, 3) template mm."""
        p = (points - _HEAD_CENTRE_MM) @ self.rotation  # R^T (w - c) as row vectors
        p = p / self.scale + _HEAD_CENTRE_MM + self.shift
        if self.displacement is not None:
            index = ((p - self.grid_origin) / self.grid_step).T
            p = p + np.stack([ndimage.map_coordinates(d, index, order=1, mode="nearest")
                              for d in self.displacement], axis=1)
        return p


def _grid_points(shape, affine, z_slice) -> np.ndarray:
    """World coordinates (n, 3) of the voxel centres of an axis-aligned grid, z range ``z_slice``."""
    axes = _phantom._axis_coordinates(shape, affine)
    axes[2] = axes[2][z_slice]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)


def _sample(volume, affine, points, order):
    """Values of an axis-aligned ``volume`` at world ``points`` (outside -> 0)."""
    index = ((points - affine[:3, 3]) / np.diag(affine)[:3]).T
    return ndimage.map_coordinates(volume, index, order=order, mode="constant", cval=0)


def _by_slab(shape, affine, function, out_dtype, n_slabs=None):
    """Evaluate ``function(points) -> values`` over a grid in z slabs (bounded memory)."""
    out = np.empty(shape, out_dtype)
    step = max(1, shape[2] // (n_slabs or max(1, int(np.prod(shape) // 4_000_000))))
    for k in range(0, shape[2], step):
        z = slice(k, min(k + step, shape[2]))
        points = _grid_points(shape, affine, z)
        out[:, :, z] = function(points).reshape(shape[0], shape[1], -1)
    return out


def _thickness_fields(work_shape, work_affine, settings, rng) -> dict[str, np.ndarray]:
    """Layer thickness maps (mm) on the work grid: mean * (1 + amplitude * smooth noise)."""
    geo = settings["geometry"]
    sigma = geo["variation_sigma_mm"]
    coarse = tuple(int(np.ceil(n / 4)) for n in work_shape)
    out = {}
    for name in ("dura", "inner_table", "diploe", "outer_table", "galea", "fat", "skin"):
        mean, amplitude = geo[f"{name}_mm"]
        noise = ndimage.zoom(_smooth_noise(coarse, 4.0, sigma, rng),
                             [a / b for a, b in zip(work_shape, coarse)], order=1, grid_mode=True, mode="nearest")
        out[name] = np.maximum(mean * (1 + amplitude * noise[: work_shape[0], : work_shape[1], : work_shape[2]]),
                               0.3 * mean).astype(np.float32)
    # temporalis: over the temporal squama (lateral, between the ear and the vertex)
    x, y, z = np.meshgrid(*_phantom._axis_coordinates(work_shape, work_affine), indexing="ij", sparse=True)
    lateral = np.clip((np.abs(x) - 35.0) / 20.0, 0, 1)
    height = np.exp(-(((z - 5.0) / 28.0) ** 2)) * np.exp(-(((y + 15.0) / 40.0) ** 2))
    out["galea"] = (out["galea"] + geo["temporalis_mm"] * lateral * height).astype(np.float32)
    return out


def _template_tissues(head: str, settings: dict) -> dict[str, Tissue]:
    """Tissue table, with each brain tissue's values varied for the holdout head."""
    table = _phantom.load_tissue_table()
    if head == "A":
        return table
    rng = np.random.default_rng([_HEAD_SEEDS[head], 9])
    spread = float(settings["holdout"]["tissue_variation"])
    varied = {}
    for name, t in table.items():
        if t.compartment != "brain":
            varied[name] = t
            continue
        f = 1.0 + spread * rng.uniform(-1, 1, 5)
        chi_para, chi_dia = t.chi_para * f[0], t.chi_dia * f[1]
        varied[name] = replace(t, chi_para=chi_para, chi_dia=chi_dia, chi=chi_para - chi_dia,
                               r2=t.r2 * f[2], t1=t.t1 * f[3], m0=t.m0 * f[4])
    return varied


def _fine_grid(resolution):
    """Shape and affine of the simulation grid: the template's field of view at ``resolution``."""
    labels_1mm, affine_1mm = _phantom.load_labels_1mm()
    extent = np.asarray(labels_1mm.shape, np.float64) * np.diag(affine_1mm)[:3]
    shape = tuple(int(np.floor(e / r + 1e-6)) for e, r in zip(extent, resolution))
    affine = np.diag(np.append(resolution, 1.0))
    affine[:3, 3] = affine_1mm[:3, 3] - 0.5 * np.diag(affine_1mm)[:3] + 0.5 * np.asarray(resolution)
    return shape, affine, labels_1mm, affine_1mm


def head_model(resolution, *, head: str = "A", scenario: str = "healthy") -> HeadModel:
    """Build a whole head on a grid of ``resolution`` mm (the simulation grid).

    Parameters
    ----------
    resolution : float or 3 floats, mm
    head : "A" (the template under a small rigid motion) or "B" (the holdout:
        deformed template, other tissue values, layers, textures)
    scenario : as in :func:`chisep.sim.head_phantom`

    Returns
    -------
    HeadModel
    """
    if head not in HEADS:
        raise InputError(f"head must be one of {HEADS} ('B' is the holdout head), got {head!r}")
    if scenario not in SCENARIOS:
        raise InputError(f"scenario must be one of {', '.join(SCENARIOS)}; got {scenario!r}")
    res = _phantom._validate_resolution(resolution)
    settings = load_head_settings()
    geo = settings["geometry"]
    table = _template_tissues(head, settings)
    label = {name: t.label for name, t in table.items()}
    rng = np.random.default_rng([_HEAD_SEEDS[head], 1])
    transform = _Transform(head, settings)
    shape, affine, template, template_affine = _fine_grid(res)
    in_brain = np.zeros(256, bool)
    in_brain[[t.label for t in table.values() if t.compartment == "brain"]] = True

    # --- work grid (1 mm, output world): intracranial volume, distances, thicknesses
    work_shape, work_affine, _, _ = _fine_grid(np.full(3, _WORK_MM))
    work_labels = _by_slab(work_shape, work_affine,
                           lambda p: _sample(template, template_affine, transform(p), 0), np.uint8)
    icv = in_brain[work_labels]
    sinus = work_labels == label["sinus_air"]
    d_out = ndimage.distance_transform_edt(~icv, sampling=_WORK_MM).astype(np.float32)
    thick = _thickness_fields(work_shape, work_affine, settings, rng)
    bounds = np.cumsum([thick[k] for k in ("dura", "inner_table", "diploe", "outer_table", "galea")], axis=0)
    skin_fat = thick["skin"] + thick["fat"]
    z_world = _phantom._axis_coordinates(work_shape, work_affine)[2]
    face = (work_labels > 0) & (z_world < geo["neck_level_mm"])[None, None, :]
    eye_c, eye_r, orbit_r = np.asarray(geo["eye_centre_mm"]), geo["eye_radius_mm"], geo["orbit_radius_mm"]
    points = _grid_points(work_shape, work_affine, slice(None)).reshape(work_shape + (3,))
    orbits = np.zeros(work_shape, bool)
    for side in (1.0, -1.0):
        orbits |= np.linalg.norm(points - eye_c * [side, 1, 1], axis=-1) <= orbit_r + 2.0
    del points
    envelope = (icv | (d_out <= bounds[-1] + skin_fat) | face | orbits
                | ndimage.binary_dilation(sinus, iterations=3))
    envelope = ndimage.binary_fill_holes(envelope)
    d_skin = ndimage.distance_transform_edt(envelope, sampling=_WORK_MM).astype(np.float32)
    # as uint8 once: the slabs below sample them with map_coordinates
    sinus_wall = (ndimage.binary_dilation(sinus, iterations=2) & ~sinus).astype(np.uint8)
    sinus_u8 = sinus.astype(np.uint8)

    # --- fine grid labels
    ear_c, ear_r, ear_depth = (np.asarray(geo["ear_canal_centre_mm"]), geo["ear_canal_radius_mm"],
                               geo["ear_canal_depth_mm"])

    def labels_at(p):
        out = _sample(template, template_affine, transform(p), 0).astype(np.uint8)
        brain = in_brain[out]
        out[~brain] = 0
        rest = ~brain
        q = p[rest]
        ds = _sample(d_skin, work_affine, q, 1)
        do = _sample(d_out, work_affine, q, 1)
        b = [_sample(bounds[i], work_affine, q, 1) for i in range(4)]
        skin = _sample(thick["skin"], work_affine, q, 1)
        sf = _sample(skin_fat, work_affine, q, 1)
        lab = np.full(q.shape[0], label["muscle"], np.uint8)
        lab[do <= b[3]] = label["bone"]
        lab[do <= b[2]] = label["marrow"]
        lab[do <= b[1]] = label["bone"]
        lab[do <= b[0]] = label["dura"]
        lab[_sample(sinus_wall, work_affine, q, 0) > 0] = label["bone"]
        lab[ds <= sf] = label["fat"]
        lab[ds <= skin] = label["skin"]
        for side in (1.0, -1.0):
            r = np.linalg.norm(q - eye_c * [side, 1, 1], axis=1)
            lab[(r <= orbit_r) & (do > 2.0)] = label["fat"]
            lab[r <= eye_r] = label["eye"]
            canal = (np.hypot(q[:, 1] - ear_c[1], q[:, 2] - ear_c[2]) <= ear_r) & (
                side * q[:, 0] > 0) & (do > 1.0)
            # the canal runs from the skin inwards for ear_depth mm (ds: depth below the skin)
            lab[canal & (ds <= ear_depth)] = label["sinus_air"]
        lab[_sample(sinus_u8, work_affine, q, 0) > 0] = label["sinus_air"]
        lab[ds <= 0.0] = 0
        out[rest] = lab
        return out

    labels = _by_slab(shape, affine, labels_at, np.uint8)
    labels = _phantom._apply_scenario(labels, affine, scenario, table)
    return _properties(labels, affine, res, table, settings, head, scenario, rng)


def _fft_smooth_noise(shape, spacing, sigma_mm, rng) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise via FFT (fast on large grids), clipped."""
    import scipy.fft

    noise = rng.standard_normal(shape, dtype=np.float32)
    spectrum = scipy.fft.rfftn(noise, workers=-1)
    del noise
    freqs = [np.fft.fftfreq(n, d) for n, d in zip(shape[:2], spacing[:2])] + [np.fft.rfftfreq(shape[2], spacing[2])]
    fx, fy, fz = np.meshgrid(*[f.astype(np.float32) for f in freqs], indexing="ij", sparse=True)
    spectrum *= np.exp(-2 * (np.pi * sigma_mm) ** 2 * (fx**2 + fy**2 + fz**2)).astype(np.float32)
    smooth = scipy.fft.irfftn(spectrum, s=shape, workers=-1).astype(np.float32)
    smooth /= max(float(smooth.std()), 1e-12)
    return np.clip(smooth, -_TEXTURE_CLIP, _TEXTURE_CLIP)


def _properties(labels, affine, res, table, settings, head, scenario, rng) -> HeadModel:
    """Tissue maps with independent textures, fat fraction, fibre field."""
    n = 256
    keys = ("chi_para", "chi_dia", "chi", "r2", "t1", "m0", "fat_fraction")
    lut = {k: np.zeros(n, np.float32) for k in keys}
    brain_lut, split_lut, sphere_lut = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    for t in table.values():
        for k in keys:
            lut[k][t.label] = getattr(t, k)
        brain_lut[t.label] = t.compartment == "brain"
        split_lut[t.label] = t.is_source_split
        sphere_lut[t.label] = t.name in _LESIONS_AS_SPHERES
    brain = brain_lut[labels]
    tissue = labels > 0
    maps = {k: lut[k][labels] for k in keys}
    tex = settings["textures"]
    for key in ("m0", "t1", "r2", "chi_para", "chi_dia"):
        amplitude, sigma = tex[key]
        where = brain if key.startswith("chi") else tissue
        factor = 1.0 + np.float32(amplitude) * _fft_smooth_noise(labels.shape, res, sigma, rng)
        maps[key] = np.where(where, maps[key] * factor, maps[key]).astype(np.float32)
        del factor
    blur = np.asarray(tex["chi_edge_blur_mm"]) / res
    weight = ndimage.gaussian_filter(brain.astype(np.float32), blur)
    for key in ("chi_para", "chi_dia"):
        smooth = ndimage.gaussian_filter(np.where(brain, maps[key], 0).astype(np.float32), blur)
        maps[key] = np.where(brain, smooth / np.maximum(weight, 1e-3), 0).astype(np.float32)
    del weight
    fat = settings["fat"]
    split = split_lut[labels]
    maps["chi"] = np.where(split, maps["chi_para"] - maps["chi_dia"],
                           maps["chi"] + maps["fat_fraction"] * np.float32(fat["chi_ppm"])).astype(np.float32)
    # fibre directions: smooth random field, ordered in the densely myelinated tracts
    fibre = np.stack([_fft_smooth_noise(labels.shape, res, 6.0, rng) for _ in range(3)], axis=-1)
    tracts = labels == table["white_matter_tracts"].label
    if tracts.any():
        x_world = _phantom._axis_coordinates(labels.shape, affine)[0]
        callosal = tracts & (np.abs(x_world) < 12.0)[:, None, None]
        fibre[callosal] = (1.0, 0.0, 0.0)  # corpus callosum runs left-right
        fibre[tracts & ~callosal] = (0.0, 0.0, 1.0)  # internal capsule runs head-foot
    fibre /= np.maximum(np.linalg.norm(fibre, axis=-1, keepdims=True), 1e-6)
    phantom = Phantom(
        labels=labels,
        label_names={t.label: t.name for t in sorted(table.values(), key=lambda t: t.label)},
        chi_para=maps["chi_para"], chi_dia=maps["chi_dia"], chi=maps["chi"], r2=maps["r2"], t1=maps["t1"],
        m0=maps["m0"], brain_mask=brain, affine=affine, voxel_size=res, scenario=scenario,
        seed=_HEAD_SEEDS[head], tissues=table)
    return HeadModel(phantom=phantom, fat_fraction=maps["fat_fraction"], fibre=fibre.astype(np.float16),
                     dia_spheres=sphere_lut[labels] & brain, head=head)


# ---------------------------------------------------------------------------
# signal
# ---------------------------------------------------------------------------
def _shimmed(total: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Field minus its least-squares fit over the brain by the harmonics of order <= 2 (a scanner shim)."""
    index = np.argwhere(brain)[:: max(1, int(brain.sum() // 200_000))]

    def basis(points):
        x, y, z = (points * np.diag(affine)[:3] / 100.0).T  # decimetres: well-conditioned
        return np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x**2 - y**2, 2 * z**2 - x**2 - y**2], 1)
    coef, *_ = np.linalg.lstsq(basis(index.astype(np.float64)), total[tuple(index.T)].astype(np.float64), rcond=None)
    out = np.empty_like(total)
    i, j = np.meshgrid(np.arange(total.shape[0]), np.arange(total.shape[1]), indexing="ij")
    points = np.stack([i.ravel(), j.ravel(), np.zeros(i.size)], 1).astype(np.float64)
    for k in range(total.shape[2]):  # slab by slab: the basis of a whole 0.5 mm grid is gigabytes
        points[:, 2] = k
        out[:, :, k] = total[:, :, k] - (basis(points) @ coef).reshape(i.shape).astype(np.float32)
    return out


def coil_sensitivity(shape, affine, settings=None) -> np.ndarray:
    """Root-sum-of-squares sensitivity of a ring of receive elements, normalised to mean 1 (float32)."""
    coil = (settings or load_head_settings())["coil"]
    points = _grid_points(shape, affine, slice(None))
    centre = np.asarray(coil["centre_mm"])
    total = np.zeros(points.shape[0], np.float64)
    for k in range(int(coil["elements"])):
        angle = 2 * np.pi * k / coil["elements"]
        tilt = 25.0 * (1 if k % 2 else -1)  # alternate elements above and below the ring
        element = centre + coil["ring_radius_mm"] * np.array([np.cos(angle), np.sin(angle), 0.0]) + [0, 0, tilt]
        distance = np.linalg.norm(points - element, axis=1)
        total += (1.0 + (distance / coil["falloff_mm"]) ** 2) ** -3
    sens = np.sqrt(total).reshape(shape)
    return (sens / sens.mean()).astype(np.float32)


@partial(jax.jit, static_argnames=("factor", "linear"))
def _coarse_echo(water, fat_amp, r2, r2_fat, field_hz, phi0, fat_phasor, chi_para, chi_dia, sin2, dia_sphere,
                 te, sign, consts, tables, factor, linear):
    """Complex signal of one echo on the fine grid, box-averaged to the output grid; and -log of
    the water attenuation by sub-voxel sources (for the effective R2')."""
    dr_p, dr_d, omega, dchi_s, dchi_c, zmax, share = consts
    x_table, f_sphere, f_cyl = tables
    if linear:
        decay = (dr_p * chi_para + dr_d * chi_dia) * te
    else:
        # denser deposits (lesions) act as stronger sources: the volume fraction stays <= zmax
        ds_p = jnp.maximum(dchi_s, chi_para / zmax)
        ds_ds = jnp.maximum(dchi_s, chi_dia / zmax)  # diamagnetic spheres (calcium; part of myelin)
        ds_dc = jnp.maximum(dchi_c, chi_dia / zmax)  # diamagnetic cylinders (myelinated axons)
        def sphere(x):
            return _lookup(x_table, f_sphere, x, _SPHERE_SLOPE, jnp)

        para = chi_para / ds_p * sphere(omega * ds_p * te / 3.0)
        dia_spheres = chi_dia / ds_ds * sphere(omega * ds_ds * te / 3.0)
        dia_cylinders = chi_dia / ds_dc * _lookup(x_table, f_cyl, omega * ds_dc * sin2 * te / 2.0, 1.0, jnp)
        decay = para + jnp.where(dia_sphere, dia_spheres, share * dia_cylinders + (1 - share) * dia_spheres)
    angle = sign * (phi0 + 2 * jnp.pi * field_hz * te)
    fat_term = fat_amp * jnp.exp(-r2_fat * te) * fat_phasor
    signal = (water * jnp.exp(-r2 * te - decay) + fat_term) * jnp.exp(1j * angle)
    n = [s // factor for s in signal.shape]
    blocks = signal[: n[0] * factor, : n[1] * factor, : n[2] * factor].reshape(
        n[0], factor, n[1], factor, n[2], factor)
    return blocks.mean(axis=(1, 3, 5)), decay


def simulate_head(
    resolution=2.0,
    *,
    head: str = "A",
    scenario: str = "healthy",
    oversampling: int = 2,
    snr: float | None = 100.0,
    seed: int = 0,
    field_strength: float = 3.0,
    echo_times=DEFAULT_HEAD_ECHO_TIMES,
    repetition_time: float = 0.035,
    flip_angle_deg: float = 15.0,
    b0_direction=None,
    r2prime: str = "static-dephasing",
    shim: bool = True,
    r2_noise: float = 0.05,
    coil_bias: bool = True,
    phase_offset: str | None = "smooth",
    phase_sign: int = 1,
    pad_factor: float = DEFAULT_PAD_FACTOR,
) -> GreSimulation:
    """Multi-echo GRE of a realistic whole head, simulated on a finer grid (see module doc).

    Parameters
    ----------
    resolution : float or 3 floats, mm
        Output voxel size (anisotropic allowed, e.g. (1, 1, 2)).
    head : "A" or "B"
        "B" is the holdout head: tune on "A", report on both.
    scenario : as in :func:`chisep.sim.head_phantom`
    oversampling : int >= 2
        The simulation grid is this many times finer than the output per axis
        (memory grows with its cube: 2 at 1 mm output is a 0.5 mm grid, ~70 M voxels; measured
        14 GB peak with a reconstruction, 5 min on 2 cores).
    snr : float or None
        Mean brain magnitude at the first echo over the per-channel noise SD.
    seed : int
        Seeds the noise, the phase offset and the R2 measurement noise (the
        anatomy of a head never changes).
    field_strength, echo_times, repetition_time, flip_angle_deg, b0_direction, phase_offset, phase_sign,
    pad_factor : as in :func:`chisep.sim.simulate_gre`
    r2prime : "static-dephasing" or "linear"
        "linear": R2' = Dr_para chi_para + Dr_dia chi_dia with chi-separation's own
        Dr (the model crime, for comparison only).
    shim : bool
        Remove the best second-order shim over the brain from the field, as the
        scanner's shim and centre frequency do (harmonic terms, so the local
        field is unchanged); without it the head's demagnetisation leaves about
        -1 ppm of offset and strong gradients.
    r2_noise : float >= 0
        Relative noise SD of the spin-echo R2 map in ``r2_measured``.
    coil_bias : bool
        Multiply the signal by a receive-coil sensitivity (RSS of 8 elements).

    Returns
    -------
    GreSimulation
        On the output grid, with ``r2_measured`` (1/s; 0 outside the head). The
        truth is the fine-grid average: chi, chi_para, chi_dia inside the brain
        mask (output voxels at least half intracranial); ``r2prime`` is the
        effective rate of a mono-exponential fit to the sub-voxel decay over the
        echo times; ``labels`` is a plurality vote.
    """
    tes = _validated_settings(None, field_strength, echo_times, repetition_time, flip_angle_deg,
                              snr, seed, phase_offset, pad_factor)
    if isinstance(oversampling, bool) or not isinstance(oversampling, (int, np.integer)) or oversampling < 2:
        raise InputError(f"oversampling must be an integer >= 2 (simulation voxels per output voxel and axis), "
                         f"got {oversampling!r}")
    if r2prime not in R2PRIME_MODELS:
        raise InputError(f"r2prime must be one of {R2PRIME_MODELS}, got {r2prime!r}")
    if not (np.isfinite(r2_noise) and r2_noise >= 0):
        raise InputError(f"r2_noise is a relative standard deviation (>= 0), got {r2_noise!r}")
    check_phase_sign(phase_sign)
    out_res = _phantom._validate_resolution(resolution)
    fine_res = out_res / oversampling
    if np.any(fine_res < 0.25):
        raise InputError(f"the simulation grid would be {fine_res} mm; use a coarser output or less oversampling")
    settings = load_head_settings()
    model = head_model(fine_res, head=head, scenario=scenario)
    ph = model.phantom
    b0, affine = b0_and_affine(ph.affine, b0_direction)
    field_strength = float(field_strength)
    total, local = simulate_fields(ph, field_strength=field_strength, b0_direction=b0, pad_factor=pad_factor)
    if shim:
        total = _shimmed(total, ph.brain_mask, ph.affine)

    fat = settings["fat"]
    alpha = np.deg2rad(float(flip_angle_deg))

    def steady(t1):
        e1 = np.exp(-float(repetition_time) / t1)
        return (np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1)).astype(np.float32)

    water = (ph.m0 * (1 - model.fat_fraction) * steady(np.maximum(ph.t1, 1e-3))).astype(np.float32)
    fat_amp = (ph.m0 * model.fat_fraction * steady(fat["t1_ms"] / 1000.0)).astype(np.float32)
    fibre = model.fibre.astype(np.float32)
    sin2 = (1.0 - (fibre @ np.asarray(b0, np.float32)) ** 2).astype(np.float32)
    del fibre
    phi0 = (_smooth_phase_offset(ph.shape, int(seed)) if phase_offset == "smooth"
            else np.zeros(ph.shape, np.float32))
    dr_p, dr_d = relaxometric_constants(field_strength)
    sd = settings["static_dephasing"]
    omega_per_ppm = 2 * np.pi * physics.ppm_to_hz(1.0, field_strength)
    dchi_scale = settings["holdout"]["source_dchi_scale"] if head == "B" else 1.0
    consts = jnp.asarray([dr_p, dr_d, omega_per_ppm, sd["sphere_dchi_ppm"] * dchi_scale,
                          sd["cylinder_dchi_ppm"] * dchi_scale, sd["max_volume_fraction"], sd["cylinder_share"]],
                         jnp.float32)
    tables = tuple(jnp.asarray(t) for t in dephasing_functions())
    shifts_hz = physics.ppm_to_hz(np.asarray(fat["shift_ppm"]), field_strength)
    amps = np.asarray(fat["amplitude"]) / np.sum(fat["amplitude"])
    args = [jnp.asarray(a) for a in (water, fat_amp, ph.r2, np.float32(1000.0 / fat["t2_ms"]), total, phi0)]
    rest = [jnp.asarray(a) for a in (ph.chi_para * ph.brain_mask, ph.chi_dia * ph.brain_mask, sin2,
                                     model.dia_spheres)]
    te_mean = float(np.mean(tes))
    stt = float(np.sum((np.asarray(tes) - te_mean) ** 2))
    # effective R2' = slope of the sub-voxel attenuation over the echoes (a single echo: its mean rate)
    weights = [(te - te_mean) / stt for te in tes] if len(tes) > 1 else [1.0 / tes[0]]
    coarse_shape = tuple(s // oversampling for s in ph.shape)
    signal = np.empty(coarse_shape + (len(tes),), np.complex64)
    r2p_fine = jnp.zeros(ph.shape, jnp.float32)
    for e, te in enumerate(tes):
        phasor = complex(np.sum(amps * np.exp(2j * np.pi * shifts_hz * te)))
        # the fat spectrum rotates with the same sign convention as the field
        phasor = phasor if phase_sign > 0 else phasor.conjugate()
        coarse, decay = _coarse_echo(*args, jnp.complex64(phasor), *rest, jnp.float32(te),
                                     jnp.float32(phase_sign), consts, tables, factor=int(oversampling),
                                     linear=r2prime == "linear")
        signal[..., e] = np.asarray(coarse)
        r2p_fine = r2p_fine + decay * np.float32(weights[e])
    r2p_fine = np.asarray(r2p_fine)
    del args, rest

    scale = np.diag(np.append(np.full(3, float(oversampling)), 1.0))
    scale[:3, 3] = 0.5 * oversampling - 0.5
    out_affine = affine @ scale
    if coil_bias:
        signal *= coil_sensitivity(coarse_shape, ph.affine @ scale, settings)[..., None]
    brain_fraction = _block_mean(ph.brain_mask.astype(np.float32), oversampling)
    brain = brain_fraction >= 0.5
    rng = np.random.default_rng([int(seed), 4])
    noise_sigma = 0.0
    if snr is not None:
        noise_sigma = float(np.abs(signal[..., 0])[brain].mean()) / float(snr)
        signal += noise_sigma * (rng.standard_normal(signal.shape, dtype=np.float32)
                                 + 1j * rng.standard_normal(signal.shape, dtype=np.float32))

    def mean(array, inside_brain=False):
        m = _block_mean(array, oversampling).astype(np.float32)
        return np.where(brain, m, 0).astype(np.float32) if inside_brain else m

    weight = water + fat_amp
    weight_mean = np.maximum(_block_mean(weight, oversampling), 1e-12)
    r2_true = (_block_mean(weight * ph.r2, oversampling) / weight_mean).astype(np.float32)
    head_fraction = _block_mean((ph.labels > 0).astype(np.float32), oversampling)
    in_head = head_fraction >= 0.5
    r2_measured = np.where(in_head, r2_true * (1 + r2_noise * rng.standard_normal(coarse_shape, dtype=np.float32)),
                           0).astype(np.float32)
    labels, _ = _phantom.resample_labels(ph.labels, ph.affine, out_res)
    labels = labels[: coarse_shape[0], : coarse_shape[1], : coarse_shape[2]]
    chi_para, chi_dia = mean(ph.chi_para, True), mean(ph.chi_dia, True)
    r2prime_eff = mean(r2p_fine, True)
    truth = GroundTruth(
        chi=(chi_para - chi_dia).astype(np.float32), chi_para=chi_para, chi_dia=chi_dia,
        field_total_hz=mean(total), field_local_hz=mean(local), field_background_hz=mean(total - local),
        r2star=(r2_true + r2prime_eff).astype(np.float32), r2=r2_true, r2prime=r2prime_eff,
        phase_offset=np.angle(_block_mean(np.exp(1j * phi0), oversampling)).astype(np.float32),
        m0=mean(ph.m0), labels=labels, label_names=dict(ph.label_names), brain_mask=brain,
        noise_sigma=noise_sigma, dr_para=dr_p, dr_dia=dr_d)
    acquisition = Acquisition(echo_times=tes, field_strength=field_strength, affine=out_affine,
                              b0_direction=b0, phase_sign=int(phase_sign))
    return GreSimulation(magnitude=np.abs(signal).astype(np.float32), phase=np.angle(signal).astype(np.float32),
                         acquisition=acquisition, truth=truth, r2_measured=r2_measured)
