#!/usr/bin/env bash
# Builds the interop lab's guest from Debian packages only, into a cache outside the checkout:
#   rootfs.ext4   debootstrap'ed bookworm (minbase + nvme-cli, fio, kmod, iproute2, rdma-core's
#                 libraries, python3-pyverbs, perftest) with the kernel's
#                 modules unpacked into it
#   vmlinuz       the newest linux-image-6.12.*+deb12-amd64 (bookworm / bookworm-security)
#   initrd.img    busybox-static + the few modules needed to mount the root (virtio-blk, ext4, 9p);
#                 its /init mounts the root and the 9p-shared checkout, then runs the checkout's
#                 tools/lab/guest-init.sh as PID 1 (so the guest's behaviour lives in the repo)
# Rebuilt only when missing (or when this recipe's version changes). Prints the image directory.
#
#   tools/lab/build-image.sh [--force]      GPUCACHE_LAB_CACHE overrides /var/cache/gpucache-lab
set -euo pipefail

RECIPE=4  # bump when the image contents change
CACHE=${GPUCACHE_LAB_CACHE:-/var/cache/gpucache-lab}
MIRROR=${GPUCACHE_LAB_MIRROR:-http://deb.debian.org/debian}
PACKAGES=nvme-cli,fio,kmod,iproute2,procps,util-linux,coreutils
# rdma-core's user space for soft-RoCE (rdma_rxe) tests: verbs, RDMA-CM, their Python bindings, perftest
PACKAGES=$PACKAGES,libibverbs1,ibverbs-providers,librdmacm1,python3-pyverbs,perftest,rdmacm-utils,ibverbs-utils
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx switch_root || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
    echo "lab: installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# busybox (dynamic) may be installed instead of busybox-static: the initramfs needs the static one.
if ! file -L /bin/busybox 2>/dev/null | grep -q 'statically linked'; then
    if ! dpkg -s busybox-static >/dev/null 2>&1; then
        $SUDO apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
    fi
fi

# The newest 6.12 kernel: what the linux-image-6.12-amd64 meta package points at.
kpkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-6\.12\.[0-9]*+deb12-amd64\)$/\1/p' | head -1)
if [ -z "$kpkg" ]; then
    $SUDO apt-get update -qq
    kpkg=$(apt-cache depends linux-image-6.12-amd64 | sed -n 's/^ *Depends: \(linux-image-6\.12\.[0-9]*+deb12-amd64\)$/\1/p' | head -1)
fi
[ -n "$kpkg" ] || { echo "lab: no linux-image-6.12.*+deb12-amd64 package found" >&2; exit 1; }
kver=${kpkg#linux-image-}
dir="$CACHE/$kver"
stamp="$dir/complete"
if [ $FORCE -eq 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "recipe $RECIPE" ]; then
    echo "$dir"
    exit 0
fi

start=$(date +%s)
echo "lab: building the guest image for $kver in $dir" >&2
work="$dir.build"
$SUDO rm -rf "$work"
mkdir -p "$work"
rootfs="$work/rootfs"

# 1. the root file system
$SUDO debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

# 2. the kernel and its modules, unpacked (no postinst, no initramfs-tools)
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null)
# (unpacked beside the root, not over it: the package's ./lib would replace the merged-/usr link)
dpkg-deb -x "$work"/"${kpkg}"_*.deb "$work/kernel"
mkdir -p "$rootfs/usr/lib/modules"
cp -a "$work/kernel/lib/modules/$kver" "$rootfs/usr/lib/modules/"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$work/kernel/boot/config-$kver" "$work/config"
rm -rf "$work/kernel"
chroot "$rootfs" /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin depmod "$kver"
rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/boot/*
echo lab > "$rootfs/etc/hostname"
mkdir -p "$rootfs/src" "$rootfs/etc/nvme"
# A fixed host identity for the guest's kernel host (nvme-cli reads these).
echo "nqn.2014-08.org.nvmexpress:uuid:6c616200-0000-4000-8000-000000000001" > "$rootfs/etc/nvme/hostnqn"
echo "6c616200-0000-4000-8000-000000000001" > "$rootfs/etc/nvme/hostid"

# 3. the initramfs: static busybox, the root's modules (decompressed), a small /init
initrd="$work/initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,lib/modules}
cp -L /bin/busybox "$initrd/bin/busybox"
for m in virtio_pci virtio_blk ext4 9p 9pnet_virtio; do
    chroot "$rootfs" /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin modprobe -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' > "$work/initrd-modules"
: > "$initrd/lib/modules/order"
while read -r ko; do
    name=$(basename "$ko")
    case "$name" in
        *.xz) xz -dc "$rootfs$ko" > "$initrd/lib/modules/${name%.xz}"; name=${name%.xz} ;;
        *.zst) zstd -qdc "$rootfs$ko" > "$initrd/lib/modules/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$rootfs$ko" "$initrd/lib/modules/$name" ;;
    esac
    echo "$name" >> "$initrd/lib/modules/order"
done < "$work/initrd-modules"
cat > "$initrd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /newroot || { echo "lab: cannot mount the root"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 src /newroot/src \
    || { echo "lab: cannot mount the checkout"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /src/tools/lab/guest-init.sh
INIT
chmod +x "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.img"

# 4. the root image (guests boot it with -snapshot: it never changes once built)
size_mb=$(( $(du -sm "$rootfs" | cut -f1) + 256 ))
mke2fs -q -t ext4 -L lab -d "$rootfs" "$work/rootfs.ext4" "${size_mb}M"
echo "$kver" > "$work/kernel-version"
$SUDO rm -rf "$rootfs" "$initrd"
rm -f "$work"/*.deb

$SUDO rm -rf "$dir"
mv "$work" "$dir"
echo "recipe $RECIPE" > "$stamp"
echo "lab: image built in $(( $(date +%s) - start )) s" >&2
echo "$dir"
