#!/usr/bin/env bash
# Benchmark (not a test): downtime of a standard upgrade (7.4.0 -> 7.5.4453) on one local box, in
# the same run: `sgbox upgrade` against the naive documented procedure (put the new compose file
# in place, `docker compose pull`, then `docker compose up -d`). A client polls /__version every
# 100 ms (5 s client timeout) through the box's public port during each; failed requests and the seconds without an
# answer are printed side by side, with the ratio. Between the two, `sgbox rollback` puts the box
# back to 7.4.0 and its data. Needs what the local-box test needs (bash .ci/setup, root).
#
#   bash bench/local-upgrade.sh
#   SGBOX=target/debug/sgbox bash bench/local-upgrade.sh   (a built sgbox: it only waits on the box)
set -euo pipefail
cd "$(dirname "$0")/.."
FROM=7.4.0
TO=7.5.4453
source bench/lib.sh
use_sgbox
bench_box bench-upg

IMAGE=$(local_base_image)
start_registry "$FROM" "$TO"
COMMON=(--cloud local --registry-mirror "http://10.0.2.2:$REG" --mirror-mode tags-only --base-image "$IMAGE" --accel tcg)
URL=$("$SGBOX" "${S[@]}" up --name bench-upg --version "$FROM" "${COMMON[@]}" --yes --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])')

# poll PATH OUT: GET PATH every 100 ms until the file $WORK/stop exists; one line per request.
poll() {
  python3 - "$URL" "$1" "$2" "$WORK/stop" <<'PY'
import os, sys, time, urllib.request
url, path, out, stop = sys.argv[1:]
with open(out, "w") as f:
    while not os.path.exists(stop):
        t = time.time()
        try:
            v = urllib.request.urlopen(url + path, timeout=5).read().decode().strip().split()[0]
        except Exception:
            v = "FAIL"
        f.write(f"{t:.3f} {v}\n"); f.flush()
        time.sleep(max(0.0, 0.1 - (time.time() - t)))
PY
}
# measure NAME CMD...: run CMD while polling; prints "requests failed outage longest" for
# /__version, then the same for /search.
measure() {
  local name=$1; shift
  rm -f "$WORK/stop"
  poll /__version "$WORK/$name.log" & local p=$!
  poll "/search?q=sgbox" "$WORK/$name-search.log" & local q=$!
  sleep 1
  "$@" >"$WORK/$name.out" 2>&1
  until [ "$(curl -fs -m 5 "$URL/__version")" = "$TO" ]; do sleep 0.1; done
  sleep 1; touch "$WORK/stop"; wait "$p" "$q"
  echo "$(figures "$WORK/$name.log") $(figures "$WORK/$name-search.log")"
}
figures() {
  python3 - "$1" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
failed = sum(1 for r in rows if r[1] == "FAIL")
outage, start, longest = 0.0, None, 0.0
for t, v in ((float(r[0]), r[1]) for r in rows):
    if v == "FAIL" and start is None:
        start = t
    elif v != "FAIL" and start is not None:
        outage += t - start; longest = max(longest, t - start); start = None
print(len(rows), failed, f"{outage:.1f}", f"{longest:.1f}")
PY
}
# failures LOG: the UTC time of each failed request (the switch's progress lines carry the same
# clock: the box's is the host's).
failures() {
  python3 - "$1" <<'PY'
import sys, time
for t, v in (l.split() for l in open(sys.argv[1])):
    if v == "FAIL":
        print(time.strftime("%H:%M:%S", time.gmtime(float(t))) + f".{int(float(t) * 10) % 10}", end=" ")
PY
}

read -r n1 f1 o1 l1 sn1 sf1 so1 sl1 < <(measure sgbox "$SGBOX" "${S[@]}" upgrade --name bench-upg --to "$TO" --yes)
"$SGBOX" "${S[@]}" rollback --name bench-upg --yes >/dev/null
"$SGBOX" "${S[@]}" render --name bench-upg --version "$TO" "${COMMON[@]}" --out "$WORK/render" >/dev/null 2>&1
naive() {
  "$SGBOX" "${S[@]}" ssh --name bench-upg -- sudo tee /opt/sgbox/docker-compose.yaml < "$WORK/render/box/opt/sgbox/docker-compose.yaml" >/dev/null
  "$SGBOX" "${S[@]}" ssh --name bench-upg -- "cd /opt/sgbox && sudo docker compose pull --quiet && sudo docker compose up -d"
}
read -r n2 f2 o2 l2 sn2 sf2 so2 sl2 < <(measure naive naive)

echo "standard upgrade $FROM -> $TO, polled every 100 ms (same box, same run):"
row() { printf '  %-30s %-10s %6s requests %5s failed %6ss without an answer (longest %ss)\n' "$@"; }
row "naive: compose pull; up -d" /__version "$n2" "$f2" "$o2" "$l2"
row "" /search "$sn2" "$sf2" "$so2" "$sl2"
row "sgbox upgrade" /__version "$n1" "$f1" "$o1" "$l1"
row "" /search "$sn1" "$sf1" "$so1" "$sl1"
python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'  outage ratio sgbox/naive: {a/b:.2f}' if b else '  naive had no outage')" "$o1" "$o2"
# Where sgbox's failures fell, if any: the switch's progress lines (its step log on the box).
if [ "$f1" != 0 ] || [ "$sf1" != 0 ]; then
  echo "sgbox upgrade's failed requests (UTC): /__version: $(failures "$WORK/sgbox.log")| /search: $(failures "$WORK/sgbox-search.log")"
  echo "the switch's progress (the apply step's log on the box):"
  "$SGBOX" "${S[@]}" ssh --name bench-upg -- "sudo grep -h '^==' /var/lib/sgbox/steps/apply.log" | sed 's/^/  /' || true
fi
