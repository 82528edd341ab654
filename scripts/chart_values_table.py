"""Write the values table of charts/embedshift/README.md from values.yaml's ``# --`` comments.

Each documented value in values.yaml has a ``# -- description`` comment (continued by plain
``#`` lines) right above its key; the table lists those keys with their defaults, between the
README's ``<!-- values-table:start -->`` and ``<!-- values-table:end -->`` markers.

    python scripts/chart_values_table.py           # rewrite the README's table
    python scripts/chart_values_table.py --check   # exit 1 when the README's table is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "embedshift"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_]+):")


def documented(values_yaml: str) -> dict[str, str]:
    """Dotted key path -> description, for every key with a ``# --`` comment above it."""
    rows: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in values_yaml.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment is not None:
            comment.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if match is None:
            comment = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if comment is not None:
            rows[".".join(key for _, key in stack)] = " ".join(comment)
        comment = None
    return rows


def lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return node


def table() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for path, description in documented(text).items():
        default = json.dumps(lookup(values, path), separators=(", ", ": "))
        cell = description.replace("|", "\\|")
        lines.append(f"| `{path}` | `{default}` | {cell} |")
    return "\n".join(lines)


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the README is stale")
    args = parser.parse_args()
    path = CHART / "README.md"
    current = path.read_text()
    wanted = render(current)
    if args.check:
        if current != wanted:
            print(f"{path} is stale: run python scripts/chart_values_table.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
