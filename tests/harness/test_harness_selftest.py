"""Self-test of the emulated desk (no CardBridge involved).

    /usr/bin/python3 -m pytest -q tests/harness/test_harness_selftest.py

Needs root and the Debian packages listed in tests/harness/README.md.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cbharness import (
    GATED_APDU,
    HANG_GUARD_S,
    EmulatedDesk,
    HarnessError,
    HarnessTimeout,
    HotplugUnsupported,
    PcscWatch,
    Proc,
    pcsc_call,
    reader_states,
    transmit,
    wait_until,
)
from cbharness.support import HARNESS_DIR, SYSTEM_PYTHON, nodelay_preload

DEFAULT_ATR = "3b951381018073ff01000b"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the emulated desk needs root")


def pid_gone(pid: int) -> bool:
    """True if pid no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def procs_mentioning(text: str) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(f"{d.name}: {cmd}")
    return out


def port_listening(port: int) -> bool:
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[1].endswith(needle.strip()) and f[3] == "0A":
                    return True
        except OSError:
            pass
    return False


@pytest.fixture(scope="module")
def desk():
    """Shared desk for read-only tests: card in slot 0, slot 1 empty."""
    with EmulatedDesk(cards=[0]) as d:
        yield d


@pytest.fixture
def fresh_desk():
    with EmulatedDesk(cards=[0]) as d:
        yield d


# ---------------------------------------------------------------- basics
def test_readers_listed(desk):
    assert desk.readers == ["Virtual PCD 00 00", "Virtual PCD 00 01"]
    assert desk.reader_names() == desk.readers
    assert pcsc_call(desk.socket_path, "readers")["readers"] == desk.readers
    assert desk.env() == {"PCSCLITE_CSOCK_NAME": desk.socket_path}
    assert os.path.exists(desk.socket_path) and desk.socket_path.startswith(str(desk.dir))


def test_atr_visible_via_pyscard(desk):
    st = pcsc_call(desk.socket_path, "status")["readers"]
    assert st[0]["reader"] == "Virtual PCD 00 00"
    assert "PRESENT" in st[0]["flags"] and st[0]["atr"] == DEFAULT_ATR
    assert "EMPTY" in st[1]["flags"] and st[1]["atr"] == ""
    assert desk.atr(0).hex() == DEFAULT_ATR and desk.atr(1) is None


def test_get_challenge_twice_differs(desk):
    r = transmit(desk.socket_path, desk.readers[0], "0084000008", "0084000008")
    a, b = r["responses"]
    for x in (a, b):
        assert x["rv"] == "0x00000000" and x["sw"] == "9000" and len(bytes.fromhex(x["data"])) == 8
    assert a["data"] != b["data"]
    assert r["protocol"] == "T=1" and r["atr"] == DEFAULT_ATR


def test_default_card_apdu_behaviour(desk):
    """The facts documented in README.md (stock /usr/bin/vicc -t iso7816)."""
    apdus = {
        "00A4000C023F00": "9000",      # SELECT MF, no response data: ok
        "0084000000": None,            # GET CHALLENGE Le=00: 8 bytes + 9000
        "0084000010": None,            # Le=16: still 8 bytes + 9000
        "00840000000008": None,        # extended Le: 8 bytes + 9000
        "00840000": "6108",            # no Le: 61 08, data via GET RESPONSE
        "00C0000008": None,            # ...which returns the 8 bytes
        "0084000100": "6a86",          # P1/P2 != 0
        "00B0000000": "6986",          # READ BINARY: no EF selected (MF is empty)
        "00B0000000FFFF": "6986",
        "00CA000000": "6a81",          # GET DATA
        "00510000": "6d00",            # unknown INS
        "80FF000000": "6d00",
        "0020000104313233": "6a80",    # VERIFY with Lc/data mismatch
    }
    r = transmit(desk.socket_path, desk.readers[0], *apdus)
    for (apdu, want), got in zip(apdus.items(), r["responses"]):
        assert got["rv"] == "0x00000000", (apdu, got)
        if want is None:
            assert got["sw"] == "9000" and len(got["data"]) == 16, (apdu, got)
        else:
            assert got["resp"] == want, (apdu, got)


