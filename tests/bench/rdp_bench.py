#!/usr/bin/python3
"""PC/SC latency, CPU and idle cost through a real RDP channel, against the desk's pcscd in the same run.

The RDP part of scripts/core-bench (tests/bench/core_bench.py, which holds the measuring method);
also runnable alone:

    scripts/rdp-bench [--quick] [--mode static|dynamic|both] [--client cb|xfreerdp] [--rounds N]
                      [--calls N] [--idle-seconds N] [--out FILE] [--assert-idle-zero]

    emulated desk (private pcscd + vpcd + vicc)
      -> RDP client with the CardBridge add-in: cb-rdp-client (headless, default) or stock xfreerdp
         under Xvfb (--client xfreerdp; needs root: the add-in is exposed in a private mount namespace)
      -> cb-rdp-host (libfreerdp-server2, TLS, loopback) -> WTS relay socket
      -> cardbridge-shim --desk unix:RELAY
      -> cb-pcsc serve (libpcsclite)

For each channel mode (static /vc, dynamic /dvc):
  * latency: Transmit (GET CHALLENGE) and Status, directly on the desk's pcscd (the baseline) and
    through the RDP path, in alternating blocks over several rounds, in the one-cpu and the free
    placement (core_bench.compare); medians over rounds, p99, ratios; CPU per call of the desk's
    pcscd, the RDP client (its add-in does the desk's work), cb-rdp-host and the shim, from
    schedstat over the measured blocks;
  * idle, over IDLE seconds, with the RDP client connected and the desk's readers on the shim:
      - no PC/SC program at all;
      - a PC/SC program holding a context and a card handle, doing nothing;
      - a PC/SC program waiting in SCardGetStatusChange(INFINITE) on the readers;
    bytes at three places: the shim's desk link (control socket stats desk_bytes_in/out), the RDP
    connection itself (TCP bytes at the host's socket, `ss -ti`: every RDP PDU, not only the
    channel), and what cb-rdp-host read or wrote through read/write-like system calls (/proc/PID/io
    rchar/wchar; send/recv are not counted there); and wake-ups (context switches) of the shim, of the RDP client's threads other
    than its main loop (the add-in's: cb-rdp-client and xfreerdp poll in their main loop, 10 times
    a second, which is the test client's doing, reported apart), and of cb-rdp-host (reported).

Deterministic checks (exit status with --assert-idle-zero, the CTest quick form rdp_bench_quick;
always when run from core-bench): Transmit costs exactly one channel round trip and Status none,
every answer is correct, and while idle 0 bytes cross the channel and the RDP connection, no thread
of the shim or the add-in sleeps with a deadline, and neither wakes up (core_bench.idle_checks).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "harness"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import core_bench as cb  # noqa: E402
from cbharness import EmulatedDesk, Proc, shim_control, wait_until  # noqa: E402
import xrdp_fixture as xf  # noqa: E402

OPS = [("transmit", "Transmit (GET CHALLENGE)"), ("status", "Status")]
LIMIT = {"static": cb.LIMITS["rdp_static_median"], "dynamic": cb.LIMITS["rdp_dynamic_median"]}


def _descendant(pid: int, comm: str) -> int:
    """`pid` itself or its first descendant named `comm` (xfreerdp runs under a namespace wrapper)."""
    for _ in range(100):
        found = [int(d) for d in os.listdir("/proc") if d.isdigit() and cb._read(f"/proc/{d}/comm") == comm + "\n"
                 and _is_descendant(int(d), pid)]
        if found:
            return found[0]
        time.sleep(0.1)
    return pid


def _is_descendant(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        f = cb._stat_fields(pid)
        if f is None:
            return False
        pid = int(f[1])
    return pid == root


class RdpPath:
    """One RDP path (host + shim + client) for one channel mode."""

    def __init__(self, mode: str, client_kind: str, desk: EmulatedDesk, tmp: Path, xvfb=None, addin=None):
        self.mode = mode
        self.desk = desk
        self.tmp = tmp / mode
        self.tmp.mkdir(parents=True)
        rt = Path(tempfile.mkdtemp(prefix="cbbench-"))   # short AF_UNIX paths
        self.rt = rt
        self.relay = str(rt / "relay" / "desk.sock")
        self.shim_socket = str(rt / "shim" / "pcscd.comm")
        self.procs = []
        self.host = self._proc([xf.RDP_HOST, "--port", "0", "--bind", "127.0.0.1", "--make-cert", self.tmp / "certs",
                                "--relay", self.relay, "--channel", mode, "--log-level", "warn"], "host")
        line = wait_until(lambda: next((l for l in self.host.log_text().splitlines() if l.startswith("READY port=")), None),
                          timeout=20, desc="cb-rdp-host READY line",
                          abort=lambda: None if self.host.alive() else self.host.exit_description())
        self.port = int(line.split("=", 1)[1])
        self.shim = self._proc([xf.SHIM, "--socket", self.shim_socket, "--desk", f"unix:{self.relay}",
                                "--log-level", "warn"], "shim")
        wait_until(lambda: os.path.exists(self.shim_socket + ".ctl"), timeout=10, desc="the shim's control socket",
                   abort=lambda: None if self.shim.alive() else self.shim.exit_description())
        if client_kind == "xfreerdp":
            self.client = xf.StockClient(addin, xvfb, self.port, desk_socket=desk.socket_path,
                                         log_path=self.tmp / "xfreerdp.log", home=self.tmp / "home", channel=mode,
                                         desk_name=f"bench-{mode}", log_level="warn").start().proc
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PCSCLITE_")}
            env.update(desk.env(), HOME=str(self.tmp))
            self.client = Proc([xf.RDP_CLIENT, "--host", "127.0.0.1", "--port", str(self.port), "--addin", xf.ADDIN,
                                "--mode", mode, "--addin-args", f"log-level:warn,name:bench-{mode}",
                                "--client-name", f"bench-{mode}", "--log-level", "warn"],
                               name="client", log_path=self.tmp / "client.log", env=env).start()
        self.procs.append(self.client)
        want = desk.readers
        wait_until(lambda: xf.reader_names(self.shim_socket) == want, timeout=30, desc=f"readers on the shim ({mode})",
                   abort=lambda: None if self.client.alive() else self.client.exit_description(), details=self.report)
        self.client_pid = _descendant(self.client.pid, "xfreerdp") if client_kind == "xfreerdp" else self.client.pid

    def _proc(self, argv, name) -> Proc:
        p = Proc(argv, name=name, log_path=self.tmp / f"{name}.log").start()
        self.procs.append(p)
        return p

    def counters(self) -> dict:
        st = xf.shim_status(self.shim_socket)
        tcp = xf.tcp_bytes(self.port)
        io = xf.proc_io(self.host.pid)
        return {"shim_in": st["stats"]["desk_bytes_in"], "shim_out": st["stats"]["desk_bytes_out"],
                "round_trips": st["stats"].get("round_trips", 0), "desk_connected": st["desk"]["connected"],
                "tcp_sent": tcp["sent"], "tcp_received": tcp["received"], "tcp_connections": tcp["connections"],
                "host_rchar": io["rchar"], "host_wchar": io["wchar"]}

    def report(self) -> str:
        return "\n".join(p.failure_report(20) for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(grace=5)
        shutil.rmtree(self.rt, ignore_errors=True)


def channel_echo(path: RdpPath, cpus: List[int], pinned: List[int], rounds: int, count: int) -> dict:
    """The RDP stack's own round trip: the shim's desk pings (control command "ping": the shim ->
    cb-rdp-host -> RDP -> the add-in's link session, which answers at once -> back), timed inside
    the shim, no PC/SC call, with the same placement as the Transmit comparison. Median over
    `rounds` batches of `count` pings of each batch's median."""
    with cb.pinned_to(pinned, cpus):
        batches = [shim_control(path.shim_socket + ".ctl", {"cmd": "ping", "count": count}, timeout=30)
                   for _ in range(rounds)]
    bad = [b for b in batches if "median_us" not in b]
    if bad:
        raise SystemExit(f"desk pings over RDP ({path.mode}) failed: {bad[0]}")
    return {"rounds": rounds, "count": count, "median_us": round(statistics.median(b["median_us"] for b in batches), 1),
            "p99_us": round(statistics.median(b["p99_us"] for b in batches), 1)}


def latency(path: RdpPath, cfg, checks: List[dict]) -> dict:
    desk = path.desk
    reader = desk.readers[0]
    groups = {"pcscd": [desk.pcscd_pid], "vicc": [desk.vicc(0).pid], "client": [path.client_pid],
              "host": [path.host.pid], "shim": [path.shim.pid]}
    meter = cb.Meter(groups)
    pinned = [pid for pids in groups.values() for pid in pids]
    out = {}
    for op, label in OPS:
        out[op] = {}
        for placement in cfg.placements:
            r = cb.compare(desk.socket_path, path.shim_socket, op, reader, cfg, meter, placement, pinned,
                           lambda: path.counters()["round_trips"])
            checks.append(cb.trips_check(f"rdp {path.mode} ({placement}): {label}", r, 1 if op == "transmit" else 0))
            checks.append(cb.answers_check(f"rdp {path.mode} ({placement}): {label}", r))
            out[op][placement] = r
            if op == "transmit":
                r["channel_echo"] = channel_echo(path, r["placement"]["cpus"], pinned, cfg.rounds,
                                                 max(50, min(1000, cfg.calls)))
            print(f"[rdp {path.mode} {placement}] {label}: direct {r['sides']['direct']['median_us']:.0f} us, RDP "
                  f"{r['sides']['bridged']['median_us']:.0f} us (median), ratio {r['ratio']['median']:.2f}", flush=True)
    return out


def idle(path: RdpPath, cfg, tmp: Path, checks: List[dict]) -> dict:
    reader = path.desk.readers[0]
    # The add-in runs on the RDP client's threads other than its main loop (which cb-rdp-client and
    # xfreerdp run themselves, polling): those are asserted with the shim; the rest is reported.
    groups = {"shim": [path.shim.pid], "addin": [path.client_pid], "client_main": [path.client_pid],
              "host": [path.host.pid]}
    out = {}
    for case, label in cb.IDLE_CASES:
        prog = cb.start_idle_program(case, path.shim_socket, reader, tmp)
        meter = cb.Meter({**groups, **({"program": [prog.pid]} if prog else {})},
                         threads={"addin": "others", "client_main": "main"})
        try:
            before_conn = path.counters()
            d = cb.idle_window(meter, path.counters, cfg.idle_seconds, ["shim", "addin"], timers_of=["shim"])
            after_conn = path.counters()
            if prog is not None and prog.poll() is not None:
                raise SystemExit(f"idle PC/SC program ({case}) exited early: {prog.stderr.read()}")
        finally:
            cb.stop_idle_program(prog)
        d["desk_connected"] = before_conn["desk_connected"] and after_conn["desk_connected"]
        d["tcp_connections"] = after_conn["tcp_connections"]
        out[case] = d
        where = f"rdp {path.mode} idle, {label}"
        d["link_bytes"] = d["shim_in"] + d["shim_out"] + d["tcp_sent"] + d["tcp_received"]
        checks += cb.idle_checks(where, d, d["link_bytes"], {"shim": "the shim", "addin": "the add-in's threads"},
                                 ["shim"])
        checks.append(cb.check(f"{where}: desk connected throughout", d["desk_connected"] and d["tcp_connections"] == 1,
                               f"connected {d['desk_connected']}, {d['tcp_connections']} RDP connection(s)"))
        w = d["wakeups"]
        print(f"[rdp {path.mode}] idle {cfg.idle_seconds:g} s, {label}: channel {d['shim_in']}/{d['shim_out']} B, "
              f"RDP TCP {d['tcp_sent']}/{d['tcp_received']} B, wake-ups: shim {w['shim']['wakeups']}, add-in threads "
              f"{w['addin']['wakeups']}, client main loop {w['client_main']['wakeups']}, host {w['host']['wakeups']}; "
              f"timed waits {d['own_timed_waits']}", flush=True)
    return out


def run(cfg, checks: List[dict]) -> dict:
    """The RDP part: cfg as parsed by core_bench (rounds, calls, block, warmup, idle_seconds,
    rdp_modes, rdp_client)."""
    for b in (xf.RDP_HOST, xf.RDP_CLIENT, xf.SHIM, xf.CB_PCSC, xf.ADDIN):
        if not b.exists():
            raise SystemExit(f"{b} not found: build first (CARDBRIDGE_BUILD_DIR={xf.BUILD})")
    modes = ["static", "dynamic"] if cfg.rdp_modes == "both" else [cfg.rdp_modes]
    results = {"client": cfg.rdp_client, "idle_seconds": cfg.idle_seconds, "modes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="cb-rdp-bench-"))
    xvfb = addin = None
    try:
        with EmulatedDesk(slots=2, cards=[0]) as desk:
            if cfg.rdp_client == "xfreerdp":
                xvfb = xf.Xvfb(tmp / "xvfb.log").start()
                addin = xf.AddinMount(xf.ADDIN, tmp / "addin")
            for mode in modes:
                path = RdpPath(mode, cfg.rdp_client, desk, tmp, xvfb, addin)
                try:
                    results["modes"][mode] = {"latency": latency(path, cfg, checks),
                                              "idle": idle(path, cfg, tmp, checks)}
                except BaseException:
                    print(path.report(), file=sys.stderr)
                    raise
                finally:
                    path.stop()
    finally:
        if xvfb:
            xvfb.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def print_report(results: dict) -> List[dict]:
    """Prints the RDP tables; returns the RDP targets."""
    targets = []
    client = "cb-rdp-client" if results["client"] == "cb" else "stock xfreerdp"
    rows = [(f"{mode} {label}", r["latency"][op]) for mode, r in results["modes"].items() for op, label in OPS]
    cb.print_latency_table(f"Direct on the desk's pcscd vs through real RDP ({client} + add-in -> cb-rdp-host -> "
                           "cardbridge-shim); trips = channel round trips:", rows)
    print("\nCPU per Transmit over RDP (us, every thread, median over rounds; the RDP client hosts the add-in):")
    groups = [("pcscd", "desk pcscd"), ("vicc", "vicc"), ("pcsc_client", "PC/SC client"), ("client", "RDP client+add-in"),
              ("host", "cb-rdp-host"), ("shim", "cardbridge-shim")]
    for mode, r in results["modes"].items():
        for pl, x in r["latency"]["transmit"].items():
            print(f"  {mode:7} {pl:8} {cb.cpu_line(x, groups)}")
    print("\nThe floor over RDP: the RDP stack's own round trip (the shim's desk ping: shim -> cb-rdp-host -> RDP ->\n"
          "  the add-in's link session, answered at once -> back; no PC/SC), measured right after the Transmits with\n"
          "  the same placement. direct + echo is what a call pays before CardBridge's own hops (program <-> shim,\n"
          "  the add-in's PC/SC call):")
    print(f"  {'mode':7} {'placement':9} {'direct med':>10} {'echo med':>9} {'echo p99':>9} {'(direct+echo)/direct':>21} "
          f"{'Transmit med':>12} {'ratio':>6} {'Transmit - direct - echo':>25}")
    for mode, r in results["modes"].items():
        for pl, x in r["latency"]["transmit"].items():
            e = x.get("channel_echo")
            if not e:
                continue
            d, b = x["sides"]["direct"]["median_us"], x["sides"]["bridged"]["median_us"]
            cpu = f" CPU {x['placement']['cpus'][0]}" if pl == "one-cpu" else ""
            print(f"  {mode:7} {pl + cpu:9} {d:10.1f} {e['median_us']:9.1f} {e['p99_us']:9.0f} "
                  f"{(d + e['median_us']) / d:21.2f} {b:12.1f} {x['ratio']['median']:6.2f} "
                  f"{b - d - e['median_us']:22.1f} us")
    print(f"\nIdle over RDP, {results['idle_seconds']:g} s per case: bytes (channel in/out, RDP TCP sent/received, "
          "cb-rdp-host syscalls r/w); wake-ups of the shim, of the RDP client's threads other than its main loop "
          "(the add-in's), of its main loop and of cb-rdp-host (test tools polling at 10 Hz, not counted); threads "
          "of the shim and the add-in in a timed wait")
    for mode, r in results["modes"].items():
        for case, label in cb.IDLE_CASES:
            i = r["idle"][case]
            w = i["wakeups"]
            print(f"  {mode:7} {label:42} {i['shim_in']:>3}/{i['shim_out']:<3} {i['tcp_sent']:>4}/{i['tcp_received']:<4} "
                  f"{i['host_rchar']:>4}/{i['host_wchar']:<4} shim {w['shim']['wakeups']:>3}  add-in {w['addin']['wakeups']:>3}"
                  f"  client main {w['client_main']['wakeups']:>4}  host {w['host']['wakeups']:>4}  timed waits "
                  f"{i['own_timed_waits']}{cb.idle_notes(i)}")
    for mode, r in results["modes"].items():
        by = r["latency"]["transmit"]
        f = cb.free_of(by)
        targets.append(cb.target(f"RDP {mode} Transmit median", cb.headline(by)["ratio"]["median"], LIMIT[mode],
                                 free=f and f["ratio"]["median"]))
        e = cb.headline(by).get("channel_echo")
        if e:
            d = cb.headline(by)["sides"]["direct"]["median_us"]
            targets[-1]["floor"] = round((d + e["median_us"]) / d, 3)
            targets[-1]["floor_what"] = "(direct + RDP channel echo) / direct"
        for case, label in cb.IDLE_CASES:
            i = r["idle"][case]
            targets.append(cb.idle_target(f"idle RDP {mode}, {label}", i, i["link_bytes"]))
    return targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mode", choices=["static", "dynamic", "both"], default="both")
    ap.add_argument("--client", choices=["cb", "xfreerdp"], default="cb",
                    help="cb: cb-rdp-client (headless); xfreerdp: stock xfreerdp under Xvfb (root)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--calls", type=int)
    ap.add_argument("--iterations", type=int, help="(old name) total calls per side: sets --calls to N / rounds")
    ap.add_argument("--idle-seconds", type=float)
    ap.add_argument("--out", default=str(xf.BUILD / "rdp-bench.json"))
    ap.add_argument("--assert-idle-zero", action="store_true",
                    help="exit 1 unless every deterministic check passed (idle bytes and shim wake-ups 0, round trips)")
    a = ap.parse_args()
    argv = ["--parts", "rdp", "--rdp-modes", a.mode, "--rdp-client", a.client, "--out", a.out]
    if a.quick:
        argv.append("--quick")
    for opt, v in (("--rounds", a.rounds), ("--calls", a.calls), ("--idle-seconds", a.idle_seconds)):
        if v is not None:
            argv += [opt, str(v)]
    if a.iterations and a.calls is None:
        rounds = a.rounds or (3 if a.quick else 9)
        argv += ["--calls", str(max(1, a.iterations // rounds))]
    rc = cb.main(argv)
    return rc if a.assert_idle_zero else 0


if __name__ == "__main__":
    sys.exit(main())
