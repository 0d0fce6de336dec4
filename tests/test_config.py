"""vhu.master's command line: parsing and validation, no sockets."""
import os
import subprocess
import sys

import pytest

from vhu.config import UsageError, parse_args, parse_cpus


def test_defaults_and_full_line():
    c = parse_args(["--socket", "a.sock"])
    assert (c.sockets, c.app, c.poll, c.workers, c.queues, c.socket_mode) == \
        (("a.sock",), "sink", "adaptive", 1, 8, 0o600)      # offers 8 queue pairs
    c = parse_args(["--socket", "a", "--socket", "b", "--client", "--workers", "4", "--queues", "8",
                    "--app", "patch", "--poll", "busy", "--cpus", "0", "--stats-interval", "0.5",
                    "--stats-file", "s.json", "--log-level", "debug", "--socket-mode", "0660"])
    assert c.client and c.app == "patch" and c.poll == "busy" and c.cpus == (0,)
    assert c.worker_count == 4 and c.rings_per_port == 16 and c.log_level == "DEBUG"
    # The README's main command: 4 workers; fewer queue pairs than workers
    # still start them all (other ports' queue pairs go to them: vhu.placement).
    assert parse_args(["--socket", "a", "--workers", "4"]).worker_count == 4
    assert parse_args(["--socket", "a", "--workers", "4", "--queues", "1"]).worker_count == 4


@pytest.mark.parametrize("argv,message", [
    ([], "--socket"),
    (["--socket", "a", "--app", "bridge"], "--app"),
    (["--socket", "a", "--poll", "sometimes"], "--poll"),
    (["--socket", "a", "--workers", "0"], "--workers"),
    (["--socket", "a", "--queues", "0"], "--queues"),
    (["--socket", "a", "--queues", "65"], "--queues"),
    (["--socket", "a", "--app", "patch"], "exactly two"),
    (["--socket", "a", "--socket", "a"], "same path"),
    (["--socket", "a", "--cpus", "x"], "--cpus"),
    (["--socket", "a", "--cpus", "999"], "not available"),
    (["--socket", "a", "--stats-interval", "0"], "--stats-interval"),
    (["--socket", "a", "--socket-mode", "9"], "--socket-mode"),
    (["--socket", "a", "--log-level", "loud"], "--log-level"),
    (["--socket", "a", "--workers", "two"], "invalid int"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_cpu_lists():
    cpus = sorted(os.sched_getaffinity(0))
    assert parse_cpus(f"{cpus[0]}") == (cpus[0],)
    assert parse_cpus(f"{cpus[0]}-{cpus[-1]}") == tuple(range(cpus[0], cpus[-1] + 1))


def test_cli_bad_argument_is_one_line_and_status_2():
    r = subprocess.run([sys.executable, "-m", "vhu.master", "--socket", "x", "--queues", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--queues" in r.stderr
