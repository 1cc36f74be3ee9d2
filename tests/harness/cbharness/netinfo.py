"""Which TCP ports a process listens on (/proc), for programs started on port 0: the kernel
picks a free port and the program holds it from its bind() on, so a test never checks a port,
releases it and hopes to bind it again."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List


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


def listening_tcp_ports(pid: int) -> List[int]:
    """TCP ports pid listens on (IPv4 and IPv6, in pid's network namespace)."""
    inodes = _socket_inodes(pid)
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[9]) in inodes:  # 0A: TCP_LISTEN
                ports.append(int(f[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))
