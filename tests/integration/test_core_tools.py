"""Third-party PC/SC programs, unmodified, on the desk's pcscd and through the shim: pcsc-tools
(pcsc_scan, scriptor) and OpenSC's opensc-tool. Their output must be the same (random card
data masked).

Shared rig: slot 0 ISO 7816 card (fix_tlv: OpenSC's card probing may SELECT with FCI)."""
from __future__ import annotations

import re
import subprocess
import threading

import pytest

from core_support import HANG_GUARD_S, client_env, compare, run_tool, wait_until


def _mask(text: str) -> str:
    text = re.sub(r"^\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4}$", "<date>", text, flags=re.M)
    return text


def test_pcsc_scan_lists_readers(rig):
    res = {}
    for t in ("desk", "shim"):
        r = run_tool(["pcsc_scan", "-r"], rig.sock(t), timeout=HANG_GUARD_S)
        res[t] = (r.returncode, r.stdout)
    compare(res, "pcsc_scan -r")
    assert res["shim"][0] == 0 and all(f"{i}: {n}" in res["shim"][1] for i, n in enumerate(rig.desk.readers))


def test_pcsc_scan_lists_cards(rig):
    res = {}
    for t in ("desk", "shim"):
        r = run_tool(["pcsc_scan", "-c", "-n"], rig.sock(t), timeout=HANG_GUARD_S)
        res[t] = (r.returncode, _mask(r.stdout))
    compare(res, "pcsc_scan -c -n")
    assert rig.desk.atr(0).hex(" ").upper() in res["shim"][1]


class _Scan:
    """pcsc_scan -n running on one socket, its output read line by line (stdbuf: line-buffered)."""

    def __init__(self, sock: str):
        self.lines: list = []
        self.p = subprocess.Popen(["stdbuf", "-oL", "pcsc_scan", "-n"], env=client_env(sock), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    def reader0(self) -> list:
        """[card state, ATR] of every report on reader 0 so far."""
        parts = "".join(self.lines).split("Reader 0:")[1:]
        return [re.findall(r"Card state: ([^\n]*)", part)[:1] + re.findall(r"ATR: ([0-9A-F ]+)", part)[:1]
                for part in parts]

    def wait(self, what: str, pred) -> None:
        wait_until(lambda: pred(self.reader0()), timeout=HANG_GUARD_S, desc=f"pcsc_scan to report {what}",
                   details=lambda: "".join(self.lines)[-2000:])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def test_pcsc_scan_follows_removal_and_insertion(make_rig):
    """pcsc_scan running on both sockets while the card is removed and put back: both report the
    same sequence of card states (each step waits until both have reported it)."""
    rig = make_rig(slots=2, cards=({"slot": 0},), name="scan")
    new_atr = "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 69"
    scans = {t: _Scan(rig.sock(t)) for t in ("desk", "shim")}
    try:
        for sc in scans.values():  # pcsc_scan's first scan
            sc.wait("the card present", lambda st: st and "inserted" in st[-1][0])
        rig.desk.remove_card(0)
        for sc in scans.values():
            sc.wait("the removal", lambda st: "removed" in st[-1][0])
        rig.desk.insert_card(0, atr=new_atr.replace(" ", ""))
        for sc in scans.values():
            sc.wait("the new card", lambda st: "inserted" in st[-1][0] and st[-1][1:] == [new_atr])
    finally:
        for sc in scans.values():
            sc.stop()
    res = {t: sc.reader0() for t, sc in scans.items()}
    compare(res, "pcsc_scan: reader 0 states while the card is removed and re-inserted")
    states = [x[0] for x in res["shim"] if x]
    assert any("removed" in s for s in states) and "inserted" in states[-1], res["shim"]
    assert res["shim"][-1][1].strip() == new_atr


def test_scriptor_runs_a_script(rig, tmp_path):
    script = tmp_path / "apdus.txt"
    script.write_text("# GET CHALLENGE, a wrong P2, SELECT MF without FCI, unknown INS\n"
                      "00 84 00 00 08\n00 84 00 01 00\n00 A4 00 0C 02 3F 00\n00 51 00 00\nreset\n00 84 00 00 08\n")
    res = {}
    for t in ("desk", "shim"):
        r = run_tool(["scriptor", "-r", rig.desk.readers[0], str(script)], rig.sock(t), timeout=HANG_GUARD_S)
        out = re.sub(r"< ([0-9A-F]{2} ){8}90 00", "< <8 random bytes> 90 00", r.stdout)
        res[t] = (r.returncode, out)
    compare(res, "scriptor")
    out = res["shim"][1]
    assert res["shim"][0] == 0 and "Using T=1 protocol" in out
    assert out.count("<8 random bytes> 90 00") == 2 and "< 6A 86" in out and "< 6D 00" in out, out


@pytest.mark.parametrize("args", [["-l"], ["-a"], ["-r", "Virtual PCD 00 00", "-a"], ["-n"],
                                  ["-r", "Virtual PCD 00 00", "-s", "00 84 00 00 08"],
                                  ["-r", "Virtual PCD 00 00", "-s", "00 84 00 01 00", "-s", "00 A4 00 0C 02 3F 00"]],
                         ids=["list", "atr", "atr_reader", "name", "send_get_challenge", "send_two"])
def test_opensc_tool(rig, args):
    res = {}
    for t in ("desk", "shim"):
        r = run_tool(["opensc-tool", *args], rig.sock(t), timeout=HANG_GUARD_S)
        out = re.sub(r"Received \(SW1=0x90, SW2=0x00\):\n.*", "Received (SW1=0x90, SW2=0x00): <random>", r.stdout)
        res[t] = (r.returncode, out, r.stderr.strip())
    compare(res, f"opensc-tool {' '.join(args)}")
    if "-s" in args and "00 84 00 00 08" in args:
        assert "SW1=0x90, SW2=0x00" in res["shim"][1], res["shim"]
