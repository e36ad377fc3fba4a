#!/usr/bin/env bash
# Benchmark (not a test): time from `sgbox up --cloud local` to healthy, from an image with the
# release baked in (`sgbox image build --cloud local --version`, the registry stopped while it
# boots) against the plain base image pulling every image from a registry on this machine, in
# the same run, on the same machine, in turn. Prints both times, the ratio, and each `up`'s
# phases; the bake's own time is printed once (it is paid once per release, not per box).
# Needs what the local-box test needs (bash .ci/setup, root).
#
#   bash bench/local-baked.sh [RUNS]      (default 1 pair; each pair: plain, then baked)
#   SGBOX=target/debug/sgbox bash bench/local-baked.sh   (a built sgbox: it only waits on the VMs)
#   PAD_MB=60 bash bench/local-baked.sh   (each stand-in image 60 MB heavier, in bytes that do not
#     compress: the stand-ins weigh about 16 MB a release in all, where pulling is nearly free
#     and the comparison says little about real images; the size of a release is printed)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1}
RELEASE=7.5.4453
source bench/lib.sh
use_sgbox
bench_box bench-baked

IMAGE=$(local_base_image)
start_registry "$RELEASE"
du -sb "$WORK/registry" | awk -v pad="${PAD_MB:-0}" '{printf "release %s in the registry: %.0f MB (padding %s MB an image)\n", "'"$RELEASE"'", $1/1e6, pad}'
MIRROR=(--registry-mirror "http://10.0.2.2:$REG" --mirror-mode tags-only)
"$SGBOX" image build --cloud local --version "$RELEASE" "${MIRROR[@]}" --out "$WORK/baked" --output json >"$WORK/bake.json"
python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["image"]; b=m["build_seconds"]; d=m["disk_bytes"]; print(f"bake (once per release): {b:.0f} s, disk {d/1e6:.0f} MB")' "$WORK/bake.json"
COMMON=(--cloud local --version "$RELEASE" "${MIRROR[@]}" --accel tcg)

# up_from IMAGE: seconds to healthy; the box deleted afterwards.
up_from() {
  local start
  start=$(now)
  "$SGBOX" --state-dir "$WORK/state" up --name bench-baked "${COMMON[@]}" --base-image "$1" --yes -q --output json >"$WORK/up.json"
  echo "$(now) - $start" | bc
  "$SGBOX" --state-dir "$WORK/state" down --name bench-baked --delete-data --yes -q >/dev/null
}
phases() { python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["timings"]; print(" ".join(f"{k}={v}" for k, v in t.items()))' "$WORK/up.json"; }

printf '%-5s %10s %10s %7s  %s\n' run plain_s baked_s ratio "phases (s): plain | baked"
for i in $(seq "$RUNS"); do
  p=$(up_from "$IMAGE"); pp=$(phases)
  # Nothing answers on the registry's port while the baked box boots: it cannot pull.
  kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
  b=$(up_from "$WORK/baked"); bp=$(phases)
  docker-registry serve "$WORK/registry.yml" >>"$WORK/registry.log" 2>&1 &
  pids[0]=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$REG/v2/" >/dev/null && break; sleep 0.1; done
  printf '%-5s %10.1f %10.1f %7.2f  %s | %s\n' "$i" "$p" "$b" "$(echo "$b / $p" | bc -l)" "$pp" "$bp"
done
