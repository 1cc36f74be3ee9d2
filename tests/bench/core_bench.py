#!/usr/bin/python3
"""CardBridge's hot-path benchmark: ratios against the desk's own pcscd, measured in the same run.

    scripts/core-bench [--parts unix,cached,concurrent,idle,rdp] [--quick] [--out FILE] [options]

Parts (all by default; --parts selects):
  unix        Transmit (GET CHALLENGE on the emulated desk's vicc card): directly on the desk's pcscd
              (the baseline) vs through cardbridge-shim -> unix desk link -> cardbridge-desk; median
              and p99; CPU per Transmit of the desk agent, the desk's pcscd, the shim, vicc and the
              client itself. A third side, in the same rounds, is the floor: the same calls through
              two cb-null-relay processes (program -> relay -> relay -> desk pcscd), the hops of any
              design with a server process and a desk process, with none of the work.
  cached      Status, ListReaders, GetStatusChange(0), Establish+Release: the same comparison (the
              shim answers them without a desk round trip).
  concurrent  SESSIONS sessions transmitting at once (default 20): SESSIONS client processes
              directly on the desk's pcscd vs through SESSIONS shims (one per session, all linked
              to the same desk agent); median and p99 under the same load.
  idle        The desk link while a session sits idle: bytes on the link and wake-ups (voluntary +
              involuntary context switches, every thread) of the shim and of the desk agent over an
              idle window, with no PC/SC program, a program holding a context and a card handle,
              and a program in GetStatusChange(INFINITE).
  rdp         Transmit and Status over a real RDP channel, static and dynamic, and the idle cases
              there (tests/bench/rdp_bench.py, also runnable alone as scripts/rdp-bench).
  profile     (not in the default set) where a Transmit's microseconds go: with every process of both
              paths on one CPU, perf samples give the CPU per call of each process (client, shim, desk
              agent, desk pcscd, card emulator) by object (kernel, own code, libprotobuf, libc, ...)
              and its top symbols; wall minus their sum is time on no process of the chain
              (tests/bench/hop_profile.py). Needs perf.

How the figures are made trustworthy on a small machine that other work shares:
  * clients are `cb-pcsc serve` processes: they set up (context, card handle) and warm up first,
    then run blocks of calls on command, so a measured block holds nothing but the calls;
  * direct and bridged run in alternating blocks (D B D B ..., then B D B D ... in the next round)
    over ROUNDS rounds; a latency figure is the median over rounds of that round's median (or p99),
    a ratio the median over rounds of the round's bridged/direct ratio (min-max over rounds shown):
    drift in the machine's load hits both sides;
  * placement. On this 2-vCPU VM a wake-up across CPUs costs tens of microseconds and depends on
    what else runs there, and where the scheduler puts each process persists for a run: with the
    same build, unpinned ratios ranged 1.0-2.4x from run to run while rounds within a run agreed.
    So each latency comparison runs twice: `one-cpu`, every process of both paths (pcscd, vicc,
    agent, shim, clients) pinned to the same CPU, the one less busy when the comparison starts (each
    hop is a same-CPU context switch; repeats within a few per cent; it serialises the chain, which
    a request/response chain is anyway), and `free`, as the scheduler places them. Targets are
    judged on one-cpu; free is printed beside it. The concurrent part is always free (both CPUs);
  * CPU: /proc/PID/task/*/schedstat (ns, every thread) read before and after each block, so only
    the measured calls count; the client's own CPU is CLOCK_PROCESS_CPUTIME_ID around its block;
    per call = median over rounds;
  * concurrency: all clients start at the same instant and run for the same time; only calls made
    while every client was running count;
  * machine load: /proc/loadavg and the CPU used by processes other than this benchmark's (busy time
    from /proc/stat minus this process tree's) per part, in the JSON; a warning is printed when the
    others used more than --busy-cores cores on average;
  * idle: before the window every thread of the shim and the agent must have been quiet for a
    moment and their timers due within the window must have fired (a timer left by the last call,
    e.g. a liveness deadline, is reported, not counted); at the window's start no thread may sleep
    with a deadline (a timed poll/epoll/futex/sleep, read from /proc/PID/task/TID/syscall: a wake-up
    to come however short the window, so the check does not depend on catching it); then nothing
    may wake them. Wake-ups of the shim while the idle program's libpcsclite re-polls it (it does
    every 60 s inside SCardGetStatusChange(INFINITE), against pcscd alike) are reported apart.

Deterministic checks (they decide the exit status; the CTest quick form core_bench_quick is the
same run, shorter): desk round trips per call (Transmit exactly 1, cached calls 0, counted by the
shim), every answer correct (GET CHALLENGE: 8 bytes + 90 00), in every idle case 0 bytes on the desk
link, no timed wait and 0 wake-ups in the shim and the desk agent, and a positive control showing
that the counters see a call. Wall-clock and CPU targets print PASS/MISS and change the exit status only with
--fail-on-miss.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
from cbharness import EmulatedDesk, Proc, shim_control, wait_until  # noqa: E402

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
CB_PCSC = BUILD / "tests" / "tools" / "cb-pcsc"
DESK = BUILD / "client-plugin" / "cardbridge-desk"
NULL_RELAY = BUILD / "tests" / "tools" / "cb-null-relay"
SHIM = Path(os.environ.get("CARDBRIDGE_SHIM", BUILD / "server-shim" / "cardbridge-shim"))
SYSTEM_PYTHON = "/usr/bin/python3"
GET_CHALLENGE = "0084000008"
HZ = os.sysconf("SC_CLK_TCK")
ALL_CPUS = sorted(os.sched_getaffinity(0))

TRANSMIT = ("transmit", "Transmit (GET CHALLENGE)")
CACHED = [("status", "Status"), ("list", "ListReaders"), ("getstatuschange", "GetStatusChange(0)"),
          ("establish", "Establish+Release")]
IDLE_CASES = [("none", "no PC/SC program"),
              ("context", "program holding a context + card handle"),
              ("gsc", "program in GetStatusChange(INFINITE)")]
PARTS = ["unix", "cached", "concurrent", "idle", "rdp", "profile"]
DEFAULT_PARTS = ["unix", "cached", "concurrent", "idle", "rdp"]
PLACEMENTS = ["one-cpu", "free"]

# Targets of issue 11 (item 6).
LIMITS = {"unix_median": 1.3, "unix_p99": 1.5, "rdp_static_median": 1.4, "rdp_dynamic_median": 1.5,
          "shim_cpu_us": 30.0, "concurrent_median": 2.0, "cached_median": 1.2}

# Idle PC/SC programs (pyscard on the system python). Print "ready" when settled, then block.
HOLDER = r'''
import sys, time
from smartcard import scard as S
rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER); assert rv == 0, hex(rv)
rv, card, proto = S.SCardConnect(hc, sys.argv[1], S.SCARD_SHARE_SHARED, S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1)
assert rv == 0, hex(rv)
rv, resp = S.SCardTransmit(card, proto, [0x00, 0x84, 0x00, 0x00, 0x08]); assert rv == 0, hex(rv)
print("ready", flush=True)
time.sleep(1e6)
'''
WAITER = r'''
import sys
from smartcard import scard as S
rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER); assert rv == 0, hex(rv)
rv, readers = S.SCardListReaders(hc, []); assert rv == 0, hex(rv)
readers = list(readers) + ["\\\\?PnP?\\Notification"]
rv, st = S.SCardGetStatusChange(hc, 0, [(r, S.SCARD_STATE_UNAWARE) for r in readers])
print("ready", flush=True)
rv, st = S.SCardGetStatusChange(hc, 0xFFFFFFFF, [(r, s) for (r, s, a) in st])
print("woke", hex(rv & 0xFFFFFFFF), flush=True)
'''


# ============================================================================ /proc counters
def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _stat_fields(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat from field 3 (state) on; None if the process is gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    return text[text.rindex(")") + 2:].split()


def tasks(pid: int) -> Dict[int, dict]:
    """Every thread of `pid`: its name, CPU time (ns, schedstat) and context switches."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for t in tids:
        sched = _read(f"/proc/{pid}/task/{t}/schedstat")
        status = _read(f"/proc/{pid}/task/{t}/status")
        if sched is None or status is None:
            continue
        v = iv = 0
        name = ""
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                v = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                iv = int(line.split()[1])
            elif line.startswith("Name:"):
                name = line.split(None, 1)[1] if len(line.split()) > 1 else ""
        out[int(t)] = {"name": name, "cpu_ns": int(sched.split()[0]), "switches": v + iv}
    return out


