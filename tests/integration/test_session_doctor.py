"""`cdrsession doctor`, run in the published application's context, against real parts: its verdict,
in plain words and as JSON (--json), and its exit code (cdrsession/lib/include/cardbridge/session/doctor.hpp) for the healthy
chain and for each broken link.

One emulated desk with six readers; desk agents with a reader filter (--readers) make the desks
of the cases, each served to a session shim started by `cdrsession start`:
    "Doc Reader 00 00/01"    a CPS3 card (the harness sets the CPS3 ATR) + an empty reader
    "Doc Reader B 00 00/01"  vicc's stock ISO 7816 card (ATR 3B 95 13 81 ..., no CPx card) + empty
    "Doc Reader C 00 00/01"  no card
    filter matching nothing  a desk with no reader

| case        | how                                                        | exit |
| healthy     | CPS3 desk                                                  | 0    |
| environment | healthy session, PCSCLITE_CSOCK_NAME not in the environment | 2    |
| shim        | no shim started / a stale socket nobody serves             | 2    |
| user        | another user's socket: test_session_users.py (real users)  | 2    |
| channel     | shim up, its desk link leads nowhere                       | 2    |
| readers     | agent whose --readers filter matches nothing               | 2    |
| card        | readers without a card                                     | 2    |
| card-type   | unknown card (vicc's ATR)                                  | 1    |
| latency     | 40 ms each way between shim and desk agent                 | 1    |

Slow link: a private network namespace with `tc netem delay 40ms` on its loopback, desk agent and
shim inside it (no address outside 127.0.0.0/8 is used). Kernels without sch_netem (this machine's,
CONFIG_NET_SCH_NETEM is not set) get a userspace TCP relay that holds every chunk 40 ms each way.

Run:  /usr/bin/python3 -m pytest tests/integration/test_session_doctor.py -v
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from test_session_support import (artefact, CPS3_ATR, HANG_GUARD_S, EXIT, EXIT_WARNING, VICC_ATR, DelayRelay, DeskAgent, SessionDir, start_desk,
                                  Sessions, check_of, doctor, export_socket, require_built, session_env, short_tmp,
                                  shim_reader_names, wait_until)

TITLES = {"environment": "PCSCLITE_CSOCK_NAME", "shim": "CardBridge shim", "user": "owner", "channel": "desk link",
          "desk-pcsc": "desk PC/SC service", "readers": "readers", "card": "card", "card-type": "card type", "latency": "round trip"}
ORDER = ["environment", "shim", "user", "channel", "desk-pcsc", "readers", "card", "card-type", "latency"]
DELAY_MS = 40


@pytest.fixture(scope="module")
def world():
    require_built()
    base = short_tmp("cbd-")
    desk = None
    agents, sessions, cleanups = {}, Sessions(), []
    try:
        desk = start_desk(slots=6, friendly_name="Doc Reader", name="doc")
        desk.insert_card(0, atr=CPS3_ATR)
        desk.insert_card(2)  # stock vicc: ATR 3B 95 13 81 01 80 73 FF 01 00 0B
        for case, flt in (("cps3", "Doc Reader 00"), ("unknown", "Doc Reader B"), ("nocard", "Doc Reader C"),
                          ("noreader", "NoSuchReader")):
            agents[case] = DeskAgent(f"d{case}", desk=desk, desk_name=f"DESK-{case.upper()}",
                                     agent_args=("--readers", flt))
        yield dict(base=base, desk=desk, agents=agents, sessions=sessions, cleanups=cleanups)
    finally:
        sessions.stop_all()
        for c in reversed(cleanups):
            c()
        for a in agents.values():
            a.stop()
        if desk is not None:
            desk.stop()
        shutil.rmtree(base, ignore_errors=True)


def new_session(w, name: str, desk_spec: str, wrap=()) -> tuple:
    rt = w["base"] / name
    rt.mkdir(mode=0o700)
    env = session_env(str(rt))
    r, sd = w["sessions"].start(env, "--desk", desk_spec, wrap=wrap)
    env["PCSCLITE_CSOCK_NAME"] = export_socket(r.stdout)  # what `eval "$(cdrsession start)"` does
    return env, sd


def both_forms(env, *args, default_latency_thresholds: bool = False) -> tuple:
    code_t, text, err_t = doctor(env, *args, default_latency_thresholds=default_latency_thresholds)
    code_j, rep, err_j = doctor(env, *args, json_out=True, default_latency_thresholds=default_latency_thresholds)
    print(text)
    return code_t, text, code_j, rep


def expect(code_t, text, code_j, rep, problem: str, verdict: str) -> None:
    """The same verdict in both forms: exit code, first problem, and what to do."""
    code = EXIT_WARNING if verdict == "degraded" else EXIT[problem]
    assert code_t == code, text
    assert code_j == code == rep["exit_code"], rep
    assert [c["id"] for c in rep["checks"]] == ORDER
    assert rep["verdict"] == verdict, rep
    if problem == "healthy":
        assert rep["first_problem"] is None
        assert "Verdict: HEALTHY" in text and "What to do" not in text, text
        assert all(c["result"] == "ok" for c in rep["checks"]), rep["checks"]
        return
    assert rep["first_problem"] == problem, rep
    bad = check_of(rep, problem)
    assert bad["result"] == ("failed" if verdict == "broken" else "warning"), bad
    assert bad["advice"], bad
    # (two runs: measured figures differ between them)
    detail = "desk round trip median" if problem == "latency" else f"{bad['detail']})."
    assert f"Verdict: {verdict.upper()}: {TITLES[problem]} ({detail}" in text, text
    assert f"What to do: {bad['advice']}" in text, text
    before = ORDER[:ORDER.index(problem)]
    assert all(check_of(rep, c)["result"] == "ok" for c in before), rep["checks"]
    if verdict == "broken":
        assert all(check_of(rep, c)["result"] == "skipped" for c in ORDER[ORDER.index(problem) + 1:])


def wait_desk(sd: SessionDir, readers) -> None:
    wait_until(lambda: shim_reader_names(sd.socket) == readers, timeout=HANG_GUARD_S, desc=f"readers {readers} in the session",
               details=sd.logs)


@pytest.fixture(scope="module")
def healthy(world):
    a = world["agents"]["cps3"]
    env, sd = new_session(world, "healthy", a.spec)
    wait_desk(sd, ["Doc Reader 00 00", "Doc Reader 00 01"])
    return env, sd


def test_healthy(healthy):
    env, sd = healthy
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "healthy", "healthy")
    artefact("doctor-healthy.txt", f"$ cdrsession doctor   (exit {code_t})\n{text}")
    assert f"CardBridge doctor: session 'default' (none), uid {os.getuid()}" in text, text
    assert "desk 'DESK-CPS3' connected" in text and "CPS3 in 'Doc Reader 00 00'" in text, text
    assert rep["session"] == {"type": "none", "key": "default", "uid": os.getuid(), "socket": sd.socket,
                              "pcsclite_csock_name": sd.socket}
    assert rep["desk"]["connected"] and rep["desk"]["name"] == "DESK-CPS3"
    assert [r["name"] for r in rep["readers"]] == ["Doc Reader 00 00", "Doc Reader 00 01"]
    assert rep["cards"] == [{"reader": "Doc Reader 00 00", "atr": CPS3_ATR, "kind": "cps3", "label": "CPS3",
                             "professional": True}]
    lat = rep["latency"]
    assert lat["count"] == 20 and 0 < lat["median_us"] <= lat["p99_us"], lat
    print(f"healthy: desk round trip median {lat['median_us']:.0f} us, p99 {lat['p99_us']:.0f} us")


def test_environment_not_passed_to_the_application(healthy):
    env, sd = healthy
    env = {k: v for k, v in env.items() if k != "PCSCLITE_CSOCK_NAME"}  # e.g. a wrapper with env -i, sudo
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "environment", "broken")
    assert rep["session"]["pcsclite_csock_name"] is None
    assert "PCSCLITE_CSOCK_NAME is not set" in text


def test_no_shim(world):
    rt = world["base"] / "noshim"
    rt.mkdir(mode=0o700)
    sd = SessionDir(str(rt))
    env = session_env(str(rt), PCSCLITE_CSOCK_NAME=sd.socket)
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "shim", "broken")
    assert f"no socket at {sd.socket}" in text and "cdrsession start" in check_of(rep, "shim")["advice"]

    # A stale socket file (a shim that died without cleaning up): nobody answers.
    os.makedirs(sd.dir, mode=0o700)
    for path in (sd.socket, sd.ctl):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "shim", "broken")
    assert "does not answer" in check_of(rep, "shim")["detail"]


def test_no_channel(world):
    env, sd = new_session(world, "nochannel", f"unix:{world['base']}/nowhere.sock")
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "channel", "broken")
    assert rep["desk"]["connected"] is False
    assert "no desk is connected" in text and "nowhere.sock" in text, text


def test_no_reader(world):
    env, sd = new_session(world, "noreader", world["agents"]["noreader"].spec)
    wait_until(lambda: doctor(env, json_out=True)[1]["desk"]["connected"], timeout=HANG_GUARD_S, desc="the desk link",
               details=sd.logs)
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "readers", "broken")
    assert rep["desk"]["name"] == "DESK-NOREADER" and rep["readers"] == []


def test_no_card(world):
    env, sd = new_session(world, "nocard", world["agents"]["nocard"].spec)
    wait_desk(sd, ["Doc Reader C 00 00", "Doc Reader C 00 01"])
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "card", "broken")
    assert rep["cards"] == [] and len(rep["readers"]) == 2
    assert "no card in any reader" in text


def test_unknown_card_vs_cps3(world, healthy):
    env, sd = new_session(world, "unknown", world["agents"]["unknown"].spec)
    wait_desk(sd, ["Doc Reader B 00 00", "Doc Reader B 00 01"])
    code_t, text, code_j, rep = both_forms(env)
    expect(code_t, text, code_j, rep, "card-type", "degraded")
    # Not a card CardBridge knows, but pcsc-tools' ATR list (/usr/share/pcsc/smartcard_list.txt,
    # installed by scripts/install-deps) names it: the doctor says what it is.
    [card] = rep["cards"]
    assert (card["reader"], card["atr"], card["kind"], card["professional"]) == \
        ("Doc Reader B 00 00", VICC_ATR, "unknown", False), card
    assert "vsmartcard" in card["label"] and card["atr_list"][0] == card["label"], card
    assert check_of(rep, "card-type")["cause"] == "unknown-card", rep
    assert f"{card['label']} (pcsc-tools' ATR list) in 'Doc Reader B 00 00' (ATR {VICC_ATR})" in text, text
    # The JSON's head: schema, time and host, for monitoring.
    assert rep["schema_version"] == 1 and rep["host"] == socket.gethostname(), rep
    assert rep["timestamp"].endswith("Z") and "T" in rep["timestamp"], rep
    # The later check still ran: a warning does not block the chain.
    assert check_of(rep, "latency")["result"] == "ok"
    # ... while the CPS3 desk's card is recognised (test_healthy has the whole report).
    _, rep3, _ = doctor(healthy[0], "--pings", "3", json_out=True)
    assert [(c["kind"], c["label"]) for c in rep3["cards"]] == [("cps3", "CPS3")]


def netns_with_netem(tag: str):
    """A private network namespace whose loopback delays every packet DELAY_MS; None if impossible."""
    ns = f"cbdoc{tag}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return None
    ok = subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], capture_output=True).returncode == 0 and \
        subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", f"{DELAY_MS}ms"],
                       capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return None
    return ns


def test_slow_link(world):
    w = world
    ns = netns_with_netem(str(os.getpid()))
    if ns:
        # Desk agent and shim in the namespace, over its (delayed) loopback.
        w["cleanups"].append(lambda: subprocess.run(["ip", "netns", "del", ns], capture_output=True))
        agent = DeskAgent("dslow", desk=w["desk"], desk_name="DESK-WAN", netns=ns, port=7400,
                          agent_args=("--readers", "Doc Reader 00"))
        w["cleanups"].append(agent.stop)
        how = f"network namespace {ns}, tc netem delay {DELAY_MS}ms on lo"
        env, sd = new_session(w, "slow", agent.spec, wrap=("ip", "netns", "exec", ns))
    else:
        agent = DeskAgent("dslow", desk=w["desk"], desk_name="DESK-WAN", tcp=True,
                          agent_args=("--readers", "Doc Reader 00"))
        w["cleanups"].append(agent.stop)
        relay = DelayRelay(("127.0.0.1", int(agent.spec.rsplit(":", 1)[1])), DELAY_MS / 1000)
        w["cleanups"].append(relay.close)
        how = f"no sch_netem in this kernel: userspace relay, {DELAY_MS} ms each way"
        env, sd = new_session(w, "slow", f"tcp:127.0.0.1:{relay.port}")
    wait_desk(sd, ["Doc Reader 00 00", "Doc Reader 00 01"])
    # the default thresholds (50 ms median): the link's delay is a lower bound (80 ms per round
    # trip), so the verdict cannot depend on the machine's load
    code_t, text, code_j, rep = both_forms(env, "--pings", "10", default_latency_thresholds=True)
    # The test link is plain TCP (--insecure-tcp): the doctor warns about that first, always.
    expect(code_t, text, code_j, rep, "channel", "degraded")
    assert "plain TCP, neither encrypted nor authenticated" in check_of(rep, "channel")["detail"], rep
    lat = rep["latency"]
    assert lat["median_us"] >= 2 * DELAY_MS * 1000 * 0.9, lat
    assert check_of(rep, "latency")["result"] == "warning", rep
    assert "slow link" in check_of(rep, "latency")["advice"]
    assert "[WARN] latency      desk round trip median" in text, text
    print(f"slow link ({how}): median {lat['median_us'] / 1000:.1f} ms, p99 {lat['p99_us'] / 1000:.1f} ms")
    # With thresholds above the measured figures the latency is fine; only the plain TCP warning stays.
    code, rep2, _ = doctor(env, "--pings", "5", json_out=True)  # LOAD_PROOF_LATENCY: far above
    assert code == EXIT_WARNING and rep2["first_problem"] == "channel", rep2
    assert [c["id"] for c in rep2["checks"] if c["result"] != "ok"] == ["channel"], rep2
