"""Dirty-page logging against vhu.master, driven by vhu.frontend (no DPDK, no QEMU).

The front-end turns logging on over running rings as QEMU does when a live
migration starts (SET_LOG_BASE with a sealed memfd, SET_FEATURES | LOG_ALL,
SET_VRING_ADDR with VHOST_VRING_F_LOG), moves traffic, stops the rings
(GET_VRING_BASE: nothing is written after its reply) and checks that every
page of its receive buffers and used rings the back-end changed is marked.
"""
import os
import re
import signal
import time

import pytest

from tests.test_frontend import cli, summary
from tests.vhuproc import VhuMaster
from vhu.frontend import Frontend

LOG_LINE = re.compile(r"log: (\d+) pages written by the back-end while logging, all marked; "
                      r"(\d+) pages marked in all")


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("queues", [1, 2])
def test_loop_through_echo_with_logging_every_written_page_marked(tmp_path, packed, queues):
    with VhuMaster(tmp_path, "--app", "echo", "--workers", str(queues)) as vhu:
        with Frontend(vhu.sockets[0], pkt_size=1000, packed=packed, queues=queues,
                      log=True) as fe:
            r = fe.run("loop", duration=1.5)
            assert wait_for(lambda: vhu.port()["logging"] == "on" and vhu.port()["log_pages"])
            fe.stop()
            check = fe.check_log()
        assert r.rx_packets > 100 and r.errors == 0, r.summary()
        assert check.changed > 10 and not check.unmarked, check.summary()
        assert wait_for(lambda: vhu.port()["logging"] == "off"
                        and vhu.port()["log_pages"] >= check.changed), vhu.port()
        assert "logging: on" in vhu.output()
        vhu.stop()


def test_cli_log_rx_from_source_merged_frames(tmp_path):
    """4000-byte frames over 2 KiB buffers: every buffer of each merged frame."""
    with VhuMaster(tmp_path, "--app", "source", "--pkt-size", "4000") as vhu:
        out = cli("--socket", vhu.sockets[0], "--mode", "rx", "--count", "3000", "--log",
                  "--duration", "60")
        assert out.returncode == 0, out.stdout + out.stderr
        assert summary(out.stdout)[3] == 3000
        m = LOG_LINE.search(out.stdout)
        assert m and int(m.group(1)) > 100, out.stdout
        vhu.stop()


def test_logging_off_again_marks_nothing(tmp_path):
    """A migration cancelled: LOG_ALL and the ring flag go off on running
    rings, and the back-end sets no bit from then on."""
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        with Frontend(vhu.sockets[0], pkt_size=500, log=True) as fe:
            fe.run("loop", duration=0.5)
            fe.stop_logging()
            assert wait_for(lambda: vhu.port()["logging"] == "off")
            fe.restart_log_check()
            r = fe.run("loop", duration=1.0)
            fe.stop()
            check = fe.check_log()
        assert r.rx_packets > 100 and r.errors == 0
        assert check.changed > 10 and check.marked_total == 0
        vhu.stop()


def test_a_replaced_worker_keeps_logging(tmp_path):
    """The supervisor replays the log with the memory table: a worker that
    dies during a migration is replaced by one that logs."""
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        with Frontend(vhu.sockets[0], pkt_size=500, log=True) as fe:
            fe.run("loop", duration=0.5)
            pid = vhu.stats()["workers"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: vhu.stats()["workers"][0]["pid"] != pid)
            fe.restart_log_check()
            r = fe.run("loop", duration=1.5)
            fe.stop()
            check = fe.check_log()
        assert r.rx_packets > 100, r.summary()
        assert check.changed > 10 and not check.unmarked, check.summary()
        vhu.stop()


def test_stats_document_and_line_say_logging_and_pages_marked():
    import numpy as np

    from vhu import stats
    from vhu._ring import COUNTER_NAMES
    snap = np.zeros((1, 4, len(COUNTER_NAMES)), dtype=np.uint64)
    snap[0, 0, COUNTER_NAMES.index("log_pages")] = 5
    snap[0, 3, COUNTER_NAMES.index("log_pages")] = 2
    doc = stats.port_stats(snap, 0, 1, "/s", True, logging=True)
    assert (doc["logging"], doc["log_pages"]) == ("on", 7)
    assert stats.rate_line(doc, None, 0).endswith("| logging: on, 7 pages marked")
    off = stats.port_stats(snap, 0, 1, "/s", True)
    assert off["logging"] == "off" and "logging: off, 7 pages marked" in stats.rate_line(off, None, 0)


def test_log_option_parses_and_refuses_legacy():
    from vhu.frontend.__main__ import UsageError, parse_args
    assert parse_args(["--socket", "/s", "--log"]).log
    assert not parse_args(["--socket", "/s"]).log
    with pytest.raises(UsageError):
        parse_args(["--socket", "/s", "--log", "--legacy"])


def test_set_log_fd_is_signalled_while_logging_and_never_after(tmp_path):
    """SET_LOG_FD (optional: QEMU and DPDK never send it): the back-end
    signals the eventfd after rounds that marked the log, and not once after
    LOG_ALL is off again."""
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        with Frontend(vhu.sockets[0], pkt_size=1000, log=True, log_notices=True) as fe:
            r = fe.run("loop", duration=1.0)
            assert r.rx_packets > 100 and r.errors == 0, r.summary()
            assert wait_for(lambda: vhu.port()["log_pages"] > 0), vhu.port()
            notices = fe.log_notices_since()
            assert notices > 0
            fe.stop_logging()            # answered once every worker logs no more
            fe.log_notices_since()       # those of rounds before it
            r = fe.run("loop", duration=0.5)
            assert r.rx_packets > 100 and r.errors == 0, r.summary()
            assert fe.log_notices_since() == 0
        vhu.check_balance()
        vhu.stop()