class Meter:
    """CPU time and wake-ups of named groups of processes, every thread, between two samples."""

    def __init__(self, groups: Dict[str, Sequence[int]], threads: Optional[Dict[str, str]] = None):
        """threads: group -> "main" (only each process's main thread) or "others" (all but it)."""
        self.groups = {k: list(v) for k, v in groups.items()}
        self.threads = threads or {}

    def _tasks(self, g: str, pid: int) -> Dict[int, dict]:
        t = tasks(pid)
        which = self.threads.get(g)
        if which:
            t = {tid: v for tid, v in t.items() if (tid == pid) == (which == "main")}
        return t

    def sample(self) -> Dict[str, Dict[int, Dict[int, dict]]]:
        return {g: {pid: self._tasks(g, pid) for pid in pids} for g, pids in self.groups.items()}

    @staticmethod
    def cpu_ns(a, b) -> Dict[str, int]:
        """CPU (ns) per group between samples a and b, over the threads present in both (threads
        started or ended in between are counted by threads_changed)."""
        out = {}
        for g in a:
            total = 0
            for pid, ta in a[g].items():
                tb = b[g].get(pid, {})
                total += sum(tb[t]["cpu_ns"] - x["cpu_ns"] for t, x in ta.items() if t in tb)
            out[g] = total
        return out

    @staticmethod
    def threads_changed(a, b) -> int:
        return sum(len(set(a[g][p]) ^ set(b[g].get(p, {}))) for g in a for p in a[g])

    @staticmethod
    def wakeups(a, b) -> Dict[str, dict]:
        """Context switches per group between a and b; a thread started or ended counts as one."""
        out = {}
        for g in a:
            total, detail, monitor = 0, [], 0
            for pid, ta in a[g].items():
                tb = b[g].get(pid, {})
                for t in sorted(set(ta) | set(tb)):
                    d = tb[t]["switches"] - ta[t]["switches"] if t in ta and t in tb else 1
                    if d and (tb.get(t) or ta.get(t))["name"] == MONITOR_THREAD and t in ta and t in tb:
                        monitor += d  # the desk's reader monitor re-polling pcscd (once a minute): apart
                        continue
                    if d:
                        total += d
                        detail.append({"pid": pid, "tid": t, "name": (tb.get(t) or ta.get(t))["name"], "switches": d,
                                       "thread": "both" if t in ta and t in tb else ("ended" if t in ta else "started")})
            out[g] = {"wakeups": total, "threads": sum(len(ta) for ta in a[g].values()), "detail": detail,
                      "monitor_wakeups": monitor}
        return out


# ============================================================================ placement
def _cpu_busy() -> Dict[int, int]:
    out = {}
    for line in (_read("/proc/stat") or "").splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            f = line.split()
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[1:9])
            out[int(f[0][3:])] = user + nice + system + irq + softirq + steal
    return out


def quietest_cpu(sample_s: float = 0.3) -> int:
    """The CPU (of those we may use) that other work kept least busy over the last moment."""
    a = _cpu_busy()
    time.sleep(sample_s)
    b = _cpu_busy()
    return min(ALL_CPUS, key=lambda c: (b.get(c, 0) - a.get(c, 0), c))


