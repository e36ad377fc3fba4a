#!/bin/sh
# sgbox: run one upgrade step on this box as a transient systemd unit, so that it keeps going when
# the SSH connection that started it drops. The step's script is /var/lib/sgbox/steps/NAME.sh; its
# output goes to NAME.log and its exit status to NAME.rc.
# Usage: run-step NAME [MAX_SECONDS [WAIT_SECONDS [TOKEN]]]
# - While the unit runs, a call waits for it instead of starting a second run.
# - WAIT_SECONDS: wait at most that long, then exit 125 ("still running"; call again to re-attach).
# - TOKEN: one sgbox invocation of the step. A call with the token of a run that already ended
#   reports that run's status instead of starting it again (a re-attach after a lost connection).
set -u
name=$1
max=${2:-7200}
wait=${3:-}
token=${4:-}
dir=/var/lib/sgbox/steps
unit="sgbox-step-$name"
running() {
  case "$(systemctl show -p ActiveState --value "$unit" 2>/dev/null)" in
    active|activating|deactivating|reloading) return 0 ;;
    *) return 1 ;;
  esac
}
if running; then
  echo "sgbox: step $name is still running from an earlier connection; waiting for it" >>"$dir/$name.log"
elif [ -n "$token" ] && [ "$(cat "$dir/$name.token" 2>/dev/null)" = "$token" ]; then
  : # this invocation's run has ended: its status below
else
  rm -f "$dir/$name.rc"
  if [ -n "$token" ]; then echo "$token" >"$dir/$name.token"; fi
  echo "=== $(date -u +%FT%TZ) step $name" >>"$dir/$name.log"
  systemctl reset-failed "$unit" >/dev/null 2>&1 || true
  # The unit does not depend on this client: a dropped connection kills the client, not the
  # step. The wrapper is a file: systemd-run would expand any $ on its own command line.
  printf 'sh %s\necho $? >%s\nmv %s %s\n' "$dir/$name.sh" "$dir/$name.rc.tmp" "$dir/$name.rc.tmp" "$dir/$name.rc" >"$dir/$name.run"
  systemd-run --quiet --collect --unit "$unit" -p RuntimeMaxSec="$max" \
    -p StandardOutput="append:$dir/$name.log" -p StandardError="append:$dir/$name.log" \
    /bin/sh "$dir/$name.run" >/dev/null 2>&1
fi
waited=0
while running; do
  if [ -n "$wait" ] && [ "$waited" -ge "$wait" ]; then exit 125; fi
  sleep 1
  waited=$((waited + 1))
done
if [ -f "$dir/$name.rc" ]; then exit "$(cat "$dir/$name.rc")"; fi
echo "sgbox: step $name ended without an exit status (stopped, or the box restarted)" >>"$dir/$name.log"
exit 124
