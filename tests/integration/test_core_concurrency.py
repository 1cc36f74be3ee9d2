"""Concurrency through the shim: several threads and several processes transmitting at once
get their own answers (no mix-ups), a slow card operation or a parked wait does not hold up
others.

Shared rig: slot 0 ISO 7816 card, slot 2 the harness test card (INS EE echoes command data).

libpcsclite's own handle table is not thread-safe (client-plugin/src/pcsc/library_gate.hpp):
a multi-threaded client process that connects or disconnects in one thread while another
thread uses a handle, or establishes/releases a context while another disconnects, can
crash, on the desk's pcscd as through the shim. So threaded clients here set up and tear
down one thread at a time, behind a barrier; the connect/disconnect storm runs in separate
processes. The desk agent, which must survive exactly that, is stormed directly."""
from __future__ import annotations

import time

import pytest

from core_support import CB_PCSC, GET_CHALLENGE, OK, compare, pyscard_popen, pyscard_result

# Each thread has its own context and handle and sends echo APDUs whose data names the process,
# the thread and the round; every answer must be exactly its own data.
ECHO_WORKER = r'''
reader, tag, threads, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
errors, ok = [], [0]
lock = threading.Lock()
setup = threading.Lock()          # one thread at a time in libpcsclite's handle table...
started = threading.Barrier(threads)
finished = threading.Barrier(threads)
def work(k):
    with setup:
        rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
        rv, h, proto = S.SCardConnect(hc, reader, S.SCARD_SHARE_SHARED, S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1)
    started.wait()                # ...and nobody transmitting meanwhile
    if rv:
        with lock: errors.append("connect " + rvs(rv))
        finished.wait()
        return
    for i in range(rounds):
        data = ("%s/%d/%d/" % (tag, k, i)).encode() * (1 + (i % 7))
        data = data[:250]
        apdu = [0x80, 0xEE, 0x00, 0x00, len(data)] + list(data) + [0x00]
        rv, resp = S.SCardTransmit(h, proto, apdu)
        with lock:
            if rv != 0:
                errors.append("transmit %s" % rvs(rv))
            elif bytes(resp) != data + b"\x90\x00":
                errors.append("mix-up: sent %r got %r" % (data[:40], bytes(resp)[:40]))
            else:
                ok[0] += 1
    finished.wait()
    with setup:
        S.SCardDisconnect(h, S.SCARD_LEAVE_CARD)
        S.SCardReleaseContext(hc)
ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
out({"ok": ok[0], "errors": errors[:10], "n_errors": len(errors)})
'''


def test_threads_get_challenge_cb_pcsc(rig):
    """cb-pcsc threads: 8 threads, each its own context, 50 GET CHALLENGEs each; no failures and
    no answer seen twice."""
    res = {}
    for t in ("desk", "shim"):
        r = rig.cb_pcsc(t, "threads", "--reader", rig.desk.readers[0], "--threads", "8", "--count", "50")
        res[t] = {k: r[k] for k in ("ok", "failures", "duplicates")}
    compare(res, "cb-pcsc threads")
    assert res["shim"] == {"ok": 400, "failures": 0, "duplicates": 0}


def test_processes_and_threads_echo_without_mixups(rig):
    """4 processes x 4 threads x 40 echo APDUs of varying length through the shim at once."""
    r2 = rig.desk.readers[2]
    procs = [pyscard_popen(rig.sock("shim"), ECHO_WORKER, r2, f"p{i}", "4", "40") for i in range(4)]
    results = [pyscard_result(p, timeout=60) for p in procs]
    for i, r in enumerate(results):
        assert r["n_errors"] == 0 and r["ok"] == 160, f"process {i}: {r}"


