"""Prometheus endpoint (--metrics-port): a custom collector over the shared
counters, served with prometheus_client.

Nothing is copied into prometheus_client's own metric objects: each scrape
takes one snapshot of the counter array the workers write and builds the
families from it through vhu.stats (itself driven by vhu._ring.COUNTER_NAMES),
so the endpoint, the stats line and the JSON file always agree.

Names are prefixed vhu_, counters end in _total; labels: port (index),
socket, queue, reason, worker (index). rx/tx are vhu's view, as in the stats file.
"""
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# stats key -> (metric name without vhu_ / _total, help)
QUEUE_COUNTERS = {
    "rx_packets": ("rx_packets", "Frames vhu received from the front-end (its TX ring)"),
    "rx_bytes": ("rx_bytes", "Bytes (no virtio-net header) vhu received from the front-end"),
    "tx_packets": ("tx_packets", "Frames vhu put into the front-end's RX ring"),
    "tx_bytes": ("tx_bytes", "Bytes vhu put into the front-end's RX ring"),
    "kicks": ("kicks", "Kicks (eventfd notifications) received from the front-end"),
    "calls": ("calls", "Interrupts (call eventfd) sent to the front-end"),
    "calls_suppressed": ("calls_suppressed",
                         "Interrupts not sent because the front-end asked for none"),
}

# VXLAN ports, per remote VTEP (vhu.vxlan.REMOTE_COUNTERS; rx: from the remote).
REMOTE_COUNTERS = {
    "rx_packets": "Inner frames vhu received from the remote VTEP",
    "rx_bytes": "Inner frame bytes vhu received from the remote VTEP",
    "tx_packets": "Inner frames vhu sent to the remote VTEP",
    "tx_bytes": "Inner frame bytes vhu sent to the remote VTEP",
    "rx_bad": "Datagrams from the remote VTEP dropped as vxlan_bad",
    "tx_errors": "Datagrams to the remote VTEP the kernel refused",
}


class VhuCollector:
    """Collects from a running Forwarder (or anything with .stats())."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        ports = self.source.stats()
        labels = ["port", "socket", "queue"]
        fams = {k: CounterMetricFamily(f"vhu_{name}", doc, labels=labels)
                for k, (name, doc) in QUEUE_COUNTERS.items()}
        drops = CounterMetricFamily("vhu_drops", "Frames dropped, by reason",
                                    labels=labels + ["reason"])
        broken = CounterMetricFamily("vhu_broken_ring_events",
                                     "Rings stopped because the guest broke a rule, by reason",
                                     labels=labels + ["reason"])
        up = GaugeMetricFamily("vhu_port_connected", "1 while a front-end is connected",
                               labels=["port", "socket"])
        rlabels = ["port", "socket", "remote"]
        remote = {k: CounterMetricFamily(f"vhu_vxlan_remote_{k}", doc, labels=rlabels)
                  for k, doc in REMOTE_COUNTERS.items()}
        macs = GaugeMetricFamily("vhu_vxlan_remote_macs",
                                 "Inner MACs learned behind the remote VTEP", labels=rlabels)
        for p in ports:
            up.add_metric([str(p["port"]), p["socket"]], 1 if p["connected"] else 0)
            for r in p.get("vxlan", {}).get("remotes", []):
                lv = [str(p["port"]), p["socket"], r["remote"]]
                for k, fam in remote.items():
                    fam.add_metric(lv, r[k])
                macs.add_metric(lv, r["macs"])
            for q in p["queues"]:
                lv = [str(p["port"]), p["socket"], str(q["queue"])]
                for k, fam in fams.items():
                    fam.add_metric(lv, q[k])
                for reason, v in q["drops"].items():
                    drops.add_metric(lv + [reason], v)
                for reason, v in q["broken"].items():
                    broken.add_metric(lv + [reason], v)
        yield from fams.values()
        yield drops
        yield broken
        yield up
        yield from remote.values()
        yield macs
        workers = getattr(self.source, "workers", None)
        if workers is not None:
            yield from worker_families(workers())


def worker_families(workers):
    """Each worker's loop time and the part of it spent moving frames, in
    its CPU's ticks: rate(busy) / rate(poll) is its utilisation."""
    poll = CounterMetricFamily("vhu_worker_poll_ticks", "Ticks the worker's polling loop ran "
                               "(its CPU's tick counter; from 0 again in a replacement)",
                               labels=["worker"])
    busy = CounterMetricFamily("vhu_worker_busy_ticks", "Ticks of the worker's loop spent in "
                               "rounds that moved frames", labels=["worker"])
    for w in workers:
        poll.add_metric([str(w["index"])], w["poll_ticks"])
        busy.add_metric([str(w["index"])], w["busy_ticks"])
    return [poll, busy]


class MetricsServer:
    """HTTP /metrics on addr:port (port 0: any free port, see .port)."""

    def __init__(self, source, port, addr="127.0.0.1"):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(VhuCollector(source))
        self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self.server.server_port

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
