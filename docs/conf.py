"""Sphinx configuration of keyjobs' documentation (``make docs``).

The reference pages under ``reference/generated/`` are written from the code
at every build by ``_ext/keyjobs_reference.py``; nothing there is edited by
hand (the directory is ignored by git).
"""

import os
import sys
from pathlib import Path

import django

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

# The demo site's settings: keyjobs and the demo's commands installed, no database opened.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")
django.setup()

from keyjobs import __version__  # noqa: E402

project = "keyjobs"
author = "the keyjobs developers"
copyright = "the keyjobs developers"
release = version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
    "keyjobs_reference",
]
myst_enable_extensions = ["colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
# Signatures read as the code writes them; the types go into the description, not the signature line.
autodoc_typehints = "description"
autodoc_member_order = "bysource"
source_suffix = {".md": "markdown"}
root_doc = "index"
# The generated pages are parts of pages (included), not pages.
exclude_patterns = ["_build", "screenshots", "reference/generated"]
suppress_warnings: list[str] = []

html_theme = "furo"
html_title = f"keyjobs {release}"
html_static_path = ["_static"]
html_css_files = ["keyjobs.css"]
# Offline: nothing is loaded from another site when a page is read.
html_theme_options = {"source_repository": "", "top_of_page_buttons": []}
