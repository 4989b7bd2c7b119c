#!/usr/bin/env bash
# A volume moved between two nodes, each in its own network namespace
# joined by a veth pair: a 4 GiB raw image, half of it allocated.
#
#   dmm            dmm daemon on node A moves it to dmm daemon on node B
#                  (`-p target=node-b:/PATH`): negotiation, copy over NBD
#                  with TLS, switchover, handoff; `verify=none`
#   dmm-verified   the same with the default verification (each node
#                  hashes its chunks, only BLAKE3 digests cross the link)
#   qemu-img       qemu-img convert -n -W -m 16 in node A, from qemu-nbd
#                  exporting the image with TLS in node A to qemu-nbd with
#                  TLS in node B
#   nbdcopy        nbdcopy between the same two exports
#
# Each is timed from the request to the destination holding the volume
# (dmm: the migration's state switched-over); every result is checked with
# qemu-img compare. Then the cost of TLS: dmm migrate in node A into dmm
# serve in node B, with --tls=require and with plain text. Then a client's
# p99 during a move: fio (4 KiB random reads and writes, iodepth 16)
# through node A's export for as long as a move takes, against the same
# job on the image with no move.
#
# Usage: bench/between-nodes.sh [ROUNDS]   (default 3)
# Writes the "between-nodes" section of BENCHMARKS.md. Needs root (ip netns).

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-3}
bench_prepare qemu-img qemu-nbd nbdcopy fio ip

bench_workdir
size=$((4 << 30))
source_image=$work/source.raw
destination=$work/b/vm1.raw
mkdir -p "$work/b"
echo "creating a 4 GiB image with 2 GiB of random data in $work" >&2
random_image "$source_image" "$size" $((64 << 20)) $((64 << 20))
sync

# --- The two nodes -----------------------------------------------------------

tag=dmmbench$$
ns_a=$tag-a
ns_b=$tag-b
addr_a=10.250.0.1
addr_b=10.250.0.2
remove_namespaces() {
    ip netns del "$ns_a" 2>/dev/null || true
    ip netns del "$ns_b" 2>/dev/null || true
}
trap 'bench_cleanup; remove_namespaces' EXIT
ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add "v${$}a" netns "$ns_a" type veth peer name "v${$}b" netns "$ns_b"
ip -n "$ns_a" addr add "$addr_a/24" dev "v${$}a"
ip -n "$ns_b" addr add "$addr_b/24" dev "v${$}b"
for ns in "$ns_a" "$ns_b"; do
    ip -n "$ns" link set lo up
done
ip -n "$ns_a" link set "v${$}a" up
ip -n "$ns_b" link set "v${$}b" up
in_a() { ip netns exec "$ns_a" "$@"; }

# Certificates: one CA, a certificate per node (dmm's directories are laid
# out as QEMU's tls-creds-x509 and libnbd expect).
"$DMM" tls init "$work/ca" >/dev/null
# libnbd checks the server's certificate against the address too.
"$DMM" tls issue --ca "$work/ca" node-a --also 127.0.0.1 --also "$addr_a" --out "$work/node-a" >/dev/null
"$DMM" tls issue --ca "$work/ca" node-b --also "$addr_b" --out "$work/node-b" >/dev/null
echo token-for-the-benchmark >"$work/token"

# Starts node NAME's daemon in its namespace; sets DAEMON_PID.
start_node() {
    local name=$1 ns=$2 addr=$3 peer=$4 peer_addr=$5
    ip netns exec "$ns" "$DMM" daemon --state-dir "$work/$name-state" --node "$name" \
        --listen "$addr:7001" --token-file "$work/token" --tls-certificates "$work/$name" \
        --nbd-listen "0.0.0.0:10809" --tls=require --peer "$peer=$peer_addr:7001" \
        >/dev/null 2>>"$work/$name.log" &
    DAEMON_PID=$!
    bench_track "$DAEMON_PID"
    DAEMON_STATE=$work/$name-state
    for _ in $(seq 200); do
        dmm_cli list >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "node $name did not start; its log: $work/$name.log" >&2
    exit 1
}
start_node node-b "$ns_b" "$addr_b" node-a "$addr_a"
start_node node-a "$ns_a" "$addr_a" node-b "$addr_b"

# The migration ID of the last `dmm create`.
move() {
    dmm_cli create -p "source=$source_image" -p "target=node-b:$destination" \
        -p export=vm1 "$@"
}

# Deletes migration ID on node A (node B forgets the reception) and the
# destination image.
forget() {
    dmm_cli delete "$1" >/dev/null
    rm -f "$destination"
}

# --- The copies --------------------------------------------------------------

