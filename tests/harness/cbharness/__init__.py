"""CardBridge test harness: an emulated "desk" (private pcscd + vpcd + vicc).

See tests/harness/README.md.  Main entry points:

    EmulatedDesk        private pcscd with virtual readers and emulated cards
    Proc                child process with log file and process-group cleanup
    wait_until          deadline-based polling
    pcsc_call/PcscWatch pyscard probes in a subprocess (per-socket)
    reader_states       pure-Python query of a pcscd socket (no pyscard)
    shim_control        one request on a shim's control socket
"""
from .artefacts import artefact
from .control import last_json_line, shim_control
from .desk import GATED_APDU, CardGate, EmulatedDesk, HotplugUnsupported
from . import netinfo, threadstate
from .pcsc import PcscWatch, pcsc_call, transmit
from .pcscwire import ReaderState, reader_names, reader_states
from .procs import Proc, live_procs, stop_all
from .support import nodelay_preload
from .waiting import HANG_GUARD_S, Deadline, HarnessError, HarnessTimeout, wait_until

__all__ = [
    "EmulatedDesk", "HotplugUnsupported", "CardGate", "GATED_APDU", "HANG_GUARD_S", "PcscWatch", "pcsc_call", "transmit", "ReaderState",
    "reader_names", "reader_states", "Proc", "live_procs", "stop_all", "nodelay_preload",
    "Deadline", "HarnessError", "HarnessTimeout", "wait_until", "shim_control", "last_json_line", "threadstate", "netinfo",
    "artefact",
]
