"""report.html in a real headless browser (Debian's chromium; .ci/run installs it), and its content."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from chisep import cli, html_report, io, references, settings, workflows

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
                  "--v=0", "--virtual-time-budget=10000")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no headless browser: install Debian's chromium (apt-get install chromium); .ci/run does")


def render(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` in headless chromium: decoded/total images, console messages, screenshot pixels."""
    browser = _chromium()
    url = page.resolve().as_uri()
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    shot = tmp_path / "screenshot.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, "--window-size=1280,2400", f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=120)
    images = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    from matplotlib.image import imread

    return {"decoded": int(images.group(1)) if images else -1, "images": int(images.group(2)) if images else -1,
            "console": [line for line in dom.stderr.splitlines() if ":CONSOLE" in line],
            "pixels": imread(shot) if shot.exists() else None}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    workflows.simulate_dataset(root / "bids", resolution=5.0, phantom="simple", scenario="paradoxical-calcification",
                              seed=2)
    files = io.find_megre_runs(root / "bids")[0]
    out = root / "run"
    assert cli.main(["run", "--magnitude", *map(str, files.magnitude), "--phase", *map(str, files.phase),
                     "--out", str(out), "--models", "linear", "--quiet", "--background", "resharp"]) == 0
    return out


@pytest.mark.slow
def test_report_renders_in_a_browser_with_every_image_and_no_console_error(run_dir, tmp_path):
    page = run_dir / "report.html"
    assert page.exists() and "report.html" in (run_dir / "provenance.json").read_text()
    seen = render(page, tmp_path)
    assert seen["images"] >= 6, seen["images"]  # mask, fields, R2*/R2', chi, linear, quality
    assert seen["decoded"] == seen["images"], f"{seen['images'] - seen['decoded']} image(s) did not load"
    assert seen["console"] == [], seen["console"]
    pixels = seen["pixels"]
    assert pixels is not None, "no screenshot"
    grey = pixels[..., :3].mean(axis=-1)
    assert grey.std() > 0.05 and len(np.unique(np.round(grey, 2))) > 20, "the screenshot is blank"


def test_the_browser_check_catches_a_broken_page(tmp_path):
    # the same check on a page with a broken image and a script error must fail, or it proves nothing
    page = tmp_path / "broken.html"
    text = html_report._page("broken", "", [("a", "A", '<img src="data:image/png;base64,AAAA">'
                                                        "<script>undefinedFunction();</script>")])
    page.write_text(text)
    seen = render(page, tmp_path)
    assert seen["images"] == 1 and seen["decoded"] == 0
    assert any("undefinedFunction" in line for line in seen["console"])


def test_report_is_self_contained_and_says_what_a_reader_needs(run_dir):
    text = (run_dir / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text), "the report must not fetch anything"
    for heading in ("Summary", "Brain mask", "Maps", "Quality flags", "ROI statistics", "Timings",
                    "Settings and provenance", "References"):
        assert f">{heading}</h2>" in text, heading
    assert "mL" in text and "ms" in text and "ppm" in text  # mask volume, echo times, units
    assert "Dymerska" in text and "Schweser" in text  # ROMEO (default unwrap) and the linear model cited
    assert "thresholded-qsm" in text  # the baseline beside the model in the ROI table


def test_every_method_has_a_reference():
    stages = {"unwrap": [m for m in settings.UNWRAP_METHODS if m != "none"], "field_fit": settings.FIELD_FIT_METHODS,
              "background": settings.BACKGROUND_METHODS, "inversion": settings.INVERSION_METHODS,
              "separation": settings.MODEL_NAMES,
              "r2star": [m for m in settings.R2STAR_METHODS if m != "auto"],
              "denoise": [m for m in settings.DENOISE_METHODS if m != "off"]}
    for stage, methods in stages.items():
        for method in methods:
            assert method in references.REFERENCES[stage], f"{stage} {method} has no reference"
    used = references.references_for({"unwrap": "laplacian", "field_fit": "nonlinear", "r2star": "auto",
                                      "background": "pdf", "inversion": "tkd", "denoise": "off"}, ("decompose",))
    assert {"unwrap: laplacian", "background: pdf", "inversion: tkd", "separation: decompose",
            "r2star: arlo"} <= set(used)
    assert not any(k.startswith("denoise") for k in used)


def test_png_data_uri_refuses_non_png():
    with pytest.raises(ValueError, match="not a PNG"):
        html_report.png_data_uri(b"GIF89a")
