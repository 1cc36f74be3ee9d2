"""Emulated WAN for the CardBridge login benchmark (tests/bench/wan_report.py)."""
