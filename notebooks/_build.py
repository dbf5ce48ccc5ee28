"""Write the example notebooks (``notebooks/*.ipynb``) from the cell sources below.

The notebooks are generated so that their code stays reviewable as plain
Python in one place, and they are committed without outputs. Run once after
editing::

    python notebooks/_build.py

``tests/test_notebooks.py`` executes every notebook; each one ends with a cell
that asserts its own scientific claims and prints its key numbers as a
``NOTEBOOK_RESULTS {json}`` line, which the test reads back.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def _cells(spec):
    """(kind, source) pairs -> nbformat cells; sources are dedented and stripped."""
    import textwrap

    cells = []
    for kind, source in spec:
        text = textwrap.dedent(source).strip("\n")
        cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    return cells


def _notebook(spec, stem: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=_cells(spec))
    for i, cell in enumerate(nb.cells):
        cell.id = f"{stem}-{i:02d}"  # stable ids: rebuilding gives no spurious diff
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    return nb


# ---------------------------------------------------------------------------
# shared snippets
# ---------------------------------------------------------------------------
RESULTS_HELPER = '''
import json


def report_results(**values):
    """Print the notebook's key numbers as one JSON line (read back by tests/test_notebooks.py)."""
    clean = {k: round(float(v), 5) for k, v in values.items()}
    print("NOTEBOOK_RESULTS " + json.dumps(clean, sort_keys=True))
    return clean
