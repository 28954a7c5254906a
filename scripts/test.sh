#!/usr/bin/env bash
# THE test command (README.md): installs the test tools if missing, then runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-test-deps.sh
cargo test --all-targets --no-fail-fast
cargo test --doc
