"""Two real users on one server, each with a session shim on a desk of their own.

    desk A (emulated) <- cardbridge-desk tcp:127.0.0.1:PA <- alice's shim (cdrsession start, as alice)
    desk B (emulated) <- cardbridge-desk tcp:127.0.0.1:PB <- bob's shim   (cdrsession start, as bob)

Throw-away users (useradd), each with its own XDG_RUNTIME_DIR (0700, owned by them); everything
of a user runs through `setpriv --reuid --regid --init-groups`. Proves:
  * each user's programs see only their own desk's readers;
  * bob cannot open alice's socket: first the 0700 directory (EACCES), and, with the path made
    reachable on purpose (directories 0755, sockets 0666), the shim's SO_PEERCRED check;
  * `cdrsession doctor` names the wrong user, in text and JSON.

Run:  /usr/bin/python3 -m pytest tests/integration/test_session_users.py -v   (as root)
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

import test_session_support as support
from test_session_support import (CPS3_ATR, HANG_GUARD_S, E_NO_SERVICE, E_UNKNOWN_READER, W_SECURITY_VIOLATION, EXIT, EXIT_WARNING, GET_CHALLENGE, OK, SYSTEM_PYTHON, DeskAgent,
                                  SessionDir, Sessions, ThrowawayUser, cb_pcsc, cdr, check_of, doctor,
                                  export_socket, require_built, run, session_env, shim_pids, shim_reader_names,
                                  short_tmp, wait_until)

# Connects to a socket as the calling user, sends a pcsc-lite CMD_VERSION (protocol 4.4) and
# reports what happened: "EACCES", "ENOENT", "eof" (the server closed on us), or "answered".
PROBE = r'''
import errno, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno))); sys.exit(0)
try:
    s.sendall(struct.pack("<II", 12, 0x11) + struct.pack("<iiI", 4, 4, 0))
    data = s.recv(12)
    print("answered" if data else "eof")
except (ConnectionResetError, BrokenPipeError):
    print("eof")
except socket.timeout:
    print("timeout")
'''


@pytest.fixture(scope="module")
def world():
    require_built()
    if os.getuid() != 0:
        pytest.skip("needs root (useradd, setpriv)")
    base = short_tmp("cbu-")
    made = {"users": [], "desks": []}
    sessions = Sessions()
    try:
        alice = ThrowawayUser("cbal", base)
        made["users"].append(alice)
        bob = ThrowawayUser("cbbo", base)
        made["users"].append(bob)
        desk_a = DeskAgent("ua", friendly_name="Alice Desk Reader", tcp=True, desk_name="DESK-ALICE",
                           cards=({"slot": 0, "atr": CPS3_ATR},))
        made["desks"].append(desk_a)
        desk_b = DeskAgent("ub", friendly_name="Bob Desk Reader", tcp=True, desk_name="DESK-BOB")
        made["desks"].append(desk_b)
        (base / "probe.py").write_text(PROBE)
        made["restore"] = usable_binaries(base, alice.name)
        yield dict(base=base, alice=alice, bob=bob, desk_a=desk_a, desk_b=desk_b, sessions=sessions,
                   probe=str(base / "probe.py"))
    finally:
        sessions.stop_all()
        for k, v in made.get("restore", {}).items():
            setattr(support, k, v)
        for d in made["desks"]:
            d.stop()
        for u in made["users"]:
            u.remove()
        shutil.rmtree(base, ignore_errors=True)


def usable_binaries(base, user: str) -> dict:
    """The users must be able to run cdrsession, the shim and cb-pcsc. A build tree under a private
    directory (a CI clone in /root, say) is not reachable for them: then copies are used, laid out
    as cdrsession expects (the shim next to it). Returns the module values to restore."""
    probe = run(["test", "-x", support.CDRSESSION], session_env(None), user=user)
    if probe.returncode == 0 and run(["test", "-x", support.CB_PCSC], session_env(None), user=user).returncode == 0:
        return {}
    old = {k: getattr(support, k) for k in ("CDRSESSION", "SHIM", "CB_PCSC")}
    bindir = base / "bin"
    bindir.mkdir(mode=0o755)
    for k, v in old.items():
        dst = bindir / Path(v).name
        shutil.copy2(v, dst)
        dst.chmod(0o755)
        setattr(support, k, dst)
    return old


def start_as(w, user: ThrowawayUser, desk: DeskAgent) -> SessionDir:
    t0 = time.monotonic()
    r, sd = w["sessions"].start(user.env(), "--desk", desk.spec, user=user.name)
    assert export_socket(r.stdout) == sd.socket == f"{user.rt}/cardbridge/default/pcscd.comm"
    wait_until(lambda: shim_reader_names(sd.socket, user=user.name) == desk.readers, timeout=HANG_GUARD_S,
               desc=f"{user.name}'s readers", details=lambda: sd.logs() + desk.report())
    print(f"{user.name}: shim up and desk readers visible in {(time.monotonic() - t0) * 1000:.0f} ms")
    return sd


def probe(w, user: ThrowawayUser, sock: str) -> str:
    r = run([SYSTEM_PYTHON, w["probe"], sock], session_env(None), user=user.name)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture(scope="module")
def both(world):
    w = world
    a = start_as(w, w["alice"], w["desk_a"])
    b = start_as(w, w["bob"], w["desk_b"])
    return w, a, b


def test_each_user_sees_only_their_own_desk(both):
    w, a, b = both
    alice, bob, desk_a, desk_b = w["alice"], w["bob"], w["desk_a"], w["desk_b"]
    # The pieces belong to their user.
    for user, sd in ((alice, a), (bob, b)):
        st = os.stat(sd.dir)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700), (sd.dir, oct(st.st_mode))
        st = os.stat(sd.socket)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o600)
        st = os.stat(user.rt)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700)
        [pid] = shim_pids(sd.socket)
        assert os.stat(f"/proc/{pid}").st_uid == user.uid, "the shim must run as the session's user"

    assert not set(desk_a.readers) & set(desk_b.readers)
    assert shim_reader_names(a.socket, user=alice.name) == desk_a.readers
    assert shim_reader_names(b.socket, user=bob.name) == desk_b.readers

    # Each user's card traffic reaches their own desk's card.
    t = cb_pcsc(a.socket, "transmit", "--reader", desk_a.readers[0], "--apdu", GET_CHALLENGE, user=alice.name)
    assert t["connect"] == OK and t["rvs"] == [OK], t
    t = cb_pcsc(b.socket, "transmit", "--reader", desk_b.readers[0], "--apdu", GET_CHALLENGE, user=bob.name)
    assert t["connect"] == OK and t["rvs"] == [OK], t
    # Alice's reader name does not exist for bob, not even by name.
    t = cb_pcsc(b.socket, "transmit", "--reader", desk_a.readers[0], "--apdu", GET_CHALLENGE, user=bob.name)
    assert t["connect"] == E_UNKNOWN_READER, t

    # `cdrsession status` as each user: their desk, their readers.
    for user, desk_name, desk in ((alice, "DESK-ALICE", desk_a), (bob, "DESK-BOB", desk_b)):
        r = cdr("status", "--json", env=user.env(), user=user.name)
        assert r.returncode == 0, r
        st = json.loads(r.stdout)
        assert st["desk"]["connected"] and st["desk"]["name"] == desk_name, st
        assert [x["name"] for x in st["readers"]] == desk.readers
        assert st["uid"] == user.uid


def test_the_other_users_socket_is_closed_twice(both):
    w, a, b = both
    alice, bob = w["alice"], w["bob"]
    # Barrier 1: alice's runtime directory is 0700.
    assert probe(w, bob, a.socket) == "EACCES"
    assert probe(w, alice, b.socket) == "EACCES"
    assert probe(w, bob, b.socket) == "answered"  # the probe itself works
    r = cb_pcsc(a.socket, "list", user=bob.name)
    assert r["establish"] == E_NO_SERVICE, r

    # Barrier 2: make the path reachable on purpose; the shim still refuses bob (SO_PEERCRED).
    paths = [alice.rt, f"{alice.rt}/cardbridge", a.dir, a.socket, a.ctl]
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in paths}
    try:
        for p in paths[:3]:
            os.chmod(p, 0o755)
        for p in paths[3:]:
            os.chmod(p, 0o666)
        assert probe(w, bob, a.socket) == "eof", "bob connected to alice's shim and was not refused"
        assert probe(w, bob, a.ctl) == "eof"
        # libpcsclite: SCARD_E_NO_SERVICE if the refusal beats its CMD_VERSION, else
        # SCARD_W_SECURITY_VIOLATION (what it also says when pcscd's polkit check refuses a client).
        r = cb_pcsc(a.socket, "list", user=bob.name)
        assert r["establish"] in (E_NO_SERVICE, W_SECURITY_VIOLATION), r
        s = cdr("status", "--socket", a.socket, env=bob.env(), user=bob.name)
        # (the refusal wins the race with the request or not: "send failed" or "closed the connection")
        assert s.returncode == 3 and ("closed the connection" in s.stdout or "send failed" in s.stdout), s
        # The doctor, as bob, with alice's socket in PCSCLITE_CSOCK_NAME: wrong user (text and JSON).
        env = bob.env(PCSCLITE_CSOCK_NAME=a.socket)
        code, text, _ = doctor(env, user=bob.name)
        assert code == EXIT["user"], text
        assert "[FAIL] user" in text and f"uid {alice.uid}" in text and "Verdict: BROKEN: owner" in text, text
        code, rep, _ = doctor(env, user=bob.name, json_out=True)
        assert code == rep["exit_code"] == EXIT["user"] and rep["first_problem"] == "user", rep
        assert check_of(rep, "shim")["result"] == "ok" and check_of(rep, "user")["result"] == "failed"
        # Alice's own programs are unaffected, and her shim logged the refusals.
        assert shim_reader_names(a.socket, user=alice.name) == w["desk_a"].readers
        wait_until(lambda: f"refused a client of uid {bob.uid}" in a.logs(), timeout=HANG_GUARD_S,
                   desc="the refusal in alice's shim log", details=a.logs)
    finally:
        for p, m in modes.items():
            os.chmod(p, m)
    assert probe(w, bob, a.socket) == "EACCES"


def test_doctor_wrong_user_with_private_directories(both):
    """The real case: PCSCLITE_CSOCK_NAME points into another user's (0700) runtime directory."""
    w, a, b = both
    bob = w["bob"]
    env = bob.env(PCSCLITE_CSOCK_NAME=a.socket)
    code, text, _ = doctor(env, user=bob.name)
    assert code == EXIT["user"] and "[FAIL] user" in text, text
    code, rep, _ = doctor(env, user=bob.name, json_out=True)
    assert code == EXIT["user"] and rep["first_problem"] == "user", rep


def test_each_users_doctor_is_healthy_in_its_own_session(both):
    w, a, b = both
    for user, sd, card in ((w["alice"], a, "cps3"), (w["bob"], b, "unknown")):
        env = user.env(PCSCLITE_CSOCK_NAME=sd.socket)
        code, rep, _ = doctor(env, "--pings", "5", user=user.name, json_out=True)
        assert rep["session"]["uid"] == user.uid and rep["session"]["socket"] == sd.socket
        assert [c["kind"] for c in rep["cards"]] == [card], rep
        # The test desks are plain TCP (--insecure-tcp): the doctor's first warning, always; the
        # rest of each user's chain is healthy, and each sees its own card.
        assert code == EXIT_WARNING and rep["first_problem"] == "channel", rep
        assert "plain TCP" in next(c for c in rep["checks"] if c["id"] == "channel")["detail"], rep
        warned = [c["id"] for c in rep["checks"] if c["result"] != "ok"]
        assert warned == (["channel"] if card == "cps3" else ["channel", "card-type"]), rep