'''

# ---------------------------------------------------------------------------
# 01 quickstart
# ---------------------------------------------------------------------------
QUICKSTART = [
    ("md", """
        # chisep quickstart: from simulated GRE data to chi-separation maps

        This notebook runs the whole chisep pipeline on chisep's realistic simulated head:

        1. **simulate** multi-echo gradient-echo (GRE) magnitude and phase with known ground truth,
        2. **reconstruct QSM**: brain mask, phase unwrapping and multi-echo field fit, R2\\*,
           background-field removal, dipole inversion,
        3. **separate** the susceptibility into paramagnetic and diamagnetic sources with two models
           (`chi-separation`, which uses the local field and R2', and the voxelwise `linear` model),
        4. **report**: an orthogonal-slice montage and a table of region means, scored against the truth.

        It uses 2 mm voxels so that it runs in about two minutes on a laptop CPU; the same calls
        work at 1 mm and on real data loaded with `chisep.io`.

        ### Units and conventions

        | quantity | unit | convention |
        |---|---|---|
        | susceptibility `chi`, `chi_para`, `chi_dia` | ppm | relative to water; **positive = paramagnetic** (iron), negative = diamagnetic (myelin, calcium) |
        | `chi_dia` | ppm | reported as a **non-negative magnitude**: `chi = chi_para - chi_dia` |
        | fields (total, local, noise) | Hz | phase model `phi(TE) = phi0 + 2 pi f TE` |
        | R2\\*, R2, R2' | 1/s | R2' = R2\\* - R2 |
        | echo times | s | |
        | voxel size | mm | arrays are (x, y, z) or (x, y, z, echo) in the input voxel order |
    """),
    ("code", """
        import time

        import numpy as np
        from IPython.display import Image, display

        from chisep import pipeline, report, workflows

        t_start = time.perf_counter()
    """),
    ("md", """
        ## 1. Simulate

        `workflows.simulate` builds the realistic head: brain labels from the MNI ICBM152 2009a atlas,
        skull, marrow, scalp fat, muscle, eyes and sinuses built around it, tissue properties at 3 T from the
        literature with their own smooth variation, a receive-coil bias, and R2' from sub-voxel sources
        (static dephasing). It is simulated on a grid twice as fine as the output (1 mm) and averaged to
        2 mm as complex signal, so the data carry partial volume and dephasing within each voxel, and the
        reconstruction's grid and dipole kernel are not the simulator's. Five echoes (5-29 ms), complex
        Gaussian noise (SNR 100 in white matter). `sim.truth` holds every true map, and `sim.r2_measured`
        a noisy spin-echo R2 map, as a user would measure it.
    """),
    ("code", """
        sim = workflows.simulate(phantom="head", resolution=2.0, scenario="healthy", snr=100.0, seed=0)
        acq, truth = sim.acquisition, sim.truth
        print("magnitude / phase:", sim.magnitude.shape, sim.magnitude.dtype, "(x, y, z, echo)")
        print("echo times (s):", acq.echo_times)
        print("field strength (T):", acq.field_strength, "  voxel size (mm):", acq.voxel_size)
    """),
    ("md", """
        ## 2. Reconstruct QSM

        Default methods: ROMEO unwrapping, nonlinear multi-echo field fit, ARLO R2\\*, V-SHARP background removal
        and MEDI inversion, referenced to the mean of the (eroded) brain mask. `settings=pipeline.QsmSettings(...)`
        chooses others.
    """),
    ("code", """
        qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, acq)
        print("steps (s):", qsm.timings)
        print("voxels in the final mask:", int(qsm.mask.sum()))
    """),
    ("md", """
        ## 3. Separate paramagnetic and diamagnetic sources

        `QsmMaps.separation_inputs()` gathers the QSM map, its mask, the local field, R2\\* and the field noise in
        one `SeparationInputs`, which every model fits the same way (`model.fit(inputs)`); `pipeline.separate`
        runs the models named in the settings. Without a measured R2, R2' is R2\\* minus
        R2 = min(13 1/s, 0.7 R2\\*); with one, pass it: `qsm.separation_inputs(r2=sim.r2_measured)`.
    """),
    ("code", """
        settings = pipeline.SeparationSettings(models=("chi-separation", "linear"))
        results = pipeline.separate(acq, qsm.separation_inputs(), settings=settings)
        chisep_maps = results["chi-separation"]
        for model, result in results.items():
            print(f"{model:15s} chi_para max {result.chi_para.max():.3f} ppm, "
                  f"chi_dia max {result.chi_dia.max():.3f} ppm")
    """),
    ("md", """
        ## 4. Montage

        Fixed display windows: chi in [-0.15, 0.15] ppm, both sources in [0, 0.15] ppm, R2\\* in [0, 50] 1/s.
        Deep grey matter (iron) lights up in `chi_para`; white matter (myelin) in `chi_dia`.

        Check maps near air-tissue interfaces (frontal sinus, temporal bone) before trusting them: the background
        field there reaches hundreds of Hz, and if the multi-echo field fit is off by one temporal phase wrap
        (1/dTE, about 167 Hz for the 6 ms echo spacing used here) in a patch, background removal cannot remove the
        step and a bright or dark blob appears in `chi`, and from there in the sources.
    """),
    ("code", """
        shown = {
            "magnitude": sim.magnitude[..., 0],
            "chi": qsm.chi,
            "chi_para": chisep_maps.chi_para,
            "chi_dia": chisep_maps.chi_dia,
            "r2star": qsm.r2star,
        }
        fig = report.montage_figure(shown, mask=qsm.mask, voxel_size=acq.voxel_size,
                                    title="chisep quickstart (2 mm simulated head, chi-separation)")
        display(Image(report.figure_png_bytes(fig, dpi=90)))
    """),
    ("md", """
        ## 5. Region table

        `report.roi_statistics` gives mean, median and standard deviation of every map in every labelled region
        (here the phantom's own labels; with real data, an atlas in the subject's space). Values in ppm.
    """),
    ("code", """
        maps = {"chi": qsm.chi, "chi_para": chisep_maps.chi_para, "chi_dia": chisep_maps.chi_dia}
        rows = report.roi_statistics(maps, truth.labels, truth.label_names, voxel_size=acq.voxel_size,
                                     mask=qsm.mask)
        shown_rows = [r for r in rows if r["name"] in report.DEFAULT_ROIS]
        print(report.format_table(shown_rows, columns=["name", "map", "mean", "median", "std", "n_voxels"],
                                  digits=3))
    """),
    ("md", """
        ## 6. Accuracy against the ground truth

        `report.accuracy_table` scores each model against the phantom: NRMSE (%, demeaned in the mask), the slope
        of estimated against true region means (1 is ideal) and the mean per region. The `truth` rows hold the
        true values. Small deep nuclei at 2 mm are a few dozen voxels, so their means are partial-volumed.

        Read the NRMSE with care at this resolution: most of the brain (cortex, white matter) differs from its
        mean by only a few hundredths of a ppm, comparable to the noise and the texture the reconstruction
        smooths away, so the voxelwise NRMSE is large (around 100 %) even where region means are right. The ROI
        slope and the region means are the robust summary here.
    """),
    ("code", """
        scored = qsm.mask & truth.brain_mask
        true_maps = {"chi": truth.chi, "chi_para": truth.chi_para, "chi_dia": truth.chi_dia}
        estimates = {"qsm": {"chi": qsm.chi}}
        for model, result in results.items():
            estimates[model] = {"chi": result.chi_total, "chi_para": result.chi_para, "chi_dia": result.chi_dia}
        accuracy = report.accuracy_table(true_maps, estimates, mask=scored, labels=truth.labels,
                                         label_names=truth.label_names)
        print(report.format_table(accuracy, digits=3))
    """),
    ("md", """
        ## 7. Checks

        The last cell checks what this notebook claims: QSM region means follow the truth (ROI slope near 1), the
        globus pallidus (iron) is dominated by `chi_para` and white matter (myelin) by `chi_dia`.
    """),
    ("code", RESULTS_HELPER),
    ("code", """
        names = {name: value for value, name in truth.label_names.items()}


        def region_mean(volume, name):
            region = (truth.labels == names[name]) & scored
            return float(np.mean(volume[region]))


        qsm_row = next(r for r in accuracy if r["model"] == "qsm" and r["map"] == "chi")
        nrmse_chi, slope_chi = qsm_row["nrmse"], qsm_row["roi_slope"]
        gp_para = region_mean(chisep_maps.chi_para, "globus_pallidus")
        gp_dia = region_mean(chisep_maps.chi_dia, "globus_pallidus")
        wm_para = region_mean(chisep_maps.chi_para, "white_matter")
        wm_dia = region_mean(chisep_maps.chi_dia, "white_matter")
        runtime = time.perf_counter() - t_start

        assert 0.7 < slope_chi < 1.3, f"QSM region means off the truth: slope {slope_chi:.2f}"
        gp_para_true = region_mean(truth.chi_para, "globus_pallidus")
        assert abs(gp_para - gp_para_true) < 0.04
        assert gp_para > 3 * gp_dia, "iron-rich globus pallidus should be dominated by chi_para"
        assert wm_dia > 1.5 * wm_para, "myelinated white matter should be dominated by chi_dia"
        assert region_mean(qsm.chi, "white_matter") < 0 < region_mean(qsm.chi, "globus_pallidus")
        report_results(nrmse_chi=nrmse_chi, roi_slope_chi=slope_chi, gp_chi_para=gp_para, gp_chi_dia=gp_dia,
                       gp_chi_para_true=gp_para_true,
                       wm_chi_para=wm_para, wm_chi_dia=wm_dia, runtime_s=runtime)
    """),
]

# ---------------------------------------------------------------------------
# 02 iron versus myelin
# ---------------------------------------------------------------------------
IRON_VS_MYELIN = [
    ("md", """
        # Iron versus myelin in white matter

        Healthy white matter has a slightly **negative** bulk susceptibility (about -0.03 ppm): the diamagnetism of
        myelin lipids outweighs the paramagnetism of the iron stored in oligodendrocytes. A QSM voxel only reports
        the net value `chi = chi_para - chi_dia`, so it cannot say whether a change comes from iron or from myelin:
        more iron and more myelin can cancel, and demyelination looks like iron accumulation.

        chisep's simulated head contains a clean example. Its **thalamus** and its **cortical grey matter** have
        almost the same net susceptibility (about +0.017 ppm), although the thalamus holds about a quarter more
        iron (chi_para about 0.047 vs 0.037 ppm) and about half as much myelin again (chi_dia about 0.029 vs
        0.020 ppm). In white matter, the **densely myelinated tracts** (corpus callosum, internal capsules; label
        `white_matter_tracts`) have about 40 % more `chi_dia` than the rest of the white matter and almost the
        same `chi_para`. (The values vary smoothly within each tissue; the table below gives the truth.)

        Source separation uses a second measurement, R2' = R2\\* - R2, which *both* sources increase
        (R2' ~ Dr_para chi_para + Dr_dia chi_dia), while the field sees their difference. Two equations, two
        unknowns: `chi_para` follows iron, `chi_dia` follows myelin.
    """),
    ("code", """
        import time

        import matplotlib.pyplot as plt
        import numpy as np

        from chisep import pipeline, report, workflows

        %matplotlib inline
        t_start = time.perf_counter()

        sim = workflows.simulate(phantom="head", resolution=2.0, scenario="healthy", snr=100.0, seed=0)
        acq, truth = sim.acquisition, sim.truth
        qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, acq)
        results = pipeline.separate(acq, qsm.separation_inputs(),
                                    settings=pipeline.SeparationSettings(models=("chi-separation", "linear")))
        print("QSM steps (s):", qsm.timings)
    """),
    ("md", """
        ## Regions

        The tract label is split into its three parts by their MNI x coordinate (the simulated head's grid is in
        MNI space with an axis-aligned affine): the corpus callosum near the midline and the left and right internal
        capsules. "Other white matter" is the rest of the white-matter label. Only voxels inside the
        reconstruction's mask count.
    """),
    ("code", """
        names = {name: value for value, name in truth.label_names.items()}
        inside = qsm.mask & truth.brain_mask
        x_mm = acq.affine[0, 0] * np.arange(truth.labels.shape[0]) + acq.affine[0, 3]
        x_mm = x_mm[:, None, None]
        tracts = truth.labels == names["white_matter_tracts"]

        regions = {
            "other white matter": (truth.labels == names["white_matter"]) & inside,
            "corpus callosum": tracts & (np.abs(x_mm) <= 9.0) & inside,
            "left internal capsule": tracts & (x_mm < -9.0) & inside,
            "right internal capsule": tracts & (x_mm > 9.0) & inside,
            "thalamus": (truth.labels == names["thalamus"]) & inside,
            "cortical grey matter": (truth.labels == names["grey_matter"]) & inside,
        }
        sources = {
            "truth": {"chi": truth.chi, "chi_para": truth.chi_para, "chi_dia": truth.chi_dia},
            "QSM": {"chi": qsm.chi},
        }
        for model, result in results.items():
            sources[model] = {"chi": result.chi_total, "chi_para": result.chi_para, "chi_dia": result.chi_dia}

        means = {}  # (source, map) -> {region: mean ppm}
        rows = []
        for source, maps in sources.items():
            for map_name, volume in maps.items():
                means[source, map_name] = {r: float(volume[m].mean()) for r, m in regions.items()}
                rows.append({"source": source, "map": map_name, **means[source, map_name]})
        print("voxels per region:", {r: int(m.sum()) for r, m in regions.items()})
        print(report.format_table(rows, digits=3))
    """),
    ("md", """
        ## Per-region bars: truth against estimate

        Each panel is one quantity; within a region the bars are the truth and the estimates. QSM gives only the
        net `chi` panel.
    """),
    ("code", """
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
        region_names = list(regions)
        colours = {"truth": "0.25", "QSM": "tab:gray", "chi-separation": "tab:blue", "linear": "tab:orange"}
        for ax, map_name in zip(axes, ("chi", "chi_para", "chi_dia")):
            shown = [s for s in sources if map_name in sources[s]]
            width = 0.8 / len(shown)
            for i, source in enumerate(shown):
                values = [means[source, map_name][r] for r in region_names]
                ax.bar(np.arange(len(region_names)) + (i - (len(shown) - 1) / 2) * width, values, width,
                       label=source, color=colours[source])
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(np.arange(len(region_names)), [r.replace(" ", "\\n") for r in region_names],
                          fontsize=8)
            ax.set_title(f"{map_name} (ppm)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        plt.show()
    """),
    ("md", """
        ## Interpretation

        * **QSM alone is ambiguous.** Thalamus and cortical grey matter have nearly the same true net `chi`,
          so QSM cannot tell them apart; the separation shows that the thalamus has both more iron
          (`chi_para`) and more myelin (`chi_dia`). In white matter the net value is negative everywhere, and
          its small iron content is invisible in it; the separation puts most of white matter's susceptibility
          in `chi_dia`.
        * **Tracts: `chi_dia` rises, but for a partly wrong reason.** The tracts' estimated `chi_dia` is higher
          than the other white matter's, by most of the true difference; but their `chi_para` rises too,
          although the true one barely changes. The tracts are only a few 2 mm voxels thick, and QSM (MEDI after
          V-SHARP) does not show their extra diamagnetism (compare the `chi` rows of the truth and of QSM): the
          field alone no longer says that the tracts are *more negative*, while their R2' says that they hold
          *more* source. With one equation of the two blurred, the separation splits the extra R2' between
          both sources. Read tract differences in `chi_dia` together with `chi_para` and `chi`.
        * **Limits.** The corpus callosum is thin and lies between the lateral ventricles and the deep veins,
          so its estimates mix with them; the internal capsules are the cleaner tract regions. Cortical grey
          matter lies at the edge of the mask, where background removal errs most, so both of its sources are
          underestimated: the thalamus-versus-cortex comparison holds in direction, not in size. Real white
          matter is also anisotropic (susceptibility and R2\\* depend on fibre orientation to B0), which these
          models ignore; compare regions at similar orientations, or treat tract differences in real data with
          caution.
    """),
    ("code", RESULTS_HELPER),
    ("code", """
        est = "chi-separation"
        tract_regions = ["corpus callosum", "left internal capsule", "right internal capsule"]
        wm = "other white matter"
        dia_tracts = {r: means[est, "chi_dia"][r] for r in tract_regions}
        dia_wm = means[est, "chi_dia"][wm]
        para_gain = np.mean([means[est, "chi_para"][r] for r in tract_regions]) - means[est, "chi_para"][wm]
        dia_gain = np.mean(list(dia_tracts.values())) - dia_wm

        for r in tract_regions:
            assert means["truth", "chi_dia"][r] > means["truth", "chi_dia"][wm]
        true_dia_gain = np.mean([means["truth", "chi_dia"][r] for r in tract_regions]) - means["truth", "chi_dia"][wm]
        true_para_gain = (np.mean([means["truth", "chi_para"][r] for r in tract_regions])
                          - means["truth", "chi_para"][wm])
        assert dia_gain > 0.5 * true_dia_gain, f"tract chi_dia gain {dia_gain:.3f} of a true {true_dia_gain:.3f}"
        # the limit stated above: chi_para rises in the tracts although the truth's does not
        assert para_gain > true_para_gain
        assert means["QSM", "chi"][wm] < 0, "white matter should be diamagnetic on QSM"
        assert means[est, "chi_dia"][wm] > 1.5 * means[est, "chi_para"][wm]
        # same net chi, different composition: thalamus has more of both sources than cortical grey matter
        thal, gm = "thalamus", "cortical grey matter"
        assert abs(means["truth", "chi"][thal] - means["truth", "chi"][gm]) < 0.003
        assert means[est, "chi_para"][thal] > means[est, "chi_para"][gm]
        assert means[est, "chi_dia"][thal] > means[est, "chi_dia"][gm]

        report_results(chi_dia_tracts=np.mean(list(dia_tracts.values())), chi_dia_other_wm=dia_wm,
                       chi_dia_gain=dia_gain, chi_dia_gain_true=true_dia_gain, chi_para_gain=para_gain,
                       chi_para_gain_true=true_para_gain, qsm_chi_wm=means["QSM", "chi"][wm],
                       thalamus_chi_para=means[est, "chi_para"][thal], grey_chi_para=means[est, "chi_para"][gm],
                       thalamus_chi_dia=means[est, "chi_dia"][thal], grey_chi_dia=means[est, "chi_dia"][gm],
                       runtime_s=time.perf_counter() - t_start)
    """),
]

# ---------------------------------------------------------------------------
# 03 paradoxical calcification
# ---------------------------------------------------------------------------
PARADOXICAL = [
    ("md", """
        # Paradoxical calcification of the globus pallidus

        Calcium is diamagnetic (dense calcification about -3 ppm), so a calcification is expected to be dark
        (negative) on QSM. Yet physiological calcifications of the **globus pallidus** often look **positive** on
        QSM: iron is deposited together with the calcium and outweighs it. Oshima et al. (Radiology 2020) call
        this "paradoxical" and showed that chi-separation resolves it into two elevated components.

        The simulated head's scenario `"all"` (values of the tissue table; the head varies them smoothly, and
        the 2 mm voxels average them with their surroundings: the table below gives the truth) has:

        * **medial globus pallidus** (label `pallidal_calcification`): iron and calcium together, chi_para
          about 0.29 ppm, chi_dia about 0.11 ppm, net about +0.18 ppm;
        * the **lateral (healthy) globus pallidus**: chi_para about 0.14, chi_dia about 0.01 ppm;
        * a **calcified lesion** in right parietal white matter: pure calcium, chi_dia 3 ppm, net -3 ppm;
        * seven **microbleeds** (haemosiderin): pure iron, chi_para 1 ppm, smaller than a 2 mm voxel or a
          few of them.

        Three deposits, three signatures: QSM sees a sign and a size; the separation says which sources produce it.
    """),
    ("code", """
        import time

        import matplotlib.pyplot as plt
        import numpy as np
        from scipy import ndimage

        from chisep import pipeline, report, workflows

        %matplotlib inline
        t_start = time.perf_counter()

        sim = workflows.simulate(phantom="head", resolution=2.0, scenario="all", snr=100.0, seed=0)
        acq, truth = sim.acquisition, sim.truth
        qsm = pipeline.reconstruct_qsm(sim.magnitude, sim.phase, acq)
        results = pipeline.separate(acq, qsm.separation_inputs(),
                                    settings=pipeline.SeparationSettings(models=("chi-separation", "linear")))
        print("QSM steps (s):", qsm.timings)
    """),
    ("md", """
        ## Region table

        Mean values in ppm over each region's voxels inside the reconstruction mask. At 2 mm a microbleed (radius
        1.5-2.5 mm) is a few voxels, and the 4 mm-radius calcification a few dozen, so their estimates are
        partial-volumed and smeared by the dipole inversion; the truth rows are averaged the same way.
    """),
    ("code", """
        names = {name: value for value, name in truth.label_names.items()}
        inside = qsm.mask & truth.brain_mask
        regions = {
            "healthy GP (lateral)": "globus_pallidus",
            "calcified GP (medial)": "pallidal_calcification",
            "calcified lesion": "calcification",
            "microbleeds": "microbleed",
        }
        masks = {r: (truth.labels == names[label]) & inside for r, label in regions.items()}
        sources = {"truth": {"chi": truth.chi, "chi_para": truth.chi_para, "chi_dia": truth.chi_dia},
                   "QSM": {"chi": qsm.chi}}
        for model, result in results.items():
            sources[model] = {"chi": result.chi_total, "chi_para": result.chi_para, "chi_dia": result.chi_dia}

        means = {}
        rows = []
        for region, m in masks.items():
            row = {"region": region, "voxels": int(m.sum())}
            for source, maps in sources.items():
                for map_name, volume in maps.items():
                    means[region, source, map_name] = float(volume[m].mean())
                    row[f"{source} {map_name}"] = means[region, source, map_name]
            rows.append(row)
        columns = ["region", "voxels", "truth chi", "QSM chi", "truth chi_para", "chi-separation chi_para",
                   "linear chi_para", "truth chi_dia", "chi-separation chi_dia", "linear chi_dia"]
        print(report.format_table(rows, columns=columns, digits=3))
    """),
    ("md", """
        ## Zoomed views

        Top row: an axial slice through the globus pallidus, cropped to the basal ganglia (red outline: the
        calcified medial part; cyan: the healthy lateral part). Bottom rows: the calcified lesion and the
        largest microbleed at their centres. Display windows per row are chosen for the deposit shown;
        chi_para and chi_dia share one window per row.
    """),
    ("code", """
        est = results["chi-separation"]
        panels = {"true chi": truth.chi, "QSM chi": qsm.chi, "chi_para": est.chi_para, "chi_dia": est.chi_dia}
        vox = acq.voxel_size


        def crop_around(region_mask, half_mm=24.0):
            \"\"\"Axial slice index and in-plane crop (slices) centred on a region.\"\"\"
            idx = np.argwhere(region_mask)
            centre = np.round(idx.mean(axis=0)).astype(int)
            z = int(np.argmax(region_mask.sum(axis=(0, 1))))
            half = np.ceil(half_mm / np.asarray(vox[:2])).astype(int)
            return z, tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(centre[:2], half))


        blobs, n_blobs = ndimage.label(truth.labels == names["microbleed"])
        largest = 1 + int(np.argmax(ndimage.sum(np.ones_like(blobs), blobs, range(1, n_blobs + 1))))
        gp_medial, gp_lateral = masks["calcified GP (medial)"], masks["healthy GP (lateral)"]
        # (row title, region the crop centres on, outlines (mask, colour), chi window, source window) in ppm
        views = [
            ("globus pallidus", gp_medial | gp_lateral, [(gp_medial, "tab:red"), (gp_lateral, "tab:cyan")],
             (-0.3, 0.3), (0, 0.3)),
            ("calcified lesion", masks["calcified lesion"], [(masks["calcified lesion"], "tab:red")],
             (-2.0, 2.0), (0, 2.0)),
            ("microbleed", blobs == largest, [(blobs == largest, "tab:red")], (-1.0, 1.0), (0, 1.0)),
        ]
        cmap = plt.get_cmap("gray").copy()
        cmap.set_bad("black")  # outside the reconstruction mask
        fig, axes = plt.subplots(len(views), len(panels), figsize=(11, 8.5))
        for row, (title, region, outlines, chi_window, source_window) in enumerate(views):
            z, (sx, sy) = crop_around(region)
            for col, (name, volume) in enumerate(panels.items()):
                window = chi_window if name.endswith(" chi") else source_window
                image = np.where(inside, volume, np.nan)[sx, sy, z].T
                ax = axes[row, col]
                shown = ax.imshow(image, origin="lower", cmap=cmap, vmin=window[0], vmax=window[1],
                                  aspect=vox[1] / vox[0])
                for outline, colour in outlines:
                    if outline[sx, sy, z].any():
                        ax.contour(outline[sx, sy, z].T, levels=[0.5], colors=colour, linewidths=0.8)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(name)
                if col == 0:
                    ax.set_ylabel(f"{title}\\nz = {z}")
                fig.colorbar(shown, ax=ax, shrink=0.8, label="ppm")
        fig.suptitle("outlines: true extent of the deposit (GP row: red = calcified medial, cyan = healthy lateral)")
        fig.tight_layout()
        plt.show()
    """),
    ("md", """
        ## What the separation tells, and what it cannot

        * **Calcified medial GP**: positive on QSM, like the healthy GP and even more so, so QSM alone would read it
          as "more iron". chi-separation shows **both** components raised above the healthy GP: more iron *and*
          a diamagnetic deposit, the pattern Oshima et al. (Radiology 2020) reported for pallidal calcification.
        * **Pure calcification**: strongly negative on QSM, almost all of it in `chi_dia`. A dense calcification
          has almost no signal by the first echo, so its own field and R2\\* cannot be measured: chisep's
          reliability step finds such voxels (enclosed by brain, field off the harmonic bridge of their
          neighbours), gives their field no weight and their R2' no say, so the inversion and the separation
          fill them from the field around them. Its size is still somewhat underestimated.
        * **Microbleed**: strongly positive on QSM, mostly in `chi_para` (about three quarters). chi-separation
          also gives it some `chi_dia`, which the truth does not have: a bleed's R2' is larger than its
          `chi_para` times the model's one relaxometric constant (strong sources dephase beyond the linear
          regime), and the model can only explain the excess R2' by adding both sources.

        **Caveat.** The separation measures *paramagnetic* and *diamagnetic* susceptibility, not chemistry.
        Calcium and myelin are both diamagnetic, and the models use one relaxometric constant for every
        diamagnetic source, so a raised `chi_dia` in the GP could be calcium or myelinated fibres (the pallidum
        is crossed by them). Calling it calcification needs other evidence: CT, the location and shape, or
        prior knowledge. Likewise `chi_para` does not distinguish ferritin from haemosiderin or deoxyhaemoglobin.
        Simulated deposits are idealised; real ones are heterogeneous and often smaller than these voxels.
    """),
    ("code", RESULTS_HELPER),
    ("code", """
        model = "chi-separation"
        gp_healthy, gp_calc = "healthy GP (lateral)", "calcified GP (medial)"
        para_h, para_c = means[gp_healthy, model, "chi_para"], means[gp_calc, model, "chi_para"]
        dia_h, dia_c = means[gp_healthy, model, "chi_dia"], means[gp_calc, model, "chi_dia"]
        chi_calc_gp = means[gp_calc, "QSM", "chi"]
        lesion_chi = means["calcified lesion", "QSM", "chi"]
        lesion_para = means["calcified lesion", model, "chi_para"]
        lesion_dia = means["calcified lesion", model, "chi_dia"]
        bleed_chi = means["microbleeds", "QSM", "chi"]
        bleed_para = means["microbleeds", model, "chi_para"]
        bleed_dia = means["microbleeds", model, "chi_dia"]
        lesion_true = means["calcified lesion", "truth", "chi"]
        bleed_true = means["microbleeds", "truth", "chi"]

        # the paradox: a calcified region that is paramagnetic on QSM
        assert chi_calc_gp > 0, f"calcified GP should be positive on QSM, got {chi_calc_gp:.3f} ppm"
        # both sources raised against the healthy GP
        assert para_c > para_h, f"chi_para: calcified GP {para_c:.3f} vs healthy GP {para_h:.3f}"
        assert dia_c > dia_h + 0.05, f"chi_dia: calcified GP {dia_c:.3f} vs healthy GP {dia_h:.3f}"
        # pure calcium: negative chi (at least half its true mean), diamagnetic source only
        assert lesion_chi < 0.5 * lesion_true < 0 and lesion_dia > 10 * lesion_para
        # microbleed: positive chi (at least half its true mean), mostly paramagnetic
        assert bleed_chi > 0.5 * bleed_true > 0 and bleed_para > 2 * bleed_dia

        report_results(chi_calcified_gp=chi_calc_gp, chi_healthy_gp=means[gp_healthy, "QSM", "chi"],
                       chi_para_gp_calcified=para_c, chi_para_gp_healthy=para_h,
                       chi_dia_gp_calcified=dia_c, chi_dia_gp_healthy=dia_h,
                       lesion_chi=lesion_chi, lesion_chi_para=lesion_para, lesion_chi_dia=lesion_dia,
                       lesion_chi_true=lesion_true, microbleed_chi_true=bleed_true, microbleed_chi=bleed_chi, microbleed_chi_para=bleed_para, microbleed_chi_dia=bleed_dia,
                       runtime_s=time.perf_counter() - t_start)
    """),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_iron_vs_myelin.ipynb": IRON_VS_MYELIN,
    "03_paradoxical_calcification.ipynb": PARADOXICAL,
}


def main() -> None:
    for name, spec in NOTEBOOKS.items():
        nb = _notebook(spec, name.split('_')[0])
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name} ({len(nb.cells)} cells)")


if __name__ == "__main__":
    main()
