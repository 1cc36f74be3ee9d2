"""`cdrsession status` and the audit trail: which desk, which reader, which card (ATR, never APDU
contents) was connected and when, per session; the events also go to syslog (facility authpriv).

Syslog: the test's own receiver (a datagram socket) gets what the shim's syslog(3) sends to
/dev/log, whether or not the host runs a syslog daemon:
  * /dev/log absent (this test machine: no syslog daemon, no journald): /dev/log is made a
    symlink to the receiver for the test's duration, and removed afterwards;
  * /dev/log present (syslog or journald): the session (cdrsession start, its supervisor and
    shim) runs in a private mount namespace where the receiver is bind-mounted over /dev/log;
    the host's syslog daemon is left alone.
Needs root (unshare --mount) when /dev/log exists; CI runs as root.

Run:  /usr/bin/python3 -m pytest tests/integration/test_session_status.py -v
"""
from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import shutil
import socket
import threading

import pytest

from core_support import SESSION_SCRIPT, PcscSession
from test_session_support import (CPS3_ATR, HANG_GUARD_S, OK, DeskAgent, Sessions, cdr, export_socket, require_built,
                                  session_env, short_tmp, wait_until)

DEV_LOG = "/dev/log"
PIN = "3132333435363738"                 # "12345678": VERIFY data that must never be logged
VERIFY = "0020000108" + PIN
CHALLENGE = "0084000008"
LOG_AUTHPRIV, LOG_NOTICE = 10, 5


