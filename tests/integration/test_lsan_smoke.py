"""Leak smoke (scripts/lsan-smoke builds the agent and the shim with AddressSanitizer and runs
this file against them): a program's ordinary session, then the error paths that used to leak
(ByteStream::close() kept its handlers, which held their owner): oversized requests on the
shim's control socket, desk connections that send an empty frame, a pcsc-lite client that
sends an oversized request. Both processes are then stopped with SIGTERM and must exit with
status 0 and no sanitizer report (LeakSanitizer runs at exit; exitcode=23 on a report)."""
from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from core_support import BUILD, GET_CHALLENGE, HANG_GUARD_S, OK

ROUNDS = 20


def _asan_build() -> bool:
    cache = BUILD / "CMakeCache.txt"
    return cache.exists() and "CARDBRIDGE_SANITIZERS:STRING=address" in cache.read_text()


def _send_then_wait_close(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(HANG_GUARD_S)
        s.connect(path)
        try:
            s.sendall(data)
            while s.recv(65536):
                pass  # until the peer closes (what it answers first does not matter here)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before it read everything: closed all the same


def test_no_leak_on_ordinary_and_error_paths(make_rig):
    if not _asan_build():
        pytest.fail(f"{BUILD} is not an AddressSanitizer build: run scripts/lsan-smoke", pytrace=False)
    rig = make_rig(slots=2, cards=({"slot": 0},), name="lsan")
    s = rig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK
    for _ in range(5):
        assert s.call("transmit", apdu=GET_CHALLENGE)["sw"] == "9000"
    s.call("control", code=0x42000D48)
    assert s.rv("disconnect") == OK
    s.close()
    for _ in range(ROUNDS):
        _send_then_wait_close(rig.shim_sock + ".ctl", b"x" * (128 * 1024))  # no newline, too large
        _send_then_wait_close(rig.agent_sock, struct.pack(">I", 0))          # an empty frame
        _send_then_wait_close(rig.shim_sock, struct.pack("<II", 0x7FFFFFF0, 0x0B))  # oversized pcsc-lite request
    # Still serving after all that.
    s = rig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK
    s.close()
    reports = {}
    for name, proc in (("shim", rig.shim), ("agent", rig.agent)):
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(HANG_GUARD_S)
        text = proc.log_text()
        found = [l for l in text.splitlines() if "Sanitizer" in l]
        if rc != 0 or found:
            reports[name] = f"exit status {rc}\n" + "\n".join(text.splitlines()[-60:])
    assert not reports, "\n\n".join(f"== {k}\n{v}" for k, v in reports.items())
