"""``embedshift``: the command line. Every mistake a user can make ends in one line and exit ≠ 0.

Configuration comes from ``--config FILE`` (an EmbeddingMigration manifest, the same YAML the
operator reads), flags, and environment variables (each flag names its variable in ``--help``).
Flags override the file.

One module per command family registers its commands and wires them to library functions:
:mod:`.migrate` (``migrate setup|run|verify|index|status|follow``), :mod:`.serve`,
:mod:`.monitoring` (``compare``, ``baseline``, ``monitor``), :mod:`.rollout` (``rollout
run|status|replay|pause|resume|abort``, the cluster side in :mod:`.cluster`), :mod:`.operator`
(``operator run``: the kopf operator); the flags they share are :mod:`.flags`. The library never
imports this package. What a command needs beyond the data plane (kopf, the Kubernetes client)
is imported inside its handler, so ``embedshift migrate …`` and ``embedshift serve`` never load
it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

import psycopg

from rag_service import __version__
from rag_service.errors import EXIT_RETRYABLE, EmbedshiftError
from rag_service.schema import database_error_text, first_line

__all__ = ["HelpFormatter", "Parser", "build_parser", "main"]


class HelpFormatter(argparse.HelpFormatter):
    """How every ``--help`` reads. Each flag shows its default: appended as "(default: …)"
    where the help does not already say it, never where the value comes from the environment
    (the help names the variable instead, and the value may be a secret such as DATABASE_URL).
    Text with line breaks of its own (examples, epilogs) is kept as written; one-line text is
    wrapped to the terminal."""

    def _get_help_string(self, action: argparse.Action) -> str:
        from embedshift_operator.cli.flags import FromEnvironment

        text = action.help or ""
        default = action.default
        if isinstance(default, FromEnvironment):
            return text if "(env " in text else f"{text} (env {default.variable}: set)"
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, str | list | tuple | set | frozenset) and not default)
            or "default" in text.lower()
            or "(env " in text
        ):
            return text
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """Every parser of the command line (subcommands inherit it): one :class:`HelpFormatter`,
    and a usage error is one line and exit code 2, as every other error a user can cause."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            # A command's own parser names a word it does not know, so the hint is its --help
            # (argparse would leave it to the top level: "see embedshift --help").
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Each top-level command and the module registering it. ``embedshift COMMAND …`` imports that
# module only: the operator's process need not hold the data plane (numpy, the embedding SDKs,
# rich), and every command starts sooner. ``embedshift --help`` (or an unknown word) loads all.
FAMILIES = {
    "migrate": "migrate",
    "serve": "serve",
    "compare": "monitoring",
    "baseline": "monitoring",
    "monitor": "monitoring",
    "rollout": "rollout",
    "operator": "operator",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` (a known first word), only that command's family."""
    parser = Parser(
        prog="embedshift",
        description="Move a pgvector RAG corpus to a new embedding model, step by step.",
    )
    parser.add_argument("--version", action="version", version=f"embedshift {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = [FAMILIES[command]] if command in FAMILIES else list(dict.fromkeys(FAMILIES.values()))
    for family in wanted:
        module = importlib.import_module(f"embedshift_operator.cli.{family}")
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(words[0] if words else None).parse_args(words)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "openai", "google_genai", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except EmbedshiftError as exc:
        print(f"embedshift: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except psycopg.Error as exc:
        url = getattr(args, "database_url", None) or ""
        said = database_error_text(exc, url) if url else first_line(exc)
        print(f"embedshift: error: database: {said}", file=sys.stderr)
        return EXIT_RETRYABLE
    except KeyboardInterrupt:
        print(
            "embedshift: interrupted; committed batches are kept, rerun to resume",
            file=sys.stderr,
        )
        return 130
