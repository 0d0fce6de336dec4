"""What vhu creates on disk, and how: modes given at creation, never a
path followed through a symlink, and an exit status that tells the truth."""
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tests.vhuproc import REPO, VhuMaster
from vhu import stats as stats_mod
from vhu.workers.forwarder import Forwarder


@pytest.mark.parametrize("mode", [None, 0o640])
def test_pcap_files_are_private_unless_asked(tmp_path, mode):
    cap = tmp_path / "cap"
    cap.mkdir()
    kw = {} if mode is None else {"pcap_mode": mode}
    with Forwarder([str(tmp_path / "a.sock"), str(tmp_path / "b.sock")],
                   pipeline=["patch"], pcap_dir=str(cap), **kw) as fw:
        deadline = time.monotonic() + 30
        while len(os.listdir(cap)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)          # the workers create them when they start
        files = sorted(os.listdir(cap))
        assert files == ["0-rx.pcap", "0-tx.pcap", "1-rx.pcap", "1-tx.pcap"]
        for f in files:
            assert stat.S_IMODE(os.stat(cap / f).st_mode) == (mode or 0o600), f
        assert fw.running


def test_pcap_file_through_a_symlink_is_not_followed(tmp_path):
    cap = tmp_path / "cap"
    cap.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, cap / "0-rx.pcap")
    with Forwarder([str(tmp_path / "a.sock"), str(tmp_path / "b.sock")],
                   pipeline=["patch"], pcap_dir=str(cap)) as fw:
        deadline = time.monotonic() + 30
        while len(os.listdir(cap)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fw.running
    assert victim.read_bytes() == b"precious"
    assert os.path.islink(cap / "0-rx.pcap")


def test_stats_file_replaces_a_symlink_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "stats.json"
    os.symlink(victim, path)
    stats_mod.write_json(str(path), [])
    assert victim.read_text() == "precious"
    assert not os.path.islink(path)
    assert json.loads(path.read_text())["ports"] == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".stats.json.")] == []


def test_master_that_cannot_start_exits_1(tmp_path):
    """Not a usage error (2) and not a clean stop (0): a socket that cannot
    be created stops the master, status 1, one line saying why."""
    r = subprocess.run([sys.executable, "-m", "vhu.master", "--socket",
                        str(tmp_path / "no-such-dir" / "x.sock")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "No such file or directory" in r.stdout


def test_clean_stop_exits_0(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink") as vhu:
        assert vhu.stop() == 0
