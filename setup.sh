#!/usr/bin/env bash
# One entry point for set-up, the tracer and the test suite.  Idempotent; quick the second time.
#
#   sudo ./setup.sh              set up only
#   sudo ./setup.sh run [ARGS]   set up, then run `tcptrace-bpf ARGS` (no ARGS: the main job)
#   sudo ./setup.sh test [ARGS]  set up, then run the whole test suite (ARGS go to pytest)
#
# Set-up: Debian's python3-bpfcc (bcc's Python bindings exist only there; the PyPI package named "bcc" is
# an unrelated library and is never installed), kernel headers for the running kernel (or the nearest the
# distro has, with a warning), tracefs, and a virtual environment at .venv made from /usr/bin/python3 with
# --system-site-packages so it sees bcc, with this project installed into it.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo ./setup.sh ...): tracing needs it, and so does installing packages"
command -v apt-get >/dev/null || die "this set-up supports Debian and Ubuntu (apt-get not found)"

release=$(uname -r)
arch=$(dpkg --print-architecture)
export DEBIAN_FRONTEND=noninteractive

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
updated=0
apt_update() { if [ "$updated" -eq 0 ]; then say "apt-get update"; apt-get update -qq; updated=1; fi; }

# --- distro packages ---------------------------------------------------------------------------------
want=(python3-bpfcc python3-venv nftables iproute2 tmux)
missing=()
for pkg in "${want[@]}"; do installed "$pkg" || missing+=("$pkg"); done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    say "installing ${missing[*]}"
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- kernel headers ------------------------------------------------------------------------------------
# bcc compiles our programs against /lib/modules/$(uname -r)/build.  Our programs read only tracepoint
# fields (bcc takes their layout from tracefs) and struct fields at offsets from the kernel's BTF, so the
# nearest headers the distro has work when the exact ones do not exist.
build=/lib/modules/$release/build
if [ ! -e "$build/Makefile" ]; then
    apt_update
    if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
        say "installing linux-headers-$release"
        apt-get install -y -qq "linux-headers-$release" >/dev/null
    fi
fi
if [ ! -e "$build/Makefile" ]; then
    meta="linux-headers-$arch"
    apt-cache show "$meta" >/dev/null 2>&1 || meta=linux-headers-generic   # Ubuntu
    installed "$meta" || { say "installing $meta"; apt-get install -y -qq "$meta" >/dev/null; }
    flavour=${meta#linux-headers-}
    flavour_dir=$(ls -d /usr/src/linux-headers-*-"$flavour" 2>/dev/null | sort -V | tail -n 1)
    [ -n "$flavour_dir" ] || die "no kernel headers found under /usr/src after installing $meta"
    base=${flavour_dir%-"$flavour"}
    common=$base-common; [ -d "$common" ] || common=$base
    cat >&2 <<WARN
[setup] ############################################################################################
[setup] WARNING: the distro has no headers for the running kernel $release.
[setup] Linking the nearest it has, $(basename "$flavour_dir"), as $build.
[setup] tcptrace-bpf still works: it reads tracepoint fields (laid out from tracefs at compile time)
[setup] and takes every struct offset from the kernel's BTF, never from these headers.
[setup] ############################################################################################
WARN
    mkdir -p "/lib/modules/$release"
    ln -sfn "$flavour_dir" "$build"
    ln -sfn "$common" "/lib/modules/$release/source"
fi

# --- tracefs ---------------------------------------------------------------------------------------------
if [ ! -d /sys/kernel/tracing/events ] && [ ! -d /sys/kernel/debug/tracing/events ]; then
    say "mounting tracefs"
    mount -t tracefs nodev /sys/kernel/tracing || die "cannot mount tracefs on /sys/kernel/tracing"
fi

# --- virtual environment -----------------------------------------------------------------------------------
venv=$here/.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import bcc" >/dev/null 2>&1; then
    say "creating $venv from /usr/bin/python3 (with system site-packages, for bcc)"
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.tcptrace-installed" 2>/dev/null)" != "$stamp" ]; then
    say "installing tcptrace-bpf into $venv"
    # Trust the system's CA store, as Debian's own pip does; an upgraded pip would use its bundled one and
    # fail behind a proxy whose CA is installed system-wide.
    if [ -z "${PIP_CERT:-}" ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
    fi
    # An editable install from pyproject.toml alone needs pip 21.3+ (PEP 660); Debian 11 ships 20.3.
    if ! "$venv/bin/python" -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=21.3"
    fi
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    echo "$stamp" > "$venv/.tcptrace-installed"
fi

# --- what to run -----------------------------------------------------------------------------------------
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    "") say "ready: $venv/bin/tcptrace-bpf" ;;
    run) exec "$venv/bin/tcptrace-bpf" "$@" ;;
    test)
        "$venv/bin/ruff" check tcptrace_bpf tests bench
        exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@" ;;
    *) die "unknown command '$cmd' (use: run, test, or nothing)" ;;
esac
