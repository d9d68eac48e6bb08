"""A chart for every section of docs/benchmarks.md, drawn from the
section's own table, so a chart cannot say what its table does not.

    .venv/bin/python -m bench.charts [--doc docs/benchmarks.md] [--dir docs/charts] [--check]

For each ``## `` section with a table, the first table's rows become
horizontal bars: the label is the row's text cells (workload, transport,
round...), the length the section's headline metric: the first column whose
header names a rate (``/s``), else a time (``ms``, ``µs``, `` s``), else a
share of a core (``CPU``), else the first numeric column. A cell ``a → b``
(before and after) draws two bars. The chart goes to ``DIR/<slug>.png`` and
the section gets the line ``![chart: <metric>](charts/<slug>.png)`` right
under its heading (replaced, never repeated, when run again). A section
without a table gets none. ``--check`` changes nothing: it exits 1 naming
every section whose chart is missing or was drawn from another table (each
PNG carries the SHA-256 of its table in a text chunk).

Benchmarks that draw a chart of their own (``bench.compare``'s
``docs/bench-etcd.png``) keep it; this adds the table's view next to it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.harness import parser

CHART_LINE = re.compile(r"\n(!\[chart: [^\]]*\]\(charts/[a-z0-9-]+\.png\)\n)")  # right under a heading
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
ROOT_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
ROWS_MAX = 40  # a longer table is cut to its first rows (the chart says so)


@dataclass
class Section:
    title: str
    start: int  # offset of the heading line
    body: str
    slug: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


def sections(text: str) -> list[Section]:
    heads = [m for m in re.finditer(r"^## (.+)$", text, re.M)]
    out = []
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        title = head.group(1).strip()
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60]
        out.append(Section(title, head.start(), text[head.start():end], slug))
    return out


def first_table(body: str) -> Table | None:
    lines = body.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-|: ]+\|$", lines[i + 1]):
            header = _cells(line)
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return Table(header, rows) if rows else None
    return None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


FINGERPRINT_KEY = "Table-SHA256"  # a PNG text chunk: the table the chart was drawn from


def fingerprint(table: Table) -> str:
    return hashlib.sha256(json.dumps([table.header, table.rows]).encode()).hexdigest()


def _drawn_from(path: Path) -> str | None:
    if not path.exists():
        return None
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        return image.text.get(FINGERPRINT_KEY)  # type: ignore[attr-defined]


def number(cell: str) -> float | None:
    found = NUMBER.search(cell.replace("**", ""))
    if found is None or cell.strip().lower() in ("nan", "-", ""):
        return None
    return float(found.group().replace(",", ""))


# A cell that is a measurement: a number with an optional unit or note
# ("4077", "0.74x", "16% of a core", "1.0 (2)", "0.226 → 0.057"); not a
# label that holds a number ("etcd 3.4.23, 3 members", "write 64 B").
MEASUREMENT = re.compile(r"^\**[~≈<>-]?\d[\d,.]*\**\s*(x|%|ms|s|µs|MiB|KiB|GiB|cores?)?"
                         r"(\s*(→|/)\s*[~≈<>-]?\d[\d,.]*\s*(x|%|ms|s|µs)?)?(\s+.*)?$")


def _numeric(table: Table, column: int) -> bool:
    cells = [r[column] for r in table.rows if column < len(r)]
    measured = [c for c in cells if (MEASUREMENT.match(c) and not re.match(r"^\d[\d,]*\s+[a-zA-Z]{2,}", c))
                or c.strip().lower() in ("nan", "-")]
    return len(measured) >= max(1, int(0.8 * len(cells)))


def headline(table: Table, title: str = "") -> int | None:
    """The column the chart draws (see the module's doc), or None. A
    section whose title names CPU charts its CPU first; a rate that was only
    intended is not a result."""
    numeric = [i for i in range(len(table.header)) if _numeric(table, i)]
    label_like = {i for i, h in enumerate(table.header) if h.lower() in ("round", "clients", "agents", "keys")}
    candidates = [i for i in numeric if i not in label_like and "intended" not in table.header[i]] or numeric
    tests = [lambda h: "/s" in h, lambda h: " ms" in h or h.endswith("ms") or "µs" in h or h.endswith(" s"),
             lambda h: "cpu" in h.lower()]
    if "cpu" in title.lower():
        tests.insert(0, tests.pop())
    for test in tests:
        for i in candidates:
            if test(table.header[i]):
                return i
    return candidates[0] if candidates else None


def companions(table: Table, column: int) -> list[int]:
    """Columns drawn next to the headline: the same measure of another side
    ("etcd ops/s" and "ours ops/s"), at most two more."""
    head = table.header[column]
    words = head.split(" ", 1)
    if len(words) < 2:
        return []
    unit = words[1]
    return [i for i, h in enumerate(table.header) if i != column and h.endswith(" " + unit)
            and len(h.split(" ")) == len(head.split(" ")) and _numeric(table, i)][:2]


def draw(section: Section, table: Table, column: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = table.header[column]
    labels_at = [i for i in range(len(table.header)) if i != column and (not _numeric(table, i)
                 or table.header[i].lower() in ("round", "clients", "agents", "keys"))][:3]
    rows = table.rows[:ROWS_MAX]
    labels, before, after = [], [], []
    for row in rows:
        if column >= len(row):
            continue
        cell = row[column]
        label = " · ".join(row[i] for i in labels_at if i < len(row))[:60]
        if "→" in cell:
            a, b = (number(part) for part in cell.split("→", 1))
            labels.append(label)
            before.append(a or 0.0)
            after.append(b or 0.0)
        else:
            labels.append(label)
            after.append(number(cell) or 0.0)
            before.append(float("nan"))
    height = max(2.5, 0.32 * len(labels) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    ys = list(range(len(labels)))[::-1]
    others = companions(table, column)
    if others:  # the same measure of two or three sides, side by side
        columns = [column, *others]
        width = 0.8 / len(columns)
        for n, c in enumerate(columns):
            values = [number(row[c]) or 0.0 for row in rows if column < len(row)]
            ax.barh([y + 0.4 - width * (n + 0.5) for y in ys], values, height=width, label=table.header[c])
        ax.legend(loc="lower right", fontsize=8)
        metric = ", ".join(table.header[c] for c in columns)
    elif any(b == b for b in before):  # some "before → after" cells
        ax.barh([y + 0.2 for y in ys], before, height=0.4, color="#bbbbbb", label="before")
        ax.barh([y - 0.2 for y in ys], after, height=0.4, color="#4c72b0", label="after")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.barh(ys, after, color="#4c72b0")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(metric)
    cut = f" (first {ROWS_MAX} of {len(table.rows)} rows)" if len(table.rows) > ROWS_MAX else ""
    ax.set_title(f"{section.title}{cut}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": "bench.charts", FINGERPRINT_KEY: fingerprint(table)})
    plt.close(fig)


def run(doc: Path, directory: Path, check: bool) -> list[str]:
    """Draw (or, with ``check``, look for) every chart; the problems found."""
    text = doc.read_text()
    problems = []
    insertions: list[tuple[int, int, str]] = []  # (start, end, replacement) of the line under each heading
    for section in sections(text):
        table = first_table(section.body)
        column = headline(table, section.title) if table is not None else None
        if table is None or column is None:
            continue
        path = directory / f"{section.slug}.png"
        line = f"![chart: {table.header[column]}]({directory.name}/{section.slug}.png)\n"
        heading_end = section.start + section.body.index("\n") + 1
        existing = CHART_LINE.match(text, heading_end)
        if check:
            if existing is None or existing.group(1) != line:
                problems.append(f"{section.title}: no chart line")
            elif _drawn_from(path) != fingerprint(table):
                problems.append(f"{section.title}: {path} is missing or was drawn from another table")
            continue
        draw(section, table, column, path)
        if existing is not None:
            insertions.append((existing.start(1), existing.end(1), line))
        else:
            insertions.append((heading_end, heading_end, "\n" + line))
    if not check:
        for start, end, replacement in reversed(insertions):
            text = text[:start] + replacement + text[end:]
        doc.write_text(text)
    return problems


def main(argv: list[str] | None = None) -> int:
    cli = parser("charts", __doc__)
    cli.add_argument("--doc", default="docs/benchmarks.md")
    cli.add_argument("--dir", default="docs/charts")
    cli.add_argument("--check", action="store_true")
    args = cli.parse_args(argv)
    problems = run(Path(args.doc), Path(args.dir), args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
