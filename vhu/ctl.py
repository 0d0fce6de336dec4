"""python -m vhu.ctl: control a running vhu.master through its control socket.

    python -m vhu.ctl --control PATH [--json] COMMAND ...

    add-port --socket PATH [--client] [--queues N]
    add-port --tap NAME
    add-port --vxlan vni=N,local=IP,remote=IP[,remote=IP...][,port=4789]
    del-port PORT|PATH          a port index, a socket path, a TAP name or vxlan:VNI@IP:PORT
    show                        ports, connections, features, queues and workers
    stats [PORT]                the counters, as in the stats JSON
    set-log-level LEVEL         DEBUG, INFO, WARNING or ERROR
    mac-table                   the switch's stations: MAC, port, age

Human output by default, the reply's JSON with --json. Exit status 0 when
vhu did it, 1 when it refused (the reason on stderr) or cannot be reached,
2 for bad arguments. The wire protocol: vhu.controlsock.
"""
import argparse
import json
import socket
import sys

TIMEOUT = 30.0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"vhu.ctl: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser():
    p = _Parser(prog="python -m vhu.ctl", description="control a running vhu.master")
    p.add_argument("--control", required=True, metavar="PATH",
                   help="the master's control socket (vhu.master --control; default "
                        "<first socket>.ctl)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add = sub.add_parser("add-port", help="add a port")
    kind = add.add_mutually_exclusive_group(required=True)
    kind.add_argument("--socket", metavar="PATH")
    kind.add_argument("--tap", metavar="NAME")
    kind.add_argument("--vxlan", metavar="vni=N,local=IP,remote=IP[,remote=IP...][,port=4789]")
    add.add_argument("--client", action="store_true",
                     help="connect to a listening front-end (QEMU server=on)")
    add.add_argument("--queues", type=int, metavar="N", help="the most queue pairs it offers")
    rm = sub.add_parser("del-port", help="remove a port")
    rm.add_argument("port", metavar="PORT|PATH")
    sub.add_parser("show", help="ports, connection state, features, queues and workers")
    st = sub.add_parser("stats", help="counters")
    st.add_argument("port", nargs="?", metavar="PORT|PATH")
    lv = sub.add_parser("set-log-level", help="the master's and workers' log level")
    lv.add_argument("level", metavar="LEVEL")
    sub.add_parser("mac-table", help="the switch's MAC table")
    return p


def request_of(a):
    if a.command == "add-port":
        if a.vxlan is not None:
            if a.client or a.queues is not None:
                raise SystemExit(_usage("--client and --queues are for --socket ports"))
            return {"cmd": "add-port", "vxlan": a.vxlan}
        if a.tap is not None:
            if a.client or a.queues is not None:
                raise SystemExit(_usage("--client and --queues are for --socket ports"))
            return {"cmd": "add-port", "tap": a.tap}
        req = {"cmd": "add-port", "socket": a.socket, "client": a.client}
        if a.queues is not None:
            req["queues"] = a.queues
        return req
    if a.command == "del-port":
        return {"cmd": "del-port", "port": a.port}
    if a.command == "stats":
        return {"cmd": "stats", "port": a.port}
    if a.command == "set-log-level":
        return {"cmd": "set-log-level", "level": a.level}
    return {"cmd": a.command}


def _usage(message):
    print(f"vhu.ctl: error: {message}", file=sys.stderr)
    return 2


def ask(path, request, timeout=TIMEOUT):
    """Send one request, return the reply document (raises OSError, ValueError)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass                      # refused on connect: its reason is already there
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                more = s.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            buf += more
    if not buf:
        raise ValueError("vhu closed the connection without a reply")
    return json.loads(buf)


# -- human output -----------------------------------------------------------------


def _queue_text(q):
    """q0:w1 (worker 1 polls queue pair 0), q0:w1 rx<w1,w0 (its RX ring is
    written by workers 1 and 0, under its lock), q0:w- (not up yet)."""
    text = f"q{q['queue']}:w{'-' if q['worker'] is None else q['worker']}"
    writers = q.get("rx_writers") or []
    if len(writers) > 1:
        text += " rx<" + ",".join(f"w{w}" for w in writers)
    return text


def _port_line(p):
    where = p["socket"]
    state = "up" if p["connected"] else "down"
    if p["kind"] == "tap":
        return f"port {p['port']}  tap {where[len('tap:'):]}  {state}"
    if p["kind"] == "vxlan":
        v = p["vxlan"]
        return (f"port {p['port']}  {where}  {state}  remotes {' '.join(v['remotes'])}  "
                f"underlay MTU {v['underlay_mtu']} (inner frames up to {v['max_inner_frame']})")
    feats = f"  features {p['features']} protocol {p['protocol_features']}" if p["features"] else ""
    queues = ", ".join(_queue_text(q) for q in p["queue_pairs"])
    return (f"port {p['port']}  {p['mode']} {where}  {state}  queues {p['queues']} offered "
            f"[{queues}]{feats}")


def human(command, result):
    if command in ("add-port", "del-port"):
        verb = "added" if command == "add-port" else "removed"
        return f"{verb}: {_port_line(result)}"
    if command == "show":
        workers = " ".join(f"w{w['index']}=pid {w['pid']}" + (f" (replaced {w['replaced']}x)"
                                                               if w["replaced"] else "")
                           + (f" busy {w['busy']:.0%}" if w.get("busy") is not None else "")
                           for w in result["workers"])
        lines = [f"app {result['app']}, poll {result['poll']}, {result['queues_offered']} queue "
                 f"pairs offered per port; workers: {workers}"]
        return "\n".join(lines + [_port_line(p) for p in result["ports"]])
    if command == "stats":
        out = []
        for p in result:
            drops = ", ".join(f"{k}={v}" for k, v in p["drops_by_reason"].items() if v) or "none"
            broken = ", ".join(f"{k}={v}" for k, v in p["broken"].items()) or "none"
            out.append(f"port {p['port']} {p['socket']} {'up' if p['connected'] else 'down'}: "
                       f"rx {p['rx_packets']} pkts {p['rx_bytes']} bytes, tx {p['tx_packets']} "
                       f"pkts {p['tx_bytes']} bytes; drops {drops}; broken {broken}")
            for r in p.get("vxlan", {}).get("remotes", []):
                out.append(f"  remote {r['remote']}: rx {r['rx_packets']} pkts {r['rx_bytes']} "
                           f"bytes, tx {r['tx_packets']} pkts {r['tx_bytes']} bytes, "
                           f"{r['macs']} MACs learned, rx_bad {r['rx_bad']}, "
                           f"tx_errors {r['tx_errors']}")
        return "\n".join(out) or "no ports"
    if command == "set-log-level":
        return f"log level {result}"
    if command == "mac-table":
        rows = [f"{r['mac']}  port {r['port']}  age {r['age']:.1f} s" +
                (f"  remote {r['remote']}" if r.get("remote") else "") for r in result]
        return "\n".join(rows) or "no stations learned"
    return json.dumps(result, indent=1)


def main(argv=None):
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        request = request_of(a)
    except SystemExit as exc:
        return exc.code
    try:
        reply = ask(a.control, request)
    except (OSError, ValueError) as exc:
        print(f"vhu.ctl: {a.control}: {exc}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(reply, indent=1))
    if not reply.get("ok"):
        if not a.json:
            print(f"vhu.ctl: {reply.get('error', 'refused')}", file=sys.stderr)
        return 1
    if not a.json:
        print(human(a.command, reply["result"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
