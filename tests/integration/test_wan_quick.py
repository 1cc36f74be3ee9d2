"""The emulated-WAN login report in its short (CI) form, and the targets it can check:

    scripts/wan-report --quick   (RTT 0 and 20 ms, instant card, 3 runs per cell)

At RTT 20 ms, CardBridge (default optimized shim):
  * warm CPS3 login: at most 11 desk round trips (per-call forwarding needs ~38);
  * cold CPS3 login: at most 33 desk round trips (per-call forwarding needs ~113). It was 25
    while the desk read a file ahead as soon as a SELECT gave its size; the real middleware's
    traces (tests/bench/traces/real, docs/middleware.md) showed that wasted 12 to 25 card
    reads per login (files selected and never read), so read-ahead now follows a program's
    own READ BINARY only, and this synthetic trace, which reads every file it selects, pays
    8 first reads more;
  * the same answers, no failed run, no card reset;
  * an idle session costs zero bytes on the desk link (shim status desk_bytes_in/out
    unchanged over 5 s, with no client and with a connected idle client).
Round-trip counts are assertions; wall times (the login's against round trips x RTT + the
direct time, the run's duration, the link's measured RTT) are the benchmark's report: printed
here and in scripts/wan-report's table ("Targets"), never asserted, since they depend on the
machine's load.

Run:  sudo /usr/bin/python3 -m pytest tests/integration/test_wan_quick.py -v
Env:  CARDBRIDGE_BUILD_DIR  build directory (default <repo>/build); scripts/wan-report builds
      the four targets it needs there if they are missing or stale.
Needs root (network namespaces); skipped otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("CARDBRIDGE_BUILD_DIR", ROOT / "build"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))
from wan.netns import unavailable  # noqa: E402
RTT = 20.0
MAX_ROUND_TRIPS = {"cps3-warm": 11, "cps3-cold": 33}


def _skip_reason() -> str | None:
    return unavailable()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if reason := _skip_reason():
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("wan") / "wan-report.json"
    env = {**os.environ, "CARDBRIDGE_BUILD_DIR": str(BUILD)}
    r = subprocess.run([str(ROOT / "scripts" / "wan-report"), "--quick", "--out", str(out)], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)  # hang guard
    print(r.stdout[-8000:])
    # exit 1: the report is complete but some runs failed (the tests below say which)
    assert r.returncode in (0, 1) and out.exists(), f"scripts/wan-report --quick failed (exit {r.returncode}):\n{r.stdout[-4000:]}"
    data = json.loads(out.read_text())
    data["_json"] = str(out)
    return data


def record(report: dict, trace: str, mode: str, rtt: float = RTT) -> dict:
    for r in report["records"]:
        if r["trace"] == trace and r["mode"] == mode and r["rtt_ms"] == rtt:
            return r
    raise AssertionError(f"no record for {trace} {mode} at RTT {rtt:g}")


def test_quick_form(report):
    assert report["quick"] is True
    print(f"the quick report took {report['elapsed_s']} s")


def test_every_cell_measured(report):
    for trace in MAX_ROUND_TRIPS:
        for rtt in (0.0, RTT):
            for mode in ("direct", "per-call", "cardbridge", "relay"):
                r = record(report, trace, mode, rtt)
                for key in ("trace", "rtt_ms", "mode", "round_trips", "wall_ms"):
                    assert key in r
                assert r["wall_ms"], f"{trace} {mode} RTT {rtt:g}: no run completed: {r.get('error')}"
                if mode != "cardbridge":  # CardBridge's failures: test_cardbridge_leaves_the_card_alone
                    assert r["failed_runs"] == 0, f"{trace} {mode} RTT {rtt:g}: {r.get('error')}"
    png = Path(report["_json"]).with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000


def test_link_delay_is_real(report):
    # netem delays every packet: a round trip can never be shorter than the RTT asked for (how
    # much longer it is depends on the load: printed)
    env = next(e for e in report["environments"] if e["rtt_ms"] == RTT)
    assert env["measured_rtt_ms"] is not None
    assert env["measured_rtt_ms"] >= RTT, env
    print(f"measured round trip at nominal RTT {RTT:g} ms: {env['measured_rtt_ms']:.2f} ms")


@pytest.mark.parametrize("trace", ["cps3-warm", "cps3-cold"])
def test_round_trips_at_20ms(report, trace):
    cb = record(report, trace, "cardbridge")
    peer = record(report, trace, "per-call")
    # The peers' cost: one round trip per PC/SC call.
    assert peer["round_trips"] >= 0.9 * peer["pcsc_calls"]
    assert cb["round_trips"] < peer["round_trips"] / 3
    calls = report.get("breakdown", {}).get(trace, {}).get("calls", [])
    costly = [f"{c['label']}: {c['call']}" for c in calls if c.get("round_trips")]
    assert cb["round_trips"] <= MAX_ROUND_TRIPS[trace], (
        f"{trace}: {cb['round_trips']} desk round trips (target <= {MAX_ROUND_TRIPS[trace]}); calls that cost one:\n  "
        + "\n  ".join(costly))


@pytest.mark.parametrize("trace", ["cps3-warm", "cps3-cold"])
def test_wall_time_report(report, trace):
    """The wall-time model (round trips x measured RTT + direct time) is reported, not asserted:
    the round-trip count above is what the model rests on, and it is asserted."""
    cb = record(report, trace, "cardbridge")
    direct = record(report, trace, "direct")
    assert cb["wall_ms"] and direct["wall_ms"] and cb.get("model_wall_ms"), (cb, direct)
    print(f"{trace}: wall {cb['wall_ms']:.1f} ms, model {cb['round_trips']:g} x {cb['measured_rtt_ms']:.2f} ms + "
          f"{direct['wall_ms']:.1f} ms = {cb['model_wall_ms']:.1f} ms ({cb.get('model_error_pct')}%)")


@pytest.mark.parametrize("trace", ["cps3-warm", "cps3-cold"])
def test_cardbridge_leaves_the_card_alone(report, trace):
    # pcscd semantics: a program that ends its transaction and disconnects with LEAVE leaves
    # the card as it is; nothing else may reset it (design principle 4), and no call fails.
    for rtt in (0.0, RTT):
        cb = record(report, trace, "cardbridge", rtt)
        assert cb["failed_runs"] == 0, f"RTT {rtt:g}: {cb['failed_runs']}/{cb['repeat']} runs failed: {cb['error']}"
        assert cb["card_resets"] == 0, (
            f"RTT {rtt:g}: the card was reset {cb['card_resets']} times in {cb['repeat']} runs; direct: "
            f"{record(report, trace, 'direct', rtt)['card_resets']}")


def test_idle_session_costs_nothing(report):
    idle = report["idle"]
    assert idle is not None, "the report did not run the idle check"
    assert idle["connected_client"]["handles"] >= 1
    assert idle["no_client"] == {"bytes_in": 0, "bytes_out": 0}
    assert idle["connected_client"]["bytes_in"] == 0 and idle["connected_client"]["bytes_out"] == 0, idle


@pytest.mark.parametrize("trace", ["cps3-warm", "cps3-cold"])
def test_card_image_mode(report, trace):
    """With the desk's card image ready (issue 13), the same answers as at the desk (cb-replay's
    digest), no failed run, and fewer desk round trips than CardBridge without it: the public
    files a login reads are answered at the server."""
    for rtt in (0.0, RTT):
        img = record(report, trace, "image", rtt)
        cb = record(report, trace, "cardbridge", rtt)
        assert img["failed_runs"] == 0, f"RTT {rtt:g}: {img.get('error')}"
        assert img["same_answers"] is True, f"RTT {rtt:g}: the answers with the image are not the desk's"
        assert img["card_resets"] == 0
        assert img["round_trips"] < cb["round_trips"], (img["round_trips"], cb["round_trips"])
        assert img.get("image_ready_s") is not None
        print(f"{trace} RTT {rtt:g}: image {img['round_trips']:g} round trips, {img['wall_ms']:.1f} ms; "
              f"without {cb['round_trips']:g}, {cb['wall_ms']:.1f} ms; direct {img.get('direct_wall_ms')} ms; "
              f"image read in {img['image_ready_s']} s ({img.get('image_card_apdus')} card APDUs)")
