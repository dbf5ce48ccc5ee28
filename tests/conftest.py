"""Test configuration shared by the suite."""

import os

from hypothesis import settings

# CI must not fail at random: property tests replay the same examples every run.
# Set HYPOTHESIS_PROFILE=explore locally to search new random examples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The command line keeps JAX's compiled programs in ~/.cache/chisep/jax; the suite's in-process CLI
# runs use a folder of their own instead (a test that checks the cache passes --compile-cache).
if "CHISEP_COMPILE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CHISEP_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="chisep-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["CHISEP_COMPILE_CACHE"], ignore_errors=True)
