"""The ``embedshift`` command tree, walked from the real parser: every command, every flag.

The CLI tests enumerate commands from here rather than from a list of their own, so a command
or flag added later is covered without anyone remembering to add it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

from embedshift_operator.cli import build_parser


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # e.g. ("migrate", "run")
    parser: argparse.ArgumentParser

    @property
    def name(self) -> str:
        return " ".join(self.path) or "embedshift"


def commands(parser: argparse.ArgumentParser | None = None) -> Iterator[Command]:
    """Every parser of the tree, the top level included, depth first."""

    def walk(node: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[Command]:
        yield Command(path, node)
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, (*path, name))

    return walk(parser or build_parser(), ())


def leaves() -> list[Command]:
    """The commands a user runs (those without subcommands of their own)."""
    return [
        c
        for c in commands()
        if not any(isinstance(a, argparse._SubParsersAction) for a in c.parser._actions)
    ]


def options(command: Command) -> list[argparse.Action]:
    """The command's optional flags, ``--help`` and ``--version`` left out."""
    return [
        a
        for a in command.parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    ]


def long_flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)
