#!/usr/bin/env bash
# Enforces the sans-IO rule of DESIGN.md §2: the protocol core (src/sip, src/media,
# src/call) never imports tokio, never opens sockets, never reads the clock and never
# draws its own randomness. Time and an RNG are passed in by the caller.
#
# Usage: check-sans-io.sh [ROOT]   (ROOT defaults to the repository root)
# Exit 0 when clean (or when none of the directories exists yet); exit 1 listing every
# offending file:line. Whole-line comments (`//`, `///`, `//!`) are skipped so module
# docs may say "no tokio here"; code lines, including their trailing comments, count.
# A file's unit-test module (from its `#[cfg(test)]` line to the end of the file, the
# convention in this crate) is skipped: tests build a virtual-time origin with
# `Instant::now()` and advance it by hand, which is how the core is tested.
set -euo pipefail

root="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
dirs=()
for d in src/sip src/media src/call; do
    [[ -d "$root/$d" ]] && dirs+=("$root/$d")
done
if [[ ${#dirs[@]} -eq 0 ]]; then
    echo "check-sans-io: no sans-IO directories under $root yet: nothing to check"
    exit 0
fi

# One extended regexp per forbidden thing.
pattern='tokio|std::net::(UdpSocket|TcpStream|TcpListener)|(UdpSocket|TcpStream|TcpListener)|Instant::now|SystemTime::now|thread_rng|rand::rng\(\)'

# Print path:line:text for every match outside comments and outside the test module.
hits="$(find "${dirs[@]}" -name '*.rs' -print0 | xargs -0 -r awk -v pat="$pattern" '
    FNR == 1 { in_tests = 0 }
    /^[[:space:]]*#\[cfg\(test\)\]/ { in_tests = 1 }
    in_tests { next }
    /^[[:space:]]*\/\// { next }
    $0 ~ pat { print FILENAME ":" FNR ":" $0 }
' || true)"
if [[ -n "$hits" ]]; then
    echo "check-sans-io: FAILED: the sans-IO core must not use tokio, sockets, the clock or its own RNG:" >&2
    # Paths relative to ROOT, file:line:text.
    printf '%s\n' "$hits" | sed "s|^$root/||" >&2
    exit 1
fi
echo "check-sans-io: ok (${dirs[*]#"$root"/})"
