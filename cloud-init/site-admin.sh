#!/bin/sh
# sgbox-site-admin: the first site admin of a box launched from an sgbox machine image without
# sgbox (from a cloud console). Sourcegraph lets its first visitor create the site admin, so the
# box does it itself, from inside, before Caddy (the only service reachable from outside) starts:
# `POST /-/site-init` on the frontend's compose-network address. The password is generated here
# and kept root-only on the data disk, next to the database it opens (so it survives the
# instance being replaced); it is never printed, logged or passed on a command line.
# Run by sourcegraph.service between the stack's start and Caddy's; exits at once once claimed.
set -eu
F=/mnt/sgbox-data/sgbox/site-admin
FRONTEND=sourcegraph-frontend-0
say() {
  echo "sgbox-site-admin: $*"
  # The console too: a console launch's user reads it there (never the password).
  if [ -w /dev/console ]; then echo "sgbox-site-admin: $*" >/dev/console 2>/dev/null || true; fi
}
field() { sed -n "s/^$1=//p" "$F" | head -n 1; }

if grep -qs '^claimed_at=' "$F"; then exit 0; fi
mkdir -p "${F%/*}"
chmod 0700 "${F%/*}"
if [ ! -s "$F" ]; then
  pw=$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 24)
  (umask 077 && printf '# The first site admin of this Sourcegraph, created by the box at its first boot. Keep private.\nusername=admin\nemail=admin@sourcegraph.sgbox.invalid\npassword=%s\n' "$pw" >"$F.tmp")
  sync
  mv "$F.tmp" "$F"
fi
user=$(field username)
email=$(field email)
pw=$(field password)

# The frontend on the compose network, once it answers (the databases and migrations first).
n=0
while :; do
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$FRONTEND" 2>/dev/null || true)
  if [ -n "$ip" ] && curl -fsS --max-time 5 -o /dev/null "http://$ip:3080/healthz" 2>/dev/null; then break; fi
  n=$((n + 1))
  if [ "$n" -ge 900 ]; then
    say "the frontend did not answer within 30 minutes; trying again later"
    exit 1
  fi
  sleep 2
done

# post PATH: the JSON body on stdin (printf is the shell's own: no password in any argv).
post() {
  curl -sS --max-time 30 -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' --data-binary @- "http://$ip:3080$1"
}
code=$(printf '{"email":"%s","username":"%s","password":"%s"}' "$email" "$user" "$pw" | post /-/site-init) || code=000
case "$code" in
  200) ;;
  500)
    # Already initialized: ours (an earlier boot that stopped before writing it down)?
    code=$(printf '{"email":"%s","password":"%s"}' "$user" "$pw" | post /-/sign-in) || code=000
    if [ "$code" != 200 ]; then
      say "the site already has an admin this box did not create; Caddy stays stopped. Treat the box as compromised."
      exit 1
    fi
    ;;
  *)
    say "creating the site admin: POST /-/site-init answered $code; trying again later"
    exit 1
    ;;
esac
echo "claimed_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$F"
sync
say "site admin \"$user\" created; its password: sudo cat $F"
