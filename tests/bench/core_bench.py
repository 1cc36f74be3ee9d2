#!/usr/bin/python3
"""Latency of PC/SC calls through CardBridge against the desk's own pcscd, same run.

Emulated desk (private pcscd + vpcd + vicc) -> cardbridge-desk (unix socket) ->
cardbridge-shim, and cb-pcsc (a libpcsclite client) measuring each call directly against
the desk's pcscd (the baseline) and through the shim. Prints a table with medians, p99
and ratios, and writes JSON.

    scripts/core-bench [--iterations N] [--out FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "harness"))
from cbharness import EmulatedDesk, Proc, shim_control, wait_until  # noqa: E402

BUILD = os.environ.get("CARDBRIDGE_BUILD_DIR", os.path.join(ROOT, "build"))
CB_PCSC = os.path.join(BUILD, "tests", "tools", "cb-pcsc")
DESK = os.path.join(BUILD, "client-plugin", "cardbridge-desk")
SHIM = os.path.join(BUILD, "server-shim", "cardbridge-shim")

OPS = [("transmit", "Transmit (GET CHALLENGE)"), ("status", "Status"), ("list", "ListReaders"),
       ("getstatuschange", "GetStatusChange (timeout 0)"), ("establish", "Establish+Release")]


def bench(socket, op, iterations, reader):
    env = dict(os.environ, PCSCLITE_CSOCK_NAME=socket)
    out = subprocess.run([CB_PCSC, "bench", "--op", op, "--iterations", str(iterations), "--reader", reader,
                          "--apdu", "0084000008"], env=env, capture_output=True, text=True, timeout=300)
    d = json.loads(out.stdout)
    if d.get("rv") != "0x00000000":
        raise SystemExit(f"{op} against {socket} failed: {d}")
    return d["latency"]


def shim_stats(socket):
    return shim_control(socket + ".ctl", {"cmd": "status"})["stats"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=5000)
    ap.add_argument("--out", default=os.path.join(BUILD, "core-bench.json"))
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp, EmulatedDesk(slots=2, cards=[0]) as desk:
        desk_sock = os.path.join(tmp, "desk.sock")
        session = os.path.join(tmp, "session")
        os.mkdir(session, 0o700)
        shim_sock = os.path.join(session, "pcscd.comm")
        agent = Proc([DESK, "--listen", "unix:" + desk_sock, "--log-level", "warn"], env=desk.full_env(),
                     name="cardbridge-desk", log_path=os.path.join(tmp, "desk.log")).start()
        shim = Proc([SHIM, "--socket", shim_sock, "--desk", "unix:" + desk_sock, "--log-level", "warn"],
                    name="cardbridge-shim", log_path=os.path.join(tmp, "shim.log")).start()
        try:
            wait_until(lambda: os.path.exists(shim_sock + ".ctl") and shim_stats(shim_sock)["desk_sessions"] >= 1,
                       timeout=10, desc="shim connected to the desk")
            reader = desk.readers[0]
            for op, label in OPS:
                direct = bench(desk.socket_path, op, a.iterations, reader)
                before = shim_stats(shim_sock)["round_trips"]
                via = bench(shim_sock, op, a.iterations, reader)
                trips = shim_stats(shim_sock)["round_trips"] - before
                n = a.iterations + a.iterations // 10
                results.append({"op": op, "label": label, "iterations": a.iterations, "desk": direct, "shim": via,
                                "desk_round_trips_per_call": round(trips / n, 3)})
        finally:
            shim.stop()
            agent.stop()
    print(f"\nPC/SC latency through CardBridge vs. the desk's pcscd ({a.iterations} calls each, microseconds)")
    print(f"{'call':30} {'desk median':>11} {'shim median':>11} {'ratio':>6} {'desk p99':>9} {'shim p99':>9} {'ratio':>6} {'trips/call':>10}")
    for r in results:
        d, s = r["desk"], r["shim"]
        print(f"{r['label']:30} {d['median_us']:11.1f} {s['median_us']:11.1f} {s['median_us'] / d['median_us']:6.2f} "
              f"{d['p99_us']:9.1f} {s['p99_us']:9.1f} {s['p99_us'] / d['p99_us']:6.2f} {r['desk_round_trips_per_call']:10.3f}")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nJSON: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
