"""What a back-end under test holds, and a check that it gives it all back
(STYLE.md pattern 9): after its front-ends are gone, a master and its
workers hold the same number of processes, open fds and shared-memory
mappings as when they had just started."""
import os
import time

from vhu.testbed.procs import process_tree

_SHARED = ("/memfd:", "/dev/hugepages", "/dev/shm/", "(deleted)")


def holdings(pid):
    """(processes, open fds, shared mappings) of pid and its descendants."""
    procs = fds = maps = 0
    for p in process_tree(pid):
        try:
            n = len(os.listdir(f"/proc/{p}/fd"))
            with open(f"/proc/{p}/maps") as f:
                m = sum(any(s in line for s in _SHARED) for line in f)
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    raise AssertionError(f"zombie process {p} under {pid}")
        except FileNotFoundError:
            continue
        procs, fds, maps = procs + 1, fds + n, maps + m
    return procs, fds, maps


def settled(pid, want=None, timeout=30.0, quiet=0.3):
    """holdings(pid) once they stop changing (and equal `want`, if given);
    the last reading if the deadline passes first."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = holdings(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet and (want is None or now == want):
            return now
        time.sleep(0.05)
    return last


def assert_balanced(pid, baseline, what="vhu.master"):
    now = settled(pid, want=baseline)
    names = ("processes", "open fds", "shared mappings")
    diff = {n: (b, a) for n, b, a in zip(names, baseline, now) if a != b}
    assert not diff, f"{what} does not give back what it took (start, end): {diff}"


def _tracker():
    """multiprocessing's resource tracker: (its pid, our fd to it), started by
    the first spawn and kept for the life of the process; not vhu's."""
    from multiprocessing import resource_tracker
    t = resource_tracker._resource_tracker
    return getattr(t, "_pid", None), getattr(t, "_fd", None)


def own_holdings():
    """(child processes, open fds, shared mappings) of this process, vhu's
    only: the resource tracker and our fd to it are left out."""
    tracker_pid, tracker_fd = _tracker()
    me = os.getpid()
    children = [p for p in process_tree(me) if p not in (me, tracker_pid)]
    fds = [n for n in os.listdir("/proc/self/fd") if tracker_fd is None or n != str(tracker_fd)]
    with open("/proc/self/maps") as f:
        maps = sum(any(s in line for s in _SHARED) for line in f)
    return len(children), len(fds) - 1, maps      # - 1: listdir's own fd


def own_settled(want, timeout=30.0):
    deadline = time.monotonic() + timeout
    now = own_holdings()
    while now != want and time.monotonic() < deadline:
        time.sleep(0.05)
        now = own_holdings()
    return now
