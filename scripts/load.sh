#!/usr/bin/env bash
# scripts/load.sh — whole-daemon load figures under SIPp, as ratios to a same-run baseline.
#
# Usage: bash scripts/load.sh [RATE CALLS]...        (default: 500 5000 1000 10000)
#
# For each RATE CALLS pair, on loopback only:
#   1. Baseline: SIPp's built-in `uas` scenario answers `sipp -sn uac -r RATE -m CALLS
#      -d DURATION`; its CPU time (utime+stime from /proc/PID/stat, read before and after
#      the calls) divided by CALLS is the baseline cost of a call.
#   2. The release daemon (`sipbridge run --config P`, P a temporary profile written here:
#      UDP listener on a free 127.0.0.1 port, trunk 127.0.0.0/8, tenant `demo` with the
#      echo pipeline and sip-profiles/prompts/disclosure.wav, rtp_timeout_s = 0,
#      drain_grace_s = 0, max_calls, rtp_ports and max_unconfirmed_calls_per_source sized
#      for RATE × call length) answers the
#      same uac load, once per recording setting; its CPU per call is measured the same
#      way, its peak RSS is VmHWM from /proc/PID/status.
# The machine may be noisy and shared, so compare the ratio daemon/uas, not the absolutes.
# SIPp talks to the daemon directly: its built-in `uac` ignores Record-Route, so it cannot
# load a daemon behind a record-routing proxy (use tests/sipp/proxy_call.xml for that).
# Output: one table (rate, calls, failed, recording, daemon µs/call, uas µs/call, ratio,
# peak RSS), then per daemon run a few /metrics counters — attempts by code, RTP packets
# sent per call (50 per second of call when the daemon keeps pace), recording bytes,
# store operations dropped on a full queue (lost CDR/recording records: not counted as
# failed calls), the store's group commits and rows per commit, finished calls still
# lingering for retransmissions 1 s after the last call (and their bytes each) — and its
# most frequent WARN/ERROR log lines.
# Exits 1 if any call failed (SIPp's FailedCall count, or calls SIPp did not finish),
# 2 on a set-up error. Every process runs under `timeout`; a trap ends them on exit.
#
# Environment:
#   LOAD_DURATION_MS  pause between ACK and BYE (default 1000)
#   LOAD_RECORDING    on | off | both (default on)
#   LOAD_RTP_START    first RTP port of the daemon's range (default 40000, even)
#   LOAD_LOG_FILTER   the daemon's --log-filter (default info)
#   LOAD_KEEP=1       keep the work directory (profiles, logs, SIPp stats) and print it
#   SIPBRIDGE_BIN     daemon binary (default: `cargo build --release`, then
#                     ${CARGO_TARGET_DIR:-target}/release/sipbridge)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
duration_ms=${LOAD_DURATION_MS:-1000}
recording=${LOAD_RECORDING:-on}
rtp_start=${LOAD_RTP_START:-40000}
log_filter=${LOAD_LOG_FILTER:-info}
tck=$(getconf CLK_TCK)

die() { echo "load.sh: $*" >&2; exit 2; }

if (($# == 0)); then set -- 500 5000 1000 10000; fi
(($# % 2 == 0)) || die "arguments come in RATE CALLS pairs"
case $recording in on) settings=(true) ;; off) settings=(false) ;; both) settings=(true false) ;;
    *) die "LOAD_RECORDING must be on, off or both" ;; esac
((rtp_start % 2 == 0)) || die "LOAD_RTP_START must be even"
for tool in sipp timeout ss curl awk; do
    command -v "$tool" >/dev/null || die "$tool not found (bash scripts/install-test-deps.sh)"
done

if [[ -z ${SIPBRIDGE_BIN:-} ]]; then
    (cd "$repo" && timeout 1800 cargo build --release --quiet) || die "cargo build --release failed"
    SIPBRIDGE_BIN=${CARGO_TARGET_DIR:-$repo/target}/release/sipbridge
fi
[[ -x $SIPBRIDGE_BIN ]] || die "no daemon binary at $SIPBRIDGE_BIN"

work=$(mktemp -d "${TMPDIR:-/tmp}/sipbridge-load.XXXXXX")
pids=()   # `timeout` processes started by spawn (it forwards TERM to its child)
kids=()   # their children
cleanup() {
    local pid i
    trap - INT TERM
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 30; i++)); do
        for pid in "${pids[@]}" "${kids[@]}"; do
            kill -0 "$pid" 2>/dev/null && break
            pid=
        done
        [[ -z ${pid:-} ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}" "${kids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ ${LOAD_KEEP:-0} == 1 ]]; then echo "work directory: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sets `port` to a port in 30000-32767 (below the ephemeral range, above the tests' RTP
# ranges) that no UDP or TCP socket uses and that this run has not handed out yet.
used_ports=" "
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((30000 + RANDOM % 2768))
        [[ $used_ports == *" $p "* ]] && continue
        if [[ -z $(ss -Htuan "( sport = :$p )" 2>/dev/null) ]]; then
            used_ports+="$p "
            port=$p
            return
        fi
    done
    die "no free port found"
}

