"""Sphinx configuration of chisep's API reference (built with warnings as errors by tests/test_docs.py)."""

project = "chisep"
author = "chisep developers"
copyright = "2026, chisep developers"

extensions = ["sphinx.ext.autodoc", "numpydoc"]
# the installed package is documented; nothing is downloaded (no intersphinx)
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc sections carry types and units
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
suppress_warnings = []
