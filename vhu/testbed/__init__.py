"""Real-peer test bed: DPDK testpmd and QEMU guests as vhost-user peers.

* :mod:`vhu.testbed.dpdk`  -- :class:`~vhu.testbed.dpdk.Testpmd` (virtio-user
  front-end or net_vhost reference back-end).
* :mod:`vhu.testbed.guest` -- :class:`~vhu.testbed.guest.Guest` (QEMU 7.2 TCG
  guest with a tiny busybox initramfs and a virtio-net-pci vhost-user NIC).
* :mod:`vhu.testbed.ovs`   -- :class:`~vhu.testbed.ovs.Ovs` (Open vSwitch with
  DPDK: virtio-user ports as front-end, vhost-user ports as back-end).

Install the peers with ``scripts/setup-peers.sh`` (root, Debian 12).
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

from .dpdk import Testpmd, TestpmdError, find_testpmd, testpmd_missing_reason
from .guest import Guest, GuestError, find_qemu, guest_missing_reason
from .ovs import Ovs, OvsError, ovs_missing_reason

__all__ = [
    "Testpmd", "TestpmdError", "find_testpmd", "testpmd_missing_reason",
    "Guest", "GuestError", "find_qemu", "guest_missing_reason",
    "Ovs", "OvsError", "ovs_missing_reason",
    "peers_available", "missing_reason",
]


def missing_reason(need: Iterable[str] = ("testpmd", "qemu")) -> Optional[str]:
    """None if every peer in ``need`` ("testpmd", "qemu", "ovs") is usable,
    else a one-line reason (suitable for pytest.skip)."""
    checks = {"testpmd": testpmd_missing_reason, "qemu": guest_missing_reason,
              "ovs": ovs_missing_reason}
    for name in need:
        reason = checks[name]()
        if reason:
            return reason
    return None


def peers_available(need: Iterable[str] = ("testpmd", "qemu")) -> Tuple[bool, str]:
    """(True, "") when the peers are installed, else (False, reason)."""
    reason = missing_reason(need)
    return (reason is None, reason or "")
