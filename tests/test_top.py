"""python -m vhu.stats --top (vhu.top): the table from two stats documents
(rates, sorting, total row, 80x24 fit), and the live view as a person sees
it, in an 80x24 tmux pane over a running master with DPDK traffic."""
import io
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from rich.console import Console

from tests._peers_plugin import IN_CI
from tests.vhuproc import REPO, VhuMaster
from vhu import stats, top
from vhu._ring import COUNTER_NAMES
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev

Testpmd.__test__ = False   # a peer, not a test class

I = {n: i for i, n in enumerate(COUNTER_NAMES)}


def counters(ports, queues):
    return np.zeros((ports, 2 * queues, len(COUNTER_NAMES)), dtype=np.uint64)


def put(snap, port, qp, rx=(0, 0), tx=(0, 0), **more):
    """rx/tx in vhu's directions (packets, bytes): rx is counted on the guest's
    TX ring (odd index), tx on its RX ring (even index); more: ring 0 counters."""
    snap[port, 2 * qp + 1, I["tx_frames"]], snap[port, 2 * qp + 1, I["tx_bytes"]] = rx
    snap[port, 2 * qp, I["rx_frames"]], snap[port, 2 * qp, I["rx_bytes"]] = tx
    for name, v in more.items():
        snap[port, 2 * qp, I[name]] = v


def document(t, snap, queues=2, workers=2, connected=(True, True, True)):
    """A stats document as vhu.master writes it (vhu.stats.port_stats, write_json)."""
    worker_of = lambda qp: qp % workers   # noqa: E731  (any placement: the document names it)
    return {"time": t, "ports": [stats.port_stats(snap, p, queues, f"/run/vhu/vm{p}.sock",
                                                  connected[p], worker_of)
                                 for p in range(snap.shape[0])]}


def two_samples():
    """2 ports x 2 queue pairs, 2 seconds apart."""
    a, b = counters(2, 2), counters(2, 2)
    put(a, 0, 0, rx=(1000, 64_000))
    put(b, 0, 0, rx=(1000 + 3_000_000, 64_000 + 3_000_000 * 64))          # 1.5 Mpps in
    put(a, 0, 1, rx=(0, 0), tx=(10, 15_000))
    put(b, 0, 1, rx=(1_000_000, 1_000_000 * 1500), tx=(10 + 400_000, 15_000 + 400_000 * 1500))
    put(b, 1, 0, rx=(800_000, 800_000 * 64), rx_no_room=1234)             # 0.4 Mpps, drops
    put(a, 1, 1, broken_head_out_of_range=1)
    put(b, 1, 1, broken_head_out_of_range=1)
    return document(100.0, a, connected=(True, False)), document(102.0, b, connected=(True, False))


def screen(renderable, width=80, height=24):
    console = Console(width=width, height=height, file=io.StringIO(), record=True,
                      color_system=None)
    console.print(renderable)
    return console.export_text().rstrip("\n").splitlines()


def test_port_stats_names_the_worker_of_each_queue():
    doc = document(1.0, counters(1, 4), queues=4, workers=3)
    assert [q["worker"] for q in doc["ports"][0]["queues"]] == [0, 1, 2, 0]
    assert "worker" not in stats.port_stats(counters(1, 1), 0, 1, "s", True)["queues"][0]


def test_rows_rates_sorting_and_total():
    before, now = two_samples()
    rs = top.rows(now, before)
    assert [(r.port, r.queue) for r in rs] == [(0, 0), (0, 1), (1, 0), (1, 1)], "busiest first"
    by = {(r.port, r.queue): r for r in rs}
    assert by[0, 0].rate == {"rx_pps": 1.5e6, "rx_bps": 1.5e6 * 64 * 8, "tx_pps": 0.0, "tx_bps": 0.0}
    assert by[0, 1].rate == {"rx_pps": 0.5e6, "rx_bps": 0.5e6 * 1500 * 8,
                             "tx_pps": 0.2e6, "tx_bps": 0.2e6 * 1500 * 8}
    assert by[0, 1].worker == 1 and by[1, 0].worker == 0
    assert by[1, 0].drops == {"rx_no_room": 1234} and by[1, 0].drops_grew
    assert by[1, 1].broken == {"head_out_of_range": 1} and not by[1, 1].broken_grew
    assert not by[1, 0].connected and by[0, 0].connected
    t = top.total(rs)
    assert t.rate["rx_pps"] == 1.5e6 + 0.5e6 + 0.4e6 and t.rate["tx_pps"] == 0.2e6
    assert t.rate["rx_bps"] == (1.5e6 * 64 + 0.5e6 * 1500 + 0.4e6 * 64) * 8
    assert t.drops == {"rx_no_room": 1234} and t.broken == {"head_out_of_range": 1}


def test_rates_are_the_plain_line_arithmetic():
    before, now = two_samples()
    line = stats.rate_line(now["ports"][0], before["ports"][0], 2.0)
    assert "rx 4001000 pkts 2.000 Mpps" in line and "tx 400010 pkts 0.200 Mpps" in line
    r = stats.rates(now["ports"][0], before["ports"][0], 2.0)
    assert r["rx_pps"] == sum(x.rate["rx_pps"] for x in top.rows(now, before) if x.port == 0)


