"""The documentation (README.md and docs/) against the code: every code block is run by a test
or says why not, and the API reference lists every public name.

A code block is run when the line before it is ``<!-- snippet: NAME -->`` and NAME is run by a
test (``run("NAME", ...)`` or ``snippet("NAME")`` in python_tests, or a key of a test's table
of snippets); otherwise that line is ``<!-- not-run: REASON -->`` with a reason. The site
itself is built by ``mkdocs build --strict`` (CI, ``make docs``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def public_modules() -> list[str]:
    """Every module of the package that declares ``__all__`` (found in the sources, so a new
    public module is checked without being listed here); modules whose path has a part starting
    with ``_`` other than ``__init__`` are private."""
    found = []
    for path in sorted((ROOT / "mergopt_kernels").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        if re.search(r"^__all__\s*=", path.read_text(), re.M):
            found.append(".".join(parts))
    return found


def code_blocks():
    """(file, line number, the line before the block) for every fenced code block."""
    for path in DOC_FILES:
        lines = path.read_text().split("\n")
        inside = False
        for number, line in enumerate(lines):
            if line.startswith("```"):
                if not inside:
                    yield path.relative_to(ROOT), number + 1, lines[number - 1] if number else ""
                inside = not inside


def names_run_by_tests() -> set[str]:
    """Snippet names that appear as string literals in the test sources (other than this file)."""
    found = set()
    for path in (ROOT / "python_tests").glob("*.py"):
        if path.name != Path(__file__).name:
            found.update(re.findall(r"""["']([a-z0-9][a-z0-9-]*)["']""", path.read_text()))
    return found


def test_every_code_block_is_run_by_a_test_or_says_why_not():
    run_by_tests = names_run_by_tests()
    names, problems = [], []
    for path, line, marker in code_blocks():
        snippet = re.fullmatch(r"<!-- snippet: ([a-z0-9-]+) -->", marker)
        not_run = re.fullmatch(r"<!-- not-run: (.{8,}) -->", marker)
        if snippet:
            names.append(snippet.group(1))
            if snippet.group(1) not in run_by_tests:
                problems.append(f"{path}:{line}: snippet {snippet.group(1)!r} is run by no test")
        elif not not_run:
            problems.append(f"{path}:{line}: no <!-- snippet: NAME --> or <!-- not-run: reason --> before the block")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"snippet names used twice: {duplicates}"
    assert not problems, "\n".join(problems)


def test_the_reference_page_lists_every_public_name():
    page = (ROOT / "docs" / "reference.md").read_text()
    listed = set(re.findall(r"^::: ([\w.]+)", page, re.M))
    # A re-export (mergopt_kernels.optim.MergOpt is mergopt_kernels.MergOpt) is covered by the
    # entry of the object it names.
    listed_objects = []
    for path in listed:
        module_name, _, name = path.rpartition(".")
        listed_objects.append(getattr(importlib.import_module(module_name), name, None))
    modules = public_modules()
    assert "mergopt_kernels" in modules and "mergopt_kernels.merging" in modules, modules
    missing = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            reexport = callable(value) and any(value is obj for obj in listed_objects)
            if f"{module_name}.{name}" not in listed and not reexport:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without a reference entry in docs/reference.md: {missing}"


def test_the_reference_entries_exist():
    page = (ROOT / "docs" / "reference.md").read_text()
    for path in re.findall(r"^::: ([\w.]+)", page, re.M):
        module_name, _, name = path.rpartition(".")
        module = importlib.import_module(module_name)
        assert hasattr(module, name), path


HISTORY_PHRASES = ("an earlier run", "the previous default", "this project's machines", "not timed yet",
                   "measured yet", "no GPU was available", "none was available", "grew from",
                   "came to depend", "when it was written", "protocol before")


@pytest.mark.parametrize("path", [p for p in DOC_FILES if p.parent == ROOT / "docs" or p.name == "README.md"],
                         ids=lambda p: p.name)
def test_pages_speak_of_the_software_not_of_its_history(path):
    text = path.read_text()
    for phrase in HISTORY_PHRASES:
        assert phrase not in text, (path.name, phrase)


def test_help_texts_speak_of_the_software_not_of_its_history():
    import argparse

    from mergopt_kernels.__main__ import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts.extend(sub.format_help() for sub in action.choices.values())
    assert len(texts) >= 3, "the demo and merge commands' help"
    text = " ".join(" ".join(texts).split())  # argparse wraps lines
    for phrase in HISTORY_PHRASES:
        assert phrase not in text, phrase