def test_verify_pin_counter(fresh_desk):
    d = fresh_desk
    r = transmit(d.socket_path, d.readers[0],
                 "002000010431323334",            # correct PIN "1234" -> 9000
                 "00200001",                      # no data = wrong PIN -> 6300 (counter 2)
                 "002000010430303030",            # wrong -> 6300 (1)
                 "002000010431323334",            # correct -> 9000 (counter back to 3)
                 "002000010430303030", "002000010430303030", "002000010430303030",  # 3 wrong
                 "002000010431323334",            # blocked -> 6983
                 "0020000100000431323334")        # extended Lc, still blocked
    assert [x["resp"] for x in r["responses"]] == ["9000", "6300", "6300", "9000", "6300", "6300", "6300",
                                                   "6983", "6983"]


def test_stock_vicc_crashes_on_select_with_fci_and_fix_tlv_helps(fresh_desk):
    d = fresh_desk
    r = transmit(d.socket_path, d.readers[0], "00A40000023F00", "0084000008")
    first, second = r["responses"]
    # vicc dies with a TypeError; pcscd returns success with an EMPTY response
    assert first["rv"] == "0x00000000" and first["resp"] == ""
    assert second["rv"] == "0x80100016"  # SCARD_E_NOT_TRANSACTED
    wait_until(lambda: not d.vicc(0).alive(), HANG_GUARD_S, desc="vicc to die")
    assert "TypeError" in d.vicc_log_text(0)
    # insert_card() notices the dead emulator, waits for the removal, restarts it
    d.insert_card(0, fix_tlv=True)
    r = transmit(d.socket_path, d.readers[0], "00A40000023F00", "00C000000C", "00A40000023F0000")
    assert [x["resp"] for x in r["responses"]] == [
        "610c", "6f0a83023f008a01058201389000", "6f0a83023f008a01058201389000"]


def test_custom_atr_and_test_ins(fresh_desk):
    d = fresh_desk
    d.remove_card(0)
    atr = "3b8f8001804f0ca000000306030001000000006a"
    st = d.insert_card(0, atr=atr, test_ins=True)
    assert st.atr.hex() == atr
    assert pcsc_call(d.socket_path, "status", "--reader", d.readers[0])["readers"][0]["atr"] == atr
    data = "ab" * 300
    r = transmit(d.socket_path, d.readers[0],
                 "80EE010000",                         # 256 pattern bytes, short Le
                 "80EE010100",                         # 257 wanted, Le=256 -> 61 01
                 "00C0000000",                         # GET RESPONSE -> remaining byte
                 "80EE000000012C" + data + "0000",       # extended case 4: echo 300 bytes
                 "80EE1000000000")                     # 4096 bytes, extended Le
    a, b, c, e, f = r["responses"]
    assert a["sw"] == "9000" and a["data"] == bytes(range(256)).hex()
    assert b["sw"] == "6101" and len(b["data"]) == 512
    assert c["resp"] == "009000"
    assert e["sw"] == "9000" and e["data"] == data
    assert f["sw"] == "9000" and len(f["data"]) == 2 * 4096


_NODELAY_PROBE = r'''
import os, socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
cli = socket.create_connection(srv.getsockname())
acc, _ = srv.accept()
opt = lambda s: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
print(opt(acc), opt(cli))
'''


@pytest.mark.parametrize("nodelay", ["1", "0"])
def test_preload_sets_tcp_nodelay(nodelay):
    """What the preload does, read back from the socket (not from a latency): TCP_NODELAY on
    accepted and connecting TCP sockets; CBHARNESS_NODELAY=0 (preload=False desks) turns it off."""
    env = {**os.environ, "LD_PRELOAD": str(nodelay_preload()), "CBHARNESS_NODELAY": nodelay}
    r = subprocess.run([SYSTEM_PYTHON, "-c", _NODELAY_PROBE], env=env, capture_output=True, text=True,
                       timeout=HANG_GUARD_S)
    want = "1 1" if nodelay == "1" else "0 0"
    assert r.stdout.split() == want.split(), r


def test_apdu_latency_with_and_without_preload(desk):
    """Without TCP_NODELAY every APDU waits for a delayed ACK (Nagle: vpcd writes a frame in two
    send() calls): at least the kernel's 40 ms delayed-ACK timer, whatever the load, so that
    lower bound is asserted. The figure with the preload is reported, not asserted."""
    r = pcsc_call(desk.socket_path, "bench", "--reader", desk.readers[0], "--apdu", "0084000008", "-n", "100")
    with EmulatedDesk(cards=[0], preload=False) as slow:
        s = pcsc_call(slow.socket_path, "bench", "--reader", slow.readers[0], "--apdu", "0084000008",
                      "-n", "8", "--warmup", "1")
    assert s["median_ms"] > 20.0, s
    print(f"\nGET CHALLENGE median: {r['median_ms']} ms with preload, {s['median_ms']} ms without")


