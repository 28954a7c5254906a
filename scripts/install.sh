#!/usr/bin/env bash
# Installs sipbridge as a systemd service: the binary, the unit, its sysusers.d and
# tmpfiles.d files, the disclosure prompt, the docs and (only where none exists yet)
# the production profile /etc/sipbridge/sipbridge.toml.
#
#   sudo bash scripts/install.sh                      # builds with cargo build --release
#   sudo bash scripts/install.sh --binary PATH        # installs a prebuilt binary
#   DESTDIR=/tmp/stage bash scripts/install.sh ...    # stages into a directory (packaging)
#
# PREFIX (default /usr/local) holds bin/ and share/; the unit, profile and prompt paths
# are rewritten to it. With PREFIX=/usr the unit, sysusers and tmpfiles files go to
# /usr/lib/{systemd/system,sysusers.d,tmpfiles.d}, otherwise to /etc/…. Without DESTDIR
# it then creates the user (systemd-sysusers), the credentials directory
# (systemd-tmpfiles) and runs `systemctl daemon-reload`; it never starts the service.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"
binary=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [[ -z "$binary" ]]; then
    cargo build --release --locked
    binary="${CARGO_TARGET_DIR:-target}/release/sipbridge"
fi
[[ -x "$binary" ]] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }

if [[ "$PREFIX" == "/usr" ]]; then
    libdir="/usr/lib"
else
    libdir="/etc"
fi
unitdir="$libdir/systemd/system"
sysusersdir="$libdir/sysusers.d"
tmpfilesdir="$libdir/tmpfiles.d"
confdir="/etc/sipbridge"
share="$PREFIX/share/sipbridge"
doc="$PREFIX/share/doc/sipbridge"

# Paths in the shipped files assume /usr/local.
with_prefix() { sed "s#/usr/local#$PREFIX#g" "$1"; }
put() { # mode source destination (destination without DESTDIR)
    install -D -m "$1" "$2" "$DESTDIR$3"
    echo "installed $3"
}
put_text() { # mode source destination: like put, with PREFIX applied
    local tmp
    tmp="$(mktemp)"
    with_prefix "$2" >"$tmp"
    install -D -m "$1" "$tmp" "$DESTDIR$3"
    rm -f "$tmp"
    echo "installed $3"
}

put 0755 "$binary" "$PREFIX/bin/sipbridge"
put_text 0644 systemd/sipbridge.service "$unitdir/sipbridge.service"
put 0644 systemd/sipbridge.sysusers "$sysusersdir/sipbridge.conf"
put 0644 systemd/sipbridge.tmpfiles "$tmpfilesdir/sipbridge.conf"
put 0644 sip-profiles/prompts/disclosure.wav "$share/prompts/disclosure.wav"
put 0644 README.md "$doc/README.md"
put 0644 docs/configuration.md "$doc/configuration.md"
# The example profile: never over the administrator's own.
if [[ -e "$DESTDIR$confdir/sipbridge.toml" ]]; then
    put_text 0644 systemd/sipbridge.toml "$confdir/sipbridge.toml.example"
else
    put_text 0644 systemd/sipbridge.toml "$confdir/sipbridge.toml"
fi
install -d -m 0700 "$DESTDIR$confdir/credentials"

if [[ -n "$DESTDIR" ]]; then
    echo "staged into $DESTDIR (no users created, systemd not told)"
    exit 0
fi
if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$sysusersdir/sipbridge.conf"
fi
if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create "$tmpfilesdir/sipbridge.conf"
fi
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi
cat <<EOT
Next steps:
  1. Secrets (root only, read by systemd's LoadCredential=):
       head -c 32 /dev/urandom > $confdir/credentials/master.key
       printf '%s' 'AGENT-TOKEN' > $confdir/credentials/agent-token
       head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > $confdir/credentials/admin-token
       chmod 0600 $confdir/credentials/*
  2. Edit $confdir/sipbridge.toml (addresses, trunk, tenant, routes).
  3. systemctl enable --now sipbridge; later: systemctl reload sipbridge.
EOT
