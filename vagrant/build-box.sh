#!/usr/bin/env bash
# Build a small Debian vagrant box for the libvirt provider, without downloading any box, and add it to
# vagrant as tcptrace-debian-RELEASE.
#
#   ./build-box.sh bullseye|bookworm|trixie
#
# debootstrap into a directory, copy that onto an ext4 file system in an 8 GiB sparse MBR disk image made
# bootable with extlinux, convert to qcow2, pack as a vagrant box (metadata.json + Vagrantfile + box.img).
# No partition scanning or NBD is needed on the host (the file system is reached through a loop device at
# the partition's offset), so it also works in containers and CI sandboxes.
#
# Built once per machine: the box is kept in $TCPTRACE_BOX_CACHE (default /var/cache/tcptrace-bpf/boxes),
# and nothing is done when vagrant already has the box built by this same recipe (this script's text plus
# the host's extra CA certificates).  Set TCPTRACE_BOX_REBUILD=1 to force a rebuild.
set -euo pipefail

say() { printf '[build-box] %s\n' "$*" >&2; }
die() { printf '[build-box] error: %s\n' "$*" >&2; exit 1; }

release=${1:-}
case "$release" in
    bullseye | bookworm | trixie) ;;
    *) die "usage: $0 bullseye|bookworm|trixie" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root: it uses debootstrap, chroot and loop devices"
for tool in debootstrap extlinux sfdisk losetup mkfs.ext4 qemu-img vagrant virsh bsdtar; do
    command -v "$tool" >/dev/null || die "$tool not found (run host-setup.sh first)"
done

