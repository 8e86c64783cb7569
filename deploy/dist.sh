#!/usr/bin/env bash
# Builds the Lambda package: OUT (default target/lambda.zip) holding `bootstrap` (the release
# binary with the Lambda runtime, debug info stripped), deploy/sluice.toml as sluice.toml, and the
# repository's queries/ and schemas/. Upload it where deploy/template.yaml's CodeBucket/CodeKey
# point. SLUICE_BIN packages that binary instead of building one (the tests do).
#
# The binary links against the build machine's glibc: build on Amazon Linux 2023 (the
# provided.al2023 runtime, glibc 2.34) or older, e.g. in the builder stage of the Dockerfile;
# the script says so when the binary needs a newer glibc than the runtime has.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/lambda.zip}"
bin="${SLUICE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --manifest-path "$root/Cargo.toml" --release --features lambda,delta
  bin="${CARGO_TARGET_DIR:-$root/target}/release/sluice"
fi
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp "$bin" "$stage/bootstrap"
strip --strip-debug "$stage/bootstrap" 2>/dev/null || true
cp "$root/deploy/sluice.toml" "$stage/sluice.toml"
cp -r "$root/queries" "$root/schemas" "$stage/"
need=$(objdump -T "$stage/bootstrap" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -t. -k2 -n | tail -1 || true)
case "$need" in
  GLIBC_2.3[5-9]*|GLIBC_2.[4-9]*) echo "warning: bootstrap needs $need; provided.al2023 has glibc 2.34: build on Amazon Linux 2023" >&2 ;;
esac
mkdir -p "$(dirname "$out")"
python3 - "$stage" "$out" <<'PY'
import os, sys, zipfile
stage, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for base, _, files in os.walk(stage):
        for f in sorted(files):
            path = os.path.join(base, f)
            info = zipfile.ZipInfo.from_file(path, os.path.relpath(path, stage))
            if f == "bootstrap":
                info.external_attr = 0o755 << 16
            with open(path, "rb") as src:
                z.writestr(info, src.read(), zipfile.ZIP_DEFLATED)
PY
echo "$out"
