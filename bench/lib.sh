# shellcheck shell=bash
# Shared helpers of the benchmark scripts (sourced, not run).

set -euo pipefail

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034 # used by the scripts
DMM="$BENCH_ROOT/target/release/dmm"

# Builds dmm in release mode and checks the peer tools are installed.
bench_prepare() {
    (cd "$BENCH_ROOT" && cargo build --release --quiet)
    local missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        echo "missing tools: ${missing[*]} (run scripts/install-test-deps)" >&2
        exit 1
    fi
}

# --- The work directory and its cleanup -------------------------------------

BENCH_PIDS=()   # background processes to stop at exit
BENCH_MOUNTS=() # mount points to unmount at exit

# Creates the script's work directory under $TMPDIR (/var/tmp by default:
# the images are too large for a tmpfs /tmp), sets $work to it, and arranges
# for bench_cleanup to run when the script exits, however it exits.
bench_workdir() {
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/dmm-bench-$(basename "$0" .sh).XXXXXX")
    BENCH_SHELL=$BASHPID
    trap bench_cleanup EXIT
}

# Stops the given background processes at exit (unless bench_stop stopped
# them before): `command & bench_track $!`.
bench_track() {
    BENCH_PIDS+=("$@")
}

# Unmounts the given directories at exit if something is still mounted on
# them (a FUSE access point left behind by a killed daemon, say).
bench_unmount_at_exit() {
    BENCH_MOUNTS+=("$@")
}

# Stops a background process now: kills it, reaps it, and forgets it, so
# that the exit cleanup does not signal its pid again once reused.
bench_stop() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!BENCH_PIDS[@]}"; do
        if [[ ${BENCH_PIDS[i]} == "$pid" ]]; then unset 'BENCH_PIDS[i]'; fi
    done
    BENCH_PIDS=("${BENCH_PIDS[@]}")
}

# The EXIT trap: kills the tracked processes and waits for them, unmounts
# what is still mounted, then removes the work directory (never crossing into
# a mount that would not go away). Every step runs whatever the previous did.
# Only the script's own shell cleans up: a background child signalled
# between its fork and its exec runs the trap too, and must leave it alone.
bench_cleanup() {
    local pid dir
    [[ $BASHPID == "$BENCH_SHELL" ]] || return 0
    for pid in "${BENCH_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${BENCH_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for dir in "${BENCH_MOUNTS[@]}"; do
        if mountpoint -q "$dir" 2>/dev/null; then umount -l "$dir" || true; fi
    done
    if [[ -n ${work:-} ]]; then rm -rf --one-file-system "$work" || true; fi
}

# --- Images -----------------------------------------------------------------

# Creates PATH as a raw image of SIZE bytes holding random data: DATA bytes of
# data, then HOLE bytes of hole, repeated from offset 0 to the end (the last
# extent cut at SIZE), so that DATA / (DATA + HOLE) of it is allocated, in
# extents of DATA bytes. Without DATA and HOLE, all of it is data. Sizes are
# multiples of 1 MiB.
#   random_image "$work/source.raw" $((4 << 30)) $((64 << 20)) $((64 << 20))
random_image() {
    local path=$1 size=$2 data=${3:-$2} hole=${4:-0} offset
    if ((size % (1 << 20) || data % (1 << 20) || hole % (1 << 20) || data <= 0)); then
        echo "random_image: sizes must be positive multiples of 1 MiB" >&2
        exit 1
    fi
    rm -f "$path"
    truncate -s "$size" "$path"
    for ((offset = 0; offset < size; offset += data + hole)); do
        head -c $((data < size - offset ? data : size - offset)) /dev/urandom |
            dd of="$path" bs=1M seek=$((offset >> 20)) conv=notrunc status=none
    done
}

# Replaces PATH with an empty (all hole) raw image of SIZE bytes, the
# destination of a copy.
empty_image() {
    rm -f "$1"
    truncate -s "$2" "$1"
}

# Bytes of an image that hold data (what qemu-img map reports as data).
allocated_bytes() {
    qemu-img map --output=json -f raw "$1" |
        awk -F'[:,]' '/"data": true/ {for (i = 1; i <= NF; i++) if ($i ~ /"length"/) s += $(i + 1)} END {print s + 0}'
}

# --- Processes --------------------------------------------------------------

