"""Bounds on what programs and servers can take (issue 9), with the real processes and sockets:

  shim     at most 200 clients, as pcscd (PCSC_MAX_CONTEXT_THREADS): the next one's connection
           is closed at once; one log line when the limit is hit and one when there is room
           again, however many are refused in between. An fd shortage (EMFILE) on accept is
           logged once per episode, retried with backoff, and the shim serves again after it.
  agent    at most --max-connections server connections (the next one is closed at once) and
           at most --max-contexts PC/SC contexts at the desk's pcscd, all connections together
           (a program past it gets SCARD_E_NO_MEMORY, as from pcscd past its per-client limit);
           each said once in the log, and recovered from when a connection or context goes.

Waits are for events (the shim's client count, a log line, a closed socket); time bounds are
hang guards only."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

from core_support import HANG_GUARD_S, OK, log_lines, wait_until

E_NO_MEMORY = "0x80100006"
SHIM_LIMIT = 200  # pcsc-lite PCSC_MAX_CONTEXT_THREADS


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(HANG_GUARD_S)
    s.connect(path)
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    """True when the peer closed the connection without a byte (recv waits for that event)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _works(rig) -> None:
    s = rig.session("shim")
    s.call("establish")
    assert s.rv("list") == OK
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK
    s.close()


def test_shim_refuses_clients_past_pcscds_limit_and_says_so_once(make_rig):
    rig = make_rig(slots=2, cards=({"slot": 0},), name="climit")
    wait_until(lambda: rig.status()["clients"] == 0, timeout=HANG_GUARD_S, desc="no client left from the set-up")
    held = [_connect(rig.shim_sock) for _ in range(SHIM_LIMIT)]
    try:
        wait_until(lambda: rig.status()["clients"] == SHIM_LIMIT, timeout=HANG_GUARD_S,
                   desc=f"the shim to serve {SHIM_LIMIT} clients")
        refused = 25
        for _ in range(refused):
            s = _connect(rig.shim_sock)
            assert _closed_by_peer(s), "a client past the limit was not refused"
            s.close()
        assert rig.status()["clients"] == SHIM_LIMIT
        held.pop().close()
        wait_until(lambda: rig.status()["clients"] == SHIM_LIMIT - 1, timeout=HANG_GUARD_S,
                   desc="the shim to see a client leave")
        _works(rig)  # a real program is served again
        log = rig.shim_log()
        assert len(log_lines(log, r"client limit reached: 200 clients")) == 1, "not said once"
        assert log_lines(log, rf"accepting clients again \({refused} refused meanwhile\)"), \
            "the end of the episode is not in the log"
    finally:
        for s in held:
            s.close()


def test_shim_at_emfile_refuses_at_once_logs_once_and_recovers(make_rig):
    """Out of descriptors, the shim refuses each waiting client at once with the descriptor it
    keeps in reserve (as pcscd closes a client it cannot serve), says so once, and serves new
    clients as soon as descriptors free up."""
    rig = make_rig(slots=2, cards=({"slot": 0},), name="emfile")
    pid = rig.shim.pid
    wait_until(lambda: rig.status()["clients"] == 0, timeout=HANG_GUARD_S, desc="no client left from the set-up")
    soft, hard = (int(v) for v in subprocess.run(["prlimit", "--pid", str(pid), "--nofile", "--noheadings",
                                                   "--raw", "--output", "SOFT,HARD"], check=True,
                                                  capture_output=True, text=True).stdout.split())
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={in_use}:{hard}"], check=True)
    held = []
    try:
        held = [_connect(rig.shim_sock) for _ in range(12)]  # queued by the kernel; the shim has no fd left
        for s in held:
            assert _closed_by_peer(s), "a client the shim cannot serve is refused, not left waiting"
        log = rig.shim_log()
        assert len(log_lines(log, r"accept failed: .*Too many open files")) == 1, \
            "the fd shortage is not said exactly once:\n" + "\n".join(log_lines(log, r"accept"))
    finally:
        subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"], check=True)
        for s in held:
            s.close()
    _works(rig)
    wait_until(lambda: log_lines(rig.shim_log(), r"accepting clients again \(\d+ failed accepts before\)"),
               timeout=HANG_GUARD_S, desc="the end of the episode in the log")


def test_agent_refuses_connections_past_its_limit_and_says_so_once(make_rig):
    rig = make_rig(slots=2, cards=({"slot": 0},), name="alimit", agent_args=("--max-connections", "1"))
    _works(rig)  # the shim's connection is the one
    for _ in range(5):
        s = _connect(rig.agent_sock)
        assert _closed_by_peer(s), "a connection past --max-connections was not refused"
        s.close()
    log = rig.agent_log()
    assert len(log_lines(log, r"server connection refused: 1 connections already")) == 1, "not said once"
    # The shim goes: room for another one.
    rig.shim.stop()
    wait_until(lambda: log_lines(rig.agent_log(), r"server connections: room again"), timeout=HANG_GUARD_S,
               desc="the agent to see the connection go")
    _, sock = rig.start_extra_shim("shim2")  # waits until it shows the desk's readers
    s = rig.session(sock)
    s.call("establish")
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK


def test_agent_caps_its_desk_contexts_and_says_so_once(make_rig):
    # 3 contexts: the connection's reader monitor and two programs' contexts.
    rig = make_rig(slots=2, cards=({"slot": 0},), name="ctxcap", agent_args=("--max-contexts", "3"))
    reader = rig.desk.readers[0]
    a, b, c = (rig.session("shim", name=n) for n in ("a", "b", "c"))
    for s in (a, b):
        s.call("establish")
        assert s.rv("connect", reader=reader) == OK
    c.call("establish")
    for _ in range(4):  # a program retrying: refused each time, said once
        assert c.rv("connect", reader=reader) == E_NO_MEMORY
    log = rig.agent_log()
    assert len(log_lines(log, r"PC/SC context limit reached")) == 1, "not said once"
    a.close()  # its context is released at the desk
    wait_until(lambda: log_lines(rig.agent_log(), r"PC/SC context limit: room again"), timeout=HANG_GUARD_S,
               desc="the agent to release a context")
    assert c.rv("connect", reader=reader) == OK