def set_affinity(pids: Sequence[int], cpus: Sequence[int]) -> None:
    """Every thread of every process in `pids` (threads they create later inherit it)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for t in tids:
            try:
                os.sched_setaffinity(int(t), set(cpus))
            except OSError:
                pass


@contextlib.contextmanager
def pinned_to(pids: Sequence[int], cpus: Sequence[int]):
    """Every thread of `pids` on `cpus` for the block, on every CPU again afterwards."""
    set_affinity(pids, cpus)
    try:
        yield
    finally:
        set_affinity(pids, ALL_CPUS)


# ============================================================================ machine load
def _busy_ticks() -> int:
    f = (_read("/proc/stat") or "").splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def _tree_ticks(root: int) -> int:
    """CPU ticks of `root` and its descendants, children already reaped included."""
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = _stat_fields(int(d))
        if f is None:
            continue
        parent[int(d)] = int(f[1])
        ticks[int(d)] = sum(int(x) for x in f[11:15])   # utime stime cutime cstime
    total = 0
    for pid, t in ticks.items():
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += t
    return total


class LoadWatch:
    """Per part: wall time, load average, and the CPU of this benchmark's processes vs the others'."""

    def __init__(self, busy_cores: float):
        self.busy_cores = busy_cores
        self.parts: List[dict] = []
        self._start = None

    def begin(self, name: str) -> None:
        self._start = (name, time.monotonic(), _busy_ticks(), _tree_ticks(os.getpid()), os.getloadavg())

    def end(self) -> dict:
        name, t0, busy0, ours0, la0 = self._start
        wall = time.monotonic() - t0
        busy = (_busy_ticks() - busy0) / HZ
        ours = (_tree_ticks(os.getpid()) - ours0) / HZ
        others = max(0.0, busy - ours)
        rec = {"part": name, "wall_s": round(wall, 2), "loadavg_start": la0, "loadavg_end": os.getloadavg(),
               "busy_cores": round(busy / wall, 2), "bench_cores": round(ours / wall, 2),
               "other_cores": round(others / wall, 2), "busy": others / wall > self.busy_cores}
        self.parts.append(rec)
        return rec

    def warnings(self) -> List[str]:
        """Parts whose timings other work may have skewed (idle counts do not depend on load)."""
        return [f"machine busy during '{p['part']}': other processes used {p['other_cores']:.2f} of "
                f"{len(ALL_CPUS)} cores on average (load average {p['loadavg_start'][0]:.1f} -> "
                f"{p['loadavg_end'][0]:.1f}); its timings are less reliable" for p in self.parts
                if p["busy"] and p["part"] != "idle"]


# ============================================================================ clients and statistics
def client_env(sock: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "PYTHON"))}
    env["PCSCLITE_CSOCK_NAME"] = sock
    return env


class Client:
    """A `cb-pcsc serve` process: set up and warmed up on start, then blocks of calls on command."""

    def __init__(self, sock: str, op: str, reader: str, warmup: int, cpus: Optional[Sequence[int]] = None):
        self.sock = sock
        pin = (lambda: os.sched_setaffinity(0, set(cpus))) if cpus else None
        self.p = subprocess.Popen([str(CB_PCSC), "serve", "--op", op, "--reader", reader, "--apdu", GET_CHALLENGE,
                                   "--warmup", str(warmup)], env=client_env(sock), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                  preexec_fn=pin)
        self.pid = self.p.pid

    def wait_ready(self) -> None:
        line = self.p.stdout.readline()
        ready = json.loads(line) if line.startswith("{") else {"ready": False, "output": line}
        if not ready.get("ready"):
            raise SystemExit(f"cb-pcsc serve on {self.sock} not ready: {ready} {self.p.stderr.read()[-2000:]}")

    def start(self, n: int) -> None:
        self.p.stdin.write(f"run {n}\n")
        self.p.stdin.flush()

    def start_until(self, start_ns: int, end_ns: int) -> None:
        self.p.stdin.write(f"until {start_ns} {end_ns}\n")
        self.p.stdin.flush()

    def result(self) -> dict:
        line = self.p.stdout.readline()
        if not line.startswith("{"):
            raise SystemExit(f"cb-pcsc serve on {self.sock} stopped: {line!r} {self.p.stderr.read()[-2000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.p.stdout.close()
        self.p.stderr.close()


def start_clients(socks: Sequence[str], op: str, reader: str, warmup: int,
                  cpus: Optional[Sequence[int]] = None) -> List[Client]:
    cs = []
    try:
        cs = [Client(s, op, reader, warmup, cpus) for s in socks]
        for c in cs:
            c.wait_ready()
    except BaseException:
        close_all(cs)
        raise
    return cs


def close_all(clients: Sequence[Client]) -> None:
    for c in clients:
        c.close()


def pct(sorted_us: List[float], p: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, int(p * len(sorted_us)))] if sorted_us else float("nan")


def summary(us: List[float]) -> dict:
    s = sorted(us)
    return {"n": len(s), "median_us": round(pct(s, 0.5), 1), "p99_us": round(pct(s, 0.99), 1),
            "mean_us": round(sum(s) / len(s), 1) if s else None, "min_us": round(s[0], 1) if s else None}


def run_block(clients: List[Client], n: int = 0, seconds: float = 0.0) -> dict:
    """All `clients` run at once: n calls each, or (seconds > 0) calls from a common start for
    `seconds`. Returns the durations of the calls made while every client was running (all of
    them with one client), the client-side CPU, failures and the total number of calls."""
    if seconds > 0:
        start = time.monotonic_ns() + 50_000_000 + 2_000_000 * len(clients)
        for c in clients:
            c.start_until(start, start + int(seconds * 1e9))
    else:
        for c in clients:
            c.start(n)
    res = [c.result() for c in clients]
    ran = [r for r in res if r["n"]]
    lo = max(r["t0_ns"] for r in ran) if ran else 0
    hi = min(r["t0_ns"] + r["start_ns"][-1] + r["ns"][-1] for r in ran) if ran else 0
    kept = [d / 1000 for r in ran for s, d in zip(r["start_ns"], r["ns"])
            if r["t0_ns"] + s >= lo and r["t0_ns"] + s + d <= hi]
    return {"us": kept, "calls": sum(r["n"] for r in res), "failures": sum(r["failures"] for r in res),
            "client_cpu_ns": sum(r["cpu_ns"] for r in res), "rv": sorted({r["rv"] for r in res}),
            "per_client_calls": [r["n"] for r in res]}


def interleave(sides: Dict[str, List[Client]], rounds: int, calls: int, block: int, meter: Optional[Meter],
               seconds: float = 0.0) -> dict:
    """Runs the sides (the first is the baseline) in alternating blocks, `block` calls per client, `calls` per client, side
    and round (or, seconds > 0, one block of `seconds` per side and round, the side's clients all
    at once); the side that starts alternates by round. Per round and side: latency median and p99,
    CPU per call of each meter group and of the clients. Per side: medians over rounds."""
    names = list(sides)
    per_round = []
    totals = {s: {"calls": 0, "counted": 0, "failures": 0, "threads_changed": 0, "rv": set(),
                  "min_client_calls_per_block": None} for s in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        us = {s: [] for s in names}
        cpu = {s: {} for s in names}
        calls_r = {s: 0 for s in names}
        sizes = [0] if seconds > 0 else [min(block, calls - done) for done in range(0, calls, block)]
        for n in sizes:
            for s in order:
                a = meter.sample() if meter else None
                res = run_block(sides[s], n, seconds)
                t = totals[s]
                if meter:
                    b = meter.sample()
                    for g, v in Meter.cpu_ns(a, b).items():
                        cpu[s][g] = cpu[s].get(g, 0) + v
                    t["threads_changed"] += Meter.threads_changed(a, b)
                cpu[s]["pcsc_client"] = cpu[s].get("pcsc_client", 0) + res["client_cpu_ns"]
                us[s] += res["us"]
                calls_r[s] += res["calls"]
                t["calls"] += res["calls"]
                t["counted"] += len(res["us"])
                t["failures"] += res["failures"]
                t["rv"].update(res["rv"])
                m = min(res["per_client_calls"])
                t["min_client_calls_per_block"] = m if t["min_client_calls_per_block"] is None else \
                    min(m, t["min_client_calls_per_block"])
        per_round.append({s: dict(summary(us[s]), cpu_us_per_call={g: round(v / 1000 / max(1, calls_r[s]), 2)
                                                                   for g, v in cpu[s].items()}) for s in names})
    med = statistics.median
    base = names[0]
    out = {"rounds": per_round, "sides": {}}
    for s in names:
        t = totals[s]
        groups = per_round[0][s]["cpu_us_per_call"].keys()
        out["sides"][s] = dict(
            median_us=round(med([pr[s]["median_us"] for pr in per_round]), 1),
            p99_us=round(med([pr[s]["p99_us"] for pr in per_round]), 1),
            cpu_us_per_call={g: round(med([pr[s]["cpu_us_per_call"][g] for pr in per_round]), 1) for g in groups},
            **{k: (sorted(v) if isinstance(v, set) else v) for k, v in t.items()})
    out["ratios"] = {}
    for other in names[1:]:
        ratio = {k: [pr[other][k] / pr[base][k] for pr in per_round] for k in ("median_us", "p99_us")}
        out["ratios"][other] = {
            "median": round(med(ratio["median_us"]), 3), "p99": round(med(ratio["p99_us"]), 3),
            "median_range": [round(min(ratio["median_us"]), 3), round(max(ratio["median_us"]), 3)],
            "p99_range": [round(min(ratio["p99_us"]), 3), round(max(ratio["p99_us"]), 3)]}
    # "ratio": the side being judged (bridged), against the baseline
    out["ratio"] = out["ratios"]["bridged" if "bridged" in names else names[1]]
    return out


def compare(direct_sock: str, bridged_sock: str, op: str, reader: str, cfg, meter: Meter, placement: str,
            pinned: Sequence[int], counters: Callable[[], int], between: Optional[Dict[str, str]] = None) -> dict:
    """One interleaved comparison, direct vs bridged (and the `between` sides, name -> socket, e.g. the
    floor), with the given placement: `one-cpu` pins the `pinned` processes and the clients to the
    quietest CPU (and unpins them afterwards). `counters` gives the shim's round-trip count, read
    before and after."""
    cpus = [quietest_cpu()] if placement == "one-cpu" else ALL_CPUS
    sides = {}
    with pinned_to(pinned, cpus):
        try:
            sides["direct"] = start_clients([direct_sock], op, reader, cfg.warmup, cpus)
            for name, sock in (between or {}).items():
                sides[name] = start_clients([sock], op, reader, cfg.warmup, cpus)
            sides["bridged"] = start_clients([bridged_sock], op, reader, cfg.warmup, cpus)
            t0 = counters()
            r = interleave(sides, cfg.rounds, cfg.calls, cfg.block, meter)
            r["round_trips"] = counters() - t0
        finally:
            close_all([c for cs in sides.values() for c in cs])
    r["placement"] = {"name": placement, "cpus": cpus}
    r["round_trips_per_call"] = r["round_trips"] / r["sides"]["bridged"]["calls"]
    return r


# ============================================================================ idle
def start_idle_program(case: str, sock: str, reader: str, tmp: Path) -> Optional[subprocess.Popen]:
    if case == "none":
        return None
    script = tmp / f"idle_{case}.py"
    script.write_text(HOLDER if case == "context" else WAITER)
    prog = subprocess.Popen([SYSTEM_PYTHON, str(script), reader], env=client_env(sock), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = prog.stdout.readline().strip()
    if line != "ready":
        prog.kill()
        raise SystemExit(f"idle PC/SC program ({case}) failed: {line} {prog.stderr.read()}")
    return prog


def stop_idle_program(prog: Optional[subprocess.Popen]) -> None:
    if prog is None:
        return
    prog.kill()
    prog.wait(5)
    prog.stdout.close()
    prog.stderr.close()


def settle(meter: Meter, groups: Sequence[str], quiet_s: float = 0.3, limit_s: float = 10.0) -> bool:
    """Waits until no thread of the `groups` was switched in for `quiet_s` (the tail of what came
    before, e.g. a control-socket query, has finished). False if not quiet by `limit_s` (the
    measured window then shows the activity)."""
    end = time.monotonic() + limit_s
    a = meter.sample()
    while time.monotonic() < end:
        time.sleep(quiet_s)
        b = meter.sample()
        if all(w["wakeups"] == 0 for g, w in Meter.wakeups(a, b).items() if g in groups):
            return True
        a = b
    return False


ASIO_IDLE_TICK_S = 300.0   # asio's epoll reactor arms its timerfd for at most 5 minutes when no timer is due


def timers(pid: int) -> List[dict]:
    """The process's timerfds: time left (it_value, s; 0 = disarmed), interval, expirations."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return out
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[timerfd]":
                continue
        except OSError:
            continue
        t = {"fd": int(fd)}
        for line in (_read(f"/proc/{pid}/fdinfo/{fd}") or "").splitlines():
            k, _, v = line.partition(":")
            if k in ("it_value", "it_interval"):
                sec, nsec = (int(x) for x in v.strip(" ()").split(","))
                t[k] = round(sec + nsec / 1e9, 3)
            elif k == "ticks":
                t["ticks"] = int(v)
        out.append(t)
    return out