# ---------------------------------------------------------------- card events
def test_card_removal_and_reinsertion_seen_by_getstatuschange(fresh_desk):
    d = fresh_desk
    with PcscWatch(d.socket_path, d.readers[0], count=2, timeout=HANG_GUARD_S) as w:
        assert "PRESENT" in w.ready["flags"]
        t0 = time.monotonic()
        d.remove_card(0, wait=False)
        ev = w.next_event(timeout=HANG_GUARD_S)
        assert "EMPTY" in ev["flags"]
        removal_latency = ev["t"] - t0
        t1 = time.monotonic()
        d.insert_card(0, wait=False)
        ev = w.next_event(timeout=HANG_GUARD_S)
        assert "PRESENT" in ev["flags"] and ev["atr"] == DEFAULT_ATR
        insert_latency = ev["t"] - t1
    print(f"\nremoval seen after {removal_latency * 1000:.0f} ms, insertion after {insert_latency * 1000:.0f} ms")
    assert d.card_present(0)


def test_second_slot_and_card_states(fresh_desk):
    d = fresh_desk
    d.insert_card(1)
    assert d.card_present(0) and d.card_present(1)
    with pytest.raises(HarnessError, match="already has a card"):
        d.insert_card(1)
    d.remove_card(0)
    assert not d.card_present(0) and d.card_present(1)
    d.remove_card(0)  # idempotent


# ---------------------------------------------------------------- readers
def test_sigusr1_does_not_hotplug_readers(fresh_desk):
    """pcscd 1.9.9 (Debian, libudev) ignores SIGUSR1 apart from logging it."""
    d = fresh_desk
    (d.conf_dir / "vpcd-extra").write_text(
        'FRIENDLYNAME "Extra PCD"\nDEVICENAME /dev/null:0x5DC0\n'
        "LIBPATH /usr/lib/pcsc/drivers/serial/libifdvpcd.so\n")
    (d.conf_dir / "vpcd").unlink()
    d.signal_pcscd(signal.SIGUSR1)
    wait_until(lambda: "Received signal: 10" in d.log_text(), HANG_GUARD_S, desc="pcscd to log SIGUSR1")
    # A rescan would run in pcscd's signal thread right after that line: a second signal is
    # logged by the same thread only once the first one has been handled completely.
    d.signal_pcscd(signal.SIGUSR1)
    wait_until(lambda: d.log_text().count("Received signal: 10") >= 2, HANG_GUARD_S,
               desc="pcscd to log the second SIGUSR1")
    assert d.reader_names() == d.readers
    assert "Extra PCD" not in d.log_text()
    with pytest.raises(HotplugUnsupported):
        d.add_reader()
    with pytest.raises(HotplugUnsupported):
        d.remove_reader()


def test_restart_with_more_readers(fresh_desk):
    d = fresh_desk
    sock = d.socket_path
    old_pid = d.pcscd_pid
    d.restart(slots=4)
    assert d.socket_path == sock and d.pcscd_pid != old_pid and pid_gone(old_pid)
    assert d.reader_names() == ["Virtual PCD 00 00", "Virtual PCD 00 01", "Virtual PCD B 00 00",
                                "Virtual PCD B 00 01"]
    assert d.card_present(0)  # re-inserted
    d.insert_card(3)
    r = transmit(sock, "Virtual PCD B 00 01", "0084000008")
    assert r["responses"][0]["sw"] == "9000"
    d.restart(slots=2)
    assert d.reader_names() == ["Virtual PCD 00 00", "Virtual PCD 00 01"]


def test_odd_slot_count_rounds_up():
    assert EmulatedDesk(slots=3).readers == ["Virtual PCD 00 00", "Virtual PCD 00 01", "Virtual PCD B 00 00",
                                             "Virtual PCD B 00 01"]


