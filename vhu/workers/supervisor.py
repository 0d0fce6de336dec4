"""Workers, supervised: spawned, commanded with deadlines, watched, replaced.

Erlang's one_for_one, for vhu's data path. The master keeps the desired
state of every worker (which rings it runs, with which memory and fds: the
ports own it, see vhu.ports) and this pool only carries commands:

* Commands are queued per worker and sent as packets (vhu.workers.channel),
  one packet in flight at a time: while a worker is busy with one, later
  commands wait and coalesce (a ring updated twice is sent once), so a
  front-end that toggles a ring 10 000 times costs the worker a handful of
  returns from its loop, not 10 000. Every packet carries a sequence number
  and its reply is matched to it alone; a reply to a packet the pool gave up
  on is dropped, never taken for a later one's.
* Nothing here blocks the event loop: sockets are non-blocking, and a worker
  that leaves a packet unanswered for WORKER_DEADLINE, or whose heartbeat
  (bumped by its engine about every millisecond, vhu.stats.WorkerSlot)
  stands still that long, is presumed hung.
* A worker that dies (any signal, any exit) or hangs is killed and replaced
  at once by a spare that is already started, and the ports replay into it
  the state it should have: memory tables, and every ring it ran, resumed
  where the dead worker's last published batch left it (the positions live
  in shared memory). The guests see a pause, not a disconnect; the other
  workers never stop. Commands the dead worker had not answered are settled
  with REPLACED: their effect is part of the replayed state.
* If the fault guard (vhu.workers._guard) recorded that guest memory killed
  the worker, on_fault(port, ...) is told first, so that port is cut off
  before the replacement is given anything: one hostile port cannot put
  the others into a crash loop.
"""
import asyncio
import collections
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from vhu.workers import channel, shared
from vhu.workers.process import worker_main

log = logging.getLogger(__name__)

# A packet unanswered, or a heartbeat unchanged, this long: the worker is hung
# (a running engine beats about every millisecond; detection and replacement
# together stay within a second). Unless it is merely starved of CPU (it is
# runnable and got little of it): then it has until STARVED_DEADLINE.
WORKER_DEADLINE = 0.5
STARVED_DEADLINE = 5.0
# A new worker's first answer may take this long (a spawned interpreter imports
# numpy and vhu; on a loaded host that can take seconds).
START_DEADLINE = 30.0
WATCH_INTERVAL = 0.05
STOP_TIMEOUT = 5.0
# A packet leaves at most this soon after the worker's previous one, unless
# someone waits for it (hurry()): a front-end chatting as fast as it can
# costs a worker at most 1 / PACKET_INTERVAL returns from its loop a second.
PACKET_INTERVAL = 0.010


class WorkerError(RuntimeError):
    """A worker refused or failed a command (the message says why)."""


class _Replaced:
    """The answer of a command whose worker was replaced before it answered."""

    def __repr__(self):
        return "REPLACED"


REPLACED = _Replaced()


@dataclass(eq=False)
class _Command:
    name: str
    args: tuple
    fds: list
    future: asyncio.Future
    key: object = None           # coalescing key: a later command with the same key replaces it
    adjacent: bool = False       # ... only if nothing else was queued after it
    port: object = None          # the port it is for (its failure disconnects that port)
    followers: list = field(default_factory=list)   # futures of commands this one replaced


