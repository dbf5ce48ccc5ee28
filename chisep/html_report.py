"""Self-contained HTML reports: one per run (``report.html``) and a cohort index for ``chisep batch``.

Pure text assembly: figures come in as PNG bytes and are inlined as data URIs,
so a report is one file that opens from disk with no network, and no script
or style is fetched from anywhere. Writing the text is the caller's job
(through :mod:`chisep.io`). Sections follow fMRIPrep/MRIQC reports: summary,
brain-mask check, maps, quality, ROI table, timings, provenance, references.
"""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Mapping, Sequence

__all__ = ["png_data_uri", "run_report", "cohort_index"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d1d1f;
       background: #fafafa; }
header { background: #1d2b3a; color: white; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; font-size: 13px; opacity: 0.85; }
nav { background: #e8edf2; padding: 6px 24px; font-size: 13px; position: sticky; top: 0; }
nav a { margin-right: 14px; color: #1d2b3a; }
main { padding: 8px 24px 40px; max-width: 1400px; }
section { margin-top: 22px; }
h2 { font-size: 17px; border-bottom: 1px solid #ccd; padding-bottom: 3px; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
th, td { border: 1px solid #d0d4da; padding: 3px 7px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef1f4; }
img.figure { max-width: 100%; border: 1px solid #ddd; background: black; }
img.thumb { width: 260px; border: 1px solid #ddd; background: black; }
.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 4px 0;
           font-size: 13px; }
.ok { color: #137333; }
.flag { background: #fde2e1; }
pre { background: #f1f3f5; padding: 8px; font-size: 11px; overflow-x: auto; max-height: 420px; }
figcaption { font-size: 12px; color: #444; margin: 2px 0 10px; }
"""

#: written into the page's body: the number of images that decoded, for headless-browser tests
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = document.images, decoded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { decoded++; }
  }
  document.body.setAttribute("data-images", decoded + "/" + images.length);
});
"""


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes (refuses anything that is not a PNG)."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("png_data_uri: the bytes are not a PNG image")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def _table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, *, flagged=None) -> str:
    """HTML table of rows (dicts); numbers right-aligned; ``flagged`` (row, column) cells highlighted."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    flagged = flagged or set()
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for c in columns:
            value = row.get(c, "")
            css = ["num"] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
            if (i, c) in flagged:
                css.append("flag")
            cls = f' class="{" ".join(css)}"' if css else ""
            cells.append(f"<td{cls}>{_number(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _key_values(pairs: Mapping) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs.items()) + "</table>"


def _figure(png: bytes, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img class="figure" alt="{_e(alt)}" src="{png_data_uri(png)}">{cap}</figure>'


def _page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{_e(anchor)}">{_e(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{_e(anchor)}"><h2>{_e(heading)}</h2>{content}</section>'
                   for anchor, heading, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n"
            f"<body><header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header><nav>{nav}</nav>"
            f"<main>{body}</main><script>{_IMAGE_CHECK}</script></body></html>\n")


def run_report(*, title: str, subtitle: str, summary: Mapping[str, str], warnings: Sequence[str],
               mask_png: bytes, mask_caption: str, map_figures: Sequence[tuple[str, bytes, str]],
               quality_png: bytes | None, quality_flags: Sequence[Mapping], roi_rows: Sequence[Mapping],
               timings: Mapping[str, float], settings: Mapping, references: Mapping[str, str]) -> str:
    """The HTML text of one run's report.

    Parameters
    ----------
    title, subtitle : str
        Page heading (e.g. "chisep report: sub-01") and its second line (version, date).
    summary : mapping label -> text
        Inputs, acquisition (echo times, field strength, B0 angle, voxel size), versions.
    warnings : list of str
        Shown at the top, one box each ("no warnings" when empty).
    mask_png, mask_caption
        The brain-mask check figure and its caption (volumes in mL).
    map_figures : list of (heading, PNG bytes, caption)
    quality_png : PNG bytes or None
    quality_flags : list of {"bit", "meaning", "colour" (RGB 0-1), "voxels"}: the legend
    roi_rows : rows of :func:`chisep.report.roi_statistics`
    timings : stage -> seconds
    settings : every setting of the run (shown as JSON)
    references : "stage: method" -> citation of every method used
    """
    notes = ("".join(f'<div class="warning">{_e(w)}</div>' for w in warnings) if warnings
             else '<p class="ok">Nothing to note.</p>')
    sections = [
        ("summary", "Summary", _key_values(summary) + "<h3>Notes and warnings from the run</h3>" + notes),
        ("mask", "Brain mask", _figure(mask_png, "brain mask outline over the magnitude", mask_caption)),
        ("maps", "Maps", "".join(f"<h3>{_e(heading)}</h3>" + _figure(png, heading, caption)
                                 for heading, png, caption in map_figures)),
    ]
    if quality_png is not None:
        legend = "<table><tr><th>colour</th><th>flag</th><th>voxels</th><th>meaning</th></tr>" + "".join(
            f'<tr><td><span style="display:inline-block;width:14px;height:14px;background:'
            f'rgb({",".join(str(round(255 * c)) for c in f["colour"][:3])})"></span></td><td class="num">'
            f'{f["bit"]}</td><td class="num">{f["voxels"]}</td><td>{_e(f["meaning"])}</td></tr>'
            for f in quality_flags) + "</table>"
        sections.append(("quality", "Quality flags", _figure(quality_png, "quality flags over the magnitude")
                         + legend))
    sections += [
        ("rois", "ROI statistics", _table(roi_rows) + "<p>Units: chi, chi_para, chi_dia in ppm; r2star, r2prime "
                                                     "in 1/s; thresholded-qsm is the baseline every separation "
                                                     "model has to beat (chi_para = max(chi, 0), "
                                                     "chi_dia = max(-chi, 0)).</p>"),
        ("timings", "Timings", _table([{"stage": k, "seconds": float(v)} for k, v in timings.items()])),
        ("provenance", "Settings and provenance",
         "<p>Every setting of this run (provenance.json beside this report has them too, with input checksums)."
         "</p><pre>" + _e(json.dumps(settings, indent=2, default=str)) + "</pre>"),
        ("references", "References", "<ul>" + "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>"
                                                     for k, v in references.items()) + "</ul>"),
    ]
    return _page(title, subtitle, sections)


def cohort_index(*, title: str, subtitle: str, runs: Sequence[Mapping], outliers: Sequence[Mapping],
                 failed: Sequence[str], cohort_png: bytes | None) -> str:
    """The HTML text of a cohort's index page.

    ``runs``: one mapping per complete run with ``prefix``, ``report`` (relative link
    to its report.html), ``thumbnail`` (PNG bytes or None) and ``values`` (map name ->
    mean over the brain). ``outliers``: rows (prefix, region, map, mean, cohort
    median, robust z) to flag. ``failed``: prefixes of runs that failed.
    """
    cards = []
    for run in runs:
        thumb = (f'<img class="thumb" alt="{_e(run["prefix"])} thumbnail" src="{png_data_uri(run["thumbnail"])}">'
                 if run.get("thumbnail") else "")
        values = ", ".join(f"{_e(k)} {_number(v)}" for k, v in run.get("values", {}).items())
        cards.append(f'<tr><td><a href="{_e(run["report"])}">{_e(run["prefix"])}</a></td><td>{thumb}</td>'
                     f"<td>{values}</td></tr>")
    table = ("<table><thead><tr><th>run</th><th>chi (axial)</th><th>brain means</th></tr></thead><tbody>"
             + "".join(cards) + "</tbody></table>")
    flagged = {(i, "robust_z") for i in range(len(outliers))}
    sections = [("runs", f"Runs ({len(runs)} complete)", table)]
    sections.append(("outliers", "Values that stand out from the cohort",
                     "<p>Region means more than 3.5 robust standard deviations (1.4826 MAD) from the cohort "
                     "median of the same region and map.</p>" + _table(outliers, flagged=flagged)))
    if failed:
        sections.append(("failed", "Failed runs", "".join(f'<div class="warning">{_e(p)}</div>' for p in failed)))
    if cohort_png is not None:
        sections.append(("cohort", "Cohort figure", _figure(cohort_png, "cohort ROI means")))
    return _page(title, subtitle, sections)
