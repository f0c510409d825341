#!/usr/bin/env bash
# Run the project's whole test suite inside a fresh Debian VM, as root, and bring back the results.
#
#   vagrant/test-in-vm.sh [bullseye|bookworm|trixie] [-- PYTEST ARGS]      (default: bookworm)
#
# Steps: host-setup.sh (host packages, libvirt), build-box.sh (once per machine, then reused), `vagrant up`
# (boots the VM, rsyncs the checkout to /vagrant and provisions it with ./setup.sh), then in the guest
# `sudo CI=true ./setup.sh test -v --junitxml=/tmp/junit.xml PYTEST ARGS`.  Results in vagrant/results/RELEASE/:
# junit.xml, console.log (the test run's output), run.log (everything), serial.log (the guest's console),
# summary.env.  The VM is always destroyed at the end, also on failure or Ctrl-C.  The exit code is the test
# suite's, or non-zero when any other step failed.
# shellcheck disable=SC2317  # on_signal, finish and what they call run from traps
set -euo pipefail

say() { printf '[test-in-vm] %s\n' "$*" >&2; }
die() { printf '[test-in-vm] error: %s\n' "$*" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
release=bookworm
if [ $# -gt 0 ] && [ "$1" != "--" ]; then release=$1; shift; fi
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || die "usage: $0 [bullseye|bookworm|trixie] [-- PYTEST ARGS]"
    shift
fi
pytest_args=("$@")
case "$release" in
    bullseye | bookworm | trixie) ;;
    *) die "unknown release '$release' (use bullseye, bookworm or trixie)" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root: it installs host packages and drives libvirt's system instance"

# One run per release at a time; separate vagrant state and VM name per release, so releases never collide.
mkdir -p "$here/.vagrant"
exec 9>"$here/.vagrant/$release.lock"
flock -n 9 || die "another test-in-vm.sh run for $release is in progress"

results=$here/results/$release
rm -rf "$results"
mkdir -p "$results"
exec 3>&1 4>&2
exec > >(trap '' INT TERM; exec tee "$results/run.log") 2>&1   # tee outlives a Ctrl-C, for the summary
tee_pid=$!

export VAGRANT_CWD=$here
export VAGRANT_DOTFILE_PATH=$here/.vagrant/$release
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_DEFAULT_PROVIDER=libvirt
export TCPTRACE_BOX=tcptrace-debian-$release
export TCPTRACE_VM_NAME=tcptrace-bpf-test-$release
export TCPTRACE_VM_DRIVER=${TCPTRACE_VM_DRIVER:-qemu}   # software emulation unless told KVM works here
export TCPTRACE_VM_CONSOLE=$results/serial.log
up_timeout=${TCPTRACE_UP_TIMEOUT:-1800}
test_timeout=${TCPTRACE_TEST_TIMEOUT:-7200}

declare -A took=()
steps=(host-setup box up+provision tests destroy)
child='' current_step='' current_start=0
vm_created=0
tests_ran=0
test_rc=
failed_step=
started_all=$SECONDS

