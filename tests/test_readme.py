"""The README's promises: two set-up commands that CI runs verbatim, a picture, examples, exit codes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def readme_setup_commands() -> list[str]:
    """Lines of the shell code blocks (```bash) of the README's set-up section."""
    setup = _section(README.read_text(), "Set-up on a fresh machine")
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```", setup, flags=re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def ci_commands() -> list[str]:
    """Lines of .ci/run that run something other than the script's own bookkeeping."""
    bookkeeping = re.compile(r"^(#|cd |rc=\$\?|echo |set |trap |exit\b)")
    return [line for line in CI.read_text().splitlines() if line.strip() and not bookkeeping.match(line)]


def test_readme_has_exactly_two_one_line_setup_commands():
    cmds = readme_setup_commands()
    assert len(cmds) == 2, cmds
    install = 'python -m venv .venv && . .venv/bin/activate && pip install -q "torch==2.13.0" -e ".[test]"'
    assert cmds[0].startswith(install) and cmds[0].endswith("&& nucli demo")
    assert cmds[1] == install + " && python -m pytest"


def test_ci_runs_exactly_the_readme_commands():
    assert ci_commands() == readme_setup_commands()
    text = CI.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    # every command line's status is checked (bash's -e ignores failures inside && lists)
    lines = text.splitlines()
    for cmd in readme_setup_commands():
        i = lines.index(cmd)
        assert lines[i + 1].startswith("rc=$?") and "exit" in lines[i + 1]


def test_ci_script_is_executable_and_valid_bash():
    import os
    import shutil
    import subprocess

    assert os.access(CI, os.X_OK)
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(CI)]).returncode == 0


def test_readme_picture_is_small_and_an_overlay():
    import numpy as np
    from PIL import Image

    m = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", README.read_text())
    assert m, "README shows no picture"
    pic = ROOT / m.group(1)
    assert pic.is_file() and pic.stat().st_size < 300_000
    rgb = np.asarray(Image.open(pic).convert("RGB"))
    from nucli.export.overlay import CONTOUR_RGB

    assert np.all(rgb == CONTOUR_RGB, axis=2).any(), "no nucleus outlines in the README picture"


def test_readme_links_resolve():
    text = README.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        if not (ROOT / target).exists() and target not in _OWNED_ELSEWHERE:
            missing.append(target)
    assert not missing, f"README links to missing files: {missing}"


# written by the scale-out work; linked ahead of time
_OWNED_ELSEWHERE = {"docs/scaling.md"}


def test_readme_shows_every_subcommand():
    from typer.main import get_command

    from nucli.cli import app

    names = sorted(get_command(app).commands)
    text = README.read_text()
    for name in names:
        assert re.search(rf"`nucli {name}\b[^`]*`", text), f"README has no example of `nucli {name}`"


def test_readme_exit_codes_match_the_code():
    from nucli import errors

    table = dict(re.findall(r"^\| (\d+) \| ([^|]+)\|", _section(README.read_text(), "Exit codes"), flags=re.M))
    for cls in (errors.UsageError, errors.InputError, errors.ProcessingError, errors.NotAvailableError):
        assert str(cls.exit_code) in table, cls.__name__
    assert "usage" in table["1"] and "input" in table["2"]
    assert {"0", "130"} <= set(table)


@pytest.mark.parametrize("section", ["Daily use", "The run store", "Methods and model cards", "Accuracy", "Speed",
                                     "Exit codes", "Reliability", "Citing"])
def test_readme_sections(section):
    assert _section(README.read_text(), section).strip()


def test_readme_cites_the_five_seed_papers():
    citing = _section(README.read_text(), "Citing")
    for title in ("GeNSeg-Net", "HARU-Net", "Mutual-Complementing Framework",
                  "Unsupervised Nuclei Segmentation using Spatial Organization Priors",
                  "Style Consistent Image Generation for Nuclei Instance"):
        assert title in citing
