"""Every ``--help`` says what each flag means and what it defaults to, and each subcommand's
summary; walked over the real parser tree, so a new flag without help fails here."""

from __future__ import annotations

import argparse
import re

import pytest

from embedshift_operator.cli import build_parser
from tests.helpers import cli_subprocess
from tests.rag_service.cli_tree import Command, commands, long_flag, options

# Variables the flags read their defaults from; unset here so the defaults are the code's.
FLAG_ENV = (
    "DATABASE_URL",
    "EMBEDSHIFT_CONFIG",
    "EMBEDSHIFT_TABLE",
    "EMBEDSHIFT_ID_COLUMN",
    "EMBEDSHIFT_TEXT_COLUMN",
    "EMBEDSHIFT_CATEGORY_COLUMN",
    "EMBEDSHIFT_SOURCE_COLUMN",
    "EMBEDSHIFT_TARGET",
    "EMBEDSHIFT_TARGET_BASE_URL",
    "EMBEDSHIFT_SOURCE",
    "EMBEDSHIFT_MIGRATION",
    "EMBEDSHIFT_HOST",
    "EMBEDSHIFT_PORT",
    "EMBEDSHIFT_PROMETHEUS_URL",
    "EMBEDSHIFT_IMAGE",
)


@pytest.fixture
def tree(monkeypatch: pytest.MonkeyPatch) -> list[Command]:
    for name in FLAG_ENV:
        monkeypatch.delenv(name, raising=False)
    return list(commands(build_parser()))


def shown_help(command: Command, action: argparse.Action) -> str:
    """The action's help exactly as ``--help`` prints it (defaults expanded)."""
    return command.parser._get_formatter()._expand_help(action)


def has_default(action: argparse.Action) -> bool:
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    return not (isinstance(default, str | list | tuple | set | frozenset) and not default)


def test_every_flag_has_help(tree: list[Command]) -> None:
    missing = [
        f"{c.name} {long_flag(a)}" for c in tree for a in options(c) if not (a.help or "").strip()
    ]
    assert missing == []


def test_every_default_is_shown(tree: list[Command]) -> None:
    hidden = [
        f"{c.name} {long_flag(a)} (default {a.default!r}): {shown_help(c, a)!r}"
        for c in tree
        for a in options(c)
        if has_default(a) and "default" not in shown_help(c, a).lower()
    ]
    assert hidden == []


@pytest.mark.parametrize(
    ("path", "flag", "shown"),
    [
        (("serve",), "--port", "default 8080"),
        (("serve",), "--host", "default 127.0.0.1"),
        (("serve",), "--max-query-chars", "(default: 2000)"),
        (("serve",), "--breaker-failures", "(default: 5)"),
        (("serve",), "--shadow-sample-rate", "(default: 0.1)"),
        (("migrate", "verify"), "--sample", "(default: 50)"),
        (("migrate", "verify"), "--k", "(default: 10)"),
        (("migrate", "verify"), "--min-recall", "(default: 0.9)"),
        (("migrate", "run"), "--shard", "(default: 0/1)"),
    ],
)
def test_the_issues_flags_show_their_default(
    tree: list[Command], path: tuple[str, ...], flag: str, shown: str
) -> None:
    (command,) = [c for c in tree if c.path == path]
    (action,) = [a for a in options(command) if flag in a.option_strings]
    assert shown in shown_help(command, action)


def test_serve_says_it_waits_for_the_record(tree: list[Command]) -> None:
    """A typo'd key waits instead of failing: --help says so where the key is given."""
    (command,) = [c for c in tree if c.path == ("serve",)]
    (action,) = [a for a in options(command) if "--migration" in a.option_strings]
    text = " ".join(shown_help(command, action).split())
    assert "what `embedshift migrate setup` recorded for it" in text
    assert "waits for that record (live, not ready)" in text
    assert "switches when setup records another data plane" in text
    description = " ".join((command.parser.description or "").split())
    assert "Until setup has recorded it, serve waits" in description
    assert "GET /healthz is the liveness probe" in description


def test_every_subcommand_has_a_summary(tree: list[Command]) -> None:
    missing = [
        f"{c.name} {choice.dest}"
        for c in tree
        for a in c.parser._actions
        if isinstance(a, argparse._SubParsersAction)
        for choice in a._choices_actions
        if not (choice.help or "").strip()
    ]
    assert missing == []
    top = build_parser().format_help()
    for word in ("migrate", "serve", "compare", "baseline", "monitor", "rollout", "operator"):
        assert re.search(rf"^    {word} +\S", top, re.M), word  # listed with its summary


def test_no_metavar_ends_in_an_underscore(tree: list[Command]) -> None:
    usages = {c.name: c.parser.format_usage() for c in tree}  # every metavar, no prose
    odd = {name: re.findall(r"\b[A-Z][A-Z0-9_]*_\b", text) for name, text in usages.items()}
    assert {name: found for name, found in odd.items() if found} == {}
    assert "[--range RANGE]" in usages["baseline"]


def test_examples_keep_their_lines_and_descriptions_wrap(tree: list[Command]) -> None:
    (migrate,) = [c for c in tree if c.path == ("migrate",)]
    text = migrate.parser.format_help()
    assert "\n  embedshift migrate run    --config migration.yaml --dry-run --limit 10\n" in text
    (run,) = [c for c in tree if c.path == ("rollout", "run")]
    assert all(len(line) <= 100 for line in run.parser.format_help().splitlines())


def test_a_database_url_in_the_environment_is_not_shown() -> None:
    """Defaults taken from the environment are named, never printed: DATABASE_URL holds a
    password."""
    import os

    env = {**os.environ, "DATABASE_URL": "postgresql://app:s3cret-pw@db/rag"}
    result = cli_subprocess(["migrate", "run", "--help"], env=env)
    assert result.code == 0, result.err
    assert "(env DATABASE_URL)" in result.out
    assert "s3cret-pw" not in result.out


def test_every_help_prints_as_written(tree: list[Command]) -> None:
    """argparse %-formats help strings: a bare "0 %" once printed abort's summary as a dump of
    argparse's internals."""
    broken = [c.name for c in tree if "option_strings" in c.parser.format_help()]
    assert broken == []
