"""Tables that fit the terminal: columns shrink or drop by priority instead of wrapping cells.

rich shrinks an over-wide table by folding every cell, mid-word, and as a last resort cuts all
columns evenly, ids included. Here the widths are chosen before rich sees the table: each
column says how important it is, how far it may shrink (an ellipsis shows the cut) and whether
it may go altogether, and rich is then given fixed widths that already fit.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, TextIO

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderResult
from rich.table import Table
from rich.text import Text

DEFAULT_WIDTH = 80
# Between two columns: a separator and a space of padding on each side (box.SIMPLE_HEAD, no edge).
GAP = 3


def terminal_width(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> int:
    """COLUMNS when set; else the width of the terminal the output goes to; else 80.

    rich alone falls back to the size of *any* terminal among stdin, stdout and stderr, so the
    same piped command printed differently depending on where stderr went. Output that is not a
    terminal now gets one width, which scripts and tests can rely on.
    """
    stream = sys.stdout if stream is None else stream
    columns = (os.environ if environ is None else environ).get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns or DEFAULT_WIDTH
    except (AttributeError, ValueError, OSError):
        pass
    return DEFAULT_WIDTH


def make_console() -> Console:
    """A console whose width is ``terminal_width()``, for views that lay themselves out to fit."""
    return Console(highlight=False, width=terminal_width())


@dataclass(frozen=True)
class Bar:
    """A span's place on a time axis, as fractions (0..1) of the whole; drawn once the width is known."""

    start: float
    end: float
    style: str = ""
    char: str = "█"

    def render(self, width: int) -> Text:
        """Spaces up to the start, then blocks to the end: at least one block, however short the span."""
        first = min(max(math.floor(self.start * width), 0), width - 1)
        last = min(max(round(self.end * width), first + 1), width)
        return Text(" " * first + self.char * (last - first), style=self.style)


SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_ZERO = "·"


@dataclass(frozen=True)
class Sparkline:
    """A trend (counts per time bucket, oldest first) drawn once the width is known: one character
    per value, or, in a column narrower than the values, per run of adjacent values added up
    (evenly: character i covers values ``i * n // width`` to ``(i + 1) * n // width``). Levels are
    ▁▂▃▄▅▆▇█ scaled to the largest: ``ceil(8 * v / max)``, so any count above 0 shows at least ▁
    and the largest is █; 0 is ``·``."""

    values: tuple[int, ...]
    style: str = ""

    def render(self, width: int) -> Text:
        return Text(spark(self.values, width), style=self.style)


