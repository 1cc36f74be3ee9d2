"""Where a Transmit's microseconds go, hop by hop (core-bench's `profile` part).

With every process of both paths on one CPU (core-bench's one-cpu placement), a request and its
answer are one serial chain: the wall time of a call is the CPU time each process spends on it
plus what the CPU spends on nobody (idle while the card emulator's timer or a socket wakes up).
So a profile of CPU per process and per call *is* the per-hop breakdown:

  * `perf record -e cpu-clock -c PERIOD` on every process of the chain (client, shim, desk agent,
    desk pcscd, card emulator): a sample each PERIOD ns of CPU a process uses, tagged with the
    process and the object it was running (kernel, the program's own code, libprotobuf, libc,
    libstdc++, libpcsclite, libspdlog/libfmt, ...);
  * samples x PERIOD / calls = microseconds of CPU per call, per process and object;
  * wall per call - the sum = time on no process of the chain (idle, or other work).

The direct side (client -> desk pcscd -> card) and the bridged side (client -> shim -> unix
link -> desk agent -> desk pcscd -> card) are profiled alike, one after the other, with the
same processes pinned to the same CPU. perf's own cost (a sample handler every PERIOD) is in
both sides alike.
"""
from __future__ import annotations

import os
import re
import signal
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PERF = shutil.which("perf")

# Objects, grouped as a reader of the table thinks of them.
GROUPS = [
    (re.compile(r"^\[kernel|^\[vdso|vmlinux"), "kernel"),
    (re.compile(r"libprotobuf"), "libprotobuf"),
    (re.compile(r"libspdlog|libfmt"), "spdlog/fmt"),
    (re.compile(r"libpcsclite"), "libpcsclite"),
    (re.compile(r"libstdc\+\+|libgcc_s"), "libstdc++"),
    (re.compile(r"libc\.so|libc-|ld-linux|libm\.so|libpthread"), "libc"),
    (re.compile(r"libssl|libcrypto"), "openssl"),
    (re.compile(r"python|\.cpython-|libpython"), "python"),
    (re.compile(r"libifdvpcd"), "vpcd driver"),
]


def unavailable() -> Optional[str]:
    if not PERF:
        return "perf is not installed (linux-perf)"
    r = subprocess.run([PERF, "record", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return f"perf record does not work here: {r.stderr.strip()[-300:]}"
    return None


def group_of(dso: str, own: Dict[str, str]) -> str:
    base = os.path.basename(dso.strip("()"))
    for exe, name in own.items():
        if base == exe:
            return name
    for rx, name in GROUPS:
        if rx.search(dso):
            return name
    return "other" if dso not in ("[unknown]", "") else "unknown"


class Recording:
    """perf record on `pids` (every thread) until stop()."""

    def __init__(self, pids: Sequence[int], out: Path, period_ns: int):
        self.out = out
        self.period_ns = period_ns
        self.p = subprocess.Popen([PERF, "record", "-q", "-e", "cpu-clock", "-c", str(period_ns), "-o", str(out),
                                   "-p", ",".join(str(p) for p in pids)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)  # perf attaches to every thread before the measured calls start

    def stop(self) -> None:
        self.p.send_signal(signal.SIGINT)
        try:
            _, err = self.p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
            raise SystemExit("perf record did not stop")
        if not self.out.exists():
            raise SystemExit(f"perf record wrote nothing: {err[-500:]}")

    def samples(self) -> List[tuple]:
        """(pid, comm, dso, symbol) of every sample."""
        r = subprocess.run([PERF, "script", "-i", str(self.out), "-F", "pid,comm,ip,sym,dso"], capture_output=True,
                           text=True, timeout=300)
        out = []
        line_rx = re.compile(r"^\s*(.+?)\s+(\d+)\s+([0-9a-f]+)\s+(.*?)\s*\((.*)\)\s*$")
        for line in r.stdout.splitlines():
            m = line_rx.match(line)
            if m:
                out.append((int(m.group(2)), m.group(1), m.group(5), m.group(4)))
        return out


def breakdown(samples: List[tuple], roles: Dict[int, str], own: Dict[str, str], period_ns: int, calls: int,
              top: int = 6) -> dict:
    """Microseconds of CPU per call: per role, per object group, and the role's top symbols."""
    per = defaultdict(lambda: defaultdict(int))
    syms = defaultdict(lambda: defaultdict(int))
    for pid, _comm, dso, sym in samples:
        role = roles.get(pid)
        if role is None:
            continue
        g = group_of(dso, own)
        per[role][g] += 1
        syms[role][f"{g}: {sym or '?'}"] += 1
    us = period_ns / 1000 / max(1, calls)
    out = {}
    for role, groups in per.items():
        total = sum(groups.values())
        out[role] = {
            "us_per_call": round(total * us, 1),
            "by_object": {g: round(n * us, 1) for g, n in sorted(groups.items(), key=lambda x: -x[1])},
            "top_symbols": [{"symbol": s, "us_per_call": round(n * us, 1)}
                            for s, n in sorted(syms[role].items(), key=lambda x: -x[1])[:top]],
        }
    return out
