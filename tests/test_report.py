"""Tests for chisep.report: ROI statistics against direct NumPy, tables, and rendered figures."""

import csv
import io
import math

import numpy as np
import pytest

from chisep import metrics, report
from chisep.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOXEL = (0.6, 0.8, 2.0)  # anisotropic on purpose


@pytest.fixture
def volume():
    """Random labels 0..5 and three maps on a small anisotropic grid, with a box mask."""
    rng = np.random.default_rng(1)
    shape = (12, 10, 7)
    labels = rng.integers(0, 6, shape)
    mask = np.zeros(shape, bool)
    mask[2:11, 1:9, 1:6] = True
    maps = {
        "r2star": rng.uniform(5, 45, shape).astype(np.float32),
        "chi": rng.normal(0.0, 0.05, shape),
        "magnitude": 1000.0 + rng.normal(0, 1, shape),  # large offset: tests a stable std
    }
    return maps, labels, mask, rng


def _direct(values, region):
    v = np.asarray(values, dtype=np.float64)[region]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan, 0
    return float(v.mean()), float(np.median(v)), float(v.std()), int(v.size)


def _assert_row_matches(row, maps, labels, mask):
    region = (labels == row["label"]) & mask
    mean, median, std, n = _direct(maps[row["map"]], region)
    assert row["n_voxels"] == n
    np.testing.assert_allclose([row["mean"], row["median"], row["std"]], [mean, median, std], rtol=1e-10, atol=1e-12)
    assert row["volume_ml"] == pytest.approx(region.sum() * np.prod(VOXEL) / 1000.0)


# ---------------------------------------------------------------------------
# ROI statistics
# ---------------------------------------------------------------------------
def test_roi_statistics_match_direct_numpy(volume):
    maps, labels, mask, _ = volume
    names = {1: "globus_pallidus", 3: "putamen"}
    rows = report.roi_statistics(maps, labels, names, voxel_size=VOXEL, mask=mask)

    # Known maps in display order, regions 1..5 (background 0 unnamed, so skipped).
    assert [r["map"] for r in rows[::5]] == ["magnitude", "chi", "r2star"]
    assert [r["label"] for r in rows[:5]] == [1, 2, 3, 4, 5]
    assert [r["name"] for r in rows[:5]] == ["globus_pallidus", "label_2", "putamen", "label_4", "label_5"]
    assert all(list(r) == list(report.ROI_COLUMNS) for r in rows)
    for row in rows:
        _assert_row_matches(row, maps, labels, mask)
    # Even-sized regions exercise the two-element median.
    assert any(r["n_voxels"] % 2 == 0 for r in rows) and any(r["n_voxels"] % 2 == 1 for r in rows)


def test_roi_statistics_without_mask_and_with_named_background(volume):
    maps, labels, _, _ = volume
    full = np.ones(labels.shape, bool)
    rows = report.roi_statistics({"chi": maps["chi"]}, labels, {0: "air"}, voxel_size=VOXEL)
    assert [(r["label"], r["name"]) for r in rows][:2] == [(0, "air"), (1, "label_1")]
    for row in rows:
        _assert_row_matches(row, maps, labels, full)
    # Float label images (as read from NIfTI) give the same table.
    assert report.roi_statistics({"chi": maps["chi"]}, labels.astype(np.float32), {0: "air"}, voxel_size=VOXEL) == rows


def test_roi_statistics_regions_outside_mask_are_left_out(volume):
    maps, labels, mask, _ = volume
    labels = labels.copy()
    labels[~mask & (labels == 2)] = 7  # label 7 exists only outside the mask
    rows = report.roi_statistics({"chi": maps["chi"]}, labels, mask=mask, voxel_size=VOXEL)
    assert 7 not in {r["label"] for r in rows}


def test_roi_statistics_ignore_nan_and_inf(volume):
    maps, labels, mask, rng = volume
    chi = maps["chi"].copy()
    chi[rng.random(chi.shape) < 0.2] = np.nan
    chi[0, 0, 0] = np.inf
    chi[labels == 4] = np.nan  # a region with no finite voxel
    nan_maps = {"chi": chi}
    rows = report.roi_statistics(nan_maps, labels, voxel_size=VOXEL, mask=mask)
    for row in rows:
        _assert_row_matches(row, nan_maps, labels, mask)
    empty = next(r for r in rows if r["label"] == 4)
    assert empty["n_voxels"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["median"])
    assert empty["volume_ml"] > 0  # the region exists even where the map is undefined
    some = next(r for r in rows if r["label"] == 1)
    assert some["n_voxels"] < ((labels == 1) & mask).sum()
    assert math.isfinite(some["mean"])


