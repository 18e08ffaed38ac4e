"""Terminal output shared by the commands: quiet libraries, warnings, tables, progress bars."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
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


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    result = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        result.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        result.add_row(*row)
    return result
