"""Reference split virtqueue (virtio 1.x section 2.7) in plain Python.

Slow and meant to be obviously correct: the same tests run against it and
against the compiled vhu._ring, whose public API (vhu/_ring.pyi) this module
copies name for name. Guest memory is not this module's job: every access
goes through vhu._mem.GuestMemory (view/view_uva/segments/read), re-translated
at each operation, and fields are packed/unpacked little-endian with struct.

Stats keys (DeviceRing.stats), the same as the compiled ring's:

    popped             chains handed out by pop (and by tx_frames/rx_frames)
    pushed             used elements made visible to the driver (counted by publish)
    published          publish() calls that stored a new used->idx
    notify             ... of which the driver wanted an interrupt
    notify_suppressed  ... of which it did not
    rx_frames rx_bytes frames/bytes delivered by rx_frames (bytes without header)
    rx_no_room         rx_frames stopped: not enough receive buffers
    rx_too_big         frame dropped: larger than one chain, mergeable off
    tx_frames tx_bytes frames/bytes returned by tx_frames (bytes without header)
    tx_short           TX chains shorter than the virtio-net header (skipped)
    broken_<reason>    one per BROKEN_* constant, <reason> its name in lower case
                       (broken_head_out_of_range, ..., broken_ring_unmapped)

Rules this reference follows where the spec leaves room (and why):

- A zero-length descriptor is legal and yields no segment; its address is
  not checked since nothing is ever accessed through it.
- Chain length counts buffer descriptors: the direct ones plus the entries
  of an indirect table (all len/16 of them, checked before the table is
  walked, and before its address). The descriptor that points to the table
  is not a buffer and does not count. More than the queue size is
  BROKEN_CHAIN_TOO_LONG (this also catches every loop).
- An indirect table (and any buffer) may cross a region boundary: it is
  read through the memory object, which splits at boundaries.
- NEXT on a descriptor that refers to an indirect table is ignored (the
  chain continues inside the table only), as Linux vhost and DPDK do.
- A batch containing a bad chain hands out nothing: pop returns [] and the
  ring stays broken.
- With EVENT_IDX, publish() answers exactly vring_need_event(used_event,
  new, old); without, it honours VRING_AVAIL_F_NO_INTERRUPT.
"""
import struct

from vhu._mem import GuestMemoryError
from vhu.ring_layout import MAX_QUEUE_SIZE, MisalignedRing, check_alignment, part_lengths

__all__ = ["DeviceRing", "DriverRing", "Chain", "RingError", "net_header_len",
           "check_queue_size", "split_ring_layout", "STATS_KEYS"]

NET_HDR_LEN_LEGACY = 10
NET_HDR_LEN_MRG = 12

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

_F_MRG_RXBUF = 1 << 15
_F_VERSION_1 = 1 << 32

BROKEN_HEAD_OUT_OF_RANGE = "head index >= queue size"
BROKEN_NEXT_OUT_OF_RANGE = "next index >= queue size"
BROKEN_CHAIN_TOO_LONG = "descriptor chain longer than the queue (loop?)"
BROKEN_INDIRECT_BAD_LEN = "indirect table length not a non-zero multiple of 16"
BROKEN_INDIRECT_NESTED = "indirect descriptor inside an indirect table"
BROKEN_INDIRECT_UNMAPPED = "indirect table outside guest memory"
BROKEN_INDIRECT_NOT_NEGOTIATED = "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
BROKEN_BUFFER_UNMAPPED = "buffer outside guest memory"
BROKEN_AVAIL_IDX_JUMP = "avail idx moved by more than the queue size"
BROKEN_READABLE_AFTER_WRITABLE = "device-readable descriptor after a device-writable one"
# Not in the stub; the compiled ring has them too. The reference never runs
# out of segment space, so it never reports TOO_MANY_SEGMENTS.
BROKEN_RING_UNMAPPED = "ring no longer inside guest memory after a memory table change"
BROKEN_TOO_MANY_SEGMENTS = "chain split into more segments than the device can hold"
# Packed-ring reasons (the reference is split only; kept so the stats tables match).
BROKEN_BAD_ID = "buffer id >= queue size"
BROKEN_CHAIN_NOT_AVAILABLE = "chain continues into a descriptor that is not available"
BROKEN_INDIRECT_IN_CHAIN = "indirect descriptor inside a chain of descriptors"
# Set from outside a ring (the master, the worker engine), never by one:
BROKEN_MEMORY_FAULT = "the front-end's memory faulted the worker (shrunk or unmapped under it)"
BROKEN_KICK_FD_ERROR = "the kick fd reported an error or hang-up"

