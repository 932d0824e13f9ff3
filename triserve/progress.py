"""Progress bars for long one-off steps (converting a GGUF model, unpacking an env).

Drawn with rich on the server's stderr when it is a terminal; in a log file (a
service, the tests) nothing is drawn and the steps' own log lines tell the story.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)


def _shown() -> bool:
    return sys.stderr.isatty()


def _console() -> Console:
    return Console(file=sys.stderr)


@contextlib.contextmanager
def steps(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar over ``total`` steps; yields ``done(text)``, to call as each step ends."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TaskProgressColumn(), TimeElapsedColumn(),
                        console=_console(), disable=not _shown())
    with progress:
        task = progress.add_task(description, total=total)

        def done(text: str) -> None:
            progress.update(task, advance=1, description=f"{description}: {text}")

        yield done


@contextlib.contextmanager
def reading(path: Path, description: str) -> Iterator[BinaryIO]:
    """``path`` opened for reading, with a bar of the bytes read so far."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(),
                        console=_console(), disable=not _shown())
    with progress:
        with progress.open(path, "rb", description=description) as file:
            yield file
