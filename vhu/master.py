"""vhu.master: the back-end's control process, from the command line.

    python -m vhu.master --socket ./vhost.sock [--socket PATH ...] [--client]
        [--workers N] [--queues Q] [--app sink|echo|source|patch|switch|pcap]
        [--poll busy|epoll|adaptive] [--cpus LIST] [--stats-interval S]
        [--stats-file PATH] [--log-level LEVEL] [--pkt-size N] [--socket-mode 0600]
        [--tap NAME ...] [--pcap DIR] [--pcap-mode 0600] [--metrics-port PORT]
        [--mac-ageing S]

The CLI is a thin user of the embeddable API: parse and validate the
arguments (vhu.config), build one vhu.workers.Forwarder, serve it in this
thread (vhu.control runs the event loop, the ports and the supervised
workers). SIGINT and SIGTERM stop it cleanly: exit status 0. A master that
stops for any other reason exits 1; bad arguments exit 2.
"""
import logging
import signal
import sys

from vhu.config import UsageError, parse_args
from vhu.workers.forwarder import Forwarder

log = logging.getLogger("vhu.master")


def main(argv=None):
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"vhu.master: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, stream=sys.stdout,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fw = Forwarder(config=config)
    signal.signal(signal.SIGINT, lambda *_: fw.stop())
    signal.signal(signal.SIGTERM, lambda *_: fw.stop())
    try:
        fw.run()
    except OSError as exc:
        log.error("%s", exc)
        return 1
    except Exception:
        log.exception("vhu.master stopped on an error")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
