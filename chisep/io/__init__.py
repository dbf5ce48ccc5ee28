"""Files in and out: NIfTI and BIDS inputs, output maps, JSON sidecars, provenance.

This is the only package of chisep that touches files or nibabel (read.py: NIfTI and
sidecars; bids.py: BIDS; write.py: atomic outputs and provenance); every other
module works on arrays and an :class:`~chisep.acquisition.Acquisition`.

Inputs
    :func:`load_gre` reads multi-echo gradient-echo magnitude and phase from one
    4D NIfTI per part or one 3D NIfTI per echo, fills echo times and field
    strength from dcm2niix/BIDS JSON sidecars where no argument gives them, and
    rescales the phase to radians (:func:`rescale_phase`). :func:`find_megre_runs`
    and :func:`load_bids` do the same for BIDS ``*_MEGRE`` data.
Outputs
    :func:`save_map`, :func:`write_json`, :func:`write_provenance` and
    :func:`write_bids_megre` write atomically (a hidden temporary file in the
    target directory, then :func:`os.replace`), never replace an existing file
    unless ``overwrite=True``, and validate everything before writing anything.

Conventions: voxel order is kept as stored (no reorientation); the affine is
nibabel's (sform if set, else qform) and gives the voxel size and the B0
direction; echo times are in seconds; phase is in rad in [-pi, pi).
"""

from chisep.io.bids import bids_label, find_megre_runs, load_bids, write_bids_megre
from chisep.io.read import (
    AFFINE_TOLERANCE_MM,
    ECHO_TIME_TOLERANCE_S,
    GZIP_LEVEL,
    MAGNITUDE_NEGATIVE_SHARE,
    MAX_ECHO_TIME_S,
    NIFTI_SUFFIXES,
    PHASE_MIN_CIRCLE_SHARE,
    BidsRun,
    GreData,
    PathLike,
    file_sha256,
    image_shape,
    load_gre,
    load_label_names,
    load_map,
    read_csv_rows,
    read_json_or_none,
    rescale_phase,
    sidecar_path,
)
from chisep.io.write import prepare_output_dir, save_map, versions, write_bytes, write_json, write_provenance

__all__ = [
    "PathLike", "AFFINE_TOLERANCE_MM", "MAX_ECHO_TIME_S", "ECHO_TIME_TOLERANCE_S", "GZIP_LEVEL",
    "NIFTI_SUFFIXES", "MAGNITUDE_NEGATIVE_SHARE", "PHASE_MIN_CIRCLE_SHARE", "GreData", "BidsRun",
    "sidecar_path", "file_sha256", "rescale_phase", "load_gre", "load_label_names", "read_json_or_none",
    "read_csv_rows", "image_shape", "load_map", "bids_label", "find_megre_runs", "load_bids",
    "write_bids_megre", "write_json", "write_bytes", "save_map", "prepare_output_dir", "write_provenance",
    "versions",
]