# Waits until a Unix socket exists.
wait_socket() {
    for _ in $(seq 200); do
        [[ -S $1 ]] && return 0
        sleep 0.05
    done
    echo "socket $1 did not appear" >&2
    exit 1
}

# Starts `dmm daemon` on the state directory STATE (its stderr into LOG,
# discarded by default), stopped at exit, and waits until its API answers.
# Sets DAEMON_PID and DAEMON_STATE, the state directory dmm_cli talks to.
start_daemon() {
    DAEMON_STATE=$1
    "$DMM" daemon --state-dir "$DAEMON_STATE" 2>"${2:-/dev/null}" &
    DAEMON_PID=$!
    bench_track "$DAEMON_PID"
    for _ in $(seq 200); do
        dmm_cli list >/dev/null 2>&1 && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "the daemon on $DAEMON_STATE did not start" >&2
    exit 1
}

# The dmm command line, talking to the daemon start_daemon started.
dmm_cli() {
    "$DMM" --state-dir "$DAEMON_STATE" "$@"
}

# Waits until the daemon's migration ID is in STATE; exits with its log if
# it fails instead (or if it cannot be asked).
wait_state() {
    local id=$1 want=$2 state
    while :; do
        state=$(dmm_cli --json stat "$id" | sed -n 's/.*"state": *"\([^"]*\)".*/\1/p') ||
            { echo "dmm stat $id failed" >&2; exit 1; }
        [[ $state == "$want" ]] && return 0
        [[ $state == failed ]] && { dmm_cli log "$id" >&2; exit 1; }
        sleep 0.05
    done
}

# Resident memory of a process, in KiB.
rss_kib() {
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}

# --- Measures ---------------------------------------------------------------

# The current time, in seconds, for since.
now() { date +%s.%N; }

# Seconds elapsed since START (a now), to the millisecond.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}'; }

# The median of the numbers given as arguments.
median() {
    printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'
}

# The scripts keep their samples in an associative array, KEY -> the
# samples of one round after another, each followed by a space.

# The median of the samples under KEY in the associative array named SAMPLES.
median_of() {
    local -n samples_=$1
    # shellcheck disable=SC2086 # one argument per sample
    median ${samples_[$2]}
}

# --- Reports ----------------------------------------------------------------

# Markdown table of times (lower is better), one row per TOOL in the order
# given, from the associative array named SAMPLES (tool -> seconds): the
# median, then the ratio to the first TOOL (dmm), tool ÷ dmm, which is the
# speed ratio dmm ÷ tool: above 1 dmm is faster. With --volume BYTES, a column
# of BYTES ÷ median in MiB/s comes between them.
#   time_ratio_table [--volume BYTES] SAMPLES TOOL...
time_ratio_table() {
    local volume=
    if [[ $1 == --volume ]]; then volume=$2; shift 2; fi
    local samples=$1 reference=$2 tool m reference_m
    shift
    reference_m=$(median_of "$samples" "$reference")
    if [[ -n $volume ]]; then
        echo "| tool | seconds (median) | volume MiB/s | $reference ÷ tool (time ratio, > 1 = $reference faster) |"
        echo "|---|---:|---:|---:|"
    else
        echo "| tool | seconds (median) | $reference ÷ tool (time ratio, > 1 = $reference faster) |"
        echo "|---|---:|---:|"
    fi
    for tool in "$@"; do
        m=$(median_of "$samples" "$tool")
        awk -v t="$tool" -v m="$m" -v d="$reference_m" -v s="$volume" 'BEGIN {
            if (s == "") printf "| %s | %.2f | %.2f |\n", t, m, m / d
            else printf "| %s | %.2f | %.0f | %.2f |\n", t, m, s / 1048576 / m, m / d
        }'
    done
}

