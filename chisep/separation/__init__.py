"""Susceptibility source separation: chi_para and chi_dia from QSM, R2*/R2' and the multi-echo signal.

Every model follows one interface (:mod:`chisep.separation.base`): built from
the :class:`~chisep.acquisition.Acquisition` and its settings,
``fit(SeparationInputs) -> SeparationFit`` with the maps, their uncertainty and
``predict()``; models are registered by name in :data:`MODELS`.
"""

from chisep.separation.base import MODELS, SeparationFit, SeparationInputs, SeparationModel, r2_from_rule
from chisep.separation.baseline import THRESHOLDED_QSM, thresholded_qsm

# imported in the order of settings.MODEL_NAMES: the registry lists the models as the CLI does
from chisep.separation.chi_separation import ChiSeparation  # isort: skip
from chisep.separation.linear import LinearModel  # isort: skip
from chisep.separation.decompose import DecomposeModel  # isort: skip

__all__ = ["MODELS", "SeparationInputs", "SeparationFit", "SeparationModel", "r2_from_rule", "ChiSeparation",
           "LinearModel", "DecomposeModel", "thresholded_qsm", "THRESHOLDED_QSM"]
