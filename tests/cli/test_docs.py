"""The docs keep up with the code: every option a command's `--help` lists appears on the
command's page in docs/, and every relative link in README.md and docs/ leads to a file."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).parent.parent.parent
DOCS = ROOT / "docs"
PAGES = {  # command: (its click command, its page)
    "gpt-convert": ("gpt2np_convert.cli:convert_command", "convert.md"),
    "gpt-run": ("gpt2np.cli.run:gpt_run", "run.md"),
    "gpt-serve": ("gpt2np.serve.cli:serve", "serve.md"),
    "gpt-batch": ("gpt2np.ray.cli:batch", "batch.md"),
    "gpt-explain": ("gpt2np.explain.cli:explain", "explain.md"),
}


@pytest.mark.parametrize("command", PAGES)
def test_every_help_option_is_on_the_commands_page(command):
    """The options `--help` lists are the command's click parameters: each long name (or the
    short one, if it has no long one) must be on its page."""
    where, page = PAGES[command]
    module, name = where.split(":")
    cmd: click.Command = getattr(importlib.import_module(module), name)
    options = {next((o for o in p.opts + p.secondary_opts if o.startswith("--")), p.opts[0])
               for p in cmd.params if isinstance(p, click.Option) and not p.hidden} - {"--help"}
    assert len(options) >= 3, cmd.params
    text = (DOCS / page).read_text(encoding="utf-8")
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![a-z0-9-])", text))
    assert not missing, f"docs/{page} does not mention {missing}"


def test_relative_links_lead_to_files():
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_the_api_page_shows_the_options_table():
    from gpt2np import Options

    text = (DOCS / "api.md").read_text(encoding="utf-8")
    shown = text.split("<!-- options table -->\n", 1)[1].split("\n<!-- end options table -->", 1)[0]
    assert shown == Options.table()
