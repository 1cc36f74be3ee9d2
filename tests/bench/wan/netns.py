#!/usr/bin/python3
"""Emulated WAN between a desk and a server: two network namespaces joined by a link with
a fixed round-trip time. Addresses exist only inside the two namespaces:
desk 10.231.0.1/30, server 10.231.0.2/30.

Link:
  * RTT 0: a veth pair, no qdisc.
  * RTT > 0, "netem": the veth pair with `tc qdisc add dev X root netem delay RTT/2` on
    both ends (the issue's setup; needs sch_netem in the kernel).
  * RTT > 0, "tun": when the kernel has no sch_netem, a TUN device in each namespace and
    delayline.py forwarding between them with RTT/2 each way (same addresses, same
    delay, FIFO). "auto" (default) tries netem first.

As a library: Wan(tag, rtt_ms).up() / .down(). As a tool (manual experiments):
  netns.py up --rtt 20 [--tag NAME] [--link auto|netem|tun]   prints the namespace names
  netns.py down --tag NAME
  netns.py cleanup-stale                                       removes leftovers of dead runs
Names: namespaces cbwan-<tag>-desk / cbwan-<tag>-srv; <tag> defaults to the owner's pid, so
leftovers of a killed run are recognised (cleanup-stale) and parallel runs never collide.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

PREFIX = "cbwan"
DESK_ADDR = "10.231.0.1"
SERVER_ADDR = "10.231.0.2"
_HERE = Path(__file__).resolve().parent
_STATE_DIR = Path("/run/cbwan")


class WanError(RuntimeError):
    pass



def unavailable() -> Optional[str]:
    """Why an emulated WAN (with an emulated desk) cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "pcscd", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so").exists():
        return "vsmartcard-vpcd not installed"
    return None