# step NAME LIMIT [LOG] -- CMD...: run CMD under `timeout` in the background (so that Ctrl-C reaches us at
# once), time it, optionally tee its output into LOG; return its exit code.
step() {
    local name=$1 limit=$2 log=$3 rc=0 start=$SECONDS
    shift 4
    say "--- $name: $*"
    current_step=$name current_start=$start
    if [ -n "$log" ]; then
        ( set -o pipefail; timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$log" ) &
    else
        timeout --kill-after=30 "$limit" "$@" &
    fi
    child=$!
    wait "$child" || rc=$?
    child='' current_step=''
    took[$name]=$(( ${took[$name]:-0} + SECONDS - start ))
    [ "$rc" -ne 124 ] || say "$name timed out after $limit s"
    return "$rc"
}

on_signal() {
    trap - INT TERM
    say "interrupted: stopping, then destroying the VM"
    if [ -n "$child" ]; then
        pkill -TERM -P "$child" 2>/dev/null || true   # the timeout process(es) under the step's subshell
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    [ -z "$current_step" ] || took[$current_step]=$(( ${took[$current_step]:-0} + SECONDS - current_start ))
    failed_step=${failed_step:-interrupted}
    exit "$1"
}

destroy_vm() {
    # vagrant first; then, should vagrant have lost track of it, the libvirt domain and its disks directly.
    timeout --kill-after=30 300 vagrant destroy -f || say "vagrant destroy failed"
    local domain=$TCPTRACE_VM_NAME
    if virsh -q -c qemu:///system dominfo "$domain" >/dev/null 2>&1; then
        say "removing leftover libvirt domain $domain"
        virsh -q -c qemu:///system destroy "$domain" >/dev/null 2>&1 || true
        virsh -q -c qemu:///system undefine "$domain" --remove-all-storage >/dev/null 2>&1 || return 1
    fi
}

junit_counts() {  # prints "tests failures errors skipped" from the junit file, or nothing
    python3 - "$1" <<'PY' 2>/dev/null || true
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
n = [0, 0, 0, 0]
for s in suites:
    for i, k in enumerate(("tests", "failures", "errors", "skipped")):
        n[i] += int(s.get(k, 0))
print(*n)
PY
}

finish() {
    local rc=$? start
    set +e
    trap - INT TERM
    if [ "$vm_created" = 1 ]; then
        start=$SECONDS
        say "--- destroy"
        destroy_vm || { say "could not destroy the VM $TCPTRACE_VM_NAME"; failed_step=${failed_step:-destroy}; }
        took[destroy]=$((SECONDS - start))
    fi

    local final=$rc
    if [ "$tests_ran" = 1 ] && [ "$failed_step" != interrupted ]; then final=$test_rc; fi
    if [ "$final" -eq 0 ] && [ -n "$failed_step" ]; then final=1; fi
    if [ "$final" -ne 0 ] && [ -z "$failed_step" ] && [ "$tests_ran" != 1 ]; then failed_step=unknown; fi

    local kernel counts passed='?' failed='?' errors='?' skipped='?' tests='?'
    kernel=$(sed -n 's/^\[guest\] kernel \([^[:space:]]*\).*/\1/p' "$results/console.log" 2>/dev/null | head -n 1)
    [ -n "$kernel" ] || kernel=$(grep -a -o -m 1 'Linux version [^ ]*' "$results/serial.log" 2>/dev/null | cut -d' ' -f3)
    kernel=${kernel:-?}
    counts=$(junit_counts "$results/junit.xml")
    if [ -n "$counts" ]; then
        read -r tests failed errors skipped <<<"$counts"
        passed=$((tests - failed - errors - skipped))
    fi
    local times="" s
    for s in "${steps[@]}"; do [ -n "${took[$s]:-}" ] && times+="$s ${took[$s]}s, "; done
    times+="total $((SECONDS - started_all))s"
    {
        printf 'release=%s\nkernel=%s\nexit=%s\nfailed_step=%s\n' "$release" "$kernel" "$final" "$failed_step"
        printf 'tests=%s\npassed=%s\nfailed=%s\nerrors=%s\nskipped=%s\n' "$tests" "$passed" "$failed" "$errors" "$skipped"
        for s in "${steps[@]}"; do printf 'time_%s=%s\n' "${s//[^a-z]/_}" "${took[$s]:-}"; done
        printf 'time_total=%s\n' "$((SECONDS - started_all))"
    } >"$results/summary.env"
    local what="$passed passed, $failed failed, $errors errors, $skipped skipped"
    [ -z "$failed_step" ] || what+=" (step failed: $failed_step)"
    say "$release kernel $kernel: $what | $times | exit $final"

    exec 1>&3 2>&4 3>&- 4>&-
    wait "$tee_pid" 2>/dev/null
    exit "$final"
}
trap finish EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# --- host and box ---------------------------------------------------------------------------------------
step host-setup 1800 "" -- bash "$here/host-setup.sh" 9>&- || { failed_step=host-setup; exit 1; }
step box 3600 "" -- bash "$here/build-box.sh" "$release" || { failed_step=box; exit 1; }

# --- VM --------------------------------------------------------------------------------------------------
vm_created=1   # from here on, whatever happens, destroy
# A VM left over from an interrupted run (killed too hard to clean up) would make `vagrant up` fail.
start=$SECONDS
destroy_vm >/dev/null 2>&1 || true
took[up+provision]=$((SECONDS - start))
step up+provision "$up_timeout" "" -- vagrant up --provider=libvirt || { failed_step=up+provision; exit 1; }

# --- tests -----------------------------------------------------------------------------------------------
# Stock Debian kernels take every timewait/keepalive hook mode: the suite must run each, not drop a refused one.
expect_phases=${TCPTRACE_EXPECT_PHASES-fentry,kprobe,timer}
# shellcheck disable=SC2016  # $(uname -r) is for the guest's shell
remote='echo "[guest] kernel $(uname -r)"; cd /vagrant && sudo CI=true TCPTRACE_EXPECT_PHASES='"$(printf '%q' "$expect_phases")"' ./setup.sh test -v --junitxml=/tmp/junit.xml'
if [ "${#pytest_args[@]}" -gt 0 ]; then remote+=" $(printf '%q ' "${pytest_args[@]}")"; fi
tests_ran=1
test_rc=0
step tests "$test_timeout" "$results/console.log" -- vagrant ssh --no-tty -c "$remote" || test_rc=$?
say "test suite exit code $test_rc"
start=$SECONDS
if timeout 300 vagrant ssh --no-tty -c 'cat /tmp/junit.xml' >"$results/junit.xml" 2>/dev/null \
        && [ -s "$results/junit.xml" ]; then
    say "junit XML: $results/junit.xml"
else
    rm -f "$results/junit.xml"
    say "no junit XML came back from the guest"
    failed_step=${failed_step:-junit}
fi
took[tests]=$((took[tests] + SECONDS - start))
exit "$test_rc"
