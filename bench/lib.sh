# Shared by the local benchmarks (sourced): a scratch folder that is cleaned up with the box, a
# free port, and a docker-registry on 127.0.0.1 holding the stand-in images of the given releases.

# use_sgbox: SGBOX, the sgbox the benchmark runs: the one given (a built binary: a benchmark only
# waits on its VMs), else a release build of this checkout.
use_sgbox() {
  if [ -z "${SGBOX:-}" ]; then
    cargo build -q --release --locked
    SGBOX=$PWD/target/release/sgbox
  fi
  SGBOX=$(realpath "$SGBOX")
}

# bench_box NAME: $WORK (scratch), S (sgbox's --state-dir in it) and the pids array; on exit the
# processes in pids are stopped, the box NAME deleted with its data, and $WORK removed. Needs $SGBOX.
bench_box() {
  BOX=$1
  WORK=$(mktemp -d "/tmp/sgbox-$BOX.XXXXXX")
  S=(--state-dir "$WORK/state")
  pids=()
  trap bench_cleanup EXIT
}
bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$SGBOX" "${S[@]}" down --name "$BOX" --cloud local --delete-data --yes >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry RELEASE...: sets REG (its port). With PAD_MB set, every stand-in also carries a
# layer of that many MB that does not compress (standins.py --pad-mb), as real images weigh.
start_registry() {
  REG=$(free_port)
  mkdir -p "$WORK/registry"
  printf 'version: 0.1\nlog: {level: warn}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: "127.0.0.1:%s"}\n' "$WORK/registry" "$REG" > "$WORK/registry.yml"
  docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$REG/v2/" >/dev/null && break; sleep 0.1; done
  local args=()
  for r in "$@"; do args+=(--release "$r"); done
  python3 tests/harness/standins.py push --build --registry "127.0.0.1:$REG" --catalog data/sourcegraph-compose-releases.json --pad-mb "${PAD_MB:-0}" "${args[@]}" >&2
}

now() { date +%s.%N; }
# local_base_image: the built Debian 13 image's folder (built once, then cached).
local_base_image() { "$SGBOX" image build --cloud local --output json --yes | python3 -c 'import json,sys; print(json.load(sys.stdin)["dir"])'; }
