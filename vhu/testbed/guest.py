"""QEMU 7.2 guests with a vhost-user virtio-net NIC, for real-peer tests.

A tiny guest is assembled at run time from what ``scripts/setup-peers.sh``
installed: the Debian kernel (``/boot/vmlinuz-<ver>``), the virtio/net modules
from ``/lib/modules/<ver>`` (decompressed if they are ``.ko.xz/.zst/.gz``) and
``busybox-static``.  The initramfs is cached under ``~/.cache/vhu/guest/``
keyed by kernel version and a hash of the init script and module list.

::

    with Guest("/tmp/a.sock", ip="10.0.0.1/24", mac="52:54:00:00:00:01") as g:
        g.wait_ready(30)
        out, rc = g.run("ip -br addr")
        stats = g.ping("10.0.0.2", count=5)

Pitfalls baked in here (Debian 12, QEMU 7.2, no KVM):

* ``-accel tcg`` (KVM guests hang on these hosts).
* vhost-user + TCG crashes during MSI-X setup: ``vectors=0`` on the
  virtio-net-pci device (the guest then uses INTx).
* vhost-user needs guest RAM in a shareable fd:
  ``memory-backend-memfd,share=on`` + ``-machine pc,memory-backend=mem``.
* Module load order: virtio_ring, virtio, virtio_pci_modern_dev,
  virtio_pci_legacy_dev, virtio_pci, failover, net_failover, virtio_net
  (busybox ``insmod`` does not resolve dependencies).
* Serial console: the tty echoes every command and turns ``\\n`` into
  ``\\r\\n``; :meth:`Guest.run` therefore prints markers built by the shell
  (``echo "__VS""7"``) so the echoed command line never matches them.
* The guest's serial input is flow-controlled by QEMU, so writing a command
  into the stdin pipe does not lose characters.
* busybox has no ethtool, and none is needed for multiqueue: Linux's
  virtio_net enables min(queue pairs, online CPUs) at probe (since 4.11),
  so ``queues=Q, smp=N`` gives the guest min(Q, N) queue pairs in use (its
  /sys/class/net/eth0/queues shows them) and a sender pinned to CPU i
  (busybox ``taskset``) transmits on queue i (XPS).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import itertools
import json
import logging
import lzma
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

#: Load order matters: busybox insmod does not resolve dependencies.
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "failover", "net_failover", "virtio_net",
)

READY_MARKER = "VHU-GUEST-READY"
PS1 = "vhu# "

# The guest's /init.  Kernel command line parameters it understands:
#   vhu.ip=ADDR/LEN   address for eth0 (none: link up only)
#   vhu.mac=MAC       override eth0's MAC inside the guest
#   vhu.gw=ADDR       default route
#   vhu.mtu=N         eth0 MTU
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk
for m in @MODULES@; do
    if [ -f /lib/modules/$m.ko ]; then
        insmod /lib/modules/$m.ko || echo "vhu-init: insmod $m failed"
    fi
done
IP=; MAC=; GW=; MTU=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vhu.ip=*) IP="${arg#vhu.ip=}" ;;
        vhu.mac=*) MAC="${arg#vhu.mac=}" ;;
        vhu.gw=*) GW="${arg#vhu.gw=}" ;;
        vhu.mtu=*) MTU="${arg#vhu.mtu=}" ;;
    esac
done
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ]; then
    [ -n "$MAC" ] && ip link set eth0 address "$MAC"
    [ -n "$MTU" ] && ip link set eth0 mtu "$MTU"
    [ -n "$IP" ] && ip addr add "$IP" dev eth0
    ip link set eth0 up
    [ -n "$GW" ] && ip route add default via "$GW"
else
    echo "vhu-init: no eth0"
fi
export PS1='@PS1@' PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/
echo @READY@
exec sh
"""


class GuestError(RuntimeError):
    """QEMU failed to start, died, or the guest did not answer in time."""


# --------------------------------------------------------------------------- discovery


def find_qemu() -> Optional[str]:
    env = os.environ.get("VHU_QEMU")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("qemu-system-x86_64")


def find_busybox() -> Optional[str]:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("busybox")


