#!/usr/bin/env python
"""Writes docs/configuration.md, the reference of every config key, from the dataclasses in
gkd/config/schema.py.

    python scripts/gen_config_docs.py            # (re)write docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 when docs/configuration.md is stale

Each key's type and default come from its dataclass field, its meaning from the comment on its line in
gkd/config/schema.py (or the comment lines right above it), or from gkd/config/help.py's HELP, which wins. A
key with no meaning anywhere is an error naming it, so that a new key cannot go undocumented.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/gen_config_docs.py"


class MissingHelp(ValueError):
    """Config keys without a description; the message names them and where to add one."""


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment text of that field in ``source``: the comment lines right
    above it, then the comment at the end of its (last) line, joined into one line."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    out = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
            text = " ".join(above + trailing[-1:]).strip()
            if text:
                out[(cls.name, stmt.target.id)] = text
    return out


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin is list:
        item = args[0]
        return "list of entries (below)" if dataclasses.is_dataclass(item) else f"list[{_type_name(item)}]"
    if origin is dict:
        return "mapping"
    if tp is typing.Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str) and v == "":
        return '""'
    return str(v)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value(f.default)
    value = f.default_factory()  # type: ignore[misc]
    return "" if dataclasses.is_dataclass(value) else _value(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def rows(cls, prefix: str, comments, help_text, missing: list[str]) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every field of dataclass ``cls`` and the sections inside it."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        meaning = help_text.get(key) or comments.get((cls.__name__, f.name), "")
        if not meaning:
            missing.append(key)
        kind = _type_name(tp)
        if "choices" in f.metadata:
            kind = " | ".join(f"`{c}`" for c in f.metadata["choices"])
        else:
            kind = f"`{kind}`" if kind not in ("section", "list of entries (below)") else kind
        default = _default(f)
        out.append((f"`{key}`", kind, f"`{default}`" if default else "", meaning))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(item):
            inner = f"{key}[]" if item is not tp else key
            out += rows(item, inner, comments, help_text, missing)
    return out


def render() -> str:
    """The whole of docs/configuration.md; raises :class:`MissingHelp` naming undocumented keys."""
    sys.path.insert(0, str(ROOT))
    from gkd import config
    from gkd.config import help as config_help

    comments = field_comments((ROOT / "gkd" / "config" / "schema.py").read_text())
    missing: list[str] = []
    lines = [
        "# Configuration reference",
        "",
        f"<!-- generated by {COMMAND} from gkd/config/schema.py and gkd/config/help.py: "
        "do not edit by hand -->",
        "",
        "Every key of a run's configuration, its type, its default and what it does. A run is the defaults",
        "below, then each YAML file given to `--config` (later files win), then `section.key=value`",
        "overrides on the command line (lists as `a,b`); unknown keys are refused with the valid ones",
        "listed.",
        "",
    ]
    hints = typing.get_type_hints(config.Config)
    for f in dataclasses.fields(config.Config):
        lines += [f"## `{f.name}`", ""]
        intro = config_help.SECTIONS.get(f.name) or (hints[f.name].__doc__ or "").strip()
        if intro and not intro.startswith(hints[f.name].__name__ + "("):  # not dataclass's generated doc
            lines += [" ".join(intro.split()), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for row in rows(hints[f.name], f.name, comments, config_help.HELP, missing):
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines.append("")
    known = {r.strip("`") for r in _all_keys(config.Config)}
    stale = sorted(set(config_help.HELP) - known)
    problems = [f"{k}: no description; add a comment on its line in gkd/config/schema.py or an entry in "
                "gkd/config/help.py's HELP" for k in missing]  # fmt: skip
    problems += [f"{k}: gkd/config/help.py's HELP describes a key that does not exist; remove it"
                 for k in stale]  # fmt: skip
    if problems:
        raise MissingHelp("\n".join(problems))
    return "\n".join(lines)


def _all_keys(cls, prefix: str = "") -> list[str]:
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        out.append(key)
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(item):
            out += _all_keys(item, f"{key}[]." if item is not tp else f"{key}.")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    try:
        text = render()
    except MissingHelp as e:
        for line in str(e).splitlines():
            print(f"gen_config_docs: error: {line}", file=sys.stderr)
        return 1
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"gen_config_docs: {OUT} is stale; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
