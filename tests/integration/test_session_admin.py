"""Issue 10, the admin's side, against real parts (real pcscd + vpcd + vicc at the desk, the real
desk agent, real shims started by `cdrsession start`, the real libpcsclite):

    test_desk_without_pcscd_is_named     the desk's pcscd is absent: the session and the doctor say so
                                         (not "plug the reader in")
    test_server_conf_reaches_the_shim    /etc/cardbridge/server.conf [shim] (here $CARDBRIDGE_ETC) is
                                         applied by the shim cdrsession starts
    test_server_conf_mistake_is_named    a typo in server.conf ([cdrsession] or the shim's [shim]) stops
                                         the session's start with file, section and key
    test_desk_conf_policy_only_narrows   desk.conf [desk] hides readers the agent's own options ask for,
                                         its desk name wins, and card-image = off turns the image off
    test_desk_conf_mistake_stops_agent   a typo in desk.conf: the agent refuses to start, naming it
    test_helpdesk_doctor_and_status_all  root checks a real user's session (doctor --user, status --all);
                                         others get exit 3 (unknown)

Run:  /usr/bin/python3 -m pytest tests/integration/test_session_admin.py -v   (as root)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_session_support import (artefact, DESK_BIN, EXIT, HANG_GUARD_S, DeskAgent, Proc, Sessions, ThrowawayUser, cdr,
                                  check_of, control, doctor, export_socket, require_built, run, session_env,
                                  shim_reader_names, short_tmp, wait_until)


@pytest.fixture()
def base():
    require_built()
    d = short_tmp("cba-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def sessions():
    s = Sessions()
    try:
        yield s
    finally:
        s.stop_all()


def new_session(base: Path, sessions: Sessions, name: str, desk_spec: str, user: ThrowawayUser = None, **extra):
    if user is None:
        rt = base / name
        rt.mkdir(mode=0o700)
        env = session_env(str(rt), **extra)
    else:
        env = user.env(**extra)
    r, sd = sessions.start(env, "--desk", desk_spec, user=user.name if user else None)
    env["PCSCLITE_CSOCK_NAME"] = export_socket(r.stdout)
    return env, sd


def status_of(sd) -> dict:
    return control(sd.ctl, {"cmd": "status"})


def test_desk_without_pcscd_is_named(base, sessions):
    # A desk agent whose PC/SC service does not exist: libpcsclite's own answer is SCARD_E_NO_SERVICE.
    sock = base / "agent.sock"
    agent = Proc([str(DESK_BIN), "--listen", f"unix:{sock}", "--name", "DESK-NOPCSCD"], name="agent-nopcscd",
                 log_path=base / "agent.log",
                 env=session_env(None, PCSCLITE_CSOCK_NAME=str(base / "no-pcscd-here" / "pcscd.comm"))).start()
    try:
        wait_until(lambda: "listening on" in agent.log_text(), timeout=HANG_GUARD_S, desc="desk agent",
                   abort=lambda: None if agent.alive() else agent.exit_description())
        env, sd = new_session(base, sessions, "nopcscd", f"unix:{sock}")
        wait_until(lambda: status_of(sd)["desk"].get("pcsc_service", "").startswith("SCARD_E_NO_SERVICE"), timeout=HANG_GUARD_S,
                   desc="the desk's missing PC/SC service in the shim's status", details=sd.logs)
        assert "desk-service" in status_of(sd)["desk"]["capabilities"]
        code, rep, _ = doctor(env, "--pings", "3", json_out=True)
        assert code == EXIT["readers"] == 2 and rep["exit_code"] == 2, rep
        assert rep["first_problem"] == "desk-pcsc", rep
        c = check_of(rep, "desk-pcsc")
        assert c["cause"] == "desk-no-pcsc-service" and "SCARD_E_NO_SERVICE" in c["detail"], c
        assert "pcscd" in c["advice"] and "plug" not in c["advice"], c
        assert check_of(rep, "readers")["result"] == "skipped", rep
        code_t, text, _ = doctor(env, "--pings", "3")
        assert code_t == 2 and "desk PC/SC service" in text, text
        artefact("doctor-desk-without-pcscd.txt", f"$ cdrsession doctor   (exit {code_t})\n{text}")
        status = cdr("status", env=env)
        assert "the desk's PC/SC service fails: SCARD_E_NO_SERVICE" in status.stdout, status.stdout
    finally:
        agent.stop(grace=3)


def test_server_conf_reaches_the_shim(base, sessions):
    agent = DeskAgent("conf", friendly_name="Conf Reader")
    try:
        etc = base / "etc"
        etc.mkdir()
        conf = etc / "server.conf"
        conf.write_text("# the admin's file\n[shim]\ndisable = defer-begin, read-ahead\nlog-level = debug\n"
                        "[cdrsession]\nlog-level = info\n[doctor]\nslow-median-ms = 600000\nslow-p99-ms = 600000\n")
        env, sd = new_session(base, sessions, "conf", agent.spec, CARDBRIDGE_ETC=str(etc))
        wait_until(lambda: shim_reader_names(sd.socket) == agent.readers, timeout=HANG_GUARD_S,
                   desc="the desk's readers in the session", details=sd.logs)
        st = status_of(sd)
        assert st["config"] == str(conf), st
        # No desk.conf at this desk: the card image is on (the default).
        assert "card-image" in st["desk"]["capabilities"], st["desk"]
        assert st["disabled"] == "defer-begin,read-ahead", st
        # The doctor's thresholds came from [doctor] too: no latency figure can cross them.
        code, rep, _ = doctor(env, "--pings", "3", json_out=True, default_latency_thresholds=True)
        assert check_of(rep, "latency")["result"] == "ok", rep
    finally:
        agent.stop()


def test_server_conf_mistake_is_named(base):
    require_built()
    etc = base / "etc"
    etc.mkdir()
    (etc / "server.conf").write_text("[cdrsession]\nlog-levle = debug\n")
    rt = base / "typo"
    rt.mkdir(mode=0o700)
    r = cdr("env", env=session_env(str(rt), CARDBRIDGE_ETC=str(etc)))
    assert r.returncode != 0, r
    assert str(etc / "server.conf") in r.stderr + r.stdout and "log-levle" in r.stderr + r.stdout, r
    assert "[cdrsession]" in r.stderr + r.stdout, r
    # A session start says why it failed, where the xrdp hook and the doctor look.
    r = cdr("start", "--desk", f"unix:{base}/nowhere.sock", env=session_env(str(rt), CARDBRIDGE_ETC=str(etc)))
    assert r.returncode != 0, r
    line = next(l for l in r.stdout.splitlines() if l.startswith("CARDBRIDGE_START_ERROR="))
    assert "configuration: " in line and "log-levle" in line and line.endswith("; export CARDBRIDGE_START_ERROR"), line
    # A typo in the shim's own section ([shim], which only the shim reads) is named by the
    # start too, not left to the log of a shim that never came up.
    (etc / "server.conf").write_text("[shim]\ndisable = defer-begin\nlog-levle = debug\n")
    r = cdr("start", "--desk", f"unix:{base}/nowhere.sock", env=session_env(str(rt), CARDBRIDGE_ETC=str(etc)))
    assert r.returncode != 0, r
    line = next(l for l in r.stdout.splitlines() if l.startswith("CARDBRIDGE_START_ERROR="))
    assert "the shim refuses its options" in line and "[shim]" in line and "log-levle" in line, line
    assert "did not come up" not in line and "--help" not in line, line
    (etc / "server.conf").write_text("[shim]\ndisable = defer-begin, no-such-optimisation\n")
    r = cdr("start", "--desk", f"unix:{base}/nowhere.sock", env=session_env(str(rt), CARDBRIDGE_ETC=str(etc)))
    line = next(l for l in r.stdout.splitlines() if l.startswith("CARDBRIDGE_START_ERROR="))
    assert r.returncode != 0 and "--disable" in line and "no-such-optimisation" in line, line
    (etc / "server.conf").write_text("[shmi]\nlog-level = debug\n")
    r = cdr("env", env=session_env(str(rt), CARDBRIDGE_ETC=str(etc)))
    assert r.returncode != 0 and "unknown section [shmi]" in r.stderr + r.stdout, r


def test_desk_conf_policy_only_narrows(base, sessions):
    conf = base / "desk.conf"
    conf.write_text("[desk]\nname = ADMISSION-9\ndeny-readers = [\"Pol Reader 00 01\"]\ncard-image = off\n"
                    "[agent]\nlog-level = info\n")
    # The agent's own options ask for every reader (--readers Pol) under another name.
    agent = DeskAgent("pol", friendly_name="Pol Reader", desk_name="USER-CHOSEN",
                      agent_args=("--config", str(conf), "--readers", "Pol"))
    try:
        assert agent.readers == ["Pol Reader 00 00", "Pol Reader 00 01"]
        env, sd = new_session(base, sessions, "pol", agent.spec)
        wait_until(lambda: status_of(sd)["desk"].get("connected"), timeout=HANG_GUARD_S, desc="desk connected",
                   details=sd.logs)
        wait_until(lambda: shim_reader_names(sd.socket) == ["Pol Reader 00 00"], timeout=HANG_GUARD_S,
                   desc="only the reader desk.conf allows", details=lambda: sd.logs() + agent.report())
        assert status_of(sd)["desk"]["name"] == "ADMISSION-9"
        # card-image = off: the desk offers no image (it never reads the card on its own).
        assert "card-image" not in status_of(sd)["desk"]["capabilities"], status_of(sd)["desk"]
    finally:
        agent.stop()


def test_desk_conf_mistake_stops_agent(base):
    conf = base / "desk.conf"
    conf.write_text("[desk]\nreaderz = Gemalto\n")
    r = run([DESK_BIN, "--config", conf, "--listen", f"unix:{base}/a.sock"], session_env(None), timeout=HANG_GUARD_S)
    assert r.returncode != 0, r
    assert str(conf) in r.stderr and "readerz" in r.stderr and "[desk]" in r.stderr, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real users (useradd) and root's helpdesk view")
def test_helpdesk_doctor_and_status_all(base, sessions):
    agent = DeskAgent("help", friendly_name="Help Reader", tcp=True)  # vicc's stock card: not a CPx card
    user = ThrowawayUser("cbhelp", base)
    app = None
    try:
        env, sd = new_session(base, sessions, "help", agent.spec, user=user)
        wait_until(lambda: shim_reader_names(sd.socket, user=user.name) == agent.readers, timeout=HANG_GUARD_S,
                   desc="readers in the user's session", details=sd.logs)
        # Without a program of the user carrying the session's socket, the doctor says so ...
        code, rep, err = doctor(session_env(None), "--user", user.name, "--pings", "3", json_out=True)
        assert rep.get("user") == user.name, (rep, err)
        env_check = check_of(rep, "environment")
        assert env_check["result"] == "warning" and env_check["cause"] == "no-program-with-socket", env_check
        # ... and once the published application runs in the session, it is fine.
        app = subprocess.Popen(["setpriv", "--reuid", user.name, "--regid", user.name, "--init-groups", "--",
                                "sleep", "600"], env=env)
        code, rep, err = doctor(session_env(None), "--user", user.name, "--pings", "3", json_out=True)
        assert check_of(rep, "environment")["result"] == "ok", rep
        # Two warnings: the test's plain-TCP desk link (unauthenticated), and vicc's card (not a CPx card).
        assert code == rep["exit_code"] == EXIT["card-type"] == 1 and rep["first_problem"] == "channel", rep
        assert check_of(rep, "channel")["result"] == check_of(rep, "card-type")["result"] == "warning", rep
        assert rep["session"]["uid"] == user.uid and rep["desk"]["connected"], rep
        assert [c["reader"] for c in rep["cards"]] == [agent.readers[0]], rep
        code_t, text, _ = doctor(session_env(None), "--user", user.name, "--pings", "3")
        assert code_t == 1 and f"user {user.name}" in text, text
        # Every session of the server, for root.
        r = cdr("status", "--all", "--json", env=session_env(None))
        doc = json.loads(r.stdout)
        # (other shims may run on this machine: 1, a warning, exactly when one of them does not answer)
        assert r.returncode == (1 if any("error" in s for s in doc["sessions"]) else 0), r
        mine = [s for s in doc["sessions"] if s["user"] == user.name]
        assert len(mine) == 1 and mine[0]["socket"] == env["PCSCLITE_CSOCK_NAME"], doc
        assert mine[0]["status"]["desk"]["connected"], mine
        assert doc["schema_version"] == 1 and doc["host"], doc
        # Anyone else asking for another user's session: unknown (3), and nothing about it.
        other = cdr("doctor", "--user", "root", "--json", env=user.env(), user=user.name)
        assert other.returncode == 3, other
        assert "needs root" in json.loads(other.stdout)["error"], other.stdout
        # A user with no session: broken at the shim (no shim runs for root here).
        code, rep, _ = doctor(session_env(None), "--user", "nobody", "--pings", "1", json_out=True)
        assert code == 2 and rep["first_problem"] in ("shim", "start"), rep
        code, rep, _ = doctor(session_env(None), "--user", "no-such-user-cb", json_out=True)
        assert code == 3 and rep["error"] == "no such user", rep
    finally:
        if app is not None:
            app.kill()
            app.wait()
        agent.stop()
        sessions.stop_all()
        user.remove()