def find_kernel(version: Optional[str] = None) -> Tuple[str, str]:
    """Return (vmlinuz path, version); newest /boot/vmlinuz-* with modules."""
    version = version or os.environ.get("VHU_GUEST_KERNEL")
    if version:
        cands = [f"/boot/vmlinuz-{version}"]
    else:
        cands = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key, reverse=True)
    for path in cands:
        ver = os.path.basename(path)[len("vmlinuz-"):]
        if os.path.isfile(path) and os.path.isdir(f"/lib/modules/{ver}"):
            return path, ver
    raise GuestError("no /boot/vmlinuz-<ver> with matching /lib/modules/<ver> "
                     "(install linux-image-amd64: scripts/setup-peers.sh)")


def _version_key(path: str) -> List:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", path)]


def guest_missing_reason() -> Optional[str]:
    """None if QEMU + kernel + busybox are usable, else a one-line reason."""
    if find_qemu() is None:
        return "qemu-system-x86_64 not found (run scripts/setup-peers.sh)"
    if find_busybox() is None:
        return "busybox not found (install busybox-static: scripts/setup-peers.sh)"
    try:
        kernel, _ = find_kernel()
    except GuestError as exc:
        return str(exc)
    if not os.access(kernel, os.R_OK):
        return f"{kernel} is not readable (Debian installs it 0600; run as root)"
    return None


# --------------------------------------------------------------------------- initramfs


def _find_module(kver: str, name: str) -> Optional[str]:
    root = f"/lib/modules/{kver}"
    for alt in {name, name.replace("_", "-")}:
        for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            hits = glob.glob(f"{root}/kernel/**/{alt}{ext}", recursive=True)
            if hits:
                return hits[0]
    return None


def _builtin_modules(kver: str) -> set:
    try:
        with open(f"/lib/modules/{kver}/modules.builtin") as f:
            return {os.path.basename(l.strip()).split(".ko")[0] for l in f}
    except OSError:
        return set()


