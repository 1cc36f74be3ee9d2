"""cdrsession: one shim per user session, started with the session and stopped at its end.

    cdrsession start (idempotent; prints the PCSCLITE_CSOCK_NAME export line)
    private layout:  $XDG_RUNTIME_DIR/cardbridge/<key>/  0700, pcscd.comm and pcscd.comm.ctl 0600
    --until-pid:     the shim stops when the session leader exits
    cdrsession stop; the supervisor restarts a killed shim
    session start-up: /etc/profile.d/cardbridge.sh (xrdp's startwm.sh sources /etc/profile) and the
    systemd user unit + environment.d (what systemd-environment-d-generator exports)

Run:  /usr/bin/python3 -m pytest tests/integration/test_session_lifecycle.py -v
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from test_session_support import (CDRSESSION, E_NO_SERVICE, GET_CHALLENGE, HANG_GUARD_S, OK, ROOT, DeskAgent, Proc, SessionDir, Sessions,
                                  alive, cb_pcsc, cdr, control, doctor, export_socket, require_built, session_env,
                                  shim_pids, shim_reader_names, short_tmp, wait_until)

HOOK = ROOT / "installers" / "profile.d" / "cardbridge.sh"
UNIT = ROOT / "installers" / "systemd" / "cardbridge-session.service"


@pytest.fixture(scope="module")
def desk():
    require_built()
    d = DeskAgent("life", friendly_name="Life Reader")
    yield d
    d.stop()


@pytest.fixture
def sessions():
    s = Sessions()
    yield s
    s.stop_all()


@pytest.fixture
def rt():
    """A fresh XDG_RUNTIME_DIR (0700, like /run/user/<uid>)."""
    base = short_tmp("cbsl-")
    d = base / "run"
    d.mkdir(mode=0o700)
    yield str(d)
    shutil.rmtree(base, ignore_errors=True)


def export_line(sock: str) -> str:
    return f"PCSCLITE_CSOCK_NAME='{sock}'; export PCSCLITE_CSOCK_NAME"


def wait_readers(sock: str, want, desk: DeskAgent, sd: SessionDir, timeout: float = 10.0):
    def check():
        names = shim_reader_names(sock)
        return names if names == want else None
    return wait_until(check, timeout=timeout, desc=f"readers {want} on {sock}",
                      details=lambda: f"{sd.logs()}\n{desk.report()}")


def test_start_is_idempotent_and_private(desk, sessions, rt):
    env = session_env(rt)
    t0 = time.monotonic()
    r, sd = sessions.start(env, "--desk", desk.spec)
    started = time.monotonic() - t0
    # stdout is exactly the export line, for `eval "$(cdrsession start)"`.
    assert r.stdout == export_line(sd.socket) + "\n", r.stdout
    assert export_socket(r.stdout) == f"{rt}/cardbridge/default/pcscd.comm"
    ev = subprocess.run(["sh", "-c", 'eval "$1"; env | grep ^PCSCLITE_CSOCK_NAME=', "sh", r.stdout],
                        capture_output=True, text=True)
    assert ev.stdout.strip() == f"PCSCLITE_CSOCK_NAME={sd.socket}", ev

    # Private layout: the session directory 0700 and ours, both sockets 0600.
    st = os.stat(sd.dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid(), oct(st.st_mode)
    for path in (sd.socket, sd.ctl):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
    assert not str(sd.socket).startswith(os.path.expanduser("~") + "/"), "never under $HOME"

    assert wait_readers(sd.socket, desk.readers, desk, sd) == desk.readers
    first = control(sd.ctl, {"cmd": "status"})
    supervisor = sd.supervisor_pid()
    assert supervisor and alive(supervisor)
    assert shim_pids(sd.socket) == [first["pid"]]

    # Again: the same line, the same shim, no second supervisor.
    t1 = time.monotonic()
    again = cdr("start", "--desk", desk.spec, env=env)
    repeated = time.monotonic() - t1
    assert again.returncode == 0 and again.stdout == r.stdout, again
    assert control(sd.ctl, {"cmd": "status"})["pid"] == first["pid"]
    assert sd.supervisor_pid() == supervisor
    assert shim_pids(sd.socket) == [first["pid"]]
    # `cdrsession env` prints the same line without starting anything.
    assert cdr("env", env=env).stdout == r.stdout
    print(f"start {started * 1000:.0f} ms (shim answering), repeated start {repeated * 1000:.0f} ms")

    # Programs using the exported socket reach the desk's card.
    t = cb_pcsc(sd.socket, "transmit", "--reader", desk.readers[0], "--apdu", GET_CHALLENGE)
    assert t["connect"] == OK and t["rvs"] == [OK] and t["responses"][0].endswith("9000"), t


def test_session_keys_separate_sessions(desk, sessions, rt):
    """Two sessions of one user (two logind sessions) get two shims side by side."""
    _, a = sessions.start(session_env(rt, XDG_SESSION_ID="3"), "--desk", desk.spec, key="s3")
    _, b = sessions.start(session_env(rt, XDG_SESSION_ID="4"), "--desk", desk.spec, key="s4")
    assert a.socket != b.socket and os.path.exists(a.socket) and os.path.exists(b.socket)
    assert control(a.ctl, {"cmd": "status"})["pid"] != control(b.ctl, {"cmd": "status"})["pid"]
    assert cdr("stop", env=session_env(rt, XDG_SESSION_ID="3")).returncode == 0
    wait_until(lambda: not os.path.exists(a.socket), timeout=HANG_GUARD_S, desc="session s3's socket to go")
    assert control(b.ctl, {"cmd": "status"})["socket"] == b.socket, "stopping one session stopped the other"


def test_stop(desk, sessions, rt):
    env = session_env(rt)
    _, sd = sessions.start(env, "--desk", desk.spec)
    shim = control(sd.ctl, {"cmd": "status"})["pid"]
    supervisor = sd.supervisor_pid()
    t0 = time.monotonic()
    r = cdr("stop", env=env)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert not alive(supervisor) and not alive(shim)
    for path in (sd.socket, sd.ctl, sd.pid_file):
        assert not os.path.exists(path), f"{path} left behind"
    # the socket is gone: libpcsclite's stat() fails before any connect (SCARD_E_NO_SERVICE)
    assert cb_pcsc(sd.socket, "list")["establish"] == E_NO_SERVICE
    # Stopping a stopped session is fine.
    r = cdr("stop", env=env)
    assert r.returncode == 0 and "no shim running" in r.stderr, r
    print(f"stop took {took * 1000:.0f} ms")


def test_until_pid_stops_the_shim_with_the_session_leader(desk, sessions, rt, tmp_path):
    env = session_env(rt)
    leader = Proc(["sleep", "600"], name="leader", log_path=tmp_path / "leader.log").start()
    try:
        _, sd = sessions.start(env, "--desk", desk.spec, "--until-pid", str(leader.pid))
        shim = control(sd.ctl, {"cmd": "status"})["pid"]
        supervisor = sd.supervisor_pid()
        wait_readers(sd.socket, desk.readers, desk, sd)
        t0 = time.monotonic()
        leader.stop(grace=1, sig=signal.SIGKILL)
        wait_until(lambda: not alive(shim) and not alive(supervisor), timeout=HANG_GUARD_S,
                   desc="the shim and its supervisor to stop after the session leader exited",
                   details=sd.logs)
        print(f"shim stopped {(time.monotonic() - t0) * 1000:.0f} ms after the session leader exited")
        assert not os.path.exists(sd.socket) and not os.path.exists(sd.pid_file)
        assert "ended: stopping the shim" in sd.logs()
    finally:
        leader.stop(grace=1)

    # A leader that is already gone: nothing is started.
    gone = subprocess.Popen(["true"])
    gone.wait()
    r, sd = sessions.start(session_env(rt, XDG_SESSION_ID="9"), "--desk", desk.spec, "--until-pid",
                           str(gone.pid), key="s9", expect_ok=False)
    # A failed start says why, as a line the session hook evaluates (and nothing else).
    assert r.returncode != 0 and r.stdout.startswith("CARDBRIDGE_START_ERROR=") and r.stdout.count("\n") == 1, r
    assert not shim_pids(sd.socket) and not os.path.exists(sd.socket)


def test_supervisor_restarts_a_killed_shim(desk, sessions, rt):
    env = session_env(rt)
    _, sd = sessions.start(env, "--desk", desk.spec)
    wait_readers(sd.socket, desk.readers, desk, sd)
    first = control(sd.ctl, {"cmd": "status"})["pid"]
    t0 = time.monotonic()
    os.kill(first, signal.SIGKILL)

    def restarted():
        try:
            pid = control(sd.ctl, {"cmd": "status"}, timeout=1)["pid"]
        except OSError:
            return None
        return pid if pid != first else None

    second = wait_until(restarted, timeout=HANG_GUARD_S, desc="a new shim", details=sd.logs)
    took = time.monotonic() - t0
    assert shim_pids(sd.socket) == [second]
    wait_readers(sd.socket, desk.readers, desk, sd)
    t = cb_pcsc(sd.socket, "transmit", "--reader", desk.readers[0], "--apdu", GET_CHALLENGE)
    assert t["rvs"] == [OK], t
    assert re.search(r"shim exited \(signal 9\); restarting", sd.logs()), sd.logs()
    print(f"shim back {took * 1000:.0f} ms after SIGKILL")


# ---- session start-up hooks -------------------------------------------------------------------------

def hook_shell(rt: str, display: int, tmp_path: Path, xrdp: bool = True) -> subprocess.Popen:
    """sh that sources the profile hook like xrdp's startwm.sh (via /etc/profile), reports, and
    stays alive (the session) until its stdin closes."""
    env = session_env(rt, DISPLAY=f":{display}", PATH=f"{CDRSESSION.parent}:{session_env(None)['PATH']}")
    if xrdp:
        env["XRDP_SESSION"] = "1"
    # The hook is opt-in: what `cdrsession enable xrdp` leaves behind, in a private /etc/cardbridge.
    (tmp_path / "etc-cardbridge" / "enabled").mkdir(parents=True, exist_ok=True)
    (tmp_path / "etc-cardbridge" / "enabled" / "xrdp").write_text("")
    env["CARDBRIDGE_ETC"] = str(tmp_path / "etc-cardbridge")
    script = (f'. "{HOOK}"; . "{HOOK}"\n'  # sourced twice (/etc/profile and ~/.profile, say): started once
              'echo "CSOCK=${PCSCLITE_CSOCK_NAME:-}"\n'
              'echo "EXPORTED=$(env | grep -c ^PCSCLITE_CSOCK_NAME=)"\n'
              'echo "PID=$$"\n'
              'read line\n')
    return subprocess.Popen(["sh", "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def read_vars(p: subprocess.Popen) -> dict:
    out = {}
    for _ in range(3):
        line = p.stdout.readline()
        assert line, f"the session shell ended: {p.stderr.read()}"
        k, v = line.rstrip("\n").split("=", 1)
        out[k] = v
    return out


def test_xrdp_profile_hook(sessions, rt, tmp_path):
    display = 90 + os.getpid() % 500
    sd = SessionDir(rt, f"xrdp-{display}")
    sessions.started.append((sd, session_env(rt, XRDP_SESSION="1", DISPLAY=f":{display}"), None))
    sh = hook_shell(rt, display, tmp_path)
    try:
        v = read_vars(sh)
        assert v["CSOCK"] == sd.socket, (v, (Path(rt) / "cardbridge-start.log").read_text(errors="replace")
                                          if (Path(rt) / "cardbridge-start.log").exists() else "")
        assert v["EXPORTED"] == "1", "PCSCLITE_CSOCK_NAME is set but not exported to the session's programs"
        st = control(sd.ctl, {"cmd": "status"})
        assert st["socket"] == sd.socket and st["uid"] == os.getuid()
        assert st["desk_link"].startswith("xrdp"), st  # the hook asks for the session's xrdp channel
        assert len(shim_pids(sd.socket)) == 1, "sourcing the hook twice started two shims"

        # The doctor, run in this session's context, knows it is an xrdp session; with no xrdp
        # channel on this test machine the first broken link is the channel.
        env = session_env(rt, XRDP_SESSION="1", DISPLAY=f":{display}", PCSCLITE_CSOCK_NAME=v["CSOCK"])
        code, text, _ = doctor(env)
        assert f"session 'xrdp-{display}' (xrdp)" in text, text
        assert code == 2 and "[FAIL] channel" in text, text

        shim = st["pid"]
        t0 = time.monotonic()
        sh.stdin.close()  # logoff: the session leader exits
        sh.wait(HANG_GUARD_S)
        wait_until(lambda: not alive(shim), timeout=HANG_GUARD_S, desc="the shim to stop at logoff", details=sd.logs)
        print(f"xrdp hook: shim stopped {(time.monotonic() - t0) * 1000:.0f} ms after the session leader exited")
        assert not os.path.exists(sd.socket)
    finally:
        if sh.poll() is None:
            os.killpg(sh.pid, signal.SIGKILL)
            sh.wait()


def test_profile_hook_outside_xrdp_does_nothing(sessions, rt, tmp_path):
    display = 90 + os.getpid() % 500
    sh = hook_shell(rt, display, tmp_path, xrdp=False)
    try:
        v = read_vars(sh)
        assert v["CSOCK"] == "" and v["EXPORTED"] == "0", v
        assert not os.path.exists(f"{rt}/cardbridge"), "the hook started something outside xrdp"
    finally:
        sh.stdin.close()
        sh.wait(HANG_GUARD_S)


def test_systemd_user_unit_and_environment_d(desk, sessions, rt, tmp_path):
    """What systemd would do, without systemd: the unit's ExecStartPost gives the session's programs
    PCSCLITE_CSOCK_NAME (systemctl --user set-environment, %t = XDG_RUNTIME_DIR); the unit's ExecStart
    (with its Environment=) serves exactly that socket. The unit is opt-in (ConditionPathExists)."""
    unit = UNIT.read_text()
    assert "ConditionPathExists=/etc/cardbridge/enabled/systemd" in unit
    post = re.search(r"^ExecStartPost=/bin/systemctl --user set-environment PCSCLITE_CSOCK_NAME=(\S+)$", unit, re.M)
    assert post, unit
    exported = {"PCSCLITE_CSOCK_NAME": post.group(1).replace("%t", str(rt))}
    sd = SessionDir(rt, "default")
    assert exported.get("PCSCLITE_CSOCK_NAME") == sd.socket, exported

    unit = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    unit_env = dict(e.split("=", 1) for e in re.findall(r"^Environment=(\S+)$", unit, re.M))
    assert exec_start[0] == "/usr/bin/cdrsession" and exec_start[1] == "run", exec_start
    # The relay socket of a FreeRDP-based host is what `--desk rdp` finds outside xrdp: give it one.
    relay_desk = DeskAgent("unit", friendly_name="Unit Reader", cards=())
    try:
        os.makedirs(f"{rt}/cardbridge", mode=0o700, exist_ok=True)
        os.symlink(relay_desk.spec[len("unix:"):], f"{rt}/cardbridge/desk.sock")
        # A logind session id in the environment must not move the socket away from environment.d's.
        env = session_env(rt, XDG_SESSION_ID="77", **unit_env)
        sessions.started.append((sd, env, None))
        svc = Proc([str(CDRSESSION), *exec_start[1:]], name="unit", log_path=tmp_path / "unit.log", env=env).start()
        try:
            st = wait_until(lambda: os.path.exists(sd.ctl) and control(sd.ctl, {"cmd": "status"}), timeout=HANG_GUARD_S,
                            desc="the unit's shim", details=lambda: svc.failure_report())
            assert st["socket"] == exported["PCSCLITE_CSOCK_NAME"]
            wait_until(lambda: shim_reader_names(sd.socket) == relay_desk.readers, timeout=HANG_GUARD_S,
                       desc="the relay desk's readers", details=lambda: svc.failure_report() + relay_desk.report())
            assert svc.stop(grace=5) == 0, svc.failure_report()  # systemctl --user stop: SIGTERM
            assert not shim_pids(sd.socket) and not os.path.exists(sd.socket)
        finally:
            svc.stop(grace=2)
    finally:
        relay_desk.stop()
