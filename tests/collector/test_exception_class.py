"""``events.exception_class``: the class an exception's repr names, as celery sends it (the
Retry forms are what a real worker's task-retried carries: tests/api/test_failures.py)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.events import MAX_EXCEPTION_CLASS, exception_class


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ValueError('boom')", "ValueError"),
        ("TimeLimitExceeded(60,)", "TimeLimitExceeded"),
        ("WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)')", "WorkerLostError"),
        ("<MyError: boom>", "MyError"),
        ("pkg.errors.Timeout: late", "pkg.errors.Timeout"),
        ("KeyError", "KeyError"),
        ('  OSError(2, "x")', "OSError"),
        ("Retry in 5s: ValueError('x')", "Retry"),
        ("None", None),
        # a task-retried's exception is celery's Retry: its cause, when it has one
        ("Retry(Retry(...), RuntimeError('attempt 0'), 0.2)", "RuntimeError"),
        ("Retry(None, pkg.Busy('x'), 5)", "pkg.Busy"),
        ("Retry('later', KeyError('k'), None)", "KeyError"),
        ("Retry(Retry(...), None, 0.2)", "Retry"),
        ("Retry('later')", "Retry"),
        ("Retry()", "Retry"),
        ("", None),
        ("123", None),
        ("ValueError!('x')", None),
        ("É('x')", None),
        ("x" * (MAX_EXCEPTION_CLASS + 1) + "()", None),
        (None, None),
        (5, None),
        (["ValueError"], None),
    ],
)
def test_exception_class(text: Any, expected: str | None) -> None:
    assert exception_class(text) == expected
