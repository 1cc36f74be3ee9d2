"""Free TCP port blocks for vpcd, safe against concurrent harness instances.

A candidate block [base, base+n) is taken only if
  * an flock()ed lock file per port can be acquired (serialises harness
    instances in this and in other processes, e.g. pytest-xdist workers), and
  * every port can be bound on 0.0.0.0 right now (vpcd listens on INADDR_ANY;
    vicc connects to 127.0.0.1).
With hold=True (what the emulated desk uses) the ports are not merely checked:
the block keeps a listening socket bound on each port until release(), and
pcscd gets those very sockets (inherited; the preload's bind() hands them to
vpcd): a port is never released and bound again, so nothing can take it in
between. Candidates are drawn from below the kernel's ephemeral range.
The locks are held until release().
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import List, Optional

from .waiting import HarnessError

LOCK_DIR = Path(os.environ.get("CBHARNESS_PORT_LOCK_DIR", Path(tempfile.gettempdir()) / "cbharness-port-locks"))


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except Exception:  # noqa: BLE001
        return 32768, 60999


def _can_bind(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def _listen(port: int) -> Optional[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vpcd does (TIME_WAIT leftovers)
        s.bind(("0.0.0.0", port))
        s.listen(8)
    except OSError:
        s.close()
        return None
    return s


class PortBlock:
    def __init__(self, base: int, count: int, fds: List[int], socks: Optional[List[socket.socket]] = None):
        self.base = base
        self.count = count
        self._fds = fds
        self.sockets: List[socket.socket] = socks or []  # held listening sockets (hold=True)

    @property
    def ports(self) -> List[int]:
        return list(range(self.base, self.base + self.count))

    def held(self) -> dict:
        """{port: listening socket's fd} of a held block."""
        return {s.getsockname()[1]: s.fileno() for s in self.sockets}

    def release(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []
        for fd in self._fds:
            try:
                os.close(fd)  # drops the flock
            except OSError:
                pass
        self._fds = []

    def __del__(self):  # pragma: no cover
        self.release()

    def __repr__(self) -> str:
        return f"<PortBlock {self.base}..{self.base + self.count - 1}>"


def _try_lock(port: int) -> Optional[int]:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(LOCK_DIR, 0o1777)
    except OSError:
        pass
    fd = os.open(LOCK_DIR / f"{port}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def reserve_ports(count: int, *, low: int = 20000, high: Optional[int] = None, attempts: int = 200,
                  hold: bool = False) -> PortBlock:
    """Reserve `count` consecutive free TCP ports (hold: keep each one bound and listening)."""
    if high is None:
        eph_lo, _ = _ephemeral_range()
        high = max(low + 1000, eph_lo - 1)
    rng = random.SystemRandom()
    for _ in range(attempts):
        base = rng.randrange(low, high - count)
        fds: List[int] = []
        ok = True
        for p in range(base, base + count):
            fd = _try_lock(p)
            if fd is None:
                ok = False
                break
            fds.append(fd)
        if ok and hold:
            socks = []
            for p in range(base, base + count):
                s = _listen(p)
                if s is None:
                    break
                socks.append(s)
            if len(socks) == count:
                return PortBlock(base, count, fds, socks)
            for s in socks:
                s.close()
        elif ok and all(_can_bind(p) for p in range(base, base + count)):
            return PortBlock(base, count, fds)
        for fd in fds:
            os.close(fd)
    raise HarnessError(f"could not find {count} consecutive free TCP ports in [{low}, {high})")
