#!/usr/bin/env bash
# Run fuzz targets one after another at idle priority, one job each, and print the figures
# for fuzz/README.md. Usage: fuzz/run.sh SECONDS_PER_TARGET [TARGET...]
# Needs nightly and cargo-fuzz (cargo install cargo-fuzz). Temp files go to tmpfs.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(wire_frame forward syslog container gossip_record gossip_packet spool_recovery wal_recovery)
fi
mkdir -p logs artifacts
export TMPDIR=${TMPDIR:-/dev/shm}
# Build once (normal priority, like any build); fuzz at idle priority.
[ -n "${NO_BUILD:-}" ] || cargo +nightly fuzz build -s none
bin=target/x86_64-unknown-linux-gnu/release
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    nice -n 19 "$bin/$t" -artifact_prefix="artifacts/$t/" "corpus/$t" \
        -runs=10000000 -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 \
        >"logs/$t.log" 2>&1 || echo "$t: fuzzer exited non-zero (crash?): see fuzz/logs/$t.log"
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "logs/$t.log" | tail -1)
    echo "$t: runs=${runs:-?} exec/s=${speed:-?} ${cov:-} crashes=$(ls artifacts/$t 2>/dev/null | wc -l)"
done
