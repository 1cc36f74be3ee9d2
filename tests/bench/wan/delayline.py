#!/usr/bin/python3
"""A userspace WAN delay line between two network namespaces (used when the kernel has no
sch_netem, e.g. minimal VM kernels).

Each namespace has a TUN device (created and addressed by netns.py); this process attaches
to both, reads every IP packet that one side sends and writes it to the other side after
a fixed one-way delay. FIFO per direction with a constant delay: no reordering, no loss.
With --delay-ms D the round-trip time seen by TCP is 2*D (same as `netem delay D` on both
ends of a veth pair).

  delayline.py --a NS_A:DEV_A --b NS_B:DEV_B --delay-ms D

Runs until SIGTERM/SIGINT. Timing precision: the select() wake-up, ~0.1 ms.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import os
import select
import signal
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def setns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def attach(ns: str, dev: str) -> int:
    """Attaches to the (persistent) TUN device |dev| of namespace |ns|."""
    setns(ns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def run(fd_a: int, fd_b: int, delay_s: float) -> None:
    stop = False

    def on_signal(_sig, _frm):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    peer = {fd_a: fd_b, fd_b: fd_a}
    queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, out_fd, packet)
    seq = 0
    while not stop:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, pkt = heapq.heappop(queue)
            try:
                os.write(out, pkt)
            except OSError:
                pass  # the device went away (teardown) or a transient error: drop
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.5
        try:
            ready, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            while True:
                try:
                    pkt = os.read(fd, 65535)
                except BlockingIOError:
                    break
                except OSError:
                    return
                if not pkt:
                    break
                seq += 1
                heapq.heappush(queue, (now + delay_s, seq, peer[fd], pkt))


def main() -> int:
    p = argparse.ArgumentParser(description="userspace WAN delay line between two namespaces' TUN devices")
    p.add_argument("--a", required=True, help="NAMESPACE:TUNDEV")
    p.add_argument("--b", required=True, help="NAMESPACE:TUNDEV")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay (RTT = 2x)")
    a = p.parse_args()
    ns_a, dev_a = a.a.split(":", 1)
    ns_b, dev_b = a.b.split(":", 1)
    fd_a = attach(ns_a, dev_a)
    fd_b = attach(ns_b, dev_b)
    print("ready", flush=True)
    run(fd_a, fd_b, a.delay_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