def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise WanError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def in_ns(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Stops a process started with start_new_session=True (and its group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Wan:
    def __init__(self, tag: str, rtt_ms: float, link: str = "auto", log: Callable[[str], None] = lambda s: None):
        if link not in ("auto", "netem", "tun"):
            raise ValueError(link)
        self.tag = tag
        self.rtt_ms = float(rtt_ms)
        self.requested_link = link
        self.log = log
        self.desk_ns = f"{PREFIX}-{tag}-desk"
        self.server_ns = f"{PREFIX}-{tag}-srv"
        short = re.sub(r"[^A-Za-z0-9]", "", tag)[-8:]
        self.if_desk = f"cbw{short}d"
        self.if_server = f"cbw{short}s"
        self.link = ""  # veth | netem | tun, once up
        self.delayline: Optional[subprocess.Popen] = None
        self._up = False

    # ---- setup ---------------------------------------------------------------------
    def up(self) -> "Wan":
        self._up = True
        for ns in (self.desk_ns, self.server_ns):
            sh("ip", "netns", "add", ns)
            sh(*in_ns(ns), "ip", "link", "set", "lo", "up")
        if self.rtt_ms <= 0:
            self._veth()
            self.link = "veth"
        elif self.requested_link in ("auto", "netem") and self._veth_netem():
            self.link = "netem"
        elif self.requested_link == "netem":
            raise WanError("tc netem is not available in this kernel (try --link tun)")
        else:
            self._tun()
            self.link = "tun"
        self.log(f"link {self.link}: {self.desk_ns} {DESK_ADDR} <-> {self.server_ns} {SERVER_ADDR}, RTT {self.rtt_ms:g} ms")
        return self

    def _veth(self) -> None:
        sh("ip", "link", "add", self.if_desk, "netns", self.desk_ns, "type", "veth",
           "peer", "name", self.if_server, "netns", self.server_ns)
        for ns, dev, addr in ((self.desk_ns, self.if_desk, DESK_ADDR), (self.server_ns, self.if_server, SERVER_ADDR)):
            sh(*in_ns(ns), "ip", "addr", "add", f"{addr}/30", "dev", dev)
            sh(*in_ns(ns), "ip", "link", "set", dev, "up")

    def _veth_netem(self) -> bool:
        self._veth()
        half = f"{self.rtt_ms / 2:g}ms"
        for ns, dev in ((self.desk_ns, self.if_desk), (self.server_ns, self.if_server)):
            r = sh(*in_ns(ns), "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", half, "limit", "10000", check=False)
            if r.returncode != 0:
                self.log(f"tc netem unavailable ({r.stderr.strip()}); using the userspace delay line")
                sh(*in_ns(self.desk_ns), "ip", "link", "del", self.if_desk, check=False)
                return False
        return True

    def _tun(self) -> None:
        for ns, dev, addr, peer in ((self.desk_ns, self.if_desk, DESK_ADDR, SERVER_ADDR),
                                    (self.server_ns, self.if_server, SERVER_ADDR, DESK_ADDR)):
            sh(*in_ns(ns), "ip", "tuntap", "add", "dev", dev, "mode", "tun")
            sh(*in_ns(ns), "ip", "addr", "add", addr, "peer", f"{peer}/32", "dev", dev)
            sh(*in_ns(ns), "ip", "link", "set", dev, "mtu", "1500", "up")
        self.delayline = subprocess.Popen(
            [sys.executable, str(_HERE / "delayline.py"), "--a", f"{self.desk_ns}:{self.if_desk}",
             "--b", f"{self.server_ns}:{self.if_server}", "--delay-ms", f"{self.rtt_ms / 2:g}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        line = self.delayline.stdout.readline().strip() if self.delayline.stdout else ""
        if line != "ready":
            rest = self.delayline.stdout.read() if self.delayline.stdout else ""
            raise WanError(f"delay line did not start: {line} {rest}")

    # ---- teardown ------------------------------------------------------------------
    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        if self.delayline is not None:
            kill_group(self.delayline)
            self.delayline = None
        for ns in (self.desk_ns, self.server_ns):
            remove_namespace(ns)


def remove_namespace(ns: str) -> None:
    """Kills what still runs in |ns| (only our own tools run there) and deletes it."""
    if not Path(f"/run/netns/{ns}").exists():
        return
    r = sh("ip", "netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for _ in range(50):
        if not sh("ip", "netns", "pids", ns, check=False).stdout.split():
            break
        time.sleep(0.05)
    sh("ip", "netns", "del", ns, check=False)


def cleanup_stale(log: Callable[[str], None] = lambda s: None) -> list[str]:
    """Removes cbwan-<pid>-* namespaces whose owning process is gone (a killed run)."""
    removed = []
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return removed
    for entry in sorted(netns_dir.iterdir()):
        m = re.fullmatch(rf"{PREFIX}-(\d+)-(desk|srv)", entry.name)
        if not m:
            continue
        pid = int(m.group(1))
        alive = Path(f"/proc/{pid}").exists()
        if alive:
            try:
                alive = b"wan" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                alive = False
        if not alive:
            log(f"removing stale namespace {entry.name} (owner {pid} is gone)")
            remove_namespace(entry.name)
            removed.append(entry.name)
    return removed


def main() -> int:
    p = argparse.ArgumentParser(description="emulated WAN namespaces (desk <-> server)")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--rtt", type=float, required=True, help="round-trip time in ms")
    u.add_argument("--tag", default="manual")
    u.add_argument("--link", default="auto", choices=["auto", "netem", "tun"])
    d = sub.add_parser("down")
    d.add_argument("--tag", default="manual")
    sub.add_parser("cleanup-stale")
    a = p.parse_args()
    if os.geteuid() != 0:
        print("netns.py: needs root", file=sys.stderr)
        return 2
    if a.cmd == "cleanup-stale":
        for n in cleanup_stale(print):
            print(n)
        return 0
    state = _STATE_DIR / f"{a.tag}.json"
    if a.cmd == "up":
        w = Wan(a.tag, a.rtt, a.link, print)
        try:
            w.up()
        except Exception:
            w.down()
            raise
        _STATE_DIR.mkdir(exist_ok=True)
        state.write_text(json.dumps({"desk_ns": w.desk_ns, "server_ns": w.server_ns,
                                     "delayline_pid": w.delayline.pid if w.delayline else None}))
        if w.delayline is not None:
            w.delayline.stdout.close()  # it keeps running in its own session
        print(f"desk namespace:   {w.desk_ns} ({DESK_ADDR})\nserver namespace: {w.server_ns} ({SERVER_ADDR})")
        return 0
    # down
    if state.exists():
        s = json.loads(state.read_text())
        if s.get("delayline_pid"):
            try:
                os.killpg(s["delayline_pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        state.unlink()
    for ns in (f"{PREFIX}-{a.tag}-desk", f"{PREFIX}-{a.tag}-srv"):
        remove_namespace(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
