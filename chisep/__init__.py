"""chisep: quantitative susceptibility mapping and susceptibility source separation.

Positive chi is paramagnetic. Units: chi in ppm, fields in Hz, echo times in s,
relaxation rates in 1/s, voxel sizes in mm, field strength in T.
"""

__version__ = "0.1.0"
