"""Impersonation attempts on the desk link, with real processes and real sockets
(TLS ones are in test_tls.py): each is refused before a single byte of CardBridge's protocol
(and so before any APDU, a VERIFY's PIN included) crosses.

  * another local user's UNIX socket where a session's shim dials its desk: the shim checks the
    peer's uid (SO_PEERCRED: the session user's or root) and sends nothing to anyone else;
  * another local user on the desk agent's socket: never served;
  * a loopback TCP port another user could bind first: plain TCP is refused at start unless
    the loudly named --insecure-tcp is given, so nothing is ever dialled.

The session user is uid SESSION_UID (setpriv; no account needed), the attacker `nobody`.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "harness"))
from cbharness import HANG_GUARD_S, EmulatedDesk, Proc, wait_until  # noqa: E402
from core_support import CB_PCSC, client_env, last_json_line  # noqa: E402

BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
DESK = BUILD / "client-plugin" / "cardbridge-desk"
SHIM = BUILD / "server-shim" / "cardbridge-shim"
CDRSESSION = BUILD / "cdrsession" / "cdrsession"
SESSION_UID = 4242
NOBODY = 65534
NO_READERS = "0x8010002E"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (processes as other users)")

# A fake desk: accepts on a UNIX socket and records, per connection, how many bytes it received.
FAKE_DESK = textwrap.dedent("""
    import os, socket, sys
    path, out = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o777)
    s.listen(8)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        n = 0
        while True:
            b = c.recv(65536)
            if not b:
                break
            n += len(b)
        with open(out, "a") as f:
            f.write(f"connection received {n} bytes\\n")
        c.close()
