#!/usr/bin/env bash
# Install and prepare the "real peers" used by the vhu test bed:
#   * DPDK 22.11 (dpdk-testpmd with the virtio-user and vhost PMDs),
#   * QEMU 7.2 (qemu-system-x86_64) plus a Debian kernel and busybox-static,
#     from which vhu.testbed.guest builds a tiny guest initramfs at run time,
#   * Open vSwitch 3.1 with DPDK (ovs-vswitchd-dpdk, ovsdb-server, ovs-vsctl):
#     vhu.testbed.ovs runs its own in a private run directory; the system's
#     openvswitch-switch service is neither needed nor touched,
#   * hugepages + a hugetlbfs mount (optional: testpmd can run --no-huge).
#
# Idempotent and fast when everything is already there: `apt-get update` and
# `apt-get install` only run when a package is missing.  Works with no stdin and
# DEBIAN_FRONTEND=noninteractive.  Exits non-zero with a one-line reason on
# stderr when it cannot do its job.
#
# Environment knobs:
#   VHU_HUGEPAGES=N     number of 2 MiB hugepages to reserve (default 512, 0 = skip)
#   VHU_EXTRA_PKGS=1    also install the optional capture tools (tcpdump, tshark)
set -euo pipefail

die() { echo "setup-peers: $*" >&2; exit 1; }
log() { echo "setup-peers: $*"; }

[ "${EUID:-$(id -u)}" -eq 0 ] || die "must run as root (needs apt-get, hugepages, mounts)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: only Debian/Ubuntu hosts are supported"
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found"

export DEBIAN_FRONTEND=noninteractive
exec </dev/null   # never wait on a prompt

# Required packages.  Pitfall: on Debian 12 `dpdk` holds only the runtime
# scripts (dpdk-devbind.py, ...); `dpdk-testpmd` lives in `dpdk-dev` (~200
# librte-* packages).  The PMDs are only *recommended* by `dpdk`, and we install
# with --no-install-recommends, so the drivers testpmd needs are named explicitly:
#   librte-net-virtio23 -> net_virtio_user, librte-net-vhost23 -> net_vhost,
#   librte-mempool-ring23 -> the default "ring_mp_mc" mempool ops (without it
#   testpmd fails with "mempool ops not found" / cannot create mbuf pool),
#   librte-net-pcap23 -> net_pcap (tests/test_offload_dpdk.py feeds testpmd's
#   csum engine from a pcap file and captures what vhu delivers into one).
PKGS=(
    dpdk dpdk-dev librte-net-virtio23 librte-net-vhost23 librte-mempool23 librte-mempool-ring23
    librte-net-pcap23
    qemu-system-x86 seabios ipxe-qemu
    openvswitch-switch-dpdk     # pulls openvswitch-switch/-common (ovsdb-server, ovs-vsctl, schema)
    busybox-static linux-image-amd64
    cpio kmod xz-utils zstd gzip iproute2 procps util-linux
    tcpdump                 # tests read vhu's pcap files with it
    tmux                    # tests/test_top.py runs python -m vhu.stats --top in an 80x24 pane
    ethtool                 # copied into guests: two queue pairs on one vCPU (test_migration)
)
if [ "${VHU_EXTRA_PKGS:-0}" = "1" ]; then
    PKGS+=(tshark)
fi

missing=()
for p in "${PKGS[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$st" = "install ok installed" ] || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    # tshark asks whether non-root users may capture; pre-answer it.
    echo "wireshark-common wireshark-common/install-setuid boolean false" \
        | debconf-set-selections 2>/dev/null || true
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null || die "apt-get install failed for: ${missing[*]}"
else
    log "all packages present"
fi

# Sanity checks of what the test bed will actually execute.
command -v dpdk-testpmd >/dev/null 2>&1 || die "dpdk-testpmd missing after install"
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 missing after install"
[ -x /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk ] || die "ovs-vswitchd-dpdk missing after install"
for t in ovsdb-tool ovsdb-server ovs-vsctl ovs-ofctl ovs-appctl; do
    command -v "$t" >/dev/null 2>&1 || die "$t missing after installing openvswitch-switch-dpdk"
done
[ -x /bin/busybox ] || command -v busybox >/dev/null 2>&1 || die "busybox missing after install"
ls /boot/vmlinuz-* >/dev/null 2>&1 || die "no kernel under /boot after installing linux-image-amd64"
# /boot/vmlinuz-* is mode 0600 on Debian: fine for root, make it readable so a
# non-root test run can still build the guest.
chmod a+r /boot/vmlinuz-* 2>/dev/null || true

# Hugepages: best effort.  virtio-user / vhost testpmd can run with --no-huge.
nr=${VHU_HUGEPAGES:-512}
if [ "$nr" -gt 0 ]; then
    cur=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
    if [ "$cur" -lt "$nr" ]; then
        if ! echo "$nr" > /proc/sys/vm/nr_hugepages 2>/dev/null; then
            log "warning: cannot reserve hugepages (testpmd will need --no-huge)"
        fi
    fi
    mkdir -p /dev/hugepages 2>/dev/null || true
    if ! mountpoint -q /dev/hugepages 2>/dev/null; then
        mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null \
            || log "warning: cannot mount hugetlbfs on /dev/hugepages (testpmd will need --no-huge)"
    fi
    log "hugepages: $(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo ?) reserved," \
        "$(mountpoint -q /dev/hugepages && echo mounted || echo not mounted)"
fi

log "ok: dpdk-dev $(dpkg-query -W -f="\${Version}" dpdk-dev)," \
    "$(qemu-system-x86_64 --version | head -1)," \
    "openvswitch-switch-dpdk $(dpkg-query -W -f="\${Version}" openvswitch-switch-dpdk)"
