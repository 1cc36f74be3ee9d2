"""Deadline-based waiting helpers (no fixed sleeps)."""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


# A hang guard: how long a test waits for an event that must come before it concludes that
# something hangs. It is not a performance bound (those are measured by the benchmarks), so it
# is generous: a loaded 2-core CI machine must never reach it. CARDBRIDGE_HANG_GUARD overrides it.
HANG_GUARD_S = float(os.environ.get("CARDBRIDGE_HANG_GUARD", "60"))


class HarnessError(RuntimeError):
    """Something in the emulated environment did not behave as expected."""


class HarnessTimeout(HarnessError, TimeoutError):
    """A wait_until() deadline expired."""


class Deadline:
    """A monotonic deadline: Deadline(2.0).remaining(), .expired()."""

    def __init__(self, timeout: float):
        self.timeout = float(timeout)
        self.end = time.monotonic() + self.timeout

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def wait_until(
    pred: Callable[[], T],
    timeout: float = 5.0,
    *,
    interval: float = 0.01,
    max_interval: float = 0.1,
    desc: Optional[str] = None,
    details: Optional[Callable[[], str]] = None,
    abort: Optional[Callable[[], Optional[str]]] = None,
) -> T:
    """Poll pred() until it returns a truthy value; return that value.

    The poll interval starts at `interval` and grows geometrically up to
    `max_interval`, so fast conditions are seen quickly and slow ones do not
    burn CPU.  Exceptions raised by pred() count as "not yet" (the last one is
    reported on timeout).  If `abort` is given it is called on every round; a
    non-None return (a reason string) stops the wait immediately with
    HarnessError - use it to bail out when a process the condition depends on
    has died.  On timeout HarnessTimeout is raised; its message contains
    `desc` and, if given, the text returned by `details()` (e.g. a log tail).
    """
    deadline = Deadline(timeout)
    delay = interval
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = pred()
            if value:
                return value
            last_exc = None
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if abort is not None:
            reason = abort()
            if reason is not None:
                raise HarnessError(_msg(f"gave up waiting for {desc or pred!r}: {reason}", last_exc, details))
        if deadline.expired():
            raise HarnessTimeout(_msg(f"timed out after {timeout:.1f}s waiting for {desc or pred!r}", last_exc, details))
        time.sleep(min(delay, max(deadline.remaining(), 0.001)))
        delay = min(delay * 1.5, max_interval)


def _msg(head: str, exc: Optional[BaseException], details: Optional[Callable[[], str]]) -> str:
    parts = [head]
    if exc is not None:
        parts.append(f"last error from the condition: {type(exc).__name__}: {exc}")
    if details is not None:
        try:
            d = details()
        except Exception as e:  # noqa: BLE001
            d = f"(could not collect details: {e})"
        if d:
            parts.append(d)
    return "\n".join(parts)