def settle_timers(meter: Meter, groups: Sequence[str], window_s: float) -> dict:
    """Waits until no timer of the `groups` is due within the coming window (+1 s): a timer armed
    by what came before (e.g. a deadline left by the last call) fires first; one that keeps
    re-arming itself within the window is given up on after a bound, and the window shows it.
    Returns the timers waited for and those armed when the window starts (asio's reactor re-arms
    for at most ASIO_IDLE_TICK_S: an idle asio process wakes once every 5 minutes)."""
    waited, limit = [], time.monotonic() + window_s + 10
    while True:
        now = [{"group": g, "pid": pid, **t} for g in groups for pid in meter.groups[g] for t in timers(pid)]
        due = [t for t in now if 0 < t.get("it_value", 0) <= window_s + 1.0]
        if not due or time.monotonic() > limit:
            break
        soonest = min(t["it_value"] for t in due)
        waited += [t for t in due if t["it_value"] == soonest]
        time.sleep(soonest + 0.1)
    return {"waited_for": waited, "armed": [t for t in now if t.get("it_value", 0) > 0 or t.get("it_interval", 0) > 0]}


# x86_64 system calls a thread can sleep in, and where their timeout is: ("ms", arg) a timeout in
# ms (negative = none), ("rel", arg) / ("abs", arg) a pointer to a relative / absolute timespec
# (NULL = none), ("always", -) always timed.
_WAITS = {7: ("poll", "ms", 2), 232: ("epoll_wait", "ms", 3), 281: ("epoll_pwait", "ms", 3),
          271: ("ppoll", "rel", 2), 441: ("epoll_pwait2", "rel", 3), 23: ("select", "rel", 4),
          270: ("pselect6", "rel", 4), 128: ("rt_sigtimedwait", "rel", 2), 449: ("futex_waitv", "abs", 3),
          202: ("futex", "futex", 3), 35: ("nanosleep", "always", 0), 230: ("clock_nanosleep", "always", 0)}