def test_no_rates_without_a_second_sample_or_after_a_counter_reset():
    before, now = two_samples()
    assert all(r.rate is None for r in top.rows(now))
    assert all(r.rate is None for r in top.rows(now, now)), "same time: no interval"
    restarted = top.rows(before, {**now, "time": 99.0})   # counters went down: a new master
    assert all(r.pps == 0 for r in restarted)


def test_queues_are_matched_by_number_not_position():
    before, now = two_samples()
    # The earlier document listed only queue 1 of port 0 (queues not in use left out).
    before["ports"][0]["queues"] = before["ports"][0]["queues"][1:]
    by = {(r.port, r.queue): r for r in top.rows(now, before)}
    assert by[0, 0].rate is None
    assert by[0, 1].rate["rx_pps"] == 0.5e6


def test_screen_fits_80x24_with_ports_total_and_legend():
    before, now = two_samples()
    lines = screen(top.render(now, before, source="/tmp/vhu-stats.json"))
    assert len(lines) <= 24 and max(map(len, lines)) <= 80, "\n".join(lines)
    assert lines[0].startswith("vhu top ") and "ports up 1/2" in lines[0] and "Δ2.0s" in lines[0]
    assert re.split(r"\s+", lines[1].strip()) == [
        "port", "q", "w", "link", "RX", "Mpps", "RX", "Gb/s", "TX", "Mpps", "TX", "Gb/s",
        "drops", "broken"]
    body = [ln.split() for ln in lines if re.match(r"\d ", ln)]
    assert [b[:5] for b in body] == [["0", "vm0.sock", "0", "0", "up"],
                                     ["0", "vm0.sock", "1", "1", "up"],
                                     ["1", "vm1.sock", "0", "0", "down"],
                                     ["1", "vm1.sock", "1", "1", "down"]]
    assert body[0][5:9] == ["1.50", "0.77", "0.00", "0.00"]
    assert body[1][5:9] == ["0.50", "6.00", "0.20", "2.40"]
    assert body[2][9:11] == ["1.2k", "room"]
    assert body[3][10] == "1" and body[3][11].startswith("head_out"), "cut to fit 80 columns"
    wide = screen(top.render(now, before, width=120), width=120)
    assert max(map(len, wide)) <= 120 and any("1 head_out_of_range" in ln for ln in wide)
    total = next(ln.split() for ln in lines if ln.startswith("total"))
    assert total[1:5] == ["2.40", "6.97", "0.20", "2.40"]
    assert lines[-1].startswith("q quits")


def test_screen_too_short_keeps_the_busiest_rows_and_the_total():
    snap = counters(3, 16)
    for p in range(3):
        for q in range(16):
            put(snap, p, q, rx=((p * 16 + q) * 1000, 0))
    before, now = document(10.0, counters(3, 16), 16, 4), document(11.0, snap, 16, 4)
    lines = screen(top.render(now, before))
    assert len(lines) == 24 and max(map(len, lines)) <= 80
    body = [ln.split() for ln in lines if re.match(r"\d ", ln)]
    assert len(body) == 24 - top.FIXED_LINES - 1
    assert [(b[0], b[2]) for b in body[:2]] == [("2", "15"), ("2", "14")]
    assert any(re.match(r"\s*\.\.\. 31 more", ln) for ln in lines), "\n".join(lines)
    total = next(ln.split() for ln in lines if ln.startswith("total"))
    assert float(total[1]) == pytest.approx(sum(range(48)) * 1000 / 1e6, abs=0.005)


# -- the live view in a real terminal ---------------------------------------------


class Tmux:
    """A private tmux server (its own socket) with one 80x24 session."""

    def __init__(self, tmp_path, command):
        self.sock = str(tmp_path / "tmux.sock")
        self.run("new-session", "-d", "-s", "top", "-x", "80", "-y", "24", command)

    def run(self, *args):
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout

    def screen(self):
        return self.run("capture-pane", "-p", "-t", "top").splitlines()

    def close(self):
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=30)


