"""Talking to CardBridge programs from tests: the shim's control socket and the JSON line
the test tools (cb-pcsc, cb-desk-storm, ...) print last."""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Union


def shim_control(path: Union[str, Path], request: dict, timeout: float = 5.0) -> dict:
    """One request on a cardbridge-shim control socket (SOCKET.ctl, same uid only): one JSON
    line each way."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def last_json_line(r: subprocess.CompletedProcess, what: str) -> dict:
    """The last JSON object a tool printed on stdout; AssertionError naming |what| if none."""
    lines = [l for l in r.stdout.strip().splitlines() if l.startswith("{")]
    if not lines:
        raise AssertionError(f"{what} printed nothing (rc {r.returncode}): {r.stderr}")
    return json.loads(lines[-1])
