#!/usr/bin/env bash
# Smoke run of every paude-proxy fuzz target: build them with cargo fuzz (libFuzzer with
# AddressSanitizer), then run each for a few seconds from its committed seeds. A crash, a
# failed property or a hang fails the run. .ci/run calls this after the test suite; long runs
# are described in README.md beside this file.
#
#   proxy/fuzz/smoke.sh            every target, FUZZ_SMOKE_SECONDS (default 5) each
#   proxy/fuzz/smoke.sh head host  just those
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz smoke: cargo-fuzz is not installed; run: cargo install cargo-fuzz --locked --version 0.13.2" >&2
  exit 1
fi
# cargo fuzz passes -Z flags (the sanitizer), which only a nightly compiler takes. Use the
# nightly toolchain when rustup has one; otherwise let the stable compiler take them, which
# ships the same sanitizer runtimes.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi
seconds=${FUZZ_SMOKE_SECONDS:-5}
cargo "${toolchain[@]}" fetch --locked
cargo "${toolchain[@]}" fuzz build -O
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/corpus/$t" "$work/artifacts/$t"
  # The seeds are read, never written: new inputs go to a scratch corpus.
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  if ! cargo "${toolchain[@]}" fuzz run -O "$t" "$work/corpus/$t" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
      -artifact_prefix="$work/artifacts/$t/" > "$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log" >&2
    echo "fuzz smoke: $t failed; the input is in the lines above (rerun it with: cargo fuzz run $t FILE)" >&2
    exit 1
  fi
  echo "fuzz smoke: $t: $(grep -E '^Done [0-9]+ runs' "$work/$t.log")"
done
echo "fuzz: ${#targets[@]} passed, 0 failed"