class SyslogReceiver:
    """A datagram socket at a private path that collects what syslog(3) sends, and the way to
    put it at /dev/log for the session's processes (wrap: argv prefix for cdrsession start)."""

    def __init__(self, path: str):
        self.path = path
        self.messages: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.settimeout(0.2)  # (how often _run looks at self.running)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.linked = False
        if os.path.lexists(DEV_LOG):
            # a syslog daemon owns /dev/log: the session gets our receiver there, privately
            self.wrap = ("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                         'mount --bind "$0" /dev/log && exec "$@"', path)
        else:
            os.symlink(path, DEV_LOG)
            self.linked = True
            self.wrap = ()

    def _run(self):
        while self.running:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append(data.decode("utf-8", "replace"))

    def close(self):
        if self.linked:
            try:
                if os.readlink(DEV_LOG) == self.path:
                    os.unlink(DEV_LOG)
            except OSError:
                pass
        self.running = False
        self.thread.join(HANG_GUARD_S)
        self.sock.close()


@pytest.fixture(scope="module")
def syslog():
    base = short_tmp("cbsl-")
    r = SyslogReceiver(str(base / "log"))
    try:
        yield r
    finally:
        r.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def world(syslog):
    require_built()
    base = short_tmp("cbst-")
    rt = base / "run"
    rt.mkdir(mode=0o700)
    desk = DeskAgent("st", friendly_name="Audit Reader", desk_name="ACCUEIL-03",
                     cards=({"slot": 0, "atr": CPS3_ATR, "fix_tlv": True},))
    sessions = Sessions()
    try:
        env = session_env(str(rt))
        t_start = dt.datetime.now().astimezone().replace(microsecond=0)
        r, sd = sessions.start(env, "--desk", desk.spec, wrap=syslog.wrap)
        env["PCSCLITE_CSOCK_NAME"] = export_socket(r.stdout)
        wait_until(lambda: json.loads(cdr("status", "--json", env=env).stdout).get("readers"), timeout=HANG_GUARD_S,
                   desc="the desk's readers", details=sd.logs)
        # A program: connect, VERIFY with a PIN, GET CHALLENGE, disconnect.
        script = base / "pcsc_session.py"
        script.write_text(SESSION_SCRIPT)
        app = PcscSession(sd.socket, script, "app")
        try:
            assert app.rv("establish") == OK
            assert app.rv("connect", reader=desk.readers[0]) == OK
            verify = app.call("transmit", apdu=VERIFY)
            challenge = app.call("transmit", apdu=CHALLENGE)
            assert challenge["rv"] == OK and challenge["sw"] == "9000", challenge
            assert app.rv("disconnect") == OK
            app_pid = app.pid
        finally:
            app.close()
        # The card leaves the reader and comes back (another card, the same ATR family).
        desk.desk.remove_card(0)
        desk.desk.insert_card(0, atr=CPS3_ATR)
        wait_until(lambda: sum(e["event"].startswith("card ") for e in
                               json.loads(cdr("status", "--json", env=env).stdout)["audit"]) >= 3,
                   timeout=HANG_GUARD_S,
                   desc="card removal and insertion in the audit trail", details=sd.logs)
        yield dict(env=env, sd=sd, desk=desk, app_pid=app_pid, t_start=t_start, verify=verify, challenge=challenge,
                   syslog=syslog)
    finally:
        sessions.stop_all()
        desk.stop()
        shutil.rmtree(base, ignore_errors=True)


def secrets(w) -> list[str]:
    """Byte strings that must appear in no log: the PIN, the APDUs, the card's random answer."""
    out = [PIN, VERIFY, CHALLENGE, w["challenge"]["data"]]
    return [s for s in out if s] + [" ".join(s[i:i + 2] for i in range(0, len(s), 2)) for s in out if s]


def test_status_text(world):
    w = world
    r = cdr("status", env=w["env"])
    assert r.returncode == 0, r
    text = r.stdout
    print(text)
    reader = w["desk"].readers[0]
    assert re.search(r"^shim     cardbridge-shim \S+ \(pid \d+\) on " + re.escape(w["sd"].socket) + "$", text, re.M), text
    assert "desk     connected: ACCUEIL-03" in text, text
    assert re.search(rf"^reader   {re.escape(reader)}  \S+  {CPS3_ATR}$", text, re.M), text
    assert re.search(r"^traffic  \d+ requests from programs, \d+ desk round trips", text, re.M), text
    assert re.search(r"^  \S+  card connected: reader='Audit Reader 00 00' atr=" + CPS3_ATR +
                     rf" share=shared \(pid {w['app_pid']}\)$", text, re.M), text
    assert "desk connected: declared-name='ACCUEIL-03'" in text


def test_audit_events(world):
    w = world
    st = json.loads(cdr("status", "--json", env=w["env"]).stdout)
    events = st["audit"]
    names = [e["event"] for e in events]
    print("\n".join(f"{e['time']} {e['event']} pid={e['pid']}" for e in events))
    desk = [e for e in events if e["event"].startswith("desk connected:")]
    assert len(desk) == 1 and desk[0]["event"].startswith("desk connected: declared-name='ACCUEIL-03' software='cardbridge-desk"), names
    added = [n for n in names if n.startswith("reader added: reader='Audit Reader 00 00'")]
    assert added == [f"reader added: reader='Audit Reader 00 00' card present atr={CPS3_ATR}"], names
    # In order: connected, removed, inserted (with the ATR of the new card).
    cards = [n for n in names if n.startswith("card ")]
    assert cards == [f"card connected: reader='Audit Reader 00 00' atr={CPS3_ATR} share=shared",
                     "card removed: reader='Audit Reader 00 00'",
                     f"card inserted: reader='Audit Reader 00 00' atr={CPS3_ATR}"], names
    conn = [e for e in events if e["event"].startswith("card connected:")]
    assert len(conn) == 1, names
    assert conn[0]["event"] == f"card connected: reader='Audit Reader 00 00' atr={CPS3_ATR} share=shared"
    assert conn[0]["pid"] == w["app_pid"], "the audit names the program's pid (SO_PEERCRED)"
    # When: local time with zone, within this test run.
    for e in events:
        t = dt.datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S%z")
        assert w["t_start"] - dt.timedelta(seconds=2) <= t <= dt.datetime.now().astimezone() + dt.timedelta(seconds=2)
    # Never APDU contents.
    blob = json.dumps(events)
    for s in secrets(w):
        assert s not in blob, f"APDU bytes {s} in the audit trail"
    assert "transmit" not in blob.lower() and "verify" not in blob.lower()


def test_audit_reaches_syslog(world):
    w = world
    rcv = w["syslog"]
    pid = json.loads(cdr("status", "--json", env=w["env"]).stdout)["pid"]
    mine = lambda: [m for m in rcv.messages if f"cardbridge-shim[{pid}]:" in m]  # noqa: E731
    wait_until(lambda: any("card connected:" in m for m in mine()), timeout=HANG_GUARD_S, desc="the audit in syslog",
               details=lambda: "\n".join(rcv.messages[-20:]))
    msgs = mine()
    print("\n".join(msgs))
    prio = f"<{LOG_AUTHPRIV * 8 + LOG_NOTICE}>"
    assert all(m.startswith(prio) for m in msgs), msgs  # facility authpriv, level notice
    assert any("desk connected: declared-name='ACCUEIL-03'" in m and "[EVENT=desk-connected " in m for m in msgs), msgs
    # Structured (without journald, the fields close the line): who, which session, which program.
    card = [m for m in msgs if f"card connected: reader='Audit Reader 00 00' atr={CPS3_ATR} share=shared "
                                f"pid={w['app_pid']}" in m]
    assert card, msgs
    for field in ("EVENT=card-connected", f"USER={pwd.getpwuid(os.geteuid()).pw_name}", f"UID={os.geteuid()}",
                  "DESK=ACCUEIL-03", "READER=Audit Reader 00 00", f"ATR={CPS3_ATR}", "SHARE=shared",
                  f"PROGRAM_PID={w['app_pid']}", "PROGRAM_EXE=/"):
        assert f" {field}" in card[0] or f"[{field}" in card[0], (field, card[0])
    blob = "\n".join(msgs)
    for s in secrets(w):
        assert s not in blob, f"APDU bytes {s} in syslog"


def test_no_apdu_bytes_in_the_session_logs(world):
    """The shim's and cdrsession's own logs (info level, as `cdrsession start` runs them)."""
    w = world
    logs = w["sd"].logs()
    assert "card connected" in logs
    for s in secrets(w):
        assert s not in logs, f"APDU bytes {s} in {w['sd'].dir}"


def test_status_without_a_shim(world, tmp_path):
    env = session_env(str(tmp_path))
    r = cdr("status", env=env)
    assert r.returncode == 3 and r.stdout.startswith("no shim answers on "), r
    r = cdr("status", "--json", env=env)
    j = json.loads(r.stdout)
    assert r.returncode == 3 and j["socket"] == f"{tmp_path}/cardbridge/default/pcscd.comm" and j["error"], j
