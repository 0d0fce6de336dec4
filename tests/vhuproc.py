"""Run `python -m vhu.master` and `python -m vhu.frontend` as users do, for
end-to-end tests."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from tests.balance import assert_balanced, settled

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(pred, timeout, what):
    """pred()'s first true value, polled every 0.1 s for `timeout` seconds
    (these machines slow down: give it a generous one); AssertionError
    naming `what` if it never comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def frontend_process(*args):
    """`python -m vhu.frontend ARGS` running in the background, text pipes;
    use .communicate() for its output. Killed if still running at exit; its
    pipes are closed and it is reaped either way."""
    with subprocess.Popen([sys.executable, "-m", "vhu.frontend", *map(str, args)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


class VhuMaster:
    """python -m vhu.master in a subprocess; stats through --stats-file.

    Leaving the with-block (or stop()) while vhu still runs checks that it
    gave back what it took: once its front-ends are gone, the master and its
    workers hold as many processes, fds and shared mappings as just after
    start (tests.balance). balance=False for a test that kills vhu itself."""

    def __init__(self, tmp_path, *args, sockets=("vhost.sock",), stats_interval=0.2,
                 cpus=None, env=None, balance=True, netns=None):
        self.tmp = tmp_path
        self.sockets = [str(tmp_path / s) for s in sockets]
        self.stats_file = str(tmp_path / "vhu-stats.json")
        self.log_path = str(tmp_path / "vhu-master.log")
        argv = [sys.executable, "-m", "vhu.master"]
        for s in self.sockets:
            argv += ["--socket", s]
        argv += ["--stats-interval", str(stats_interval), "--stats-file", self.stats_file]
        argv += [str(a) for a in args]
        cmd = argv if cpus is None else ["taskset", "-c", str(cpus)] + argv
        if netns is not None:       # ip netns exec execs vhu: proc.pid is still the master's
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=dict(os.environ, **(env or {})))
        self.client = "--client" in args
        self.balance = balance
        self.baseline = None

    def __enter__(self):
        if not self.client:
            self.wait_sockets()
        self.wait_started()
        return self

    def wait_started(self):
        """Until the workers and the spare have answered (only then does what
        vhu holds stop growing); that holding is the balance baseline. Call
        it before any front-end connects."""
        self.wait_log("and a spare ready")
        if self.balance:
            self.baseline = settled(self.proc.pid)

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.check_balance()
        self.stop(check=False)

    def check_balance(self):
        """Assert that vhu holds what it held at start, once its front-ends
        are gone (a test that stops vhu under connected front-ends, to flush
        captures say, has nothing to compare)."""
        if self.baseline is None or self.proc.poll() is not None:
            return
        deadline = time.monotonic() + 5
        while self._frontends_connected():
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        assert_balanced(self.proc.pid, self.baseline)

    def _frontends_connected(self):
        try:
            with open(self.stats_file) as f:
                ports = json.load(f)["ports"]
        except (OSError, ValueError):
            return False              # no report yet (a long --stats-interval): just compare
        return any(p["connected"] for p in ports
                   if not p["socket"].startswith(("tap:", "vxlan:")))

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_sockets(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhu.master exited {self.proc.returncode}:\n{self.output()}")
            if all(os.path.exists(s) for s in self.sockets):
                return
            time.sleep(0.05)
        raise RuntimeError(f"vhu.master did not create its sockets:\n{self.output()}")

    def wait_log(self, text, timeout=30, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(text) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{text!r} not in vhu.master's log:\n{self.output()[-4000:]}")

    def stats(self):
        for _ in range(50):
            try:
                with open(self.stats_file) as f:
                    return json.load(f)
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.05)
        raise RuntimeError("no stats file")

    def port(self, i=0):
        return self.stats()["ports"][i]

    def wait_stable(self, key, port=0, timeout=10, settle=0.6):
        """Wait until a port counter stops moving; return it."""
        last, since = None, time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.port(port)[key]
            if v != last:
                last, since = v, time.monotonic()
            elif time.monotonic() - since >= settle:
                return v
            time.sleep(0.1)
        return last

    def stop(self, check=True, timeout=20):
        try:
            if check:
                self.check_balance()
        finally:
            # A failed balance check must not leave the master (and its
            # workers) running after the test.
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log.close()
        if check:
            assert self.proc.returncode == 0, f"exit {self.proc.returncode}:\n{self.output()[-4000:]}"
            for s in self.sockets:
                if not self.client:
                    assert not os.path.exists(s), f"{s} left behind"
        return self.proc.returncode
