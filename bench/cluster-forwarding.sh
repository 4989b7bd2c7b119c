#!/usr/bin/env bash
# What it costs a client to reach a volume through a node of the cluster
# that does not own it: two dmm daemons on one etcd (on loopback), node A
# owning a 1 GiB volume (a migration to a local image, held before its
# switchover so that every request goes through its virtual device), and
# fio (4 KiB random reads and writes, iodepth 16, TLS, libnbd) through
#
#   owner       node A's NBD listener
#   forwarded   node B's NBD listener: node B forwards each request to node
#               A under node A's fencing token (VOLUME@TOKEN, TLS between
#               the nodes)
#   qemu-nbd    qemu-nbd with TLS exporting the same kind of image (the
#               peer: what a client gets from a plain NBD server)
#
# Usage: bench/cluster-forwarding.sh [ROUNDS] [SECONDS]   (default 3 and 15)
# Writes the "cluster-forwarding" section of BENCHMARKS.md.

source "$(dirname "$0")/lib.sh"

ROUNDS=${1:-3}
SECONDS_PER_JOB=${2:-15}
bench_prepare fio qemu-nbd etcd curl

bench_workdir
size=$((1 << 30))
source_image=$work/vm1.raw
random_image "$source_image" "$size"
empty_image "$work/vm1-copy.raw" "$size"
cp --sparse=always "$source_image" "$work/peer.raw"

"$DMM" tls init "$work/ca" >/dev/null
for name in node-a node-b client; do
    "$DMM" tls issue --ca "$work/ca" "$name" --also 127.0.0.1 --out "$work/$name" >/dev/null
done
echo token-for-the-benchmark >"$work/token"
# fio's nbd engine may not name a certificate directory in its URI: libnbd
# finds the client's in $HOME/.pki/libnbd.
mkdir -p "$work/client-home/.pki"
cp -r "$work/client" "$work/client-home/.pki/libnbd"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

etcd_client=$(port)
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_client" \
    --advertise-client-urls "http://127.0.0.1:$etcd_client" \
    --listen-peer-urls "http://127.0.0.1:$(port)" --log-level warn >/dev/null 2>&1 &
bench_track $!
for _ in $(seq 200); do
    curl -s "http://127.0.0.1:$etcd_client/health" | grep -q '"health":"true"' && break
    sleep 0.05
done

api_a=127.0.0.1:$(port) api_b=127.0.0.1:$(port)
nbd_a=127.0.0.1:$(port) nbd_b=127.0.0.1:$(port)
# Starts node NAME (API, NBD, its peer) and sets DAEMON_STATE to its state.
start_node() {
    local name=$1 api=$2 nbd=$3 peer=$4
    DAEMON_STATE=$work/$name-state
    "$DMM" daemon --state-dir "$DAEMON_STATE" --node "$name" --listen "$api" \
        --token-file "$work/token" --tls-certificates "$work/$name" --nbd-listen "$nbd" \
        --tls=require --peer "$peer" --etcd "http://127.0.0.1:$etcd_client" \
        >/dev/null 2>>"$work/$name.log" &
    bench_track $!
    for _ in $(seq 200); do
        dmm_cli list >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "node $name did not start; its log: $work/$name.log" >&2
    exit 1
}
start_node node-b "$api_b" "$nbd_b" "node-a=$api_a"
start_node node-a "$api_a" "$nbd_a" "node-b=$api_b"
dmm_cli create -p "source=$source_image" -p "target=$work/vm1-copy.raw" -p export=vm1 \
    -p switchover=manual >/dev/null

# Client certificates are optional on dmm's listeners (libnbd presents
# none here); qemu-nbd is told not to ask for one either.
qemu_port=$(port)
qemu-nbd -f raw --cache=writeback --aio=threads \
    --object "tls-creds-x509,id=tls0,endpoint=server,dir=$work/node-a,verify-peer=off" \
    --tls-creds tls0 -b 127.0.0.1 -p "$qemu_port" -x vm1 -t "$work/peer.raw" >/dev/null 2>&1 &
bench_track $!
for _ in $(seq 200); do
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$qemu_port" 2>/dev/null && break
    sleep 0.05
done

# fio through ADDRESS (host:port) checking the server's name NAME;
# prints "IOPS p99_usec".
client_job() {
    HOME=$work/client-home fio --name=load --ioengine=nbd \
        --uri="nbds://$1/vm1?tls-hostname=$2" \
        --rw=randrw --bs=4k --iodepth=16 --size=1G --time_based \
        --runtime="$SECONDS_PER_JOB" --ramp_time=1 --unified_rw_reporting=mixed \
        --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' '$3 == "load" && NF >= 50 { split($30, p, "="); printf "%d %d\n", $8, p[2] }'
}

paths=(owner forwarded qemu-nbd)
declare -A results
for round in $(seq "$ROUNDS"); do
    for path in "${paths[@]}"; do
        case $path in
        owner) read -r iops p99 < <(client_job "$nbd_a" node-a) ;;
        forwarded) read -r iops p99 < <(client_job "$nbd_b" node-b) ;;
        qemu-nbd) read -r iops p99 < <(client_job "127.0.0.1:$qemu_port" node-a) ;;
        esac
        [[ -n ${iops:-} && $iops -gt 0 ]] || { echo "fio through $path failed" >&2; exit 1; }
        results[$path/iops]+="$iops "
        results[$path/p99]+="$p99 "
        echo "round $round $path $iops IOPS, p99 $p99 µs" >&2
    done
done
DAEMON_STATE=$work/node-a-state
refused=$(dmm_cli --json nodes | sed -n 's/.*"refused_stale": *\([0-9]*\).*/\1/p')

report() {
    local owner path
    owner=$(median_of results owner/iops)
    echo "## A cluster: a volume reached through another node"
    echo
    echo "\`bench/cluster-forwarding.sh $ROUNDS $SECONDS_PER_JOB\` on $(machine_line)."
    echo "Two dmm nodes on one etcd, on loopback; node A owns a 1 GiB volume of random data."
    echo "fio's nbd engine (libnbd), 4 KiB random reads and writes"
    echo "at iodepth 16 over TLS, ${SECONDS_PER_JOB} s per job; medians of $ROUNDS interleaved rounds."
    echo
    echo "| path | IOPS | p99 ms | IOPS ÷ owner's |"
    echo "|---|---:|---:|---:|"
    for path in "${paths[@]}"; do
        awk -v p="$path" -v i="$(median_of results "$path/iops")" \
            -v l="$(median_of results "$path/p99")" -v o="$owner" \
            'BEGIN { printf "| %s | %d | %.2f | %.2f |\n", p, i, l / 1000, i / o }'
    done
    echo
    echo "Forwarded ÷ qemu-nbd: $(awk -v f="$(median_of results forwarded/iops)" \
        -v q="$(median_of results qemu-nbd/iops)" 'BEGIN { printf "%.2f", f / q }'). Requests" \
        "node A refused under a stale token: ${refused:-0} (none expected: no handoff)."
    echo
    echo '```'
    for path in "${paths[@]}"; do
        printf '%-16s %s\n' "$path/iops" "${results[$path/iops]}"
        printf '%-16s %s\n' "$path/p99" "${results[$path/p99]}"
    done
    echo '```'
}
report >"$work/report.md"
cat "$work/report.md"
publish_section cluster-forwarding "$work/report.md"
