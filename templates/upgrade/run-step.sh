#!/bin/sh
# sgbox: run one upgrade step on this box as a transient systemd unit, so that it keeps going when
# the SSH connection that started it drops. Run again with the same name while the unit still
# runs, it waits for that run instead of starting a second one. The step's script is
# /var/lib/sgbox/steps/NAME.sh; its output goes to NAME.log and its exit status to NAME.rc.
# Usage: run-step NAME [MAX_SECONDS]
set -u
name=$1
max=${2:-7200}
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
else
  rm -f "$dir/$name.rc"
  echo "=== $(date -u +%FT%TZ) step $name" >>"$dir/$name.log"
  systemctl reset-failed "$unit" >/dev/null 2>&1 || true
  # --wait: this client waits, but the unit does not depend on it (a dropped connection kills
  # the client, not the step).
  # The wrapper is a file: systemd-run would expand any $ on its own command line.
  printf 'sh %s\necho $? >%s\nmv %s %s\n' "$dir/$name.sh" "$dir/$name.rc.tmp" "$dir/$name.rc.tmp" "$dir/$name.rc" >"$dir/$name.run"
  systemd-run --quiet --collect --wait --unit "$unit" -p RuntimeMaxSec="$max" \
    -p StandardOutput="append:$dir/$name.log" -p StandardError="append:$dir/$name.log" \
    /bin/sh "$dir/$name.run" >/dev/null 2>&1
fi
while running; do sleep 1; done
if [ -f "$dir/$name.rc" ]; then exit "$(cat "$dir/$name.rc")"; fi
echo "sgbox: step $name ended without an exit status (stopped, or the box restarted)" >>"$dir/$name.log"
exit 124
