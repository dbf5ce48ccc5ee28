"""Acquisition: the geometry and timing that every pipeline stage needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chisep import physics, validate
from chisep.errors import InputError

FIELD_STRENGTH_RANGE_T = (0.1, 20.0)


def check_echo_times(echo_times, n_echoes: int | None = None, *, data: str = "the data") -> np.ndarray:
    """Validate echo times in seconds: one per echo, positive, finite, strictly increasing.

    Returns them as a float64 array. Raises InputError naming the problem and
    the fix (values above 1 s are taken for milliseconds).
    """
    if echo_times is None:
        raise InputError("echo_times (s) are required, one per echo")
    tes = np.atleast_1d(np.asarray(echo_times, dtype=np.float64))
    if tes.ndim != 1 or tes.size == 0:
        raise InputError(f"echo_times is empty or not a list: give one echo time (s) per echo, got {echo_times!r}")
    if n_echoes is not None and tes.size != n_echoes:
        raise InputError(f"echo_times has {tes.size} entries but {data} has {n_echoes} echoes (last axis); "
                         "give one echo time (s) per echo")
    if not np.all(np.isfinite(tes)) or np.any(tes <= 0):
        raise InputError(f"echo_times must be positive finite seconds, got {tes.tolist()}")
    if np.any(np.diff(tes) <= 0):
        raise InputError(f"echo_times must be strictly increasing, got {tes.tolist()}; check the echo order")
    if tes.max() > 1.0:
        raise InputError(f"echo_times look like milliseconds ({tes.tolist()}); give seconds (divide by 1000)")
    return tes


@dataclass(frozen=True)
class Acquisition:
    """Multi-echo GRE acquisition parameters.

    Attributes
    ----------
    echo_times : tuple of float, s, strictly increasing; empty when only maps are
        processed (separation from QSM and R2* maps needs no echo times)
    field_strength : float, T, within 0.1-20
    affine : (4, 4) array, voxel index -> scanner RAS+ mm
    b0_direction : (3,) unit vector in voxel axes (from the affine unless overridden)
    voxel_size : (3,) mm (from the affine)
    phase_sign : +1 or -1; multiply the stored phase by this to get chisep's
        convention (positive chi -> positive frequency).
    """

    echo_times: tuple[float, ...]
    field_strength: float
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    b0_direction: np.ndarray | None = None
    voxel_size: np.ndarray | None = None
    phase_sign: int = 1

    def __post_init__(self):
        empty = self.echo_times is not None and np.size(self.echo_times) == 0
        tes = () if empty else tuple(float(t) for t in check_echo_times(self.echo_times))
        b0 = float(self.field_strength)
        lo, hi = FIELD_STRENGTH_RANGE_T
        if not (np.isfinite(b0) and lo <= b0 <= hi):
            raise InputError(
                f"field_strength must be between {lo} and {hi} T, got {self.field_strength!r}"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError("affine is singular: its 3x3 part has zero determinant")
        if self.phase_sign not in (1, -1):
            raise InputError(f"phase_sign must be +1 or -1, got {self.phase_sign!r}")
        voxel_size = (
            physics.voxel_size_from_affine(affine)
            if self.voxel_size is None
            else validate.check_voxel_size(self.voxel_size)
        )
        b0_dir = (
            physics.b0_direction_from_affine(affine)
            if self.b0_direction is None
            else validate.check_b0_direction(self.b0_direction)
        )
        object.__setattr__(self, "echo_times", tes)
        object.__setattr__(self, "field_strength", b0)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "voxel_size", voxel_size)
        object.__setattr__(self, "b0_direction", b0_dir)

    @property
    def n_echoes(self) -> int:
        return len(self.echo_times)

    @property
    def centre_frequency(self) -> float:
        """Larmor frequency in Hz."""
        return physics.centre_frequency_hz(self.field_strength)

    @property
    def echo_spacing(self) -> float | None:
        """Echo spacing (s) when echoes are equally spaced (within 1 %), else None."""
        if self.n_echoes < 2:
            return None
        d = np.diff(self.echo_times)
        return float(d.mean()) if np.ptp(d) <= 0.01 * d.mean() else None

    @property
    def b0_angle_deg(self) -> float:
        """Angle between B0 and the voxel z axis."""
        return float(np.degrees(np.arccos(np.clip(abs(self.b0_direction[2]), 0, 1))))

    def to_dict(self) -> dict:
        return {
            "echo_times_s": list(self.echo_times),
            "field_strength_t": self.field_strength,
            "b0_direction_voxel_axes": self.b0_direction.tolist(),
            "voxel_size_mm": self.voxel_size.tolist(),
            "phase_sign": self.phase_sign,
            "affine": self.affine.tolist(),
        }
