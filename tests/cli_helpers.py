"""Shared by the CLI-level tests: the example image and the one-line-error check."""

from __future__ import annotations

from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"


def one_line_error(capsys, code: int) -> str:
    """A failed command: non-zero exit, exactly one line on stderr, no traceback. Returns the line."""
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]
