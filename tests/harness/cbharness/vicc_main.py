"""vicc launcher with the knobs /usr/bin/vicc lacks.

Run with /usr/bin/python3 and the PYTHONPATH from support.vicc_pythonpath():

    vicc_main.py --port P [--host H] [--type iso7816] [--atr HEX] [--fix-tlv] [-v...]

--atr HEX   replace the Answer-To-Reset the emulated card reports (vicc 0.8
            has no option for it; the ATR is read by vpcd via the VPCD_CTRL_ATR
            control message after connect, so overriding it before run() is
            enough).  At most 33 bytes; no checksum validation.
--fix-tlv   work around the Debian/vsmartcard 0.8 bug that makes every
            SELECT returning FCI/FCP data crash vicc
            (TLVutils.pack: b"".join() over a bytes object -> TypeError),
            e.g. SELECT MF 00 A4 00 00 02 3F 00.
--test-ins  harness extension for transport tests (not part of vicc):
            INS 0xEE (any CLA without secure messaging, e.g. 80 EE ..):
              with command data  -> echoes the data back, SW 90 00
              without data       -> returns P1P2 (big-endian) bytes of the
                                    pattern 00 01 02 .. FF 00 01 .., SW 90 00
            The response is cut to Le like any vicc response: short Le up to
            256, extended Le up to 65536 (Le=00 00 means 65536); data beyond
            Le is announced with 61xx and fetched with GET RESPONSE.
--gate-dir DIR
            harness extension: a card that answers only when the test says so.
            INS 0xEF (e.g. 80 EF 00 00): the card creates DIR/held.<n> (n = 1, 2, ..
            per gated APDU), then answers 90 00 only once DIR/release.<n> or
            DIR/release.all exists. While it holds the APDU the transfer is in
            flight at the card: a deterministic "slow card" (EmulatedDesk.gate()).
--extended  advertise extended Lc/Le in the ATR (third software function
            table of the card capabilities).  vicc parses extended APDUs
            with or without this flag; only the ATR changes.

Exit status: 0 when vpcd closed the connection, 3 when vpcd could not be
reached, anything else on a crash (traceback on stderr).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _fixed_pack(tlv_data, recalculate_length=False):
    from virtualsmartcard.utils import inttostring

    result = b""
    for data in tlv_data:
        tag, length, value = data[:3]
        if tag in (0xFF, 0x00):
            result += inttostring(tag)
            continue
        if not isinstance(value, bytes):
            value = _fixed_pack(value, recalculate_length)
        if recalculate_length:
            length = len(value)
        t = b""
        while tag > 0:
            t = inttostring(tag & 0xFF) + t
            tag >>= 8
        if length < 0x7F:
            ln = inttostring(length)
        else:
            ln = b""
            while length > 0:
                ln = inttostring(length & 0xFF) + ln
                length >>= 8
            ln = inttostring(0x80 | len(ln)) + ln
        result += t + ln + value
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--type", default="iso7816", choices=["iso7816", "cryptoflex"])
    ap.add_argument("--atr", help="ATR as hex (spaces/colons allowed)")
    ap.add_argument("--fix-tlv", action="store_true")
    ap.add_argument("--test-ins", action="store_true")
    ap.add_argument("--extended", action="store_true")
    ap.add_argument("--gate-dir")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)

    atr = None
    if args.atr:
        atr = bytes.fromhex(args.atr.replace(":", " "))
        if not 2 <= len(atr) <= 33:
            ap.error(f"ATR must be 2..33 bytes, got {len(atr)}")

    level = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO}.get(args.verbose, logging.DEBUG)

    if args.fix_tlv:
        import virtualsmartcard.TLVutils as tlv

        tlv.pack = _fixed_pack  # bertlv_pack() looks `pack` up at call time

    from virtualsmartcard.VirtualSmartcard import VirtualICC

    try:
        vicc = VirtualICC(None, args.type, args.host, args.port, logginglevel=level)
    except SystemExit:
        # VirtualICC logs the reason (at ERROR level) and calls sys.exit()
        print(f"vicc_main: could not connect to vpcd at {args.host}:{args.port}", file=sys.stderr)
        return 3
    if args.extended:
        from virtualsmartcard.VirtualSmartcard import Iso7816OS

        if type(vicc.os) is Iso7816OS:
            vicc.os = Iso7816OS(vicc.os.mf, vicc.os.SAM, extended_length=True)
    if args.test_ins:
        from virtualsmartcard.SWutils import SW

        def test_ins(p1, p2, data):
            if data:
                return SW["NORMAL"], bytes(data)
            n = (p1 << 8) | p2
            return SW["NORMAL"], bytes(i & 0xFF for i in range(n))

        vicc.os.ins2handler[0xEE] = test_ins
    if args.gate_dir:
        from virtualsmartcard.SWutils import SW as SW_  # noqa: N811

        held = [0]

        def gated_ins(p1, p2, data):
            held[0] += 1
            n = held[0]
            with open(os.path.join(args.gate_dir, f"held.{n}"), "w"):
                pass
            print(f"vicc_main: gated APDU {n} held", file=sys.stderr, flush=True)
            release = (os.path.join(args.gate_dir, f"release.{n}"), os.path.join(args.gate_dir, "release.all"))
            while not any(os.path.exists(r) for r in release):
                time.sleep(0.01)
            print(f"vicc_main: gated APDU {n} released", file=sys.stderr, flush=True)
            return SW_["NORMAL"], b""

        vicc.os.ins2handler[0xEF] = gated_ins
    if atr is not None:
        vicc.os.atr = atr
        vicc.os.getATR = lambda: atr  # in case a card OS computes it on demand
    print(f"vicc_main: connected to vpcd at {args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        vicc.run()
    except KeyboardInterrupt:
        pass
    except SystemExit:
        pass  # vpcd closed the connection
    return 0


if __name__ == "__main__":
    sys.exit(main())
