from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from vgen.cli import main


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def vgen_cli(capsys):
    """Run `vgen ARGS...` in-process through the real entry point (error handling and exit codes)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        sys.stdout.flush()
        return CliResult(code, out, err)

    return run
