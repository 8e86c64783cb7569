#!/usr/bin/env bash
# usage: benches/workers.sh [FILES] [WORKERS...]
# N workers on one lake over FILES (default 1000) small raw files of ~110 KB (the logs workload
# split, as benches/small_files.sh), for each N of WORKERS (default 1 2 4), in three setups:
#   folder  N `sluice run --batch-files B` processes on a folder lake
#   s3      the same on an S3 lake (moto_server on a loopback port)
#   sqs     N `sluice watch --queue` workers on one SQS queue (moto), the files put on it by
#           `sluice enqueue` (one S3 event a file), as a backfill of raw/ would be
# Prints the wall time and files/s of each, and checks that every file was processed once and
# that the table (every row, sorted, hashed) is the one one worker makes.
#
# SLUICE_BIN: the binary (default: release, else debug, of CARGO_TARGET_DIR or ./target).
# SLUICE_MOTO_SERVER: moto_server (default ~/.cache/sluice-moto/bin/moto_server).
# SLUICE_BENCH_DATA: the generated files (default ~/.cache/sluice-bench/small-<FILES>).
# SLUICE_BATCH: `--batch-files` of the run workers (default 50).
# SLUICE_SETUPS: which setups (default "folder s3 sqs").
set -euo pipefail
files=${1:-1000}
shift || true
workers=${*:-1 2 4}
batch=${SLUICE_BATCH:-50}
setups=${SLUICE_SETUPS:-folder s3 sqs}
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/benches/lib.sh"
bin=$(bench_bin)
python=$(dirname "${SLUICE_MOTO_SERVER:-$HOME/.cache/sluice-moto/bin/moto_server}")/python
data=${SLUICE_BENCH_DATA:-$HOME/.cache/sluice-bench/small-$files}
table=app_logs

if [ ! -f "$data/.done" ]; then
  rm -rf "$data"
  mkdir -p "$data"
  "$bin" generate logs "$data/all.jsonl" --rows $((files * 370)) >&2
  (cd "$data" && split -n l/"$files" -d -a 5 --additional-suffix=.jsonl all.jsonl part-)
  rm "$data/all.jsonl"
  touch "$data/.done"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-workers.XXXXXX")
moto_pid=
cleanup() {
  [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null && wait "$moto_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT


# The config of one lake root.
config() { bench_config "$1" "$2" "$table" jsonl request_id event_ts; }

# Uploads the files to s3://<bucket>/lake/raw/ (a new bucket) and, with a queue name, creates
# that queue; prints its URL.
upload() {
  "$python" - "$endpoint" "$data" "$table" "$1" "${2:-}" <<'PY'
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
endpoint, data, table, bucket, queue = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
s3.create_bucket(Bucket=bucket)
names = sorted(n for n in os.listdir(data) if n.endswith(".jsonl"))
def put(n):
    with open(os.path.join(data, n), "rb") as f:
        s3.put_object(Bucket=bucket, Key=f"lake/raw/{table}/{n}", Body=f.read())
with ThreadPoolExecutor(16) as pool:
    list(pool.map(put, names))
if queue:
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    print(sqs.create_queue(QueueName=queue)["QueueUrl"])
PY
}

# Files left under raw/ of an S3 lake.
raw_left() {
  "$python" - "$endpoint" "$1" <<'PY'
import sys, boto3
endpoint, bucket = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
n = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="lake/raw/"):
    n += page.get("KeyCount", 0)
print(n)
PY
}

# Every row of the table, sorted, hashed; and the number of rows.
table_hash() {
  local h
  h=$("$bin" --config "$1" query "SELECT * FROM $table ORDER BY request_id" --format csv | md5sum | cut -c1-12)
  echo "$h $("$bin" --config "$1" query "SELECT count(*) AS n FROM $table" --format csv | sed -n 2p)"
}

# N `sluice run` workers at once; waits for all.
run_workers() {
  local cfg=$1 n=$2 pids=() i
  for i in $(seq "$n"); do
    "$bin" --config "$cfg" --batch-files "$batch" run --json >"$work/report-$i.json" 2>"$work/err-$i.log" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
}

# Processed files over the workers' reports, and how many distinct.
processed() {
  "$python" - "$work"/report-*.json <<'PY'
import json, sys
keys = []
for f in sys.argv[1:]:
    try:
        r = json.load(open(f))
    except Exception:
        continue
    keys += [x["key"] for x in r["files"] if x["status"] == "processed"]
print(f"{len(keys)} processed, {len(set(keys))} distinct")
PY
}

echo "binary: $bin; $files files, batch_files $batch; cores: $(nproc)"
for setup in $setups; do
  baseline=
  [ "$setup" != folder ] && [ -z "$moto_pid" ] && bench_moto "$work"
  for n in $workers; do
    rm -f "$work"/report-*.json
    cfg=$work/$setup-$n.toml
    case $setup in
      folder)
        lake=$work/lake-$n
        mkdir -p "$lake/raw/$table"
        cp "$data"/*.jsonl "$lake/raw/$table/"
        config "$cfg" "$lake"
        t0=$(date +%s.%N)
        run_workers "$cfg" "$n"
        t1=$(date +%s.%N)
        ;;
      s3)
        bucket=w-s3-$n
        upload "$bucket" >/dev/null
        config "$cfg" "s3://$bucket/lake"
        t0=$(date +%s.%N)
        run_workers "$cfg" "$n"
        t1=$(date +%s.%N)
        ;;
      sqs)
        bucket=w-sqs-$n
        queue=$(upload "$bucket" "q-$n")
        config "$cfg" "s3://$bucket/lake"
        t0=$(date +%s.%N)
        "$bin" --config "$cfg" enqueue --queue "$queue" >/dev/null
        te=$(date +%s.%N)
        echo "sqs    enqueue of $files files: $(echo "$te - $t0" | bc) s" >&2
        pids=()
        for i in $(seq "$n"); do
          "$bin" --config "$cfg" watch --queue "$queue" --wait 1 >/dev/null 2>"$work/err-$i.log" &
          pids+=($!)
        done
        while [ "$(raw_left "$bucket")" != 0 ]; do sleep 0.5; done
        t1=$(date +%s.%N)
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
        ;;
    esac
    wall=$(echo "$t1 - $t0" | bc)
    hash=$(table_hash "$cfg")
    [ -z "$baseline" ] && baseline=$hash
    same=$([ "$hash" = "$baseline" ] && echo "same as 1 worker" || echo "DIFFERENT from the first ($baseline)")
    if [ "$setup" = sqs ]; then counted="raw/ emptied"; else counted=$(processed); fi
    printf '%-6s %d workers: %6.1f s, %6.1f files/s; %s; table %s (%s)\n' \
      "$setup" "$n" "$wall" "$(echo "$files / $wall" | bc -l)" "$counted" "$hash" "$same"
    grep -h "ERROR" "$work"/err-*.log | head -3 || true
  done
done