# ---------------------------------------------------------------- isolation
def test_two_desks_at_once():
    with EmulatedDesk(cards=[0]) as a, EmulatedDesk(cards=[0]) as b:
        assert a.socket_path != b.socket_path
        assert set(range(a.ports.base, a.ports.base + 2)).isdisjoint(range(b.ports.base, b.ports.base + 2))
        b.remove_card(0)
        assert a.card_present(0) and not b.card_present(0)
        assert pcsc_call(a.socket_path, "status", "--reader", a.readers[0])["readers"][0]["flags"].count("PRESENT")
        assert "EMPTY" in pcsc_call(b.socket_path, "status", "--reader", b.readers[0])["readers"][0]["flags"]
        b.insert_card(0, atr="3b0201ff")
        assert transmit(a.socket_path, a.readers[0], "0084000008")["atr"] == DEFAULT_ATR
        assert transmit(b.socket_path, b.readers[0], "0084000008")["atr"] == "3b0201ff"


def test_stop_leaves_no_processes():
    d = EmulatedDesk(slots=4, cards=[0, 1, 3]).start()
    pids = [d.pcscd_pid] + [d.vicc(s).pid for s in (0, 1, 3)]
    ports = [d.port(s) for s in range(4)]
    desk_dir = str(d.dir)
    assert all(port_listening(p) for p in ports)
    d.stop()
    assert all(pid_gone(p) for p in pids)
    assert procs_mentioning(desk_dir) == []
    assert not any(port_listening(p) for p in ports)
    assert not os.path.exists(desk_dir)
    assert "Direct suicide" in d.log_text()  # logs survive stop()
    d.stop()  # idempotent


def test_stop_after_failure_inside_with_block():
    pids = []
    with pytest.raises(ZeroDivisionError):
        with EmulatedDesk(cards=[0]) as d:
            pids = [d.pcscd_pid, d.vicc(0).pid]
            os.kill(d.pcscd_pid, signal.SIGKILL)  # and pcscd crashed too
            1 / 0
    assert pids and all(pid_gone(p) for p in pids)


