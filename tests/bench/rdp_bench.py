#!/usr/bin/python3
"""PC/SC latency and idle traffic through a real RDP channel, against the desk's pcscd in the same run.

    emulated desk (private pcscd + vpcd + vicc)
      -> RDP client with the CardBridge add-in: cb-rdp-client (headless, default) or stock xfreerdp
         under Xvfb (--client xfreerdp; needs root: the add-in is exposed in a private mount namespace)
      -> cb-rdp-host (libfreerdp-server2, TLS, loopback) -> WTS relay socket
      -> cardbridge-shim --desk unix:RELAY
      -> cb-pcsc bench (libpcsclite)

For each channel mode (static /vc, dynamic /dvc):
  * latency: `cb-pcsc bench --op transmit|status` (GET CHALLENGE), ITERATIONS calls each, directly on
    the desk's pcscd (the baseline) and through the RDP path, alternately; medians, p99 and ratios;
  * idle traffic over IDLE seconds, with the RDP client connected and the desk's readers on the shim:
      - no PC/SC program at all;
      - a PC/SC program holding a context and a card handle, doing nothing;
      - a PC/SC program waiting in SCardGetStatusChange(INFINITE) on the readers (what session
        daemons and browsers' PKCS#11 modules do all day);
    counted at three places: the shim's desk link (control socket stats desk_bytes_in/out), the
    RDP connection itself (TCP bytes at the host's socket, `ss -ti`: every RDP PDU, not only the
    channel), and every byte cb-rdp-host read or wrote through system calls (/proc/PID/io
    rchar/wchar: the relay socket, the TCP socket, its log at level warn).

    scripts/rdp-bench [--idle-seconds N] [--iterations N] [--mode static|dynamic|both] [--out FILE]
                      [--client cb|xfreerdp] [--assert-idle-zero]

--assert-idle-zero: exit status 1 unless every idle case moved 0 bytes over the channel (shim) and
0 bytes over the RDP connection (the quick CTest form, rdp_bench_quick).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from cbharness import EmulatedDesk, Proc, wait_until  # noqa: E402
import xrdp_fixture as xf  # noqa: E402

GET_CHALLENGE = "0084000008"
OPS = [("transmit", "Transmit (GET CHALLENGE)"), ("status", "Status")]
IDLE_CASES = [("none", "no PC/SC program"),
              ("context", "program holding a context + card handle"),
              ("gsc", "program in GetStatusChange(INFINITE)")]

# Idle PC/SC programs (pyscard on the system python). Print one line when settled, then sleep.
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


def bench(sock: str, op: str, iterations: int, reader: str) -> dict:
    d = xf.cb_pcsc(sock, "bench", "--op", op, "--iterations", str(iterations), "--reader", reader,
                   "--apdu", GET_CHALLENGE, timeout=600)
    if d.get("rv") != xf.OK:
        raise SystemExit(f"{op} against {sock} failed: {d}")
    return d["latency"]


class Path_:
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


IDLE_KEYS = ("shim_in", "shim_out", "tcp_sent", "tcp_received")


def settle(path: Path_, quiet_s: float = 2.0, guard_s: float = 120.0) -> None:
    """Until the channel has been quiet for quiet_s (the counters the idle check reads do not
    move): e.g. pcscd powering the card down after the last handle left makes the desk push
    that state, a moment later on a loaded machine. guard_s: a hang guard (a link that never
    goes quiet then shows in the idle figures)."""
    start = since = time.monotonic()
    last = {k: path.counters()[k] for k in IDLE_KEYS}
    while time.monotonic() - since < quiet_s and time.monotonic() - start < guard_s:
        time.sleep(0.2)
        cur = {k: path.counters()[k] for k in IDLE_KEYS}
        if cur != last:
            last, since = cur, time.monotonic()


def idle_case(path: Path_, case: str, seconds: float, reader: str, tmp: Path) -> dict:
    prog = None
    if case != "none":
        script = tmp / f"idle_{case}.py"
        script.write_text(HOLDER if case == "context" else WAITER)
        prog = subprocess.Popen([xf.SYSTEM_PYTHON, str(script), reader], env=xf.client_env(path.shim_socket),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = prog.stdout.readline().strip()
        if line != "ready":
            prog.kill()
            raise SystemExit(f"idle PC/SC program ({case}) failed: {line} {prog.stderr.read()}")
    try:
        settle(path)   # let anything the program's start (or the latency run before) caused pass
        before = path.counters()
        time.sleep(seconds)
        after = path.counters()
        if prog is not None and prog.poll() is not None:
            raise SystemExit(f"idle PC/SC program ({case}) exited early: {prog.stderr.read()}")
    finally:
        if prog is not None:
            prog.kill()
            prog.wait(5)
            for f in (prog.stdout, prog.stderr):
                f.close()
    d = {k: after[k] - before[k] for k in before if isinstance(before[k], int) and not isinstance(before[k], bool)}
    d["desk_connected"] = before["desk_connected"] and after["desk_connected"]
    d["tcp_connections"] = after["tcp_connections"]
    d["seconds"] = seconds
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--iterations", type=int, default=5000)
    ap.add_argument("--mode", choices=["static", "dynamic", "both"], default="both")
    ap.add_argument("--client", choices=["cb", "xfreerdp"], default="cb",
                    help="cb: cb-rdp-client (headless); xfreerdp: stock xfreerdp under Xvfb (root)")
    ap.add_argument("--out", default=str(xf.BUILD / "rdp-bench.json"))
    ap.add_argument("--assert-idle-zero", action="store_true",
                    help="fail unless no byte crossed the channel or the RDP connection while idle")
    a = ap.parse_args()
    for b in (xf.RDP_HOST, xf.RDP_CLIENT, xf.SHIM, xf.CB_PCSC, xf.ADDIN):
        if not b.exists():
            raise SystemExit(f"{b} not found: build first (CARDBRIDGE_BUILD_DIR={xf.BUILD})")
    modes = ["static", "dynamic"] if a.mode == "both" else [a.mode]

    results = {"iterations": a.iterations, "idle_seconds": a.idle_seconds, "client": a.client, "modes": {},
               "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="cb-rdp-bench-"))
    xvfb = addin = None
    try:
        with EmulatedDesk(slots=2, cards=[0]) as desk:
            reader = desk.readers[0]
            if a.client == "xfreerdp":
                xvfb = xf.Xvfb(tmp / "xvfb.log").start()
                addin = xf.AddinMount(xf.ADDIN, tmp / "addin")
            for mode in modes:
                path = Path_(mode, a.client, desk, tmp, xvfb, addin)
                try:
                    lat = {}
                    for op, _ in OPS:
                        lat[op] = {"desk": bench(desk.socket_path, op, a.iterations, reader),
                                   "rdp": bench(path.shim_socket, op, a.iterations, reader)}
                        print(f"[{mode}] {op}: desk {lat[op]['desk']['median_us']:.0f} us, "
                              f"RDP {lat[op]['rdp']['median_us']:.0f} us (median)", flush=True)
                    idle = {}
                    for case, label in IDLE_CASES:
                        idle[case] = idle_case(path, case, a.idle_seconds, reader, tmp)
                        i = idle[case]
                        print(f"[{mode}] idle {a.idle_seconds:.0f}s, {label}: channel {i['shim_in']}/{i['shim_out']} B, "
                              f"RDP TCP {i['tcp_sent']}/{i['tcp_received']} B", flush=True)
                    results["modes"][mode] = {"latency": lat, "idle": idle}
                except BaseException:
                    print(path.report(), file=sys.stderr)
                    raise
                finally:
                    path.stop()
    finally:
        if xvfb:
            xvfb.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    n = a.iterations
    results["loadavg_end"] = os.getloadavg()
    load = "/".join(f"{x:.1f}" for x in results["loadavg_start"][:1] + results["loadavg_end"][:1])
    print(f"\nPC/SC latency through the RDP channel vs. the desk's pcscd ({n} calls each, microseconds, "
          f"client {'cb-rdp-client' if a.client == 'cb' else 'stock xfreerdp'}; load average start/end {load} "
          f"on {results['cpus']} CPUs)")
    print(f"{'channel':8} {'call':26} {'desk median':>11} {'RDP median':>10} {'ratio':>6} {'desk p99':>9} "
          f"{'RDP p99':>9} {'ratio':>6}")
    for mode, r in results["modes"].items():
        for op, label in OPS:
            d, v = r["latency"][op]["desk"], r["latency"][op]["rdp"]
            print(f"{mode:8} {label:26} {d['median_us']:11.1f} {v['median_us']:10.1f} {v['median_us'] / d['median_us']:6.2f} "
                  f"{d['p99_us']:9.1f} {v['p99_us']:9.1f} {v['p99_us'] / d['p99_us']:6.2f}")
    print(f"\nIdle traffic over {a.idle_seconds:.0f} s, RDP client connected, desk's readers on the shim (bytes)")
    print(f"{'channel':8} {'PC/SC programs':42} {'channel in/out':>15} {'RDP TCP sent/recv':>18} "
          f"{'host syscalls r/w':>18}")
    failures = []
    for mode, r in results["modes"].items():
        for case, label in IDLE_CASES:
            i = r["idle"][case]
            print(f"{mode:8} {label:42} {i['shim_in']:>7}/{i['shim_out']:<7} {i['tcp_sent']:>8}/{i['tcp_received']:<9} "
                  f"{i['host_rchar']:>8}/{i['host_wchar']:<9}")
            if i["shim_in"] or i["shim_out"] or i["round_trips"]:
                failures.append(f"{mode}/{case}: {i['shim_in']}/{i['shim_out']} bytes, {i['round_trips']} round trips "
                                "on the channel while idle")
            if i["tcp_sent"] or i["tcp_received"]:
                failures.append(f"{mode}/{case}: {i['tcp_sent']}/{i['tcp_received']} bytes on the RDP connection while idle")
            if not i["desk_connected"] or i["tcp_connections"] != 1:
                failures.append(f"{mode}/{case}: desk not connected throughout ({i})")
    results["failures"] = failures
    results["wall_seconds"] = round(time.monotonic() - t_start, 1)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nJSON: {a.out}   ({results['wall_seconds']} s)")
    if failures:
        print("\nIDLE TRAFFIC:\n  " + "\n  ".join(failures), file=sys.stderr)
        if a.assert_idle_zero:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
