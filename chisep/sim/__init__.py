"""Built-in head phantoms and multi-echo GRE simulation.

``simulate_head`` is the realistic whole head (finer simulation grid, skull,
scalp and fat, static-dephasing R2', coil bias, a holdout head "B"): measure
on it. ``head_phantom`` + ``simulate_gre`` is the simple phantom simulated on
the reconstruction grid (fast, for unit tests of mechanics).

>>> from chisep.sim import simulate_head
>>> sim = simulate_head(2.0, head="A", scenario="all", snr=100, seed=0)  # doctest: +SKIP
"""

from chisep._lazy import lazy_attributes

#: public name -> submodule. Imported on first use, so that ``chisep --help`` and
#: ``from chisep.sim.phantom import SCENARIOS`` do not load JAX.
_SOURCES = {
    **dict.fromkeys(("DEFAULT_ECHO_TIMES", "GreSimulation", "GroundTruth", "oblique_affine",
                     "relaxometric_constants", "simulate_fields", "simulate_gre", "simulate_gre_partial_volume",
                     "with_affine"), "gre"),
    **dict.fromkeys(("DEFAULT_HEAD_ECHO_TIMES", "HEADS", "R2PRIME_MODELS", "HeadModel", "head_model",
                     "simulate_head"), "head"),
    **dict.fromkeys(("SCENARIOS", "Phantom", "Tissue", "head_phantom", "load_tissue_table", "resample_labels"),
                    "phantom"),
}


__getattr__, __dir__ = lazy_attributes("chisep.sim", _SOURCES, globals())

__all__ = [
    "DEFAULT_ECHO_TIMES",
    "DEFAULT_HEAD_ECHO_TIMES",
    "HEADS",
    "R2PRIME_MODELS",
    "HeadModel",
    "head_model",
    "simulate_head",
    "SCENARIOS",
    "GreSimulation",
    "GroundTruth",
    "Phantom",
    "Tissue",
    "head_phantom",
    "load_tissue_table",
    "oblique_affine",
    "relaxometric_constants",
    "resample_labels",
    "simulate_fields",
    "simulate_gre",
    "simulate_gre_partial_volume",
    "with_affine",
]
