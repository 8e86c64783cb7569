#!/usr/bin/env bash
# usage: benches/incremental.sh WORKDIR
# The key index benchmark (issue 15): logs-workload tables of 0, 3.6 M and 36 M rows (36 M loaded
# as ten runs of 3.6 M, seeds 1..10), then into each, three times (each time into a fresh
# hard-linked copy of the table): a run of a 2,000-row file of new keys, and one of a 2,000-row
# file replacing 2,000 keys of one day (rows of the last file loaded, event_ts one hour later).
# Prints, per run: wall, the commit step, peak RSS, rows replaced, files and bytes rewritten; and
# the wall of each of the ten loads. Data and lakes go to WORKDIR (about 25 GB; generated files
# are kept for the next time). Build first: cargo build --release.
set -euo pipefail
work=$(realpath -m "${1:?work dir}")
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/benches/lib.sh"
bin=${SLUICE_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/sluice}
mkdir -p "$work/data"

gen() { # seed rows file
  [ -s "$3" ] || "$bin" generate logs "$3" --seed "$1" ${2:+--rows "$2"} >/dev/null
}

# A fresh lake with the benchmark pipeline.
lake() {
  rm -rf "$1"
  mkdir -p "$1/lake/raw/app_logs"
  bench_config "$1/sluice.toml" lake app_logs jsonl request_id event_ts
}

# Runs one file into a lake: prints "wall_s commit_s peak_mib written replaced files_rewritten mb_rewritten".
run() { # dir file
  cp "$2" "$1/lake/raw/app_logs/"
  local t
  t=$(mktemp)
  /usr/bin/time -f "%e %M" -o "$t" "$bin" --config "$1/sluice.toml" run --json > "$1/report.json"
  python3 - "$1/report.json" "$t" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
wall, rss = open(sys.argv[2]).read().split()
t = r.get("tables", {}).get("app_logs", {})
commit = r.get("timings", {}).get("commit", 0)
steps = " ".join(f"{k}={v:.2f}" for k, v in sorted(r.get("timings", {}).items()) if v >= 0.01)
print(f"{float(wall):.2f} {commit:.2f} {int(rss) // 1024} {t.get('rows_written', 0)} {t.get('rows_replaced', 0)} "
      f"{t.get('files_rewritten', 0)} {t.get('bytes_rewritten', 0) / 1e6:.1f} [{steps}]")
PY
  rm -f "$t"
}

# 2,000 rows of FILE on 2024-03-15 (ISO timestamps before 23:00), one hour later.
replacing() { # file out
  python3 - "$1" "$2" <<'PY'
import json, re, sys
pat = re.compile(r"^2024-03-15T(0\d|1\d|2[0-2])(:\d\d:\d\d(\.\d+)?Z)$")
out, n = open(sys.argv[2], "w"), 0
for line in open(sys.argv[1]):
    try:
        row = json.loads(line)
    except ValueError:
        continue
    m = pat.match(str(row.get("ts", "")))
    if not m or not row.get("request_id"):
        continue
    row["ts"] = f"2024-03-15T{int(m.group(1)) + 1:02d}{m.group(2)}"
    out.write(json.dumps(row) + "\n")
    n += 1
    if n == 2000:
        break
PY
}

gen 999 2000 "$work/data/new-2000.jsonl"
for s in $(seq 1 10); do gen "$s" "" "$work/data/logs-$s.jsonl"; done

echo "table_rows run wall_s commit_s peak_mib written replaced files_rewritten mb_rewritten"
# Empty table.
lake "$work/l0"
echo "0 new $(run "$work/l0" "$work/data/new-2000.jsonl")"
# 3.6 M rows, then 36 M rows (ten loads).
lake "$work/l36"
for s in $(seq 1 10); do
  echo "load-$s $(run "$work/l36" "$work/data/logs-$s.jsonl")" >&2
  if [ "$s" = 1 ] || [ "$s" = 10 ]; then
    rows=$([ "$s" = 1 ] && echo 3.6M || echo 36M)
    replacing "$work/data/logs-$s.jsonl" "$work/data/replace-$s.jsonl"
    # Each probe run three times into its own hard-linked copy of the table (sluice never
    # changes a file in place): a copy by bytes would evict the table from the page cache.
    for kind in new replace; do
      f=$([ "$kind" = new ] && echo new-2000 || echo "replace-$s")
      for try in 1 2 3; do
        rm -rf "$work/probe"
        cp -al "$work/l36" "$work/probe"
        echo "$rows $kind $(run "$work/probe" "$work/data/$f.jsonl")"
      done
    done
    rm -rf "$work/probe"
  fi
done
