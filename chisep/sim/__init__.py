"""Built-in head phantom and multi-echo GRE simulation.

>>> from chisep.sim import head_phantom, simulate_gre
>>> sim = simulate_gre(head_phantom(2.0, scenario="all"), snr=100, seed=0)
"""

from chisep.sim.gre import (
    DEFAULT_ECHO_TIMES,
    GreSimulation,
    GroundTruth,
    oblique_affine,
    relaxometric_constants,
    simulate_fields,
    simulate_gre,
    simulate_gre_partial_volume,
    with_affine,
)
from chisep.sim.phantom import (
    SCENARIOS,
    Phantom,
    Tissue,
    head_phantom,
    load_tissue_table,
    resample_labels,
)

__all__ = [
    "DEFAULT_ECHO_TIMES",
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
