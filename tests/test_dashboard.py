"""dashboards/vhu-grafana.json cannot drift from vhu's /metrics: every metric
name, label matcher, grouping label and legend label its PromQL uses must be
one that a running vhu.master exports (with DPDK testpmd traffic on one port
and a ring broken on another, so every family has series), and every family
vhu exports must be on the dashboard. The checker is tested on dashboards
with a wrong name or label, so it cannot pass by accident."""
import copy
import json
import os
import re
import struct
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.vhuproc import REPO, VhuMaster
from vhu import stats
from vhu._ring import COUNTER_NAMES
from vhu.metrics import VhuCollector
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev

Testpmd.__test__ = False   # a peer, not a test class

DASHBOARD = os.path.join(REPO, "dashboards", "vhu-grafana.json")


# -- what /metrics exports ----------------------------------------------------------


def exported(text):
    """Prometheus text exposition -> {sample name: label names}, and the values
    {(name, labels): value}."""
    names, values = {}, {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            names.setdefault(s.name, set()).update(s.labels)
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return names, values


# -- a small, strict PromQL reader ----------------------------------------------------

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\[\]]*\])                      # [5m], [$__rate_interval], [1h:1m]
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=(){},])
""", re.X)
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values", "group"}
FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "vector", "scalar",
             "abs", "ceil", "floor", "round", "clamp_min", "clamp_max", "sort", "sort_desc",
             "time", "timestamp", "absent", "changes", "resets", "max_over_time",
             "min_over_time", "avg_over_time", "sum_over_time", "last_over_time",
             "label_values"}                      # label_values: Grafana's variable query
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
BINARY_WORDS = {"and", "or", "unless", "bool"}


class PromQLError(ValueError):
    pass


def tokens(expr):
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def parse(expr):
    """The selectors and groupings of one PromQL expression:
    {"metrics": {name: [matcher labels]}, "by": [label sets of by/on/... clauses],
     "aggregations": [(name, by-labels or None)]}. Raises PromQLError on
    anything it does not understand (an unknown function, offset, a bare {...})."""
    try:
        return _parse(expr, tokens(expr))
    except (IndexError, ValueError) as exc:     # ran off the end, a short matcher
        if isinstance(exc, PromQLError):
            raise
        raise PromQLError(f"cannot parse {expr!r}: {exc}") from None


def _parse(expr, toks):
    out = {"metrics": {}, "by": [], "aggregations": []}
    i = 0

    def label_list(j):
        if j >= len(toks) or toks[j][1] != "(":
            raise PromQLError(f"expected ( after {toks[j - 1][1]} in {expr!r}")
        labels, j = [], j + 1
        while toks[j][1] != ")":
            kind, text = toks[j]
            if kind != "ident":
                raise PromQLError(f"expected a label name, got {text!r} in {expr!r}")
            labels.append(text)
            j += 1
            if toks[j][1] == ",":
                j += 1
        return labels, j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "ident" and text in GROUPING:
            labels, i = label_list(i + 1)
            out["by"].append(set(labels))
            if text in ("by", "without") and out["aggregations"]:
                name, _ = out["aggregations"][-1]
                out["aggregations"][-1] = (name, set(labels) if text == "by" else None)
            continue
        if kind == "ident" and text in BINARY_WORDS:
            i += 1
            continue
        if kind == "ident" and text == "offset":
            raise PromQLError(f"offset is not understood by this checker: {expr!r}")
        if kind == "ident" and (nxt == "(" or (text in AGGREGATIONS and nxt in GROUPING)):
            if text in AGGREGATIONS:
                out["aggregations"].append((text, set()))   # no by: no labels left
            elif text not in FUNCTIONS:
                raise PromQLError(f"unknown function {text!r} in {expr!r}")
            i += 1
            continue
        if kind == "ident":
            matchers = out["metrics"].setdefault(text, [])
            i += 1
            if i < len(toks) and toks[i][1] == "{":
                i += 1
                while toks[i][1] != "}":
                    (lk, label), (ok, op), (vk, _) = toks[i:i + 3]
                    if lk != "ident" or op not in ("=", "!=", "=~", "!~") or vk != "string":
                        raise PromQLError(f"bad label matcher near {label!r} in {expr!r}")
                    matchers.append(label)
                    i += 3
                    if toks[i][1] == ",":
                        i += 1
                i += 1
            continue
        if text == "{":
            raise PromQLError(f"a selector without a metric name in {expr!r}")
        i += 1
    return out


def label_values_args(expr):
    """Grafana's label_values(metric, label) (or label_values(label))."""
    m = re.fullmatch(r"\s*label_values\(\s*(?:([A-Za-z_:][\w:]*)\s*,\s*)?([A-Za-z_]\w*)\s*\)\s*", expr)
    if not m:
        raise PromQLError(f"not a label_values(metric, label) query: {expr!r}")
    return m.group(1), m.group(2)


