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
    "sphinx.ext.extlinks",
    "sphinx.ext.viewcode",
    # The changelog page shows the unreleased fragments as the next
    # release's notes (towncrier's draft), until a release writes them out.
    "sphinxcontrib.towncrier.ext",
]
towncrier_draft_autoversion_mode = "draft"
towncrier_draft_include_empty = False
towncrier_draft_working_directory = os.path.abspath("..")

# No intersphinx to Twisted, treq and Klein: it would fetch each project's
# objects.inv at build time, and the docs must build offline (CI and this
# project's machines reach only package registries), with -W.  Stored copies
# of the inventories would go stale silently.  Plain links instead, e.g.
# :twisted-api:`twisted.internet.endpoints` or :treq:`api.html`.
extlinks = {
    "twisted-api": ("https://docs.twisted.org/en/stable/api/%s.html", "%s"),
    "twisted": ("https://docs.twisted.org/en/stable/%s", None),
    "treq": ("https://treq.readthedocs.io/en/stable/%s", None),
    "klein": ("https://klein.readthedocs.io/en/latest/%s", None),
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
exclude_patterns = ["_build"]
# furo, as Twisted's own docs and much of its ecosystem use: a readable
# width for wide code blocks, and the version in the sidebar.
html_theme = "furo"
html_title = f"connect_native {release}"
