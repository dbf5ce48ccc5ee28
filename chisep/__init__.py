"""chisep: quantitative susceptibility mapping and susceptibility source separation.

Positive chi is paramagnetic. Units: chi in ppm, fields in Hz, echo times in s,
relaxation rates in 1/s, voxel sizes in mm, field strength in T.

The stages, each callable from its own inputs::

    data = chisep.load_gre("mag.nii.gz", "phase.nii.gz")                 # or load_bids
    qsm = chisep.reconstruct_qsm(data.magnitude, data.phase, data.acquisition)
    fits = chisep.separate(data.acquisition, qsm.separation_inputs(magnitude=qsm.magnitude))
    fits["chi-separation"].chi_para

Later entry points: :func:`qsm_from_field` (a total field made elsewhere),
``unwrap="none"`` (phase unwrapped elsewhere), a :class:`SeparationInputs` of maps from
other tools given to any model of :data:`MODELS`. Names are imported on first use, so
``import chisep`` is quick.
"""

from chisep._lazy import lazy_attributes

__version__ = "0.1.0"

_SOURCES = {
    # data in and out
    **dict.fromkeys(("load_gre", "load_bids", "load_map", "save_map", "write_bids_megre", "GreData"), "io"),
    "Acquisition": "acquisition",
    # the pipeline's stages and settings
    **dict.fromkeys(("reconstruct_qsm", "qsm_from_field", "separate", "QsmMaps", "quality_map"), "pipeline"),
    **dict.fromkeys(("run_files", "separate_files", "simulate_dataset", "demo"), "workflows"),
    **dict.fromkeys(("QsmSettings", "SeparationSettings", "PipelineSettings"), "settings"),
    # separation models
    **dict.fromkeys(("SeparationInputs", "SeparationFit", "SeparationModel", "MODELS", "ChiSeparation",
                     "LinearModel", "DecomposeModel", "thresholded_qsm"), "separation"),
    # simulation and scoring
    "simulate_head": "sim",
    "nrmse": "metrics",
    # errors
    **dict.fromkeys(("ChisepError", "InputError", "ModelFileError", "OutputExistsError"), "errors"),
    # subpackages and modules
    **dict.fromkeys(("qsm", "separation", "sim", "metrics", "physics", "relax", "denoise", "grid", "validate",
                     "registry", "report", "io", "pipeline", "outputs", "workflows"), ""),
}

__getattr__, __dir__ = lazy_attributes("chisep", _SOURCES, globals())

__all__ = ["__version__", *_SOURCES]
