#!/usr/bin/env bash
# Checks systemd/sipbridge.service with `systemd-analyze verify` as installed:
# stages scripts/install.sh into a temporary DESTDIR, points the unit's command paths
# at the staged binary (verify needs ExecStart= to exist) and fails on any complaint
# (verify exits 0 on unknown keys and bad values: its output is what counts).
#
#   bash scripts/verify-unit.sh [--binary PATH]   # default: cargo build, target/debug
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

binary=""
if [[ "${1:-}" == "--binary" ]]; then
    binary="${2:?--binary needs a path}"
else
    cargo build --locked
    binary="${CARGO_TARGET_DIR:-target}/debug/sipbridge"
fi
command -v systemd-analyze >/dev/null || {
    echo "verify-unit: systemd-analyze missing (bash scripts/install-test-deps.sh)" >&2
    exit 1
}
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
DESTDIR="$stage" PREFIX=/usr/local bash scripts/install.sh --binary "$binary" >/dev/null
unit="$stage/sipbridge.service"
sed "s#/usr/local/bin/sipbridge#$stage/usr/local/bin/sipbridge#g" \
    "$stage/etc/systemd/system/sipbridge.service" >"$unit"
out="$(systemd-analyze verify "$unit" 2>&1)" || {
    echo "$out" >&2
    echo "verify-unit: systemd-analyze verify failed" >&2
    exit 1
}
if [[ -n "$out" ]]; then
    echo "$out" >&2
    echo "verify-unit: systemd-analyze verify complained" >&2
    exit 1
fi
echo "verify-unit: systemd/sipbridge.service verifies cleanly ($(systemd-analyze --version | head -1))"

# The sysusers.d and tmpfiles.d files, applied to empty roots (needs root for chown).
if [[ "$(id -u)" -ne 0 ]]; then
    echo "verify-unit: not root: sysusers/tmpfiles files not applied"
    exit 0
fi
mkdir -p "$stage/users/etc" "$stage/tmp-root"
touch "$stage/users/etc/passwd" "$stage/users/etc/group"
systemd-sysusers --root="$stage/users" "$stage/etc/sysusers.d/sipbridge.conf" 2>/dev/null
grep -q '^sipbridge:x:[0-9]*:[0-9]*:.*:/var/lib/sipbridge:/usr/sbin/nologin$' \
    "$stage/users/etc/passwd" || {
    echo "verify-unit: sysusers did not create the sipbridge user" >&2
    exit 1
}
systemd-tmpfiles --root="$stage/tmp-root" --create "$stage/etc/tmpfiles.d/sipbridge.conf"
[[ "$(stat -c '%a %U' "$stage/tmp-root/etc/sipbridge/credentials")" == "700 root" ]] || {
    echo "verify-unit: tmpfiles did not create /etc/sipbridge/credentials 0700 root" >&2
    exit 1
}
echo "verify-unit: sysusers and tmpfiles files apply cleanly"