def _timespec(pid: int, addr: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(addr)
            sec, nsec = struct.unpack("qq", f.read(16))
        return sec + nsec / 1e9
    except (OSError, struct.error, ValueError, OverflowError):
        return None


def blocked_in(pid: int, tid: int) -> dict:
    """What the thread sleeps in (/proc/PID/task/TID/syscall) and, if it is a timed wait, the
    timeout in seconds (None: no timeout; "?" timed, value unreadable)."""
    text = _read(f"/proc/{pid}/task/{tid}/syscall")
    if text is None:
        return {"syscall": "gone", "timeout_s": None}
    f = text.split()
    if f[0] == "running":
        return {"syscall": "running", "timeout_s": None}
    nr, args = int(f[0]), [int(x, 16) for x in f[1:7]]
    name, kind, i = _WAITS.get(nr, (f"syscall {nr}", None, 0))
    timeout = None
    if kind == "ms":
        v = args[i] & 0xFFFFFFFF
        timeout = None if v >= 2 ** 31 else v / 1000
    elif kind in ("rel", "abs") and args[i]:
        timeout = _timespec(pid, args[i])
        timeout = "?" if timeout is None else timeout
    elif kind == "futex":
        cmd = args[1] & ~(128 | 256)                   # FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME
        if cmd in (0, 9, 11) and args[3]:              # FUTEX_WAIT (relative), WAIT_BITSET, WAIT_REQUEUE_PI (absolute)
            v = _timespec(pid, args[3])
            if v is not None and cmd != 0:
                v -= time.clock_gettime(time.CLOCK_REALTIME if args[1] & 256 else time.CLOCK_MONOTONIC)
            timeout = "?" if v is None else v
    elif kind == "always":
        timeout = "?"
    return {"syscall": name, "timeout_s": round(timeout, 3) if isinstance(timeout, float) else timeout}


MONITOR_THREAD = "cb-monitor"  # the desk's ReaderMonitor (client-plugin/runtime/src/reader_monitor.cpp)


def timed_waits(meter: Meter, groups: Sequence[str]) -> List[dict]:
    """Threads of `groups` sleeping with a deadline: each is a wake-up to come, whatever the window.
    A deadline of ASIO_IDLE_TICK_S or more (asio's idle maximum) is not counted; a thread found
    running is looked at again a few times, then counted."""
    out = []
    for g in groups:
        for pid, ts in meter.sample()[g].items():
            for tid, t in ts.items():
                w = blocked_in(pid, tid)
                for _ in range(5):
                    if w["syscall"] != "running":
                        break
                    time.sleep(0.05)
                    w = blocked_in(pid, tid)
                if w["syscall"] == "running" or (w["timeout_s"] is not None and
                                                 (w["timeout_s"] == "?" or w["timeout_s"] < ASIO_IDLE_TICK_S - 1)):
                    out.append({"group": g, "pid": pid, "tid": tid, "name": t["name"], **w})
    return out


def idle_window(meter: Meter, counters: Callable[[], dict], seconds: float, asserted: Sequence[str],
                timers_of: Optional[Sequence[str]] = None) -> dict:
    """Counters (bytes...) and wake-ups of the meter's processes over an idle window of `seconds`.
    The counters are read before and after (a control-socket query wakes the shim); before the
    window, timers of the `asserted` groups (or of `timers_of`) due within it fire and the asserted
    groups' threads fall quiet, so the window holds nothing but idling. At the window's start the
    threads of every group are looked at for timed waits (a wake-up to come, however long the
    window)."""
    settle(meter, asserted)
    before = counters()
    timer_info = settle_timers(meter, asserted if timers_of is None else timers_of, seconds)
    quiet = settle(meter, asserted)
    waits = timed_waits(meter, list(meter.groups))
    a = meter.sample()
    time.sleep(seconds)
    b = meter.sample()
    after = counters()
    d = {k: after[k] - before[k] for k in before if isinstance(before[k], int) and not isinstance(before[k], bool)}
    d.update(seconds=seconds, settled=quiet, timers=timer_info, timed_waits=waits, wakeups=Meter.wakeups(a, b))
    return d


def idle_checks(where: str, d: dict, link_bytes: int, own: Dict[str, str], induced: Sequence[str]) -> List[dict]:
    """The deterministic checks of one idle window: no byte on the link, no timed wait in the `own`
    groups {group: label}, and no wake-up of them, except wake-ups of the `induced` groups in a
    window where the idle PC/SC program (meter group "program") woke up itself: libpcsclite's own
    re-polling inside SCardGetStatusChange(INFINITE), which wakes a real pcscd alike. Those are
    reported in d["induced"]. (Were the shim to wake the program, the program would return from its
    wait and stop, and the run would stop with it.)"""
    w = d["wakeups"]
    program_woke = w.get("program", {}).get("wakeups", 0)
    counted, d["induced"] = {}, {}
    for g in own:
        if g in induced and program_woke and w[g]["wakeups"]:
            d["induced"][g] = {"wakeups": w[g]["wakeups"], "program_wakeups": program_woke}
            counted[g] = 0
        else:
            counted[g] = w[g]["wakeups"]
    d["own_wakeups"] = sum(counted.values())
    # The desk's reader monitor (thread "cb-monitor") waits in SCardGetStatusChange with a 60 s
    # bound (a missed hot-plug is seen within it; libpcsclite's own INFINITE wait re-polls pcscd
    # every 60 s alike): one local wake-up a minute at the desk, no byte on the link. Reported
    # apart, like the program's own re-polls.
    tw = [x for x in d["timed_waits"] if x["group"] in own and x["name"] != MONITOR_THREAD]
    d["monitor_waits"] = [x for x in d["timed_waits"] if x["group"] in own and x["name"] == MONITOR_THREAD]
    d["own_groups"], d["own_timed_waits"] = list(own), len(tw)
    secs = f"over {d['seconds']:g} s"
    return [check(f"{where}: 0 bytes on the link", link_bytes == 0, f"{link_bytes} bytes {secs}"),
            check(f"{where}: no timed wait in {' or '.join(own.values())}", not tw,
                  timed_waits_text(tw) or "every thread sleeps without a deadline"),
            check(f"{where}: 0 wake-ups of {' or '.join(own.values())}", d["own_wakeups"] == 0,
                  ", ".join(f"{own[g]} {counted[g]} ({w[g]['threads']} threads)" for g in own) + f" {secs}"
                  + "".join(f"; {own[g]}: {v['wakeups']} wake-ups answering the program, which woke "
                            f"{v['program_wakeups']} times itself, not counted" for g, v in d["induced"].items())
                  + wake_detail({g: w[g] for g in own if counted[g]}))]


def timed_waits_text(ws: List[dict], most: int = 3) -> str:
    more = f" and {len(ws) - most} more thread(s) alike" if len(ws) > most else ""
    return "; ".join(timed_wait_text(x) for x in ws[:most]) + more


def timed_wait_text(x: dict) -> str:
    t = x["timeout_s"]
    return f"{x['group']} thread {x['tid']} in {x['syscall']}" + ("" if t is None else
                                                                  f", {'timed' if t == '?' else f'timeout {t:g} s'}")


# ============================================================================ the unix rig
class UnixRig:
    """Emulated desk + cardbridge-desk (unix listener) + shims added on demand."""

    def __init__(self, tmp: Path, log_level: str):
        self.tmp = tmp
        self.log_level = log_level
        self.desk = EmulatedDesk(slots=2, cards=[0]).start()
        self.reader = self.desk.readers[0]
        self.desk_sock = str(tmp / "desk.sock")
        self.agent = Proc([str(DESK), "--listen", "unix:" + self.desk_sock, "--log-level", log_level],
                          env=self.desk.full_env(), name="cardbridge-desk", log_path=str(tmp / "desk.log")).start()
        wait_until(lambda: os.path.exists(self.desk_sock), timeout=10, desc="cardbridge-desk listening",
                   abort=lambda: None if self.agent.alive() else self.agent.exit_description())
        self.shims: List[Proc] = []
        self.shim_socks: List[str] = []
        self.vicc_pid = self.desk.vicc(0).pid
        # The floor: program -> relay -> relay -> desk pcscd, CardBridge's hops without its work.
        self.floor_sock = str(tmp / "floor-a.sock")
        inner = str(tmp / "floor-b.sock")
        self.relays = [Proc([str(NULL_RELAY), "--listen", inner, "--connect", self.desk.socket_path],
                            name="cb-null-relay-desk", log_path=str(tmp / "relay-b.log")).start(),
                       Proc([str(NULL_RELAY), "--listen", self.floor_sock, "--connect", inner],
                            name="cb-null-relay-server", log_path=str(tmp / "relay-a.log")).start()]
        for sock, relay in ((inner, self.relays[0]), (self.floor_sock, self.relays[1])):
            wait_until(lambda: os.path.exists(sock), timeout=10, desc=f"{relay.name} listening",
                       abort=lambda: None if relay.alive() else relay.exit_description())

    def add_shims(self, total: int) -> None:
        new = []
        while len(self.shims) < total:
            i = len(self.shims)
            d = self.tmp / f"s{i}"
            d.mkdir(mode=0o700)
            sock = str(d / "pcscd.comm")
            self.shims.append(Proc([str(SHIM), "--socket", sock, "--desk", "unix:" + self.desk_sock,
                                    "--log-level", self.log_level], name=f"cardbridge-shim-{i}",
                                   log_path=str(d / "shim.log")).start())
            self.shim_socks.append(sock)
            new.append(i)
        for i in new:
            wait_until(lambda: os.path.exists(self.shim_socks[i] + ".ctl") and
                       self.stats(i)["desk_sessions"] >= 1 and self.status(i)["readers"],
                       timeout=20, desc=f"shim {i} linked to the desk with its readers",
                       abort=lambda: None if self.shims[i].alive() else self.shims[i].exit_description())

    def status(self, i: int = 0) -> dict:
        return shim_control(self.shim_socks[i] + ".ctl", {"cmd": "status"})

    def stats(self, i: int = 0) -> dict:
        return self.status(i)["stats"]

    def trips(self, shims: Sequence[int]) -> Dict[str, int]:
        st = [self.stats(i) for i in shims]
        return {k: sum(s[k] for s in st) for k in ("round_trips", "desk_requests", "desk_bytes_in", "desk_bytes_out")}

    def desk_pids(self) -> List[int]:
        return [self.desk.pcscd_pid, self.vicc_pid, self.agent.pid]

    def report(self) -> str:
        return "\n".join(p.failure_report(20) for p in [self.agent, *self.relays, *self.shims])

    def stop(self) -> None:
        for p in reversed(self.shims):
            p.stop(grace=5)
        for p in self.relays:
            p.stop(grace=5)
        self.agent.stop(grace=5)
        self.desk.stop()


# ============================================================================ parts
def check(name: str, ok: bool, detail: str) -> dict:
    return {"check": name, "ok": bool(ok), "detail": detail}


def answers_check(what: str, r: dict) -> dict:
    bad = any(v["failures"] for v in r["sides"].values())
    return check(f"{what}: every answer correct", not bad,
                 ", ".join(f"{s}: {v['calls']} calls, {v['failures']} wrong, rv {'/'.join(v['rv'])}"
                           for s, v in r["sides"].items()))


def trips_check(what: str, r: dict, per_call: int) -> dict:
    calls = r["sides"]["bridged"]["calls"]
    return check(f"{what}: {per_call} desk round trip(s) per call", r["round_trips"] == per_call * calls,
                 f"{r['round_trips']} round trips for {calls} calls")


def part_unix(rig: UnixRig, cfg, checks: List[dict]) -> dict:
    rig.add_shims(1)
    meter = Meter({"pcscd": [rig.desk.pcscd_pid], "vicc": [rig.vicc_pid], "agent": [rig.agent.pid],
                   "shim": [rig.shims[0].pid], "relays": [p.pid for p in rig.relays]})
    out = {}
    for placement in cfg.placements:
        r = compare(rig.desk.socket_path, rig.shim_socks[0], "transmit", rig.reader, cfg, meter, placement,
                    rig.desk_pids() + [rig.shims[0].pid] + [p.pid for p in rig.relays],
                    lambda: rig.trips([0])["round_trips"], between={"floor": rig.floor_sock})
        checks.append(trips_check(f"unix ({placement}): Transmit", r, 1))
        checks.append(answers_check(f"unix ({placement}): Transmit", r))
        out[placement] = r
        print(f"[unix {placement}] Transmit: direct {r['sides']['direct']['median_us']:.0f} us, bridged "
              f"{r['sides']['bridged']['median_us']:.0f} us (median), ratio {r['ratio']['median']:.2f}; floor "
              f"(two null relays) {r['sides']['floor']['median_us']:.0f} us, ratio {r['ratios']['floor']['median']:.2f}",
              flush=True)
    return out


def part_profile(rig: UnixRig, cfg, checks: List[dict]) -> dict:
    """Where a Transmit's microseconds go (tests/bench/hop_profile.py): CPU per call of every
    process of each path, by object, from perf samples, with everything on one CPU."""
    import hop_profile as hp
    why = hp.unavailable()
    if why:
        print(f"[profile] skipped: {why}", flush=True)
        return {"skipped": why}
    rig.add_shims(1)
    cpus = [quietest_cpu()]
    pinned = rig.desk_pids() + [rig.shims[0].pid]
    period_ns = cfg.profile_period_us * 1000
    own = {"cardbridge-shim": "own code", "cardbridge-desk": "own code", "cb-pcsc": "own code", "pcscd": "own code"}
    out = {"cpus": cpus, "calls": cfg.profile_calls, "period_us": cfg.profile_period_us, "sides": {}}
    with pinned_to(pinned, cpus):
        for side, sock in (("direct", rig.desk.socket_path), ("bridged", rig.shim_socks[0])):
            client = start_clients([sock], "transmit", rig.reader, cfg.warmup, cpus)[0]
            roles = {client.pid: "client (cb-pcsc)", rig.desk.pcscd_pid: "desk pcscd",
                     rig.vicc_pid: "card emulator (vicc)"}
            if side == "bridged":
                roles.update({rig.shims[0].pid: "cardbridge-shim", rig.agent.pid: "cardbridge-desk"})
            try:
                rec = hp.Recording(list(roles), rig.tmp / f"perf-{side}.data", period_ns)
                try:
                    res = run_block([client], cfg.profile_calls)
                finally:
                    rec.stop()
            finally:
                close_all([client])
            procs = hp.breakdown(rec.samples(), roles, own, period_ns, res["calls"])
            cpu_sum = round(sum(p["us_per_call"] for p in procs.values()), 1)
            wall = statistics.mean(res["us"]) if res["us"] else 0.0
            out["sides"][side] = {"wall_mean_us": round(wall, 1), "wall_median_us": summary(res["us"])["median_us"],
                                  "calls": res["calls"], "failures": res["failures"], "cpu_sum_us": cpu_sum,
                                  "off_chain_us": round(wall - cpu_sum, 1), "processes": procs}
            checks.append(check(f"profile: {side} Transmits answered", res["failures"] == 0 and res["calls"] > 0,
                                f"{res['calls']} calls, {res['failures']} wrong"))
    print_profile(out)
    return out


def print_profile(p: dict) -> None:
    d, b = p["sides"]["direct"], p["sides"]["bridged"]
    print(f"\nWhere a Transmit's time goes: every process on CPU {p['cpus'][0]}, perf cpu-clock sample every "
          f"{p['period_us']} us of CPU, {p['calls']} calls per side; microseconds of CPU per call")
    print(f"  {'process':22} {'direct':>8} {'bridged':>8}   bridged, by object")
    names = ["client (cb-pcsc)", "cardbridge-shim", "cardbridge-desk", "desk pcscd", "card emulator (vicc)"]
    for n in names:
        dv = d["processes"].get(n, {}).get("us_per_call")
        bv = b["processes"].get(n, {}).get("us_per_call")
        objs = ", ".join(f"{g} {v}" for g, v in b["processes"].get(n, {}).get("by_object", {}).items() if v >= 0.5)
        print(f"  {n:22} {('-' if dv is None else f'{dv:.1f}'):>8} {('-' if bv is None else f'{bv:.1f}'):>8}   {objs}")
    print(f"  {'sum of CPU':22} {d['cpu_sum_us']:>8.1f} {b['cpu_sum_us']:>8.1f}")
    print(f"  {'wall per call (mean)':22} {d['wall_mean_us']:>8.1f} {b['wall_mean_us']:>8.1f}   "
          f"ratio {b['wall_mean_us'] / max(0.1, d['wall_mean_us']):.2f}")
    print(f"  {'on no process of chain':22} {d['off_chain_us']:>8.1f} {b['off_chain_us']:>8.1f}")
    added = b["cpu_sum_us"] - d["cpu_sum_us"]
    print(f"  bridged - direct: {b['wall_mean_us'] - d['wall_mean_us']:.1f} us wall, {added:.1f} us CPU")
    for n in ("cardbridge-shim", "cardbridge-desk"):
        top = b["processes"].get(n, {}).get("top_symbols", [])
        if top:
            print(f"  {n} top: " + "; ".join(f"{t['symbol']} {t['us_per_call']}" for t in top))


def part_cached(rig: UnixRig, cfg, checks: List[dict]) -> dict:
    rig.add_shims(1)
    meter = Meter({"shim": [rig.shims[0].pid]})
    out = {}
    for op, label in CACHED:
        out[op] = {}
        for placement in cfg.placements:
            r = compare(rig.desk.socket_path, rig.shim_socks[0], op, rig.reader, cfg, meter, placement,
                        rig.desk_pids() + [rig.shims[0].pid], lambda: rig.trips([0])["round_trips"])
            checks.append(trips_check(f"cached ({placement}): {label}", r, 0))
            checks.append(answers_check(f"cached ({placement}): {label}", r))
            out[op][placement] = r
    return out


def part_concurrent(rig: UnixRig, cfg, checks: List[dict]) -> dict:
    n = cfg.sessions
    rig.add_shims(n)
    meter = Meter({"pcscd": [rig.desk.pcscd_pid], "vicc": [rig.vicc_pid], "agent": [rig.agent.pid],
                   "shims": [p.pid for p in rig.shims[:n]]})
    sides = {}
    try:
        sides = {"direct": start_clients([rig.desk.socket_path] * n, "transmit", rig.reader, cfg.warmup // 4),
                 "bridged": start_clients(rig.shim_socks[:n], "transmit", rig.reader, cfg.warmup // 4)}
        t0 = rig.trips(range(n))["round_trips"]
        r = interleave(sides, cfg.conc_rounds, 0, 0, meter, seconds=cfg.conc_seconds)
        r["round_trips"] = rig.trips(range(n))["round_trips"] - t0
    finally:
        close_all([c for cs in sides.values() for c in cs])
    r["sessions"] = n
    r["placement"] = {"name": "free", "cpus": ALL_CPUS}
    r["round_trips_per_call"] = r["round_trips"] / r["sides"]["bridged"]["calls"]
    checks.append(trips_check(f"concurrent: {n} sessions' Transmits", r, 1))
    checks.append(answers_check(f"concurrent: {n} sessions' Transmits", r))
    return r


def part_idle(rig: UnixRig, cfg, checks: List[dict]) -> dict:
    rig.add_shims(1)
    meter = Meter({"shim": [rig.shims[0].pid], "agent": [rig.agent.pid]})

    def counters():
        st = rig.stats(0)
        return {k: st[k] for k in ("desk_bytes_in", "desk_bytes_out", "round_trips")}

    # Positive control: the same counters see one Transmit made during a window.
    a, c0 = meter.sample(), counters()
    r = subprocess.run([str(CB_PCSC), "transmit", "--reader", rig.reader, "--apdu", GET_CHALLENGE],
                       env=client_env(rig.shim_socks[0]), capture_output=True, text=True, timeout=30)
    w, c1 = Meter.wakeups(a, meter.sample()), counters()
    seen = {"shim_wakeups": w["shim"]["wakeups"], "agent_wakeups": w["agent"]["wakeups"],
            "link_bytes": c1["desk_bytes_in"] + c1["desk_bytes_out"] - c0["desk_bytes_in"] - c0["desk_bytes_out"]}
    checks.append(check("idle instrument: one Transmit is seen (shim and agent wake-ups, link bytes)",
                        r.returncode == 0 and all(seen.values()), json.dumps(seen)))
    out = {"positive_control": seen}
    for case, label in IDLE_CASES:
        prog = start_idle_program(case, rig.shim_socks[0], rig.reader, rig.tmp)
        m = Meter({**meter.groups, **({"program": [prog.pid]} if prog else {})})
        try:
            d = idle_window(m, counters, cfg.idle_seconds, ["shim", "agent"])
            if prog is not None and prog.poll() is not None:
                raise SystemExit(f"idle PC/SC program ({case}) exited early: {prog.stderr.read()}")
        finally:
            stop_idle_program(prog)
        out[case] = d
        checks += idle_checks(f"idle unix, {label}", d, d["desk_bytes_in"] + d["desk_bytes_out"],
                              {"shim": "the shim", "agent": "the desk agent"}, ["shim"])
    return out


# ============================================================================ report
def wake_detail(w: Dict[str, dict]) -> str:
    parts = [f"{g}:{x['name']}[{x['tid']}]={x['switches']}{'' if x['thread'] == 'both' else ' ' + x['thread']}"
             for g, v in w.items() for x in v["detail"][:6]]
    return ("; " + ", ".join(parts)) if parts else ""


def target(name: str, value: float, limit: float, unit: str = "x", free: Optional[float] = None,
           shown: Optional[str] = None) -> dict:
    return {"target": name, "value": value, "limit": limit, "unit": unit, "pass": bool(value <= limit),
            "free_placement_value": free, "shown": shown}


def idle_target(name: str, d: dict, link_bytes: int) -> dict:
    """One line per idle case: link bytes / own wake-ups / timed waits, all three 0."""
    own = d["own_wakeups"]
    waits = d["own_timed_waits"]
    return target(f"{name}: bytes/wake-ups/timed waits", link_bytes + own + waits, 0, "",
                  shown=f"{link_bytes}/{own}/{waits}")


def idle_notes(d: dict) -> str:
    """What the idle line needs said: timers waited for, wake-ups caused by the program, timed waits."""
    notes = [f"waited for {x['group']} timer due in {x['it_value']:.1f} s" for x in d["timers"]["waited_for"]]
    notes += [f"{g} woke {v['wakeups']}x answering the program (which woke {v['program_wakeups']}x itself), "
              "not counted" for g, v in d.get("induced", {}).items()]
    own_waits = [x for x in d["timed_waits"] if x["group"] in d["own_groups"]]
    notes += [timed_waits_text(own_waits)] if own_waits else []
    notes += [f"the program: {timed_waits_text(prog)}" for prog in
              [[x for x in d["timed_waits"] if x["group"] == "program"]] if prog]
    extra = [f"{x['name']}[{x['tid']}]={x['switches']}" for g, v in d["wakeups"].items()
             if g in d["own_groups"] and g not in d["induced"] for x in v["detail"][:3]] if d["own_wakeups"] else []
    return ("\n      " + "; ".join(notes + extra)) if notes or extra else ""


def print_latency_table(title: str, rows: List[tuple]) -> None:
    """rows: (label, {placement: comparison})."""
    print(f"\n{title}")
    print(f"  {'call':34} {'placement':9} {'direct med':>10} {'p99':>8} {'bridged med':>11} {'p99':>8} "
          f"{'ratio med':>9} {'(rounds)':>13} {'ratio p99':>9} {'trips/call':>10}")
    for label, by in rows:
        for i, (pl, r) in enumerate(by.items()):
            d, b, q = r["sides"]["direct"], r["sides"]["bridged"], r["ratio"]
            cpu = f" CPU {r['placement']['cpus'][0]}" if pl == "one-cpu" else ""
            print(f"  {label if i == 0 else '':34} {pl + cpu:9} {d['median_us']:10.1f} {d['p99_us']:8.0f} "
                  f"{b['median_us']:11.1f} {b['p99_us']:8.0f} {q['median']:9.2f} "
                  f"{q['median_range'][0]:6.2f}-{q['median_range'][1]:<6.2f} {q['p99']:9.2f} "
                  f"{r['round_trips_per_call']:10.3f}")


def cpu_line(r: dict, groups: Sequence[tuple], sides: Sequence[str] = ("direct", "bridged")) -> str:
    s = []
    for side in sides:
        c = r["sides"][side]["cpu_us_per_call"]
        s.append(f"{side}: " + ", ".join(f"{name} {c[g]:.1f}" for g, name in groups if g in c and
                                         (c[g] >= 1.0 or g in ("pcscd", "pcsc_client") or
                                          (side == "bridged" and g in ("agent", "shim")))))
    return "; ".join(s)


def print_floor(by: dict) -> None:
    """The unix part's third side: the same Transmit through two cb-null-relay processes."""
    print("\nThe floor: the same Transmit through two null relays (cb-null-relay: a blocking read and a write per "
          "message,\n  a thread per direction) in place of the shim and the desk agent: CardBridge's hops, none of "
          "its work:")
    print(f"  {'placement':9} {'floor med':>9} {'p99':>8} {'ratio med':>9} {'(rounds)':>13} {'ratio p99':>9}   "
          f"{'bridged - floor (med)':>21} {'bridged/floor':>13}")
    for pl, r in by.items():
        fl, b, q = r["sides"]["floor"], r["sides"]["bridged"], r["ratios"]["floor"]
        cpu = f" CPU {r['placement']['cpus'][0]}" if pl == "one-cpu" else ""
        print(f"  {pl + cpu:9} {fl['median_us']:9.1f} {fl['p99_us']:8.0f} {q['median']:9.2f} "
              f"{q['median_range'][0]:6.2f}-{q['median_range'][1]:<6.2f} {q['p99']:9.2f}   "
              f"{b['median_us'] - fl['median_us']:18.1f} us {b['median_us'] / max(0.1, fl['median_us']):13.2f}")
    for pl, r in by.items():
        print(f"  CPU per Transmit, {pl}: " + cpu_line(r, [("pcscd", "desk pcscd"), ("vicc", "vicc"),
                                                           ("pcsc_client", "client"), ("relays", "both relays")],
                                                        ("floor",)))


def headline(by: dict) -> dict:
    """The comparison the targets are judged on: one-cpu when it ran, else free."""
    return by.get("one-cpu") or by["free"]


def free_of(by: dict) -> Optional[dict]:
    return by.get("free") if "one-cpu" in by else None


def report(results: dict, cfg) -> List[dict]:
    targets: List[dict] = []
    parts = results["parts"]
    print(f"\n=== CardBridge hot-path benchmark ({'quick' if cfg.quick else 'full'}; {len(ALL_CPUS)} CPUs; "
          f"{cfg.rounds} rounds x {cfg.calls} calls per side in alternating blocks of {cfg.block}; microseconds)")
    print("    ratio = median over rounds of bridged/direct (min-max over rounds); placement one-cpu = every process "
          "of both paths on one CPU (targets), free = as scheduled")
    rows = []
    if "unix" in parts:
        rows.append(("Transmit (GET CHALLENGE)", parts["unix"]))
    if "cached" in parts:
        rows += [(label, parts["cached"][op]) for op, label in CACHED]
    if rows:
        print_latency_table("Direct on the desk's pcscd vs through cardbridge-shim -> unix link -> cardbridge-desk:",
                            rows)
    if "unix" in parts:
        u, f = headline(parts["unix"]), free_of(parts["unix"])
        groups = [("pcscd", "desk pcscd"), ("vicc", "vicc"), ("pcsc_client", "client"), ("agent", "cardbridge-desk"),
                  ("shim", "cardbridge-shim")]
        print("\nCPU per Transmit (us, every thread, measured blocks only, median over rounds):")
        for pl, r in parts["unix"].items():
            print(f"  {pl:8} {cpu_line(r, groups)}")
        print_floor(parts["unix"])
        bc = u["sides"]["bridged"]["cpu_us_per_call"]
        fb = f["sides"]["bridged"]["cpu_us_per_call"] if f else None
        targets.append(target("unix Transmit median", u["ratio"]["median"], LIMITS["unix_median"],
                              free=f and f["ratio"]["median"]))
        targets[-1].update(floor=u["ratios"]["floor"]["median"], floor_what="two null relays")
        targets.append(target("unix Transmit p99", u["ratio"]["p99"], LIMITS["unix_p99"], free=f and f["ratio"]["p99"]))
        targets[-1].update(floor=u["ratios"]["floor"]["p99"], floor_what="two null relays")
        # a relay's share of the floor's CPU: what one process that only moves the bytes costs
        relay_cpu = round(u["sides"]["floor"]["cpu_us_per_call"].get("relays", 0.0) / 2, 1)
        targets.append(target("cardbridge-desk CPU/Transmit, <= desk pcscd's", bc["agent"], bc["pcscd"], " us",
                              free=fb and fb["agent"]))
        targets[-1].update(floor=relay_cpu, floor_what="one null relay", floor_unit=" us")
        targets.append(target("cardbridge-shim CPU/Transmit", bc["shim"], LIMITS["shim_cpu_us"], " us",
                              free=fb and fb["shim"]))
        targets[-1].update(floor=relay_cpu, floor_what="one null relay", floor_unit=" us")
    if "cached" in parts:
        for op, label in CACHED:
            by = parts["cached"][op]
            f = free_of(by)
            targets.append(target(f"cached {label} median", headline(by)["ratio"]["median"], LIMITS["cached_median"],
                                  free=f and f["ratio"]["median"]))
    if "concurrent" in parts:
        c = parts["concurrent"]
        least = min(v["min_client_calls_per_block"] for v in c["sides"].values())
        print_latency_table(f"{c['sessions']} sessions transmitting at once ({cfg.conc_rounds} rounds x "
                            f"{cfg.conc_seconds:g} s per side; every client from the same instant, >= {least} calls "
                            "per client and block; only calls made while all clients ran; both CPUs):",
                            [(f"Transmit x{c['sessions']}", {"free": c})])
        print(f"  CPU per Transmit (us): {cpu_line(c, [('pcscd', 'pcscd'), ('vicc', 'vicc'), ('pcsc_client', 'clients'), ('agent', 'cardbridge-desk'), ('shims', 'shims')])}")
        targets.append(target(f"{c['sessions']} sessions at once, Transmit median", c["ratio"]["median"],
                              LIMITS["concurrent_median"]))
    if "idle" in parts:
        print(f"\nIdle session, unix desk link, {cfg.idle_seconds:g} s per case: link bytes in/out; wake-ups (context "
              "switches, every thread); threads in a timed wait at the window's start")
        pc = parts["idle"]["positive_control"]
        print(f"  {'(control: one Transmit)':42} link {pc['link_bytes']:>5} B      shim {pc['shim_wakeups']:>4}   "
              f"cardbridge-desk {pc['agent_wakeups']:>4}")
        for case, label in IDLE_CASES:
            d = parts["idle"][case]
            w = d["wakeups"]
            print(f"  {label:42} link {d['desk_bytes_in']:>5}/{d['desk_bytes_out']:<5} shim {w['shim']['wakeups']:>4}   "
                  f"cardbridge-desk {w['agent']['wakeups']:>4}   timed waits {d['own_timed_waits']}"
                  f"{idle_notes(d)}")
            targets.append(idle_target(f"idle unix, {label}", d, d["desk_bytes_in"] + d["desk_bytes_out"]))
    if "rdp" in parts:
        import rdp_bench
        targets += rdp_bench.print_report(parts["rdp"])
    print("\nTargets (issue 11), judged on the one-cpu placement (free placement for reference):")
    for t in targets:
        v = t["shown"] or (f"{t['value']:.2f}{t['unit']}" if t["unit"] else f"{t['value']}")
        lim = f"{t['limit']:.2f}{t['unit']}" if t["unit"] else f"{t['limit']}"
        fr = "" if t["free_placement_value"] is None else f"   free: {t['free_placement_value']:.2f}{t['unit']}"
        fl = f"   floor {t['floor']:.2f}{t.get('floor_unit', 'x')}: {t['floor_what']}" if t.get("floor") else ""
        print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']:62} {v:>9}  (limit {lim}){fr}{fl}")
    return targets


# ============================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)} (default: all but profile)")
    ap.add_argument("--profile-calls", type=int, help="profile part: Transmits per side (default 3000; quick 1000)")
    ap.add_argument("--profile-period-us", type=int, default=50,
                    help="profile part: a perf sample every this many microseconds of CPU")
    ap.add_argument("--quick", action="store_true", help="short form for CI (the deterministic checks are the same)")
    ap.add_argument("--placement", help="latency comparisons to run: one-cpu, free or both (default both, quick "
                                        "one-cpu; targets use one-cpu)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 9; quick 3)")
    ap.add_argument("--calls", type=int, help="calls per side and round (default 1000; quick 200)")
    ap.add_argument("--block", type=int, default=100, help="calls per block within a round")
    ap.add_argument("--warmup", type=int, default=200, help="calls each client makes before it is measured")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent sessions (concurrent part)")
    ap.add_argument("--conc-rounds", type=int, help="rounds of the concurrent part (default 7; quick 3)")
    ap.add_argument("--conc-seconds", type=float, help="seconds per side and round, concurrent part (default 1; quick 0.3)")
    ap.add_argument("--idle-seconds", type=float, help="idle window per case (default 60; quick 10)")
    ap.add_argument("--rdp-modes", choices=["static", "dynamic", "both"], default="both")
    ap.add_argument("--rdp-client", choices=["cb", "xfreerdp"], default="cb")
    ap.add_argument("--log-level", default="warn", help="log level of cardbridge-desk and the shims")
    ap.add_argument("--busy-cores", type=float, default=0.25,
                    help="warn when other processes used more CPU than this on average (cores)")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a wall-clock or CPU target is missed")
    ap.add_argument("--out", default=str(BUILD / "core-bench.json"))
    a = ap.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (3 if q else 9)
    a.calls = a.calls or (200 if q else 1000)
    a.conc_rounds = a.conc_rounds or (3 if q else 7)
    a.profile_calls = a.profile_calls or (1000 if q else 3000)
    a.conc_seconds = a.conc_seconds or (0.3 if q else 1.0)
    a.idle_seconds = a.idle_seconds if a.idle_seconds is not None else (10.0 if q else 60.0)
    if q:
        a.warmup = min(a.warmup, 100)
    a.parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    a.placement = a.placement or ("one-cpu" if q else "both")
    a.placements = PLACEMENTS if a.placement == "both" else [p.strip() for p in a.placement.split(",")]
    bad = [p for p in a.parts if p not in PARTS] + [p for p in a.placements if p not in PLACEMENTS]
    if bad:
        ap.error(f"unknown part(s)/placement(s) {bad}; parts: {PARTS}, placements: {PLACEMENTS}")
    return a


def machine() -> dict:
    return {"cpus": ALL_CPUS, "kernel": os.uname().release, "loadavg_start": os.getloadavg(),
            "model": next((l.split(":", 1)[1].strip() for l in (_read("/proc/cpuinfo") or "").splitlines()
                           if l.startswith("model name")), "")}


def main(argv=None) -> int:
    cfg = parse_args(argv)
    for b in (CB_PCSC, DESK, SHIM, NULL_RELAY):
        if not b.exists():
            raise SystemExit(f"{b} not found: build first (CARDBRIDGE_BUILD_DIR={BUILD})")
    t_start = time.monotonic()
    load = LoadWatch(cfg.busy_cores)
    checks: List[dict] = []
    results = {"config": dict(vars(cfg)), "machine": machine(), "parts": {}}
    unix_parts = [p for p in cfg.parts if p != "rdp"]
    if unix_parts:
        tmp = Path(tempfile.mkdtemp(prefix="cbb-"))   # short AF_UNIX paths
        rig = None
        try:
            rig = UnixRig(tmp, cfg.log_level)
            for part in unix_parts:
                fn = {"unix": part_unix, "cached": part_cached, "concurrent": part_concurrent, "idle": part_idle,
                      "profile": part_profile}[part]
                load.begin(part)
                results["parts"][part] = fn(rig, cfg, checks)
                rec = load.end()
                print(f"[{part}] done in {rec['wall_s']:.1f} s (other processes: {rec['other_cores']:.2f} cores, "
                      f"load {rec['loadavg_end'][0]:.1f})", flush=True)
        except BaseException:
            if rig is not None:
                print(rig.report(), file=sys.stderr)
            raise
        finally:
            if rig is not None:
                rig.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    if "rdp" in cfg.parts:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import rdp_bench
        load.begin("rdp")
        results["parts"]["rdp"] = rdp_bench.run(cfg, checks)
        rec = load.end()
        print(f"[rdp] done in {rec['wall_s']:.1f} s (other processes: {rec['other_cores']:.2f} cores)", flush=True)
    results["load"] = load.parts
    results["machine"]["loadavg_end"] = os.getloadavg()
    targets = report(results, cfg)
    results["targets"] = targets
    results["checks"] = checks
    results["wall_seconds"] = round(time.monotonic() - t_start, 1)
    print("\nDeterministic checks:")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}")
    print("\nMachine load per part (CPU used by other processes and by this benchmark, cores on average; "
          "load average start -> end):")
    for p in load.parts:
        print(f"  {p['part']:11} {p['wall_s']:7.1f} s   others {p['other_cores']:.2f}   this benchmark "
              f"{p['bench_cores']:.2f}   load {p['loadavg_start'][0]:.2f} -> {p['loadavg_end'][0]:.2f}")
    warnings = load.warnings()
    results["warnings"] = warnings
    for w in warnings:
        print(f"WARNING: {w}")
    with open(cfg.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nJSON: {cfg.out}   ({results['wall_seconds']} s)")
    failed = [c for c in checks if not c["ok"]]
    missed = [t for t in targets if not t["pass"]]
    if failed:
        print(f"\n{len(failed)} deterministic check(s) FAILED", file=sys.stderr)
        return 1
    if missed and cfg.fail_on_miss:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
