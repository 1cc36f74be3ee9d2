"""pyscard-based PC/SC probe, run as a separate process.

libpcsclite caches PCSCLITE_CSOCK_NAME per process, so every probe of a
different pcscd (desk or CardBridge shim) needs its own process.  Run with
/usr/bin/python3 and PCSCLITE_CSOCK_NAME in the environment; every command
prints JSON (one object, or one object per line for `watch`).

  readers
  status    [--reader R]
  transmit  --reader R [--share shared|exclusive] [--proto any|t0|t1] APDU...
            (APDU is hex; "@path" reads the hex from a file, for APDUs too
            long for a command line)
  bench     --reader R --apdu HEX [-n N] [--warmup W]
  watch     --reader R [--timeout S] [--count K]
            prints {"ready": ...} once the initial state is known, then one
            line per change: {"t": <time.monotonic()>, "flags": [...], ...}.
            time.monotonic() is CLOCK_MONOTONIC, comparable across processes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from smartcard import scard as S

FLAG_NAMES = [
    ("IGNORE", S.SCARD_STATE_IGNORE), ("CHANGED", S.SCARD_STATE_CHANGED), ("UNKNOWN", S.SCARD_STATE_UNKNOWN),
    ("UNAVAILABLE", S.SCARD_STATE_UNAVAILABLE), ("EMPTY", S.SCARD_STATE_EMPTY), ("PRESENT", S.SCARD_STATE_PRESENT),
    ("ATRMATCH", S.SCARD_STATE_ATRMATCH), ("EXCLUSIVE", S.SCARD_STATE_EXCLUSIVE), ("INUSE", S.SCARD_STATE_INUSE),
    ("MUTE", S.SCARD_STATE_MUTE),
]


def flags(state: int):
    return [n for n, b in FLAG_NAMES if state & b]


def rvs(rv: int) -> str:
    return f"0x{rv & 0xFFFFFFFF:08X}"


def out(obj) -> None:
    print(json.dumps(obj), flush=True)


def fail(where: str, rv: int) -> int:
    out({"error": where, "rv": rvs(rv), "message": S.SCardGetErrorMessage(rv)})
    return 1


def ctx():
    rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
    if rv != S.SCARD_S_SUCCESS:
        raise SystemExit(fail("SCardEstablishContext", rv))
    return hc


def cmd_readers(a) -> int:
    hc = ctx()
    rv, readers = S.SCardListReaders(hc, [])
    if rv == S.SCARD_E_NO_READERS_AVAILABLE:
        readers = []
    elif rv != S.SCARD_S_SUCCESS:
        return fail("SCardListReaders", rv)
    out({"readers": list(readers)})
    return 0


def cmd_status(a) -> int:
    hc = ctx()
    rv, readers = S.SCardListReaders(hc, [])
    if rv != S.SCARD_S_SUCCESS:
        return fail("SCardListReaders", rv)
    if a.reader:
        readers = [a.reader]
    rv, states = S.SCardGetStatusChange(hc, 0, [(r, S.SCARD_STATE_UNAWARE) for r in readers])
    if rv != S.SCARD_S_SUCCESS:
        return fail("SCardGetStatusChange", rv)
    out({"readers": [{"reader": r, "flags": flags(st), "event_count": (st >> 16) & 0xFFFF,
                      "atr": bytes(atr).hex()} for r, st, atr in states]})
    return 0


def connect(hc, reader, share, proto):
    share = {"shared": S.SCARD_SHARE_SHARED, "exclusive": S.SCARD_SHARE_EXCLUSIVE}[share]
    proto = {"any": S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1, "t0": S.SCARD_PROTOCOL_T0,
             "t1": S.SCARD_PROTOCOL_T1}[proto]
    rv, h, active = S.SCardConnect(hc, reader, share, proto)
    if rv != S.SCARD_S_SUCCESS:
        raise SystemExit(fail("SCardConnect", rv))
    return h, active


def cmd_transmit(a) -> int:
    hc = ctx()
    h, proto = connect(hc, a.reader, a.share, a.proto)
    rv, name, state, p, atr = S.SCardStatus(h)
    result = {"reader": a.reader, "protocol": "T=1" if proto == S.SCARD_PROTOCOL_T1 else "T=0",
              "atr": bytes(atr).hex(), "responses": []}
    for hexapdu in a.apdus:
        if hexapdu.startswith("@"):
            with open(hexapdu[1:]) as f:
                hexapdu = "".join(f.read().split())
        apdu = list(bytes.fromhex(hexapdu.replace(":", " ")))
        t0 = time.perf_counter()
        rv, resp = S.SCardTransmit(h, proto, apdu)
        ms = (time.perf_counter() - t0) * 1000
        entry = {"apdu": bytes(apdu).hex() if len(apdu) <= 512 else f"{len(apdu)} bytes",
                 "rv": rvs(rv), "ms": round(ms, 3)}
        if rv == S.SCARD_S_SUCCESS:
            resp = bytes(resp)
            entry.update(resp=resp.hex(), data=resp[:-2].hex(), sw=resp[-2:].hex())
        else:
            entry["message"] = S.SCardGetErrorMessage(rv)
        result["responses"].append(entry)
    S.SCardDisconnect(h, S.SCARD_LEAVE_CARD)
    out(result)
    return 0


def cmd_bench(a) -> int:
    hc = ctx()
    h, proto = connect(hc, a.reader, "shared", "any")
    apdu = list(bytes.fromhex(a.apdu))
    times = []
    for i in range(a.warmup + a.n):
        t0 = time.perf_counter()
        rv, resp = S.SCardTransmit(h, proto, apdu)
        dt = (time.perf_counter() - t0) * 1000
        if rv != S.SCARD_S_SUCCESS:
            return fail(f"SCardTransmit #{i}", rv)
        if i >= a.warmup:
            times.append(dt)
    S.SCardDisconnect(h, S.SCARD_LEAVE_CARD)
    times.sort()
    out({"apdu": a.apdu, "n": len(times), "mean_ms": round(statistics.mean(times), 3),
         "median_ms": round(statistics.median(times), 3), "min_ms": round(times[0], 3),
         "p95_ms": round(times[int(0.95 * (len(times) - 1))], 3), "max_ms": round(times[-1], 3),
         "last_resp": bytes(resp).hex()})
    return 0


def cmd_watch(a) -> int:
    hc = ctx()
    rv, states = S.SCardGetStatusChange(hc, 0, [(a.reader, S.SCARD_STATE_UNAWARE)])
    if rv != S.SCARD_S_SUCCESS:
        return fail("SCardGetStatusChange(initial)", rv)
    _, cur, atr = states[0]
    out({"ready": True, "t": time.monotonic(), "flags": flags(cur), "atr": bytes(atr).hex()})
    deadline = time.monotonic() + a.timeout
    seen = 0
    while seen < a.count:
        remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if remaining_ms == 0:
            out({"timeout": True, "t": time.monotonic()})
            return 2
        rv, states = S.SCardGetStatusChange(hc, remaining_ms, [(a.reader, cur & ~S.SCARD_STATE_CHANGED)])
        t = time.monotonic()
        if rv == S.SCARD_E_TIMEOUT:
            out({"timeout": True, "t": t})
            return 2
        if rv != S.SCARD_S_SUCCESS:
            return fail("SCardGetStatusChange", rv)
        _, new, atr = states[0]
        if (new & ~S.SCARD_STATE_CHANGED) == (cur & ~S.SCARD_STATE_CHANGED):
            cur = new
            continue
        cur = new
        seen += 1
        out({"t": t, "flags": flags(new), "event_count": (new >> 16) & 0xFFFF, "atr": bytes(atr).hex()})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("readers")
    p = sub.add_parser("status")
    p.add_argument("--reader")
    p = sub.add_parser("transmit")
    p.add_argument("--reader", required=True)
    p.add_argument("--share", default="shared", choices=["shared", "exclusive"])
    p.add_argument("--proto", default="any", choices=["any", "t0", "t1"])
    p.add_argument("apdus", nargs="+")
    p = sub.add_parser("bench")
    p.add_argument("--reader", required=True)
    p.add_argument("--apdu", required=True)
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p = sub.add_parser("watch")
    p.add_argument("--reader", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--count", type=int, default=1)
    a = ap.parse_args(argv)
    return {"readers": cmd_readers, "status": cmd_status, "transmit": cmd_transmit,
            "bench": cmd_bench, "watch": cmd_watch}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