def wait_for(what, pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.peers("testpmd")
def test_top_in_80x24_tmux_over_a_master_with_testpmd_traffic(tmp_path):
    if not shutil.which("tmux"):
        (pytest.fail if IN_CI else pytest.skip)("tmux not installed (scripts/setup-peers.sh)")
    rc_file = tmp_path / "top.rc"
    # vhu echoes, testpmd forwards back what it gets (io, a first burst per
    # queue): frames go round on both queue pairs, so both directions move.
    with VhuMaster(tmp_path, "--app", "echo", "--queues", 2, "--workers", 2, "--cpus", "0",
                   sockets=("vm0.sock", "vm1.sock")) as vhu:
        vhu.stats()
        with Testpmd([virtio_user_vdev(vhu.sockets[0], queues=2)], forward_mode="io",
                     cpus=1, huge=False, rxq=2, txq=2, nb_cores=1) as tp:
            tp.wait_link_up(0)
            tp.start(tx_first=True)
            cmd = (f"cd {REPO} && {sys.executable} -m vhu.stats --top --stats-file "
                   f"{vhu.stats_file}; echo $? > {rc_file}")
            term = Tmux(tmp_path, cmd)
            try:
                def busy_screen():
                    lines = term.screen()
                    rows = [ln.split() for ln in lines if re.match(r"[01] vm[01]\.sock ", ln)]
                    moving = [r for r in rows if r[0] == "0" and "-" not in (r[5], r[7])
                              and float(r[5]) > 0 and float(r[7]) > 0]
                    return (lines, rows) if len(moving) == 2 else None
                lines, rows = wait_for("port 0's two queues with a rate on the screen", busy_screen, 60)
                text = "\n".join(lines)
                assert len(lines) <= 24 and max(map(len, lines)) <= 80, text
                assert lines[0].startswith("vhu top ") and "ports up 1/2" in lines[0], text
                # Busiest first: port 0's queues (both busy, workers 0 and 1), then idle port 1.
                assert [r[:5] for r in rows][:2] in ([["0", "vm0.sock", "0", "0", "up"],
                                                      ["0", "vm0.sock", "1", "1", "up"]],
                                                     [["0", "vm0.sock", "1", "1", "up"],
                                                      ["0", "vm0.sock", "0", "0", "up"]]), text
                # The idle port lists one queue pair: none in use there (vhu.stats.queues_in_use),
                # and no worker yet (queue pairs are placed when they come up: vhu.placement).
                assert sorted(r[:5] for r in rows[2:]) == [["1", "vm1.sock", "0", "-", "down"]], text
                assert all(r[5:9] == ["0.00"] * 4 for r in rows[2:]), text
                total = next(ln.split() for ln in lines if ln.startswith("total"))
                assert float(total[1]) == pytest.approx(float(rows[0][5]) + float(rows[1][5]),
                                                        abs=0.016), text
                assert float(rows[0][6]) > 0 and float(rows[0][8]) > 0, "Gbit/s each way too"
                # Sorted by packet rate, both directions (as drawn, to 0.01 Mpps).
                pps = [float(r[5]) + float(r[7]) for r in rows[:2]]
                assert pps[0] >= pps[1] - 0.02, text
                assert float(total[3]) == pytest.approx(float(rows[0][7]) + float(rows[1][7]),
                                                        abs=0.016), text
                term.run("send-keys", "-t", "top", "q")
                wait_for("vhu.stats --top to exit", lambda: rc_file.exists()
                         and rc_file.read_text().strip(), 30)
                assert rc_file.read_text().strip() == "0"
            finally:
                term.close()
            tp.stop()
        vhu.stop()


def test_a_file_that_is_not_a_stats_document_is_refused(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text('{"ports": 3}')
    out = subprocess.run([sys.executable, "-m", "vhu.stats", "--top", "--stats-file", str(bad)],
                         cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "not a vhu stats document" in out.stderr, out
    out = subprocess.run([sys.executable, "-m", "vhu.stats", "--top", "--stats-file",
                          str(tmp_path / "missing.json")], cwd=REPO, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "No such file" in out.stderr, out


def test_follower_over_a_copied_file_takes_rates_from_the_documents_clock(tmp_path, monkeypatch):
    """A stats file copied from another machine now and then (scp, rsync):
    the two documents' own times give the rates, whatever this machine's
    clock says; a copy caught half-written keeps the last good document and
    says so; a file no longer refreshed is flagged in the title."""
    import json
    before, now = two_samples()             # times 100.0 and 102.0: the other machine's clock
    copy = tmp_path / "copied-stats.json"
    copy.write_text(json.dumps(before))
    follow = top.Follower(str(copy))
    follow.poll()                           # the same copy again: still one sample
    assert follow.before is None and all(r.rate is None for r in top.rows(follow.now, follow.before))
    copy.write_text(json.dumps(now))        # the next copy lands
    follow.poll()
    assert (follow.before["time"], follow.now["time"]) == (100.0, 102.0)
    by = {(r.port, r.queue): r for r in top.rows(follow.now, follow.before)}
    assert by[0, 0].rate["rx_pps"] == 1.5e6 and by[0, 1].rate["tx_pps"] == 0.2e6
    copy.write_text('{"time": 103.0, "ports": [')      # half a copy
    follow.poll()
    assert follow.now["time"] == 102.0 and follow.note(1.0).startswith("read failed"), follow.error
    shown = "\n".join(screen(top.render(follow.now, follow.before, source=str(copy),
                                        note=follow.note(1.0))))
    assert "read failed" in shown and "1.50" in shown, shown
    copy.write_text(json.dumps(now))
    follow.poll()
    assert follow.error == "" and follow.note(1.0) == ""
    later = time.monotonic() + 10
    monkeypatch.setattr(top.time, "monotonic", lambda: later)
    assert follow.note(1.0) == "not updated for 10s"
