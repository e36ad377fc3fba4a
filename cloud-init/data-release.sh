# sgbox: the release whose databases the data disk holds, and the machine that last ran it
# (README "A kept data disk and its release"). Another machine's disk starts only if this release
# is that one or a standard upgrade from it; else the disk is unmounted, so nothing starts on it.
DR="$MNT/sgbox/data-release"
me=$(cat "$MACHINE_ID_FILE" 2>/dev/null || true)
me=${me:-unknown}
record_release() {
  mkdir -p "$MNT/sgbox"
  chmod 0700 "$MNT/sgbox"
  printf 'release=%s\nmachine=%s\n' "$1" "$me" >"$DR.tmp"
  sync
  mv "$DR.tmp" "$DR"
}
if [ ! -s "$DR" ]; then
  # A new disk, or one from an sgbox before this record: this release starts it.
  record_release "$RELEASE"
else
  was=$(sed -n 's/^release=//p' "$DR")
  by=$(sed -n 's/^machine=//p' "$DR")
  if [ "$by" != "$me" ]; then
    case " $STANDARD_FROM " in
      *" $was "*)
        if [ "$was" != "$RELEASE" ]; then
          log "the data disk holds Sourcegraph $was's databases: $RELEASE's migrator upgrades them as the stack starts (a standard upgrade)"
        fi
        record_release "$RELEASE"
        ;;
      *)
        msg="refusing to start Sourcegraph $RELEASE on this data disk: its databases are Sourcegraph ${was:-(unknown)}'s, and that is not a standard upgrade to $RELEASE (a downgrade, more than one minor, or a release this image does not know). Start the disk's release on it (sgbox up --version $was, or that release's image), then sgbox upgrade --to $RELEASE."
        mkdir -p "${REFUSED%/*}"
        echo "$msg" >"$REFUSED"
        log "$msg"
        echo "sgbox: $msg" >"$CONSOLE" 2>/dev/null || true
        umount "$MNT" 2>/dev/null || true
        exit 1
        ;;
    esac
  fi
fi