# qemu-nbd exporting the source in node A and an empty destination in node
# B, both with TLS.
start_qemu_nbd() {
    empty_image "$destination" "$size"
    # Not through in_a: $! must be the server itself, to stop it.
    ip netns exec "$ns_a" qemu-nbd -f raw \
        --object "tls-creds-x509,id=tls0,endpoint=server,dir=$work/node-a" \
        --tls-creds tls0 -p 10810 -b 127.0.0.1 -t "$source_image" >/dev/null 2>&1 &
    qemu_a=$!
    bench_track "$qemu_a"
    ip netns exec "$ns_b" qemu-nbd -f raw \
        --object "tls-creds-x509,id=tls0,endpoint=server,dir=$work/node-b" \
        --tls-creds tls0 -p 10810 -b "$addr_b" -t "$destination" >/dev/null 2>&1 &
    qemu_b=$!
    bench_track "$qemu_b"
    wait_port "$ns_a" 127.0.0.1 10810
    wait_port "$ns_b" "$addr_b" 10810
}

# Waits until something listens on ADDR:PORT in namespace NS.
wait_port() {
    for _ in $(seq 200); do
        ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $2:$3 in $1" >&2
    exit 1
}

stop_qemu_nbd() {
    bench_stop "$qemu_a"
    bench_stop "$qemu_b"
}

# One copy by TOOL, checked against the source (not timed); prints its
# seconds. dmm's destination is checked before the migration is deleted.
copy_checked() {
    local tool=$1 start id took
    case $tool in
    dmm | dmm-verified)
        rm -f "$destination"
        local verify=none
        [[ $tool == dmm-verified ]] && verify=full
        start=$(now)
        id=$(move -p "verify=$verify")
        wait_state "$id" switched-over
        took=$(since "$start")
        ;;
    qemu-img)
        start_qemu_nbd
        start=$(now)
        in_a qemu-img convert -n -W -m 16 \
            --object "tls-creds-x509,id=tls0,endpoint=client,dir=$work/node-a" \
            --image-opts "driver=nbd,host=127.0.0.1,port=10810,tls-creds=tls0,tls-hostname=node-a" \
            --target-image-opts "driver=nbd,host=$addr_b,port=10810,tls-creds=tls0,tls-hostname=node-b"
        took=$(since "$start")
        stop_qemu_nbd
        ;;
    nbdcopy)
        start_qemu_nbd
        start=$(now)
        in_a nbdcopy --request-size=1048576 \
            "nbds://127.0.0.1:10810?tls-certificates=$work/node-a&tls-hostname=node-a" \
            "nbds://$addr_b:10810?tls-certificates=$work/node-a&tls-hostname=node-b"
        took=$(since "$start")
        stop_qemu_nbd
        ;;
    esac
    qemu-img compare -q -f raw -F raw "$source_image" "$destination" ||
        { echo "$tool produced a different image" >&2; exit 1; }
    if [[ -n ${id:-} ]]; then forget "$id"; fi
    echo "$took"
}

tools=(dmm dmm-verified qemu-img nbdcopy)
declare -A copy_times
for round in $(seq "$ROUNDS"); do
    for tool in "${tools[@]}"; do
        cat "$source_image" >/dev/null
        took=$(copy_checked "$tool")
        copy_times[$tool]+="$took "
        echo "round $round $tool ${took}s" >&2
    done
done

# --- The cost of TLS ---------------------------------------------------------

# dmm migrate in node A into dmm serve in node B, MODE tls or plain.
plain_or_tls_once() {
    local mode=$1 server start took uri
    empty_image "$destination" "$size"
    local tls_args=(--tls=off)
    uri="nbd://$addr_b:10811/"
    if [[ $mode == tls ]]; then
        tls_args=(--tls=require --tls-certificates "$work/node-b")
        uri="nbds://$addr_b:10811/?tls-certificates=$work/node-a&tls-hostname=node-b"
    fi
    ip netns exec "$ns_b" "$DMM" serve "$destination" --listen "$addr_b:10811" "${tls_args[@]}" \
        >/dev/null 2>&1 &
    server=$!
    bench_track "$server"
    wait_port "$ns_b" "$addr_b" 10811
    rm -rf "$work/migrate-state"
    start=$(now)
    in_a "$DMM" migrate --state-dir "$work/migrate-state" --socket "$work/migrate.sock" \
        --exit-when-done --verify none "$source_image" "$uri" >/dev/null 2>&1
    took=$(since "$start")
    bench_stop "$server"
    qemu-img compare -q -f raw -F raw "$source_image" "$destination" ||
        { echo "dmm migrate ($mode) produced a different image" >&2; exit 1; }
    echo "$took"
}

declare -A wire
for round in $(seq "$ROUNDS"); do
    for mode in tls plain; do
        cat "$source_image" >/dev/null
        took=$(plain_or_tls_once "$mode")
        wire[$mode]+="$took "
        echo "round $round migrate-$mode ${took}s" >&2
    done
done

# --- A client during a move --------------------------------------------------

