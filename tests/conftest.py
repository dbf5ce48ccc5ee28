"""Test configuration shared by the suite."""

import os

from hypothesis import settings

# CI must not fail at random: property tests replay the same examples every run.
# Set HYPOTHESIS_PROFILE=explore locally to search new random examples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