def test_roi_table_csv_round_trip(volume):
    maps, labels, mask, _ = volume
    chi = maps["chi"].copy()
    chi[labels == 5] = np.nan
    rows = report.roi_statistics({"chi": chi, "r2star": maps["r2star"]}, labels, {1: "gp, left"}, mask=mask)
    text = report.roi_table_csv(rows)
    read = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ",".join(report.ROI_COLUMNS)
    assert len(read) == len(rows)
    for got, want in zip(read, rows):
        assert int(got["label"]) == want["label"] and got["name"] == want["name"] and got["map"] == want["map"]
        assert int(got["n_voxels"]) == want["n_voxels"]
        for key in ("mean", "median", "std", "volume_ml"):
            value = float(got[key])
            assert (math.isnan(value) and math.isnan(want[key])) or value == want[key]
    with pytest.raises(InputError, match="volume_ml"):
        report.roi_table_csv([{k: v for k, v in rows[0].items() if k != "volume_ml"}])


def test_regions_from_mask(volume):
    maps, _, mask, _ = volume
    labels, names = report.regions_from_mask(mask)
    assert names == {1: "brain"} and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, mask.astype(np.uint8))
    rows = report.roi_statistics({"chi": maps["chi"]}, labels, names, voxel_size=VOXEL)
    assert len(rows) == 1 and rows[0]["name"] == "brain"
    assert rows[0]["mean"] == pytest.approx(maps["chi"][mask].mean())


def test_roi_statistics_invalid_inputs(volume):
    maps, labels, mask, _ = volume
    with pytest.raises(InputError, match="'chi'.*shape"):
        report.roi_statistics({"chi": maps["chi"][:-1]}, labels)
    with pytest.raises(InputError, match=r"'magnitude'.*4D|magnitude\[\.\.\., 0\]"):
        report.roi_statistics({"magnitude": np.zeros(labels.shape + (3,))}, labels)
    with pytest.raises(InputError, match="mask"):
        report.roi_statistics(maps, labels, mask=mask[:, :, :-1])
    with pytest.raises(InputError, match="empty"):
        report.roi_statistics(maps, labels, mask=np.zeros_like(mask))
    with pytest.raises(InputError, match="whole numbers"):
        report.roi_statistics(maps, labels + 0.5)
    with pytest.raises(InputError, match="non-negative"):
        report.roi_statistics(maps, labels - 1)
    with pytest.raises(InputError, match="voxel_size"):
        report.roi_statistics(maps, labels, voxel_size=(1, 0, 1))
    with pytest.raises(InputError, match="label_names"):
        report.roi_statistics(maps, labels, {"gp": 1})
    with pytest.raises(InputError, match="empty"):
        report.roi_statistics({}, labels)


# ---------------------------------------------------------------------------
# accuracy table
# ---------------------------------------------------------------------------
@pytest.fixture
def truth_and_estimates(volume):
    _, labels, mask, rng = volume
    names = {0: "air", 1: "white_matter", 2: "globus_pallidus", 3: "putamen", 4: "caudate", 5: "csf"}
    para = np.array([0, 0.006, 0.144, 0.047, 0.053, 0.028])[labels] + 0.005 * rng.random(labels.shape)
    dia = np.array([0, 0.036, 0.013, 0.009, 0.009, 0.009])[labels] + 0.005 * rng.random(labels.shape)
    truth = {"chi": para - dia, "chi_para": para, "chi_dia": dia}
    estimates = {
        "linear": {k: v + 0.01 * rng.standard_normal(v.shape) for k, v in truth.items()},
        "chi-separation": {"chi_para": 0.8 * para, "chi_dia": 0.9 * dia},  # no chi
    }
    return truth, estimates, labels, names, mask


def test_accuracy_table_equals_direct_metrics(truth_and_estimates):
    truth, estimates, labels, names, mask = truth_and_estimates
    rows = report.accuracy_table(truth, estimates, mask=mask, labels=labels, label_names=names)
    assert [(r["model"], r["map"]) for r in rows] == [
        ("truth", "chi"), ("linear", "chi"),
        ("truth", "chi_para"), ("linear", "chi_para"), ("chi-separation", "chi_para"),
        ("truth", "chi_dia"), ("linear", "chi_dia"), ("chi-separation", "chi_dia"),
    ]
    # Default ROIs: those of DEFAULT_ROIS that the label names know, in that order.
    rois = ["globus_pallidus", "putamen", "caudate", "white_matter"]
    assert [k for k in rows[0] if k not in ("model", "map", "nrmse", "roi_slope")] == rois
    by_name = {v: k for k, v in names.items()}
    masked_labels = np.where(mask, labels, -1)
    for row in rows:
        tru = truth[row["map"]]
        est = tru if row["model"] == "truth" else estimates[row["model"]][row["map"]]
        assert row["nrmse"] == pytest.approx(metrics.nrmse(est, tru, mask), abs=1e-12)
        want = metrics.roi_means(est, masked_labels, {r: by_name[r] for r in rois})
        for roi in rois:
            assert row[roi] == pytest.approx(want[roi], rel=1e-12)
            assert row[roi] == pytest.approx(est[(labels == by_name[roi]) & mask].mean(), rel=1e-12)
        true_means = [metrics.roi_means(tru, masked_labels, {r: by_name[r]})[r] for r in rois]
        slope, _ = metrics.linear_fit_slope([row[r] for r in rois], true_means)
        assert row["roi_slope"] == pytest.approx(slope, rel=1e-9)
    # A pure scaling shows up exactly in the slope.
    scaled = next(r for r in rows if r["model"] == "chi-separation" and r["map"] == "chi_para")
    assert scaled["roi_slope"] == pytest.approx(0.8)


