"""The desk's least-privilege defaults, through the real agent, shim and pcscd (issue 9):
reader escape commands (IOCTL_CCID_ESCAPE) are refused at the desk unless the agent is told
otherwise (--allow-control escape), with SCARD_E_UNSUPPORTED_FEATURE and a log line naming the
option; feature discovery (CM_IOCTL_GET_FEATURE_REQUEST) reaches the reader. The policy's own
rules (PIN-pad codes the reader announces, SET_ATTRIB) are unit-tested
(tests/unit/client/policy_test.cpp, desk_core_test.cpp); here: the defaults are the agent's."""
from __future__ import annotations

import pytest

from core_support import OK, RV, log_lines

ESCAPE = 0x42000DAC          # IOCTL_CCID_ESCAPE = SCARD_CTL_CODE(3500)
FEATURES = 0x42000D48        # CM_IOCTL_GET_FEATURE_REQUEST


def _calls(rig):
    s = rig.session("shim")
    s.call("establish")
    assert s.rv("connect", reader=rig.desk.readers[0]) == OK
    escape = s.call("control", code=ESCAPE, data="00")
    features = s.call("control", code=FEATURES)
    s.close()
    return escape, features


@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "allow-control escape"])
def test_escape_commands_reach_the_reader_only_when_allowed(make_rig, opted_in):
    args = ("--allow-control", "pinpad,escape") if opted_in else ()
    rig = make_rig(slots=2, cards=({"slot": 0},), name="policy", agent_args=args)
    escape, features = _calls(rig)
    log = rig.agent_log()
    refused = log_lines(log, r"control code 0x42000DAC refused by policy .*--allow-control")
    reached = log_lines(log, r"control ctl 0x42000DAC")
    # Feature discovery is never refused by the default policy.
    assert not log_lines(log, r"control code 0x42000D48 refused"), "feature discovery refused"
    assert log_lines(log, r"control ctl 0x42000D48"), "feature discovery did not reach the reader"
    if opted_in:
        assert reached and not refused, "the escape command was refused although allowed"
    else:
        assert refused and not reached, "the escape command reached the reader by default"
        assert escape["rv"] == RV["E_UNSUPPORTED_FEATURE"], escape
    assert "control codes: " + ("pinpad,escape" if opted_in else "pinpad") in log, "the policy is not logged at start"
