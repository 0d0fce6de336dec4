"""--tap: a QEMU guest reaches the host's kernel stack through a TAP device.

vhu patches the guest's vhost-user port to a TAP it creates; the test moves
the TAP into a fresh network namespace, addresses it there, and pings the
guest from the namespace (and the namespace from the guest). Needs root
(TAP, netns), iproute2, and the QEMU guest peers.
"""
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.vhuproc import VhuMaster
from vhu.testbed.guest import Guest

pytestmark = pytest.mark.peers("qemu", "tap")
HOST_IP, GUEST_IP = "10.0.3.1", "10.0.3.2"


class _Dir:
    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="vhu-tap-")

    def __truediv__(self, name):
        return os.path.join(self.path, name)


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def test_namespace_pings_guest_through_tap():
    tap, ns = f"vhut{os.getpid() % 100000}", f"vhu-ns-{os.getpid()}"
    d = _Dir()
    vhu = VhuMaster(d, "--app", "patch", "--tap", tap, "--cpus", "0", sockets=("g.sock",))
    guest = None
    try:
        vhu.wait_sockets()
        vhu.wait_started()
        vhu.wait_log(f"TAP {tap}")
        ip("netns", "add", ns)
        ip("link", "set", tap, "netns", ns)
        ip("-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", tap)
        ip("-n", ns, "link", "set", tap, "up")
        guest = Guest(d / "g.sock", ip=f"{GUEST_IP}/24", mac="52:54:00:00:03:02", cpu=1,
                      name=f"vhu-tap-{os.getpid()}", log_path=d / "g.console").launch()
        guest.wait_ready(120)
        ping = ["ping"] if shutil.which("ping") else [shutil.which("busybox") or "busybox", "ping"]
        out = subprocess.run(["ip", "netns", "exec", ns, *ping, "-c", "5", "-w", "30", GUEST_IP],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and re.search(r"5 (packets )?received", out.stdout), \
            out.stdout + out.stderr
        res = guest.ping(HOST_IP, count=5, interval=0.2, deadline=20)
        assert res["received"] == 5, res["output"]
        time.sleep(0.5)
        g, t = vhu.port(0), vhu.port(1)
        assert t["socket"] == f"tap:{tap}" and t["connected"]
        # 10 echo requests and 10 replies each way at least (plus ARP, maybe IPv6 chatter)
        assert t["rx_packets"] >= 10 and t["tx_packets"] >= 10, vhu.stats()
        assert g["rx_packets"] >= 10 and g["tx_packets"] >= 10
        guest.close()
        guest = None
        vhu.stop()
        # The TAP went with vhu (not persistent).
        assert tap not in ip("-n", ns, "link", "show").stdout
    finally:
        if guest is not None:
            guest.close()
        vhu.stop(check=False)
        ip("netns", "del", ns, check=False)
        shutil.rmtree(d.path, ignore_errors=True)
