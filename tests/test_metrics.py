"""Metrics: the Prometheus endpoint (--metrics-port) scraped during and after
testpmd traffic, and python -m vhu.stats following the stats file."""
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.vhuproc import REPO, VhuMaster
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev

Testpmd.__test__ = False

pytestmark = pytest.mark.peers("testpmd")


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, out


def value(samples, name, **labels):
    want = {k: str(v) for k, v in labels.items()}
    return sum(v for (n, lv), v in samples.items()
               if n == name and want.items() <= dict(lv).items())


def test_prometheus_endpoint_and_stats_cli_during_traffic(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink", "--metrics-port", 0, "--cpus", "0") as vhu:
        vhu.wait_log("metrics: http://")
        url = re.search(r"metrics: (http://\S+)", vhu.output()).group(1)
        _, before = scrape(url)
        assert value(before, "vhu_rx_packets_total", port=0, queue=0) == 0
        assert value(before, "vhu_port_connected", port=0) == 0
        assert value(before, "vhu_worker_busy_ticks_total", worker=0) == 0
        with Testpmd([virtio_user_vdev(vhu.sockets[0])], forward_mode="txonly", cpus=1,
                     huge=False) as tp:
            tp.wait_link_up(0)
            tp.start()
            time.sleep(0.5)
            text, during = scrape(url)
            assert value(during, "vhu_rx_packets_total", port=0) > 0
            assert value(during, "vhu_port_connected", port=0) == 1
            # The worker moved frames: busy ticks, a part of its loop's ticks;
            # and the stats file says which share (between two reports).
            busy = value(during, "vhu_worker_busy_ticks_total", worker=0)
            assert 0 < busy < value(during, "vhu_worker_poll_ticks_total", worker=0)
            deadline = time.monotonic() + 30
            while vhu.stats()["workers"][0]["busy"] is None and time.monotonic() < deadline:
                time.sleep(0.1)
            share = vhu.stats()["workers"][0]["busy"]
            assert share is not None and 0 < share <= 1, vhu.stats()["workers"]
            # python -m vhu.stats follows the stats file and shows live rates
            out = subprocess.run([sys.executable, "-m", "vhu.stats", "--stats-file", vhu.stats_file,
                                  "--interval", "0.3", "--count", "3"], cwd=REPO,
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert len(lines) == 3 and all(l.startswith("port 0 ") for l in lines)
            rates = [float(m) for m in re.findall(r"rx \d+ pkts ([\d.]+) Mpps", out.stdout)]
            assert rates[0] == 0 and max(rates[1:]) > 0, out.stdout
            sent = tp.stop()[0]["tx_packets"]
        got = vhu.wait_stable("rx_packets")
        _, after = scrape(url)
        assert value(after, "vhu_rx_packets_total", port=0, queue=0) == got == sent
        assert value(after, "vhu_rx_bytes_total", port=0) == 64 * sent
        assert value(after, "vhu_drops_total", port=0, reason="stage") == 0
        assert "# TYPE vhu_rx_packets_total counter" in text
        assert all(n.startswith("vhu_") for n, _ in after)
        vhu.stop()
