#!/usr/bin/env bash
# usage: benches/small_files.sh [FILES]
# Many small files on an S3 lake: starts moto_server on a loopback port, uploads FILES (default
# 1000) raw files of ~110 KB (`sluice generate logs`, split by lines) to s3://bench/lake/raw/,
# then times one `sluice run` of the logs benchmark pipeline on that lake. Prints the wall time,
# the report's per-step timings and requests, and the requests moto saw per method.
#
# SLUICE_BIN: the binary (default: release, else debug, of CARGO_TARGET_DIR or ./target).
# SLUICE_MOTO_SERVER: moto_server (default ~/.cache/sluice-moto/bin/moto_server).
# SLUICE_BENCH_DATA: where the generated files are kept between runs (default
# ~/.cache/sluice-bench/small-<FILES>); never inside the repo.
# SLUICE_CONCURRENCY: `[lake] max_concurrent_requests` (unset: the default, 32).
# SLUICE_ARGS: more flags for `sluice run`.
set -euo pipefail
files=${1:-1000}
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/benches/lib.sh"
bin=$(bench_bin)
data=${SLUICE_BENCH_DATA:-$HOME/.cache/sluice-bench/small-$files}
table=app_logs

# The input: ~110 KB a file (370 base rows of the logs workload each), generated once.
if [ ! -f "$data/.done" ]; then
  rm -rf "$data"
  mkdir -p "$data"
  "$bin" generate logs "$data/all.jsonl" --rows $((files * 370)) >&2
  (cd "$data" && split -n l/"$files" -d -a 5 --additional-suffix=.jsonl all.jsonl part-)
  rm "$data/all.jsonl"
  touch "$data/.done"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-small.XXXXXX")
bench_moto "$work"
trap 'kill $moto_pid 2>/dev/null; wait $moto_pid 2>/dev/null; [ -n "${SLUICE_KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"' EXIT
"$python" - "$endpoint" "$data" "$table" <<'PY'
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
endpoint, data, table = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
s3.create_bucket(Bucket="bench")
names = sorted(n for n in os.listdir(data) if n.endswith(".jsonl"))
def put(n):
    with open(os.path.join(data, n), "rb") as f:
        s3.put_object(Bucket="bench", Key=f"lake/raw/{table}/{n}", Body=f.read())
with ThreadPoolExecutor(16) as pool:
    list(pool.map(put, names))
size = sum(os.path.getsize(os.path.join(data, n)) for n in names)
print(f"uploaded {len(names)} files, {size / 1e6:.1f} MB", file=sys.stderr)
PY

bench_config "$work/sluice.toml" s3://bench/lake "$table" jsonl request_id event_ts \
  "${SLUICE_CONCURRENCY:+max_concurrent_requests = $SLUICE_CONCURRENCY}"

# Only the run's requests are counted from moto's log.
skip=$(wc -l <"$work/moto.log")
echo "moto cpu before the run: $(ps -o times= -p $moto_pid) s"
start=$(date +%s.%N)
"$bin" --config "$work/sluice.toml" run --json ${SLUICE_ARGS:-} >"$work/report.json" || true
end=$(date +%s.%N)
echo "moto cpu: $(ps -o times= -p $moto_pid) s total (upload included)"
echo "binary: $bin"
echo "wall: $(echo "$end - $start" | bc) s for $files files"
"$python" - "$work/report.json" "$work/moto.log" "$files" "$skip" <<'PY'
import collections, json, re, sys
report, log, files, skip = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = json.load(open(report))
st = collections.Counter(f["status"] for f in r["files"])
print("status:", r["status"], dict(st))
print("timings:", {k: round(v, 2) for k, v in sorted(r["timings"].items())})
if "requests" in r:
    print("requests (report):", json.dumps(r["requests"], sort_keys=True))
seen = collections.Counter()
for i, line in enumerate(open(log, errors="replace")):
    # Lines of 4xx answers are coloured: "\x1b[33mHEAD /...".
    m = re.search(r'"(?:\x1b\[[0-9;]*m)?(GET|HEAD|PUT|POST|DELETE) ', line)
    if i < skip:
        continue
    if m:
        seen[m.group(1)] += 1
total = sum(seen.values())
print(f"requests (moto log): {total} ({total / files:.1f} per file)", dict(sorted(seen.items())))
for e in r["errors"]:
    print("error:", e)
PY