def test_no_orphans_when_test_process_is_killed(tmp_path):
    """PR_SET_PDEATHSIG: even SIGKILL of the harness process kills pcscd and vicc."""
    script = (
        "import sys, time\n"
        "from cbharness import EmulatedDesk\n"
        f"d = EmulatedDesk(cards=[0], base_dir={str(tmp_path)!r}).start()\n"
        "print(d.pcscd_pid, d.vicc(0).pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([SYSTEM_PYTHON, "-c", script], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(HARNESS_DIR)})
    try:
        line = p.stdout.readline()
        pids = [int(x) for x in line.split()]
        assert len(pids) == 2 and not any(pid_gone(x) for x in pids), line
    finally:
        p.kill()
        p.wait()
    wait_until(lambda: all(pid_gone(x) for x in pids), HANG_GUARD_S, desc="desk processes to die with their parent")


class _BrokenDriverDesk(EmulatedDesk):
    def _write_conf(self):
        super()._write_conf()
        for f in self.conf_dir.iterdir():
            f.write_text(f.read_text().replace("LIBPATH /usr/lib/", "LIBPATH /nonexistent/"))


def test_startup_failure_reports_pcscd_log():
    d = _BrokenDriverDesk()
    with pytest.raises(HarnessError) as ei:
        d.start()
    msg = str(ei.value)
    assert "pcscd did not start properly" in msg and "pcscd died" in msg and "last 40 log lines" in msg
    assert "Error with library /nonexistent/pcsc/drivers/serial/libifdvpcd.so" in msg  # pcscd's own log
    assert d.pcscd is not None and pid_gone(d.pcscd.pid)
    assert d.dir is not None and not d.dir.exists()


def test_port_conflict_is_retried():
    """A block that was not held (the only way to get one now) and whose port is taken: pcscd
    starts without those readers; the desk sees it in pcscd's log and takes a new, held block."""
    import socket
    from cbharness.ports import PortBlock, reserve_ports

    blk = reserve_ports(2)
    taken = blk.base
    with socket.socket() as s:
        s.bind(("0.0.0.0", taken + 1))  # vpcd's second port is in use
        s.listen()
        d = EmulatedDesk(cards=[0])
        d.ports = PortBlock(taken, 2, [])  # force the conflicting block
        try:
            d.start()
            assert d.ports.base != taken and d.card_present(0)
            assert len(d.ports.sockets) == 2
        finally:
            d.stop()
            blk.release()


def _socket_inodes(pid: int) -> set:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def test_vpcd_ports_are_held_not_rebound(desk):
    """The desk binds its vpcd ports and keeps them: pcscd listens on the very sockets the harness
    holds (the preload's bind() hands them over), so no other process can take a port between a
    check and pcscd's bind()."""
    held = {os.fstat(sock.fileno()).st_ino for sock in desk.ports.sockets}
    assert len(held) == desk.slots
    # (pcscd is started as unshare -> sh -> exec pcscd: the Proc's pid is pcscd itself)
    inodes = _socket_inodes(desk.pcscd.pid)
    assert held <= inodes, f"pcscd does not listen on the held sockets: {held - inodes}"


def test_gated_card_holds_the_apdu_until_released(fresh_desk):
    """insert_card(gate=True): INS EF is at the card (gate.held) and unanswered until release()."""
    import threading
    d = fresh_desk
    d.remove_card(0)
    d.insert_card(0, gate=True)
    gate = d.gate(0)
    out = {}
    t = threading.Thread(target=lambda: out.update(transmit(d.socket_path, d.readers[0], GATED_APDU,
                                                             "0084000008")))
    t.start()
    gate.wait_held(1)
    assert t.is_alive() and gate.held() == 1  # held at the card, unanswered
    gate.release(1)
    t.join(HANG_GUARD_S)
    assert [(x["rv"], x["sw"]) for x in out["responses"]] == [("0x00000000", "9000"), ("0x00000000", "9000")], out


# ---------------------------------------------------------------- tools
def test_pcsc_tools_and_opensc_against_desk(desk):
    env = desk.full_env()
    r = subprocess.run(["pcsc_scan", "-r"], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0 and r.stdout.splitlines() == ["0: Virtual PCD 00 00", "1: Virtual PCD 00 01"]
    r = subprocess.run(["opensc-tool", "-l"], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0
    assert "0    Yes             Virtual PCD 00 00" in r.stdout and "1    No              Virtual PCD 00 01" in r.stdout
    r = subprocess.run(["opensc-tool", "-r", desk.readers[0], "-a"], env=env, capture_output=True, text=True,
                       timeout=HANG_GUARD_S)
    assert r.returncode == 0 and r.stdout.strip() == "3b:95:13:81:01:80:73:ff:01:00:0b"
    assert desk.vicc(0).alive()


def test_cli_desk(tmp_path):
    env_file = tmp_path / "desk.env"
    p = Proc([SYSTEM_PYTHON, "-m", "cbharness", "desk", "--slots", "2", "--env-file", str(env_file)],
             name="cli", log_path=tmp_path / "cli.log", env={**os.environ, "PYTHONPATH": str(HARNESS_DIR)}).start()
    try:
        wait_until(env_file.exists, 20, desc="CLI env file", details=p.failure_report,
                   abort=lambda: None if p.alive() else "CLI exited")
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        sock = values["PCSCLITE_CSOCK_NAME"]
        assert [r.name for r in reader_states(sock)] == ["Virtual PCD 00 00", "Virtual PCD 00 01"]
        assert reader_states(sock)[0].card_present
        assert f"PCSCLITE_CSOCK_NAME={sock}" in p.log_text()
        pcscd_pid = int(values["CBDESK_PCSCD_PID"])
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0, p.failure_report()
        assert pid_gone(pcscd_pid) and not env_file.exists()
        assert procs_mentioning(values["CBDESK_DIR"]) == []
    finally:
        p.stop()


# ---------------------------------------------------------------- helpers
def test_wait_until_and_proc_helpers(tmp_path):
    assert wait_until(lambda: 42, 1) == 42
    with pytest.raises(HarnessTimeout, match="(?s)the impossible.*details here"):
        wait_until(lambda: False, 0.2, desc="the impossible", details=lambda: "details here")
    p = Proc(["/bin/sh", "-c", "echo hello; echo oops >&2; sleep 30 & sleep 30"], name="sh",
             log_path=tmp_path / "sh.log").start()
    wait_until(lambda: "oops" in p.log_text(), 5)
    children = [int(x) for x in subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert len(children) >= 2
    p.stop()
    assert all(pid_gone(c) for c in children)
    rep = p.failure_report()
    assert "killed by SIGTERM" in rep and "hello" in rep and "oops" in rep
    q = Proc(["/bin/sh", "-c", "echo bye; exit 3"], name="short", log_path=tmp_path / "q.log").start()
    with pytest.raises(HarnessError, match="gave up.*exited with status 3"):
        wait_until(lambda: False, 5, abort=lambda: None if q.alive() else q.exit_description())
