# sgbox: the database passwords. Generated on the box at its first boot and kept on the data disk
# next to the databases they open: never in user-data (which the EC2 API and IMDS hand to anyone
# allowed to read it), unique to every box (one launched from a marketplace image too), and still
# the same after the instance is replaced with the data disk kept.
S="$MNT/sgbox/secrets.env"
if [ ! -s "$S" ]; then
  mkdir -p "$MNT/sgbox"
  chmod 0700 "$MNT/sgbox"
  old=/opt/sgbox/.env
  if [ -f "$old" ] && [ ! -L "$old" ] && grep -q '^PGSQL_PASSWORD=' "$old"; then
    # A box made by an older sgbox, whose databases already use these.
    (umask 077 && cp "$old" "$S.tmp")
  else
    pw() { LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32; }
    (umask 077 && printf '# Database passwords of this box, generated on it by sgbox at first boot. Keep private.\nPGSQL_PASSWORD=%s\nCODEINTEL_DB_PASSWORD=%s\nCODEINSIGHTS_DB_PASSWORD=%s\n' "$(pw)" "$(pw)" "$(pw)" >"$S.tmp")
  fi
  sync
  mv "$S.tmp" "$S"
  log "generated the database passwords in $S"
fi
mkdir -p /opt/sgbox
ln -sfn "$S" /opt/sgbox/.env
