"""Logs and audit in a real journald (issue 10: "logs and audit that survive logout").

This file runs its own systemd-journald: the test process moves into a private mount namespace
(tmpfs over /run/systemd and /run/log), where journald creates its sockets and keeps its
journal; every process the test starts inherits the namespace, so the host's logging is never
touched. Run it on its own (CTest does: one process per file):

    /usr/bin/python3 -m pytest tests/integration/test_session_journal.py -v      (as root)

    test_shim_and_cdrsession_log_to_the_journal  a session `cdrsession start` started logs
                                                 journald-native (priority, component, session),
                                                 and keeps no log file in its tmpfs directory
    test_audit_entries_are_structured            the shim's audit entries: MESSAGE_ID, notice,
                                                 authpriv, user, session, desk, reader, ATR, program
    test_desk_audit                              the desk agent's own audit entries
    test_failed_start_is_logged_as_an_error      a start that fails leaves an error entry with the reason
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_session_support import (artefact, CPS3_ATR, GET_CHALLENGE, HANG_GUARD_S, DeskAgent, Proc, Sessions, cb_pcsc, cdr,
                                  export_socket, require_built, session_env, shim_reader_names, short_tmp, wait_until)

JOURNALD = "/lib/systemd/systemd-journald"
AUDIT_ID = "1a9cbc1bf7d440baa3b7681f03d7ca32"
CLONE_NEWNS = 0x00020000


def journal(*match: str) -> list:
    r = subprocess.run(["journalctl", "-D", "/run/log/journal", "--no-pager", "-o", "json", *match],
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    return [json.loads(l) for l in r.stdout.splitlines() if l.strip()]


@pytest.fixture(scope="module")
def journald():
    require_built()
    if os.geteuid() != 0 or not os.access(JOURNALD, os.X_OK):
        pytest.skip("needs root and systemd-journald")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        pytest.fail(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    for argv in (["mount", "--make-rprivate", "/"], ["mkdir", "-p", "/run/systemd", "/run/log"],
                 ["mount", "-t", "tmpfs", "tmpfs", "/run/systemd"], ["mount", "-t", "tmpfs", "tmpfs", "/run/log"]):
        subprocess.run(argv, check=True)
    if Path("/var/log/journal").is_dir():  # keep journald off the host's persistent journal
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/log/journal"], check=True)
    jd = Proc([JOURNALD], name="journald", log_path=Path("/run/log/journald.out")).start()
    wait_until(lambda: Path("/run/systemd/journal/socket").is_socket() and Path("/run/systemd/journal/stdout").is_socket(),
               timeout=HANG_GUARD_S, desc="journald's sockets", abort=lambda: None if jd.alive() else jd.exit_description())
    try:
        yield jd
    finally:
        jd.stop(grace=3)


@pytest.fixture(scope="module")
def world(journald):
    base = short_tmp("cbj-")
    sessions = Sessions()
    agent = DeskAgent("jrn", friendly_name="Journal Reader", cards=({"slot": 0, "atr": CPS3_ATR},),
                      desk_name="DESK-JOURNAL")  # (its log: a file; its audit: journald, always)
    try:
        rt = base / "rt"
        rt.mkdir(mode=0o700)
        env = session_env(str(rt), CARDBRIDGE_SESSION=None)
        r, sd = sessions.start(env, "--desk", agent.spec)
        env["PCSCLITE_CSOCK_NAME"] = export_socket(r.stdout)
        wait_until(lambda: shim_reader_names(sd.socket) == agent.readers, timeout=HANG_GUARD_S,
                   desc="the desk's readers in the session", details=sd.logs)
        t = cb_pcsc(sd.socket, "transmit", "--reader", agent.readers[0], "--apdu", GET_CHALLENGE)
        yield dict(base=base, agent=agent, env=env, sd=sd, transmit=t)
    finally:
        sessions.stop_all()
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_shim_and_cdrsession_log_to_the_journal(world):
    sd = world["sd"]
    shim = wait_until(lambda: [e for e in journal("-t", "cardbridge-shim") if "started (desk" in e["MESSAGE"]],
                      timeout=HANG_GUARD_S, desc="the shim's start line in the journal")
    e = shim[-1]
    assert e["PRIORITY"] == "6" and e["CARDBRIDGE_COMPONENT"] == "cardbridge.shim", e
    assert e["CARDBRIDGE_SESSION"] == sd.key, e
    assert "CODE_FILE" not in e, e  # (no path of the build tree in every entry)
    started = [e for e in journal("-t", "cdrsession") if "shim started" in e["MESSAGE"]]
    assert started and started[-1]["PRIORITY"] == "6", started
    # Warnings keep their priority (journalctl -p warning finds them).
    for e in journal("-t", "cardbridge-shim", "-p", "warning"):
        assert int(e["PRIORITY"]) <= 4, e
    # Nothing kept only in the session's tmpfs directory.
    assert not (Path(sd.dir) / "shim.log").exists() and not (Path(sd.dir) / "cdrsession.log").exists(), \
        os.listdir(sd.dir)


def test_audit_entries_are_structured(world):
    sd, agent, t = world["sd"], world["agent"], world["transmit"]
    card = wait_until(lambda: [e for e in journal(f"MESSAGE_ID={AUDIT_ID}", "CARDBRIDGE_EVENT=card-connected",
                                                  "SYSLOG_IDENTIFIER=cardbridge-shim")],
                      timeout=HANG_GUARD_S, desc="the shim's card-connected audit entry")
    e = card[-1]
    print(json.dumps(e, indent=1))
    assert (e["PRIORITY"], e["SYSLOG_FACILITY"]) == ("5", "10"), e  # notice, authpriv
    assert e["CARDBRIDGE_USER"] == "root" and e["CARDBRIDGE_UID"] == "0", e
    assert e["CARDBRIDGE_SESSION"] == sd.key, e
    assert e["CARDBRIDGE_DESK"] == "DESK-JOURNAL" and e["CARDBRIDGE_DESK_LINK"] == agent.spec, e
    assert e["CARDBRIDGE_READER"] == agent.readers[0] and e["CARDBRIDGE_ATR"] == CPS3_ATR, e
    assert e["CARDBRIDGE_SHARE"] in ("shared", "exclusive"), e
    assert int(e["CARDBRIDGE_PROGRAM_PID"]) > 0 and e["CARDBRIDGE_PROGRAM_EXE"].endswith("cb-pcsc"), e
    desk = journal(f"MESSAGE_ID={AUDIT_ID}", "CARDBRIDGE_EVENT=desk-connected", "SYSLOG_IDENTIFIER=cardbridge-shim")
    assert desk and desk[-1]["CARDBRIDGE_DESK"] == "DESK-JOURNAL", desk
    # No APDU or answer bytes anywhere in the journal.
    blob = "\n".join(json.dumps(x) for x in journal())
    assert GET_CHALLENGE not in blob and t.get("response", "####")[:8] not in blob


def test_desk_audit(world):
    agent = world["agent"]
    entries = wait_until(lambda: [e for e in journal(f"MESSAGE_ID={AUDIT_ID}", "SYSLOG_IDENTIFIER=cardbridge-desk")
                                  if e["CARDBRIDGE_EVENT"] == "card-connected"],
                         timeout=HANG_GUARD_S, desc="the desk's card-connected audit entry")
    e = entries[-1]
    assert e["CARDBRIDGE_DESK"] == "DESK-JOURNAL" and e["CARDBRIDGE_READER"] == agent.readers[0], e
    assert e["CARDBRIDGE_ATR"] == CPS3_ATR and e["CARDBRIDGE_USER"] == "root", e
    events = {x["CARDBRIDGE_EVENT"] for x in journal(f"MESSAGE_ID={AUDIT_ID}", "SYSLOG_IDENTIFIER=cardbridge-desk")}
    assert "server-connected" in events, events
    # For a person to read (CARDBRIDGE_ARTEFACTS): the audit trail of both ends, and one entry whole.
    jc = ["journalctl", "-D", "/run/log/journal", "--no-pager"]
    short = subprocess.run([*jc, "-o", "short-iso", f"MESSAGE_ID={AUDIT_ID}"], capture_output=True, text=True).stdout
    whole = subprocess.run([*jc, "-o", "verbose", "-n", "1", f"MESSAGE_ID={AUDIT_ID}", "CARDBRIDGE_EVENT=card-connected",
                            "SYSLOG_IDENTIFIER=cardbridge-shim"], capture_output=True, text=True).stdout
    artefact("journal-audit.txt", f"$ journalctl -o short-iso MESSAGE_ID={AUDIT_ID}\n{short}\n"
                                  f"$ journalctl -o verbose -n 1 MESSAGE_ID={AUDIT_ID} CARDBRIDGE_EVENT=card-connected "
                                  f"SYSLOG_IDENTIFIER=cardbridge-shim\n{whole}")


def test_failed_start_is_logged_as_an_error(world):
    base = world["base"]
    not_a_dir = base / "not-a-directory"
    not_a_dir.write_text("")
    env = session_env(str(not_a_dir), CARDBRIDGE_SESSION=None)
    r = cdr("start", env=env)
    assert r.returncode != 0, r
    errors = wait_until(lambda: [e for e in journal("-t", "cdrsession", "-p", "err")
                                 if "session start failed" in e["MESSAGE"]],
                        timeout=HANG_GUARD_S, desc="the failed start in the journal")
    e = errors[-1]
    assert int(e["PRIORITY"]) <= 3 and str(not_a_dir) in e["MESSAGE"], e
    assert e.get("CARDBRIDGE_SESSION"), e
