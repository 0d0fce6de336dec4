"""The vhost-user protocol, back-end side, sans-I/O: bytes and fds in, bytes and hook calls out.

Spec: https://qemu-project.gitlab.io/qemu/interop/vhost-user.html (a copy is
in the repository's reference material as vhost-user.rst).

- ``messages``: request codes, feature bits, payload structs (sizes asserted at import);
- ``table``: the message table as data (one row per request);
- ``wire``: framing (MessageReader, pack_request, pack_reply);
- ``dispatch``: the one dispatcher (checks, fd hygiene, REPLY_ACK);
- ``backend``: the virtio-net device state of one connection, and its hooks.
"""
