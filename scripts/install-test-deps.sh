#!/usr/bin/env bash
# Installs the system tools the tests use, on Debian 12, only when something is missing.
#
#   sip-tester          sipp: scripted SIP carrier for tests/sipp/*.xml
#   baresip(-core)      a real SIP phone on loopback
#   sox, libsox-fmt-all audio conversion (fixtures/make.sh, checking recordings)
#   espeak-ng           speech synthesis (fixtures/make.sh)
#   tshark              decoding captured SIP/RTP in failing tests
#   systemd             systemd-analyze verify for the unit file
#   kamailio            a record-routing SIP proxy in front of the daemon (tests/proxy_routing.rs),
#                       and the dispatcher in front of two daemons (tests/scale_out.rs)
#   kamailio            a record-routing SIP proxy in front of the daemon (tests/proxy_routing.rs)
#   postgresql          the PostgreSQL store backend's tests start their own server from
#                       /usr/lib/postgresql/<n>/bin (tests/common/pg.rs), as the `postgres`
#                       user the package creates
#
#   Pipecat (PyPI)      a real agent framework, in a virtual environment at
#                       $SIPBRIDGE_TEST_VENV (default /opt/sipbridge-test-venv)
#   moto (PyPI)         moto_server, an S3-compatible object store the recording tests
#                       upload to (tests/common/s3.rs), in a virtual environment at
#                       $SIPBRIDGE_MOTO_VENV (default /opt/moto-venv)
#   sipvicious (PyPI)   svmap and svcrack, the scanners tests/sipvicious.rs runs, in a
#                       virtual environment at $SIPBRIDGE_SIPVICIOUS_VENV
#                       (default /opt/sipvicious-venv)
#
# Idempotent: when every tool is present it does nothing (no apt-get update, no network).
# As root it runs `apt-get update` then `apt-get install` for the missing packages only;
# as another user with tools missing it names them and exits 1.
set -euo pipefail

# package:command pairs; a package with no command of its own is checked with dpkg.
checks=(
    "sip-tester:sipp"
    "baresip:baresip"
    "baresip-core:"
    "sox:sox"
    "libsox-fmt-all:"
    "espeak-ng:espeak-ng"
    "tshark:tshark"
    "systemd:systemd-analyze"
    "kamailio:kamailio"
    "postgresql:"
)

missing=()
for pair in "${checks[@]}"; do
    pkg="${pair%%:*}"
    cmd="${pair#*:}"
    if [[ -n "$cmd" ]]; then
        command -v "$cmd" >/dev/null 2>&1 && continue
    else
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' && continue
    fi
    missing+=("$pkg")
done

install_packages() {
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "install-test-deps: all test tools present"
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install-test-deps: missing packages: ${missing[*]}" >&2
        echo "install-test-deps: run as root (sudo bash scripts/install-test-deps.sh) or:" >&2
        echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    echo "install-test-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
}
install_packages

# SIPVicious (tests/sipvicious.rs runs svmap and svcrack against the daemon) in its own
# virtual environment, pinned. Skipped when that environment already has it.
sipvicious_venv="${SIPBRIDGE_SIPVICIOUS_VENV:-/opt/sipvicious-venv}"
sipvicious_version="0.3.8"
if [[ -x "$sipvicious_venv/bin/sipvicious_svmap" ]] \
    && "$sipvicious_venv/bin/pip" show sipvicious 2>/dev/null | grep -qx "Version: $sipvicious_version"; then
    echo "install-test-deps: sipvicious $sipvicious_version present ($sipvicious_venv)"
else
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        if [[ "$(id -u)" -ne 0 ]]; then
            echo "install-test-deps: python3 venv support is missing (Debian: python3-venv)" >&2
            exit 1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
    fi
    echo "install-test-deps: installing sipvicious $sipvicious_version into $sipvicious_venv"
    python3 -m venv "$sipvicious_venv"
    "$sipvicious_venv/bin/pip" install --quiet --disable-pip-version-check "sipvicious==$sipvicious_version"
fi

# moto's S3 server (tests/common/s3.rs: recordings in object storage) in its own virtual
# environment, pinned. Skipped when that environment already has it.
moto_venv="${SIPBRIDGE_MOTO_VENV:-/opt/moto-venv}"
moto_version="5.1.18"
if [[ -x "$moto_venv/bin/moto_server" ]] \
    && "$moto_venv/bin/pip" show moto 2>/dev/null | grep -qx "Version: $moto_version"; then
    echo "install-test-deps: moto $moto_version present ($moto_venv)"
else
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        if [[ "$(id -u)" -ne 0 ]]; then
            echo "install-test-deps: python3 venv support is missing (Debian: python3-venv)" >&2
            exit 1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
    fi
    echo "install-test-deps: installing moto $moto_version into $moto_venv"
    python3 -m venv "$moto_venv"
    "$moto_venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version"
fi

# Pipecat (tests/pipecat_bot.rs runs examples/pipecat_bot/bot.py; tests/agent_transfer.rs
# runs examples/transfer_agent.py with the `websockets` package Pipecat brings) in its own virtual
# environment, at the versions examples/pipecat_bot/requirements.txt pins. Skipped when
# that environment already has them (no network then).
venv="${SIPBRIDGE_TEST_VENV:-/opt/sipbridge-test-venv}"
requirements="$(dirname "${BASH_SOURCE[0]}")/../examples/pipecat_bot/requirements.txt"
stamp="$venv/.requirements"
if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$stamp" "$requirements"; then
    echo "install-test-deps: Pipecat environment present ($venv)"
    exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "install-test-deps: python3 venv support is missing (Debian: python3-venv)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
fi
echo "install-test-deps: installing Pipecat into $venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
