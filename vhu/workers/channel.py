"""The master <-> worker channel: packets of commands, replies matched by id.

One SOCK_SEQPACKET socketpair per worker. The master sends a packet
(seq, [(name, args, nfds), ...]) with the commands' fds as SCM_RIGHTS, in
command order; the worker runs the commands in order and answers one packet
(seq, [(status, value), ...]). A reply carries the seq of its request: the
master matches it to that request only, and drops one whose request it
already gave up on (a worker it replaced), so a late reply can never be
taken for another request's (vhu.workers.supervisor).

Both ends use these helpers, so the limits below have one owner.
"""
import os
import pickle
import socket

# SCM_RIGHTS carries at most this many fds per message (Linux SCM_MAX_FD).
MAX_PACKET_FDS = 253
# A packet's pickled size: commands are small (a memory table of a few
# regions, a ring set-up, one frame for SEND_RARP); the sender keeps each
# packet below this, the receiver's buffer is this large.
MAX_PACKET = 1 << 18

OK = "ok"
ERROR = "error"


class ChannelClosed(Exception):
    """The other end went away."""


def encode(seq, commands):
    """commands: (name, args, nfds) tuples -> the packet's bytes."""
    return pickle.dumps((seq, list(commands)), protocol=pickle.HIGHEST_PROTOCOL)


def send(sock, data, fds=()):
    """One packet and its fds (BlockingIOError when a non-blocking socket is full)."""
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv(sock):
    """(object, fds) of one packet; ChannelClosed at EOF. Raises
    BlockingIOError when a non-blocking socket has nothing."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_PACKET, MAX_PACKET_FDS)
    if not data:
        close_all(fds)
        raise ChannelClosed()
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        raise ValueError("packet or its fds truncated")
    return pickle.loads(data), list(fds)


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
