"""Concurrency through the shim: several threads and several processes transmitting at once
get their own answers (no mix-ups), a slow card operation or a parked wait does not hold up
others.

Shared rig: slot 0 ISO 7816 card, slot 2 the harness test card (INS EE echoes command data).

libpcsclite's own handle table is not thread-safe (client-plugin/pcsc/include/cardbridge/desk_pcsc/library_gate.hpp):
a multi-threaded client process that connects or disconnects in one thread while another
thread uses a handle, or establishes/releases a context while another disconnects, can
crash, on the desk's pcscd as through the shim. So threaded clients here set up and tear
down one thread at a time, behind a barrier; the connect/disconnect storm runs in separate
processes. The desk agent, which must survive exactly that, is stormed directly."""
from __future__ import annotations

import pytest

from core_support import CB_PCSC, GET_CHALLENGE, HANG_GUARD_S, OK, compare, pyscard_popen, pyscard_result, wait_until

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
    results = [pyscard_result(p) for p in procs]
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
        out, _ = p.communicate(timeout=HANG_GUARD_S)
        r = [l for l in out.splitlines() if l.startswith("{")][-1]
        assert '"failures":0' in r and '"duplicates":0' in r and '"ok":120' in r, r
    for p in echo:
        r = pyscard_result(p)
        assert r["n_errors"] == 0 and r["ok"] == 60, r


SLOW_AND_FAST = r'''
import os
fast_reader, slow_reader, gate_dir, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def ctx_handle(reader):
    rv, hc = S.SCardEstablishContext(S.SCARD_SCOPE_USER)
    rv, h, p = S.SCardConnect(hc, reader, S.SCARD_SHARE_SHARED, S.SCARD_PROTOCOL_T0 | S.SCARD_PROTOCOL_T1)
    assert rv == 0, rvs(rv)
    return hc, h, p
slow = {}
slow_hc, slow_h, slow_p = ctx_handle(slow_reader)   # before the other thread transmits
def slow_worker():
    rv, resp = S.SCardTransmit(slow_h, slow_p, [0x80, 0xEF, 0, 0])   # held at the card until released
    slow.update(rv=rvs(rv), resp=bytes(resp).hex().upper())
hc, h, p = ctx_handle(fast_reader)
th = threading.Thread(target=slow_worker); th.start()
while not os.path.exists(os.path.join(gate_dir, "held." + n)):   # the slow APDU reached the card
    time.sleep(0.01)
fast = []
for i in range(50):   # the other reader, from another context of the same process, meanwhile
    rv, resp = S.SCardTransmit(h, p, [0, 0x84, 0, 0, 8])
    fast.append(rvs(rv) if rv else bytes(resp[-2:]).hex().upper())
slow_done_before_release = not th.is_alive()
open(os.path.join(gate_dir, "release." + n), "w").close()
th.join()
out({"slow": slow, "fast": fast, "slow_done_before_release": slow_done_before_release})
'''


def test_slow_card_operation_does_not_block_another_reader(rig):
    """A card operation held at the card (the harness's gated card on slot 2: it answers only
    when the test releases it) while 50 GET CHALLENGEs go to the other reader from another
    context of the same process: they all complete while the slow one is still in flight."""
    res = {}
    for t in ("desk", "shim"):
        gate = rig.desk.gate(2)
        n = gate.held() + 1
        r = pyscard_result(pyscard_popen(rig.sock(t), SLOW_AND_FAST, rig.desk.readers[0], rig.desk.readers[2],
                                         str(gate.path), str(n)))
        res[t] = r
        assert r["fast"] == ["9000"] * 50 and not r["slow_done_before_release"], (t, r)
        assert r["slow"] == {"rv": OK, "resp": "9000"}, (t, r)


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
    for w in waits:
        w.wait_blocked("wait")
    r = s.call("batch", steps=[{"op": "transmit", "h": "tx", "apdu": GET_CHALLENGE}] * 100)
    assert all(x["rv"] == OK for x in r["results"])
    print(f"100 transmits took {1000 * (r['t1'] - r['t0']):.0f} ms with 6 waits parked")
    assert not any(w.done() for w in waits), "a wait returned without a change"
    for i in range(6):
        assert s.rv("cancel", ctx=f"w{i}") == OK
    assert all(w.result()["rv"] == "0x80100002" for w in waits)
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
        r = pyscard_result(p)
        assert r["n"] == 0, r
    # (the shim learns of each client's end from its socket: wait for the count to drain)
    wait_until(lambda: (lambda st: (st["clients"], st["handles"]) == (0, 0))(rig.status()), timeout=HANG_GUARD_S,
               desc="the shim to forget every client and handle after all programs ended",
               details=lambda: f"shim status: {rig.status()}")


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
