"""Minimal pure-Python client for the pcsc-lite 1.9.x daemon socket.

Why not pyscard?  libpcsclite reads PCSCLITE_CSOCK_NAME once per process and
caches it, so one Python process can only ever talk to one pcscd through
pyscard.  The harness has to watch several daemons (and tests may use pyscard
against a CardBridge shim in the same process), so for its own readiness and
card-presence checks it speaks the two read-only messages of the wire
protocol directly:

    CMD_VERSION (0x11)            body: int32 major, int32 minor, uint32 rv
    CMD_GET_READERS_STATE (0x12)  reply: READER_STATE[PCSCLITE_MAX_READERS_CONTEXTS]

Each request is preceded by struct rxHeader {uint32 size; uint32 command;},
native byte order (the socket is local).  Layout constants are those of
pcsc-lite 1.9.9 (protocol 4:4); a mismatch is detected and reported.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import List

CMD_VERSION = 0x11
CMD_GET_READERS_STATE = 0x12
PROTOCOL_VERSION = (4, 4)

MAX_READERNAME = 128
MAX_ATR_SIZE = 33
PCSCLITE_MAX_READERS_CONTEXTS = 16

# char readerName[128]; uint32 eventCounter; uint32 readerState;
# int32 readerSharing; UCHAR cardAtr[33]; (3 bytes padding) uint32 cardAtrLength;
# uint32 cardProtocol;
_READER_STATE = struct.Struct(f"={MAX_READERNAME}sIIi{MAX_ATR_SIZE}s3xII")
assert _READER_STATE.size == 184

# pcsc-lite internal readerState bits (pcsclite.h), NOT the SCARD_STATE_* ones
SCARD_UNKNOWN = 0x0001
SCARD_ABSENT = 0x0002
SCARD_PRESENT = 0x0004
SCARD_SWALLOWED = 0x0008
SCARD_POWERED = 0x0010
SCARD_NEGOTIABLE = 0x0020
SCARD_SPECIFIC = 0x0040


class PcscWireError(OSError):
    pass


@dataclass(frozen=True)
class ReaderState:
    name: str
    event_counter: int
    state: int
    sharing: int
    atr: bytes
    protocol: int

    @property
    def card_present(self) -> bool:
        return bool(self.state & SCARD_PRESENT)

    @property
    def card_absent(self) -> bool:
        return bool(self.state & SCARD_ABSENT) or not (self.state & SCARD_PRESENT)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PcscWireError(f"pcscd closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def reader_states(socket_path: str, timeout: float = 2.0) -> List[ReaderState]:
    """Return the state of every reader known to the pcscd at socket_path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(socket_path))
        except OSError as exc:
            raise PcscWireError(f"cannot connect to pcscd socket {socket_path}: {exc}") from exc
        s.sendall(struct.pack("=II", 12, CMD_VERSION) + struct.pack("=iiI", *PROTOCOL_VERSION, 0))
        major, minor, rv = struct.unpack("=iiI", _recv_exact(s, 12))
        if rv != 0:
            raise PcscWireError(
                f"pcscd at {socket_path} refused protocol {PROTOCOL_VERSION}: server {major}:{minor}, rv=0x{rv:08X}"
            )
        s.sendall(struct.pack("=II", 0, CMD_GET_READERS_STATE))
        data = _recv_exact(s, _READER_STATE.size * PCSCLITE_MAX_READERS_CONTEXTS)
    out = []
    for i in range(PCSCLITE_MAX_READERS_CONTEXTS):
        name, ev, st, sh, atr, atrlen, proto = _READER_STATE.unpack_from(data, i * _READER_STATE.size)
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
        if not name:
            continue
        out.append(ReaderState(name, ev, st, sh, atr[: min(atrlen, MAX_ATR_SIZE)], proto))
    return out


def reader_names(socket_path: str, timeout: float = 2.0) -> List[str]:
    return [r.name for r in reader_states(socket_path, timeout)]
