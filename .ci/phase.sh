# Sourced by .ci/setup, .ci/test and .ci/run: `phase NAME CMD...` runs CMD, prints how long it
# took, and appends "NAME<TAB>SECONDS<TAB>STATUS" to $CI_PHASES (the table .ci/run prints at the
# end), so the next slow machine shows where the time goes.
CI_PHASES=${CI_PHASES:-$(pwd)/target/ci-phases.tsv}
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
