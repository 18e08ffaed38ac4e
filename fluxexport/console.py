"""Terminal output shared by the commands: quiet libraries, warnings, tables, progress bars."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advice: our own output says what happens."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch.export.*")
    # torch.onnx notes that two inputs share an axis (B, N, L are shared on purpose)
    warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints.*")
    for name in (
        "diffusers",
        "transformers",
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "onnxscript",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def warn(message: str) -> None:
    console.print(f"[yellow]Warning:[/yellow] {message}", highlight=False)


@contextmanager
def step_progress(description: str, total: int) -> Iterator:
    """A progress bar; yields `advance(done, total)` for runtime callbacks (the callback's total wins)."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False, disable=not console.is_terminal and os.environ.get("CI") == "true",
    )  # fmt: skip
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda done, new_total: progress.update(task, completed=done, total=new_total)


@contextmanager
def byte_progress() -> Iterator:
    """One bar per label that moves with bytes written, with the rate; yields `update(label, done, total)`."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False), TransferSpeedColumn(),
        TimeElapsedColumn(), console=console, transient=False,
        disable=not console.is_terminal and os.environ.get("CI") == "true",
    )  # fmt: skip
    tasks: dict[str, int] = {}
    with progress:

        def update(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=total)
            progress.update(tasks[label], completed=done, total=total)

        yield update


NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?(×|%| dB)?$")


def _is_number(cell: str) -> bool:
    return bool(NUMBER.match(Text.from_markup(cell).plain.strip()))


def _constant_columns(columns: list[str], rows: list[list[str]]) -> list[int]:
    """Named columns (not the first) holding one value in every row of two or more, words before numbers: these
    can be said once, in the title."""
    if len(rows) < 2:
        return []
    constant = [index for index, name in enumerate(columns)
                if index and name and all(index < len(row) for row in rows) and len({row[index] for row in rows}) == 1]  # fmt: skip
    return sorted(constant, key=lambda index: _is_number(rows[0][index]))


def _measure(table: Table) -> Measurement:
    """The narrowest a table can be without cutting a no-wrap column, and its width when nothing wraps."""
    return Measurement.get(console, console.options.update_width(10_000), table)


def _build(title: str, columns: list[str], rows: list[list[str]], names_whole: bool = True) -> Table:
    result = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        cells = [row[index] for row in rows if index < len(row)]  # a last row may be shorter
        plain = [Text.from_markup(cell).plain for cell in cells]
        if index == 0:  # the row's name: never cut
            result.add_column(column, justify="left", no_wrap=True)
        elif cells and all(_is_number(cell) for cell in cells):  # numbers are never cut, nor wrapped
            result.add_column(column, justify="right", no_wrap=True)
        elif names_whole and all(" " not in cell for cell in plain):  # names (text_embeddings): whole if they fit
            result.add_column(column, justify="left", no_wrap=True)
        else:  # words wrap at spaces, long names fold: nothing is cut to "…"
            result.add_column(column, justify="left", overflow="fold")
    for row in rows:
        result.add_row(*row)
    return result


def table(title: str, columns: list[str], rows: list[list[str]], width: int | None = None) -> Table:
    """A table that stays readable at `width` (default: the console's, 80 in a log): numbers right-aligned and
    never cut, text wrapped or folded, and, when it does not fit, columns with one value in every row moved
    into the title."""
    width = width or console.width
    heading, kept = title, list(range(len(columns)))
    said: list[int] = []
    for index in _constant_columns(columns, rows):
        if (
            _measure(
                _build(heading, [columns[i] for i in kept], [[row[i] for i in kept if i < len(row)] for row in rows])
            ).maximum
            <= width
        ):
            break
        said.append(index)
        kept = [i for i in range(len(columns)) if i not in said]
        heading = f"{title} · " + ", ".join(f"{columns[i]} {rows[0][i]}" for i in said)
    kept_columns, kept_rows = [columns[i] for i in kept], [[row[i] for i in kept if i < len(row)] for row in rows]
    result = _build(heading, kept_columns, kept_rows)
    if _measure(result).minimum > width:  # names that do not fit whole fold rather than being cut
        result = _build(heading, kept_columns, kept_rows, names_whole=False)
    return result