def spark(values: Sequence[int], width: int | None = None) -> str:
    """``values`` as a sparkline of at most ``width`` characters (see ``Sparkline``)."""
    count = len(values)
    width = count if width is None else max(min(width, count), 0)
    if not width:
        return ""
    sums = [sum(values[i * count // width:(i + 1) * count // width]) for i in range(width)]
    top = max(sums)
    return "".join(SPARK_BLOCKS[-(-8 * v // top) - 1] if v > 0 else SPARK_ZERO for v in sums)


Cell = str | Text | Bar | Sparkline
Header = str | Callable[[int], str]


@dataclass(frozen=True)
class Column:
    """How one column behaves when the table is too wide.

    ``priority``: higher columns are widened first and dropped last. ``min_width``: how far the
    column may shrink (cut with an ellipsis); None never shrinks it, which is what ids need.
    ``optional`` columns are left out when not even their minimum fits. ``wrap`` columns (free
    text) wrap at spaces rather than being cut. ``natural`` overrides the width taken from the
    cells (bars have none). A callable header is given the column's final width.
    """

    header: Header
    priority: int
    min_width: int | None = None
    optional: bool = False
    wrap: bool = False
    natural: int | None = None
    justify: JustifyMethod = "left"


def _cell_width(cell: Cell) -> int:
    if isinstance(cell, Bar):
        return 0
    if isinstance(cell, Sparkline):
        return len(cell.values)
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell)


def fit_widths(columns: Sequence[Column], naturals: Sequence[int], available: int) -> list[int | None]:
    """Each column's width, or None for a dropped column, so the table fits in ``available`` cells.

    Required columns first get their minimum; then, by priority, optional columns are added if
    their minimum still fits and every column grows towards its natural width with what is left.
    Headers are never cut, so a column is at least as wide as its (string) header. When even the
    minimums do not fit, the table is wider than ``available``: better than cutting an id.
    """
    minimums = []
    for column, natural in zip(columns, naturals, strict=True):
        floor = cell_len(column.header) if isinstance(column.header, str) else 1
        minimums.append(natural if column.min_width is None else max(min(natural, column.min_width), floor))
    widths: list[int | None] = [None] * len(columns)
    budget = available + GAP  # the first column has no gap before it
    for index, column in enumerate(columns):
        if not column.optional:
            widths[index] = minimums[index]
            budget -= minimums[index] + GAP
    for index in sorted(range(len(columns)), key=lambda i: -columns[i].priority):
        width = widths[index]
        if width is None:
            if minimums[index] + GAP > budget:
                continue
            width = minimums[index]
            budget -= width + GAP
        grow = max(min(naturals[index] - width, budget), 0)
        widths[index] = width + grow
        budget -= grow
    return widths


def _as_text(cell: Cell, width: int) -> Text:
    if isinstance(cell, (Bar, Sparkline)):
        return cell.render(width)
    return cell if isinstance(cell, Text) else Text(cell)  # Text: no markup in data


class FittedTable:
    """A table laid out at print time for the width it gets (see ``fit_widths``)."""

    def __init__(
        self,
        columns: Sequence[Column],
        rows: Iterable[Sequence[Cell]],
        title: str | Sequence[str] = (),
        notes: Sequence[Text] = (),
    ) -> None:
        """``title``: a line above the table, or phrases that wrap as wholes where they can (an id with its
        label). ``notes``: paragraphs below it, for text too long for a cell (error messages)."""
        self.columns = list(columns)
        self.rows = [list(row) for row in rows]
        self.title = [title] if isinstance(title, str) else list(title)  # phrases
        self.notes = list(notes)

    def naturals(self) -> list[int]:
        """The width each column would like: its widest cell or header, or its declared natural width."""
        widths = []
        for index, column in enumerate(self.columns):
            header = cell_len(column.header) if isinstance(column.header, str) else 0
            cells = max((_cell_width(row[index]) for row in self.rows), default=0)
            widths.append(column.natural if column.natural is not None else max(header, cells))
        return widths

    def table(self, available: int) -> Table:
        """The rich table for ``available`` cells, with fixed column widths and cells that never wrap mid-word."""
        widths = fit_widths(self.columns, self.naturals(), available)
        kept = [(index, width) for index, width in enumerate(widths) if width is not None]
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
        for index, width in kept:
            column = self.columns[index]
            header = column.header if isinstance(column.header, str) else column.header(width)
            table.add_column(header, width=width, no_wrap=not column.wrap, overflow="ellipsis", justify=column.justify)
        for row in self.rows:
            table.add_row(*(_as_text(row[index], width) for index, width in kept))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in word_lines(self.title, options.max_width):
            yield Text(line, style="bold", no_wrap=True, overflow="ignore")
        table = self.table(options.max_width)
        needed = sum(column.width or 0 for column in table.columns) + GAP * (len(table.columns) - 1)
        # Wider than the line only when the columns that must not shrink (ids) need it: the ids stay whole.
        yield from console.render(table, options.update_width(max(options.max_width, needed)))
        for note in self.notes:
            for line in word_lines([note.plain], options.max_width):
                yield Text(line, style=note.style, no_wrap=True, overflow="ignore")


def word_lines(phrases: Sequence[str], width: int) -> list[str]:
    """Phrases joined by spaces into lines of at most ``width`` cells, broken between phrases, or
    between the words of a phrase too long for a line; a word longer than a line (an id) stays whole.

    rich either folds such a word mid-way or, told to leave it alone, stops wrapping altogether.
    """
    lines: list[str] = []
    for phrase in phrases:
        for piece in [phrase] if cell_len(phrase) <= width else phrase.split():
            if lines and cell_len(lines[-1]) + 1 + cell_len(piece) <= width:
                lines[-1] += " " + piece
            else:
                lines.append(piece)
    return lines