def _read_module(path: str) -> bytes:
    """Module contents, decompressed (busybox insmod wants plain ELF)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        try:
            import zstandard  # type: ignore
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except ImportError:
            zstd = shutil.which("zstd")
            if not zstd:
                raise GuestError(f"{path} is zstd-compressed and neither the zstandard "
                                 "module nor the zstd tool is available")
            return subprocess.run([zstd, "-dc", path], check=True, capture_output=True,
                                  timeout=60).stdout
    return data


class _Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: Tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        # ino mode uid gid nlink mtime filesize devmaj devmin rdevmaj rdevmin namesize check
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _cache_dir() -> str:
    base = os.environ.get("VHU_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vhu")
    return os.path.join(base, "guest")


def _kernel_has(kver: str, option: str) -> bool:
    try:
        with open(f"/boot/config-{kver}") as f:
            return any(line.strip() == f"{option}=y" for line in f)
    except OSError:
        return False


def extract_vmlinux(kernel: str, kver: str) -> Optional[str]:
    """Decompress the ELF vmlinux out of a bzImage (cached); None if impossible.

    Why: under TCG the bzImage's own XZ decompressor needs ~5 s of emulated
    CPU before the kernel even starts.  QEMU can boot the uncompressed ELF
    directly through its PVH entry point (CONFIG_PVH=y on Debian kernels),
    which cuts guest boot from ~8 s to ~3.5 s.
    """
    if os.environ.get("VHU_GUEST_BZIMAGE") == "1" or not _kernel_has(kver, "CONFIG_PVH"):
        return None
    out = os.path.join(_cache_dir(), f"vmlinux-{kver}")
    if os.path.exists(out):
        return out
    with open(kernel, "rb") as f:
        data = f.read()
    elf = None
    for magic, decomp in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(b)),
                          (b"\x1f\x8b\x08", lambda b: __import__("zlib").decompressobj(31).decompress(b)),
                          (b"(\xb5/\xfd", None)):
        i = data.find(magic)
        if i < 0:
            continue
        try:
            if decomp is None:
                zstd = shutil.which("zstd")
                if not zstd:
                    continue
                elf = subprocess.run([zstd, "-dc"], input=data[i:], capture_output=True,
                                     timeout=60).stdout
            else:
                elf = decomp(data[i:])
        except (lzma.LZMAError, OSError, ValueError, subprocess.SubprocessError) as exc:
            log.debug("vmlinux extraction with %r failed: %s", magic, exc)
            continue
        if elf[:4] == b"\x7fELF":
            break
        elf = None
    if elf is None:
        log.info("could not extract vmlinux from %s; booting the bzImage", kernel)
        return None
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=_cache_dir(), prefix=".vmlinux-")
    with os.fdopen(fd, "wb") as f:
        f.write(elf)
    os.replace(tmp, out)
    return out


#: What the guest kernel prints when it dies (Guest.kernel_crash).
KERNEL_CRASH = re.compile(r"BUG: .*|Oops: .*|Kernel panic - .*|general protection fault.*")

#: Host programs copied into the guest (with the shared libraries ldd lists
#: for them) when installed: iperf3 (Debian's package) for throughput runs,
#: ethtool to use more queue pairs than the guest has vCPUs.
EXTRA_PROGRAMS = ("iperf3", "ethtool")


def _host_programs(names: Sequence[str]) -> List[str]:
    """Real paths of the named host programs that exist, and of every library
    they need (ldd), the dynamic loader included; [] for none found."""
    out: List[str] = []
    for name in names:
        prog = shutil.which(name)
        if not prog:
            continue
        try:
            deps = subprocess.run(["ldd", prog], capture_output=True, text=True, timeout=30,
                                  check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        libs = re.findall(r"(/\S+)", deps)
        for p in [prog] + libs:
            # The loader and libraries under the names the program asks for
            # (/lib64/ld-linux-x86-64.so.2, /lib/x86_64-linux-gnu/libc.so.6).
            if os.path.isfile(p) and p not in out:
                out.append(p)
    return out


def build_initramfs(kernel_version: Optional[str] = None, *, force: bool = False) -> Tuple[str, str]:
    """Build (or reuse) the guest initramfs; return (kernel image, initramfs) paths.

    The kernel image is the cached uncompressed vmlinux (PVH boot) when it can
    be extracted, else /boot/vmlinuz-<ver>.
    """
    kernel, kver = find_kernel(kernel_version)
    kernel = extract_vmlinux(kernel, kver) or kernel
    busybox = find_busybox()
    if not busybox:
        raise GuestError("busybox not found (install busybox-static)")
    init = (INIT_SCRIPT.replace("@MODULES@", " ".join(MODULES))
            .replace("@READY@", READY_MARKER).replace("@PS1@", PS1))
    extras = _host_programs(EXTRA_PROGRAMS)
    key = hashlib.sha256((init + "\0" + kver + "\0" + str(os.path.getsize(busybox)) + "\0"
                          + repr(sorted((p, os.path.getsize(p)) for p in extras))
                          ).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    out = os.path.join(out_dir, f"initramfs-{kver}-{key}.cpio.gz")
    if os.path.exists(out) and not force:
        return kernel, out

    t0 = time.monotonic()
    cpio = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "lib", "lib/modules", "usr", "run"):
        cpio.dir(d)
    # /dev/console must exist before /init runs, or init has no stdio.
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    with open(busybox, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init.encode(), 0o755)
    made = {"bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "lib", "lib/modules", "usr", "run"}
    for path in extras:                      # host programs and the libraries they load
        rel = path.lstrip("/")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                cpio.dir(d)
        with open(path, "rb") as f:
            cpio.file(rel, f.read(), 0o755)
    builtin = _builtin_modules(kver)
    for name in MODULES:
        path = _find_module(kver, name)
        if path is None:
            if name in builtin or name.replace("_", "-") in builtin:
                continue
            raise GuestError(f"kernel module {name} not found under /lib/modules/{kver}")
        cpio.file(f"lib/modules/{name}.ko", _read_module(path))
    data = gzip.compress(cpio.finish(), compresslevel=6)
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, out)  # atomic: concurrent builders don't see half a file
    log.info("built guest initramfs %s (%d KiB) in %.2fs", out, len(data) // 1024,
             time.monotonic() - t0)
    return kernel, out


# --------------------------------------------------------------------------- Guest

_counter = itertools.count()


class Guest:
    """A QEMU TCG guest whose eth0 is a vhost-user virtio-net-pci device.

    Parameters
    ----------
    sock:
        vhost-user socket path.
    mac, ip:
        MAC of the virtio-net device and ``ADDR/LEN`` for eth0 (``vhu.ip=``).
    queues:
        queue pairs (``-netdev ...,queues=Q`` and ``mq=on``); the guest driver
        uses min(Q, smp) of them.
    smp:
        guest CPUs (``-smp N``).
    packed:
        offer VIRTIO_F_RING_PACKED (``packed=on``).
    server:
        QEMU listens on ``sock`` (``server=on,wait=off``); default: QEMU connects.
    reconnect:
        seconds between reconnect attempts when QEMU is the client (``reconnect=N``).
        Also makes QEMU start when the back-end is not listening yet.
    serial:
        "stdio" (pipes, default) or "unix" (a unix socket next to ``sock``).
    cpu:
        host CPU to pin QEMU to (``taskset -c``), None = no pinning.
    device_opts:
        extra ``key=value`` for -device virtio-net-pci (e.g. ``{"mrg_rxbuf": "off"}``).
    """

    def __init__(self, sock: str, *, mac: str = "52:54:00:12:34:01", ip: Optional[str] = "10.0.0.1/24",
                 gw: Optional[str] = None, mtu: Optional[int] = None, queues: int = 1,
                 smp: int = 1, packed: bool = False, server: bool = False, reconnect: Optional[int] = None,
                 mem_mb: int = 256, serial: str = "stdio", cpu: Optional[int] = None,
                 device_opts: Optional[Dict[str, str]] = None, extra_args: Sequence[str] = (),
                 kernel_version: Optional[str] = None, extra_cmdline: str = "",
                 log_path: Optional[str] = None, name: Optional[str] = None,
                 qmp: bool = False, incoming: Optional[str] = None) -> None:
        if serial not in ("stdio", "unix"):
            raise ValueError("serial must be 'stdio' or 'unix'")
        self.sock, self.mac, self.ip, self.gw, self.mtu = sock, mac, ip, gw, mtu
        self.queues, self.packed, self.server, self.reconnect = queues, packed, server, reconnect
        self.smp = smp
        self.mem_mb, self.serial, self.cpu = mem_mb, serial, cpu
        self.device_opts = dict(device_opts or {})
        self.extra_args, self.kernel_version, self.extra_cmdline = list(extra_args), kernel_version, extra_cmdline
        self.log_path = log_path
        self.name = name or f"vhu-guest-{os.getpid()}-{next(_counter)}"
        # Live migration: a QMP socket next to ``sock`` (qmp=True), and for a
        # destination the same command line plus -incoming (e.g. "unix:PATH").
        self.qmp_path = f"{sock}.qmp" if qmp else None
        self.incoming = incoming
        self._qmp: Optional[Qmp] = None
        self.proc: Optional[subprocess.Popen] = None
        self.boot_time: Optional[float] = None
        self._serial_path = f"{sock}.serial" if serial == "unix" else None
        self._conn: Optional[socket.socket] = None
        self._buf = ""
        self._err = ""
        self._cond = threading.Condition()
        self._eof = False
        self._threads: List[threading.Thread] = []
        self._seq = itertools.count(1)
        self._run_lock = threading.Lock()
        self._t_launch = 0.0

    # ------------------------------------------------------------------ command line

    def argv(self) -> List[str]:
        qemu = find_qemu()
        if not qemu:
            raise GuestError(guest_missing_reason() or "qemu-system-x86_64 not found")
        kernel, initrd = build_initramfs(self.kernel_version)
        chardev = f"socket,id=c0,path={self.sock}"
        if self.server:
            chardev += ",server=on,wait=off"
        elif self.reconnect:
            chardev += f",reconnect={int(self.reconnect)}"
        netdev = "vhost-user,id=n0,chardev=c0"
        device = f"virtio-net-pci,netdev=n0,mac={self.mac},vectors=0,romfile="
        if self.queues > 1:
            netdev += f",queues={self.queues}"
            device += ",mq=on"
        if self.packed:
            device += ",packed=on"
        for k, v in self.device_opts.items():
            device += f",{k}={v}"
        cmdline = "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init"
        if self.ip:
            cmdline += f" vhu.ip={self.ip}"
        if self.gw:
            cmdline += f" vhu.gw={self.gw}"
        if self.mtu:
            cmdline += f" vhu.mtu={self.mtu}"
        if self.extra_cmdline:
            cmdline += " " + self.extra_cmdline
        if self._serial_path:
            serial = ["-chardev", f"socket,id=ser0,path={self._serial_path},server=on,wait=on",
                      "-serial", "chardev:ser0"]
        else:
            serial = ["-serial", "stdio"]
        args = [
            qemu, "-name", self.name, "-accel", "tcg", "-m", str(self.mem_mb),
            *(["-smp", str(self.smp)] if self.smp > 1 else []),
            "-object", f"memory-backend-memfd,id=mem,size={self.mem_mb}M,share=on",
            "-machine", "pc,memory-backend=mem",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            *serial, "-monitor", "none",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-chardev", chardev, "-netdev", netdev, "-device", device,
            *self.extra_args,
        ]
        if self.qmp_path:
            args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.incoming:
            args += ["-incoming", self.incoming]
        if self.cpu is not None:
            args = ["taskset", "-c", str(self.cpu)] + args
        return args

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> "Guest":
        """Start QEMU (does not wait for the guest; see :meth:`wait_ready`)."""
        if self.proc is not None:
            raise GuestError("already launched")
        argv = self.argv()
        log.info("starting guest %s: %s", self.name, " ".join(argv))
        if self._serial_path and os.path.exists(self._serial_path):
            os.unlink(self._serial_path)
        self._t_launch = time.monotonic()
        if self.qmp_path and os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._spawn(self._pump_stderr, "stderr")
        if self._serial_path:
            self._conn = self._connect_serial(10.0)
            self._spawn(lambda: self._pump(self._conn.fileno()), "serial")
        else:
            self._spawn(lambda: self._pump(self.proc.stdout.fileno()), "serial")
        return self

    def __enter__(self) -> "Guest":
        return self.launch()

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, fn, what: str) -> None:
        t = threading.Thread(target=fn, name=f"{self.name}-{what}", daemon=True)
        t.start()
        self._threads.append(t)

    def _connect_serial(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise GuestError(f"QEMU exited (rc={self.proc.returncode}): {self.stderr}")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self._serial_path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"cannot connect to serial socket {self._serial_path}")
                time.sleep(0.05)

    def _pump(self, fd: int) -> None:
        logf = open(self.log_path, "a") if self.log_path else None
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                text = data.decode("utf-8", "replace").replace("\r", "")
                if logf:
                    logf.write(text)
                    logf.flush()
                with self._cond:
                    self._buf += text
                    self._cond.notify_all()
        finally:
            if logf:
                logf.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _pump_stderr(self) -> None:
        fd = self.proc.stderr.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            text = data.decode("utf-8", "replace")
            log.debug("qemu %s stderr: %s", self.name, text.rstrip())
            with self._cond:
                self._err += text
                self._cond.notify_all()

    @property
    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        with self._cond:
            return self._buf

    def kernel_crash(self) -> Optional[str]:
        """The first line of a guest kernel crash on the console (an oops,
        a panic, a lockup, a general protection fault), or None."""
        found = KERNEL_CRASH.search(self.console)
        return found.group(0).strip() if found else None

    @property
    def stderr(self) -> str:
        """QEMU's stderr so far (error messages, vhost-user failures)."""
        with self._cond:
            return self._err.strip()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _diag(self) -> str:
        tail = "\n".join(self.console.splitlines()[-15:])
        rc = self.proc.poll() if self.proc else None
        return f"[qemu rc={rc}] stderr: {self.stderr or '-'}\nconsole tail:\n{tail}"

    def _wait_for(self, pred, timeout: float, what: str, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._buf[start:]
                if pred(text):
                    return text
                if self._eof or (self.proc and self.proc.poll() is not None):
                    raise GuestError(f"guest died while waiting for {what}\n{self._diag()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"timeout ({timeout}s) waiting for {what}\n{self._diag()}")
                self._cond.wait(min(left, 0.5))

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until /init has configured eth0 and the shell answers.
        Returns the boot time in seconds (also in ``self.boot_time``)."""
        if self.proc is None:
            self.launch()
        self._wait_for(lambda b: READY_MARKER + "\n" in b, timeout, "guest boot")
        self.run("true", timeout=max(5.0, timeout / 2))  # the shell reads its input
        self.boot_time = time.monotonic() - self._t_launch
        log.info("guest %s ready in %.2fs", self.name, self.boot_time)
        return self.boot_time

    # ------------------------------------------------------------------ console I/O

    def _write(self, data: bytes) -> None:
        try:
            if self._conn is not None:
                self._conn.sendall(data)
            else:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise GuestError(f"cannot write to the guest console: {exc}\n{self._diag()}") from exc

    def size_and_md5(self, path: str) -> Tuple[int, str]:
        """(bytes, md5 hex) of a file in the guest, for transfers checked end to end."""
        out, rc = self.run(f"echo size=$(stat -c %s {path}); md5sum {path}", timeout=60)
        # job-control chatter of the shell may interleave: match the lines
        size = re.search(r"^size=(\d+)$", out, re.M)
        md5 = re.search(rf"^([0-9a-f]{{32}})  {re.escape(path)}$", out, re.M)
        if rc != 0 or not size or not md5:
            raise GuestError(f"size and md5 of {path}: {out!r} (exit {rc})")
        return int(size.group(1)), md5.group(1)

    def use_queue_pairs(self, n: int, timeout: float = 60.0) -> None:
        """Use n queue pairs whatever the vCPU count (Linux's virtio-net
        uses min(vCPUs, queue pairs) by default): ``ethtool -L``, and every
        TX queue open to every vCPU (XPS), so flows spread over all of them
        by their hash."""
        self.run(f"ethtool -L eth0 combined {n}", timeout=timeout, check=True)
        self.run("m=$(printf %x $(( (1 << $(grep -c ^processor /proc/cpuinfo)) - 1 ))); "
                 "for q in /sys/class/net/eth0/queues/tx-*; do echo $m > $q/xps_cpus; done",
                 timeout=timeout, check=True)

    def run(self, cmd: str, timeout: float = 30.0, check: bool = False) -> Tuple[str, int]:
        """Run a shell command in the guest; return (output, exit status).

        The command runs in the console's shell (state such as ``cd`` persists).
        On timeout a Ctrl-C is sent and GuestError raised.
        """
        if not self.alive():
            raise GuestError(f"guest is not running\n{self._diag()}")
        with self._run_lock:
            n = next(self._seq)
            start_m, end_re = f"__VS{n}__\n", re.compile(rf"__VE{n}:(\d+)__\n")
            with self._cond:
                pos = len(self._buf)
            # The quotes split the markers in the echoed command line, so only
            # the shell's own output matches start_m / end_re. One input line
            # where the shell allows it: a second line typed while the command
            # runs is echoed into the middle of the command's output (seen on
            # a slow serial console: "booted?__\"" for "booted").
            if "\n" in cmd or "#" in cmd or cmd.rstrip().endswith(("&", ";")):
                line = f'echo "__VS""{n}__"; {cmd}\necho "__VE""{n}:$?__"\n'
            else:
                line = f'echo "__VS""{n}__"; {cmd}; echo "__VE""{n}:$?__"\n'
            self._write(line.encode())
            try:
                text = self._wait_for(lambda b: bool(end_re.search(b)), timeout, f"'{cmd}'", pos)
            except GuestError:
                if self.alive():
                    self._write(b"\x03\n")
                raise
            m = end_re.search(text)
            body = text[: m.start()]
            i = body.find(start_m)
            body = body[i + len(start_m):] if i >= 0 else body
            # drop the echoed second line (echo "__VE""n:$?__") and prompts
            lines = [ln for ln in body.split("\n")
                     if f'"__VE""{n}:' not in ln]
            out = "\n".join(lines)
            if out.endswith(PS1):
                out = out[: -len(PS1)]
            out = out.rstrip("\n")
            rc = int(m.group(1))
            if check and rc != 0:
                raise GuestError(f"'{cmd}' failed with status {rc}: {out}")
            return out, rc

    def ping(self, ip: str, count: int = 5, interval: float = 0.2, deadline: Optional[float] = None,
             size: Optional[int] = None) -> Dict[str, float]:
        """busybox ping; returns {transmitted, received, loss_pct, rc, output}."""
        deadline = deadline or max(5, int(count * interval + 5))
        opts = f"-c {count} -i {interval} -w {int(deadline)}" + (f" -s {size}" if size else "")
        out, rc = self.run(f"ping {opts} {ip}", timeout=deadline + 15)
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received, (\d+)% packet loss", out)
        if not m:
            return {"transmitted": 0, "received": 0, "loss_pct": 100.0, "rc": rc, "output": out}
        return {"transmitted": int(m.group(1)), "received": int(m.group(2)),
                "loss_pct": float(m.group(3)), "rc": rc, "output": out}

    # ------------------------------------------------------------------ QMP, migration

    def qmp(self, command: str, timeout: float = 30.0, **arguments):
        """One QMP command's return value (GuestError on an error reply)."""
        if not self.qmp_path:
            raise GuestError("this guest has no QMP socket (qmp=True)")
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path, timeout, alive=self.alive)
        return self._qmp.execute(command, timeout, **arguments)

    def migrate(self, uri: str, timeout: float = 300.0, poll: float = 0.2) -> Dict:
        """QMP ``migrate`` to ``uri`` (a destination started with
        ``incoming=uri``), then ``query-migrate`` until ``completed``; its
        last answer. GuestError if the migration fails or takes too long."""
        self.qmp("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise GuestError(f"migration {status}: {info.get('error-desc', info)}\n"
                                 f"{self._diag()}")
            if time.monotonic() > deadline:
                raise GuestError(f"migration not completed in {timeout}s: {info}")
            time.sleep(poll)

    # ------------------------------------------------------------------ termination

    def poweroff(self, timeout: float = 20.0) -> Optional[int]:
        """Power off from inside the guest (ACPI); kill QEMU if it does not exit."""
        if self.alive():
            try:
                self._write(b"sync; poweroff -f\n")
            except GuestError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("guest %s did not power off in %ss, killing", self.name, timeout)
        return self.close()

    def kill(self, sig: int = signal.SIGKILL) -> Optional[int]:
        """Send ``sig`` to QEMU (SIGKILL: crash test) and reap it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            return self.close()
        return None

    def close(self, timeout: float = 5.0) -> Optional[int]:
        """Terminate QEMU (SIGTERM, then SIGKILL), reap it, join the readers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.proc.wait(timeout=10)
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.qmp_path:
            try:
                os.unlink(self.qmp_path)
            except OSError:
                pass
        if self._conn is not None:
            self._conn.close()
        for t in self._threads:
            t.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        if self._serial_path:
            try:
                os.unlink(self._serial_path)
            except OSError:
                pass
        return self.proc.returncode


class Qmp:
    """A minimal QMP client (QEMU Machine Protocol: JSON lines on a unix
    socket): greeting, qmp_capabilities, then one command at a time;
    asynchronous events are skipped."""

    def __init__(self, path: str, timeout: float = 30.0, alive=lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or not alive():
                    raise GuestError(f"cannot connect to QMP at {path}")
                time.sleep(0.05)
        self.sock = s
        self._buf = b""
        self._read(timeout)                     # the greeting
        self.execute("qmp_capabilities", timeout)

    def _read(self, timeout: float) -> Dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError("QMP: no answer")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise GuestError("QMP: QEMU closed the socket")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, timeout: float = 30.0, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read(timeout)
            if "event" in reply:
                log.debug("QMP event %s", reply.get("event"))
                continue
            if "error" in reply:
                raise GuestError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
