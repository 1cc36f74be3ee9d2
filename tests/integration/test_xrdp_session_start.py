"""Sessions start everywhere, or say why: a real xrdp session on a host without logind.

    xrdp + sesman in a private mount namespace (xrdp_fixture.XrdpServer) whose sessions get no
    XDG_RUNTIME_DIR and no /run/user/UID -- as in containers, or with an xrdp PAM stack without
    pam_systemd -- and a stock xfreerdp with the add-in logging in:

    fallback  /run/cardbridge exists (root, 1733: what cardbridge-server's tmpfiles.d entry and
              postinst make): the product's hook starts the session's shim in
              /run/cardbridge/UID/cardbridge/xrdp-N (0700, the user's), the session's programs see
              the desk's readers, the doctor finds the chain up to the card.
    none      no /run/cardbridge either: the start fails; the session is NOT marked as started,
              exports no PCSCLITE_CSOCK_NAME but CARDBRIDGE_START_ERROR with the reason; the
              reason is in the session's log; the doctor, run in the session's context, names the
              failed start first (exit 2) with that reason.
    no entry  (a logind-like private runtime directory) xrdp.ini lacks [Channels] CBRIDGE=true and
              the client uses the static channel: the session starts, no desk connects, and the
              doctor names the missing entry and `cdrsession enable xrdp` (exit 2, critical).

Run:  /usr/bin/python3 -m pytest tests/integration/test_xrdp_session_start.py -v      (as root)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xrdp_fixture as xf  # noqa: E402
from cbharness import EmulatedDesk, artefact, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, xrdp-sesman)")


@pytest.fixture(scope="module")
def parts():
    gone = xf.missing("xrdp", "xrdp-sesman", "/usr/sbin/xrdp-chansrv", "/usr/lib/xorg/Xorg", xf.XFREERDP, "Xvfb",
                      "unshare", "nsenter", "setpriv", *map(str, (xf.SHIM, xf.CDRSESSION, xf.CB_PCSC)))
    if not xf.ADDIN.exists():
        gone.append(str(xf.ADDIN))
    if gone:
        pytest.fail(f"missing: {', '.join(gone)}", pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="cbxrdp-start-"))
    desk = EmulatedDesk(slots=2, name="startdesk")
    desk.start()
    xvfb = None
    try:
        desk.insert_card(0)
        xvfb = xf.Xvfb(base / "xvfb.log").start()
        addin = xf.AddinMount(xf.ADDIN, base / "addin")
        yield desk, xvfb, addin, base
    finally:
        if xvfb:
            xvfb.stop()
        desk.stop()
        shutil.rmtree(base, ignore_errors=True)


class Rig:
    def __init__(self, parts, runtime: str, channel_entry: bool = True):
        self.desk, self.xvfb, self.addin, base = parts
        self.base = base / f"{runtime}-{channel_entry}"
        self.base.mkdir()
        self.server = xf.XrdpServer(runtime=runtime, channel_entry=channel_entry).start()
        self.client = None
        self.session = None

    def login(self, name: str) -> xf.XrdpSession:
        self.client = xf.StockClient(self.addin, self.xvfb, self.server.port, desk_socket=self.desk.socket_path,
                                     log_path=self.base / "xfreerdp.log", home=self.base / "home",
                                     user=self.server.user, password=self.server.password, desk_name=name)
        self.client.start()
        self.session = self.server.wait_session(timeout=30)
        return self.session

    def in_session(self, path: str) -> str:
        """A path of the session's namespace, reachable by the session's user (through its leader)."""
        return f"/proc/{self.session.leader}/root{path}"

    def doctor(self, text: bool = False, **env) -> tuple:
        """`cdrsession doctor --json` (text: its text form) as the session's user, in its namespace
        and environment."""
        base_env = {"PATH": "/usr/bin:/bin", "HOME": "/", "XRDP_SESSION": "1", "DISPLAY": self.session.display}
        if self.server.runtime == "private":
            base_env["XDG_RUNTIME_DIR"] = str(self.server.runtime_dir)
        base_env.update(env)
        argv = ["nsenter", "-m", "-t", str(self.session.leader), "setpriv", "--reuid", str(self.server.uid),
                "--regid", str(self.server.uid), "--clear-groups", "env", "-i",
                *[f"{k}={v}" for k, v in base_env.items()], str(self.server.cdrsession), "doctor",
                *([] if text else ["--json"]), "--pings", "3"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if text:
            return r.returncode, r.stdout + r.stderr
        return r.returncode, json.loads(r.stdout) if r.stdout.strip().startswith("{") else {"raw": r.stdout + r.stderr}

    def report(self) -> str:
        parts = [self.server.report()]
        if self.client:
            parts.append(self.client.failure_report(25))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.client:
            self.client.stop(grace=3)
        self.server.stop()


def test_session_starts_without_a_logind_runtime_dir(parts):
    rig = Rig(parts, "fallback")
    try:
        s = rig.login("start-fallback")
        uid = rig.server.uid
        assert s.started and not s.start_error, f"{s.start_error}\n{rig.report()}"
        want_dir = f"/run/cardbridge/{uid}/cardbridge/xrdp-{s.display_number}"
        assert s.socket == f"{want_dir}/pcscd.comm", s.socket
        for path, mode in ((f"/run/cardbridge/{uid}", 0o700), (want_dir, 0o700)):
            st = os.lstat(rig.in_session(path))
            assert st.st_uid == uid and (st.st_mode & 0o7777) == mode, (path, oct(st.st_mode), st.st_uid)
        base = os.lstat(rig.in_session("/run/cardbridge"))
        assert base.st_uid == 0 and (base.st_mode & 0o7777) == 0o1733, oct(base.st_mode)

        rig.client.wait_channel_open()
        sock = rig.in_session(s.socket)
        want = rig.desk.readers
        wait_until(lambda: xf.reader_names(sock, uid=uid) == want, timeout=20, desc=f"readers {want} in the session",
                   details=rig.report)
        r = xf.cb_pcsc(sock, "transmit", "--reader", want[0], "--apdu", xf.GET_CHALLENGE, "--count", "2", uid=uid)
        assert r.get("connect") == xf.OK, r

        code, doc = rig.doctor(PCSCLITE_CSOCK_NAME=s.socket)
        ok = {c["id"]: c["result"] for c in doc.get("checks", [])}
        print(json.dumps(doc, indent=1)[:3000])
        for check in ("environment", "shim", "user", "channel", "readers", "card"):
            assert ok.get(check) == "ok", (check, doc)
        assert "start" not in ok, doc
    finally:
        rig.stop()


def test_failed_start_is_not_marked_and_says_why(parts):
    rig = Rig(parts, "none")
    try:
        s = rig.login("start-none")
        uid = rig.server.uid
        assert not s.started, f"a failed start was marked as started\n{rig.report()}"
        assert s.socket == "", f"PCSCLITE_CSOCK_NAME exported after a failed start: {s.socket}"
        assert f"/run/user/{uid}" in s.start_error and "pam_systemd" in s.start_error, s.start_error
        log = "".join(p.read_text(errors="replace") for p in rig.server.session_logdir.glob("session-*.log"))
        assert "cannot prepare the session's private directory" in log, log[-3000:]

        code, doc = rig.doctor(CARDBRIDGE_START_ERROR=s.start_error)
        print(json.dumps(doc, indent=1)[:3000])
        assert code == 2, (code, doc)
        assert doc["first_problem"] == "start", doc
        start = doc["checks"][0]
        assert start["id"] == "start" and start["result"] == "failed", start
        assert f"/run/user/{uid}" in start["detail"], start
    finally:
        rig.stop()


def test_missing_channel_entry_is_named(parts):
    rig = Rig(parts, "private", channel_entry=False)
    try:
        s = rig.login("no-entry")
        assert s.started and s.socket, f"{s.start_error}\n{rig.report()}"
        rig.client.wait_channel_open()   # the client's end opens; xrdp drops the disallowed channel
        code, doc = rig.doctor(PCSCLITE_CSOCK_NAME=s.socket)
        print(json.dumps(doc, indent=1)[:3000])
        assert code == 2 and doc["first_problem"] == "channel", (code, doc)
        channel = next(c for c in doc["checks"] if c["id"] == "channel")
        assert "[Channels] CBRIDGE=true is missing" in channel["detail"], channel
        assert "cdrsession enable xrdp" in channel["advice"], channel
        code_t, said = rig.doctor(text=True, PCSCLITE_CSOCK_NAME=s.socket)
        assert code_t == 2 and "CBRIDGE=true" in said, said
        artefact("doctor-xrdp-without-channel-entry.txt", f"$ cdrsession doctor   (exit {code_t})\n{said}")
    finally:
        rig.stop()
