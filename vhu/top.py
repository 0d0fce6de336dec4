"""python -m vhu.stats --top: a live full-screen table of a master's ports
and queues, redrawn every interval, over its --stats-file; q quits.

One row per port and queue pair: whether a front-end is connected, Mpps and
Gbit/s each way (vhu's directions, as in vhu.stats: RX is what vhu took from
the front-end), drops by reason and broken-ring events since the master
started (red when they grew in the last interval), the worker that polls the
queue pair; a total row; rows sorted by packet rate, the busiest first. Fits
80x24: columns are abbreviated (legend in the last line) and the quietest
rows give way to a "... more" row when the screen is short.

Only the JSON document is read, never shared memory or /proc, so a stats
file copied (or kept in sync) from another machine works as well: rates come
from the documents' own timestamps, not from this machine's clock. The rate
arithmetic is vhu.stats.rates, the one the plain line output uses.
"""
import os
import select
import sys
import termios
import time
import tty
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from vhu.stats import DROP_REASONS, rates, read_json

# Column abbreviations of the drop reasons (vhu.stats.DROP_REASONS), so two fit
# in an 80-column row; the legend line spells out those a name cannot say.
DROP_ABBREV = {"rx_no_room": "room", "rx_too_big": "big", "tx_short": "short",
               "filtered": "filt", "no_port": "nport", "stage": "stage",
               "stage_error": "serr", "tx_too_big": "over", "bad_offload": "boff",
               "vxlan_bad": "vbad", "vxlan_foreign": "vfor", "vxlan_too_big": "vbig"}
assert DROP_ABBREV.keys() == DROP_REASONS.keys(), "a drop reason without an abbreviation"
LEGEND = ("q quits · w=worker · room=no RX buffer big=too big short=runt serr=stage error "
          "over=over 64 KiB boff=bad offload header")
FIXED_LINES = 6        # title, header and its rule, the rule above the total, total, legend


@dataclass
class Row:
    """One port and queue pair (queue None: a port that lists no queues)."""
    port: object
    socket: str
    queue: object
    worker: object
    connected: bool
    rate: dict = None            # vhu.stats.rates; None until there are two samples
    drops: dict = field(default_factory=dict)    # reason -> count since start (non-zero)
    broken: dict = field(default_factory=dict)   # reason -> events since start
    drops_grew: bool = False
    broken_grew: bool = False

    @property
    def pps(self):
        return self.rate["rx_pps"] + self.rate["tx_pps"] if self.rate else 0.0

    @property
    def bps(self):
        return self.rate["rx_bps"] + self.rate["tx_bps"] if self.rate else 0.0


def _grew(now, before):
    return any(v > (before or {}).get(k, 0) for k, v in now.items())


def rows(now, before=None):
    """The table's rows from two stats documents (vhu.stats.write_json), the
    busiest first. before None (or taken at the same time): no rates yet.
    Queues are matched by port and queue number, not by position."""
    dt = now["time"] - before["time"] if before else 0
    seen = {}
    if before and dt > 0:
        for p in before["ports"]:
            for q in p["queues"]:
                seen[(p["port"], q["queue"])] = q
    out = []
    for p in now["ports"]:
        sock = os.path.basename(p["socket"]) or p["socket"]
        if not p["queues"]:
            out.append(Row(p["port"], sock, None, None, p["connected"]))
            continue
        for q in p["queues"]:
            prev = seen.get((p["port"], q["queue"]))
            drops = {k: v for k, v in q["drops"].items() if v}
            out.append(Row(p["port"], sock, q["queue"], q.get("worker"), p["connected"],
                           rate=rates(q, prev, dt) if prev else None,
                           drops=drops, broken=dict(q["broken"]),
                           drops_grew=bool(prev) and _grew(drops, prev["drops"]),
                           broken_grew=bool(prev) and _grew(q["broken"], prev["broken"])))
    out.sort(key=lambda r: (-r.pps, -r.bps, r.port, -1 if r.queue is None else r.queue))
    return out


def total(rs):
    """The sum of the rows: rates (None if no row has one yet), drops, broken."""
    t = Row("total", "", None, None, any(r.connected for r in rs))
    rated = [r.rate for r in rs if r.rate]
    if rated:
        t.rate = {k: sum(r[k] for r in rated) for k in rated[0]}
    for r in rs:
        for k, v in r.drops.items():
            t.drops[k] = t.drops.get(k, 0) + v
        for k, v in r.broken.items():
            t.broken[k] = t.broken.get(k, 0) + v
        t.drops_grew |= r.drops_grew
        t.broken_grew |= r.broken_grew
    return t


def count(n):
    """1234 -> '1.2k': counters in a few characters."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _rate_cells(r):
    if not r.rate:
        return ["-"] * 4
    x = r.rate
    return [f"{x['rx_pps'] / 1e6:.2f}", f"{x['rx_bps'] / 1e9:.2f}",
            f"{x['tx_pps'] / 1e6:.2f}", f"{x['tx_bps'] / 1e9:.2f}"]


def _events(counts, names, grew):
    """'2.5k room,5 filt': the largest first, so the column's start says most."""
    ordered = sorted(((v, k) for k, v in counts.items() if v), reverse=True)
    text = ",".join(f"{count(v)} {names.get(k, k)}" for v, k in ordered)
    return Text(text or "0", style="bold red" if grew else ("red" if text else ""))