# CPU ticks (utime + stime) of a live process. Field 2 (comm) may hold spaces: cut it off.
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat") || die "process $1 is gone"
    stat=${stat##*) }
    awk '{print $12 + $13}' <<<"$stat"
}

# Runs `timeout -k 5 LIMIT CMD…` in the background; sets `child` to the PID of CMD itself.
spawn() {
    local limit=$1 out=$2 tpid i
    shift 2
    timeout -k 5 "$limit" "$@" >"$out" 2>&1 </dev/null &
    tpid=$!
    pids+=("$tpid")
    child=
    for ((i = 0; i < 100; i++)); do
        child=$(cat "/proc/$tpid/task/$tpid/children" 2>/dev/null || true)
        child=${child%% *}
        if [[ -n $child ]] || ! kill -0 "$tpid" 2>/dev/null; then kids+=("$child"); return; fi
        sleep 0.05
    done
    die "could not find the child of timeout for: $*"
}

# Stops the last process spawned (and its `timeout`).
stop_last() {
    local tpid=${pids[-1]} kid=${kids[-1]} i
    kill -TERM "$kid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$tpid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$tpid" "$kid" 2>/dev/null || true
    wait "$tpid" 2>/dev/null || true
    unset 'pids[-1]' 'kids[-1]'
}

# Runs the uac load against 127.0.0.1:$1 in the foreground; sets `failed` to the calls
# that failed or did not finish, from SIPp's final statistics.
run_uac() {
    local target=$1 rate=$2 calls=$3 tag=$4 limit uac_port media_port ok bad
    limit=$((calls / rate + duration_ms / 1000 + 60))
    free_port; uac_port=$port
    free_port; media_port=$port
    # In the background so that a signal reaches the traps at once, not when SIPp ends.
    spawn "$limit" "$work/$tag-uac.out" sipp -sn uac -i 127.0.0.1 -p "$uac_port" \
        -mp "$media_port" -s 15551230000 "127.0.0.1:$target" -r "$rate" -m "$calls" \
        -d "$duration_ms" -timeout "${limit}s" -nostdin -trace_stat \
        -stf "$work/$tag-stat.csv" -fd 1
    wait "${pids[-1]}" || true
    unset 'pids[-1]' 'kids[-1]'
    ok=0 bad=$calls
    if [[ -s $work/$tag-stat.csv ]]; then
        read -r ok bad < <(awk -F';' '
            NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "SuccessfulCall(C)") s = i
                                                  if ($i == "FailedCall(C)") f = i } }
            END { print $s + 0, $f + 0 }' "$work/$tag-stat.csv")
    fi
    failed=$((calls - ok > bad ? calls - ok : bad))
}

# Measures SIPp's uas answering the load; sets `failed` and `ticks`.
baseline() {
    local rate=$1 calls=$2 tag="uas-$1-$2" uas before after
    free_port
    spawn $((calls / rate + duration_ms / 1000 + 120)) "$work/$tag.out" \
        sipp -sn uas -i 127.0.0.1 -p "$port" -nostdin
    uas=$child
    sleep 0.5
    before=$(cpu_ticks "$uas")
    run_uac "$port" "$rate" "$calls" "$tag"
    sleep 0.5
    after=$(cpu_ticks "$uas")
    stop_last
    ticks=$((after - before))
}

# Writes DIR/profile.toml for RATE with recording REC; sets `sip_port` and `admin_port`.
write_profile() {
    local dir=$1 rate=$2 rec=$3 max_calls rtp_end
    free_port; sip_port=$port
    free_port; admin_port=$port
    # Concurrency is about rate × (call length + set-up); leave 2 s of head room.
    max_calls=$((rate * (duration_ms / 1000 + 3)))
    rtp_end=$((rtp_start + 2 * max_calls - 1))
    ((rtp_end <= 65535)) || die "RTP range $rtp_start-$rtp_end does not fit; lower LOAD_RTP_START"
    cat >"$dir/profile.toml" <<EOF
[profile]
name = "load"
var_dir = "$dir/var"
max_calls = $max_calls
rtp_ports = { start = $rtp_start, end = $rtp_end }
drain_grace_s = 0

[profile.listen]
udp = ["127.0.0.1:$sip_port"]

[profile.admin]
listen = "127.0.0.1:$admin_port"

[profile.sip]

[profile.media]
rtp_timeout_s = 0

# SIPp is one source address: at RATE calls/s more than the default 10 of its
# answered calls wait for their ACK at once (a loaded machine's scheduling is
# enough), and the rest would get 503 "unconfirmed-limit".
[profile.security]
max_unconfirmed_calls_per_source = $max_calls

[[tenant]]
id = "demo"
recording = $rec
transcripts = false
prompt = "$repo/sip-profiles/prompts/disclosure.wav"
pipeline = { kind = "echo" }

[[trunk]]
name = "local"
allow = ["127.0.0.0/8"]
tenant = "demo"

[[route]]
number = "*"
tenant = "demo"
EOF
}