# reason text -> stats key
_BROKEN_KEYS = {text: "broken_" + name[len("BROKEN_"):].lower()
                for name, text in list(globals().items()) if name.startswith("BROKEN_")}

STATS_KEYS = (("popped", "pushed", "published", "notify", "notify_suppressed",
               "rx_frames", "rx_bytes", "rx_no_room", "rx_too_big",
               "tx_frames", "tx_bytes", "tx_short",
               # written by the worker engine, never by a ring: kept so the tables match
               "kicks", "drop_filtered", "drop_no_port", "drop_stage", "drop_stage_error",
               "tx_too_big", "state_position")
              + tuple(_BROKEN_KEYS.values())
              # the worker engine's offload counters (vhu.workers._offload), after the broken ones
              + ("tx_bad_offload", "tx_gso", "tx_csum", "rx_gso", "rx_csum", "rx_segmented",
                 "rx_csum_done")
              # dirty-page logging (the compiled ring's; the reference does not log)
              + ("log_pages",)
              # VXLAN ports' drop reasons (vhu.workers._vxlan; the reference has none)
              + ("vxlan_bad", "vxlan_foreign", "vxlan_too_big")
              # cross-worker RX rings (vhu.workers._shared; the reference has one writer)
              + ("rx_contended", "state_rx_lock", "state_rx_epoch"))

# Split ring layout (virtio 1.x 2.7.5, 2.7.6, 2.7.8).
_DESC = struct.Struct("<QIHH")        # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")     # id, len
_FLAGS, _IDX, _RING = 0, 2, 4


class RingError(ValueError):
    """A ring that cannot be set up (bad size, unmapped or misaligned ring address)."""


class _Broken(Exception):
    """Internal: carries a broken reason out of a chain walk (never escapes)."""


def net_header_len(features):
    """12 when VIRTIO_F_VERSION_1 (bit 32) or VIRTIO_NET_F_MRG_RXBUF (bit 15) is set, else 10."""
    return NET_HDR_LEN_MRG if int(features) & (_F_VERSION_1 | _F_MRG_RXBUF) else NET_HDR_LEN_LEGACY


def check_queue_size(size):
    """RingError unless 1 <= size <= 32768 and size is a power of two."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise RingError(f"queue size {size!r} is not an integer")
    if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise RingError(f"queue size {size}: must be a power of two from 1 to {MAX_QUEUE_SIZE}")


def split_ring_layout(size):
    """Bytes of (descriptor table, avail ring, used ring), event fields included."""
    check_queue_size(size)
    return part_lengths(size)


def vring_need_event(event, new, old):
    """virtio 1.x 2.7.10: notify when event lies in [old, new), 16-bit wrap included."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _check_alignment(desc, avail, used):
    # The one rule (vhu.ring_layout): descriptors 8, avail 2, used 4; the
    # spec's 16 for descriptors is not required (Vapp puts them at +8).
    try:
        check_alignment(desc, avail, used)
    except MisalignedRing as e:
        raise RingError(f"misaligned ring: {e}") from None


def _scatter(views, data):
    """Copy data into a list of writable views in order; returns bytes written."""
    done = 0
    for v in views:
        if done == len(data):
            break
        k = min(len(v), len(data) - done)
        v[:k] = data[done:done + k]
        done += k
    return done


class Chain:
    """One available descriptor chain as the device sees it (zero-copy views)."""
    __slots__ = ("head", "readable", "writable", "read_len", "write_len")

    def __init__(self, head, readable, writable, read_len, write_len):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = read_len
        self.write_len = write_len

    def __repr__(self):
        return (f"Chain(head={self.head}, read_len={self.read_len}, "
                f"write_len={self.write_len}, segments={len(self.readable)}+{len(self.writable)})")


