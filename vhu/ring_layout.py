"""Where a virtqueue's three parts may lie, and how long they are.

One rule, used by the protocol layer (SET_VRING_ADDR, vhu.protocol.backend),
the compiled ring (vhu._ring) and the reference ring (vhu.refring). Pure
Python and free of I/O, so the sans-I/O protocol layer can import it.

Lengths (virtio 1.x): a split ring (2.7) is a descriptor table of 16-byte
descriptors, an available ring (flags, idx, a u16 per entry, used_event) and
a used ring (flags, idx, an 8-byte element per entry, avail_event); a packed
ring (2.8) is a descriptor ring of 16-byte descriptors and two 4-byte event
suppression areas, sent in SET_VRING_ADDR's avail and used fields.

Alignment. The spec asks 16 for descriptors, 2 for the available ring and 4
for the used ring (2.7), 16 and 4 and 4 for packed rings (2.8.10). Front-ends
in the field do not all follow it: the Vapp reference client puts the
descriptor table 8 bytes into its region (after two ints). Linux vhost
(vhost_vring_set_addr) checks only the available (2) and used (4) alignment,
and DPDK's lib/vhost checks none. vhu requires what its own loads need: each
field at its natural alignment, so descriptors at 8 (their u64 address is
read in one load), split avail 2 and used 4 (u16 and u32 fields), packed
event areas 4 (as the spec; no front-end is known to need less). Anything
between that and the spec is accepted and reported as out of spec.
"""
from typing import NamedTuple

# virtio 1.x 2.6 (Queue Size): at most 32768 entries; split rings a power of
# two, packed rings any size (2.8.10.1). The one owner of the limit.
MAX_QUEUE_SIZE = 32768

SPLIT_PARTS = ("descriptor table", "avail ring", "used ring")
PACKED_PARTS = ("descriptor ring", "driver event area", "device event area")

# (required, spec) alignment of each part, in SPLIT_PARTS / PACKED_PARTS order.
SPLIT_ALIGN = ((8, 16), (2, 2), (4, 4))
PACKED_ALIGN = ((8, 16), (4, 4), (4, 4))


class MisalignedRing(ValueError):
    """A ring part below the alignment vhu needs to read it."""


class RingPart(NamedTuple):
    name: str
    addr: int
    length: int


def part_lengths(size: int, packed: bool = False) -> tuple:
    """Bytes of (descriptors, avail or driver event area, used or device event
    area) for a ring of `size` entries. Size 0 (SET_VRING_ADDR before
    SET_VRING_NUM): only what every ring has, one descriptor and the headers."""
    if packed:
        return (16 * size if size else 16, 4, 4)
    if not size:
        return (16, 4, 4)
    return (16 * size, 6 + 2 * size, 6 + 8 * size)


def ring_parts(desc: int, avail: int, used: int, size: int, packed: bool = False) -> tuple:
    """(name, address, length) of the ring's three parts."""
    names = PACKED_PARTS if packed else SPLIT_PARTS
    return tuple(RingPart(n, a, length) for n, a, length in
                 zip(names, (desc, avail, used), part_lengths(size, packed)))


def check_alignment(desc: int, avail: int, used: int, packed: bool = False) -> list:
    """MisalignedRing (the first part vhu cannot use) or the list of parts that
    are usable but not aligned as the spec asks, one phrase each (empty: in spec)."""
    names = PACKED_PARTS if packed else SPLIT_PARTS
    aligns = PACKED_ALIGN if packed else SPLIT_ALIGN
    notes = []
    for name, addr, (required, spec) in zip(names, (desc, avail, used), aligns):
        if addr % required:
            raise MisalignedRing(f"{name} at {addr:#x} is not {required}-byte aligned")
        if addr % spec:
            notes.append(f"{name} at {addr:#x} is {required}- but not {spec}-byte aligned")
    return notes
