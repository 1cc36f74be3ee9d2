"""What a client thread is blocked in, read from the kernel: the event a test waits for instead of
sleeping and hoping a call "has had time" to block.

A PC/SC call made through libpcsclite 1.9.9 is in one of these states while it has not returned
(winscard_clnt.c / winscard_msg.c @1.9.9):

  * "wait"  poll(fd, 1, T) with T >= 0 (MessageReceiveTimeout): SCardGetStatusChange waiting for
            the daemon's event signal. The context is then cancellable (the client sets
            `cancellable` right before this poll), so SCardCancel from another thread reaches the
            daemon.
  * "reply" poll(fd, 1, -1) for POLLIN (MessageReceive): the request was sent and the daemon has
            not answered yet (pcscd blocking a Connect behind a transaction, a Transmit the card
            has not answered, ...).
  * "retry" nanosleep (SYS_USleep(PCSCLITE_LOCK_POLL_RATE)): the daemon answered
            SCARD_E_SHARING_VIOLATION and the client sleeps 100 ms before asking again
            (BeginTransaction, Transmit, Status, Reconnect without PCSCLITE_NO_BLOCKING).

/proc/<pid>/task/<tid>/syscall shows the system call a blocked thread is in and its arguments;
the pollfd's `events` field is read from /proc/<pid>/mem (root, or the same user with ptrace
rights: the tests run as root).
"""
from __future__ import annotations

import struct
from typing import Optional, Tuple

# x86-64 system call numbers
SYS_POLL, SYS_PPOLL = 7, 271
SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP = 35, 230
POLLIN, POLLOUT = 0x1, 0x4


def syscall(pid: int, tid: int) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """(number, args) of the system call thread tid of pid is blocked in; None if it is running
    (or gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or fields[0] == "running" or fields[0] == "-1":
        return None
    return int(fields[0]), tuple(int(x, 16) for x in fields[1:7])


def _pollfd(pid: int, addr: int) -> Optional[Tuple[int, int]]:
    """(fd, events) of the first struct pollfd at addr in pid's memory."""
    try:
        with open(f"/proc/{pid}/mem", "rb") as m:
            m.seek(addr)
            data = m.read(8)
    except (OSError, ValueError, OverflowError):
        return None
    if len(data) != 8:
        return None
    fd, events, _ = struct.unpack("<ihh", data)
    return fd, events


def state(pid: int, tid: int) -> Optional[str]:
    """"wait", "reply", "retry", another system call's number as a string, or None (running)."""
    sc = syscall(pid, tid)
    if sc is None:
        return None
    nr, args = sc
    if nr in (SYS_POLL, SYS_PPOLL):
        pfd = _pollfd(pid, args[0])
        if pfd is None or not pfd[1] & POLLIN:
            return "poll-out"
        infinite = (args[2] & 0xFFFFFFFF) == 0xFFFFFFFF if nr == SYS_POLL else args[2] == 0  # ppoll: NULL timespec
        return "reply" if infinite else "wait"
    if nr in (SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP):
        return "retry"
    return str(nr)
