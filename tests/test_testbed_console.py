"""The testpmd console reader (vhu.testbed.dpdk.command_reply), on console
text as testpmd really printed it: log lines from its other threads land in
the middle of a reply and of the prompt itself (seen in CI)."""
from vhu.testbed.dpdk import command_reply

# From a CI run: "start" on a net_vhost port while the front-end disconnects.
CI_TRANSCRIPT = (
    "start\n"
    "rxonly packet forwarding - ports=1 - cores=1 - streams=1\n"
    "      TX offloads=0x0 - TX RS bit threshold=0\n"
    "VHOST_CONFIG: (/tmp/p/vhost.sock) read message VHOST_USER_GET_VRING_BASE\n"
    "t\nPort 0: link state change event\n"
    "estVHOST_CONFIG: (/tmp/p/vhost.sock) vring base idx:0 file:0\n"
    "pVHOST_CONFIG: (/tmp/p/vhost.sock) vhost peer closed\n"
    "md> VHOST_CONFIG: (/tmp/p/vhost.sock) vhost-user client: socket created, fd: 20\n"
    "VHOST_CONFIG: (/tmp/p/vhost.sock) new device, handle is 0\n"
)


def test_prompt_split_by_log_lines_is_found():
    assert command_reply(CI_TRANSCRIPT) == (
        "rxonly packet forwarding - ports=1 - cores=1 - streams=1\n"
        "      TX offloads=0x0 - TX RS bit threshold=0\n")


def test_no_reply_until_the_prompt_is_complete():
    cut = CI_TRANSCRIPT.index("md> ")
    assert command_reply(CI_TRANSCRIPT[:cut]) is None       # "testp" so far
    assert command_reply("show port stats all") is None     # not even echoed yet
    assert command_reply("show port stats all\n") is None


def test_log_lines_inside_a_reply_are_taken_out():
    text = ("show port stats all\n"
            "  RX-packets: 10 RX-missed: 0 RX-bytes: 640\n"
            "VHOST_CONFIG: (/s.sock) read message VHOST_USER_SET_VRING_KICK\n"
            "  TX-packets: 0 TX-errors: 0 TX-bytes: 0\n"
            "testpmd> ")
    assert command_reply(text) == ("  RX-packets: 10 RX-missed: 0 RX-bytes: 640\n"
                                   "  TX-packets: 0 TX-errors: 0 TX-bytes: 0\n")