class WorkerHandle:
    """One worker process and the master's end of its channel."""

    def __init__(self, ctx, config, stats_fd, macs_fd=-1):
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stats_parent, stats_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = ctx.Process(target=worker_main, name="vhu-worker",
                                   args=(child, config, stats_child), daemon=True)
        try:
            self.process.start()
        finally:
            child.close()
            stats_child.close()
        try:
            # The stats memory, then the shared MAC table (the switch only).
            socket.send_fds(stats_parent, [b"stats"],
                            [fd for fd in (stats_fd, macs_fd) if fd >= 0] if stats_fd >= 0 else [])
        finally:
            stats_parent.close()
            for fd in (stats_fd, macs_fd):
                if fd >= 0:
                    os.close(fd)              # the worker has its own copy now
        self.sock.setblocking(False)
        self.index = None
        self.lock_word = None               # what its RX-ring locks record (shared.holder_word)
        self.pid = self.process.pid
        self.queue = collections.deque()    # commands not sent yet
        self.inflight = None                # (seq, [commands], deadline)
        self.answered = False               # has answered a packet (imports done)
        self.beat = None                    # last heartbeat seen, and when it last moved
        self.beat_at = 0.0
        self.cpu_at_beat = 0.0              # the worker's CPU time then
        self.dead = False
        self.writing = False
        self.pump_at = None                 # a timer that will send the next packet
        self.urgent = False                 # someone waits for what is queued (hurry)
        self.packets = 0                    # packets sent to this worker
        self.last_sent = 0.0                # loop time of the last packet sent

    def kill(self):
        if self.process.exitcode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class WorkerPool:
    """config: the worker configuration dict (vhu.workers.process); cpus:
    the CPU of each worker index or (); stats: vhu.stats.StatsMemory;
    replay(index) -> [(name, args, fds, port)]: what worker `index` must be
    told to take over its rings; on_fault(port, signal, address): guest
    memory of `port` killed a worker; on_error(port, name, message): a
    command for `port` failed."""

    def __init__(self, count, config, stats, *, cpus=(), replay, on_fault, on_error,
                 macs=None):
        self.count = count
        self.macs = macs                 # vhu.workers.shared.MacMemory, or None
        self.config = config
        self.stats = stats
        self.cpus = tuple(cpus)
        self.replay = replay
        self.on_fault = on_fault
        self.on_error = on_error
        self.ctx = multiprocessing.get_context("spawn")
        self.workers = []
        self.spare = None
        self.replacements = 0            # in all
        self.replaced = [0] * count      # per worker index
        self.packets = 0                 # packets sent (commands coalesce into few)
        self.loop = None
        self._seq = 0
        self._watcher = None
        self._closing = False
        self._reaping = set()

    # -- life cycle -----------------------------------------------------------

    def start(self):
        """Spawn the workers and a spare (call inside the running loop)."""
        self.loop = asyncio.get_running_loop()
        for index in range(self.count):
            h = self._spawn()
            self.workers.append(h)
            self._assign(h, index)
        self.spare = self._spawn()
        self._watcher = self.loop.create_task(self._watch(), name="vhu-worker-watch")
        started = [self._ping(h) for h in self.workers + [self.spare]]

        def all_ready(_):
            if all(f.done() and not f.cancelled() and f.exception() is None
                   and f.result() is not REPLACED for f in started):
                log.info("%d worker(s) and a spare ready (pids %s)", self.count,
                         " ".join(str(h.pid) for h in self.workers + [self.spare]))
        gather = asyncio.gather(*started, return_exceptions=True)
        gather.add_done_callback(all_ready)

    def _spawn(self):
        h = WorkerHandle(self.ctx, self.config, self.stats.dup_fd(),
                         self.macs.dup_fd() if self.macs is not None else -1)
        self.loop.add_reader(h.sock.fileno(), self._on_readable, h)
        self.loop.add_reader(h.process.sentinel, self._on_exit, h)
        return h

    def _ping(self, h):
        fut = self.loop.create_future()
        self._queue(h, _Command("ping", (), [], fut), urgent=True)
        return fut

    def _assign(self, h, index, replacing=False):
        h.index = index
        # The word its RX-ring locks record: this worker index and how many
        # times it was replaced, so a dead worker's locks are never mistaken
        # for its replacement's (released when it is reaped, _finish_reap).
        h.lock_word = shared.holder_word(index, self.replaced[index])
        self.stats.clear_slot(index)
        cpu = self.cpus[index % len(self.cpus)] if self.cpus else None
        fut = self.loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() or log.debug(
            "worker %d ready (pid %s)", index, f.result()))
        self._queue(h, _Command("assign", (index, cpu, replacing, self.replaced[index]), [], fut),
                    urgent=True)

    async def close(self):
        """Ask every worker to quit, wait for them (then kill), release everything."""
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
        handles = [h for h in self.workers + [self.spare] if h is not None and not h.dead]
        for h in handles:
            self._queue(h, _Command("quit", (), [], self.loop.create_future()), urgent=True)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and not all(h.dead for h in handles):
            await asyncio.sleep(0.02)         # each exit is seen by _on_exit
        for h in handles:
            if not h.dead:
                h.kill()
                self._release(h)
        for h in list(self._reaping):
            h.process.join(STOP_TIMEOUT)
            if h.process.exitcode is not None:
                self._reaping.discard(h)
                h.process.close()

    def pids(self):
        return [h.pid for h in self.workers]

    # -- commands ---------------------------------------------------------------

    def submit(self, index, name, *args, fds=(), key=None, adjacent=False, port=None):
        """Queue a command for worker `index`; its future (the reply value,
        REPLACED, or WorkerError). The fds are the pool's now: closed once
        sent (the worker has its own copies) or dropped. key: a later
        command with the same key replaces this one while it waits (anywhere
        in the queue, or with adjacent=True only right behind it)."""
        cmd = _Command(name, args, list(fds), self.loop.create_future(), key, adjacent, port)
        self._queue(self.workers[index], cmd)
        return cmd.future

    def _queue(self, h, cmd, urgent=False):
        if h.dead:
            self._settle(cmd, REPLACED)
            return
        if cmd.key is not None:
            candidates = (list(enumerate(h.queue))[-1:] if cmd.adjacent
                          else enumerate(h.queue))
            for i, old in candidates:
                if old.key == cmd.key:
                    # Coalesce: the later state wins; the earlier command's
                    # waiters get the later one's answer.
                    del h.queue[i]
                    channel.close_all(old.fds)
                    cmd.followers += [old.future] + old.followers
                    break
        h.queue.append(cmd)
        self._schedule(h, urgent)

    def _schedule(self, h, urgent=False):
        """Send the queue later, not now: what is queued meanwhile (a burst
        of messages, a front-end toggling a ring as fast as it can) leaves
        in the same packet. Urgent: as soon as the current callback is done
        (and, if a packet is in flight, as soon as its reply is in)."""
        h.urgent = h.urgent or urgent
        urgent = h.urgent
        when = self.loop.time() if urgent else max(self.loop.time(),
                                                   h.last_sent + PACKET_INTERVAL)
        if h.pump_at is not None:
            if h.pump_at.when() <= when:
                return
            h.pump_at.cancel()
        h.pump_at = self.loop.call_at(when, self._pump_due, h)

    def _pump_due(self, h):
        h.pump_at = None
        self._pump(h)

    def hurry(self):
        """Someone waits for what is queued (a reply to a front-end, a ring to
        stop): send it now."""
        for h in self.workers:
            if h.queue and not h.dead:
                self._schedule(h, urgent=True)

    def _pump(self, h):
        """Send the next packet if none is in flight."""
        if h.dead or h.inflight is not None or not h.queue or h.writing:
            return
        batch, fds, size = [], [], 0
        while h.queue:
            cmd = h.queue[0]
            if batch and (len(fds) + len(cmd.fds) > channel.MAX_PACKET_FDS
                          or size > channel.MAX_PACKET // 2):
                break
            h.queue.popleft()
            batch.append(cmd)
            fds += cmd.fds
            size += 256 + sum(len(a) for a in cmd.args if isinstance(a, (bytes, bytearray)))
        self._seq += 1
        data = channel.encode(self._seq, [(c.name, c.args, len(c.fds)) for c in batch])
        try:
            channel.send(h.sock, data, fds)
        except BlockingIOError:
            # The worker is not reading: wait for room (the deadline still runs).
            h.queue.extendleft(reversed(batch))
            h.writing = True
            self.loop.add_writer(h.sock.fileno(), self._on_writable, h)
            self._start_deadline(h, None)
            return
        except OSError as exc:
            h.queue.extendleft(reversed(batch))
            self._replace(h, f"channel send failed: {exc}")
            return
        self.packets += 1
        h.packets += 1
        h.last_sent = self.loop.time()
        h.urgent = bool(h.queue) and h.urgent     # what did not fit stays urgent
        for c in batch:
            channel.close_all(c.fds)
            c.fds = []
        deadline = time.monotonic() + (WORKER_DEADLINE if h.answered else START_DEADLINE)
        h.inflight = (self._seq, batch, deadline)

    def _start_deadline(self, h, _):
        if h.inflight is None:
            h.inflight = (None, [], time.monotonic() +
                          (WORKER_DEADLINE if h.answered else START_DEADLINE))

    def _on_writable(self, h):
        self.loop.remove_writer(h.sock.fileno())
        h.writing = False
        if h.inflight is not None and h.inflight[0] is None:
            h.inflight = None
        self._schedule(h, urgent=True)

    def _on_readable(self, h):
        while not h.dead:
            try:
                (seq, results), fds = channel.recv(h.sock)
            except BlockingIOError:
                return
            except (channel.ChannelClosed, OSError, ValueError) as exc:
                self._replace(h, f"channel closed ({exc or 'EOF'})")
                return
            channel.close_all(fds)
            if h.inflight is None or seq != h.inflight[0]:
                log.warning("worker %s: dropped a reply to packet %s (expected %s)",
                            h.index, seq, h.inflight[0] if h.inflight else None)
                continue
            _, batch, _ = h.inflight
            h.inflight = None
            h.answered = True
            for cmd, (status, value) in zip(batch, results):
                if status == channel.OK:
                    self._settle(cmd, value)
                else:
                    self._fail(cmd, value)
            if h.queue:
                self._schedule(h)

    def _settle(self, cmd, value):
        for fut in [cmd.future] + cmd.followers:
            if not fut.done():
                fut.set_result(value)

    def _fail(self, cmd, message):
        err = WorkerError(f"{cmd.name}: {message}")
        for fut in [cmd.future] + cmd.followers:
            if not fut.done():
                fut.set_exception(err)
                fut.exception()          # retrieved: nobody need await a fire-and-forget command
        if cmd.port is not None and not self._closing:
            self.on_error(cmd.port, cmd.name, message)

    # -- watching and replacing ----------------------------------------------------

    def _on_exit(self, h):
        if h.dead:
            return
        if self._closing:
            self._release(h)
            return
        if h is self.spare:
            self._release(h)
            self.spare = None if self._closing else self._spawn()
            log.warning("spare worker (pid %d) exited (code %s); started another",
                        h.pid, h.process.exitcode)
            return
        self._replace(h, f"exited ({_exit_text(h.process.exitcode)})")

    async def _watch(self):
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            for h in list(self.workers):
                if h.dead:
                    continue
                if h.answered:
                    beat = self.stats.heartbeat(h.index)
                    if beat != h.beat:
                        h.beat, h.beat_at = beat, now
                        h.cpu_at_beat = _proc_state(h.pid)[1]
                    elif self._hung(h, h.beat_at, now):
                        self._replace(h, f"heartbeat stopped {now - h.beat_at:.1f} s ago")
                        continue
                if h.inflight is not None and now > h.inflight[2]:
                    waited = now - h.inflight[2] + WORKER_DEADLINE
                    if not h.answered or self._hung(h, now - waited, now):
                        self._replace(h, f"no answer for {waited:.1f} s")

    def _hung(self, h, since, now):
        """Nothing from h since `since`: is it hung, or only starved of CPU?"""
        still = now - since
        if still <= WORKER_DEADLINE:
            return False
        state, cpu = _proc_state(h.pid)
        if state is None or state in "TtDZXS":
            # Stopped, dead, or asleep in some call it never returns from (a
            # working engine's sleeps end within 0.1 s, and it beats then).
            return True
        spun = cpu - h.cpu_at_beat >= 0.5 * still          # running, but not beating
        return spun or still > STARVED_DEADLINE

    def _replace(self, h, reason):
        """h is dead or presumed hung: kill it, promote the spare, tell the
        faulting port (if any), replay the rest into the new worker."""
        if h.dead or self._closing:
            return
        index = h.index
        fault = self.stats.fault(index)
        h.kill()
        self._release(h)
        self.replacements += 1
        self.replaced[index] += 1
        if fault is not None:
            sig, addr, port = fault
            reason = (f"killed by {signal.Signals(sig).name} at {addr:#x}"
                      + (f" in port {port}'s memory" if port is not None else
                         " (not in any port's memory)"))
        log.error("worker %d (pid %d) %s; replacing it", index, h.pid, reason)

        new, self.spare = self.spare, None
        if new is None or new.dead:
            new = self._spawn()
        self.workers[index] = new
        self._assign(new, index, replacing=True)
        self.spare = self._spawn()
        # Commands the dead worker had not answered: their effect is in the
        # state replayed below (or gone with a port that was cut off).
        pending = list(h.queue) + (list(h.inflight[1]) if h.inflight else [])
        h.queue.clear()
        h.inflight = None
        for cmd in pending:
            channel.close_all(cmd.fds)
            self._settle(cmd, REPLACED)
        if fault is not None and fault[2] is not None:
            self.on_fault(fault[2], fault[0], fault[1])
        for name, args, fds, port in self.replay(index):
            self._queue(new, _Command(name, args, list(fds), self.loop.create_future(),
                                      port=port), urgent=True)

    def _release(self, h):
        """Stop watching h and close its channel; reap it when it is gone."""
        if h.dead:
            return
        h.dead = True
        for fd in (h.sock.fileno(), h.process.sentinel):
            self.loop.remove_reader(fd)
        if h.writing:
            self.loop.remove_writer(h.sock.fileno())
        for cmd in h.queue:
            channel.close_all(cmd.fds)
            self._settle(cmd, REPLACED)
        h.queue.clear()
        h.sock.close()
        if h.process.exitcode is not None:
            self._finish_reap(h)
        else:
            self._reaping.add(h)
            self.loop.add_reader(h.process.sentinel, self._finish_reap, h)

    def _finish_reap(self, h):
        try:
            self.loop.remove_reader(h.process.sentinel)
        except (ValueError, OSError):
            pass
        h.process.join(0)
        if h.process.exitcode is None:
            # Its end of the sentinel pipe is closed, but the kernel has not
            # made it a zombie yet: look again shortly.
            self.loop.call_later(0.02, self._finish_reap, h)
            return
        self._reaping.discard(h)
        h.process.close()
        self._release_locks(h)

    def _release_locks(self, h):
        """h is reaped (no code of it runs any more): the RX-ring locks it
        held are released, and their next holder goes on from the ring's
        last published position (vhu/workers/_shared.pxi)."""
        if h.lock_word is None or self.stats.array is None:
            return
        released = shared.release_locks(self.stats.array, h.lock_word)
        h.lock_word = None
        if released:
            log.warning("worker %d (pid %d) died holding the RX lock of %s: released", h.index,
                        h.pid, ", ".join(f"port {p} ring {r}" for p, r in released))


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_state(pid):
    """(state letter, CPU seconds used) of a process, from /proc; (None, 0.0) if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None, 0.0
    return fields[0], (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _exit_text(code):
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
