#!/usr/bin/env bash
# Run privileged tests under Debian 12's own kernel (6.1), in a throw-away qemu VM, as root:
#
#   scripts/kernel-vm.sh tests/priv/test_nftset.py [more pytest arguments...]
#
# The VM boots the kernel of Debian 12's linux-image-amd64 with this machine's root filesystem,
# read-only over 9p, under a tmpfs overlay (writes vanish with the VM), so the tests run with the
# same checkout, venv and tools as here, against the kernel that a Debian 12 node runs. That
# kernel lacks what later ones added (NFT_MSG_DESTROYSETELEM came in 6.3), so its code paths are
# the ones a node takes. qemu emulates the CPU (TCG): no /dev/kvm needed, and about ten times
# slower than the host. No network card: everything the tests need must be on this machine.
#
# Prints the guest's console; exits with the guest's pytest status (3 if the VM gave none).
# Installs qemu-system-x86, busybox-static and cpio if missing; keeps the kernel, its modules
# and the initramfs in /var/cache/egressd-kernel-vm/ for the next run (EGRESSD_KERNEL_VM_CACHE).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "kernel-vm.sh: run as root" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "usage: kernel-vm.sh PYTEST_ARGS..." >&2
  exit 2
fi
for a in "$@"; do
  case "$a" in *[[:space:],]*) echo "kernel-vm.sh: arguments may not hold spaces or commas: '$a'" >&2; exit 2;; esac
done
[ -x "$top/.venv/bin/python" ] || "$top/scripts/setup.sh"

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
if [ ${#missing[@]} -gt 0 ]; then
  echo "kernel-vm.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The kernel package that Debian 12's linux-image-amd64 points at today (linux-image-6.1.0-NN-amd64).
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "kernel-vm.sh: no linux-image-amd64 in apt's lists" >&2; exit 2; }
kver=${pkg#linux-image-}
work="${EGRESSD_KERNEL_VM_CACHE:-/var/cache/egressd-kernel-vm}/$kver"
root="$work/root"
if [ ! -f "$root/boot/vmlinuz-$kver" ]; then
  rm -rf "$work"
  mkdir -p "$work"
  (cd "$work" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
  deb=$(ls "$work"/"$pkg"_*.deb 2>/dev/null | head -1)
  [ -n "$deb" ] || { echo "kernel-vm.sh: could not download $pkg" >&2; exit 2; }
  dpkg-deb -x "$deb" "$root"
  rm -f "$deb"
  busybox depmod -b "$root" "$kver"
fi

# The initramfs: busybox, the modules for virtio and 9p, and an init that mounts the root.
initrd="$work/initrd.cpio.gz"
stage="$work/initrd"
rm -rf "$stage"
mkdir -p "$stage"/{bin,mods,proc,sys,dev,newroot,lower,upper}
cp /bin/busybox "$stage/bin/"
# The modules for virtio-pci, 9p and overlayfs, each after what it depends on (modules.dep,
# written by busybox depmod above: "kernel/a.ko: kernel/b.ko kernel/c.ko").
moddep="$root/lib/modules/$kver/modules.dep"
declare -A seen=()
names=()
add_module() {  # add_module PATH: its dependencies first, then itself
  local path=$1 deps d
  [ -z "${seen[$path]:-}" ] || return 0
  seen[$path]=1
  deps=$(awk -v p="$path:" '$1 == p { $1 = ""; print; exit }' "$moddep")
  for d in $deps; do add_module "$d"; done
  cp "$root/lib/modules/$kver/$path" "$stage/mods/"
  names+=("$(basename "$path" .ko)")
}
for m in virtio_pci 9pnet_virtio 9p overlay; do
  path=$(awk -v m="/$m.ko:" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m { sub(":$", "", $1); print $1; exit }' "$moddep")
  [ -n "$path" ] || { echo "kernel-vm.sh: no module $m in $kver" >&2; exit 2; }
  add_module "$path"
done
cat > "$stage/init" <<EOF
#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in ${names[*]}; do insmod /mods/\$m.ko || echo "kernel-vm: insmod \$m failed"; done
fail() { echo "kernel-vm: \$*"; echo "GUEST_EXIT=3"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower || fail "9p root"
mount -t tmpfs -o size=3g tmpfs /upper; mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || fail overlay
mkdir -p /newroot/usr/lib/modules/$kver
mount -t 9p -o trans=virtio,version=9p2000.L,ro mods /newroot/usr/lib/modules/$kver || fail "9p modules"
cp /guest.sh /newroot/guest.sh; chmod +x /newroot/guest.sh
cat /proc/cmdline > /newroot/cmdline
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys
mount --move /dev /newroot/dev
# /run fresh (the host's netns and sockets mean nothing here); /tmp as the host has it, since
# the checkout may be there (the overlay takes the writes)
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs tmpfs /newroot/dev/shm
mount -t cgroup2 none /newroot/sys/fs/cgroup 2>/dev/null
exec switch_root /newroot /bin/bash /guest.sh
EOF
cat > "$stage/guest.sh" <<EOF
#!/bin/bash
# Modules load on demand through busybox's modprobe (the host has no kmod for this kernel).
ln -sf /bin/busybox /tmp/modprobe; echo /tmp/modprobe > /proc/sys/kernel/modprobe
ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PYTHONDONTWRITEBYTECODE=1 TERM=dumb CI=${CI:-}
args=\$(sed -n 's/.* guestargs=\([^ ]*\).*/\1/p' /cmdline | tr ',' ' ')
echo; echo "GUEST_KERNEL=\$(uname -r)"  # (the console's escape codes may precede it on its line)
# (never this script's own test, which would start a VM in the VM)
cd "$top" && .venv/bin/python -m pytest -p no:cacheprovider --ignore=tests/priv/test_kernel_vm.py \$args
echo "GUEST_EXIT=\$?"
sync
echo o > /proc/sysrq-trigger
EOF
chmod +x "$stage/init" "$stage/guest.sh"
(cd "$stage" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$initrd")

log=$(mktemp)
trap 'rm -f "$log"' EXIT
args=$(IFS=,; echo "$*")
# multidevs=remap: the host's /proc and /sys (and other mounts) would otherwise share inode
# numbers over 9p, and the guest would take them for one directory.
timeout 3600 qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 3072 -smp "$(nproc)" \
  -nographic -no-reboot -nic none \
  -kernel "$root/boot/vmlinuz-$kver" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 loglevel=4 guestargs=$args" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
  -virtfs "local,path=$root/lib/modules/$kver,mount_tag=mods,security_model=none,readonly=on" \
  </dev/null 2>&1 | tee "$log" | grep -av '^qemu-system-x86_64: warning' || true
kernel=$(grep -ao 'GUEST_KERNEL=[^[:space:]]*' "$log" | head -1 | cut -d= -f2)
status=$(grep -ao 'GUEST_EXIT=[0-9]*' "$log" | tail -1 | cut -d= -f2)
if [ "$kernel" != "$kver" ] || [ -z "$status" ]; then
  echo "kernel-vm.sh: the VM did not run the tests (kernel '${kernel}', status '${status}')" >&2
  exit 3
fi
exit "$status"