# Measures the daemon with recording REC; sets `failed`, `ticks` and `hwm` (peak RSS, kB).
daemon() {
    local rate=$1 calls=$2 rec=$3 dir sb before after i
    dir="$work/daemon-$1-$2-rec-$3"
    mkdir -p "$dir"
    write_profile "$dir" "$rate" "$rec"
    spawn $((calls / rate + duration_ms / 1000 + 120)) "$dir/daemon.log" \
        "$SIPBRIDGE_BIN" --log-format json --log-filter "$log_filter" run --config "$dir/profile.toml"
    sb=$child
    for ((i = 0; i < 100; i++)); do
        grep -q "sip listener bound" "$dir/daemon.log" && break
        kill -0 "$sb" 2>/dev/null || { cat "$dir/daemon.log" >&2; die "daemon exited"; }
        sleep 0.1
    done
    grep -q "sip listener bound" "$dir/daemon.log" || die "daemon did not bind in 10 s"
    sleep 0.5
    before=$(cpu_ticks "$sb")
    run_uac "$sip_port" "$rate" "$calls" "daemon-$rate-$calls-rec-$rec"
    sleep 1
    after=$(cpu_ticks "$sb")
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$sb/status")
    curl -s --max-time 5 "http://127.0.0.1:$admin_port/metrics" >"$dir/metrics.txt" || true
    stop_last
    ticks=$((after - before))
}

us_per_call() { awk -v t="$1" -v c="$2" -v k="$tck" 'BEGIN { printf "%.0f", t * 1e6 / k / c }'; }

rows=()
notes=()
any_failed=0
while (($# > 0)); do
    rate=$1 calls=$2
    shift 2
    [[ $rate =~ ^[1-9][0-9]*$ && $calls =~ ^[1-9][0-9]*$ ]] || die "bad pair: $rate $calls"
    baseline "$rate" "$calls"
    ufail=$failed uticks=$ticks
    uas_us=$(us_per_call "$uticks" "$calls")
    ((ufail == 0)) || notes+=("baseline $rate/s: SIPp uas lost $ufail calls (see LOAD_KEEP=1)")
    for rec in "${settings[@]}"; do
        daemon "$rate" "$calls" "$rec"
        dfail=$failed dticks=$ticks
        ((dfail == 0)) || any_failed=1
        d_us=$(us_per_call "$dticks" "$calls")
        ratio=$(awk -v d="$dticks" -v u="$uticks" 'BEGIN { if (u > 0) printf "%.1f", d / u; else print "n/a" }')
        rows+=("$(printf '%6s %7s %6s %5s %10s %10s %6s %8s' "$rate" "$calls" "$dfail" \
            "$([[ $rec == true ]] && echo on || echo off)" "$d_us" "$uas_us" "$ratio" \
            "$((hwm / 1024))")")
        dir="$work/daemon-$rate-$calls-rec-$rec"
        m=$(awk '/^sipbridge_call_attempts_total/ { a[$1] = $2 }
                 /^sipbridge_rtp_packets_sent_total / { r = $2 }
                 /^sipbridge_recording_bytes_written_total / { b = $2 }
                 /^sipbridge_store_queue_dropped_total / { q = $2 }
                 /^sipbridge_store_batches_total / { nb = $2 }
                 /^sipbridge_store_batched_writes_total / { nw = $2 }
                 /^sipbridge_sip_lingering_calls / { lc = $2 }
                 /^sipbridge_sip_lingering_bytes / { lb = $2 }
                 END { for (k in a) { sub(/^sipbridge_call_attempts_total/, "", k); s = s k "=" a["sipbridge_call_attempts_total" k] " " }
                       printf "attempts %srtp/call=%.1f rec_bytes=%d store_dropped=%d", s, r / c, b, q
                       printf " store_commits=%d rows/commit=%.1f", nb, (nb > 0 ? nw / nb : 0)
                       printf " lingering=%d (%.0f B each)", lc, (lc > 0 ? lb / lc : 0) }' \
            c="$calls" "$dir/metrics.txt" 2>/dev/null || true)
        notes+=("$rate/s recording $([[ $rec == true ]] && echo on || echo off): $m")
        while IFS= read -r line; do notes+=("  $line"); done < <(
            grep -E '"level":"(WARN|ERROR)"' "$dir/daemon.log" | grep -v '"configuration warning"' |
                sed -E 's/.*"level":"([A-Z]+)","message":"([^"]*)".*/\1 \2/' | sort | uniq -c |
                sort -rn | head -5 || true)
    done
done

printf '%6s %7s %6s %5s %10s %10s %6s %8s\n' rate calls failed rec daemon_us uas_us ratio rss_MB
printf '%s\n' "${rows[@]}"
printf '%s\n' "${notes[@]}"
exit "$any_failed"
