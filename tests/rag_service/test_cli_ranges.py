"""Out-of-range values for every numeric flag of every command: one line, exit 2, no traceback.

Commands and flags come from the real parser (:mod:`tests.rag_service.cli_tree`), so a new
command or flag is covered as soon as it exists; a numeric flag with a type this file does not
know (a bare ``int`` or ``float`` included) fails ``test_every_numeric_flag_has_a_validator``
until it gets a validator from ``embedshift_operator.cli.flags`` and its bad values here.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embedshift_operator.cli import flags, main, operator, rollout
from tests.helpers import cli, cli_subprocess
from tests.rag_service.cli_tree import Command, leaves, long_flag, options

# What a user can get wrong for each kind of number: negative, zero where it means nothing,
# too large, not a number, nan and inf.
BAD: dict[Callable[[str], Any], tuple[str, ...]] = {
    flags.positive: ("0", "-1", "1.5", "ten", "nan", "2147483648", "99999999999999999999999"),
    flags.whole: ("1.5", "nan", "inf", "9223372036854775808", "-9223372036854775809"),
    flags.port: ("99999", "65536", "0", "-1", "http"),
    flags.port_or_off: ("99999", "65536", "-1", "1.5"),
    flags.usd: ("-1", "nan", "inf", "-inf", "1e400", "five"),
    flags.interval: ("0", "-1", "nan", "inf", "-inf", "1e300", "soon"),
    flags.seconds_or_zero: ("-1", "nan", "inf", "1e300", "soon"),
    flags.fraction: ("-0.1", "1.5", "nan", "inf", "high"),
    flags.ef_search: ("0", "-1", "1001", "99999999999999999999", "nan"),
    flags.duration: ("0s", "-5m", "5", "nan", "inf", "99999999999999h"),
    flags.duration_or_off: ("-5m", "5", "nan", "inf", "99999999999999h"),
    flags.promql_range: ("0s", "-1h", "1.5h", "nan", "inf", "24"),
    flags.shard: ("2/2", "-1/2", "0/0", "1/-2", "1.5/2", "nan/2", "3"),
    flags.memory_size: ("0MB", "-1MB", "512mb", "1.5GB", "3TB", "99999999999999999999GB", "auto"),
    flags.memory_size_or_auto: ("0MB", "512mb", "1.5GB", "3TB", "Auto", "nan"),
    flags.count_or_auto: ("-1", "1025", "1.5", "nan", "all", "99999999999999999999"),
}
# Types that take no number: files, phase names, migration keys, allowlist patterns.
NOT_NUMERIC: set[Any] = {
    Path,
    flags.config_file,
    flags.migration_key,
    rollout._phases,
    operator._image_pattern,
    operator._endpoint_pattern,
}


def typed_flags() -> list[tuple[Command, argparse.Action]]:
    return [(c, a) for c in leaves() for a in options(c) if a.type is not None]


def cases() -> list[Any]:
    return [
        pytest.param(
            command.path, long_flag(action), value, id=f"{command.name} {action.dest}={value}"
        )
        for command, action in typed_flags()
        for value in BAD.get(action.type, ())
    ]


def test_every_numeric_flag_has_a_validator() -> None:
    unknown = [
        f"{command.name} {long_flag(action)}: {action.type!r}"
        for command, action in typed_flags()
        if action.type not in BAD and action.type not in NOT_NUMERIC
    ]
    assert unknown == []
    untyped = [
        f"{command.name} {long_flag(action)}"
        for command in leaves()
        for action in options(command)
        if action.type is None
        and isinstance(action.default, int | float)
        and not isinstance(action.default, bool)
    ]
    assert untyped == [], "a numeric default without a validator"
    # The walk found the commands (else every test here would pass on nothing).
    assert {"serve", "migrate run", "operator run", "rollout pause"} <= {c.name for c in leaves()}


@pytest.mark.parametrize(("path", "flag", "value"), cases())
def test_out_of_range_value_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], path: tuple[str, ...], flag: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, f"{flag}={value}"])  # --flag=value: "-1" and "-inf" are values, not flags
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith(f"embedshift {' '.join(path)}: error: argument ")
    assert flag in line.split(":")[2], line  # "argument -k/--k: ..." names the flag
    assert value in line or "too" in line, line


@pytest.mark.parametrize("command", leaves(), ids=lambda c: c.name)
def test_an_unknown_flag_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], command: Command
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.path, "--no-such-flag"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"embedshift {command.name}: error: "), line
    # A command with required arguments names those first; either way the line is its own.
    assert "unrecognized arguments: --no-such-flag" in line or "required" in line, line
    assert line.endswith(f"(see embedshift {command.name} --help)")


def test_no_command_is_one_line_and_exit_2() -> None:
    result = cli_subprocess([])
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line.startswith("embedshift: error: the following arguments are required: COMMAND")


def test_serve_port_99999_in_a_shell_is_one_line(database_url: str) -> None:
    """The issue's own example, as a user runs it: a process, no traceback."""
    result = cli_subprocess(
        ["serve", "--database-url", database_url, "--table", "docs", "--target", "local:hash@8",
         "--port", "99999"]
    )  # fmt: skip
    assert result.code == 2
    assert result.err.splitlines() == [
        "embedshift serve: error: argument --port: 99999 is not a port number (1-65535) "
        "(see embedshift serve --help)"
    ]


def test_a_port_in_use_is_one_line_before_anything_starts(
    capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = cli(
            capsys, "serve", "--database-url", database_url, "--table", "docs",
            "--source", "local:hash@8", "--target", "local:hash@8", "--port", str(busy),
        )  # fmt: skip
    assert result.code == 2
    assert "Traceback" not in result.err
    (line,) = result.err.splitlines()
    assert line == (
        f"embedshift: error: --host 127.0.0.1 --port {busy}: cannot serve: Address already in use"
    )


def test_an_unknown_host_is_one_line(capsys: pytest.CaptureFixture[str], database_url: str) -> None:
    result = cli(
        capsys, "serve", "--database-url", database_url, "--table", "docs",
        "--source", "local:hash@8", "--target", "local:hash@8",
        "--host", "no-such-host.invalid", "--port", "8080",
    )  # fmt: skip
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line.startswith(
        "embedshift: error: --host no-such-host.invalid --port 8080: cannot serve"
    )


def test_a_bad_port_from_the_environment_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBEDSHIFT_PORT", "80800")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--table", "docs", "--target", "local:hash@8"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "argument --port: 80800 is not a port number" in line
