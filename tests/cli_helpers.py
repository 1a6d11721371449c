"""Shared helpers for tests that drive the CLI in-process: run a command, expect a clean
refusal (exit 2, one line, no traceback), and turn a hang into a failure without timing."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from glmc.cli import main


def run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`glmc ARGV` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expect_bad_input(argv: list[object], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """`glmc ARGV` must exit 2 with one stderr line, no traceback, holding every needle."""
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@contextmanager
def hang_guard(seconds: int, what: str = "the input made glmc hang") -> Iterator[None]:
    """Raise TimeoutError in the block after `seconds` (SIGALRM): a hang fails the test instead of
    stalling the suite. The bound is far above any case's run time, so it asserts no speed."""

    def fire(_sig: int, _frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: {what}")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
