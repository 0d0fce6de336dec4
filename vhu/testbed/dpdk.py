"""Drive DPDK's ``dpdk-testpmd`` as a vhost-user peer.

``Testpmd`` runs testpmd either as a vhost-user **front-end** (the
``net_virtio_user`` PMD: testpmd plays the guest driver) or as the reference
vhost-user **back-end** (the ``net_vhost`` PMD), and drives it over stdin in
interactive mode (``-i``)::

    with Testpmd([vhost_vdev("/tmp/be.sock")], forward_mode="rxonly", cpus=0) as be, \\
         Testpmd([virtio_user_vdev("/tmp/be.sock")], forward_mode="txonly", cpus=1) as fe:
        be.wait_link_up(0)
        be.start()
        fe.start()
        time.sleep(2)
        tx = fe.stop()          # forward statistics, per port
        rx = be.stop()

Implementation notes / pitfalls (DPDK 22.11 from Debian 12):

* ``dpdk-testpmd`` is in the ``dpdk-dev`` package, not ``dpdk``.
* testpmd's stdout is a pipe here, so it would be block-buffered and the prompt
  would never arrive: the process is started under ``stdbuf -o0 -e0``.
* Every instance gets a unique ``--file-prefix``; DPDK leaves
  ``/dev/hugepages/<prefix>map_*`` and ``/var/run/dpdk/<prefix>/`` behind even
  after a clean ``quit``, so :meth:`Testpmd.close` removes them.
* virtio-user on hugepages needs ``--single-file-segments``: without it every
  2 MiB page is its own memory region and the vhost-user table overflows
  ("update_memory_region(): Too many memory regions", max 8).  We always pass
  it when hugepages are used.  ``--no-huge -m MB`` works for both roles.
* testpmd sizes its mbuf pool for physical NICs (~155k mbufs, ~340 MB per
  instance); ``--total-num-mbufs`` defaults to 16384 here.
* Each testpmd needs a main lcore *and* a forwarding lcore.  With 2 host cores
  and two peers, each instance is pinned to one CPU with ``--lcores 0@C,1@C``:
  the main lcore just sleeps in ``read(stdin)``.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

log = logging.getLogger(__name__)

PROMPT = "testpmd> "
# Lines testpmd's other threads print at any moment, even in the middle of
# the prompt ("t" + log line + "estpmd> " was seen in CI): vhost library
# logs, and the "\nPort N: link state change event\n" callbacks.
ASYNC_LINE = re.compile(r"(?:VHOST_CONFIG|VHOST_DATA): [^\n]*\n|\nPort \d+: [a-z ]+ event\n")
FORWARD_MODES = ("io", "mac", "macswap", "rxonly", "txonly", "flowgen", "csum", "icmpecho")

_counter = itertools.count()

PortStats = Dict[str, int]


def command_reply(text: str) -> Optional[str]:
    """The reply to an interactive command, from the console text after it
    was sent: cmdline echoes the line, prints the reply, then a fresh
    prompt. Async lines (ASYNC_LINE) may land anywhere in that, the prompt
    included, and are taken out. None while the prompt has not come back."""
    if "\n" not in text:
        return None
    body = ASYNC_LINE.sub("", text.split("\n", 1)[1])
    end = body.find(PROMPT)
    return None if end < 0 else body[:end]


class TestpmdError(RuntimeError):
    """testpmd failed to start, died, or did not answer in time."""


# --------------------------------------------------------------------------- discovery


def find_testpmd() -> Optional[str]:
    """Return the path of dpdk-testpmd (``$VHU_TESTPMD`` overrides), or None."""
    env = os.environ.get("VHU_TESTPMD")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("dpdk-testpmd", "testpmd"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _pmd_dirs() -> List[str]:
    return glob.glob("/usr/lib/*/dpdk/pmds-*") + glob.glob("/usr/local/lib*/dpdk/pmds-*")


def pmd_installed(driver: str) -> bool:
    """True if DPDK's plugin ``driver`` (say ``librte_net_pcap.so``) is in a
    pmds directory, or if there are none (a DPDK built with its PMDs in)."""
    dirs = _pmd_dirs()
    return not dirs or any(glob.glob(os.path.join(d, driver + "*")) for d in dirs)


def testpmd_missing_reason() -> Optional[str]:
    """None if testpmd and the vhost/virtio-user PMDs look usable, else why not."""
    if find_testpmd() is None:
        return "dpdk-testpmd not found (run scripts/setup-peers.sh; it is in Debian's dpdk-dev)"
    if shutil.which("stdbuf") is None:
        return "stdbuf (coreutils) not found"
    # Debian layout: PMDs are plugins loaded from the pmds-XX directory
    for drv in ("librte_net_vhost.so", "librte_net_virtio.so", "librte_mempool_ring.so"):
        if not pmd_installed(drv):
            return f"DPDK plugin {drv} not installed (run scripts/setup-peers.sh)"
    if os.geteuid() != 0:
        return "testpmd peers need root (hugepages / shared memory / mlock)"
    return None


# --------------------------------------------------------------------------- helpers


def vhost_vdev(path: str, index: int = 0, *, queues: int = 1, client: bool = False,
               **extra: Union[str, int]) -> str:
    """``--vdev`` string for the reference back-end (testpmd's ``net_vhost`` PMD).

    ``client=True`` makes the back-end connect to a listening front-end.
    """
    args = [f"net_vhost{index}", f"iface={path}", f"queues={queues}"]
    if client:
        args.append("client=1")
    args += [f"{k}={v}" for k, v in extra.items()]
    return ",".join(args)


def virtio_user_vdev(path: str, index: int = 0, *, queues: int = 1, server: bool = False,
                     packed_vq: bool = False, mrg_rxbuf: Optional[bool] = None,
                     in_order: Optional[bool] = None, queue_size: Optional[int] = None,
                     mac: Optional[str] = None, **extra: Union[str, int]) -> str:
    """``--vdev`` string for a virtio-user front-end (testpmd plays the driver).

    ``server=True`` makes the front-end listen and the back-end connect.
    """
    args = [f"net_virtio_user{index}", f"path={path}", f"queues={queues}"]
    if server:
        args.append("server=1")
    if packed_vq:
        args.append("packed_vq=1")
    if mrg_rxbuf is not None:
        args.append(f"mrg_rxbuf={int(mrg_rxbuf)}")
    if in_order is not None:
        args.append(f"in_order={int(in_order)}")
    if queue_size is not None:
        args.append(f"queue_size={queue_size}")
    if mac:
        args.append(f"mac={mac}")
    args += [f"{k}={v}" for k, v in extra.items()]
    return ",".join(args)


def hugepages_usable() -> bool:
    """True if a hugetlbfs is mounted and some hugepages are free."""
    if not _hugetlbfs_mounts():
        return False
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1]) > 0
    except OSError:
        pass
    return False


def _hugetlbfs_mounts() -> List[str]:
    try:
        with open("/proc/mounts") as f:
            return [ln.split()[1] for ln in f if len(ln.split()) > 2 and ln.split()[2] == "hugetlbfs"]
    except OSError:
        return []


def cleanup_prefix(prefix: str) -> None:
    """Remove hugepage files and the runtime dir DPDK leaves for ``--file-prefix``."""
    if not prefix or "/" in prefix:
        return
    for mnt in set(_hugetlbfs_mounts() + ["/dev/hugepages"]):
        for path in glob.glob(os.path.join(glob.escape(mnt), glob.escape(prefix) + "map_*")):
            try:
                os.unlink(path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc)
    for rundir in ("/var/run/dpdk", os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "dpdk")):
        shutil.rmtree(os.path.join(rundir, prefix), ignore_errors=True)


# --------------------------------------------------------------------------- parsing

_KV = re.compile(r"([A-Za-z][A-Za-z-]*):\s+(-?\d+)")
_NIC_HDR = re.compile(r"#+ NIC statistics for port (\d+)\s+#+")
_FWD_HDR = re.compile(r"-+ Forward statistics for port (\d+)\s+-+")
_ACC_HDR = re.compile(r"\++ Accumulated forward statistics for all ports\s*\++")


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def _blocks(text: str, header: re.Pattern) -> Dict[int, str]:
    """Split ``text`` into {port: body} at each header match."""
    out: Dict[int, str] = {}
    matches = list(header.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end():end]
        # a block ends at its closing rule line (#### / ---- / ++++)
        stop = re.search(r"^\s*([#+-])\1{20,}\s*$", body, re.M)
        out[int(m.group(1))] = body[: stop.start()] if stop else body
    return out


def parse_port_stats(text: str) -> Dict[int, PortStats]:
    """Parse ``show port stats all`` output into {port: {rx_packets: .., ...}}.

    Keys: rx_packets, rx_missed, rx_bytes, rx_errors, rx_nombuf, tx_packets,
    tx_errors, tx_bytes, rx_pps, rx_bps, tx_pps, tx_bps.
    """
    return {port: {_key(k): int(v) for k, v in _KV.findall(body)}
            for port, body in _blocks(text, _NIC_HDR).items()}


def parse_forward_stats(text: str) -> Dict[Union[int, str], PortStats]:
    """Parse the output of ``stop`` into {port: {...}, "total": {...}}.

    Keys: rx_packets, rx_dropped, rx_total, tx_packets, tx_dropped, tx_total.
    (Per-queue "Forward Stats for RX Port=" blocks, printed with several
    streams per port, are ignored: the per-port block has the sums.)
    """
    out: Dict[Union[int, str], PortStats] = {}
    for port, body in _blocks(text, _FWD_HDR).items():
        out[port] = {_key(k): int(v) for k, v in _KV.findall(body)}
    m = _ACC_HDR.search(text)
    if m:
        body = text[m.end():]
        stop = re.search(r"^\s*\+{20,}\s*$", body, re.M)
        body = body[: stop.start()] if stop else body
        out["total"] = {_key(k): int(v) for k, v in _KV.findall(body)}
    return out


# --------------------------------------------------------------------------- Testpmd


@dataclass(eq=False)
class Testpmd:
    """A dpdk-testpmd process acting as a vhost-user front-end or back-end.

    Parameters
    ----------
    vdevs:
        ``--vdev`` strings, see :func:`vhost_vdev` / :func:`virtio_user_vdev`.
        Each vdev becomes one port, numbered in order.
    forward_mode:
        io, macswap, rxonly, txonly, ... (``--forward-mode``).
    cpus:
        Physical CPU(s) to run on.  The main lcore goes on ``cpus[0]``, the
        ``nb_cores`` forwarding lcores round-robin over ``cpus[1:]`` (or over
        ``cpus[0]`` when only one CPU is given).  ``lcores`` (raw ``--lcores``)
        or ``cores`` (raw ``-l``) override this.
    huge:
        True: hugepages (+ ``--single-file-segments``); False: ``--no-huge -m
        mem_mb``; None: hugepages if some are free.
    txpkts, burst, rxq, txq, rxd, txd, total_num_mbufs:
        the testpmd options of the same name.
    tx_first:
        send a first burst on start (``start tx_first``) so io/macswap loops
        get going without external traffic.
    interactive:
        drive over stdin (``-i``, default).  Non-interactive runs use
        ``--auto-start`` and :meth:`finish` (Enter) to stop and get totals.
    """

    vdevs: Sequence[str]
    forward_mode: str = "io"
    cpus: Union[int, Sequence[int]] = 0
    nb_cores: int = 1
    lcores: Optional[str] = None
    cores: Optional[str] = None
    huge: Optional[bool] = None
    mem_mb: int = 1024
    txpkts: Optional[Union[int, str]] = None
    burst: Optional[int] = None
    rxq: Optional[int] = None
    txq: Optional[int] = None
    rxd: Optional[int] = None
    txd: Optional[int] = None
    total_num_mbufs: int = 16384
    tx_first: bool = False
    interactive: bool = True
    file_prefix: Optional[str] = None
    log_level: Optional[str] = None
    extra_eal: Sequence[str] = ()
    extra_args: Sequence[str] = ()
    binary: Optional[str] = None
    startup_timeout: float = 30.0
    log_path: Optional[str] = None  # also append all output here

    proc: Optional[subprocess.Popen] = field(default=None, init=False, repr=False)
    _buf: str = field(default="", init=False, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)
    _reader: Optional[threading.Thread] = field(default=None, init=False, repr=False)
    _eof: bool = field(default=False, init=False, repr=False)
    _cmd_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.vdevs, str):
            self.vdevs = [self.vdevs]
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"unknown forward mode {self.forward_mode!r}")
        if self.file_prefix is None:
            self.file_prefix = f"vhu{os.getpid()}_{next(_counter)}"
        if self.huge is None:
            self.huge = hugepages_usable()

    # ------------------------------------------------------------------ command line

    def _lcores_arg(self) -> List[str]:
        if self.lcores:
            return ["--lcores", self.lcores]
        if self.cores:
            return ["-l", self.cores]
        cpus = [self.cpus] if isinstance(self.cpus, int) else list(self.cpus)
        if not cpus:
            raise ValueError("cpus must not be empty")
        fwd_cpus = cpus[1:] or cpus[:1]
        spec = [f"0@{cpus[0]}"] + [f"{i + 1}@{fwd_cpus[i % len(fwd_cpus)]}"
                                    for i in range(self.nb_cores)]
        return ["--lcores", ",".join(spec)]

    def argv(self) -> List[str]:
        """The full command line (without the stdbuf wrapper)."""
        binary = self.binary or find_testpmd()
        if not binary:
            raise TestpmdError(testpmd_missing_reason() or "dpdk-testpmd not found")
        eal = [binary, *self._lcores_arg(), "--no-pci", f"--file-prefix={self.file_prefix}"]
        if self.huge:
            eal += ["--single-file-segments"]
        else:
            eal += ["--no-huge", "-m", str(self.mem_mb)]
        if self.log_level:
            eal += [f"--log-level={self.log_level}"]
        for vdev in self.vdevs:
            eal += ["--vdev", vdev]
        eal += list(self.extra_eal)
        app = ["--", f"--forward-mode={self.forward_mode}", f"--nb-cores={self.nb_cores}",
               f"--total-num-mbufs={self.total_num_mbufs}", "--no-mlockall"]
        app += ["-i"] if self.interactive else ["--auto-start"]
        if self.tx_first and not self.interactive:
            app.append("--tx-first")
        for opt in ("txpkts", "burst", "rxq", "txq", "rxd", "txd"):
            val = getattr(self, opt)
            if val is not None:
                app.append(f"--{opt}={val}")
        app += list(self.extra_args)
        return eal + app

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> "Testpmd":
        """Start the process and wait for the first prompt (interactive) or for
        forwarding to start (non-interactive)."""
        if self.proc is not None:
            raise TestpmdError("already launched")
        cleanup_prefix(self.file_prefix)  # stale files from a SIGKILLed run
        cmd = ["stdbuf", "-o0", "-e0", *self.argv()]
        log.info("starting testpmd: %s", " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)  # own process group: signals don't hit pytest
        self._reader = threading.Thread(target=self._read_loop, name=f"testpmd-{self.file_prefix}",
                                        daemon=True)
        self._reader.start()
        marker = PROMPT if self.interactive else "Press enter to exit"
        try:
            self._wait_for(lambda b: marker in b, self.startup_timeout, "startup")
        except Exception:
            self.close()
            raise
        return self

    def __enter__(self) -> "Testpmd":
        return self.launch()

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_loop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        logf = open(self.log_path, "a") if self.log_path else None
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                text = data.decode("utf-8", "replace").replace("\r", "")
                if logf:
                    logf.write(text)
                    logf.flush()
                with self._cond:
                    self._buf += text
                    self._cond.notify_all()
        except OSError:
            pass
        finally:
            if logf:
                logf.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _wait_for(self, pred, timeout: float, what: str, start: int = 0) -> str:
        """Wait until ``pred(output[start:])`` holds; return that text."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._buf[start:]
                if pred(text):
                    return text
                if self._eof:
                    rc = self.proc.wait(timeout=5) if self.proc else None
                    raise TestpmdError(f"testpmd exited (rc={rc}) during {what}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestpmdError(f"timeout ({timeout}s) waiting for {what}:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    @property
    def output(self) -> str:
        """Everything testpmd printed so far (stdout + stderr)."""
        with self._cond:
            return self._buf

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ commands

    def cmd(self, line: str, timeout: float = 15.0) -> str:
        """Send one interactive command; return its output (up to the next prompt)."""
        if not self.interactive:
            raise TestpmdError("cmd() needs interactive mode")
        if not self.alive():
            raise TestpmdError(f"testpmd is not running:\n{self.tail()}")
        with self._cmd_lock:
            with self._cond:
                start = len(self._buf)
            log.debug("testpmd[%s] <- %s", self.file_prefix, line)
            try:
                self.proc.stdin.write((line + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise TestpmdError(f"cannot write to testpmd: {exc}\n{self.tail()}") from exc
            text = self._wait_for(lambda b: command_reply(b) is not None, timeout,
                                  f"'{line}'", start)
            return command_reply(text)

    def port_stats(self) -> Dict[int, PortStats]:
        """``show port stats all`` -> {port: {rx_packets, rx_bytes, tx_packets, ...}}."""
        return parse_port_stats(self.cmd("show port stats all"))

    def clear_stats(self) -> None:
        self.cmd("clear port stats all")

    def link_up(self, port: int = 0) -> bool:
        out = self.cmd(f"show port info {port}")
        m = re.search(r"Link status:\s*(\w+)", out)
        return bool(m and m.group(1).lower() == "up")

    def wait_link_up(self, port: int = 0, timeout: float = 15.0) -> None:
        """Wait for a port's link to come up (for net_vhost: the front-end has
        connected and set DRIVER_OK)."""
        deadline = time.monotonic() + timeout
        while not self.link_up(port):
            if time.monotonic() > deadline:
                raise TestpmdError(f"port {port} link still down after {timeout}s:\n{self.tail()}")
            time.sleep(0.2)

    def start(self, tx_first: Optional[bool] = None) -> None:
        """Start forwarding (``start`` / ``start tx_first``)."""
        tx_first = self.tx_first if tx_first is None else tx_first
        out = self.cmd("start tx_first" if tx_first else "start")
        if "Cannot" in out or "Fail" in out:
            raise TestpmdError(f"start failed: {out}")

    def stop(self) -> Dict[Union[int, str], PortStats]:
        """Stop forwarding; return the forward statistics testpmd prints
        ({port: {rx_packets, rx_dropped, tx_packets, tx_dropped, ...}, "total": {...}})."""
        return parse_forward_stats(self.cmd("stop", timeout=30))

    def set_mode(self, mode: str) -> None:
        if mode not in FORWARD_MODES:
            raise ValueError(mode)
        self.cmd(f"set fwd {mode}")
        self.forward_mode = mode

    def run_for(self, seconds: float, tx_first: Optional[bool] = None) -> Dict[Union[int, str], PortStats]:
        """Start forwarding, wait ``seconds``, stop and return the forward stats."""
        if not self.interactive:
            time.sleep(seconds)
            return self.finish()
        self.start(tx_first)
        time.sleep(seconds)
        return self.stop()

    def finish(self, timeout: float = 30.0) -> Dict[Union[int, str], PortStats]:
        """Non-interactive mode: press Enter (stop + quit); return forward stats."""
        if self.interactive:
            raise TestpmdError("finish() is for non-interactive mode; use stop()")
        with self._cond:
            start = len(self._buf)
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            self._wait_for(lambda b: "Bye..." in b, timeout, "exit", start)
        except TestpmdError:
            pass  # EOF without "Bye" is handled by the parser result below
        text = self.output[start:]
        self.close()
        return parse_forward_stats(text)

    # ------------------------------------------------------------------ termination

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to testpmd (default SIGKILL, for crash tests) and reap it.
        Hugepage / runtime files are removed for SIGKILL too."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            self._reap(10.0)

    def _reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self._reader:
            self._reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        cleanup_prefix(self.file_prefix)

    def close(self, timeout: float = 10.0) -> Optional[int]:
        """Quit gracefully (``quit``), escalating to SIGTERM then SIGKILL.
        Always removes the instance's hugepage files. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n" if self.interactive else b"\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()  # EOF also makes cmdline exit
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("testpmd %s did not quit, sending SIGTERM", self.file_prefix)
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=5)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    log.warning("testpmd %s ignored SIGTERM, sending SIGKILL", self.file_prefix)
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self._reap(10.0)
        return self.proc.returncode
