"""The baseline every separation model must beat: thresholded QSM.

chi_para = max(chi, 0), chi_dia = max(-chi, 0): each voxel is given wholly to
the source whose sign its net susceptibility has. It needs no R2' and no
model, so a separation method is only worth running where it scores better
than this (qsm-ci's chi-separation challenge reports it for that reason).
"""

from __future__ import annotations

import numpy as np

#: name under which the baseline appears in accuracy and ROI tables
THRESHOLDED_QSM = "thresholded-qsm"


def thresholded_qsm(chi) -> tuple[np.ndarray, np.ndarray]:
    """(chi_para, chi_dia) = (max(chi, 0), max(-chi, 0)), float32 ppm, both >= 0 (chi_dia a magnitude).

    Parameters
    ----------
    chi : array, ppm
        A QSM map.

    Returns
    -------
    chi_para, chi_dia : float32 arrays, ppm

    Examples
    --------
    >>> para, dia = thresholded_qsm([0.1, -0.05])
    >>> para.tolist(), dia.tolist()
    ([0.10000000149011612, 0.0], [0.0, 0.05000000074505806])
    """
    chi = np.asarray(chi, dtype=np.float32)
    return np.maximum(chi, 0.0), np.maximum(-chi, 0.0)


__all__ = ["THRESHOLDED_QSM", "thresholded_qsm"]
