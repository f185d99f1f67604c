"""Python source helpers for the offline service generator: literals, templates, tidy files."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from .service_samples import Ref

# A run of one character this long is written as 'x' * n, so huge edge strings stay small in source.
RUN_RE = re.compile(r"(.)\1{31,}", re.DOTALL)
# Templates hold Python code, so str.format's braces would clash: markers are <<name>>.
MARKER_RE = re.compile(r"<<([a-z_]+)>>")


def width(text: str) -> int:
    """Columns the text takes in an editor (and for line-length linters): wide CJK characters count 2."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _quoted(s: str) -> str:
    """repr(), but in double quotes unless the text holds one (the style of the hand-written templates)."""
    r = repr(s)
    return f'"{r[1:-1]}"' if r.startswith("'") and '"' not in s and "'" not in s else r


def _str_lit(s: str) -> str:
    pieces: list[str] = []
    last = 0
    for m in RUN_RE.finditer(s):
        if m.start() > last:
            pieces.append(_quoted(s[last:m.start()]))
        pieces.append(f"{_quoted(m.group(1))} * {len(m.group(0))}")
        last = m.end()
    if not pieces:
        return _quoted(s)
    if last < len(s):
        pieces.append(_quoted(s[last:]))
    return "(" + " + ".join(pieces) + ")"


def lit(value: Any) -> str:
    """A Python literal (expression) for JSON-like data, tuples and sample Ref markers."""
    if isinstance(value, Ref):
        return f"Ref({value.entity!r})"
    if isinstance(value, str):
        return _str_lit(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'
    if isinstance(value, tuple):
        return "(" + ", ".join(lit(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(lit(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{lit(k)}: {lit(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    raise TypeError(f"no literal for {type(value).__name__}")


def pretty(value: Any, indent: int = 0, max_width: int = 110, *, column: int | None = None) -> str:
    """lit(), broken over lines in block style wherever a container does not fit the width.

    `indent` is the indentation of the line the value starts on, `column` where on it the value starts.
    """
    flat = lit(value)
    start = indent if column is None else column
    if start + width(flat) + 1 <= max_width or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{lit(k)}: {pretty(v, indent + 4, max_width, column=indent + 6 + len(lit(k)))},\n"
                 for k, v in value.items()]
        return "{\n" + "".join(items) + " " * indent + "}"
    items = [f"{pad}{pretty(v, indent + 4, max_width)},\n" for v in value]
    return "[\n" + "".join(items) + " " * indent + "]"


def wrapped(s: str, indent: int, max_width: int = 110, *, column: int | None = None) -> str:
    """A string literal (followed by a comma); one too long becomes joined pieces split at spaces."""
    flat = lit(s)
    if (indent if column is None else column) + width(flat) + 1 <= max_width:
        return flat
    chunks: list[str] = []
    for word in s.split(" "):
        piece = word if not chunks else " " + word
        if chunks and indent + 4 + width(lit(chunks[-1] + piece)) <= max_width:
            chunks[-1] += piece
        else:
            chunks.append(piece)
    pad = " " * indent
    return "(\n" + "".join(f"{pad}    {lit(c)}\n" for c in chunks) + pad + ")"


def import_line(module: str, names: list[str], max_width: int = 110) -> str:
    """from module import a, b (constants first, as isort does), wrapped one name per line if too long."""
    names = sorted(names, key=lambda n: (not n.isupper(), n))
    line = f"from {module} import {', '.join(names)}\n"
    if len(line) <= max_width + 1:
        return line
    return f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")\n"


def fill(template: str, **values: str) -> str:
    """Replace <<key>> markers in one pass (inserted text is never rescanned); every marker needs a value."""
    missing = sorted(set(MARKER_RE.findall(template)) - values.keys())
    if missing:
        raise KeyError(f"template markers without a value: {missing}")
    return MARKER_RE.sub(lambda m: values[m.group(1)], template)


def tidy(text: str) -> str:
    """At most two blank lines in a row, and exactly one newline at the end."""
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"
