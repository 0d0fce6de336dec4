"""Which worker polls which queue pair (issue 19).

Every (port, queue pair) is given to one worker when it first comes up
(its first ring starts), round-robin over all ports' queue pairs in the
order they come up: the least loaded worker, ties going to the next one
after the last pick. So N single-queue VMs land on N workers, not all on
worker 0 (queue pair i of every port on worker i mod N, as before, put every
single-queue port on one core). The pick holds until the port's front-end
goes (reset or disconnect); a queue pair is never moved while it runs.

That worker polls the queue pair's TX ring and is the one that stops it and
reports its base. Its RX ring may be written by other workers too, when
frames move between ports (switch, patch, a pipeline stage): then every
worker maps it, and takes its lock (vhu/workers/_shared.pxi) to deliver.
"""

from vhu.netqueues import is_transmitq, queue_pair


class Placement:
    def __init__(self, workers, cross_delivery):
        self.count = workers
        # Frames from one port may go to another's RX ring (switch, patch,
        # stages): RX rings are mapped by every worker, and shared when
        # there is more than one.
        self.cross_delivery = bool(cross_delivery)
        self.owner = {}              # (port, queue pair) -> worker
        self._last = -1
        self._epochs = {}            # (port, ring) -> starts of that shared ring so far

    def worker(self, port, qp):
        """The worker of (port, qp), chosen now if it has none yet."""
        key = (port, qp)
        w = self.owner.get(key)
        if w is None:
            load = [0] * self.count
            for v in self.owner.values():
                load[v] += 1
            order = [(self._last + 1 + i) % self.count for i in range(self.count)]
            w = min(order, key=lambda i: load[i])
            self.owner[key] = self._last = w
        return w

    def assign(self, port, qp, worker):
        """Give (port, qp) to `worker` (it has none yet): a port that must
        be read where another is (VNIs sharing one UDP socket)."""
        self.owner[(port, qp)] = worker
        return worker

    def lookup(self, port, qp):
        """The worker of (port, qp), or None if it has not come up."""
        return self.owner.get((port, qp))

    def writers(self, port, ring):
        """The workers that run ring `ring` of `port` (vhu.netqueues): the
        owner of its queue pair, and for an RX
        ring that frames of other ports reach, every worker."""
        owner = self.worker(port, queue_pair(ring))
        if self.shared(port, ring):
            return [owner] + [w for w in range(self.count) if w != owner]
        return [owner]

    def shared(self, port, ring):
        """Is the ring written by more than one worker (it takes the lock)?"""
        return not is_transmitq(ring) and self.cross_delivery and self.count > 1

    def next_epoch(self, port, ring):
        """A new start of a shared RX ring: its number, never 0 and never
        reused for that ring index (vhu/workers/_shared.pxi, rx_begin)."""
        key = (port, ring)
        self._epochs[key] = self._epochs.get(key, 0) + 1
        return self._epochs[key]

    def release(self, port):
        """The port's front-end went: its queue pairs are placed again next time."""
        for key in [k for k in self.owner if k[0] == port]:
            del self.owner[key]

    def per_worker(self):
        """{worker: [(port, qp), ...]} for `show` and the stats."""
        out = {w: [] for w in range(self.count)}
        for key, w in sorted(self.owner.items()):
            out[w].append(key)
        return out
