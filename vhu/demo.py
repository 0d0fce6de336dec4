"""The main job on an embedded default: vhu's back-end moving frames for a built-in front-end.

Starts ``python -m vhu.master --app echo`` on a temporary socket, connects
vhu.frontend to it as QEMU or DPDK virtio-user would (memfd memory, split
rings, eventfds), and for a few seconds sends numbered frames that vhu
echoes back; each one is checked byte for byte. Live rates every second,
then the front-end's summary and vhu's own counters, which must agree.
Nothing else needs to be installed.

    python -m vhu.demo [--seconds 5] [--app echo|sink] [--pkt-size 64] [--queues 1]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from vhu.frontend import Frontend, FrontendError


def start_backend(sock, stats_file, app, queues, log):
    argv = [sys.executable, "-m", "vhu.master", "--socket", sock, "--app", app,
            "--queues", str(queues), "--workers", str(queues),
            "--stats-interval", "0.2", "--stats-file", stats_file, "--log-level", "WARNING"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_backend(proc)
            raise RuntimeError("vhu.master did not start")
        time.sleep(0.05)
    return proc


def stop_backend(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def backend_counts(stats_file, settle=0.6, timeout=5.0):
    """vhu's port counters once they stop moving (the worker writes them live)."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(stats_file) as f:
                port = json.load(f)["ports"][0]
            now = (port["rx_packets"], port["rx_bytes"], port["tx_packets"], port["tx_bytes"])
        except (OSError, ValueError, KeyError, IndexError):
            now = None
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and time.monotonic() - since >= settle:
            break
        time.sleep(0.1)
    return last


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vhu.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="how long frames move (default 5)")
    ap.add_argument("--app", choices=("echo", "sink"), default="echo",
                    help="echo: frames come back and are checked (default); sink: vhu drops them")
    ap.add_argument("--pkt-size", type=int, default=64, help="frame bytes (default 64)")
    ap.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    args = ap.parse_args(argv)
    if not args.seconds > 0:
        ap.error("--seconds must be positive")
    mode = "loop" if args.app == "echo" else "tx"
    tmp = tempfile.mkdtemp(prefix="vhu-demo-")
    sock, stats = os.path.join(tmp, "vhost.sock"), os.path.join(tmp, "stats.json")
    log = open(os.path.join(tmp, "vhu-master.log"), "w+")
    proc = None
    try:
        proc = start_backend(sock, stats, args.app, args.queues, log)
        print(f"vhu.master --app {args.app} serving {sock}; vhu.frontend connects "
              f"({args.queues} queue pair(s), {args.pkt_size}-byte frames, {mode} mode)")
        with Frontend(sock, queues=args.queues, pkt_size=args.pkt_size) as fe:
            print(f"negotiated features {fe.features:#x}, {fe.hdr_len}-byte virtio-net header, "
                  f"rings of {fe.ring_size}")
            result = fe.run(mode, duration=args.seconds, on_second=print)
        print(result.summary())
        counts = backend_counts(stats)
        ok = result.errors == 0 and result.tx_packets > 0
        if counts is None:
            print("vhu's stats file did not appear")
            ok = False
        else:
            rx, rx_bytes, tx, tx_bytes = counts
            print(f"vhu counted: received {rx} frames ({rx_bytes} bytes), sent {tx} frames "
                  f"({tx_bytes} bytes)")
            ok = ok and rx == result.tx_packets and tx == result.rx_packets
            print("counts agree" if ok else "counts DISAGREE")
        return 0 if ok else 1
    except (FrontendError, RuntimeError, OSError) as e:
        print(f"python -m vhu.demo: {e}", file=sys.stderr)
        log.seek(0)
        sys.stderr.write(log.read()[-2000:])
        return 1
    finally:
        if proc is not None:
            stop_backend(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
