# Sourced by .ci/setup, .ci/test and .ci/run: `phase NAME CMD...` runs CMD, prints how long it
# took, and appends "NAME<TAB>SECONDS<TAB>STATUS" to $CI_PHASES (the table .ci/run prints at the
# end), so the next slow machine shows where the time goes.
CI_PHASES=${CI_PHASES:-$(pwd)/target/ci-phases.tsv}

# A fresh build gains nothing from incremental compilation's bookkeeping.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The lint gate runs inside the build: clippy-driver compiles sgbox's own targets (the workspace)
# with clippy's lints and -D warnings, while the dependencies are built by rustc as usual. This is
# what `cargo clippy --all-targets -- -D warnings` checks, without its second, check-mode
# compile of every dependency (274 s on a 2-core machine, beside the end-to-end test's boot).
# Every cargo call of setup and test sees the same wrapper, so nothing is built twice.
if [ -z "${RUSTC_WORKSPACE_WRAPPER+x}" ]; then
  if ! clippy=$(command -v clippy-driver); then
    echo "ci: clippy-driver is missing (rustup component add clippy)" >&2
    exit 1
  fi
  export RUSTC_WORKSPACE_WRAPPER="$clippy" CLIPPY_ARGS="-Dwarnings"
fi
export CI_PHASES
mkdir -p "$(dirname "$CI_PHASES")"

phase() {
  local name=$1 start rc=0
  shift
  start=$(date +%s)
  echo "ci: ── $name" >&2
  # In the background so that `set -e` keeps applying inside CMD (it is ignored in a `||` list).
  "$@" &
  wait $! || rc=$?
  local took=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$name" "$took" "$([ "$rc" = 0 ] && echo ok || echo "FAILED($rc)")" >> "$CI_PHASES"
  echo "ci: ── $name: ${took}s$([ "$rc" = 0 ] || echo ", exit $rc")" >&2
  return "$rc"
}

phase_table() {
  [ -f "$CI_PHASES" ] || return 0
  echo "ci: phases (seconds):" >&2
  awk -F'\t' '{ printf "ci:   %-34s %6d  %s\n", $1, $2, $3 }' "$CI_PHASES" >&2
  echo "ci:   (the end-to-end test runs beside the other test targets: the wall time is below)" >&2
}
