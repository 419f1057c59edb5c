#!/usr/bin/env bash
# Boots a microVM with agentd as PID 1 (Debian's cloud kernel under qemu; TCG unless
# AGENTD_QEMU_ACCEL=kvm) and serves its agent channel on a relay socket, so that agentctl
# exec/fs/forward/policy work against a real kernel. The egress netstack is on, with the policy
# of examples/make-vm.yaml, and the audit log comes to the host on a virtio-serial port of its
# own (audit.log in the run's directory; agentd holds the port, so no workload can write to it).
#
#   make vm                 # then, in another terminal, the agentctl commands it prints
#   MACHINE=microvm make vm # qemu's microvm: virtio-mmio, no PCI bus (as libkrun, Firecracker)
#   make vm-audit           # follow the audit log of the newest VM (scripts/run-vm.sh audit)
#
# Each run has its own directory under $AGENTD_VM_RUNS (default /tmp/agentd-vm), named by its
# process id (or RUN=DIR, refused while another run uses it), with the sockets, console.log and
# serve.log; "current" points at the newest one.
# agentctl's context (agentctl context) names the newest VM's relay socket while it runs.
# Ctrl-C (or agentctl shutdown) powers the VM off, stops the relay and removes the sockets;
# the directory's logs stay until the next make vm.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
RUNS=${AGENTD_VM_RUNS:-/tmp/agentd-vm}
agentctl=$BUILD/agentctl

# live DIR: is the run that made DIR still running?
live() { local pid; pid=$(cat "$1/pid" 2>/dev/null) && grep -qs run-vm "/proc/$pid/cmdline"; }

if [ "${1:-}" = audit ]; then # follow the newest VM's audit records
	[ -e "$RUNS/current/audit.log" ] || { echo "run-vm: no VM under $RUNS (start one with make vm)" >&2; exit 1; }
	echo "run-vm: $(readlink -f "$RUNS/current")/audit.log (Ctrl-C to stop)" >&2
	exec tail -n +1 -F "$RUNS/current/audit.log"
fi

mkdir -p "$RUNS"
others=()
for d in "$RUNS"/*/; do
	d=${d%/}
	[ -d "$d" ] && [ ! -L "$d" ] || continue
	if live "$d"; then others+=("$d"); else rm -rf "$d"; fi # a finished run's logs go now
done
if [ -n "${RUN:-}" ]; then # a directory of the caller's choosing: refused while in use
	if live "$RUN"; then
		echo "run-vm: $RUN is in use by the VM of run-vm (pid $(cat "$RUN/pid")): stop it, or leave RUN unset for a directory of this run's own" >&2
		exit 1
	fi
	rm -rf "$RUN"
else
	RUN=$RUNS/$$
fi
mkdir -p "$RUN"
echo $$ >"$RUN/pid"
ln -sfn "$RUN" "$RUNS/current.new" && mv -T "$RUNS/current.new" "$RUNS/current"

[ -f "$BUILD/initramfs.cpio.gz" ] || scripts/mkinitramfs.sh "$BUILD"
# qemu user networking: the guest is 10.0.2.15, the host 10.0.2.2 (this machine's loopback),
# its DNS 10.0.2.3. agentd moves eth0 into a namespace of its own and gives workloads only its
# tun, behind the egress policy; its audit records go to the host on the port agentd-audit.
NET="MSB_NET=iface=eth0,mac=52:54:00:12:34:56,mtu=1500 MSB_NET_IPV4=addr=10.0.2.15/24,gw=10.0.2.2,dns=10.0.2.3"
EGRESS="AGENTD_EGRESS=${EGRESS_MODE:-netstack} AGENTD_EGRESS_POLICY=/etc/agentd/egress.json AGENTD_EGRESS_AUDIT=virtio:agentd-audit"
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

qemu= serve=
cleanup() {
	trap - EXIT INT TERM
	if [ -n "$qemu" ] && kill -0 "$qemu" 2>/dev/null; then
		echo "run-vm: shutting the VM down" >&2
		"$agentctl" shutdown --connect "$RUN/relay.sock" 2>/dev/null || true
		for _ in $(seq 100); do kill -0 "$qemu" 2>/dev/null || break; sleep 0.05; done
		if kill "$qemu" 2>/dev/null; then echo "run-vm: the VM did not power off within 5 s: qemu killed" >&2; fi
	fi
	[ -z "$serve" ] || kill "$serve" 2>/dev/null || true
	wait 2>/dev/null || true
	rm -f "$RUN"/*.sock "$RUN/pid" "$RUN/qemu.pid"
	"$agentctl" context clear "$RUN/relay.sock" 2>/dev/null || true
	# "current" goes back to a VM still running, if there is one.
	if [ "$(readlink "$RUNS/current" 2>/dev/null)" = "$RUN" ]; then
		rm -f "$RUNS/current"
		for d in "${others[@]}"; do
			if live "$d"; then ln -sfn "$d" "$RUNS/current"; "$agentctl" context use "$d/relay.sock"; break; fi
		done
	fi
	echo "run-vm: stopped; logs in $RUN" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM # the EXIT trap shuts down

# qemu and the relay get sessions of their own: a Ctrl-C in this terminal reaches only this
# script, which then shuts the guest down in order instead of killing it.
setsid qemu-system-x86_64 -M "${MACHINE:-pc}" -accel "$ACCEL" -cpu "$CPU" -m "${MEM:-512}" -nographic -no-reboot \
	-kernel "$BUILD/vmlinuz" -initrd "$BUILD/initramfs.cpio.gz" \
	-append "console=ttyS0 quiet panic=-1 $KARGS MSB_HOSTNAME=agentd-vm $NET $EGRESS" \
	-device "virtio-serial-$BUS" -chardev "socket,id=agent,path=$RUN/agent.sock,server=on,wait=off" \
	-device virtserialport,chardev=agent,name=agent \
	-chardev "file,id=audit,path=$RUN/audit.log" -device virtserialport,chardev=audit,name=agentd-audit \
	-netdev user,id=n0 -device "virtio-net-$BUS,netdev=n0" </dev/null >"$RUN/console.log" 2>&1 &
qemu=$!
echo "$qemu" >"$RUN/qemu.pid"
setsid "$agentctl" serve --port "unix:$RUN/agent.sock" --listen "$RUN/relay.sock" </dev/null 2>"$RUN/serve.log" &
serve=$!
if ! "$agentctl" wait --connect "$RUN/relay.sock" --timeout 60s; then
	echo "run-vm: the VM did not come up; its console ($RUN/console.log) ends with:" >&2
	tail -20 "$RUN/console.log" >&2
	exit 1
fi
"$agentctl" context use "$RUN/relay.sock"
"$agentctl" exec -- uname -a
for d in "${others[@]}"; do
	echo "run-vm: another VM is running too, in $d (agentctl --connect $d/relay.sock talks to it)"
done
echo "agentd is PID 1 in the VM; agentctl talks to it (its context is $RUN/relay.sock). Try:"
try() { printf '  %-56s # %s\n' "$1" "$2"; }
try "$agentctl exec -it -- sh" "a shell in the guest"
try "$agentctl fs ls /etc" "guest files; fs put -r / get -r copy trees"
try "$agentctl forward 8080" "127.0.0.1:8080 here -> the guest's 127.0.0.1:8080"
try "$agentctl policy reload examples/deny-by-default.yaml" "a stricter policy"
try "make vm-audit" "follow the egress audit (each decision)"
try "$agentctl shutdown" "power off (or Ctrl-C here)"
echo "console: $RUN/console.log"
wait "$qemu" || true
qemu=
echo "run-vm: the VM powered off" >&2
