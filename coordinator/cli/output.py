"""What client commands print: ``-w table`` (aligned columns, a header in
capitals) or ``-w json`` (one JSON document; streaming commands print one
compact JSON object per line). Everything goes to stdout and is flushed,
so a pipe sees each streamed line as it comes."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

FORMATS = ("table", "json")


def cell(value: Any) -> str:
    """One table cell: text as it is, absent as ``-``, anything else as
    compact JSON; kept on one line (newlines and tabs escaped)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") \
        if any(c in text for c in "\n\r\t") else text


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` under a header of ``columns`` (upper-cased), aligned; a
    column a row lacks shows ``-``."""
    grid = [[c.upper() for c in columns]] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
                     for line in grid)


def emit(document: Any, write_out: str, rows: Sequence[Mapping[str, Any]] | None = None,
         columns: Sequence[str] | None = None, *, out: TextIO | None = None) -> None:
    """Print one result. json: ``document``; table: ``rows`` under
    ``columns`` (default: ``document`` as one row, its keys the columns)."""
    stream = out or sys.stdout
    if write_out == "json":
        stream.write(json.dumps(document, indent=2, sort_keys=False) + "\n")
    else:
        if rows is None:
            rows = [document]
        if columns is None:
            columns = list(rows[0]) if rows else []
        if columns:
            stream.write(table(rows, columns) + "\n")
    stream.flush()


def emit_line(item: Mapping[str, Any], write_out: str, columns: Sequence[str], *,
              out: TextIO | None = None) -> None:
    """Print one item of a stream: json as one compact object, table as its
    ``columns`` separated by two spaces (no header: widths are not known
    ahead)."""
    stream = out or sys.stdout
    if write_out == "json":
        stream.write(json.dumps(item, separators=(",", ":")) + "\n")
    else:
        stream.write("  ".join(cell(item.get(c)) for c in columns) + "\n")
    stream.flush()
