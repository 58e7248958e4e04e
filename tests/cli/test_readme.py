"""The README's quick start and CI must not drift apart: CI runs exactly the README's lines."""

from __future__ import annotations

import re

from tests.helpers.paths import REPO_ROOT as ROOT


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README has no bash quick-start block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_install_explain_and_test_lines():
    install, explain, test = _quick_start_commands()
    assert install.startswith("pip install")
    assert explain.startswith("vit-explain explain")
    assert "pytest" in test


def test_ci_runs_the_readme_install_and_test_lines_verbatim():
    install, _, test = _quick_start_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert install in ci_lines
    assert test in ci_lines
