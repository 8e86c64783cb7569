#!/usr/bin/env bash
# usage: benches/distributed.sh [RUNS]
# The distributed engine's overhead on one machine: the example's two aggregates
# (queries/aggregates/*.sql) over the 1x workload's tables (gen.py's logs.jsonl and tickets.csv),
# by `sluice query` here and on 1 coordinator + 2 `sluice worker`s on loopback, RUNS times each
# (default 3), alternating. Prints each run's wall time, the medians and their ratio, and the peak
# RSS of the coordinator (largest over its runs) and of each worker (over its life); checks that
# both give the same rows.
#
# SLUICE_BIN: the binary, built with --features distributed (default: release, else debug, of
# CARGO_TARGET_DIR or ./target). SLUICE_BENCH_DATA: the generated files (default
# ~/.cache/sluice-bench, as benches/README says).
set -euo pipefail
runs=${1:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/benches/lib.sh"
bin=$(bench_bin)
data=${SLUICE_BENCH_DATA:-$HOME/.cache/sluice-bench}
work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-distributed.XXXXXX")
pids=()
cleanup() {
  # The workers are children of /usr/bin/time, which reports once they exit.
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/sluice.toml" <<TOML
[lake]
root = "$work/lake"

[[source]]
name = "app_logs"
format = "jsonl"
schema = "$root/schemas/app_logs.toml"

[[source]]
name = "support_tickets"
format = "csv"
schema = "$root/schemas/support_tickets.toml"

[[table]]
name = "app_logs"
source = "app_logs"
query = "$root/queries/app_logs.sql"
partition_by = ["event_date"]
unique_key = ["request_id"]
order_by = "event_ts"

[[table]]
name = "support_tickets"
source = "support_tickets"
query = "$root/queries/support_tickets.sql"
partition_by = ["event_date"]
unique_key = ["ticket_id"]
order_by = "updated_ts"
TOML
mkdir -p "$work/lake/raw/app_logs" "$work/lake/raw/support_tickets"
cp "$data/logs.jsonl" "$work/lake/raw/app_logs/"
cp "$data/tickets.csv" "$work/lake/raw/support_tickets/"
"$bin" --config "$work/sluice.toml" run >/dev/null
count() { "$bin" --config "$work/sluice.toml" query --format csv "SELECT count(*) FROM $1" | sed -n 2p; }
echo "tables: app_logs $(count app_logs) rows, support_tickets $(count support_tickets) rows"

urls=()
for w in 1 2; do
  /usr/bin/time -f "%M" -o "$work/worker$w.rss" "$bin" -v --config "$work/sluice.toml" worker \
    --listen 127.0.0.1:0 >"$work/worker$w.out" 2>"$work/worker$w.err" &
  pids+=($!)
  for _ in $(seq 100); do
    grep -q listening "$work/worker$w.out" 2>/dev/null && break
    sleep 0.1
  done
  urls+=("$(sed -n 's/^sluice worker listening on //p' "$work/worker$w.out")")
done
workers=$(IFS=,; echo "${urls[*]}")

# One query: its wall seconds; its peak RSS (KiB) appended to $work/<mode>.rss.
one() {
  local mode=$1 sql=$2 out=$3 start end
  local extra=()
  [ "$mode" = distributed ] && extra=(--workers "$workers")
  start=$(date +%s.%N)
  /usr/bin/time -f "%M" -a -o "$work/$mode.rss" "$bin" --config "$work/sluice.toml" "${extra[@]}" \
    query --format csv "$sql" >"$out"
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for agg in "$root"/queries/aggregates/*.sql; do
  sql=$(grep -v '^--' "$agg")
  name=$(basename "$agg" .sql)
  : >"$work/$name.local" ; : >"$work/$name.distributed"
  for i in $(seq "$runs"); do
    one local "$sql" "$work/local.csv" >>"$work/$name.local"
    one distributed "$sql" "$work/distributed.csv" >>"$work/$name.distributed"
    # Same rows (floats to 9 significant digits: sums add in another order).
    python3 - "$work/local.csv" "$work/distributed.csv" <<'PY'
import csv, sys
def rows(p):
    out = []
    for r in csv.reader(open(p)):
        out.append(tuple(f"{float(v):.9e}" if v.replace('.', '', 1).replace('-', '', 1).replace('e', '', 1).isdigit() and '.' in v else v for v in r))
    return out
a, b = rows(sys.argv[1]), rows(sys.argv[2])
assert a == b, f"results differ: {len(a)} vs {len(b)} rows"
PY
  done
  l=$(median <"$work/$name.local"); d=$(median <"$work/$name.distributed")
  echo "$name: local $(tr '\n' ' ' <"$work/$name.local")-> median $l s; distributed $(tr '\n' ' ' <"$work/$name.distributed")-> median $d s; ratio $(echo "scale=2; $d / $l" | bc)"
done
for p in "${pids[@]}"; do pkill -TERM -P "$p" || true; done
wait "${pids[@]}" 2>/dev/null || true
pids=()
echo "peak RSS: local query $(sort -n "$work/local.rss" | tail -1) KiB; coordinator $(sort -n "$work/distributed.rss" | tail -1) KiB; worker 1 $(cat "$work/worker1.rss") KiB; worker 2 $(cat "$work/worker2.rss") KiB"
echo "tasks: worker 1 $(grep -c "tasks arrived" "$work/worker1.err" || true) query sessions, worker 2 $(grep -c "tasks arrived" "$work/worker2.err" || true)"
