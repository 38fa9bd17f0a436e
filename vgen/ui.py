"""Terminal output shared by the stages: one stderr console, progress bars with a rate column.

Human output goes to stderr so that stdout stays free for machine-readable output (`--json`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)  # no hard wraps: paths in messages stay copyable

# C0/C1 control characters other than newline and tab: rich passes ESC through, so a file name or
# prompt could otherwise move the cursor, recolour or retitle the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """Untrusted text (paths, prompts, captions) for the terminal: control characters are shown as
    escapes (\\x1b), never sent raw."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def say(message: object, style: str | None = None) -> None:
    """Print a message of ours that may hold untrusted text: no markup is interpreted in it and no
    control character reaches the terminal."""
    from rich.text import Text

    console.print(Text(printable(message), style=style or ""), highlight=False)


def warn(message: object) -> None:
    say(f"warning: {message}", style="yellow")


class RateColumn(ProgressColumn):
    """Items per second, e.g. '1,234 img/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields `advance(n)`."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def metric_table(metrics: dict[str, dict]):
    """The evaluation's metrics as a rich Table: value, N, extractor, reference."""
    from rich.table import Table

    from rich.text import Text

    def cell(value: object) -> Text:  # reasons and ids hold paths and exception texts: no markup
        return Text(printable(value))

    table = Table(title="evaluation", title_justify="left")
    for column in ("metric", "value", "N", "extractor", "reference"):
        table.add_column(column, justify="right" if column in ("value", "N") else "left", overflow="fold")
    for name, result in metrics.items():
        if "unavailable" in result:
            table.add_row(cell(name), Text("unavailable", style="yellow"), "", cell(result["unavailable"]), "")
            continue
        value = result["value"]
        if isinstance(value, dict):
            text = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in value.items() if v is not None)
        else:
            text = f"{value:.4g}"
        reference = result.get("reference")
        if isinstance(reference, dict):
            reference = f"{reference.get('split')} (N={reference.get('n')})"
        table.add_row(cell(name), cell(text), cell(result.get("n_generated", result.get("n", ""))),
                      cell(result.get("extractor_id") or ""), cell(reference or ""))
    return table


def json_safe(value: Any) -> Any:
    """NaN and infinity (a skipped step's gradient norm) as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def print_json(summary: Any) -> None:
    """The --json summary: alone on stdout (everything else vgen prints goes to stderr)."""
    print(json.dumps(json_safe(summary), indent=2, ensure_ascii=False, allow_nan=False, default=str))


def finite_float(text: str) -> float:
    """Parser of every float option: click's FLOAT takes nan and inf, and a range check lets nan
    through (every comparison with it is false)."""
    import typer

    try:
        number = float(text)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise typer.BadParameter(f"{text!r} is not a finite number")
    return number
