"""EmulatedDesk: a private pcscd + vpcd readers + vicc cards.

    with EmulatedDesk(slots=2, cards=[0]) as desk:
        env = {**os.environ, **desk.env()}      # PCSCLITE_CSOCK_NAME=...
        desk.reader_names()                       # ['Virtual PCD 00 00', 'Virtual PCD 00 01']
        desk.remove_card(0); desk.insert_card(0, atr=bytes.fromhex("3B8F80..."))

How it works
------------
pcscd 1.9.9 always binds /run/pcscd/pcscd.comm (it ignores
PCSCLITE_CSOCK_NAME), so it runs in a private mount namespace
(`unshare --mount --propagation private`) where a per-desk directory is
bind-mounted over /run/pcscd.  Clients outside the namespace reach it via
PCSCLITE_CSOCK_NAME=<desk dir>/run/pcscd.comm (the client library honours
that variable).  pcscd reads a private reader.conf.d with one vpcd entry per
pair of slots: every vpcd entry yields two readers ("<name> 00 00" listening
on TCP port P and "<name> 00 01" on P+1, both on 0.0.0.0).  A card is a vicc
process connected to the slot's port; killing it removes the card.  pcscd
runs with an LD_PRELOAD library that sets TCP_NODELAY on the vpcd sockets
(otherwise every APDU costs ~40 ms of Nagle/delayed-ACK latency).

Reader hot-plug is NOT possible: pcscd 1.9.9 as built by Debian (libudev
hotplug) ignores SIGUSR1 apart from logging "Received signal: 10"
(HPReCheckSerialReaders() is an empty function in hotplug_libudev.c), so
reader.conf.d is read only at start-up.  add_reader()/remove_reader() raise
HotplugUnsupported; restart(slots=N) restarts pcscd with a different reader
set on the same socket path instead (clients see the daemon go away).
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from . import support
from .pcscwire import ReaderState, reader_states
from .ports import PortBlock, reserve_ports
from .procs import Proc, stop_all
from .waiting import HANG_GUARD_S, HarnessError, wait_until

MAX_VPCD_ENTRIES = 8  # PCSCLITE_MAX_READERS_CONTEXTS (16) / 2 slots per entry
_ENTRY_SUFFIXES = "ABCDEFGH"

AtrLike = Union[bytes, bytearray, str, None]


class HotplugUnsupported(HarnessError, NotImplementedError):
    pass


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _parse_atr(atr: AtrLike) -> Optional[bytes]:
    if atr is None:
        return None
    if isinstance(atr, str):
        atr = bytes.fromhex(atr.replace(":", " "))
    atr = bytes(atr)
    if not 2 <= len(atr) <= 33:
        raise ValueError(f"ATR must be 2..33 bytes, got {len(atr)}")
    return atr


GATED_APDU = "80EF0000"  # held by a gated card (insert_card(gate=True)) until released


class CardGate:
    """The gate of a card inserted with gate=True: each gated APDU (GATED_APDU) is held at the
    card until the test releases it, so a transfer can be in flight for as long as a test
    needs, with no timing involved.

        gate.wait_held(1)   # APDU 1 reached the card (it is in flight)
        gate.release(1)     # the card answers it (90 00)
    """

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def held(self) -> int:
        """How many gated APDUs have reached the card so far."""
        return sum(1 for p in self.path.iterdir() if p.name.startswith("held."))

    def wait_held(self, n: int = 1, timeout: float = HANG_GUARD_S) -> None:
        wait_until(lambda: (self.path / f"held.{n}").exists(), timeout=timeout,
                   desc=f"gated APDU {n} to reach the card ({self.path})")

    def release(self, n: Optional[int] = None) -> None:
        """Lets the card answer gated APDU n (all of them, now and later, if n is None)."""
        (self.path / ("release.all" if n is None else f"release.{n}")).touch()


@dataclass
class _Card:
    slot: int
    proc: Proc
    atr: Optional[bytes]
    fix_tlv: bool
    kwargs: dict = field(default_factory=dict)
    gate: Optional[CardGate] = None


class EmulatedDesk:
    """A private pcscd with `slots` virtual readers and vicc-emulated cards.

    Parameters
    ----------
    slots:        number of reader slots wanted; vpcd readers come in pairs,
                  so this is rounded up to an even number (max 16).
    cards:        slots to insert a card into during start().
    debug:        run pcscd with --debug (APDU logging too if apdu_log).
    apdu_log:     run pcscd with --apdu (only useful together with debug).
    preload:      set TCP_NODELAY via LD_PRELOAD (default True).
    fix_tlv:      default for insert_card(fix_tlv=...): run vicc through the
                  harness launcher that fixes the SELECT-with-FCI crash.
    vicc_verbose: vicc -v count (3 = log every APDU into vicc-slotN.log).
    friendly_name: FRIENDLYNAME of the first vpcd entry; further entries get
                  " B", " C", ... appended (pcscd does not number serial
                  readers with equal names, it would create duplicates).
    base_dir:     parent directory for the desk's temp dir (default $TMPDIR).
    keep_dir:     keep the temp dir (logs) after stop(); also when the
                  environment variable CBHARNESS_KEEP=1 is set.
    """

    def __init__(
        self,
        slots: int = 2,
        *,
        cards: Iterable[int] = (),
        debug: Optional[bool] = None,
        apdu_log: bool = False,
        preload: bool = True,
        fix_tlv: bool = False,
        vicc_verbose: int = 0,
        friendly_name: str = "Virtual PCD",
        base_dir: Optional[os.PathLike | str] = None,
        keep_dir: Optional[bool] = None,
        start_timeout: float = HANG_GUARD_S,
        name: Optional[str] = None,
    ):
        self._set_slots(slots)
        self.initial_cards = list(cards)
        self.debug = _env_flag("CBHARNESS_PCSCD_DEBUG") if debug is None else debug
        self.apdu_log = apdu_log
        self.preload = preload
        self.fix_tlv = fix_tlv
        self.vicc_verbose = vicc_verbose
        self.friendly_name = friendly_name
        self.base_dir = base_dir
        self.keep_dir = _env_flag("CBHARNESS_KEEP") if keep_dir is None else keep_dir
        self.start_timeout = start_timeout
        self.name = name or "desk"

        self.dir: Optional[Path] = None
        self.ports: Optional[PortBlock] = None
        self.pcscd: Optional[Proc] = None
        self._cards: Dict[int, _Card] = {}
        self._retired: List[Proc] = []  # earlier pcscd/vicc instances (for logs)
        self._final_logs: Dict[str, str] = {}
        self._rm_finalizer: Optional[weakref.finalize] = None
        self._started = False

    # ================================================================ layout
    def _set_slots(self, slots: int) -> None:
        if not 1 <= slots <= 2 * MAX_VPCD_ENTRIES:
            raise ValueError(f"slots must be 1..{2 * MAX_VPCD_ENTRIES}")
        self.entries = (slots + 1) // 2
        self.slots = 2 * self.entries

    def _entry_name(self, k: int) -> str:
        return self.friendly_name if k == 0 else f"{self.friendly_name} {_ENTRY_SUFFIXES[k]}"

    @property
    def readers(self) -> List[str]:
        """Expected reader names, index = slot."""
        return [f"{self._entry_name(i // 2)} 00 {i % 2:02X}" for i in range(self.slots)]

    def reader_name(self, slot: int = 0) -> str:
        self._check_slot(slot)
        return self.readers[slot]

    def port(self, slot: int = 0) -> int:
        self._check_slot(slot)
        assert self.ports is not None, "desk not started"
        return self.ports.base + slot

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range 0..{self.slots - 1}")

    @property
    def socket_path(self) -> str:
        if self.dir is None:
            raise HarnessError("desk not started")
        return str(self.dir / "run" / "pcscd.comm")

    @property
    def conf_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "reader.conf.d"

    @property
    def pcscd_log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "pcscd.log"

    def env(self) -> Dict[str, str]:
        """{'PCSCLITE_CSOCK_NAME': <socket>} - merge into a client's environment."""
        return {"PCSCLITE_CSOCK_NAME": self.socket_path}

    def full_env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        e = dict(os.environ if base is None else base)
        e.update(self.env())
        return e

    @property
    def pcscd_pid(self) -> Optional[int]:
        return self.pcscd.pid if self.pcscd else None

    # ================================================================ start
    def start(self) -> "EmulatedDesk":
        if self._started:
            raise HarnessError("desk already started")
        support.check_prerequisites()
        parent = Path(self.base_dir) if self.base_dir else None
        self.dir = Path(tempfile.mkdtemp(prefix=f"cb{self.name}-", dir=parent))
        if len(self.socket_path.encode()) >= 108:
            raise HarnessError(f"socket path too long for AF_UNIX: {self.socket_path}")
        if not self.keep_dir:
            self._rm_finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self._started = True
        try:
            (self.dir / "run").mkdir()
            self.conf_dir.mkdir()
            self._start_pcscd()
            for slot in self.initial_cards:
                self.insert_card(slot)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_conf(self) -> None:
        """One file with all entries: pcscd reads the *files* of the directory
        in readdir() order, but the entries of one file in sequence, so this
        keeps the reader order (= slot order) deterministic."""
        for f in self.conf_dir.iterdir():
            f.unlink()
        entries = []
        for k in range(self.entries):
            port = self.ports.base + 2 * k
            entries.append(
                f'FRIENDLYNAME "{self._entry_name(k)}"\n'
                f"DEVICENAME /dev/null:0x{port:04X}\n"
                f"LIBPATH {support.vpcd_driver(k)}\n"
            )
        (self.conf_dir / "vpcd").write_text("\n".join(entries))

    def _pcscd_argv(self) -> List[str]:
        pcscd = [support.PCSCD, "--foreground", "-c", str(self.conf_dir)]
        pcscd.append("--debug" if self.debug else "--info")
        if self.apdu_log:
            pcscd.append("--apdu")
        script = 'set -e; mount --bind "$1" /run/pcscd; shift; exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh",
                str(self.dir / "run")] + pcscd

    def _start_pcscd(self, attempts: int = 3) -> None:
        os.makedirs("/run/pcscd", exist_ok=True)  # mount point must exist
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PCSCLITE_", "CBHARNESS_"))}
        # The preload always runs: it hands pcscd the held vpcd ports (CBHARNESS_HELD_PORTS);
        # preload=False only turns its TCP_NODELAY part off.
        env["LD_PRELOAD"] = str(support.nodelay_preload())
        if not self.preload:
            env["CBHARNESS_NODELAY"] = "0"
        last_error: Optional[BaseException] = None
        for attempt in range(attempts):
            if self.ports is None:
                self.ports = reserve_ports(self.slots, hold=True)
            held = self.ports.held()
            env["CBHARNESS_HELD_PORTS"] = ",".join(f"{port}:{fd}" for port, fd in sorted(held.items()))
            self._write_conf()
            sock = Path(self.socket_path)
            if sock.exists():
                sock.unlink()
            log_path = self.pcscd_log_path
            if log_path.exists():  # keep the failed attempt's log for reference
                log_path.rename(log_path.with_name(f"pcscd.failed-attempt{attempt}.log"))
            self.pcscd = Proc(self._pcscd_argv(), name="pcscd", log_path=log_path, env=env,
                              pass_fds=tuple(held.values())).start()
            expected = self.readers
            try:
                wait_until(
                    lambda: self._readers_match(expected),
                    timeout=self.start_timeout,
                    desc=f"pcscd to serve readers {expected} on {self.socket_path}",
                    abort=lambda: self._startup_abort_reason(expected),
                    details=lambda: self._diagnose(expected),
                )
                return
            except HarnessError as exc:
                last_error = exc
                log = self.pcscd.log_text()
                self.pcscd.stop()
                port_problem = "Address already in use" in log or "Could not initialize" in log
                if not port_problem or attempt == attempts - 1:
                    break
                self.ports.release()  # port stolen between check and bind: new block
                self.ports = None
        raise HarnessError(f"emulated desk: pcscd did not start properly\n{last_error}")

    def _startup_abort_reason(self, expected: Sequence[str]) -> Optional[str]:
        if not self.pcscd.alive():
            return "pcscd died"
        # A vpcd entry whose port could not be bound gives no readers, for good (no hot-plug):
        # that is final. Anything else (pcscd logs "daemon ready" before its socket serves the
        # complete reader array) is waited out until start_timeout.
        log = self.pcscd.log_text()
        if "Address already in use" in log or "Could not initialize" in log:
            return "a vpcd port could not be bound"
        return None

    def _readers_match(self, expected: Sequence[str]) -> bool:
        if not os.path.exists(self.socket_path):
            return False
        return [r.name for r in reader_states(self.socket_path)] == list(expected)

    def _diagnose(self, expected: Sequence[str]) -> str:
        lines = []
        try:
            lines.append(f"readers reported: {[r.name for r in reader_states(self.socket_path, 1.0)]}")
        except Exception as exc:  # noqa: BLE001
            lines.append(f"could not query pcscd: {exc}")
        lines.append(f"readers expected: {list(expected)}")
        if self.pcscd is not None:
            lines.append(self.pcscd.failure_report(40))
        return "\n".join(lines)

    # ================================================================ state
    def states(self) -> List[ReaderState]:
        """Reader states straight from pcscd (pure-Python wire client)."""
        return reader_states(self.socket_path)

    def reader_names(self) -> List[str]:
        return [r.name for r in self.states()]

    def state(self, slot: int = 0) -> Optional[ReaderState]:
        name = self.reader_name(slot)
        for r in self.states():
            if r.name == name:
                return r
        return None

    def card_present(self, slot: int = 0) -> bool:
        st = self.state(slot)
        return bool(st and st.card_present)

    def atr(self, slot: int = 0) -> Optional[bytes]:
        st = self.state(slot)
        return st.atr if st and st.card_present else None

    def gate(self, slot: int = 0) -> CardGate:
        """The gate of the card in slot (inserted with gate=True)."""
        card = self._cards.get(slot)
        if card is None or card.gate is None:
            raise HarnessError(f"no gated card in slot {slot} (insert_card(slot, gate=True))")
        return card.gate

    def vicc(self, slot: int = 0) -> Optional[Proc]:
        card = self._cards.get(slot)
        return card.proc if card else None

    # ================================================================ cards
    def insert_card(
        self,
        slot: int = 0,
        atr: AtrLike = None,
        *,
        fix_tlv: Optional[bool] = None,
        test_ins: bool = False,
        extended: bool = False,
        card_type: str = "iso7816",
        gate: bool = False,
        wait: bool = True,
        timeout: float = 10.0,
    ) -> Optional[ReaderState]:
        """Start a vicc on the slot and (by default) wait until pcscd reports
        the card present (with the requested ATR, if any).

        Plain `/usr/bin/vicc -t iso7816` is used unless an ATR, fix_tlv,
        test_ins, extended or a card_type other than iso7816 is requested;
        then the harness launcher (vicc_main.py) runs the same emulator with
        those tweaks:
          atr       ATR to report (bytes or hex string)
          fix_tlv   no crash on SELECT returning FCI/FCP (default: desk's fix_tlv)
          test_ins  INS EE: echo command data / return P1P2 pattern bytes
          extended  advertise extended length in the ATR
          gate      INS EF is held at the card until the test releases it (gate(slot))
        """
        self._require_running()
        self._check_slot(slot)
        want_atr = _parse_atr(atr)
        fix = self.fix_tlv if fix_tlv is None else fix_tlv
        old = self._cards.get(slot)
        if old is not None:
            if old.proc.alive():
                raise HarnessError(f"slot {slot} already has a card (vicc pid {old.proc.pid}); remove_card() first")
            # the emulator died (e.g. crashed on an APDU): let pcscd notice
            # the removal first so the wait below cannot see the stale card
            self.remove_card(slot, timeout=timeout)
        elif self.card_present(slot):
            raise HarnessError(f"pcscd reports a card in slot {slot} that this desk did not insert")
        port = self.port(slot)
        card_gate = None
        if gate:
            k = sum(1 for p in self._retired if p.name == f"vicc-slot{slot}")
            card_gate = CardGate(self.dir / f"gate-slot{slot}.{k}")
        if want_atr is None and not (fix or test_ins or extended or gate) and card_type == "iso7816":
            argv = [support.SYSTEM_PYTHON, support.VICC, "-t", "iso7816", "-H", "127.0.0.1", "-P", str(port)]
            argv += ["-v"] * self.vicc_verbose
        else:
            argv = [support.SYSTEM_PYTHON, str(Path(__file__).with_name("vicc_main.py")),
                    "--host", "127.0.0.1", "--port", str(port), "--type", card_type]
            if want_atr is not None:
                argv += ["--atr", want_atr.hex()]
            if fix:
                argv.append("--fix-tlv")
            if test_ins:
                argv.append("--test-ins")
            if extended:
                argv.append("--extended")
            if card_gate is not None:
                argv += ["--gate-dir", str(card_gate.path)]
            argv += ["-v"] * self.vicc_verbose
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PCSCLITE_", "LD_PRELOAD"))}
        env["PYTHONPATH"] = support.vicc_pythonpath()
        env["PYTHONUNBUFFERED"] = "1"
        n = sum(1 for p in self._retired if p.name == f"vicc-slot{slot}")
        log = self.dir / (f"vicc-slot{slot}.log" if n == 0 else f"vicc-slot{slot}.{n}.log")
        proc = Proc(argv, name=f"vicc-slot{slot}", log_path=log, env=env).start()
        self._cards[slot] = _Card(slot, proc, want_atr, fix,
                                  {"card_type": card_type, "test_ins": test_ins, "extended": extended, "gate": gate},
                                  card_gate)
        if not wait:
            return None
        name = self.reader_name(slot)

        def present():
            st = self.state(slot)
            if st and st.card_present and (want_atr is None or st.atr == want_atr):
                return st
            return None

        return wait_until(
            present,
            timeout=timeout,
            desc=f"card in {name!r} (port {port}) to be reported present"
            + (f" with ATR {want_atr.hex()}" if want_atr else ""),
            abort=lambda: None if proc.alive() else f"vicc {proc.exit_description()}",
            details=lambda: f"reader state: {self._safe_state(slot)}\n{proc.failure_report(20)}\n"
            f"{self.pcscd.failure_report(20)}",
        )

    def remove_card(self, slot: int = 0, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Stop the slot's vicc and (by default) wait until pcscd reports the
        slot empty.  Harmless if there is no card."""
        self._require_running()
        self._check_slot(slot)
        if slot in self._cards:
            self._retire_card(slot)
        if wait:
            wait_until(
                lambda: not self.card_present(slot),
                timeout=timeout,
                desc=f"card in {self.reader_name(slot)!r} to be reported absent",
                details=lambda: f"reader state: {self._safe_state(slot)}\n{self.pcscd.failure_report(20)}",
            )

    def _retire_card(self, slot: int) -> None:
        card = self._cards.pop(slot)
        card.proc.stop(grace=2.0)
        self._retired.append(card.proc)

    def _safe_state(self, slot: int) -> str:
        try:
            st = self.state(slot)
            return "reader missing" if st is None else f"state=0x{st.state:04X} atr={st.atr.hex()} events={st.event_counter}"
        except Exception as exc:  # noqa: BLE001
            return f"(cannot query pcscd: {exc})"

    # ================================================================ readers
    def add_reader(self, *_, **__):
        raise HotplugUnsupported(
            "reader hot-plug is not supported: pcscd 1.9.9 (Debian, libudev hotplug) reads "
            "reader.conf.d only at start-up and SIGUSR1 / `pcscd -H` merely logs 'Received signal: 10'. "
            "Use desk.restart(slots=N) to restart pcscd with a different number of readers."
        )

    remove_reader = add_reader

    def restart(self, slots: Optional[int] = None, *, reinsert: bool = True) -> None:
        """Restart pcscd on the same socket path, optionally with a different
        number of slots.  Cards are stopped with the old daemon (vicc exits
        when vpcd goes away) and re-inserted into the slots that still exist
        if `reinsert`.  Clients see the daemon disappear and come back.
        A pcscd that died (a test killed it) is restarted the same way."""
        if not self._started or self.pcscd is None:
            raise HarnessError("desk not started")
        cards = {s: c for s, c in self._cards.items()}
        for s in list(self._cards):
            self._retire_card(s)
        self._retired.append(self.pcscd)
        self.pcscd.stop()
        self._archive_log(self.pcscd, suffix=f".{len([p for p in self._retired if p.name == 'pcscd'])}")
        if slots is not None and (slots + 1) // 2 * 2 != self.slots:
            self._set_slots(slots)
            self.ports.release()
            self.ports = None
        self._start_pcscd()
        if reinsert:
            for s, c in sorted(cards.items()):
                if s < self.slots:
                    self.insert_card(s, c.atr, fix_tlv=c.fix_tlv, **c.kwargs)

    def _archive_log(self, proc: Proc, suffix: str) -> None:
        try:
            dest = proc.log_path.with_name(proc.log_path.stem + suffix + proc.log_path.suffix)
            proc.log_path.rename(dest)
            proc.log_path = dest
        except OSError:
            pass

    def signal_pcscd(self, sig: int = signal.SIGUSR1) -> None:
        self._require_running()
        self.pcscd.send_signal(sig)

    # ================================================================ logs
    def log_text(self) -> str:
        """pcscd's log (also available after stop())."""
        if self.pcscd is not None and self.pcscd.log_path.exists():
            return self.pcscd.log_text()
        return self._final_logs.get("pcscd", "")

    def vicc_log_text(self, slot: int = 0) -> str:
        card = self._cards.get(slot)
        if card is not None:
            return card.proc.log_text()
        for p in reversed(self._retired):
            if p.name == f"vicc-slot{slot}":
                return p.log_text() or self._final_logs.get(p.name, "")
        return self._final_logs.get(f"vicc-slot{slot}", "")

    def failure_report(self) -> str:
        parts = [f"emulated desk {self.dir} (socket {self.socket_path if self.dir else '-'})"]
        if self.pcscd is not None:
            parts.append(self.pcscd.failure_report(40))
        for c in self._cards.values():
            parts.append(c.proc.failure_report(15))
        return "\n".join(parts)

    # ================================================================ stop
    def _require_running(self) -> None:
        if not self._started or self.pcscd is None:
            raise HarnessError("desk not started")
        if not self.pcscd.alive():
            raise HarnessError("pcscd is not running\n" + self.pcscd.failure_report(40))

    def stop(self) -> None:
        """Kill every vicc and pcscd, release ports, remove the temp dir.
        Idempotent and safe to call from failure paths."""
        procs = [c.proc for c in self._cards.values()]
        if self.pcscd is not None:
            procs.append(self.pcscd)
        try:
            stop_all(procs, grace=3.0)
        finally:
            self._cards.clear()
            for p in self._retired + procs:  # newest last: it wins
                text = p.log_text()
                if text or p.name not in self._final_logs:
                    self._final_logs[p.name] = text
            if self.ports is not None:
                self.ports.release()
                self.ports = None
            if self.dir is not None and not self.keep_dir:
                if self._rm_finalizer is not None:
                    self._rm_finalizer()  # rmtree now
                else:
                    shutil.rmtree(self.dir, ignore_errors=True)
            self._started = False

    def __enter__(self) -> "EmulatedDesk":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmulatedDesk {self.dir} slots={self.slots} pcscd={self.pcscd_pid}>"
