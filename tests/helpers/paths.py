"""Paths the tests find files by, computed once here so a test module's folder depth does not matter.

Tests used ``Path(__file__).parents[n]``, which breaks silently (a skipped test, a wrong ``cwd``)
whenever a test file moves to another folder.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout's root: README.md, pyproject.toml, benchmarks/, vit_explain/.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: ``../shared`` next to the checkout: the real DINOv2 checkpoint and photos, when present
#: (``$VIT_EXPLAIN_SHARED`` names it for a checkout elsewhere, e.g. a git worktree).
SHARED = Path(os.environ.get("VIT_EXPLAIN_SHARED") or REPO_ROOT.parent / "shared")
