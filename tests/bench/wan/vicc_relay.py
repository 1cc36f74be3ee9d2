#!/usr/bin/python3
"""vsmartcard's relay (`vicc --type relay`) made to run on Python 3.

Debian 12's python3-virtualsmartcard 3.3 ships RelayOS with Python 2 string handling:
getATR() returns a str and execute() maps ord() over bytes, so `vicc --type relay` dies
with "TypeError: can't concat str to bytes" on the first ATR request. This launcher uses
vsmartcard's own VirtualICC (the vpcd protocol loop) and RelayOS (pyscard session to the
local reader) and only replaces those two methods with byte-correct versions, so what is
measured is vsmartcard's relay design: one vpcd exchange (one WAN round trip) per APDU.

Usage (same meaning as vicc's options):
  vicc_relay.py --hostname HOST --port PORT [--reader N] [-v]
Needs PYTHONPATH=/usr/lib/python3/site-packages/virtualsmartcard:DIR with DIR/Crypto ->
/usr/lib/python3/dist-packages/Cryptodome (vicc imports Crypto), and PCSCLITE_CSOCK_NAME
pointing at the desk's pcscd.
"""
from __future__ import annotations

import argparse
import logging
import sys

import smartcard.Exceptions
from virtualsmartcard.cards.Relay import RelayOS
from virtualsmartcard.VirtualSmartcard import VirtualICC


def _get_atr(self) -> bytes:
    try:
        atr = self.session.getATR()
    except smartcard.Exceptions.CardConnectionException:
        try:  # after a power down the session is gone: reconnect, as RelayOS does
            self.session.close()
            self.session = smartcard.Session(self.reader)
            atr = self.session.getATR()
        except smartcard.Exceptions.CardConnectionException as e:
            logging.error("Error getting ATR: %s", e)
            sys.exit(1)
    return bytes(atr)


def _execute(self, msg: bytes) -> bytes:
    try:
        data, sw1, sw2 = self.session.cs.connection.transmit(list(msg))
    except smartcard.Exceptions.CardConnectionException as e:
        logging.error("Error transmitting APDU: %s", e)
        sys.exit(1)
    return bytes(list(data) + [sw1, sw2])


RelayOS.getATR = _get_atr
RelayOS.execute = _execute


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-H", "--hostname", default="localhost")
    p.add_argument("-P", "--port", type=int, default=35963)
    p.add_argument("--reader", type=int, default=0)
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args()
    level = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO}.get(a.verbose, logging.DEBUG)
    vicc = VirtualICC(None, "relay", a.hostname, a.port, readernum=a.reader, logginglevel=level)
    try:
        vicc.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
