"""The Vapp reference client (tests/vapp.py, an exact emulation of `vhost -q`)
against python -m vhu.master --app sink and --app echo.

Legacy all the way: no SET_FEATURES, so a 10-byte header and rings started by
their kick; two regions with gpa == uva; 32768-entry rings whose descriptor
tables sit 8 bytes into their region (out of the spec's 16-byte alignment,
served as Linux vhost serves it, said once per ring at INFO). Every frame it
posts is used and counted once; with echo every frame is dropped for lack of
receive buffers (Vapp never posts any), counted as rx_no_room and nothing else.
"""
import pytest

from tests.vapp import ARP_REQUEST, RING_SIZE, TX, VappClient
from tests.vhuproc import VhuMaster
from vhu.protocol.messages import VirtioFeature as VF, mask


@pytest.mark.parametrize("app", ["sink", "echo"])
def test_vapp_client_is_served(tmp_path, app):
    with VhuMaster(tmp_path, "--app", app) as vhu:
        with VappClient(vhu.sockets[0]) as vapp:
            assert vapp.features & mask(VF.VERSION_1, VF.PROTOCOL_FEATURES)   # offered, never acked
            sent = vapp.run(3.5)                        # its own pace: one frame a second
            assert sent == 4
            assert vapp.wait_used(), (vapp.used_idx(TX), vapp.avail_idx(TX))
            vapp.process_used()
            # Each frame came back used, unwritten, in the descriptor it went out in:
            # vhu kept up, so Vapp's free list handed out descriptor 0 every time.
            assert vapp.used_idx(TX) == vapp.avail_idx(TX) == sent
            assert [vapp.used_elem(TX, k) for k in range(sent)] == [(0, 0)] * sent
            assert vapp.free_head == 0 and vapp.desc(TX, 0)[1:] == (10 + 1518, 2, 1)
            assert vapp.used_idx(0) == vapp.avail_idx(0) == 0      # no receive buffers, ever
            assert vhu.wait_stable("rx_packets") == sent
            port = vhu.port()
        assert port["rx_bytes"] == sent * len(ARP_REQUEST)
        assert port["tx_packets"] == 0 and port["broken"] == {}
        expected_drops = {"rx_no_room": sent} if app == "echo" else {}
        assert {k: v for k, v in port["drops_by_reason"].items() if v} == expected_drops
        assert [q["queue"] for q in port["queues"]] == [0]      # one queue pair in use, not 8
        vhu.wait_log("disconnected")
        out = vhu.output()
        for ring in (0, 1):
            assert out.count(f"ring {ring}: out-of-spec layout, served anyway: descriptor "
                             f"table at 0x") == 1, out[-3000:]
        assert " WARNING " not in out and "refused" not in out, out[-3000:]
        vhu.stop()


def test_vapp_ring_is_the_size_it_says(tmp_path):
    """A full TX ring's worth in one go (Vapp never does this; its ring allows it):
    nothing lost at 32768 chains in flight, the 16-bit indices as they wrap."""
    with VhuMaster(tmp_path, "--app", "sink") as vhu:
        with VappClient(vhu.sockets[0]) as vapp:
            total = 0
            for _ in range(3):
                for _ in range(RING_SIZE // 4):
                    vapp.put(ARP_REQUEST)
                vapp.kick(TX)
                total += RING_SIZE // 4
                assert vapp.wait_used(30)
                vapp.process_used()
            assert vhu.wait_stable("rx_packets") == total
        vhu.stop()
