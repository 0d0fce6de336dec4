"""A real vhu.workers.supervisor.WorkerPool on an event loop of its own
thread, driven synchronously: for tests that command workers directly
(without a master or a front-end) and watch them being replaced."""
import asyncio
import threading

from vhu.stats import StatsMemory
from vhu.workers.supervisor import WorkerPool

RINGS_PER_PORT = 16


def worker_config(app="sink", poll="epoll", stats=None, **extra):
    return dict(app=app, poll=poll, batch=32, rings_per_port=RINGS_PER_PORT,
                stats_layout=tuple(stats.layout), **extra)


class PoolThread:
    """count workers; replay(index) and the fault/error callbacks are the
    test's (defaults: nothing to replay, record what happened)."""

    def __init__(self, count=1, app="sink", poll="epoll", ports=2, replay=None, **extra):
        self.stats = StatsMemory(ports, RINGS_PER_PORT, count)
        self.faults, self.errors = [], []
        self.replay = replay or (lambda index: [])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = WorkerPool(count, worker_config(app, poll, self.stats, **extra), self.stats,
                               replay=lambda i: self.replay(i),
                               on_fault=lambda *a: self.faults.append(a),
                               on_error=lambda *a: self.errors.append(a))
        self._on_loop(self._start)

    async def _start(self):
        self.pool.start()

    def _on_loop(self, coro_fn, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def call(self, name, *args, fds=(), worker=0, timeout=60):
        """Run a command in worker `worker`; its reply (or WorkerError)."""
        async def go():
            fut = self.pool.submit(worker, name, *args, fds=fds)
            self.pool.hurry()            # we wait for it
            return await fut
        return self._on_loop(go, timeout)

    def submit(self, name, *args, fds=(), worker=0, key=None):
        """Queue without waiting; a concurrent.futures.Future of the reply."""
        async def go():
            return self.pool.submit(worker, name, *args, fds=fds, key=key)
        inner = self._on_loop(go)
        return asyncio.run_coroutine_threadsafe(_await(inner), self.loop)

    def submit_burst(self, commands):
        """Queue (name, args, fds, key) commands in one go, as a burst of
        front-end messages read at once queues them; their futures."""
        async def go():
            return [self.pool.submit(0, name, *args, fds=fds, key=key)
                    for name, args, fds, key in commands]
        return [asyncio.run_coroutine_threadsafe(_await(f), self.loop)
                for f in self._on_loop(go)]

    def pids(self):
        return list(self.pool.pids())

    @property
    def replacements(self):
        return self.pool.replacements

    def close(self):
        try:
            self._on_loop(self.pool.close)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            self.stats.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def _await(fut):
    return await fut
