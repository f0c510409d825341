#!/usr/bin/env bash
# The whole test suite in a VM per Debian release, one after the other, then a table.
#
#   vagrant/test-matrix.sh [-- PYTEST ARGS]
#
# Releases: bullseye (kernel 5.10), bookworm (6.1), trixie (6.12); TCPTRACE_RELEASES="..." picks others.
# Fails when any release failed.  Each release's results are in vagrant/results/RELEASE/.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || { echo "usage: $0 [-- PYTEST ARGS]" >&2; exit 2; }
    shift
fi
read -r -a releases <<<"${TCPTRACE_RELEASES:-bullseye bookworm trixie}"

field() {  # field RELEASE KEY: a value from results/RELEASE/summary.env, or "?"
    local key value
    while IFS='=' read -r key value; do
        [ "$key" = "$2" ] && { echo "${value:-?}"; return; }
    done <"$here/results/$1/summary.env" 2>/dev/null || true
    echo "?"
}

declare -A rc=()
for release in "${releases[@]}"; do
    printf '\n[test-matrix] ===== %s =====\n' "$release" >&2
    rc[$release]=0
    bash "$here/test-in-vm.sh" "$release" -- "$@" || rc[$release]=$?
done

failures=0
{
    printf '\n%-9s %-18s %6s %6s %6s %7s %5s %-13s %7s\n' release kernel passed failed errors skipped exit "failed step" time
    for release in "${releases[@]}"; do
        printf '%-9s %-18s %6s %6s %6s %7s %5s %-13s %6ss\n' "$release" "$(field "$release" kernel)" \
            "$(field "$release" passed)" "$(field "$release" failed)" "$(field "$release" errors)" \
            "$(field "$release" skipped)" "${rc[$release]}" "$(field "$release" failed_step | sed 's/^?$/-/')" \
            "$(field "$release" time_total)"
        [ "${rc[$release]}" -eq 0 ] || failures=$((failures + 1))
    done
} >&2
if [ "$failures" -gt 0 ]; then
    echo "[test-matrix] $failures of ${#releases[@]} releases failed" >&2
    exit 1
fi
echo "[test-matrix] all ${#releases[@]} releases passed" >&2