""")


def as_user(uid: int) -> list:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def cb_pcsc(sock: str, *args: str) -> dict:
    """The session's program: cb-pcsc as the session user (the shim serves its own user only)."""
    r = subprocess.run([*as_user(SESSION_UID), str(CB_PCSC), *args], env=client_env(sock), capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
    return last_json_line(r, f"cb-pcsc {args} on {sock}")


def owned_dir(parent: Path, name: str, uid: int) -> Path:
    d = parent / name
    d.mkdir(mode=0o755)
    os.chown(d, uid, uid)
    return d


@pytest.fixture
def base():
    """A directory other uids can traverse (pytest's own tmp_path is root's only), with short socket paths."""
    d = Path(tempfile.mkdtemp(prefix="cbauth-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_shim(base: Path, desk_spec: str, *extra: str) -> tuple:
    d = owned_dir(base, "session", SESSION_UID)
    sock = d / "pcscd.comm"
    log = base / "shim.log"
    shim = Proc([*as_user(SESSION_UID), SHIM, "--socket", sock, "--desk", desk_spec, "--log-level", "debug", *extra],
                name="cardbridge-shim", log_path=log).start()
    wait_until(lambda: sock.exists(), timeout=HANG_GUARD_S, desc="the shim's socket",
               abort=lambda: None if shim.alive() else shim.exit_description())
    return shim, sock, log


def test_shim_sends_nothing_to_another_users_desk_socket(base):
    """User nobody listens where the session's shim dials its desk (e.g. a path in /tmp)."""
    att = owned_dir(base, "attacker", NOBODY)
    record = att / "received"
    fake = Proc([*as_user(NOBODY), sys.executable, "-c", FAKE_DESK, att / "desk.sock", record],
                name="fake-desk", log_path=base / "fake.log").start()
    shim = None
    try:
        wait_until(lambda: "listening" in (base / "fake.log").read_text(), timeout=HANG_GUARD_S, desc="fake desk")
        shim, sock, log = start_shim(base, f"unix:{att / 'desk.sock'}")
        wait_until(lambda: record.exists() and "connection" in record.read_text(), timeout=HANG_GUARD_S,
                   desc="the shim's connection, closed")
        assert record.read_text().splitlines()[0] == "connection received 0 bytes", "not one byte (no hello)"
        assert f"refusing the desk link with uid {NOBODY}" in log.read_text(), log.read_text()[-2000:]
        assert "desk connected" not in log.read_text()
        # the session's programs see no reader: nothing from the impostor is believed either
        r = cb_pcsc(str(sock), "list")
        assert r.get("list") == NO_READERS, r
    finally:
        if shim:
            shim.stop()
        fake.stop()


def test_shim_and_agent_of_the_same_user_connect(base):
    """The same checks let the real desk through (both ends the session user): the refusals here
    are the uid's, not a link that never works."""
    with EmulatedDesk(slots=2, cards=[0]) as desk:
        for p in (desk.dir, *Path(desk.socket_path).parents):
            if p == desk.dir.parent:
                break
            p.chmod(0o755)  # the desk's pcscd socket is 0666; its private directory is opened up for uid 4242
        adir = owned_dir(base, "agent", SESSION_UID)
        agent = Proc([*as_user(SESSION_UID), DESK, "--listen", f"unix:{adir / 'agent.sock'}", "--log-level", "debug"],
                     env=desk.full_env(), name="cardbridge-desk", log_path=base / "agent.log").start()
        try:
            wait_until(lambda: "listening on" in (base / "agent.log").read_text(), timeout=HANG_GUARD_S,
                       desc="agent listening", abort=lambda: None if agent.alive() else agent.exit_description())
            shim, sock, log = start_shim(base, f"unix:{adir / 'agent.sock'}")
            try:
                wait_until(lambda: "desk connected" in log.read_text(), timeout=HANG_GUARD_S, desc="desk connected")
                assert f"identity='uid {SESSION_UID}" in log.read_text()
                wait_until(lambda: f"identity='uid {SESSION_UID}" in (base / "agent.log").read_text(),
                           timeout=HANG_GUARD_S, desc="the agent's audit of the server's uid")
                r = cb_pcsc(str(sock), "transmit", "--apdu", "0084000008")
                assert r["connect"] == "0x00000000" and r["rvs"] == ["0x00000000"], r
            finally:
                shim.stop()
        finally:
            agent.stop()


def test_desk_agent_serves_no_other_user(base):
    """nobody connects to the desk agent's socket: no hello, no reader list, nothing of the card."""
    with EmulatedDesk(slots=2, cards=[0]) as desk:
        adir = owned_dir(base, "agent", 0)
        path = adir / "agent.sock"
        agent = Proc([DESK, "--listen", f"unix:{path}", "--log-level", "debug"], env=desk.full_env(),
                     name="cardbridge-desk", log_path=base / "agent.log").start()
        try:
            wait_until(lambda: "listening on" in (base / "agent.log").read_text(), timeout=HANG_GUARD_S,
                       desc="agent listening")
            # Its socket is the owner's only (0600): the kernel refuses nobody's connect ...
            probe = textwrap.dedent("""
                import socket, sys
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(sys.argv[1])
                except PermissionError:
                    print("refused by the kernel"); sys.exit(0)
                s.settimeout(float(sys.argv[2]))
                print("received", len(s.recv(65536)))
            """)
            r = subprocess.run([*as_user(NOBODY), sys.executable, "-c", probe, path, str(HANG_GUARD_S)],
                               capture_output=True, text=True, timeout=HANG_GUARD_S * 2)
            assert r.stdout.strip() == "refused by the kernel", r
            # ... and with the mode opened up, the agent's own check refuses the uid before its hello.
            path.chmod(0o666)
            r = subprocess.run([*as_user(NOBODY), sys.executable, "-c", probe, path, str(HANG_GUARD_S)],
                               capture_output=True, text=True, timeout=HANG_GUARD_S * 2)
            assert r.stdout.strip() == "received 0", r
            assert f"refusing the server link with uid {NOBODY}" in (base / "agent.log").read_text()
            assert "audit: server connected" not in (base / "agent.log").read_text()
        finally:
            agent.stop()


def test_plain_tcp_is_never_dialled_without_the_insecure_flag(base):
    """A loopback port another user bound first: the shim (and cdrsession) refuse to start, and
    the listener never sees a connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        d = owned_dir(base, "session", SESSION_UID)
        r = subprocess.run([*as_user(SESSION_UID), SHIM, "--socket", d / "pcscd.comm", "--desk",
                            f"tcp:127.0.0.1:{port}"], capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert r.returncode == 2 and "--insecure-tcp" in r.stderr, r
        assert "authenticates no one" in r.stderr
        r = subprocess.run([DESK, "--listen", "tcp:127.0.0.1:0"], capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert r.returncode == 2 and "--insecure-tcp" in r.stderr, r
        with pytest.raises(BlockingIOError):
            listener.accept()  # the shim exited: nothing was ever dialled


def test_insecure_tcp_works_but_says_so(base):
    with EmulatedDesk(slots=2, cards=[0]) as desk:
        agent = Proc([DESK, "--listen", "tcp:127.0.0.1:0", "--insecure-tcp", "--log-level", "info"],
                     env=desk.full_env(), name="cardbridge-desk", log_path=base / "agent.log").start()
        try:
            wait_until(lambda: "listening on" in (base / "agent.log").read_text(), timeout=HANG_GUARD_S,
                       desc="agent listening")
            from cbharness import netinfo
            [port] = wait_until(lambda: netinfo.listening_tcp_ports(agent.pid), timeout=HANG_GUARD_S, desc="port")
            # (logged just after "listening on": waited for, not read at once)
            wait_until(lambda: "INSECURE: plain TCP" in (base / "agent.log").read_text(), timeout=HANG_GUARD_S,
                       desc="the agent's INSECURE warning")
            shim, sock, log = start_shim(base, f"tcp:127.0.0.1:{port}", "--insecure-tcp")
            try:
                wait_until(lambda: "desk connected" in log.read_text(), timeout=HANG_GUARD_S, desc="desk connected")
                text = log.read_text()
                assert "INSECURE: a plain TCP desk link is allowed" in text
                assert "identity='UNAUTHENTICATED tcp 127.0.0.1:" in text
            finally:
                shim.stop()
        finally:
            agent.stop()