def test_processes_in_parallel_on_both_readers(rig):
    """cb-pcsc processes on two readers at once (slot 0 GET CHALLENGE, slot 2 echo)."""
    import subprocess
    from core_support import CB_PCSC, client_env
    env = client_env(rig.sock("shim"))
    cb = [subprocess.Popen([str(CB_PCSC), "threads", "--reader", rig.desk.readers[0], "--threads", "3", "--count",
                            "40"], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    echo = [pyscard_popen(rig.sock("shim"), ECHO_WORKER, rig.desk.readers[2], f"q{i}", "2", "30") for i in range(2)]
    for p in cb:
        out, _ = p.communicate(timeout=60)
        r = [l for l in out.splitlines() if l.startswith("{")][-1]
        assert '"failures":0' in r and '"duplicates":0' in r and '"ok":120' in r, r
    for p in echo:
        r = pyscard_result(p, timeout=60)
        assert r["n_errors"] == 0 and r["ok"] == 60, r


SLOW_AND_FAST = r'''
import random
fast_reader, slow_reader = sys.argv[1], sys.argv[2]
def ctx_handle(reader):
    rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
    rv, h, p = S.SCardConnect(hc, reader, S.SCARD_SHARE_SHARED, S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1)
    assert rv == 0, rvs(rv)
    return hc, h, p
slow = {}
slow_hc, slow_h, slow_p = ctx_handle(slow_reader)   # before the other thread transmits
def slow_worker():
    hc, h, p = slow_hc, slow_h, slow_p
    data = bytes(random.getrandbits(8) for _ in range(65000))
    apdu = [0x80, 0xEE, 0, 0, 0, 0xFD, 0xE8] + list(data) + [0, 0]
    t0 = time.monotonic()
    rv, resp = S.SCardTransmit(h, p, apdu)
    slow.update(rv=rvs(rv), ok=bytes(resp[:-2]) == data, t0=t0, t1=time.monotonic())
hc, h, p = ctx_handle(fast_reader)
th = threading.Thread(target=slow_worker); th.start()
lat = []
while th.is_alive():
    t0 = time.monotonic()
    rv, resp = S.SCardTransmit(h, p, [0, 0x84, 0, 0, 8])
    lat.append((t0, time.monotonic() - t0, rv))
th.join()
during = [d for t0, d, rv in lat if slow["t0"] <= t0 and t0 + d <= slow["t1"]]
out({"slow": slow, "n_during": len(during), "max_during": max(during) if during else None,
     "fast_errors": sum(1 for _, _, rv in lat if rv)})
'''


def test_slow_card_operation_does_not_block_another_reader(rig):
    """A 65000-byte echo on the test card (vicc is slow Python: ~0.3-0.6 s) runs while GET
    CHALLENGEs go to the other reader from another context of the same process: those keep
    their usual latency."""
    res = {}
    for t in ("desk", "shim"):
        res[t] = pyscard_result(pyscard_popen(rig.sock(t), SLOW_AND_FAST, rig.desk.readers[0], rig.desk.readers[2]),
                                timeout=60)
    for t, r in res.items():
        assert r["slow"]["rv"] == OK and r["slow"]["ok"], (t, r)
        assert r["fast_errors"] == 0, (t, r)
    r = res["shim"]
    if r["n_during"] == 0:
        pytest.fail(f"no fast transmit completed while the slow one ran (blocked?): {res}")
    assert r["max_during"] < 0.1, f"a GET CHALLENGE on the other reader took {r['max_during']:.3f}s during the " \
                                  f"slow transmit (desk: {res['desk']['max_during']})"


def test_parked_waits_do_not_hold_up_transmits(rig):
    """Six contexts of one process wait INFINITE in GetStatusChange while another context
    transmits 100 times; then all waits are cancelled."""
    s = rig.session("shim")
    r0 = rig.desk.readers[0]
    for i in range(6):
        s.call("establish", ctx=f"w{i}")
    s.call("establish", ctx="tx")
    assert s.rv("connect", ctx="tx", reader=r0, h="tx") == OK
    waits = []
    for i in range(6):
        cur = s.call("gsc", ctx=f"w{i}", readers=[[r0, 0]], ms=0)["states"][0][1] & ~2
        waits.append(s.start("gsc", ctx=f"w{i}", readers=[[r0, cur]], ms=-1))
    time.sleep(0.2)
    r = s.call("batch", steps=[{"op": "transmit", "h": "tx", "apdu": GET_CHALLENGE}] * 100, timeout=20)
    assert all(x["rv"] == OK for x in r["results"])
    took = r["t1"] - r["t0"]
    assert took < 5, f"100 transmits took {took:.2f}s with waits parked"
    assert not any(w.done() for w in waits), "a wait returned without a change"
    for i in range(6):
        assert s.rv("cancel", ctx=f"w{i}") == OK
    assert all(w.result(3)["rv"] == "0x80100002" for w in waits)
    s.close()


CONNECT_STORM = r'''
reader, rounds, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
errs = []
def work():
    for i in range(rounds):
        rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
        if rv: errs.append("establish " + rvs(rv)); continue
        rv, h, p = S.SCardConnect(hc, reader, S.SCARD_SHARE_SHARED, 3)
        if rv: errs.append("connect " + rvs(rv))
        else:
            rv, resp = S.SCardTransmit(h, p, [0, 0x84, 0, 0, 8])
            if rv or len(resp) != 10: errs.append("transmit " + rvs(rv))
            if i % 2: S.SCardDisconnect(h, S.SCARD_LEAVE_CARD)   # half left to ReleaseContext
        rv = S.SCardReleaseContext(hc)
        if rv: errs.append("release " + rvs(rv))
ts = [threading.Thread(target=work) for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
out({"errors": errs[:10], "n": len(errs)})
'''


def test_context_and_connect_storm(rig):
    """12 processes x 25 rounds of establish/connect/transmit/(disconnect)/release at once: 12
    server contexts, so 12 desk workers connecting and disconnecting concurrently. (One
    thread per process: libpcsclite itself crashes threaded clients doing this; see the top.)"""
    procs = [pyscard_popen(rig.sock("shim"), CONNECT_STORM, rig.desk.readers[0], "25", "1") for _ in range(12)]
    for p in procs:
        r = pyscard_result(p, timeout=60)
        assert r["n"] == 0, r
    st = rig.status()
    deadline = time.monotonic() + 2
    while (st["clients"], st["handles"]) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
        st = rig.status()
    assert (st["clients"], st["handles"]) == (0, 0), f"the shim still tracks {st['clients']} clients / " \
                                                     f"{st['handles']} handles after all programs ended"


DESK_STORM = CB_PCSC.parent / "cb-desk-storm"


@pytest.mark.parametrize("threads,churn", [(8, 2), (16, 25)])
def test_desk_card_api_under_concurrent_contexts(rig, threads, churn):
    """The desk's CardApi on the real libpcsclite and the desk's pcscd, as the desk engine's
    per-context workers use it: THREADS contexts at once, each 150 rounds of connect,
    (begin), transmit, status, (end), disconnect or not, a new context every CHURN rounds.
    Every call succeeds (or meets another thread's transaction, as pcscd answers), the
    process neither crashes nor hangs, and pcscd is left with no reader in use."""
    import subprocess
    from core_support import client_env, last_json_line
    runs = []
    for _ in range(3):
        p = subprocess.run([str(DESK_STORM), "--reader", rig.desk.readers[0], "--threads", str(threads),
                            "--rounds", "150", "--churn", str(churn)],
                           env=client_env(rig.sock("desk")), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"cb-desk-storm rc {p.returncode}: {p.stdout[-2000:]} {p.stderr[-2000:]}"
        runs.append(last_json_line(p, "cb-desk-storm"))
    for r in runs:
        assert r["gate"] is True and r["failures"] == {}, r
        assert r["calls"] >= threads * 150 * 4, r  # connect, transmit, status and half a disconnect, at least
    # Nothing left connected at the desk: a fresh exclusive connect succeeds.
    s = rig.session("desk")
    s.call("establish", ctx="x")
    assert s.rv("connect", ctx="x", reader=rig.desk.readers[0], h="x", share="exclusive") == OK
    s.close()
