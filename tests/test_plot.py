"""perf/plot.py: the race's chart (bars per back-end found, median and the
runs' spread as error bars, every row), and perf/race.py writing it beside
the JSON and embedding it in RESULTS.md; the committed RESULTS.md, race.json
and race.png agree."""
import json
import os
import struct

from perf import plot, race
from tests.vhuproc import REPO

PERF = os.path.join(REPO, "perf")


def side(*runs, error=None):
    out = {"runs_mpps": list(runs)}
    if runs:
        out["mpps"] = sorted(runs)[len(runs) // 2]
        out["cpu_ns_per_pkt"], out["rss_mib"] = 100.0, 80.0
    if error:
        out["error"] = error
    return out


def document():
    def entry(row, size, ring, queues, **backends):
        return {"row": row, "pkt_size": size, "queues": queues, "workers": queues, "ring": ring,
                **backends, "ratio": 1.0}
    return {"time": "2026-12-01 10:00:00", "command": "python perf/race.py ...",
            "machine": {"cpu": "Test CPU", "cores": 2, "kernel": "6.1", "python": "3.11"},
            "results": [
                entry("sink", 64, "split", 1, dpdk=side(10.0, 11.0, 12.5), vhu=side(19.0, 21.0, 22.0),
                      ovs=side(6.0, 7.0, 7.5)),
                entry("echo", 64, "split", 1, dpdk=side(4.0, 5.0, 5.5), vhu=side(6.0, 6.2, 6.5),
                      ovs=side(error="ovs-vswitchd exited")),
                entry("sink", 64, "packed", 4, dpdk=side(9.0, 10.0, 11.0), vhu=side(8.0, 9.5, 14.0),
                      snabb_x=side(3.0, 3.5, 4.0)),
            ]}


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_backends_are_whatever_the_entries_hold_known_ones_first():
    doc = document()
    assert plot.backends(doc["results"]) == ["vhu", "dpdk", "ovs", "snabb_x"]
    assert [plot.label(k) for k in plot.backends(doc["results"])] == [
        "vhu", "DPDK vhost", "Open vSwitch", "snabb_x"]


def test_bars_are_medians_and_error_bars_span_the_runs():
    doc = document()
    fig = plot.figure(doc)
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["split ring, 1 queue pair", "packed ring, 4 queue pairs"]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["sink / txonly\n64 B", "echo / io\n64 B"]
    split = {c.get_label(): c for c in axes[0].containers if hasattr(c, "patches")}
    assert set(split) == {"vhu", "DPDK vhost", "Open vSwitch"}
    assert [p.get_height() for p in split["vhu"].patches] == [21.0, 6.2]
    assert [p.get_height() for p in split["DPDK vhost"].patches] == [11.0, 5.0]
    assert [p.get_height() for p in split["Open vSwitch"].patches] == [7.0], "the failed run has no bar"
    assert "failed" in [t.get_text() for t in axes[0].texts]
    vhu_err = split["vhu"].errorbar.lines[2][0].get_segments()
    assert [(round(s[0][1], 6), round(s[1][1], 6)) for s in vhu_err] == [(19.0, 22.0), (6.0, 6.5)]
    packed = {c.get_label(): c for c in axes[1].containers if hasattr(c, "patches")}
    assert set(packed) == {"vhu", "DPDK vhost", "snabb_x"}
    assert [round(s[1][1] - s[0][1], 6) for s in packed["vhu"].errorbar.lines[2][0].get_segments()] == [6.0]
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["vhu", "DPDK vhost", "Open vSwitch", "snabb_x"]
    assert "vhu vs DPDK vhost vs Open vSwitch vs snabb_x" in fig.get_suptitle()


def test_plot_writes_a_png(tmp_path):
    out = plot.plot(document(), str(tmp_path / "race.png"))
    w, h = png_size(out)
    assert w >= 700 and h >= 600


def test_race_writes_the_chart_beside_the_json_and_embeds_it(tmp_path):
    doc = document()
    chart = race.write_chart(doc, str(tmp_path / "race.json"))
    assert chart == str(tmp_path / "race.png") and png_size(chart)
    md = race.render(doc, "race.png")
    assert md.endswith("](race.png)\n") and "| sink / txonly | split | 64 | 1 |" in md
    assert "![" not in race.render(doc)


def test_committed_results_chart_and_json_agree():
    with open(os.path.join(PERF, "race.json")) as f:
        doc = json.load(f)
    with open(os.path.join(PERF, "RESULTS.md")) as f:
        results = f.read()
    assert results == race.render(doc, "race.png"), "RESULTS.md is not what race.py renders from race.json"
    rows = len(doc["results"])
    w, h = png_size(os.path.join(PERF, "race.png"))
    assert rows and w >= 700 and h >= 300 * len(plot.panels(doc["results"]))
    with open(os.path.join(REPO, "README.md")) as f:
        assert "perf/race.png" in f.read()


def test_two_port_rows_get_their_own_table_against_open_vswitch():
    doc = document()
    doc["results"] = [dict(e, peer="ovs") for e in [
        {"row": "switch", "pkt_size": 64, "queues": 1, "workers": 1, "ring": "split",
         "ovs": dict(side(4.0, 5.0, 5.5), busy={"backend": 0.99, "frontend": 0.4}),
         "vhu": dict(side(6.0, 7.5, 8.0), busy={"backend": 0.62, "frontend": None}), "ratio": 1.5},
        {"row": "patch", "pkt_size": 1500, "queues": 1, "workers": 1, "ring": "split",
         "ovs": side(error="port 1 link still down"), "vhu": side(2.0, 2.5, 3.0), "ratio": None}]]
    md = race.render(doc)
    assert "DPDK Mpps" not in md, "no single-port table without single-port rows"
    assert "| switch / 2 ports mac | split | 64 | 5.00 (4.0–5.5) | 7.50 (6.0–8.0) | 1.50 |" in md
    assert "| patch / 2 ports mac | split | 1500 | - | 2.50 (2.0–3.0) | - |" in md
    # each side's busy share (back-end / front-end), '-' where unknown
    assert "| 0.99 / 0.40 | 0.62 / - |" in md.split("| switch / 2 ports mac")[1].split("\n")[0]
    line = race.format_row(doc["results"][1])
    assert line == ("patch  split  1q  1500B  ovs  - Mpps  vhu   2.50 Mpps  ratio -"
                    "  busy back-end/front-end: ovs - / -, vhu - / -"
                    "  ovs failed: port 1 link still down")
    doc["results"].insert(0, document()["results"][0])
    md = race.render(doc)
    assert md.index("| sink / txonly | split | 64 | 1 |") < md.index("Open vSwitch-DPDK") \
        < md.index("| switch / 2 ports mac |")


def test_a_collapsed_run_is_flagged_not_averaged_away():
    doc = document()
    doc["results"][1]["vhu"] = side(0.0, 5.9, 6.2)     # one echo run whose loop died
    md = race.render(doc)
    assert "| echo / io | split | 64 | 1 | 5.00 (4.0–5.5) | 5.90 (0.0–6.2, **1 collapsed**) |" in md
    assert "collapsed" not in md.split("| echo / io")[0].split("| sink / txonly")[1], \
        "a slow mode (a third of the best) is spread, not a collapse"
    assert race.collapsed_runs([6.0, 19.0, 0.5]) == [0.5]


def test_cpus_lists_pin_each_side_and_render_in_the_table(monkeypatch):
    import backends
    monkeypatch.setitem(backends.PINNING, "backend", backends.PINNING["backend"])
    monkeypatch.setitem(backends.PINNING, "peer", backends.PINNING["peer"])
    backends.pin((0, 2, 3), (4, 5))
    assert backends.testpmd_cores("backend", 4) == ([0, 2, 3], 2)   # main lcore + 2 forwarding
    assert backends.testpmd_cores("peer", 1) == ([4, 5], 1)
    vhu = backends.VhuBackend("/tmp/x.sock", "sink", 64, queues=4, workers=4)
    assert vhu.argv[vhu.argv.index("--cpus") + 1] == "0,2,3"
    backends.pin((0,), (1,))
    assert backends.testpmd_cores("backend", 4) == ([0], 1)          # today's one-core rows
    try:
        backends.pin((0, 1), (1,))
    except ValueError as exc:
        assert "overlap" in str(exc)
    else:
        raise AssertionError("overlapping CPU lists accepted")
    doc = dict(document(), cpus={"backend": [0, 2, 3], "peer": [4, 5]})
    assert "Back-end on CPU 0,2,3, DPDK virtio-user front-end (testpmd) on CPU 4,5;" in race.render(doc)
    assert "Back-end on CPU 0, DPDK virtio-user front-end (testpmd) on CPU 1;" in race.render(document())
