"""Build the head phantom label map shipped as chisep/sim/data/head_labels_1mm.npz.

Developer-only script (not part of the package). It reads the MNI ICBM152 2009a
symmetric grey- and white-matter probability maps straight from a nilearn wheel
(the wheel is a zip archive; nilearn is not installed or imported) and builds a
uint8 label map on the template's 1 mm grid (197 x 233 x 189, MNI affine):

* brain tissue from the probabilities: white matter (label 1) where
  p_wm >= p_gm, grey matter (2) otherwise, where p_gm + p_wm >= 0.5;
* CSF (3): voxels inside the brain hull (closing + hole filling of the brain)
  that are neither, i.e. ventricles and sulcal/cisternal CSF;
* deep nuclei (4-10) as bilateral ellipsoids at their MNI coordinates, painted
  only over brain tissue so that the ventricles stay intact;
* veins (11): superior sagittal sinus (a band along the dorsal midline inside
  the hull), straight sinus, internal cerebral veins and a few medullary veins;
* outside the brain hull: a thin CSF/dura layer, a skull shell (12), a scalp /
  soft-tissue shell (13), a face-and-neck block below the cerebrum (13) and
  air-filled paranasal sinuses and mastoid cells (14) as ellipsoids.

* densely myelinated tracts (18): white matter of the corpus callosum and the
  internal capsule, selected by boxes around them.

Labels 15 (calcification), 16 (microbleed) and 17 (pallidal co-deposition) are
only set by scenarios in chisep.sim.phantom.

Usage::

    pip download --no-deps nilearn==0.14.1 -d /tmp/nl
    python scripts/build_phantom_labels.py /tmp/nl/nilearn-0.14.1-py3-none-any.whl

Only this script imports nibabel outside chisep/io/: it runs at development
time, never inside the package. The template's copyright notice is written
next to the label map (LICENSE_MNI.txt).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "chisep" / "sim" / "data"
TEMPLATE = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

LABELS = {
    "air": 0, "white_matter": 1, "grey_matter": 2, "csf": 3, "caudate": 4, "putamen": 5,
    "globus_pallidus": 6, "thalamus": 7, "substantia_nigra": 8, "red_nucleus": 9,
    "dentate": 10, "veins": 11, "bone": 12, "scalp": 13, "sinus_air": 14,
    "white_matter_tracts": 18,
}

# Densely myelinated tracts (higher chi_dia). Corpus callosum: midline white
# matter inside this ellipsoid (centre, radii, MNI mm). Internal capsule: white
# matter within INTERNAL_CAPSULE_MM of both the lentiform nucleus (putamen,
# pallidum) and the caudate or thalamus, i.e. the sheet between them.
CORPUS_CALLOSUM = ((0.0, -3.0, 18.0), (11.0, 42.0, 15.0))
INTERNAL_CAPSULE_MM = 7.0

# Deep nuclei: (centre x, y, z in MNI mm for the right side, radii mm). Painted in
# this order, mirrored in x; approximate positions read off the ICBM152 2009a T1
# template (Mai, Paxinos & Voss, Atlas of the Human Brain, 4th ed., for extents).
NUCLEI = [
    ("caudate", (13.0, 13.0, 9.0), (4.5, 9.0, 8.0)),          # head
    ("caudate", (17.0, -6.0, 19.0), (3.5, 10.0, 4.0)),        # body
    ("putamen", (25.5, 3.0, 1.0), (5.5, 15.0, 9.0)),
    ("globus_pallidus", (18.5, -3.0, -1.0), (4.0, 8.0, 5.0)),
    ("thalamus", (11.0, -18.0, 7.0), (7.0, 12.0, 7.5)),
    ("substantia_nigra", (10.0, -16.0, -11.0), (3.5, 6.5, 3.0)),
    ("red_nucleus", (5.0, -20.0, -8.0), (3.0, 3.5, 3.5)),
    ("dentate", (15.0, -57.0, -34.0), (6.0, 8.0, 5.5)),
]

# Veins as tubes: list of (start, end, radius) in MNI mm.
VEIN_TUBES = [
    ((0.0, -48.0, 6.0), (0.0, -92.0, 2.0), 2.5),      # straight sinus (Galen -> confluence)
    ((2.5, -2.0, 15.0), (1.0, -46.0, 7.0), 1.2),      # internal cerebral veins
    ((-2.5, -2.0, 15.0), (-1.0, -46.0, 7.0), 1.2),
    # medullary (deep white-matter) veins, running towards the ventricles
    ((30.0, 20.0, 30.0), (14.0, 8.0, 20.0), 0.8),
    ((-30.0, 20.0, 30.0), (-14.0, 8.0, 20.0), 0.8),
    ((34.0, -30.0, 32.0), (20.0, -20.0, 22.0), 0.8),
    ((-34.0, -30.0, 32.0), (-20.0, -20.0, 22.0), 0.8),
    ((28.0, -55.0, 28.0), (22.0, -40.0, 18.0), 0.8),
    ((-28.0, -55.0, 28.0), (-22.0, -40.0, 18.0), 0.8),
]

# Air spaces outside the brain (centre, radii), MNI mm.
SINUSES = [
    ((0.0, 73.0, 2.0), (12.0, 4.5, 10.0)),            # frontal sinus (in the frontal bone)
    ((0.0, 12.0, -42.0), (11.0, 12.0, 9.0)),          # sphenoid sinus
    ((0.0, 44.0, -36.0), (7.0, 14.0, 10.0)),          # ethmoid cells
    ((30.0, 35.0, -62.0), (11.0, 16.0, 12.0)),        # maxillary sinuses
    ((-30.0, 35.0, -62.0), (11.0, 16.0, 12.0)),
    ((52.0, -30.0, -42.0), (6.0, 8.0, 7.0)),          # mastoid air cells
    ((-52.0, -30.0, -42.0), (6.0, 8.0, 7.0)),
]

CSF_LAYER_MM = 1.5      # subarachnoid CSF / dura between the brain hull and the skull
SKULL_MM = 6.5          # skull thickness
SCALP_MM = 6.0          # scalp / soft tissue thickness
NECK_LEVEL_MM = -30.0   # below this the head outline is extruded downwards (face, skull base, neck)


def read_template(wheel: Path, kind: str):
    """Probability map in [0, 1] and affine from the nilearn wheel, without installing nilearn."""
    import nibabel as nib  # development-time only

    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(TEMPLATE.format(kind))
    image = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
    return np.asarray(image.dataobj, dtype=np.float32) / 255.0, np.asarray(image.affine)


def world_grid(shape, affine):
    """MNI coordinates (mm) of every voxel centre, as three broadcastable arrays."""
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    i, j, k = np.meshgrid(*axes, indexing="ij", sparse=True)
    return (affine[0, 0] * i + affine[0, 3], affine[1, 1] * j + affine[1, 3], affine[2, 2] * k + affine[2, 3])


def ellipsoid(grid, centre, radii):
    x, y, z = grid
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1.0


def tube(grid, start, end, radius):
    """Voxels within ``radius`` of the segment start-end."""
    x, y, z = grid
    a, b = np.asarray(start, np.float32), np.asarray(end, np.float32)
    d = b - a
    t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2 <= radius**2


def build(wheel: Path):
    gm, affine = read_template(wheel, "gm")
    wm, affine_wm = read_template(wheel, "wm")
    if not np.allclose(affine, affine_wm) or gm.shape != wm.shape:
        raise SystemExit("grey and white matter maps are not on the same grid")
    if not np.allclose(np.diag(affine)[:3], 1.0) or not np.allclose(affine[:3, :3], np.eye(3)):
        raise SystemExit(f"expected a 1 mm axis-aligned MNI affine, got\n{affine}")
    shape = gm.shape
    grid = world_grid(shape, affine)

    tissue = gm + wm >= 0.5
    tissue = ndimage.binary_opening(tissue, iterations=1)
    labeled, n = ndimage.label(tissue)
    sizes = ndimage.sum(tissue, labeled, range(1, n + 1))
    tissue = labeled == (1 + int(np.argmax(sizes)))
    ball = ndimage.generate_binary_structure(3, 1)
    hull = ndimage.binary_closing(tissue, structure=ball, iterations=4, border_value=0)
    hull = ndimage.binary_fill_holes(hull)
    # close each axial slice too, so that ventricles open to the cisterns stay inside
    hull = np.stack([ndimage.binary_fill_holes(hull[:, :, k]) for k in range(shape[2])], axis=2)

    labels = np.zeros(shape, np.uint8)
    labels[hull] = LABELS["csf"]
    labels[tissue & (wm >= gm)] = LABELS["white_matter"]
    labels[tissue & (wm < gm)] = LABELS["grey_matter"]

    parenchyma = (labels == LABELS["white_matter"]) | (labels == LABELS["grey_matter"])
    for name, (cx, cy, cz), radii in NUCLEI:
        for side in (1.0, -1.0):
            region = ellipsoid(grid, (side * cx, cy, cz), radii) & parenchyma
            labels[region] = LABELS[name]

    white = labels == LABELS["white_matter"]
    lentiform = np.isin(labels, [LABELS["putamen"], LABELS["globus_pallidus"]])
    medial = np.isin(labels, [LABELS["caudate"], LABELS["thalamus"]])
    near_lentiform = ndimage.distance_transform_edt(~lentiform) <= INTERNAL_CAPSULE_MM
    near_medial = ndimage.distance_transform_edt(~medial) <= INTERNAL_CAPSULE_MM
    labels[white & near_lentiform & near_medial] = LABELS["white_matter_tracts"]
    labels[white & ellipsoid(grid, *CORPUS_CALLOSUM)] = LABELS["white_matter_tracts"]

    # Superior sagittal sinus: a band along the dorsal midline just inside the hull.
    depth = ndimage.distance_transform_edt(hull)
    x, y, z = grid
    dorsal = (z > 5.0) | ((y < -70.0) & (z > -8.0))
    sss = hull & (depth <= 5.0) & (np.abs(x) <= 3.5) & dorsal & (y < 62.0)
    veins = sss.copy()
    for start, end, radius in VEIN_TUBES:
        veins |= tube(grid, start, end, radius) & hull
    labels[veins] = LABELS["veins"]

    # Outside the brain: distance from the hull in mm (1 mm voxels).
    outside = ndimage.distance_transform_edt(~hull)
    skull_inner = CSF_LAYER_MM
    skull_outer = CSF_LAYER_MM + SKULL_MM
    head = hull | (outside <= skull_outer + SCALP_MM)
    # Face, skull base and neck: extrude the head outline at NECK_LEVEL_MM downwards,
    # so that the head does not end in a thin shell under the temporal lobes.
    k0 = int(round(NECK_LEVEL_MM - affine[2, 3]))
    neck = ndimage.binary_erosion(head[:, :, k0], iterations=2)
    head[:, :, :k0] |= neck[:, :, None]
    labels[~hull & head] = LABELS["scalp"]
    bone = ~hull & (outside > skull_inner) & (outside <= skull_outer)
    # skull base: bone fills the extruded block up to the shell, below the brain
    below = np.zeros(shape, bool)
    below[:, :, :k0] = True
    bone |= below & head & ~hull & (outside > skull_inner) & (outside <= skull_outer + 8.0)
    labels[bone] = LABELS["bone"]
    labels[~hull & head & (outside <= skull_inner)] = LABELS["csf"]

    for centre, radii in SINUSES:
        region = ellipsoid(grid, centre, radii) & ~hull & (outside > skull_inner + 1.0) & head
        labels[region] = LABELS["sinus_air"]
    return labels, affine


LICENSE_TEXT = """\
The head phantom label map (head_labels_1mm.npz) is derived from the
MNI ICBM152 2009a nonlinear symmetric template (grey- and white-matter
probability maps), as redistributed with nilearn.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.

Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided
that the above copyright notice appear in all copies. The authors and
McGill University make no representations about the suitability of this
software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment
damage, property loss, or injury to subjects or patients resulting from the
use or misuse of this software package.

References
----------
VS Fonov, AC Evans, RC McKinstry, CR Almli, DL Collins. Unbiased nonlinear
average age-appropriate brain templates from birth to adulthood.
NeuroImage 2009;47(Suppl 1):S102.

VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins. Unbiased
average age-appropriate atlases for pediatric studies. NeuroImage
2011;54(1):313-327.

DL Collins, AP Zijdenbos, WFC Baare, AC Evans. ANIMAL+INSECT: Improved
cortical structure segmentation. IPMI 1999;1613:210-223.

Deep nuclei, veins, skull, scalp and sinuses were added as geometric shapes
by chisep's scripts/build_phantom_labels.py; they are not part of the template.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="path to nilearn-0.14.1-py3-none-any.whl")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    labels, affine = build(args.wheel)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    target = args.out_dir / "head_labels_1mm.npz"
    np.savez_compressed(target, labels=labels, affine=affine.astype(np.float64))
    (args.out_dir / "LICENSE_MNI.txt").write_text(LICENSE_TEXT)
    counts = np.bincount(labels.ravel(), minlength=max(LABELS.values()) + 1)
    for name, value in LABELS.items():
        print(f"{value:3d} {name:18s} {counts[value]:9d} voxels")
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