def queries(dashboard):
    """(where, expr, legendFormat) of every panel target, nested rows included."""
    def walk(panels):
        for p in panels:
            yield from walk(p.get("panels", []))
            for t in p.get("targets", []):
                yield f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"], t.get(
                    "legendFormat", "")
    return list(walk(dashboard["panels"]))


def check(dashboard, names):
    """Problems found (an empty list: the dashboard asks only for what is exported).
    names: {sample name: label names}, as exported() gives them."""
    problems = []
    for where, expr, legend in queries(dashboard):
        try:
            q = parse(expr)
        except PromQLError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not q["metrics"]:
            problems.append(f"{where}: no metric in {expr!r}")
        common = None
        for metric, matchers in q["metrics"].items():
            if metric not in names:
                problems.append(f"{where}: metric {metric} is not exported")
                continue
            common = set(names[metric]) if common is None else common & names[metric]
            for label in matchers:
                if label not in names[metric]:
                    problems.append(f"{where}: {metric} has no label {label!r}")
        common = common or set()
        for labels in q["by"]:
            for label in sorted(labels - common):
                problems.append(f"{where}: grouping label {label!r} is not on every metric of {expr!r}")
        result = common
        for _, by in q["aggregations"]:
            if by is not None:
                result = result & by
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if label not in result:
                problems.append(f"{where}: legend label {label!r} is not in the result of {expr!r}")
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        try:
            metric, label = label_values_args(query)
        except PromQLError as exc:
            problems.append(f"variable {var['name']}: {exc}")
            continue
        if metric not in names:
            problems.append(f"variable {var['name']}: metric {metric} is not exported")
        elif label not in names[metric]:
            problems.append(f"variable {var['name']}: {metric} has no label {label!r}")
    return problems


def families_used(dashboard):
    return {m for _, expr, _ in queries(dashboard) for m in parse(expr)["metrics"]}


def load():
    with open(DASHBOARD) as f:
        return json.load(f)


# -- without peers: the checker, over vhu's own collector ---------------------------------


def collector_text():
    """What vhu.metrics serves for two ports' synthetic counters (one broken ring)."""
    idx = {n: i for i, n in enumerate(COUNTER_NAMES)}
    snap = np.zeros((2, 4, len(COUNTER_NAMES)), dtype=np.uint64)
    snap[0, 1, idx["tx_frames"]] = 10
    snap[1, 1, idx["broken_head_out_of_range"]] = 1

    class Source:
        def stats(self):
            return [stats.port_stats(snap, p, 2, f"vm{p}.sock", p == 0) for p in range(2)]

        def workers(self):
            return [{"index": 0, "poll_ticks": 1000, "busy_ticks": 250}]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VhuCollector(Source()))
    return generate_latest(registry).decode()


def test_dashboard_matches_the_collector_and_has_a_port_variable():
    names, _ = exported(collector_text())
    dash = load()
    assert check(dash, names) == []
    assert families_used(dash) == set(names), "every exported family is on the dashboard"
    port = [v for v in dash["templating"]["list"] if v["name"] == "port"]
    assert port and port[0]["type"] == "query" and port[0]["multi"] and port[0]["includeAll"]
    # Every query over ports is filtered by the port variable (a worker
    # serves several ports: its own families have no port label).
    assert all('port=~"$port"' in expr for _, expr, _ in queries(dash)
               if "vhu_worker_" not in expr)
    assert any("vhu_worker_" in expr for _, expr, _ in queries(dash))
    titles = {p["title"] for p in dash["panels"]}
    assert {"Packet rate per port and direction", "Bit rate per port and direction",
            "Drops by reason", "Broken-ring events", "Connected ports"} <= titles


def _mutated(change):
    dash = copy.deepcopy(load())
    change(dash)
    return dash


def _target(dash, title):
    return next(p for p in dash["panels"] if p["title"] == title)["targets"][0]


