#!/usr/bin/env bash
# Boots a microVM with agentd as PID 1 (Debian's cloud kernel under qemu; TCG unless
# AGENTD_QEMU_ACCEL=kvm) and serves its agent channel on a relay socket, so that
# agentctl exec/fs/forward work against a real kernel. Ctrl-C (or agentctl shutdown) stops it.
#
#   make vm                 # then, in another terminal, the agentctl commands it prints
#   MACHINE=microvm make vm # qemu's microvm: virtio-mmio, no PCI bus (as libkrun, Firecracker)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
RUN=${RUN:-/tmp/agentd-vm}
rm -rf "$RUN" && mkdir -p "$RUN"
[ -f "$BUILD/initramfs.cpio.gz" ] || scripts/mkinitramfs.sh "$BUILD"
# qemu user networking: the guest is 10.0.2.15, the host 10.0.2.2, its DNS 10.0.2.3. agentd moves
# eth0 into a namespace of its own and gives workloads only its tun, behind the egress policy.
NET="MSB_NET=iface=eth0,mac=52:54:00:12:34:56,mtu=1500 MSB_NET_IPV4=addr=10.0.2.15/24,gw=10.0.2.2,dns=10.0.2.3"
EGRESS="AGENTD_EGRESS=${EGRESS_MODE:-netstack} AGENTD_EGRESS_POLICY=/etc/agentd/egress.json"
ACCEL=${AGENTD_QEMU_ACCEL:-tcg}
# TCG's default CPU has no RDRAND: without it the guest's random pool is seeded ~1 s late, and
# the first getrandom (in agentd's start-up) waits for it.
CPU=qemu64,+rdrand
[ "$ACCEL" = tcg ] || CPU=host
case ${MACHINE:-pc} in
pc) BUS=pci KARGS=acpi=noirq ;; # virtio-pci uses MSI-X; ACPI's legacy IRQ routing is slow under TCG
microvm) BUS=device KARGS="tsc_early_khz=2000000 tsc=reliable" ;; # no PIT/HPET to calibrate the TSC
*) echo "MACHINE=$MACHINE: want pc or microvm" >&2; exit 2 ;;
esac
qemu-system-x86_64 -M "${MACHINE:-pc}" -accel "$ACCEL" -cpu "$CPU" -m "${MEM:-512}" -nographic -no-reboot \
	-kernel "$BUILD/vmlinuz" -initrd "$BUILD/initramfs.cpio.gz" \
	-append "console=ttyS0 quiet panic=-1 $KARGS MSB_HOSTNAME=agentd-vm $NET $EGRESS" \
	-device "virtio-serial-$BUS" -chardev "socket,id=agent,path=$RUN/agent.sock,server=on,wait=off" \
	-device virtserialport,chardev=agent,name=agent \
	-netdev user,id=n0 -device "virtio-net-$BUS,netdev=n0" >"$RUN/console.log" 2>&1 &
qemu=$!
trap 'kill $qemu 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 200); do [ -S "$RUN/agent.sock" ] && break; sleep 0.05; done
"$BUILD/agentctl" serve --port "unix:$RUN/agent.sock" --listen "$RUN/relay.sock" 2>"$RUN/serve.log" &
for _ in $(seq 600); do grep -q "serving clients" "$RUN/serve.log" && break; sleep 0.05; done
grep -q "serving clients" "$RUN/serve.log" || { echo "the VM did not come up; see $RUN/console.log" >&2; exit 1; }
"$BUILD/agentctl" exec --connect "$RUN/relay.sock" -- uname -a
cat <<TEXT
agentd is PID 1 in the VM. Try:
  $BUILD/agentctl exec --connect $RUN/relay.sock -t -- sh
  $BUILD/agentctl fs --connect $RUN/relay.sock ls /
  $BUILD/agentctl forward --connect $RUN/relay.sock 127.0.0.1:8080 127.0.0.1:80
  $BUILD/agentctl policy reload --connect $RUN/relay.sock my-policy.json
  $BUILD/agentctl shutdown --connect $RUN/relay.sock
console: $RUN/console.log
TEXT
wait $qemu