def test_accuracy_table_options_and_errors(truth_and_estimates):
    truth, estimates, labels, names, mask = truth_and_estimates
    rows = report.accuracy_table(truth, estimates, mask=mask, labels=labels, label_names=names, rois=["csf"])
    assert "csf" in rows[0] and "globus_pallidus" not in rows[0]
    assert all(math.isnan(r["roi_slope"]) for r in rows if r["model"] != "truth")  # one ROI: no line
    plain = report.accuracy_table(truth, estimates, mask=mask)
    assert set(plain[0]) == {"model", "map", "nrmse", "roi_slope"}

    with pytest.raises(InputError, match="thalamus"):
        report.accuracy_table(truth, estimates, mask=mask, labels=labels, label_names=names, rois=["thalamus"])
    with pytest.raises(InputError, match="label_names"):
        report.accuracy_table(truth, estimates, mask=mask, labels=labels)
    bad = {"linear": {"chi": truth["chi"][:, :, :-1]}}
    with pytest.raises(InputError, match=r"estimates\['linear'\].*'chi'|'chi'.*shape"):
        report.accuracy_table(truth, bad, mask=mask)
    nan = {"linear": {"chi": np.where(mask, np.nan, truth["chi"])}}
    with pytest.raises(InputError, match=r"estimates\['linear'\]\['chi'\].*NaN"):
        report.accuracy_table(truth, nan, mask=mask)
    with pytest.raises(InputError, match="mask is required"):
        report.accuracy_table(truth, estimates, mask=None)


def test_format_table_is_aligned_markdown(truth_and_estimates):
    truth, estimates, labels, names, mask = truth_and_estimates
    rows = report.accuracy_table(truth, estimates, mask=mask, labels=labels, label_names=names, rois=["csf"])
    text = report.format_table(rows)
    lines = text.splitlines()
    assert len(lines) == len(rows) + 2
    assert len({len(line) for line in lines}) == 1  # every column padded to one width
    assert lines[0].split("|")[1].strip() == "model" and set(lines[1]) <= set("|-:")
    assert "n/a" in text  # NaN slopes
    assert f"{rows[1]['nrmse']:.4g}" in lines[3]
    assert report.format_table([{"a": 1, "b": "x"}, {"a": 2.5}]).splitlines()[3].startswith("| 2.5 |")


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
def _assert_png(data: bytes, min_bytes: int = 5000):
    assert isinstance(data, bytes) and data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 200 and height > 200


def test_display_windows():
    assert report.display_window("chi", np.zeros(3)) == report.WINDOWS["chi"] == (-0.15, 0.15)
    assert report.WINDOWS["chi_para"][0] == 0 and report.WINDOWS["chi_dia"][0] == 0
    magnitude = np.arange(1001.0)
    low, high = report.display_window("magnitude", magnitude)
    assert low == 0 and high == pytest.approx(995.0)  # the 99.5th percentile
    low, high = report.display_window("field_total", np.array([-40.0, 3.0, 20.0, np.nan]))
    assert low == -high and high > 20
    assert report.display_window("other", np.full(4, 2.0)) == (1.5, 2.5)  # constant map still shows


