"""pytest plugin for the real-peer test bed (wired in by conftest.py).

Tests on real peers carry the ``peers`` marker with what they need::

    pytestmark = pytest.mark.peers("testpmd")          # DPDK testpmd
    pytestmark = pytest.mark.peers("qemu")             # QEMU Linux guests
    pytestmark = pytest.mark.peers("qemu", "tap")      # ... and a TAP device
    pytestmark = pytest.mark.peers("ovs", "testpmd")   # Open vSwitch with DPDK, and testpmd

Before each such test runs, a missing peer skips it with the reason, or,
under CI=true, fails it: CI must never pass by skipping the real peers.
``scripts/setup-peers.sh`` installs them. Deselect all with ``-m "not peers"``.
"""
import functools
import os
import shutil

import pytest

from vhu.testbed import missing_reason

IN_CI = os.environ.get("CI", "").lower() == "true"
WHAT = {"testpmd": "dpdk-testpmd", "qemu": "QEMU guests", "tap": "a TAP device",
        "ovs": "Open vSwitch with DPDK"}


def tap_missing_reason():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        return "needs root, /dev/net/tun and iproute2"
    return None


@functools.lru_cache(maxsize=None)
def peer_missing_reason(need):
    """None when every peer in `need` (a tuple of WHAT's keys) is usable."""
    for name in need:
        if name not in WHAT:
            raise ValueError(f"unknown peer {name!r}: one of {sorted(WHAT)}")
        reason = tap_missing_reason() if name == "tap" else missing_reason((name,))
        if reason:
            return f"{WHAT[name]} unavailable: {reason}"
    return None


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "peers(*need): needs real peers (\"testpmd\", \"qemu\", \"tap\", \"ovs\"), installed by "
        "scripts/setup-peers.sh; a missing one skips the test, or fails it when CI=true",
    )


def pytest_runtest_setup(item):
    need = tuple(name for mark in item.iter_markers("peers") for name in mark.args)
    if not need:
        return
    reason = peer_missing_reason(tuple(sorted(set(need))))
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)
