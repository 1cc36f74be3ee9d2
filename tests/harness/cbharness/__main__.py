"""Command line:  PYTHONPATH=tests/harness /usr/bin/python3 -m cbharness ...

  desk [--slots N] [--no-card] [--atr HEX] [--fix-tlv] [--debug] [--apdu]
       [--no-preload] [--vicc-verbose N] [--print-env] [--env-file PATH] [--keep]
      Start an emulated desk in the foreground.  When it is ready, prints
      `PCSCLITE_CSOCK_NAME=<socket>` on stdout (with --print-env instead
      shell `export` lines for PCSCLITE_CSOCK_NAME, CBDESK_DIR,
      CBDESK_PCSCD_PID, CBDESK_READERS (';'-separated), CBDESK_READER0..n),
      optionally writes the same KEY=VALUE lines to --env-file (atomically,
      only once ready), then runs until SIGINT/SIGTERM/SIGHUP and cleans up.

  pcsc --socket PATH <pcsc_tool arguments>
      Run a pyscard probe (readers/status/transmit/bench/watch) against PATH.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

from .desk import EmulatedDesk
from .pcsc import TOOL, _env
from .support import SYSTEM_PYTHON
from .waiting import HarnessError


class _Stop(Exception):
    pass


def _desk(a) -> int:
    def on_signal(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    desk = EmulatedDesk(slots=a.slots, cards=[] if (a.no_card or a.atr) else [0], debug=a.debug, apdu_log=a.apdu,
                        fix_tlv=a.fix_tlv, keep_dir=a.keep or None, vicc_verbose=a.vicc_verbose,
                        preload=not a.no_preload)
    try:
        try:
            desk.start()
            if a.atr and not a.no_card:
                desk.insert_card(0, a.atr)
        except HarnessError as exc:
            print(f"cbharness desk: start-up failed:\n{exc}", file=sys.stderr)
            return 1
        values = {
            "PCSCLITE_CSOCK_NAME": desk.socket_path,
            "CBDESK_DIR": str(desk.dir),
            "CBDESK_PCSCD_PID": str(desk.pcscd_pid),
            "CBDESK_READERS": ";".join(desk.readers),
        }
        values.update({f"CBDESK_READER{i}": r for i, r in enumerate(desk.readers)})
        if a.env_file:
            tmp = f"{a.env_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                for k, v in values.items():
                    f.write(f"{k}={shlex.quote(v)}\n")
            os.replace(tmp, a.env_file)
        if a.print_env:
            for k, v in values.items():
                print(f"export {k}={shlex.quote(v)}")
        else:
            print(f"PCSCLITE_CSOCK_NAME={desk.socket_path}")
        sys.stdout.flush()
        card = "no card" if a.no_card else f"card in {desk.readers[0]!r}"
        print(f"cbharness desk ready: {desk.dir}, readers {desk.readers}, {card}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        reported = set()
        while True:
            time.sleep(0.5)
            if not desk.pcscd.alive():
                print(f"cbharness desk: pcscd died\n{desk.pcscd.failure_report()}", file=sys.stderr)
                return 1
            for slot in range(desk.slots):
                p = desk.vicc(slot)
                if p is not None and not p.alive() and slot not in reported:
                    reported.add(slot)
                    print(f"cbharness desk: card emulator in slot {slot} exited (card removed)\n"
                          f"{p.failure_report(15)}", file=sys.stderr, flush=True)
    except _Stop as s:
        print(f"cbharness desk: {s}, stopping", file=sys.stderr)
        return 0
    finally:
        # further signals must not interrupt the cleanup
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        desk.stop()
        if a.env_file:
            try:
                os.unlink(a.env_file)
            except OSError:
                pass


def _pcsc(a, rest) -> int:
    return subprocess.call([SYSTEM_PYTHON, TOOL, *rest], env=_env(a.socket))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cbharness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("desk", help="run an emulated desk in the foreground")
    d.add_argument("--slots", type=int, default=2, help="reader slots (rounded up to even, default 2)")
    d.add_argument("--no-card", action="store_true", help="do not insert a card into slot 0")
    d.add_argument("--atr", help="ATR (hex) for the card in slot 0")
    d.add_argument("--fix-tlv", action="store_true", help="vicc without the SELECT-with-FCI crash")
    d.add_argument("--no-preload", action="store_true", help="no TCP_NODELAY preload (~40 ms per APDU)")
    d.add_argument("--debug", action="store_true", help="pcscd --debug")
    d.add_argument("--apdu", action="store_true", help="pcscd --apdu (with --debug)")
    d.add_argument("--vicc-verbose", type=int, default=0, help="vicc -v count (3 logs APDUs)")
    d.add_argument("--print-env", action="store_true", help="print shell export lines")
    d.add_argument("--env-file", help="write KEY=VALUE lines here once ready (removed on exit)")
    d.add_argument("--keep", action="store_true", help="keep the desk directory (logs) on exit")
    p = sub.add_parser("pcsc", help="pyscard probe against a socket (see pcsc_tool.py)")
    p.add_argument("--socket", required=True)
    a, rest = ap.parse_known_args(argv)
    if a.cmd == "desk":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return _desk(a)
    return _pcsc(a, rest)


if __name__ == "__main__":
    sys.exit(main())
