"""Write the configuration reference (docs/reference/config.md) from conf/.

    python scripts/config_reference.py            # rewrite docs/reference/config.md
    python scripts/config_reference.py --check    # exit 1 when the committed page is stale

Every entry config and every option of every group: what the option is (its header comment),
the options it composes (`defaults`), and each key it sets with its value and its comment. For a
preset (`experiment`, `debug`, `hparams_search`) the keys listed are what it changes against what
it composes. `make docs` runs it; tests/test_docs.py fails when the page and conf/ disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGE = ROOT / "docs" / "reference" / "config.md"
SKIPPED_GROUPS = ("hydra", "local")
"""Hydra's own settings and the user's machine-specific file (not committed)."""
PRESET_GROUPS = ("experiment", "debug", "hparams_search")
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.\-]*|'[^']*'|\"[^\"]*\"):(?P<rest>.*)$")


def _strip_comment(text: str) -> tuple[str, str]:
    """`value  # comment` -> (value, comment); a # inside quotes or braces does not start one."""
    depth, quote = 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1] == " "):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def key_comments(text: str) -> tuple[str, dict[str, str]]:
    """The file's header comment and `{dotted key: comment}` (the comment lines right above a key
    and the comment after its value), read from the YAML text."""
    lines = text.splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        line = lines[i].lstrip()[1:].strip()
        if not line.startswith("@package"):
            header.append(line)
        i += 1
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key)
    pending: list[str] = []
    for line in lines[i:]:
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if match is None or stripped.startswith("- "):
            pending = []
            continue
        indent, key = len(match["indent"]), match["key"].strip("'\"")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        _, inline = _strip_comment(match["rest"])
        note = " ".join([*pending, inline]).strip()
        if note:
            comments[".".join(k for _, k in stack)] = note
        pending = []
    return " ".join(header).strip(), comments


def _render(value: Any) -> str:
    """A value as it would be written on the command line (lists and mappings as flow YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    """`(dotted key, value)` of every key; a mapping's keys recursively, an empty mapping, a list
    or a mapping with `_target_` nested in a list as one value."""
    if isinstance(node, dict) and node:
        out: list[tuple[str, Any]] = []
        for k, v in node.items():
            out.extend(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, node)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def option_section(path: Path, group: str | None) -> list[str]:
    """The reference of one config file: a heading, its description, what it composes, and a
    table of its keys."""
    text = path.read_text()
    header, comments = key_comments(text)
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    assert isinstance(data, dict)
    defaults = data.pop("defaults", None)
    is_global = "# @package _global_" in text
    prefix = "" if is_global or group is None else group
    name = path.stem if group is None else f"{group}={path.stem}"
    out = [f"### `{name}`", ""]
    if header:
        out += [header, ""]
    if defaults:
        items = [next(iter(d.items())) if isinstance(d, dict) else (d, None) for d in defaults]
        listed = ", ".join(f"`{k}: {v}`" if v is not None else f"`{k}`" for k, v in items)
        out += [f"Composes: {listed}.", ""]
    rows = _leaves(data, "")
    if rows and rows != [("", {})]:
        changes = group in PRESET_GROUPS
        out += [f"| key | {'value' if changes else 'default'} | comment |", "|---|---|---|"]
        for key, value in rows:
            full = f"{prefix}.{key}" if prefix else key
            out.append(f"| `{_cell(full)}` | `{_cell(_render(value))}` | {_cell(comments.get(key, ''))} |")
        out.append("")
    return out


def reference() -> str:
    """The whole page."""
    out = ["# Configuration reference", "",
           "Generated from `conf/` by `scripts/config_reference.py` (`make docs`); do not edit by hand.",
           "Each option lists the keys it sets with their values and comments; a preset's keys are what it",
           "changes against the options it composes. How groups compose: [Configuration](../configuration.md).", "",
           "## Entry configs", ""]
    for path in sorted(CONF.glob("*.yaml")):
        out += option_section(path, None)
    groups = sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in SKIPPED_GROUPS)
    for group in groups:
        out += [f"## `{group.name}`", ""]
        for path in sorted(group.glob("*.yaml")):
            out += option_section(path, group.name)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed page is stale")
    args = parser.parse_args(argv)
    page = reference()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)} ({page.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
