"""Sphinx configuration of the adjopt documentation.

Build the pages and run their examples (both with warnings as errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest
"""

import inspect
import os
import sys
from pathlib import Path

from sphinx.ext.autodoc.preserve_defaults import update_defvalue
from sphinx.ext.napoleon import NumpyDocstring
from sphinx.util.inspect import stringify_signature

ROOT = Path(__file__).resolve().parents[1]
# this checkout's sources and its gallery (``problems``) come first, also without an editable install
for path in (ROOT, ROOT / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
# the examples run unattended: no plot windows
os.environ.setdefault("MPLBACKEND", "Agg")

import adjopt  # noqa: E402

project = "adjopt"
author = "the adjopt developers"
copyright = "the adjopt developers"
release = adjopt.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
]

exclude_patterns = ["_build"]
root_doc = "index"
language = "en"

# -- autodoc: the public API as the packages' __all__ lists it ------------------------------------------------------
# ("members" is given in each directive: a default of True would override the lists some pages give)
autodoc_default_options = {
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autoclass_content = "both"

# -- napoleon: numpy-style docstrings -------------------------------------------------------------------------------
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

# -- doctest: every ``testcode`` block and every ``>>>`` example (also in docstrings) runs ---------------------------
doctest_global_setup = """
import numpy as np
np.set_printoptions(precision=4, suppress=True)
"""
trim_doctest_flags = True

# -- HTML ---------------------------------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"adjopt {release}"
html_theme_options = {
    "description": "Gradients and Hessian actions of PDE-constrained objectives from one factorization",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_static_path = []


# -- docstrings that are not reStructuredText -------------------------------------------------------------------------
# The gallery modules (``problems``) write their docstrings as plain text with formulas (|B u - d|^2, indented
# equations): they are shown as they are written, in a literal block, after napoleon has seen them.


def _verbatim_gallery(app, what, name, obj, options, lines):
    if not name.startswith("problems.") or what not in ("module", "function"):
        return
    doc = inspect.getdoc(obj)
    if doc:
        lines[:] = ["::", ""] + ["    " + line for line in doc.splitlines()] + [""]


# napoleon reads the first line of an attribute's or property's docstring as "type: description"; the docstrings
# here are sentences, often with a colon ("A(p) (fixed: build a new functional ...)"), so napoleon gets them empty
# and they are parsed afterwards as any other docstring.
_ATTRIBUTES = {"attribute", "data", "property"}
_held = {}


def _hold_attribute_docstring(app, what, name, obj, options, lines):
    if what in _ATTRIBUTES:
        _held[name], lines[:] = list(lines), []


def _parse_attribute_docstring(app, what, name, obj, options, lines):
    if what in _ATTRIBUTES and name in _held:
        lines[:] = NumpyDocstring(_held.pop(name), app.config).lines()


def _init_signature(app, what, name, obj, options, signature, return_annotation):
    """A class whose ``__new__`` only dispatches (``ReducedFunctional(R, ...)`` returns the nonlinear functional)
    is called with the arguments of its ``__init__``: show those, not ``__new__``'s ``*args, **kwargs``."""
    if what not in ("class", "exception") or not signature or "*args" not in signature:
        return None
    init = getattr(obj, "__init__", None)
    if not inspect.isfunction(init):
        return None
    update_defvalue(app, init, True)  # the defaults as written (autodoc_preserve_defaults)
    sig = inspect.signature(init)
    sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return stringify_signature(sig, show_annotation=False, show_return_annotation=False), return_annotation


def setup(app):
    app.connect("autodoc-process-docstring", _hold_attribute_docstring, priority=450)
    app.connect("autodoc-process-docstring", _parse_attribute_docstring, priority=550)
    app.connect("autodoc-process-docstring", _verbatim_gallery, priority=600)  # after napoleon
    app.connect("autodoc-process-signature", _init_signature)
