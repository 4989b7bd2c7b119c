#!/usr/bin/env bash
# A stream moved from a plain tier to a zstd tier while fio appends to it
# through the access point, against the same appends with no move; the
# bytes the move wrote to the new tier; the density of a text log; and
# append throughput through the access point against native appends to
# the same disk.
#
# 1. Switch: per round, fio appends SIZE in 4 KiB writes, each followed by
#    an fsync (`--file_append=1 --fsync=1 --write_lat_log`), to a stream of
#    a store whose policy never moves it (`above=1T`: no move), then to a
#    stream of a store that moves it once it holds a quarter of SIZE
#    (`above=SIZE/4`: prepare, switch, drain, link, all during the run).
#    The writer's largest append latency (write + fsync) in each run, and
#    the 99.9th percentile; target: with ÷ without <= 1.5.
# 2. The move's figures: bytes drained (the length at the switch) into the
#    target's head, bytes appended after the switch (to the target's
#    tail), and the target's size on disk.
# 3. Density: a text log of 256 MiB appended with `cat >>`, moved, its
#    stored bytes on the zstd tier.
# 4. Throughput: fio appends (1 MiB writes, no fsync; and 4 KiB writes
#    with fsync) through the access point and to a file in a directory of
#    the same disk.
#
# Usage: bench/stream-switch.sh [ROUNDS] [SIZE_MIB]   (defaults 5 64)
# Writes the "stream-switch" section of BENCHMARKS.md. Needs root (FUSE).

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-5}
SIZE_MIB=${2:-64}
bench_prepare fio python3 zstd
[[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 1; }

bench_workdir
start_daemon "$work/state" "$work/daemon.log"

# Creates a stream store under $work/NAME with the policy given; prints its
# migid. Its access point is $work/NAME/access.
new_store() {
    local name=$1 policy=$2 root=$work/$1
    mkdir -p "$root/access"
    bench_unmount_at_exit "$root/access"
    dmm_cli create -p kind=stream -p "orbit=fast:$root/fast,dense:$root/dense:zstd" \
        -p "access=$root/access" -p "$policy" | awk '{print $NF}'
}

# Waits until the access point of store NAME is mounted.
wait_mounted() {
    for _ in $(seq 200); do
        mountpoint -q "$work/$1/access" && return 0
        sleep 0.05
    done
    echo "the access point of $1 was not mounted" >&2
    exit 1
}

# fio appending SIZE_MIB MiB to FILE in BS writes (with an fsync after each
# when FSYNC is 1), its latency log under PREFIX; prints fio's bandwidth in
# KiB/s.
fio_append() {
    local file=$1 bs=$2 fsync=$3 prefix=$4
    fio --name=append --filename="$file" --rw=write --bs="$bs" --size="${SIZE_MIB}m" \
        --file_append=1 --fsync="$fsync" --ioengine=psync --end_fsync=1 \
        --write_lat_log="$prefix" --log_avg_msec=0 --output-format=terse --terse-version=3 |
        awk -F';' '{print $48}'
}

# The largest, and the 99.9th percentile, append latency (ms) in a fio
# latency log (its second column, in ns; writes only).
latencies() {
    awk -F', ' '$3 == 1 {print $2}' "$1" | sort -n |
        awk '{v[NR] = $1} END {i = int(NR * 0.999); if (i < 1) i = 1; printf "%.3f %.3f\n", v[NR] / 1e6, v[i] / 1e6}'
}

# The largest append latency (ms) within 100 ms of the append at OFFSET
# (the first after the switch) in a fio latency log.
switch_window() {
    awk -F', ' -v at="$2" '$3 == 1 {t[NR] = $1; l[NR] = $2; if ($5 == at) s = $1}
        END {for (i in t) if (t[i] >= s - 100 && t[i] <= s + 100 && l[i] > m) m = l[i]; printf "%.3f\n", m / 1e6}' "$1"
}

# A field of the JSON of `dmm stat ID`, through a Python expression on it.
stat_field() {
    dmm_cli --json stat "$1" | python3 -c "import json, sys; p = json.load(sys.stdin)['progress']; print($2)"
}

quarter=$((SIZE_MIB / 4))
declare -A ms figures
for round in $(seq "$ROUNDS"); do
    still=$(new_store "still-$round" above=1T)
    moving=$(new_store "moving-$round" "above=${quarter}M")
    wait_mounted "still-$round"
    wait_mounted "moving-$round"
    fio_append "$work/still-$round/access/fio.log" 4k 1 "$work/still-$round/lat" >/dev/null
    read -r max p999 < <(latencies "$work/still-$round/lat_lat.1.log")
    ms[max/without]+="$max "
    ms[p999/without]+="$p999 "
    fio_append "$work/moving-$round/access/fio.log" 4k 1 "$work/moving-$round/lat" >/dev/null
    read -r max p999 < <(latencies "$work/moving-$round/lat_lat.1.log")
    ms[max/with]+="$max "
    ms[p999/with]+="$p999 "
    wait_state "$moving" switched-over
    switched_at=$(stat_field "$moving" "p['figures']['drained']")
    ms[switch/with]+="$(switch_window "$work/moving-$round/lat_lat.1.log" "$switched_at") "
    figures[drained]+="$switched_at "
    figures[length]+="$(stat_field "$moving" "p['streams'][0]['bytes']") "
    figures[redirected]+="$(stat_field "$moving" "p['streams'][0]['bytes'] - p['figures']['drained']") "
    figures[stored]+="$(stat_field "$moving" "p['streams'][0]['stored']") "
    figures[moves]+="$(stat_field "$moving" "p['figures']['moves']") "
    for id in "$still" "$moving"; do dmm_cli delete "$id" >/dev/null 2>&1 || dmm_cli delete --force "$id" >/dev/null; done
    echo "round $round: largest append ${ms[max/without]}/ ${ms[max/with]}ms" >&2
done

# Density: a text log appended with cat, moved at once.
log_store=$(new_store density above=1T)
wait_mounted density
python3 - "$work/text.log" <<'PY'
import sys
with open(sys.argv[1], "w") as out:
    n, size = 0, 256 << 20
    while out.tell() < size:
        out.write(f"2026-12-04T{n // 3600 % 24:02}:{n // 60 % 60:02}:{n % 60:02}.{n % 1000:03}Z node-{n % 7} "
                  f"app[{1000 + n % 13}]: GET /api/v1/items/{n * 7919 % 100000} 200 {n % 997} ms\n")
        n += 1
PY
cat "$work/text.log" >>"$work/density/access/app.log"
dmm_cli set -p above=1 "$log_store" >/dev/null
until [[ $(stat_field "$log_store" "p['streams'][0]['tier'], p['streams'][0]['moving']") == "dense None" ]]; do
    sleep 0.2
done
log_bytes=$(stat_field "$log_store" "p['streams'][0]['bytes']")
log_stored=$(stat_field "$log_store" "p['streams'][0]['stored']")
dmm_cli commit "$log_store" >/dev/null
zstd -d -c -q "$work"/density/dense/app.log.*.zst | cmp - "$work/text.log"

# Throughput: through the access point and natively, interleaved.
tput_store=$(new_store throughput above=1T)
wait_mounted throughput
mkdir -p "$work/native"
declare -A kib
for round in $(seq "$ROUNDS"); do
    for where in access native; do
        dir=$work/throughput/access
        [[ $where == native ]] && dir=$work/native
        kib[big/$where]+="$(fio_append "$dir/big-$round.log" 1m 0 "$work/tput") "
        kib[small/$where]+="$(fio_append "$dir/small-$round.log" 4k 1 "$work/tput") "
    done
done
dmm_cli delete --force "$tput_store" >/dev/null 2>&1 || true

report() {
    local without with ratio
    echo "## Streams: a move to the zstd tier under a live writer"
    echo
    echo "\`bench/stream-switch.sh $ROUNDS $SIZE_MIB\` on $(machine_line)."
    echo "fio appends $SIZE_MIB MiB through a stream store's access point in 4 KiB writes, each followed by an fsync"
    echo "(\`--file_append=1 --fsync=1 --write_lat_log\`): to a stream that does not move, then to one the store moves"
    echo "from its plain tier to its zstd tier once it holds $quarter MiB (prepare, switch, drain, link: all during"
    echo "the run, the drain unthrottled). Both tiers and the native directory are on the same disk. Medians of $ROUNDS rounds."
    echo
    echo "| append latency (write + fsync) | no move, ms | with the move, ms | with ÷ without |"
    echo "|---|---:|---:|---:|"
    for what in switch max p999; do
        without=$(median_of ms "${what/switch/max}/without")
        with=$(median_of ms "$what/with")
        awk -v w="$what" -v a="$without" -v b="$with" 'BEGIN {
            names["switch"] = "largest within 100 ms of the switch (vs the largest of the run without)"
            names["max"] = "largest of the run (the drain and the link included)"
            names["p999"] = "99.9th percentile of the run"
            printf "| %s | %.3f | %.3f | **%.2f** |\n", names[w], a, b, b / a
        }'
    done
    echo
    echo "Target: the largest append latency during the switch ≤ 1.5× the largest without a move. The append"
    echo "at the switch offset (the drained bytes) is found in fio's latency log by its offset. fio reported no"
    echo "error in any run (it stops at the first)."
    echo
    echo "| the move (median) | bytes |"
    echo "|---|---:|"
    echo "| drained into the target's head (the stream's length at the switch) | $(median_of figures drained) |"
    echo "| redirected: appended to the target's tail after the switch | $(median_of figures redirected) |"
    echo "| the stream's length | $(median_of figures length) |"
    echo "| the target on the zstd tier (blocks allocated) | $(median_of figures stored) |"
    echo "| moves linked per run | $(median_of figures moves) |"
    echo
    echo "Drained + redirected = the length: the drain wrote the bytes below the switch offset into the target's"
    echo "head, the writer the others after it, and the link wrote only padding frames' headers (the head's unused"
    echo "room is a hole): each byte was written once to the new tier, and the target is one zstd file."
    echo
    awk -v b="$log_bytes" -v s="$log_stored" 'BEGIN {
        printf "Density: a text log of %.0f MiB (`cat >>`, then moved) takes %.1f MiB on the zstd tier: **%.1f×**;\n", b / 1048576, s / 1048576, b / s
    }'
    echo "\`zstd -d\` of the committed file equals the log."
    echo
    echo "| appends, fio | access point MiB/s | native MiB/s | access ÷ native |"
    echo "|---|---:|---:|---:|"
    for what in big small; do
        awk -v w="$what" -v a="$(median_of kib "$what/access")" -v n="$(median_of kib "$what/native")" 'BEGIN {
            names["big"] = "1 MiB writes, no fsync"; names["small"] = "4 KiB writes, fsync after each"
            printf "| %s | %.1f | %.1f | **%.2f** |\n", names[w], a / 1024, n / 1024, a / n
        }'
    done
    echo
    echo "All samples (ms; KiB/s):"
    echo
    echo '```'
    sample_lines ms max/without switch/with max/with p999/without p999/with
    sample_lines kib big/access big/native small/access small/native
    echo '```'
}
publish_report stream-switch report
