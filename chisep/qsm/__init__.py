"""QSM reconstruction stages: brain mask, unwrapping and multi-echo field fit, reliability, background
removal, dipole inversion. Each is a pure function on arrays; :func:`chisep.reconstruct_qsm` chains them.
(The unwrapping dispatcher is :func:`chisep.qsm.unwrap.unwrap`: the name ``unwrap`` here is its module.)"""

from chisep._lazy import lazy_attributes

_SOURCES = {
    **dict.fromkeys(("brain_mask", "brain_region", "erode_mask", "refine_mask_by_phase_quality"), "mask"),
    **dict.fromkeys(("unwrap_romeo", "unwrap_laplacian", "UNWRAP_METHODS"), "unwrap"),
    **dict.fromkeys(("fit_multi_echo_field", "FieldFit", "FIELD_METHODS"), "echoes"),
    **dict.fromkeys(("field_reliability", "Reliability"), "reliability"),
    **dict.fromkeys(("remove_background", "BACKGROUND_METHODS"), "background"),
    **dict.fromkeys(("invert", "reference", "INVERSION_METHODS"), "inversion"),
    **dict.fromkeys(("mask", "unwrap", "echoes", "reliability", "background", "inversion"), ""),
}

__getattr__, __dir__ = lazy_attributes("chisep.qsm", _SOURCES, globals())

__all__ = list(_SOURCES)
