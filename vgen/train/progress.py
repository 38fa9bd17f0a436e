"""What a run shows and records while it trains: the progress line and metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vgen.ui import console


class MetricsFile:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TrainProgress:
    """Rich live progress in steps with the losses (and a family's other logged scalars) and
    images/s (main process only)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled, self.start, self.total = enabled, start, total

    @staticmethod
    def _scalars(row: dict) -> str:
        return "  ".join(f"{key} {value:.4f}" for key, value in row.items())

    def __enter__(self):
        if not self.enabled:
            return lambda *a: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[scalars]}  {task.fields[rate]:,.0f} img/s"),
                            TextColumn("eta"), TimeRemainingColumn(), console=console)
        if not console.is_terminal:  # a log file: a plain line every 30 s instead of a live bar
            last = [0.0]

            def log_line(step, row, rate):
                if time.monotonic() - last[0] >= 30 or step == self.total:
                    last[0] = time.monotonic()
                    console.print(f"step {step}/{self.total}  {self._scalars(row)}  {rate:,.0f} img/s", highlight=False)
            return log_line
        self.bar.__enter__()
        task = self.bar.add_task("train", total=self.total, completed=self.start, scalars="", rate=0.0)
        return lambda step, row, rate: self.bar.update(task, completed=step, scalars=self._scalars(row), rate=rate)

    def __exit__(self, *exc):
        if self.enabled and console.is_terminal:
            self.bar.__exit__(*exc)