# Markdown table of rates (higher is better, printed as integers), one row
# per "NAME UNIT" given, from the associative array named SAMPLES (NAME/TOOL
# -> values); TOOLS is a space-separated list, dmm first, then its peers. The
# columns: the median of every tool, dmm ÷ each peer, and (with two peers or
# more) dmm ÷ the faster peer, in bold.
#   rate_ratio_table SAMPLES "dmm qemu-nbd nbdkit" "4k-randread IOPS" ...
rate_ratio_table() {
    local samples=$1 reference row name unit medians header align tool
    local -a tools peers
    read -r -a tools <<<"$2"
    reference=${tools[0]}
    peers=("${tools[@]:1}")
    shift 2
    header="| job | unit" align="|---|---"
    for tool in "${tools[@]}"; do header+=" | $tool" align+="|---:"; done
    for tool in "${peers[@]}"; do header+=" | $reference ÷ $tool" align+="|---:"; done
    if ((${#peers[@]} > 1)); then header+=" | $reference ÷ faster peer" align+="|---:"; fi
    echo "$header |"
    echo "$align|"
    for row in "$@"; do
        read -r name unit <<<"$row"
        medians=
        for tool in "${tools[@]}"; do medians+=" $(median_of "$samples" "$name/$tool")"; done
        awk -v n="$name" -v u="$unit" -v medians="$medians" 'BEGIN {
            count = split(medians, m, " ")
            printf "| %s | %s", n, u
            for (i = 1; i <= count; i++) printf " | %d", m[i]
            best = m[2]
            for (i = 2; i <= count; i++) { printf " | %.2f", m[1] / m[i]; if (m[i] > best) best = m[i] }
            if (count > 2) printf " | **%.2f**", m[1] / best
            print " |"
        }'
    done
}

# One line per KEY of the associative array named SAMPLES: the key, padded,
# and its samples as they were recorded (for the "All samples" block).
sample_lines() {
    local -n samples_=$1
    local key
    shift
    for key in "$@"; do printf '%-13s %s\n' "$key" "${samples_[$key]}"; done
}

# The machine a report was made on.
machine_line() {
    echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(date -u +%Y-%m-%d)"
}

# Replaces the section between <!-- NAME:start --> and <!-- NAME:end --> of
# BENCHMARKS.md with the contents of a file (appending it if missing).
publish_section() {
    local name=$1 body=$2 file="$BENCH_ROOT/BENCHMARKS.md"
    [[ -f $file ]] || printf '# Benchmarks\n\nEvery table comes from one run of the script named in it, on the machine it names. Ratios are dmm ÷ peer: above 1.0 dmm is faster.\n' >"$file"
    if ! grep -q "<!-- $name:start -->" "$file"; then
        printf '\n<!-- %s:start -->\n<!-- %s:end -->\n' "$name" "$name" >>"$file"
    fi
    awk -v start="<!-- $name:start -->" -v end="<!-- $name:end -->" -v body="$body" '
        $0 == start { print; while ((getline line < body) > 0) print line; skip = 1; next }
        $0 == end { skip = 0 }
        !skip { print }
    ' "$file" >"$file.new"
    mv "$file.new" "$file"
}

# Runs COMMAND (a function printing the report in markdown), publishes what
# it printed as the section NAME of BENCHMARKS.md and shows it. A report
# that fails ends the script (set -e) and publishes nothing.
#   publish_report NAME COMMAND [ARG...]
publish_report() {
    local name=$1 body
    shift
    # In the work directory, so that a report that fails leaves nothing.
    body=$(mktemp --tmpdir="${work:-${TMPDIR:-/tmp}}" report.XXXXXX)
    "$@" >"$body"
    publish_section "$name" "$body"
    cat "$body"
    rm -f "$body"
}

# Writes N small files of 1 KiB to MAX_KIB KiB under DIR, 1,000 per
# directory (d0, d1, ...; file i in d(i % directories)), the same tree for
# the same SEED; awk writes them without a process per file.
#   small_files DIR N MAX_KIB SEED
small_files() {
    local dir=$1 n=$2 max_kib=$3 seed=$4
    mkdir -p "$dir"
    awk -v root="$dir" -v n="$n" -v extra=$((max_kib - 1)) -v seed="$seed" 'BEGIN {
        srand(seed)
        chunk = ""
        for (i = 0; i < 64; i++) chunk = chunk sprintf("%c", 97 + int(rand() * 26))
        dirs = int((n + 999) / 1000)
        for (d = 0; d < dirs; d++) system("mkdir -p " root "/d" d)
        for (i = 0; i < n; i++) {
            size = 1024 + int(rand() * extra * 1024)
            file = root "/d" (i % dirs) "/f" i
            body = ""
            while (length(body) < size) body = body chunk
            printf "%s", substr(body, 1, size) > file
            close(file)
        }
    }'
}
