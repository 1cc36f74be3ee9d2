"""A desk link with a fault switch: a byte relay between a shim's desk link and a desk agent,
run as a process of its own so that a test can stall it (SIGSTOP: the link stays open, nothing
moves either way, as a network cut or a suspended client looks to both ends), resume it
(SIGCONT), cut it (stop: both ends see the connection close) or slow it down (a one-way delay,
in order: a link of round-trip time 2 x delay; slow()/fast() switch between --delay-ms and
--slow-delay-ms for the bytes that arrive from then on).

    relay = LinkRelay(listen="/tmp/x/relay.sock", upstream="/tmp/x/agent.sock", delay_ms=500,
                      log_path=Path("/tmp/x/relay.log")).start()
    shim --desk unix:/tmp/x/relay.sock
    relay.stall(); relay.resume(); relay.stop()

Unix sockets at both ends (the desk link's authentication is the peer's uid: the relay runs as
the test's user, like the agent). CLI (what LinkRelay runs):

    python3 -m cbharness.linkrelay --listen PATH --upstream PATH [--delay-ms D] [--slow-delay-ms D2]

It prints "READY" once it listens, and "CONN n" / "EOF n side" lines as connections come and go.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .procs import Proc
from .waiting import HANG_GUARD_S, wait_until

_HERE = Path(__file__).resolve().parent


class LinkRelay:
    """The relay process (a Proc): start(), stall(), resume(), stop(), connections()."""

    def __init__(self, listen: str, upstream: str, log_path: Path, delay_ms: float = 0.0, name: str = "relay",
                 slow_delay_ms: float = 0.0):
        self.listen, self.upstream, self.delay_ms, self.slow_delay_ms = listen, upstream, delay_ms, slow_delay_ms
        self.log_path, self.name = Path(log_path), name
        self.proc: Optional[Proc] = None

    def start(self) -> "LinkRelay":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "LD_PRELOAD"))}
        env["PYTHONPATH"] = str(_HERE.parent)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = Proc([sys.executable, "-m", "cbharness.linkrelay", "--listen", self.listen, "--upstream",
                          self.upstream, "--delay-ms", f"{self.delay_ms:g}", "--slow-delay-ms",
                          f"{self.slow_delay_ms:g}"], name=self.name,
                         log_path=self.log_path, env=env).start()
        proc = self.proc
        wait_until(lambda: "READY" in proc.log_text(), timeout=HANG_GUARD_S, desc="the link relay to listen",
                   abort=lambda: None if proc.alive() else proc.exit_description(),
                   details=lambda: proc.failure_report(20))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stall(self) -> None:
        """Nothing moves either way from now on; both connections stay open."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def slow(self) -> None:
        """Bytes arriving from now on wait --slow-delay-ms (the relay says "SLOW" when it is)."""
        n = self.proc.log_text().count("SLOW")
        os.kill(self.pid, signal.SIGUSR1)
        wait_until(lambda: self.proc.log_text().count("SLOW") > n, timeout=HANG_GUARD_S, desc="the relay slowed")

    def fast(self) -> None:
        """Bytes arriving from now on wait --delay-ms again."""
        n = self.proc.log_text().count("FAST")
        os.kill(self.pid, signal.SIGUSR2)
        wait_until(lambda: self.proc.log_text().count("FAST") > n, timeout=HANG_GUARD_S, desc="the relay sped up")

    def connections(self) -> int:
        """Connections the relay has accepted so far."""
        return self.proc.log_text().count("CONN ") if self.proc else 0

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            except ProcessLookupError:
                pass
            self.proc.stop(grace=2)


# ------------------------------------------------------------------------------------------
# the relay process

_DELAY = {"now": 0.0, "base": 0.0, "slow": 0.0}  # seconds; "now" is what arriving bytes wait


def _pump(src: socket.socket, dst: socket.socket, tag: str, done: threading.Event) -> None:
    """Copies src -> dst, each chunk the current delay after it arrived, in order; EOF is passed on."""
    q: list = []
    cv = threading.Condition()
    seq = [0]
    last = [0.0]

    def reader() -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with cv:
                seq[0] += 1
                # (in order even when the delay shrinks: never before the chunk ahead of it)
                due = max(time.monotonic() + _DELAY["now"], q[-1][0] if q else 0.0, last[0])
                last[0] = due
                q.append((due, seq[0], data))
                cv.notify()
            if not data:
                return

    def writer() -> None:
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, _, data = q[0]
                left = due - time.monotonic()
                if left > 0:
                    cv.wait(left)
                    continue
                q.pop(0)
            try:
                if not data:
                    print(f"EOF {tag}", flush=True)
                    dst.shutdown(socket.SHUT_WR)
                    break
                dst.sendall(data)
            except OSError:
                print(f"EOF {tag} (write failed)", flush=True)
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


def _serve(listen: str, upstream: str) -> None:
    try:
        os.unlink(listen)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(listen)
    finally:
        os.umask(old)
    srv.listen(16)
    print("READY", flush=True)
    n = 0
    while True:
        a, _ = srv.accept()
        n += 1
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            b.connect(upstream)
        except OSError as e:
            print(f"CONN {n} upstream refused: {e}", flush=True)
            a.close()
            b.close()
            continue
        print(f"CONN {n}", flush=True)
        d1, d2 = threading.Event(), threading.Event()
        _pump(a, b, f"{n} shim->desk", d1)
        _pump(b, a, f"{n} desk->shim", d2)

        def closer(a=a, b=b, d1=d1, d2=d2) -> None:
            d1.wait()
            d2.wait()
            a.close()
            b.close()

        threading.Thread(target=closer, daemon=True).start()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--slow-delay-ms", type=float, default=0.0)
    a = p.parse_args(argv)
    _DELAY.update(now=a.delay_ms / 1000.0, base=a.delay_ms / 1000.0, slow=a.slow_delay_ms / 1000.0)

    def switch(which: str):
        def handler(*_):
            _DELAY["now"] = _DELAY[which]
            print("SLOW" if which == "slow" else "FAST", flush=True)
        return handler

    signal.signal(signal.SIGUSR1, switch("slow"))
    signal.signal(signal.SIGUSR2, switch("base"))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    _serve(a.listen, a.upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