@pytest.mark.parametrize("change,expect", [
    (lambda d: _target(d, "Drops by reason").update(
        expr=_target(d, "Drops by reason")["expr"].replace("vhu_drops_total", "vhu_dropped_total")),
     "metric vhu_dropped_total is not exported"),
    (lambda d: _target(d, "Packet rate per port and direction").update(
        expr=_target(d, "Packet rate per port and direction")["expr"].replace(
            'port=~"$port"', 'port=~"$port",iface="x"')),
     "has no label 'iface'"),
    (lambda d: _target(d, "Drops by reason").update(
        expr=_target(d, "Drops by reason")["expr"].replace("by (port, reason)", "by (port, cause)")),
     "grouping label 'cause'"),
    (lambda d: _target(d, "Connected ports").update(
        expr='sum by (queue) (vhu_port_connected{port=~"$port"})'),
     "grouping label 'queue'"),
    (lambda d: _target(d, "Packet rate per queue pair").update(legendFormat="{{socket}} q{{queue}}"),
     "legend label 'socket'"),
    (lambda d: _target(d, "Drops/s").update(expr='sum(rte(vhu_drops_total{port=~"$port"}[5m]))'),
     "unknown function 'rte'"),
    (lambda d: d["templating"]["list"][1]["query"].update(
        query="label_values(vhu_port_connected, queue)"),
     "vhu_port_connected has no label 'queue'"),
])
def test_checker_catches_a_wrong_name_or_label(change, expect):
    names, _ = exported(collector_text())
    problems = check(_mutated(change), names)
    assert problems and any(expect in p for p in problems), problems


def test_promql_reader():
    q = parse('8 * sum by (port, socket) (rate(vhu_rx_bytes_total{port=~"$port", queue!="1"}'
              '[$__rate_interval])) > 0 or vector(0)')
    assert q["metrics"] == {"vhu_rx_bytes_total": ["port", "queue"]}
    assert q["by"] == [{"port", "socket"}] and q["aggregations"] == [("sum", {"port", "socket"})]
    q = parse('sum(rate(a_total[5m])) by (port) / on (port) b')
    assert set(q["metrics"]) == {"a_total", "b"} and q["by"] == [{"port"}, {"port"}]
    for bad in ('{port="0"}', "rate(a[5m] offset 1h)", 'a{port=0}', "a # b"):
        with pytest.raises(PromQLError):
            parse(bad)


# -- with peers: what a running master really exports --------------------------------------


def scrape(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def break_ring(path):
    """A front-end on `path` whose TX ring names a head index out of range: vhu
    marks that ring broken (tests.rawfront's front-end)."""
    import os
    from tests.rawfront import RING_SIZE, RingFrontend
    s = RingFrontend(path, name="vhu-dashboard-broken")
    _, avail, _ = s.ring_gpas(1)
    idx = s.drivers[1].avail_idx
    s.mem.write(avail + 4 + 2 * (idx % RING_SIZE), struct.pack("<H", RING_SIZE + 7))
    s.mem.write(avail + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
    os.eventfd_write(s.kicks[1], 1)
    return s


def wait_scrape(url, pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names, values = exported(scrape(url))
        if pred(names, values):
            return names, values
        time.sleep(0.2)
    raise AssertionError(f"/metrics never showed {what}")


@pytest.mark.peers("testpmd")
def test_dashboard_queries_only_what_a_running_master_exports(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink", "--metrics-port", 0, "--queues", 2, "--workers", 2,
                   "--cpus", "0", sockets=("vm0.sock", "vm1.sock")) as vhu:
        vhu.wait_log("metrics: http://")
        url = re.search(r"metrics: (http://\S+)", vhu.output()).group(1)
        with Testpmd([virtio_user_vdev(vhu.sockets[0], queues=2)], forward_mode="txonly",
                     cpus=1, huge=False, rxq=2, txq=2, nb_cores=1) as tp:
            tp.wait_link_up(0)
            tp.start()
            session = break_ring(vhu.sockets[1])
            try:
                def rx(values, port):
                    return sum(v for (n, lv), v in values.items()
                               if n == "vhu_rx_packets_total" and ("port", str(port)) in lv)
                names, values = wait_scrape(
                    url, lambda n, v: rx(v, 0) > 0 and "vhu_broken_ring_events_total" in n,
                    "traffic on port 0 and a broken ring on port 1")
            finally:
                session.close()
            tp.stop()
        broken = {lv: v for (n, lv), v in values.items() if n == "vhu_broken_ring_events_total"}
        assert list(broken.values()) == [1] and ("reason", "head_out_of_range") in list(broken)[0]
        dash = load()
        assert check(dash, names) == []
        assert families_used(dash) == set(names)
        assert names["vhu_drops_total"] == {"port", "socket", "queue", "reason"}
        vhu.stop()