def _cells(r):
    if r.port == "total":
        where, q, w, state = "total", "", "", ""
    else:
        where = f"{r.port} {r.socket}"
        q = "-" if r.queue is None else str(r.queue)
        w = "-" if r.worker is None else str(r.worker)
        state = Text("up", style="green") if r.connected else Text("down", style="yellow")
    return [where, q, w, state, *_rate_cells(r), _events(r.drops, DROP_ABBREV, r.drops_grew),
            _events(r.broken, {}, r.broken_grew)]


def render(now, before=None, *, width=80, height=24, source="", note=""):
    """The screen: a title line, the table (rows that do not fit in height give
    way to one '... more' row), the total row and the legend line."""
    rs = rows(now, before)
    room = max(height - FIXED_LINES, 1)
    shown = rs if len(rs) <= room else rs[:room - 1]
    up = sum(1 for p in now["ports"] if p["connected"])
    stamp = time.strftime("%H:%M:%S", time.localtime(now["time"]))
    dt = f" Δ{now['time'] - before['time']:.1f}s" if before else " (rates after the next sample)"
    title = Text(f"vhu top  {stamp}{dt}  ports up {up}/{len(now['ports'])}"
                 f"{'  ' + note if note else ''}  {source}", no_wrap=True, overflow="ellipsis")
    table = Table(box=box.HORIZONTALS, padding=0, pad_edge=False,
                  show_edge=False, header_style="bold", expand=True, width=width)
    # 48 columns of fixed width and 9 one-space gaps: drops and broken share the rest.
    table.add_column("port", no_wrap=True, overflow="ellipsis", min_width=6, max_width=13)
    table.add_column("q", justify="right", no_wrap=True, min_width=2)
    table.add_column("w", justify="right", no_wrap=True, min_width=1)
    table.add_column("link", no_wrap=True, width=4)
    for head in ("RX Mpps", "RX Gb/s", "TX Mpps", "TX Gb/s"):
        table.add_column(head, justify="right", no_wrap=True, width=7)
    table.add_column("drops", no_wrap=True, overflow="ellipsis", min_width=6, ratio=1)
    table.add_column("broken", no_wrap=True, overflow="ellipsis", min_width=6, ratio=1)
    for r in shown:
        table.add_row(*_cells(r))
    if len(shown) < len(rs):
        table.add_row(f"... {len(rs) - len(shown)} more", *[""] * 9, style="dim")
    table.add_section()
    table.add_row(*_cells(total(rs)), style="bold")
    legend = Text(LEGEND, style="dim", no_wrap=True, overflow="ellipsis")
    return Group(title, table, legend)


def read_document(path):
    """read_json, and a ValueError unless it has the stats document's shape."""
    doc = read_json(path)
    if not (isinstance(doc, dict) and isinstance(doc.get("time"), (int, float))
            and isinstance(doc.get("ports"), list)
            and all(isinstance(p, dict) and isinstance(p.get("queues"), list) for p in doc["ports"])):
        raise ValueError("not a vhu stats document (time, ports, queues)")
    return doc


class Follower:
    """The last two distinct documents of a stats file (distinct: another
    'time'), re-read on each poll; a failed read keeps what was there."""

    def __init__(self, path):
        self.path = path
        self.now = read_document(path)      # the first read must work: raises OSError/ValueError
        self.before = None
        self.changed = time.monotonic()
        self.error = ""

    def poll(self):
        try:
            doc = read_document(self.path)
        except (OSError, ValueError) as exc:
            self.error = f"read failed: {exc}"
            return
        self.error = ""
        if doc["time"] != self.now["time"]:
            self.before, self.now = self.now, doc
            self.changed = time.monotonic()

    def note(self, interval):
        """What the title should warn about: a read error, or a file not rewritten lately."""
        idle = time.monotonic() - self.changed
        if self.error:
            return self.error
        return f"not updated for {idle:.0f}s" if idle > 3 * interval + 1 else ""


@contextmanager
def keys(stream):
    """A function reading one key within a timeout (None if none came): the
    terminal in cbreak mode (no Enter needed, Ctrl-C still works) while in use."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):    # None, closed, or not a file
        fd = None
    saved = termios.tcgetattr(fd) if fd is not None and os.isatty(fd) else None
    if saved is not None:
        tty.setcbreak(fd)
    eof = fd is None

    def read(timeout):
        nonlocal eof
        if eof:
            time.sleep(timeout)
            return None
        if not select.select([fd], [], [], timeout)[0]:
            return None
        data = os.read(fd, 32)
        if not data:
            eof = True
            return None
        return data.decode(errors="replace")
    try:
        yield read
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(path, interval=1.0):
    """Run the view until q (or Ctrl-C); 1 if the stats file cannot be read at all."""
    from rich.console import Console
    from rich.live import Live
    try:
        follow = Follower(path)
    except (OSError, ValueError) as exc:
        print(f"vhu.stats: {path}: {exc}", file=sys.stderr)
        return 1
    console = Console()
    try:
        with keys(sys.stdin) as read_key, Live(console=console, screen=True,
                                               auto_refresh=False) as live:
            while True:
                live.update(render(follow.now, follow.before, width=console.size.width,
                                   height=console.size.height,
                                   source=path, note=follow.note(interval)), refresh=True)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    key = read_key(left)
                    if key and "q" in key.lower():
                        return 0
                follow.poll()
    except KeyboardInterrupt:
        return 0
