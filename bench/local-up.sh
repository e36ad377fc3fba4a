#!/usr/bin/env bash
# Benchmark (not a test): time from `sgbox up --cloud local` to healthy, against the floor — the
# same base image booted with the same rendered cloud-init by plain QEMU, waited on by a plain
# curl loop until /__version answers the release — in the same run, on the same machine.
# Prints both times and the ratio. Needs what the local-box test needs (bash .ci/setup, root).
#
#   bash bench/local-up.sh [RUNS]      (default 1 pair; pairs alternate floor → sgbox)
#   SGBOX=target/debug/sgbox bash bench/local-up.sh   (a built sgbox: it only waits on the VMs)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1}
RELEASE=7.5.4453
source bench/lib.sh
use_sgbox
bench_box bench-sgbox

IMAGE=$(local_base_image)
start_registry "$RELEASE"
COMMON=(--cloud local --version "$RELEASE" --registry-mirror "http://10.0.2.2:$REG" --mirror-mode tags-only --base-image "$IMAGE" --accel tcg)

floor() {
  local d="$WORK/floor" ssh http https start pid
  rm -rf "$d"; mkdir -p "$d"
  "$SGBOX" --state-dir "$WORK/state" render --name bench-floor "${COMMON[@]}" --out "$d/render" >/dev/null
  cp "$d/render/user-data" "$d/user-data"
  printf 'instance-id: bench-floor-%s\nlocal-hostname: bench-floor\n' "$RANDOM" > "$d/meta-data"
  ssh=$(free_port); http=$(free_port); https=$(free_port)
  start=$(now)
  genisoimage -quiet -volid cidata -joliet -rock -output "$d/seed.iso" "$d/user-data" "$d/meta-data"
  qemu-img create -q -f qcow2 -F qcow2 -b "$IMAGE/base.qcow2" "$d/overlay.qcow2" 16G
  qemu-img create -q -f qcow2 "$d/data.qcow2" 20G
  qemu-system-x86_64 -accel tcg -cpu qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16 -smp 2 -m 4096 -display none -daemonize -pidfile "$d/qemu.pid" \
    -serial "file:$d/console.log" -monitor none \
    -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" -append "root=LABEL=rootfs rw console=ttyS0 net.ifnames=0 panic=-1" \
    -drive "file=$d/overlay.qcow2,if=none,id=root,format=qcow2" -device virtio-blk-pci,drive=root \
    -drive "file=$d/data.qcow2,if=none,id=data,format=qcow2" -device virtio-blk-pci,drive=data,serial=sgbox-data \
    -drive "file=$d/seed.iso,if=none,id=seed,format=raw,readonly=on" -device virtio-blk-pci,drive=seed \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$ssh-:22,hostfwd=tcp:127.0.0.1:$http-:80,hostfwd=tcp:127.0.0.1:$https-:443" \
    -device virtio-net-pci,netdev=n0,romfile= -device virtio-rng-pci
  pid=$(cat "$d/qemu.pid"); pids+=("$pid")
  until [ "$(curl -fs -m 5 "http://127.0.0.1:$http/__version" 2>/dev/null)" = "$RELEASE" ]; do sleep 1; done
  echo "$(now) - $start" | bc
  kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
}

with_sgbox() {
  local start
  start=$(now)
  "$SGBOX" --state-dir "$WORK/state" up --name bench-sgbox "${COMMON[@]}" --yes -q --output json >"$WORK/up.json"
  echo "$(now) - $start" | bc
  "$SGBOX" --state-dir "$WORK/state" down --name bench-sgbox --delete-data --yes -q >/dev/null
}

printf '%-5s %12s %12s %8s  %s\n' run floor_s sgbox_s ratio "sgbox's phases (s)"
for i in $(seq "$RUNS"); do
  f=$(floor); s=$(with_sgbox)
  phases=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["timings"]; print(" ".join(f"{k}={v}" for k, v in t.items()))' "$WORK/up.json")
  printf '%-5s %12.1f %12.1f %8.2f  %s\n' "$i" "$f" "$s" "$(echo "$s / $f" | bc -l)" "$phases"
done
