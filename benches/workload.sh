#!/usr/bin/env bash
# usage: benches/workload.sh logs|tickets INPUT OUTDIR
# Runs the release binary on a fresh temp lake with the benchmark pipeline for KIND over INPUT
# (the example pipeline's own queries and schemas, one source, no aggregates) and leaves the
# table as Hive-partitioned Parquet at OUTDIR. Build first: cargo build --release.
set -euo pipefail
kind=${1:?kind: logs or tickets}
input=$(realpath "${2:?input file}")
out=${3:?output dir}
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/benches/lib.sh"
bin=${SLUICE_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/sluice}
case "$kind" in
  logs) table=app_logs; format=jsonl; unique=request_id; order=event_ts ;;
  tickets) table=support_tickets; format=csv; unique=ticket_id; order=updated_ts ;;
  *) echo "kind must be logs or tickets" >&2; exit 2 ;;
esac
work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lake/raw/$table"
# A hard link is free and the archive step moves it away; copy across file systems.
ln "$input" "$work/lake/raw/$table/$(basename "$input")" 2>/dev/null \
  || cp "$input" "$work/lake/raw/$table/"
bench_config "$work/sluice.toml" lake "$table" "$format" "$unique" "$order"
"$bin" --config "$work/sluice.toml" run ${SLUICE_ARGS:-} >&2
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/lake/processed/$table" "$out"
