#!/usr/bin/env bash
# Benchmark (not a test): what the running stack costs the emulated local box with crun (sgbox's
# choice for the local cloud) against Docker's default runc, on one box in the same run. With the
# 26 stand-ins up and healthy, it samples the guest's CPU (/proc/stat) for 60 s and reads the
# duration of the last health probes (`docker inspect`), first with crun, then after switching
# the daemon to runc and recreating every container (timed too). Needs what the local-box test
# needs (bash .ci/setup, root).
#
#   bash bench/local-runtime.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REL=7.5.4453
cargo build -q --locked
SGBOX=$PWD/target/debug/sgbox
source bench/lib.sh
bench_box bench-rt

IMAGE=$(local_base_image)
start_registry "$REL"
"$SGBOX" "${S[@]}" up --name bench-rt --version "$REL" --cloud local --registry-mirror "http://10.0.2.2:$REG" --mirror-mode tags-only \
  --base-image "$IMAGE" --accel tcg --yes --output json >"$WORK/up.json"
on_box() { "$SGBOX" "${S[@]}" ssh --name bench-rt -- "$1"; }

# sample: "busy% probe_median_s probe_max_s" over 60 s of the healthy stack.
sample() {
  on_box 'a=$(head -1 /proc/stat); sleep 60; b=$(head -1 /proc/stat); echo "$a"; echo "$b"
          sudo docker inspect $(sudo docker ps -q) --format "{{if .State.Health}}{{range .State.Health.Log}}{{.Start.UnixNano}} {{.End.UnixNano}}
{{end}}{{end}}"' | python3 -c '
import statistics, sys
lines = [l.split() for l in sys.stdin if l.strip()]
a, b = [list(map(int, l[1:])) for l in lines[:2]]
d = [y - x for x, y in zip(a, b)]
busy = 100 * (sum(d) - d[3] - d[4]) / sum(d)
probes = [(int(e) - int(s)) / 1e9 for s, e in lines[2:]]
print(f"{busy:.0f} {statistics.median(probes):.2f} {max(probes):.2f}")'
}
# wait_healthy: seconds until every container runs, healthy where it has a check (migrator exited 0).
wait_healthy() {
  on_box 's=$(date +%s); until [ "$(sudo docker ps -a --format "{{.Names}} {{.Status}}" | grep -v -e "(healthy)" -e "^migrator Exited (0)" | grep -c -e "health" -e "Exited" -e "Created" -e "Restarting")" = 0 ] \
            && [ "$(sudo docker ps -q | wc -l)" -ge 25 ]; do sleep 2; done; echo $(( $(date +%s) - s ))'
}

read -r busy_crun med_crun max_crun < <(sample)
t0=$(date +%s)
on_box 'sudo python3 -c "
import json; p=\"/etc/docker/daemon.json\"; d=json.load(open(p)); d[\"default-runtime\"]=\"runc\"; json.dump(d, open(p, \"w\"), indent=2)
" && sudo systemctl restart docker && cd /opt/sgbox && sudo docker compose -p sourcegraph -f docker-compose.yaml -f docker-compose.override.yaml up -d --force-recreate --quiet-pull >/dev/null 2>&1'
wait_healthy >/dev/null
runc_start=$(( $(date +%s) - t0 ))
read -r busy_runc med_runc max_runc < <(sample)

echo "the healthy $REL stand-in stack on a 2-vCPU TCG box, 60 s samples (same box, same run):"
printf '  %-6s guest CPU busy %3s%%   health probe median %5ss  max %5ss\n' crun "$busy_crun" "$med_crun" "$max_crun" runc "$busy_runc" "$med_runc" "$max_runc"
echo "  switching to runc (docker restart, every container recreated) until healthy: ${runc_start}s; \`sgbox up\` phases under crun: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["timings"])' "$WORK/up.json")"
python3 -c "import sys; a,b,c,d=map(float,sys.argv[1:]); print(f'  ratio crun/runc: CPU {a/b:.2f}, probe median {c/d:.2f}')" "$busy_crun" "$busy_runc" "$med_crun" "$med_runc"
