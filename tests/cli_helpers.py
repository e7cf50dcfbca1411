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


def count_bindings(pipe, image, prompt: str, new_tokens: int) -> list[int]:
    """The IO-binding calls each decoder segment makes in one generation of `new_tokens` tokens
    (after a first generation that sizes the caches)."""
    pipe.generate(image, prompt, max_new_tokens=new_tokens, ignore_eos=True)
    calls = [[] for _ in pipe.decoders]
    for runner, seen in zip(pipe.decoders, calls):
        for binding in (runner._step_binding, runner._token_binding):
            for method in ("bind_input", "bind_cpu_input", "bind_output", "bind_ortvalue_input"):
                real = getattr(binding, method)
                setattr(binding, method, lambda *a, _real=real, _seen=seen, **k: (_seen.append(1), _real(*a, **k))[1])
    r = pipe.generate(image, prompt, max_new_tokens=new_tokens, ignore_eos=True)
    assert len(r.token_ids) == new_tokens
    return [len(seen) for seen in calls]
