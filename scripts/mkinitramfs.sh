#!/usr/bin/env bash
# Builds build/initramfs.cpio.gz and build/vmlinuz: agentd as /init, busybox for workloads, and
# the kernel modules agentd loads (virtio, virtio_pci or virtio_mmio, virtio_console, virtio_blk,
# virtio_net, tun, fuse and virtiofs) from the same Debian cloud kernel package. Uses apt-get
# download + dpkg-deb -x: nothing is installed.
#
#   scripts/mkinitramfs.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build}
VM=$OUT/vm
[ -x "$OUT/agentd" ] || { echo "mkinitramfs: build $OUT/agentd first (make build)" >&2; exit 1; }
agentctl=("$OUT/agentctl")
[ -x "$OUT/agentctl" ] || agentctl=(go run ./cmd/agentctl) # only agentd was built (make bench-vm)
mkdir -p "$VM/debs"

# download PACKAGE: apt-get download into $VM/debs, its progress shown; a failure says what to do.
download() {
	local sandbox=()
	[ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root) # root may write anywhere: no _apt sandbox warning
	echo "mkinitramfs: fetching $1 (apt-get download)" >&2
	if ! (cd "$VM/debs" && apt-get "${sandbox[@]}" download "$1"); then
		echo "mkinitramfs: apt-get download $1 failed (its message is above). Check the apt sources" \
			"(/etc/apt/sources.list*) and the network; 'apt-get update' refreshes stale lists." >&2
		exit 1
	fi
}

# The kernel image the cloud meta-package points at, and a static busybox.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
	echo "mkinitramfs: the apt lists name no linux-image-cloud-amd64 (Debian's cloud kernel): run apt-get update (as root), with a Debian main source" >&2
	exit 1
fi
kver=${kpkg#linux-image-}
if [ ! -f "$VM/kernel/boot/vmlinuz-$kver" ]; then
	download "$kpkg"
	rm -rf "$VM/kernel" && dpkg-deb -x "$VM/debs/${kpkg}"_*.deb "$VM/kernel"
fi
if [ ! -x "$VM/busybox/bin/busybox" ]; then
	download busybox-static
	rm -rf "$VM/busybox" && dpkg-deb -x "$VM/debs/"busybox-static_*.deb "$VM/busybox"
fi
cp "$VM/kernel/boot/vmlinuz-$kver" "$OUT/vmlinuz"

root=$VM/rootfs
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root,lib/modules,.msb/scripts}
cp "$OUT/agentd" "$root/init"
cp "$VM/busybox/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
	[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
# No modprobe: the kernel runs /sbin/modprobe for every module it would like (six crypto
# algorithms during boot alone), and busybox's cannot load any here (no modules.dep tree), so
# each is a process spawned for nothing. agentd loads the modules the guest needs.
rm "$root/sbin/modprobe"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
# The egress policy agentd starts with (AGENTD_EGRESS_POLICY points here in make vm): the
# example examples/make-vm.yaml explains, checked and normalized to JSON by agentctl.
mkdir -p "$root/etc/agentd"
"${agentctl[@]}" policy check examples/make-vm.yaml >"$root/etc/agentd/egress.json"

# Modules in dependency order (modules.dep of this kernel); agentd loads them as listed: first
# what the agent channel needs (only the virtio transport the machine has: PCI on a standard
# machine, MMIO on a microVM), virtio_blk only when init mounts a disk, then networking in the
# background. A line is "file.ko [when=CONDITION] [param=value ...]" (initfs.ParseModuleList).
kmod=$VM/kernel/lib/modules/$kver/kernel
channel=(
	drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
	"drivers/virtio/virtio_pci_legacy_dev.ko when=virtio-pci" "drivers/virtio/virtio_pci_modern_dev.ko when=virtio-pci"
	"drivers/virtio/virtio_pci.ko when=virtio-pci" "drivers/virtio/virtio_mmio.ko when=virtio-mmio"
	drivers/char/virtio_console.ko
)
block=(drivers/block/virtio_blk.ko)
network=(net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko drivers/net/tun.ko)
virtiofs=(fs/fuse/fuse.ko fs/fuse/virtiofs.ko) # loaded only when a virtio-fs device exists
list() { # list FILE "MODULE [OPTIONS]"...
	local file=$1 entry m opts; shift
	: >"$root/lib/modules/$file"
	for entry in "$@"; do
		read -r m opts <<<"$entry"
		cp "$kmod/$m" "$root/lib/modules/"
		# Drop the appended signature: checking it is most of finit_module's time under TCG,
		# and this kernel loads unsigned modules (MODULE_SIG_FORCE is off; it logs a taint).
		if command -v strip >/dev/null; then strip --strip-debug "$root/lib/modules/$(basename "$m")"; fi
		echo "$(basename "$m")${opts:+ $opts}" >>"$root/lib/modules/$file"
	done
}
list agentd.load "${channel[@]}"
list agentd.load.block "${block[@]}"
list agentd.load.background "${network[@]}"
list agentd.load.virtiofs "${virtiofs[@]}"

echo "mkinitramfs: packing $OUT/initramfs.cpio.gz" >&2
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet | gzip -6) >"$OUT/initramfs.cpio.gz"
echo "$OUT/initramfs.cpio.gz ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB) and $OUT/vmlinuz ($kver)"