class DeviceRing:
    """Device side of a split virtqueue (what the back-end runs). See vhu/_ring.pyi."""

    def __init__(self, mem, size, desc_addr, avail_addr, used_addr, *, addr_space="uva",
                 event_idx=False, indirect=True, features=0):
        check_queue_size(size)
        if addr_space not in ("uva", "gpa"):
            raise RingError(f"addr_space must be 'uva' or 'gpa', not {addr_space!r}")
        _check_alignment(desc_addr, avail_addr, used_addr)
        self._mem = mem
        self.size = size
        self._addr_space = addr_space
        self._addrs = (desc_addr, avail_addr, used_addr)
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self.mergeable = bool(int(features) & _F_MRG_RXBUF)
        self.hdr_len = net_header_len(features)
        self._last_avail = 0       # next avail entry to pop
        self._shadow_used = 0      # next used entry to write
        self._published_used = 0   # used->idx as last stored
        self._broken = None
        self._stats = dict.fromkeys(STATS_KEYS, 0)
        self.remap()

    # -- ring memory -----------------------------------------------------------

    def _translate(self):
        """(desc, avail, used) views, freshly translated; GuestMemoryError if unmapped."""
        view = self._mem.view_uva if self._addr_space == "uva" else self._mem.view
        d, a, u = self._addrs
        dlen, alen, ulen = part_lengths(self.size)
        return view(d, dlen), view(a, alen), view(u, ulen)

    def _views(self):
        """The ring views, or None after marking the ring broken (memory table changed)."""
        try:
            return self._translate()
        except GuestMemoryError:
            self._mark_broken(BROKEN_RING_UNMAPPED)
            return None

    def remap(self):
        """Re-translate the ring addresses after the memory table changed (RingError if they no longer map)."""
        try:
            self._translate()
        except GuestMemoryError as e:
            raise RingError(f"ring not inside guest memory ({self._addr_space}): {e}") from None
        if self._broken == BROKEN_RING_UNMAPPED:
            self._broken = None

    def _mark_broken(self, reason):
        if self._broken is None:
            self._broken = reason
        self._stats[_BROKEN_KEYS[reason]] += 1

    # -- state -----------------------------------------------------------------

    @property
    def last_avail_idx(self):
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value):
        """SET_VRING_BASE: also resets the shadow used index to it."""
        value = int(value)
        if not 0 <= value <= 0xFFFF:
            raise RingError(f"ring base {value} is not a 16-bit index")
        self._last_avail = self._shadow_used = self._published_used = value

    @property
    def used_idx(self):
        """The device's next used index (published or not)."""
        return self._shadow_used

    @property
    def broken(self):
        return self._broken is not None

    @property
    def broken_reason(self):
        return self._broken

    @property
    def stats(self):
        return dict(self._stats)

    # -- popping -----------------------------------------------------------------

    def _pending(self, avail):
        """Chains available and not popped, or None after marking the ring broken."""
        avail_idx = _U16.unpack_from(avail, _IDX)[0]
        n = (avail_idx - self._last_avail) & 0xFFFF
        if n > self.size:
            self._mark_broken(BROKEN_AVAIL_IDX_JUMP)
            return None
        return n

    def avail_count(self):
        """Chains the driver has made available and the device has not popped."""
        if self._broken:
            return 0
        views = self._views()
        if views is None:
            return 0
        n = self._pending(views[1])
        return n or 0

    def pop(self, max_chains):
        if self._broken or max_chains <= 0:
            return []
        views = self._views()
        if views is None:
            return []
        desc, avail, _ = views
        n = self._pending(avail)
        if not n:
            return []
        n = min(n, max_chains)
        chains = []
        for i in range(n):
            slot = (self._last_avail + i) % self.size
            head = _U16.unpack_from(avail, _RING + 2 * slot)[0]
            try:
                chains.append(self._walk(desc, head))
            except _Broken as e:
                self._mark_broken(e.args[0])
                return []
        self._last_avail = (self._last_avail + n) & 0xFFFF
        self._stats["popped"] += n
        return chains

    def _buffer_views(self, addr, length):
        """Views of [addr, addr+length) split at region boundaries."""
        if addr + length > 1 << 64:
            raise _Broken(BROKEN_BUFFER_UNMAPPED)
        try:
            segments = self._mem.segments(addr, length)
            views = []
            for _local, n in segments:
                views.append(self._mem.view(addr, n))
                addr += n
        except GuestMemoryError:
            raise _Broken(BROKEN_BUFFER_UNMAPPED) from None
        return views

    def _walk(self, desc, head):
        """The Chain at head; raises _Broken with the reason for a bad one."""
        if head >= self.size:
            raise _Broken(BROKEN_HEAD_OUT_OF_RANGE)
        readable, writable = [], []
        read_len = write_len = 0
        count = 0                    # buffer descriptors in this chain so far
        seen_writable = False
        indirect_addr = None         # set while walking an indirect table
        table_size = self.size
        idx = head
        while True:
            if indirect_addr is None:
                addr, length, flags, nxt = _DESC.unpack_from(desc, 16 * idx)
            else:
                # Each entry read once into our own bytes: a racing guest
                # cannot change a field between our check and our use.
                raw = self._mem.read(indirect_addr + 16 * idx, 16)
                addr, length, flags, nxt = _DESC.unpack(raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise _Broken(BROKEN_INDIRECT_NOT_NEGOTIATED)
                if indirect_addr is not None:
                    raise _Broken(BROKEN_INDIRECT_NESTED)
                if length == 0 or length % 16:
                    raise _Broken(BROKEN_INDIRECT_BAD_LEN)
                # The table holds len/16 descriptors (2.7.5.3): with the
                # buffers before it they must fit the queue size.
                if count + length // 16 > self.size:
                    raise _Broken(BROKEN_CHAIN_TOO_LONG)
                if addr + length > 1 << 64:
                    raise _Broken(BROKEN_INDIRECT_UNMAPPED)
                try:
                    self._mem.segments(addr, length)
                except GuestMemoryError:
                    raise _Broken(BROKEN_INDIRECT_UNMAPPED) from None
                indirect_addr = addr
                table_size = length // 16
                idx = 0
                continue
            count += 1
            if count > self.size:
                raise _Broken(BROKEN_CHAIN_TOO_LONG)
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                raise _Broken(BROKEN_READABLE_AFTER_WRITABLE)
            if length:
                views = self._buffer_views(addr, length)
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.extend(views)
                    write_len += length
                else:
                    readable.extend(views)
                    read_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, read_len, write_len)
            if nxt >= table_size:
                raise _Broken(BROKEN_NEXT_OUT_OF_RANGE)
            idx = nxt

    # -- used ring -----------------------------------------------------------------

    def push(self, head, written):
        """Add a used element (not visible to the driver until publish)."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range for queue size {self.size}")
        if not 0 <= written <= 0xFFFFFFFF:
            raise ValueError(f"written length {written} is not a u32")
        views = self._views()
        if views is None:
            return
        _USED_ELEM.pack_into(views[2], _RING + 8 * (self._shadow_used % self.size), head, written)
        self._shadow_used = (self._shadow_used + 1) & 0xFFFF

    def publish(self):
        """Store used->idx once for all pushes; True if the driver wants a notification."""
        old, new = self._published_used, self._shadow_used
        if new == old:
            return False
        views = self._views()
        if views is None:
            return False
        _, avail, used = views
        _U16.pack_into(used, _IDX, new)
        self._published_used = new
        self._stats["pushed"] += (new - old) & 0xFFFF
        self._stats["published"] += 1
        if self.event_idx:
            used_event = _U16.unpack_from(avail, _RING + 2 * self.size)[0]
            notify = vring_need_event(used_event, new, old)
        else:
            notify = not _U16.unpack_from(avail, _FLAGS)[0] & VRING_AVAIL_F_NO_INTERRUPT
        self._stats["notify" if notify else "notify_suppressed"] += 1
        return notify

    def disable_notifications(self):
        """Ask the driver not to kick (used->flags NO_NOTIFY, or avail_event left behind with EVENT_IDX)."""
        views = self._views()
        if views is None or self.event_idx:
            # With EVENT_IDX avail_event simply stays where it is: the
            # driver kicks once more at most, when it passes it.
            return
        _U16.pack_into(views[2], _FLAGS, VRING_USED_F_NO_NOTIFY)

    def enable_notifications(self):
        """Ask for kicks again; True if buffers arrived meanwhile (poll again before sleeping)."""
        if self._broken:
            return False
        views = self._views()
        if views is None:
            return False
        if self.event_idx:
            _U16.pack_into(views[2], _RING + 8 * self.size, self._last_avail)
        else:
            _U16.pack_into(views[2], _FLAGS, 0)
        return self.avail_count() > 0

    # -- virtio-net framing ------------------------------------------------------------

    def tx_frames(self, max_frames):
        """Pop frames the driver sent, header stripped; their chains are pushed with written=0."""
        frames = []
        for chain in self.pop(max_frames):
            if chain.read_len < self.hdr_len:
                self._stats["tx_short"] += 1
            else:
                data = b"".join(bytes(v) for v in chain.readable)
                frames.append(data[self.hdr_len:])
                self._stats["tx_frames"] += 1
                self._stats["tx_bytes"] += len(data) - self.hdr_len
            self.push(chain.head, 0)
        return frames

    def rx_frames(self, frames):
        """Deliver frames into the driver's receive buffers with a header (num_buffers
        when mergeable). Returns how many were delivered; stops at the first that finds
        no room. Without mergeable buffers a frame larger than the next chain is
        dropped (rx_too_big), leaves that chain available, and is not counted."""
        delivered = 0
        for frame in frames:
            result = self._rx_one(bytes(frame))
            if result == 0 or (result < 0 and self._broken):
                break
            if result > 0:
                delivered += 1
        return delivered

    def _rx_one(self, frame):
        """1 delivered, 0 no room (nothing consumed), -1 dropped or ring broken."""
        header = bytearray(self.hdr_len)
        packet_len = self.hdr_len + len(frame)
        saved = (self._last_avail, self._shadow_used, self._stats["popped"])
        placed = []                  # (chain, offset in packet, bytes)
        offset = 0
        while offset < packet_len:
            chains = self.pop(1)
            if not chains:
                # Out of buffers (or broken) midway: give back what we took.
                self._last_avail, self._shadow_used, self._stats["popped"] = saved
                if self._broken:
                    return -1
                self._stats["rx_no_room"] += 1
                return 0
            chain = chains[0]
            if offset == 0:
                if not self.mergeable and chain.write_len < packet_len:
                    self._last_avail, self._shadow_used, self._stats["popped"] = saved
                    self._stats["rx_too_big"] += 1
                    return -1
                if chain.write_len < self.hdr_len:
                    # A mergeable buffer smaller than the header breaks the
                    # driver's own rule (5.1.6.3.1): return it unused.
                    self.push(chain.head, 0)
                    continue
            n = min(chain.write_len, packet_len - offset)
            placed.append((chain, offset, n))
            offset += n
        if self.hdr_len == NET_HDR_LEN_MRG:
            # num_buffers: 1 without mergeable buffers (virtio 1.x 5.1.6.4).
            header[10:12] = _U16.pack(len(placed))
        packet = bytes(header) + frame
        for chain, start, n in placed:
            _scatter(chain.writable, packet[start:start + n])
            self.push(chain.head, n)
        self._stats["rx_frames"] += 1
        self._stats["rx_bytes"] += len(frame)
        return 1


class DriverRing:
    """Driver side of a split virtqueue (what a front-end runs), addresses guest-physical.

    Owns the descriptor free list. Initialises the ring memory it is given.
    start_idx (not in the stub; the compiled ring has it) starts avail->idx
    and used->idx there, to exercise 16-bit wraparound.
    """

    def __init__(self, mem, size, desc_gpa, avail_gpa, used_gpa, *, event_idx=False, start_idx=0):
        check_queue_size(size)
        _check_alignment(desc_gpa, avail_gpa, used_gpa)
        self._mem = mem
        self.size = size
        self.event_idx = bool(event_idx)
        self._addrs = (desc_gpa, avail_gpa, used_gpa)
        desc, avail, used = self._views()
        desc[:] = bytes(len(desc))
        avail[:] = bytes(len(avail))
        used[:] = bytes(len(used))
        start = int(start_idx) & 0xFFFF
        _U16.pack_into(avail, _IDX, start)
        _U16.pack_into(used, _IDX, start)
        self._shadow_avail = self._published_avail = self._last_used = start
        self._free = list(range(size - 1, -1, -1))   # a stack: pop() gives 0 first
        self._in_flight = {}                          # head -> descriptor ids it holds

    def _views(self):
        d, a, u = self._addrs
        try:
            dlen, alen, ulen = part_lengths(self.size)
            return self._mem.view(d, dlen), self._mem.view(a, alen), self._mem.view(u, ulen)
        except GuestMemoryError as e:
            raise RingError(f"driver ring not inside guest memory: {e}") from None

    @property
    def free_count(self):
        return len(self._free)

    @property
    def avail_idx(self):
        return self._shadow_avail

    def add(self, readable, writable=(), *, indirect_gpa=None):
        """Make one chain of (gpa, len) buffers available (not visible until publish).
        With indirect_gpa the chain is written as an indirect table there and takes one slot.
        Returns the head id; RingError when the ring is full."""
        bufs = ([(int(a), int(n), 0) for a, n in readable]
                + [(int(a), int(n), VIRTQ_DESC_F_WRITE) for a, n in writable])
        if not bufs:
            raise RingError("a chain needs at least one buffer")
        desc, avail, _ = self._views()
        if indirect_gpa is not None:
            if not self._free:
                raise RingError("ring full")
            table = bytearray(16 * len(bufs))
            for i, (a, n, f) in enumerate(bufs):
                last = i + 1 == len(bufs)
                _DESC.pack_into(table, 16 * i, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else i + 1)
            try:
                self._mem.write(indirect_gpa, bytes(table))
            except GuestMemoryError as e:
                raise RingError(f"indirect table at {indirect_gpa:#x} not in guest memory: {e}") from None
            head = self._free.pop()
            _DESC.pack_into(desc, 16 * head, indirect_gpa, len(table), VIRTQ_DESC_F_INDIRECT, 0)
            ids = [head]
        else:
            if len(self._free) < len(bufs):
                raise RingError(f"ring full: {len(self._free)} free descriptors, "
                                f"chain needs {len(bufs)}")
            ids = [self._free.pop() for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                last = i + 1 == len(bufs)
                _DESC.pack_into(desc, 16 * ids[i], a, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else ids[i + 1])
            head = ids[0]
        self._in_flight[head] = ids
        _U16.pack_into(avail, _RING + 2 * (self._shadow_avail % self.size), head)
        self._shadow_avail = (self._shadow_avail + 1) & 0xFFFF
        return head

    def publish(self):
        """Store avail->idx; True if the device wants a kick."""
        old, new = self._published_avail, self._shadow_avail
        if new == old:
            return False
        _, avail, used = self._views()
        _U16.pack_into(avail, _IDX, new)
        self._published_avail = new
        if self.event_idx:
            avail_event = _U16.unpack_from(used, _RING + 8 * self.size)[0]
            return vring_need_event(avail_event, new, old)
        return not _U16.unpack_from(used, _FLAGS)[0] & VRING_USED_F_NO_NOTIFY

    def get_used(self, max_items=2**31):
        """(head, written length) of chains the device returned; frees their descriptors."""
        _, _, used = self._views()
        used_idx = _U16.unpack_from(used, _IDX)[0]
        out = []
        while self._last_used != used_idx and len(out) < max_items:
            head, written = _USED_ELEM.unpack_from(used, _RING + 8 * (self._last_used % self.size))
            ids = self._in_flight.pop(head, None)
            if ids is None:
                raise RingError(f"device returned used id {head}, which is not in flight")
            self._free.extend(reversed(ids))
            out.append((head, written))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out

    def disable_interrupts(self):
        # With EVENT_IDX used_event simply stays behind (as the compiled ring does).
        if not self.event_idx:
            _U16.pack_into(self._views()[1], _FLAGS, VRING_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self):
        """True if used buffers arrived meanwhile."""
        _, avail, used = self._views()
        if self.event_idx:
            _U16.pack_into(avail, _RING + 2 * self.size, self._last_used)
        else:
            _U16.pack_into(avail, _FLAGS, 0)
        return _U16.unpack_from(used, _IDX)[0] != self._last_used