def test_montage_figure_png_with_anisotropic_voxels(volume):
    maps, _, mask, _ = volume
    maps = dict(maps, chi_para=np.abs(maps["chi"]), chi_dia=np.abs(maps["chi"]) / 2, custom=maps["chi"] * 3)
    fig = report.montage_figure(maps, mask=mask, voxel_size=VOXEL, title="montage")
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 3 * 6  # magnitude, chi, chi_para, chi_dia, r2star, custom
    shape = mask.shape
    axial, coronal, sagittal = (ax.images[0] for ax in image_axes[3:6])  # the chi row
    # Physical extents (mm) give the true aspect of anisotropic voxels.
    assert axial.get_extent() == pytest.approx([0, shape[0] * 0.6, 0, shape[1] * 0.8])
    assert coronal.get_extent() == pytest.approx([0, shape[0] * 0.6, 0, shape[2] * 2.0])
    assert sagittal.get_extent() == pytest.approx([0, shape[1] * 0.8, 0, shape[2] * 2.0])
    # Default cut: the mask's centre of mass; axial shows slice z transposed, NaN outside the mask.
    z = 3  # mask spans z = 1..5
    shown = np.ma.filled(axial.get_array(), np.nan)
    np.testing.assert_allclose(shown, np.where(mask, maps["chi"], np.nan)[:, :, z].T.astype(np.float32))
    assert axial.get_clim() == report.WINDOWS["chi"]
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert labels == ["magnitude (a.u.)", "chi (ppm)", "chi_para (ppm)", "chi_dia (ppm)", "r2star (1/s)", "custom"]
    _assert_png(report.figure_png_bytes(fig, dpi=60))


def test_montage_figure_highlight_row_shows_excluded_voxels(volume):
    maps, _, mask, _ = volume
    excluded = np.zeros(mask.shape, bool)
    excluded[2, 3, 1:3] = True  # most of them in x = 2, y = 3, z = 1
    fig = report.montage_figure({"magnitude": maps["magnitude"], "chi": maps["chi"]}, mask=mask,
                                voxel_size=VOXEL, highlight=excluded, highlight_label="excluded")
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 3 * 3  # magnitude, chi, the highlight row
    axial = image_axes[6]
    assert axial.get_title() == "axial z=1" and len(axial.images) == 2  # grey image + red overlay
    overlay = axial.images[1].get_array()
    assert overlay[3, 2, 0] == 1.0 and overlay[3, 2, 3] > 0.5 and overlay[..., 3].sum() == pytest.approx(0.9)
    assert "excluded" in [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"][-1]
    # nothing excluded: no row
    fig = report.montage_figure({"chi": maps["chi"]}, mask=mask, highlight=np.zeros(mask.shape, bool))
    assert len([ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]) == 3


def test_montage_figure_slices_and_errors(volume):
    maps, _, mask, _ = volume
    fig = report.montage_figure({"chi": maps["chi"]}, slices=(1, 2, 4))
    axial = fig.axes[0].images[0]
    np.testing.assert_allclose(np.ma.filled(axial.get_array(), np.nan), maps["chi"][:, :, 4].T.astype(np.float32))
    with pytest.raises(InputError, match="slices"):
        report.montage_figure({"chi": maps["chi"]}, slices=(0, 0, 99))
    with pytest.raises(InputError, match="'r2star'"):
        report.montage_figure({"chi": maps["chi"], "r2star": maps["r2star"][1:]})
    with pytest.raises(InputError, match="Figure"):
        report.figure_png_bytes(b"not a figure")


def test_comparison_figure_two_models(truth_and_estimates):
    truth, estimates, labels, names, mask = truth_and_estimates
    labels = labels.copy()
    labels[labels == 2] = 1
    labels[4:8, 3:6, 4] = 2  # globus pallidus only in slice z = 4
    fig = report.comparison_figure(truth, estimates, mask=mask, voxel_size=VOXEL, labels=labels, label_names=names)
    assert "z=4" in fig._suptitle.get_text()
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    # 3 truth panels + linear: 3 estimates + 3 errors + chi-separation: 2 + 2 (it has no chi).
    assert len(image_axes) == 3 + 6 + 4
    # The linear chi error panel shows estimate - truth on slice 4.
    error = np.ma.filled(image_axes[6].images[0].get_array(), np.nan)
    want = np.where(mask, estimates["linear"]["chi"] - truth["chi"], np.nan)[:, :, 4].T
    np.testing.assert_allclose(error, want, rtol=1e-5, atol=1e-6)
    assert image_axes[6].images[0].get_clim() == pytest.approx((-0.15, 0.15))
    _assert_png(report.figure_png_bytes(fig, dpi=60))

    fig = report.comparison_figure(truth, estimates, mask=mask, slice_index=2, maps=("chi_para",))
    assert "z=2" in fig._suptitle.get_text()
    with pytest.raises(InputError, match="slice_index"):
        report.comparison_figure(truth, estimates, mask=mask, slice_index=50)
    with pytest.raises(InputError, match="none of the maps"):
        report.comparison_figure(truth, estimates, mask=mask, maps=("r2star",))
    with pytest.raises(InputError, match="'chi_dia'"):
        report.comparison_figure(truth, {"m": {"chi_dia": truth["chi_dia"][..., :-1]}}, mask=mask)
