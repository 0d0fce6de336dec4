"""The control socket: add and remove ports, and ask for state, while vhu runs.

    python -m vhu.master --socket a.sock [--control PATH]     # default a.sock.ctl
    python -m vhu.ctl --control a.sock.ctl show

A Unix stream socket (mode 0600) in the master's event loop. Requests and
replies are JSON lines, one reply per request:

    {"cmd": "add-port", "socket": PATH, "client": false, "queues": 2}
    {"cmd": "add-port", "tap": NAME}
    {"cmd": "add-port", "vxlan": "vni=42,local=IP,remote=IP[,remote=IP...][,port=4789]"}
    {"cmd": "del-port", "port": 1}            (an index, a socket path, a TAP name or
                                               vxlan:VNI@LOCAL:PORT)
    {"cmd": "show"}
    {"cmd": "stats"}  /  {"cmd": "stats", "port": 1}
    {"cmd": "set-log-level", "level": "DEBUG"}
    {"cmd": "mac-table"}

    -> {"ok": true, "result": ...}  or  {"ok": false, "error": "why"}

Who may ask: the peer's credentials (SO_PEERCRED) are checked on connect:
the uid that runs vhu, and root; anyone else is refused (one line saying
so, then the connection closes) and logged. The socket's mode keeps others
out already; the check holds if the mode is widened by hand.

Nothing here may hurt the data path or block the loop: a line longer than
MAX_LINE, or a client silent for IDLE_TIMEOUT, gets an error and is closed;
a malformed request gets an error reply and the connection goes on. The
commands are the control loop's own operations (vhu.control), which the
Forwarder's add_port/remove_port/ports also wrap.
"""
import asyncio
import json
import logging
import os
import socket
import struct

from vhu import vxlan
from vhu.portspecs import TapDevice, VhostUserPort
from vhu.ports import listen_unix, remove_socket_file

log = logging.getLogger("vhu.control")

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 10.0
REPLY_TIMEOUT = 5.0
MODE = 0o600


class RequestError(Exception):
    """A request that is not one (bad JSON, unknown command, bad argument)."""


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def spec_from(req):
    """A port spec from an add-port request."""
    if sum(k in req for k in ("socket", "tap", "vxlan")) != 1:
        raise RequestError("add-port takes one of socket, tap or vxlan")
    if "vxlan" in req:
        if not isinstance(req["vxlan"], str):
            raise RequestError("vxlan: a spec vni=N,local=IP,remote=IP[,...][,port=4789]")
        try:
            return vxlan.parse_spec(req["vxlan"])
        except vxlan.VxlanError as exc:
            raise RequestError(f"vxlan: {exc}") from None
    if "tap" in req:
        name = req["tap"]
        if not isinstance(name, str) or not 0 < len(name.encode()) < 16 or "/" in name:
            raise RequestError("tap: an interface name of 1..15 bytes")
        return TapDevice(name)
    path, client, queues = req["socket"], req.get("client", False), req.get("queues")
    if not isinstance(path, str) or not path:
        raise RequestError("socket: a path")
    if not isinstance(client, bool):
        raise RequestError("client: true or false")
    if queues is not None and (not isinstance(queues, int) or isinstance(queues, bool)):
        raise RequestError("queues: a number")
    return VhostUserPort(path, client=client, queues=queues)


class ControlServer:
    def __init__(self, control, path):
        self.control = control
        self.path = path
        self.server = None
        self.inode = None
        self.uid = os.getuid()
        self.clients = set()

    async def start(self):
        sock, self.inode = listen_unix(self.path, MODE)
        self.server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)
        log.info("control socket on %s", self.path)

    def close(self):
        if self.server is not None:
            self.server.close()
            for task in list(self.clients):
                task.cancel()
            remove_socket_file(self.path, self.inode)
            self.server = None

    async def _client(self, reader, writer):
        task = asyncio.current_task()
        self.clients.add(task)
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, _ = peer_credentials(sock)
            if uid not in (self.uid, 0):
                log.warning("control: refused pid %d, uid %d (only uid %d and root may control "
                            "vhu)", pid, uid, self.uid)
                await self._reply(writer, {"ok": False, "error": f"uid {uid} may not control "
                                           f"this vhu (uid {self.uid})"})
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    await self._reply(writer, {"ok": False, "error": f"no request for "
                                               f"{IDLE_TIMEOUT:g} s; closing"})
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error": f"request longer than "
                                               f"{MAX_LINE} bytes; closing"})
                    return
                if not line:
                    return
                await self._reply(writer, await self._answer(line))
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control: a request failed")
        finally:
            self.clients.discard(task)
            writer.close()

    @staticmethod
    async def _reply(writer, doc):
        writer.write(json.dumps(doc).encode() + b"\n")
        await asyncio.wait_for(writer.drain(), REPLY_TIMEOUT)

    async def _answer(self, line):
        try:
            try:
                req = json.loads(line)
            except ValueError as exc:
                raise RequestError(f"not JSON: {exc}") from None
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise RequestError('a request is an object with a "cmd"')
            handler = COMMANDS.get(req["cmd"])
            if handler is None:
                raise RequestError(f"unknown command {req['cmd']!r} (have {', '.join(COMMANDS)})")
            return {"ok": True, "result": await handler(self.control, req)}
        except (RequestError, KeyError) as exc:
            return {"ok": False, "error": str(exc) if not isinstance(exc, KeyError)
                    else f"missing {exc}"}
        except Exception as exc:           # ControlError and its kin: said, not raised
            return {"ok": False, "error": str(exc) or type(exc).__name__}


async def _add_port(control, req):
    return await control.add_port(spec_from(req))


async def _del_port(control, req):
    ref = req["port"]
    if not isinstance(ref, (int, str)) or isinstance(ref, bool):
        raise RequestError("port: an index, a socket path or a TAP name")
    return await control.remove_port(ref)


async def _show(control, req):
    return control.describe()


async def _stats(control, req):
    if req.get("port") is None:
        return control.port_stats()
    return control.port_stats(only=control.find_port(req["port"]).index)


async def _set_log_level(control, req):
    return control.set_log_level(req["level"])


async def _mac_table(control, req):
    return await control.mac_table()


COMMANDS = {"add-port": _add_port, "del-port": _del_port, "show": _show, "stats": _stats,
            "set-log-level": _set_log_level, "mac-table": _mac_table}