move_seconds=$(median_of copy_times dmm-verified)
fio_seconds=$(awk -v s="$move_seconds" 'BEGIN {printf "%d", s + 1}')

# fio's job through SOCKET for fio_seconds; prints "IOPS p99_usec".
client_job() {
    fio --name=load --ioengine=nbd --uri="nbd+unix:///$2?socket=$1" \
        --rw=randrw --bs=4k --iodepth=16 --size=1G --time_based \
        --runtime="$fio_seconds" --unified_rw_reporting=mixed \
        --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' '$3 == "load" && NF >= 50 { split($30, p, "="); printf "%d %d\n", $8, p[2] }'
}

declare -A client
for round in $(seq "$ROUNDS"); do
    cat "$source_image" >/dev/null
    "$DMM" serve "$source_image" --socket "$work/serve.sock" >/dev/null 2>&1 &
    server=$!
    bench_track "$server"
    wait_socket "$work/serve.sock"
    read -r iops p99 < <(client_job "$work/serve.sock" "")
    bench_stop "$server"
    rm -f "$work/serve.sock"
    client[baseline/iops]+="$iops "
    client[baseline/p99]+="$p99 "
    rm -f "$destination"
    id=$(move)
    read -r iops p99 < <(client_job "$work/node-a-state/nbd.sock" vm1)
    wait_state "$id" switched-over
    forget "$id"
    client[move/iops]+="$iops "
    client[move/p99]+="$p99 "
    echo "round $round client: baseline $(median ${client[baseline/p99]}) µs, during a move $p99 µs" >&2
done

# --- The report --------------------------------------------------------------

report() {
    echo "## Between nodes: a move over TLS vs qemu-img convert and nbdcopy"
    echo
    echo "\`bench/between-nodes.sh $ROUNDS\` on $(machine_line)."
    echo "A 4 GiB raw image, 2 GiB allocated (64 MiB data / 64 MiB hole), moved from node A to node B,"
    echo "each in its own network namespace, joined by a veth pair (both images on the same disk);"
    echo "every copy over NBD with TLS 1.3 and certificates from \`dmm tls\`; every result checked with"
    echo "\`qemu-img compare\`. Median of $ROUNDS interleaved rounds."
    echo
    echo "- \`dmm\`: \`dmm create -p target=node-b:PATH -p verify=none\` on node A's daemon, timed until the"
    echo "  migration is switched over (negotiation with node B, the copy, the switchover and the handoff)."
    echo "- \`dmm-verified\`: the same with the default verification: each node hashes its chunks (BLAKE3),"
    echo "  only the digests cross the link. The peers verify nothing."
    echo "- \`qemu-img\`: \`qemu-img convert -n -W -m 16\` in node A between qemu-nbd exports with TLS (the"
    echo "  source on node A, the destination on node B). \`nbdcopy\`: the same exports, \`--request-size=1048576\`."
    echo
    time_ratio_table --volume "$size" copy_times "${tools[@]}"
    echo
    echo "The cost of TLS: \`dmm migrate --verify none\` in node A into \`dmm serve\` in node B, the same copy"
    echo "with \`--tls=require\` and in plain text:"
    echo
    local t p
    t=$(median_of wire tls)
    p=$(median_of wire plain)
    echo "| transport | seconds (median) | volume MiB/s |"
    echo "|---|---:|---:|"
    echo "| TLS | $t | $(awk -v s="$t" -v b="$size" 'BEGIN {printf "%.0f", b / 1048576 / s}') |"
    echo "| plain | $p | $(awk -v s="$p" -v b="$size" 'BEGIN {printf "%.0f", b / 1048576 / s}') |"
    echo
    echo "TLS costs $(awk -v t="$t" -v p="$p" 'BEGIN {printf "%.0f", (t / p - 1) * 100}') % more time than plain text."
    echo
    echo "A client during a move: fio (4 KiB random reads and writes, iodepth 16) for ${fio_seconds} s through"
    echo "node A's export (its Unix socket) while the volume moves to node B, after the switchover through node B;"
    echo "the baseline is the same job on \`dmm serve\` of the image, no move."
    echo
    echo "| | IOPS | p99 ms |"
    echo "|---|---:|---:|"
    for key in baseline move; do
        echo "| $key | $(median_of client "$key/iops") | $(awk -v p="$(median_of client "$key/p99")" 'BEGIN {printf "%.2f", p / 1000}') |"
    done
    echo
    echo "All samples (seconds, one per round):"
    echo
    echo '```'
    for tool in "${tools[@]}"; do printf '%-13s %s\n' "$tool" "${copy_times[$tool]}"; done
    for mode in tls plain; do printf '%-13s %s\n' "migrate-$mode" "${wire[$mode]}"; done
    for key in baseline/iops baseline/p99 move/iops move/p99; do printf '%-13s %s\n' "$key" "${client[$key]}"; done
    echo '```'
}

publish_report between-nodes report