name=tcptrace-debian-$release
cache=${TCPTRACE_BOX_CACHE:-/var/cache/tcptrace-bpf/boxes}
box_file=$cache/$name.box
id_file=$cache/$name.id
mirror=${TCPTRACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${TCPTRACE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
disk_gib=8
label=tcptrace-root
vagrant_home=${VAGRANT_HOME:-$HOME/.vagrant.d}
export VAGRANT_CHECKPOINT_DISABLE=1 DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

# --- is the box already there? ----------------------------------------------------------------------------
shopt -s nullglob
ca_certs=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
recipe=$(cat "${BASH_SOURCE[0]}" "${ca_certs[@]}" | sha256sum | cut -c1-16)
box_id="$name recipe $recipe"
added_id_file=$vagrant_home/boxes/$name/0/libvirt/tcptrace-box-id
if [ "${TCPTRACE_BOX_REBUILD:-0}" != 1 ]; then
    if [ "$(cat "$added_id_file" 2>/dev/null)" = "$box_id" ]; then
        say "$name is up to date (recipe $recipe)"
        exit 0
    fi
fi

# Drop an older box of this name from vagrant and the images vagrant-libvirt uploaded from it.
remove_added_box() {
    if [ -d "$vagrant_home/boxes/$name" ]; then
        say "removing the older $name from vagrant"
        vagrant box remove --force --all --provider libvirt "$name" >/dev/null || true
        rm -rf "${vagrant_home:?}/boxes/$name"
    fi
    local vol
    for vol in $(virsh -q -c qemu:///system vol-list default 2>/dev/null | awk '{print $1}'); do
        case "$vol" in
            "${name}_vagrant_box_image_"*)
                say "deleting storage volume $vol"
                virsh -q -c qemu:///system vol-delete --pool default "$vol" >/dev/null ;;
        esac
    done
}

add_box() {
    remove_added_box
    say "vagrant box add $name"
    vagrant box add --force --name "$name" "$box_file" >/dev/null
    [ "$(cat "$added_id_file" 2>/dev/null)" = "$box_id" ] || die "vagrant box add did not install $added_id_file"
    say "added $name ($(du -h "$box_file" | cut -f1))"
}

if [ "${TCPTRACE_BOX_REBUILD:-0}" != 1 ] && [ -f "$box_file" ] && [ "$(cat "$id_file" 2>/dev/null)" = "$box_id" ]; then
    say "reusing the cached $box_file"
    add_box
    exit 0
fi

# --- build ------------------------------------------------------------------------------------------------
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-$release.XXXXXX")
rootfs=$work/rootfs
mnt=$work/mnt
loopdev=
cleanup() {
    local rc=$?
    set +e
    for m in "$rootfs/dev/pts" "$rootfs/dev" "$rootfs/proc" "$rootfs/sys" "$mnt"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m"
    done
    [ -n "$loopdev" ] && losetup -d "$loopdev"
    rm -rf --one-file-system "$work"
    [ "$rc" -eq 0 ] || say "failed (exit $rc); nothing was added to vagrant"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started=$SECONDS
say "debootstrap $release (log: $work/debootstrap.log)"
debootstrap --variant=minbase --include=ca-certificates "$release" "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    tail -n 20 "$rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null
    die "debootstrap $release failed"
}
say "debootstrap done in $((SECONDS - started)) s"

# apt inside the image: the same archive, never refusing an old snapshot's Release file.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $release main
deb $mirror $release-updates main
deb $security_mirror $release-security main
SOURCES
cat >"$rootfs/etc/apt/apt.conf.d/90tcptrace-box" <<'APT'
Acquire::Check-Valid-Until "false";
Acquire::Retries "3";
APT

# Extra CA certificates of this host (an intercepting HTTPS proxy's, for example), so pip in the guest works.
if [ "${#ca_certs[@]}" -gt 0 ]; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp "${ca_certs[@]}" "$rootfs/usr/local/share/ca-certificates/"
fi

mount --bind /dev "$rootfs/dev"
mount --bind /dev/pts "$rootfs/dev/pts"
mount -t proc proc "$rootfs/proc"
mount -t sysfs sysfs "$rootfs/sys"
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"   # no daemons started inside the chroot
chmod +x "$rootfs/usr/sbin/policy-rc.d"
in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"; }

# The base system: kernel, init, networking, ssh, sudo.
base=(linux-image-amd64 initramfs-tools systemd systemd-sysv udev dbus kmod openssh-server sudo iproute2
      netbase procps python3 ca-certificates)
# Only a cache of what ../setup.sh installs anyway (it checks and installs them itself): installing them
# here saves that time in every run inside the emulated guest.  linux-headers-amd64 is installed together
# with linux-image-amd64 so that the headers match the kernel the guest boots.
setup_cache=(python3-bpfcc python3-venv python3-pip nftables iproute2 tmux rsync ca-certificates
             linux-headers-amd64)
started=$SECONDS
in_root apt-get update -qq >"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; die "apt-get update in the image failed"; }
resolved=()
in_root apt-cache show systemd-resolved >/dev/null 2>&1 && resolved=(systemd-resolved)   # part of systemd in bullseye
say "installing ${#base[@]} base and ${#setup_cache[@]} setup.sh packages in the image"
in_root apt-get install -y -qq --no-install-recommends "${base[@]}" "${resolved[@]}" "${setup_cache[@]}" \
    >>"$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; die "apt-get install in the image failed"; }
in_root update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates in the image failed"
say "packages done in $((SECONDS - started)) s"

kver=$(find "$rootfs/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
[ -n "$kver" ] || die "no kernel in the image's /boot"
[ -f "$rootfs/boot/initrd.img-$kver" ] || die "no initrd for $kver in the image"
[ -e "$rootfs/usr/src/linux-headers-$kver/Makefile" ] || die "linux-headers-$kver did not come with linux-image-$kver"
say "guest kernel $kver"

# System configuration.
echo "tcptrace-$release" >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\ttcptrace-%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$release" \
    >"$rootfs/etc/hosts"
printf 'LABEL=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$label" >"$rootfs/etc/fstab"
cat >"$rootfs/etc/systemd/network/50-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
in_root systemctl enable systemd-networkd systemd-resolved ssh >/dev/null 2>&1 \
    || die "systemctl enable in the image failed"
# No background apt/maintenance jobs racing setup.sh's apt-get in a short-lived test VM.
for unit in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer; do
    ln -sfn /dev/null "$rootfs/etc/systemd/system/$unit"
done
mkdir -p "$rootfs/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$rootfs/etc/systemd/journald.conf.d/tcptrace.conf"
# The vagrant user: vagrant's well-known insecure key (vagrant swaps it for a new one on first `up`).
first_file() { local f; for f in "$@"; do [ -f "$f" ] && { echo "$f"; return; }; done; }
insecure_key=$(first_file /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
               /usr/share/vagrant/keys/vagrant.pub /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub)
[ -n "$insecure_key" ] || die "vagrant's insecure public key (keys/vagrant.pub) not found"
in_root useradd --create-home --shell /bin/bash vagrant
install -d -m 0700 "$rootfs/home/vagrant/.ssh"
install -m 0600 "$insecure_key" "$rootfs/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$rootfs/etc/sudoers.d/vagrant"
chmod 0440 "$rootfs/etc/sudoers.d/vagrant"
in_root passwd --lock root >/dev/null

# Clean up, then leave the chroot.
in_root apt-get clean
rm -f "$rootfs/usr/sbin/policy-rc.d"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/var/log/*.log
: >"$rootfs/etc/machine-id"                  # a new one on each first boot
rm -f "$rootfs/var/lib/dbus/machine-id"
for m in "$rootfs/dev/pts" "$rootfs/dev" "$rootfs/proc" "$rootfs/sys"; do umount "$m"; done
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"

# --- disk image: MBR, one bootable ext4 partition at 1 MiB, extlinux ------------------------------------
started=$SECONDS
raw=$work/disk.raw
truncate -s "${disk_gib}G" "$raw"
echo 'start=2048, type=83, bootable' | sfdisk --quiet "$raw"
part_bytes=$(( disk_gib * 1024 * 1024 * 1024 - 1048576 ))
loopdev=$(losetup --find --show --offset 1048576 --sizelimit "$part_bytes" "$raw")
# Without newer e2fsprogs' default features (orphan_file, metadata_csum_seed) where they exist: bullseye's
# 5.10 kernel and extlinux must read the file system too.
mkfs.ext4 -q -L "$label" -O ^orphan_file,^metadata_csum_seed "$loopdev" 2>/dev/null \
    || mkfs.ext4 -q -L "$label" "$loopdev"
mkdir -p "$mnt"
mount "$loopdev" "$mnt"
cp -a "$rootfs"/. "$mnt"/
mkdir -p "$mnt/boot/extlinux"
extlinux --install "$mnt/boot/extlinux" >/dev/null 2>&1 || die "extlinux --install failed"
# mitigations=off: a throw-away test VM under software emulation, where every syscall counts; it changes no
# TCP or tracing code path.
cat >"$mnt/boot/extlinux/extlinux.conf" <<EXTLINUX
DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
    LINUX /boot/vmlinuz-$kver
    INITRD /boot/initrd.img-$kver
    APPEND root=LABEL=$label ro console=tty0 console=ttyS0,115200n8 mitigations=off
EXTLINUX
umount "$mnt"
losetup -d "$loopdev"
loopdev=
mbr=$(first_file /usr/lib/syslinux/mbr/mbr.bin /usr/lib/EXTLINUX/mbr.bin /usr/share/syslinux/mbr.bin)
[ -n "$mbr" ] || die "syslinux mbr.bin not found (install syslinux-common)"
dd if="$mbr" of="$raw" bs=440 count=1 conv=notrunc status=none
qemu-img convert -O qcow2 "$raw" "$work/box.img"
rm -f "$raw"
say "disk image done in $((SECONDS - started)) s"

# --- the box ----------------------------------------------------------------------------------------------
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$disk_gib" >"$work/metadata.json"
cat >"$work/Vagrantfile" <<'BOXVAGRANTFILE'
# Built by tcptrace-bpf's vagrant/build-box.sh; the project's Vagrantfile sets everything else.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
BOXVAGRANTFILE
printf '%s\n' "$box_id" >"$work/tcptrace-box-id"
printf 'release=%s\nkernel=%s\nbuilt=%s\n' "$release" "$kver" "$(date -u +%FT%TZ)" >"$work/tcptrace-box-info"
tar -C "$work" -cf "$work/box.tar" metadata.json Vagrantfile box.img tcptrace-box-id tcptrace-box-info
mv -f "$work/box.tar" "$box_file"
printf '%s\n' "$box_id" >"$id_file"
say "built $box_file ($(du -h "$box_file" | cut -f1), kernel $kver)"
add_box
