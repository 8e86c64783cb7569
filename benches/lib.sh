# Shared by the benchmark scripts (sourced): the binary, the benchmark pipeline's config, moto.

# The sluice binary: $SLUICE_BIN, else the release (then the debug) build of $CARGO_TARGET_DIR
# or ./target. Needs $root (the repo).
bench_bin() {
  local target=${CARGO_TARGET_DIR:-$root/target} bin=${SLUICE_BIN:-}
  if [ -z "$bin" ]; then
    bin=$target/release/sluice
    [ -x "$bin" ] || bin=$target/debug/sluice
  fi
  echo "$bin"
}

# Writes the benchmark pipeline's config to FILE: one source and table TABLE of FORMAT, the
# example's schema and query (with SLUICE_TYPED=1 the typed variant in benches/typed/: times
# declared `timestamp` in the schema instead of text plus TRY_CAST in the query), partitioned
# by event_date, deduplicated by UNIQUE / ORDER (with SLUICE_LINEAGE=0 without the row lineage
# column `_sluice_source`); the lake at ROOT with the extra `[lake]` line EXTRA (may be empty).
# Needs $root.
# usage: bench_config FILE ROOT TABLE FORMAT UNIQUE ORDER [EXTRA]
bench_config() {
  local schema=$root/schemas/$3.toml query=$root/queries/$3.sql
  if [ "${SLUICE_TYPED:-0}" = 1 ]; then
    schema=$root/benches/typed/$3.toml query=$root/benches/typed/$3.sql
  fi
  cat >"$1" <<TOML
[lake]
root = "$2"
${7:-}

[[source]]
name = "$3"
format = "$4"
schema = "$schema"

[[table]]
name = "$3"
source = "$3"
query = "$query"
partition_by = ["event_date"]
unique_key = ["$5"]
order_by = "$6"
lineage = $([ "${SLUICE_LINEAGE:-1}" = 0 ] && echo false || echo true)
TOML
}

# Starts moto_server ($SLUICE_MOTO_SERVER, default ~/.cache/sluice-moto/bin/moto_server) on a
# free loopback port, logging to DIR/moto.log; sets $moto_pid, $endpoint and $python (the
# venv's) and points the AWS SDK at it.
bench_moto() {
  local moto=${SLUICE_MOTO_SERVER:-$HOME/.cache/sluice-moto/bin/moto_server} port
  python=$(dirname "$moto")/python
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$moto" -H 127.0.0.1 -p "$port" >"$1/moto.log" 2>&1 &
  moto_pid=$!
  endpoint=http://127.0.0.1:$port
  for _ in $(seq 100); do
    curl -sf "$endpoint/moto-api/" >/dev/null && break
    sleep 0.2
  done
  export AWS_ENDPOINT_URL=$endpoint AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null \
    AWS_SHARED_CREDENTIALS_FILE=/dev/null
  unset AWS_ENDPOINT_URL_S3 AWS_PROFILE AWS_SESSION_TOKEN
}
