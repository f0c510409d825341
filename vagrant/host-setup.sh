#!/usr/bin/env bash
# Host prerequisites for the VM test harness (Debian/Ubuntu host, as root): vagrant with the libvirt
# provider, QEMU, the tools build-box.sh uses, running libvirt daemons, a storage pool named "default"
# (the only one vagrant-libvirt uses without configuration) and libvirt's "default" NAT network.
# Idempotent: when everything is in place it only checks, in about a second.
set -euo pipefail

say() { printf '[host-setup] %s\n' "$*" >&2; }
die() { printf '[host-setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: it installs packages and starts libvirt"
command -v apt-get >/dev/null || die "this harness supports Debian/Ubuntu hosts (apt-get not found)"
export DEBIAN_FRONTEND=noninteractive

# --- packages -------------------------------------------------------------------------------------------
want=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base
      debootstrap debian-archive-keyring extlinux syslinux-common rsync python3 fdisk)
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
for pkg in "${want[@]}"; do installed "$pkg" || missing+=("$pkg"); done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    # Daemons must not be started by maintainer scripts (there may be no init system); started below.
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- /dev/kvm -------------------------------------------------------------------------------------------
# libvirt probes QEMU again (about two minutes) on every connection when /dev/kvm's owner/mode look wrong.
if [ -e /dev/kvm ]; then
    getent group kvm >/dev/null || groupadd --system kvm
    [ "$(stat -c %G /dev/kvm)" = kvm ] || chgrp kvm /dev/kvm
    [ "$(stat -c %a /dev/kvm)" = 660 ] || chmod 0660 /dev/kvm
fi

# --- daemons --------------------------------------------------------------------------------------------
if [ -d /run/systemd/system ]; then
    for unit in virtlogd libvirtd; do
        systemctl is-active --quiet "$unit" || { say "starting $unit"; systemctl start "$unit"; }
    done
else
    # No systemd as init (containers, CI sandboxes): run the daemons by hand.
    # Daemons keep every descriptor they inherit: start them with none but /dev/null, or a caller's pipe
    # (a CI log, a `| tee`) would never see end-of-file.
    start_daemon() (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec "$@" </dev/null >/dev/null 2>&1
    )
    for daemon in virtlogd libvirtd; do
        pgrep -x "$daemon" >/dev/null || { say "starting $daemon"; start_daemon "$daemon" -d; }
    done
fi
virsh_() { virsh -q -c qemu:///system "$@"; }
for _ in $(seq 1 60); do virsh_ version >/dev/null 2>&1 && break; sleep 1; done
virsh_ version >/dev/null 2>&1 || die "libvirtd does not answer on qemu:///system (see virsh -c qemu:///system version)"

# --- storage pool "default" -----------------------------------------------------------------------------
if ! virsh_ pool-info default >/dev/null 2>&1; then
    say "defining storage pool default at /var/lib/libvirt/images"
    mkdir -p /var/lib/libvirt/images
    virsh_ pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    virsh_ pool-autostart default >/dev/null
fi
if ! [[ $(virsh_ pool-info default) =~ State:[[:space:]]+running ]]; then
    say "starting storage pool default"
    virsh_ pool-start default >/dev/null
fi

# --- network "default" ----------------------------------------------------------------------------------
if ! virsh_ net-info default >/dev/null 2>&1; then
    xml=/usr/share/libvirt/networks/default.xml
    [ -f "$xml" ] || die "libvirt's default network definition $xml is missing"
    say "defining libvirt network default"
    virsh_ net-define "$xml" >/dev/null
    virsh_ net-autostart default >/dev/null
fi
if ! [[ $(virsh_ net-info default) =~ Active:[[:space:]]+yes ]]; then
    say "starting libvirt network default"
    virsh_ net-start default >/dev/null
fi

say "ready: vagrant $(vagrant --version 2>/dev/null | awk '{print $2}'), libvirt $(virsh_ version --daemon 2>/dev/null | awk '/daemon/ {print $NF}')"
