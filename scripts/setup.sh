#!/usr/bin/env bash
# Checks that this machine has what `make vm` or `make test` needs, and installs what is
# missing: with apt (Debian, Ubuntu) as root it installs the packages itself; otherwise it
# prints the one command that does, and fails.
#
#   scripts/setup.sh vm     # qemu, cpio, the apt lists that name Debian's cloud kernel, Go
#   scripts/setup.sh test   # all of that, and what the tests run (socat, iperf3, curl, dig, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/setup.sh vm|test}

say() { echo "setup: $*" >&2; }
fail() { say "$*"; exit 1; }

# The Go toolchain go.mod asks for (Debian's golang package is older: it is not installed here).
want_go=$(awk '/^go /{print $2; exit}' go.mod)
if ! command -v go >/dev/null; then
	fail "Go $want_go is needed and not on PATH (nor in /usr/local/go/bin): see https://go.dev/dl"
fi
have_go=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$want_go" "$have_go" | sort -V | head -1)" != "$want_go" ]; then
	fail "Go $want_go is needed, $(command -v go) is $have_go: see https://go.dev/dl"
fi

if [ "$(uname -m)" != x86_64 ]; then
	if [ "$what" = vm ]; then
		fail "make vm boots Debian's amd64 cloud kernel under qemu-system-x86_64: it needs an x86_64 host (this is $(uname -m))"
	fi
	say "this is $(uname -m), not x86_64: the VM tests will fail (they boot Debian's amd64 kernel)"
fi
if [ "$what" = test ] && [ "$(id -u)" != 0 ]; then
	fail "make test needs root: it creates tun devices and network namespaces, and boots VMs"
fi

# program (or file) -> the Debian package that has it
declare -A pkg=(
	[qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [gzip]=gzip [dpkg-deb]=dpkg [strip]=binutils
	[git]=git [socat]=socat [iperf3]=iperf3 [ip]=iproute2 [curl]=curl [mkfs.ext4]=e2fsprogs
	[debugfs]=e2fsprogs [dig]=bind9-dnsutils [python3]=python3 [script]=util-linux [flock]=util-linux
	[/usr/lib/qemu/virtiofsd]=qemu-system-x86
)
need=(qemu-system-x86_64 cpio gzip dpkg-deb strip)
if [ "$what" = test ]; then
	need+=(git socat iperf3 ip curl mkfs.ext4 debugfs dig python3 script flock /usr/lib/qemu/virtiofsd)
fi
missing=()
for p in "${need[@]}"; do
	if [[ $p == /* ]]; then [ -e "$p" ] && continue; else command -v "$p" >/dev/null && continue; fi
	m=${pkg[$p]}
	[[ " ${missing[*]} " == *" $m "* ]] || missing+=("$m")
done
# make initramfs fetches the kernel with apt-get download: the apt lists must name it.
kernel_listed() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | grep -q 'Depends: linux-image-[0-9]'; }
lists_ok=1
command -v apt-cache >/dev/null && ! kernel_listed && lists_ok=0

[ ${#missing[@]} -eq 0 ] && [ $lists_ok = 1 ] && command -v apt-get >/dev/null && exit 0
if ! command -v apt-get >/dev/null; then
	fail "this host has no apt-get: make $what is written for Debian or Ubuntu (x86_64). It needs these programs: ${need[*]}, and Debian's linux-image-cloud-amd64 package (fetched with apt-get download)"
fi
cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
[ ${#missing[@]} -eq 0 ] && cmd="apt-get update"
if [ "$(id -u)" != 0 ]; then
	why="missing: ${missing[*]:-nothing}"
	[ $lists_ok = 1 ] || why+="; the apt lists name no linux-image-cloud-amd64 (Debian's cloud kernel)"
	fail "$why. As root, run: $cmd"
fi
export DEBIAN_FRONTEND=noninteractive
say "installing: ${missing[*]:-nothing} (apt lists $([ $lists_ok = 1 ] && echo current || echo "out of date: updating"))"
apt-get update -qq || fail "apt-get update failed (its message is above): check /etc/apt/sources.list* and the network"
if [ ${#missing[@]} -gt 0 ]; then
	apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
		fail "apt-get install ${missing[*]} failed (its message is above)"
fi
kernel_listed || fail "the apt lists still name no linux-image-cloud-amd64 (Debian's cloud kernel): add a Debian main source"
say "done"
