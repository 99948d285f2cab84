"""Sphinx configuration for connect_native."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from connect_native import __version__

project = "connect_native"
author = "connect_native developers"
copyright = "2026, connect_native developers"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
