#!/usr/bin/python3
"""Records real middleware logins as cb-replay traces (tests/bench/traces/real/*.trace).

A CDR-like login as a browser makes it: NSS (Firefox's TLS stack, here its tstclnt) logs in to
the CDR stand-in (nginx, TLS 1.2, client certificate required) with the card's authentication
key through a PKCS#11 module, in the "session": PCSCLITE_CSOCK_NAME = a cardbridge-shim whose
desk agent serves an emulated desk holding cb-cardsim (seed 1, the card scripts/wan-report puts
in its reader). tests/tools/replay/cb-record stands in for libpcsclite.so.1 in tstclnt and
writes every PC/SC call; the PIN is written as {PIN}.

  cryptolib-<profile>-cold   the Cryptolib CPS with an empty disk cache (first login on a server)
  cryptolib-<profile>-warm   the same again with the cache the cold login left
  opensc-cps3                OpenSC's module (it keeps no disk cache)

Usage (root: private pcscd and mount namespaces):
  sudo /usr/bin/python3 tests/bench/record_traces.py [--out tests/bench/traces/real] [--only NAME...]
The Cryptolib recordings need scripts/get-cryptolib first; they are skipped otherwise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "harness"))
from cbharness import EmulatedDesk, Proc, reader_states, wait_until  # noqa: E402
from cbharness.cdr import CdrStandIn, nss_login  # noqa: E402
from cbharness.pkcs11 import Middleware, SimCard, find_cryptolib  # noqa: E402

PIN = "1234"
SEED = 1
RECORD = REPO / "tests" / "tools" / "replay" / "cb-record"


def header(name: str, mw: Middleware, profile: str, cache: str, login, calls: int, apdus: int) -> str:
    sha = hashlib.sha256(mw.module.read_bytes()).hexdigest()
    what = {"cold": "empty disk cache (the first login with this card on this server)",
            "warm": "the disk cache left by the cold login",
            "none": "no disk cache (OpenSC)"}[cache]
    return (
        f"# REAL middleware trace: {name}\n"
        f"# Recorded by tests/bench/record_traces.py on {dt.date.today().isoformat()} with tests/tools/replay/cb-record:\n"
        f"# NSS tstclnt (Firefox's TLS stack) logging in to the CDR stand-in (nginx, TLS 1.2, client\n"
        f"# certificate) through {mw.kind} ({mw.module.name}, sha256 {sha[:16]}...), {what},\n"
        f"# PCSCLITE_CSOCK_NAME = a cardbridge-shim; the card: cb-cardsim --profile {profile} --seed {SEED}.\n"
        f"# The page named the holder: {login.holder}. {calls} PC/SC calls, {apdus} APDUs.\n"
        f"# Contexts c1.., card handles h1.., readers r0.. (listing order), pnp = PnP reader; the PIN as\n"
        f"# {{PIN}}; '# t= gap=' = ms since the first call / the previous one in the recorded run.\n"
        f"# Format: tests/tools/replay/README.md. Replay: cb-replay --trace <this> --pin 1234\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "bench" / "traces" / "real")
    ap.add_argument("--build", type=Path, default=Path(os.environ.get("CARDBRIDGE_BUILD_DIR", REPO / "build")))
    ap.add_argument("--only", nargs="*", help="names to record (default: all available)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("record_traces: needs root (pcscd and mount namespaces)", file=sys.stderr)
        return 2
    os.environ["CARDBRIDGE_BUILD_DIR"] = str(a.build)
    cryptolib, why = find_cryptolib()
    specs = [("opensc-cps3", "opensc", "cps3", "none")]
    if cryptolib:
        for profile in ("cps3", "cps4"):
            specs += [(f"cryptolib-{profile}-cold", "cryptolib", profile, "cold"),
                      (f"cryptolib-{profile}-warm", "cryptolib", profile, "warm")]
    else:
        print(f"record_traces: {why}: Cryptolib traces not recorded", file=sys.stderr)
    if a.only:
        specs = [s for s in specs if s[0] in a.only]
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cbrecord-"))
    desk = EmulatedDesk(slots=2, name="record").start()
    procs = []
    card = None
    cdr = None
    states = {}
    try:
        agent_sock, shim_sock = work / "agent.sock", work / "shim" / "pcscd.comm"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PCSCLITE_")}
        procs.append(Proc([str(a.build / "client-plugin" / "cardbridge-desk"), "--listen", f"unix:{agent_sock}",
                           "--log-level", "warn", "--name", "record-desk"], name="agent", log_path=work / "agent.log",
                          env={**env, "PCSCLITE_CSOCK_NAME": desk.socket_path}).start())
        wait_until(agent_sock.exists, timeout=10, desc="desk agent socket")
        procs.append(Proc([str(a.build / "server-shim" / "cardbridge-shim"), "--socket", str(shim_sock), "--desk",
                           f"unix:{agent_sock}", "--log-level", "warn"], name="shim", log_path=work / "shim.log",
                          env=env).start())
        wait_until(shim_sock.exists, timeout=10, desc="shim socket")
        card = SimCard(desk, 0, pin=PIN, seed=SEED, log_dir=work)
        for name, kind, profile, cache in specs:
            if card.proc is None or card.profile != profile:
                if card.proc is not None:
                    card.stop()
                card.start(profile=profile)
                if cdr is None:
                    cdr = CdrStandIn(card.export(work / "ca") / "ca.pem", work / "cdr").start()
            wait_until(lambda: [(r.name, r.card_present) for r in reader_states(str(shim_sock))]
                       == [(r.name, r.card_present) for r in reader_states(desk.socket_path)],
                       timeout=10, desc="the shim in sync with the desk")
            key = (kind, profile)
            if key not in states or cache == "cold":
                if key in states:
                    states[key].cleanup()
                states[key] = Middleware(kind)
            mw = states[key]
            token = mw.run(str(shim_sock), [{"op": "token"}])[0]
            raw = work / f"{name}.raw"
            # Cold: the token query and modutil (which loads the module) fill the cache: empty
            # it right before the recorded login.
            login = nss_login(mw, str(shim_sock), cdr, PIN, token["label"],
                              wrap=[str(RECORD), "--trace", str(raw), "--"],
                              before_login=mw.reset_state if cache == "cold" else None)
            if login.holder is None:
                raise RuntimeError(f"{name}: the login failed: {login.stderr[-2000:]}")
            text = raw.read_text()
            if "UNRECORDABLE" in text:
                raise RuntimeError(f"{name}: a secret other than the PIN went by; not written")
            lines = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
            calls = len(lines)
            apdus = sum(1 for l in lines if l.startswith(("apdu", "getresponse")))
            (a.out / f"{name}.trace").write_text(header(name, mw, profile, cache, login, calls, apdus) + text)
            print(f"{name}: {calls} PC/SC calls, {apdus} APDUs -> {a.out / (name + '.trace')}")
    finally:
        for mw in states.values():
            mw.cleanup()
        if cdr:
            cdr.stop()
        if card:
            card.stop()
        for p in reversed(procs):
            p.stop(grace=3)
        desk.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
