# sgbox: the shell functions of a standard upgrade's switch, put before the `apply` step's script
# (and the rollback's). They need $C: the compose command of the box's files and the user's
# override, so every copy started here gets the override too.
#
# Nothing the users reach stops before its replacement answers:
# - a backend on the request path (`handover = true`) gets a copy of its new release that holds
#   its name (a network alias: Docker's DNS gives both addresses, and a client skips the one that
#   refuses); the old container refuses new connections, finishes its own and leaves the network
#   before it is recreated; then the copy does the same and goes;
# - the frontend's new release starts beside the old one on 127.0.0.1:3081; Caddy is switched to
#   it through its admin API (`/load`, atomic: the old release answers until then, only the new one
#   after), the old one drains, is recreated on the new release with no traffic, and the next
#   Caddy goes back to it;
# - Caddy's new release starts beside the old one in the box's network namespace: both bind 80/443
#   with SO_REUSEPORT, so when the old one is stopped (gracefully: it stops accepting and finishes
#   what is in flight) the new one has been taking connections all along
#   (net.ipv4.tcp_migrate_req moves the ones still queued on the closing socket).
SOCKS=/run/sgbox-caddy
NEXT=sgbox-next

# say WORDS: a progress line of the step's log, with the time.
say() {
  echo "== $(date -u +%H:%M:%S) $*"
}

# state NAME: "STATUS HEALTH" of container NAME ("running healthy", "exited none", "missing"),
# read from Docker's API with curl: the docker CLI is a Go program that costs an emulated box
# most of a second per call, and `ready` asks every second.
state() {
  j=$(curl -sS --max-time 10 --unix-socket /run/docker.sock "http://docker/containers/$1/json" 2>/dev/null) || j=
  s=$(printf '%s\n' "$j" | sed -n 's/^.*"State":{"Status":"\([a-z]*\)".*$/\1/p')
  h=$(printf '%s\n' "$j" | grep -o '"Health":{"Status":"[a-z]*"' | head -n 1 | sed 's/^.*:"\([a-z]*\)"$/\1/')
  if [ -n "$s" ]; then echo "$s ${h:-none}"; else echo missing; fi
}

# ready NAME SECONDS: until container NAME is healthy (running, if it has no health check).
ready() {
  n=0
  while :; do
    st=$(state "$1")
    case "$st" in
      "running healthy" | "running none") return 0 ;;
      *unhealthy | exited* | dead* | missing)
        said=${st% none}
        echo "sgbox: $1 is ${said#running }"
        docker logs --tail 30 "$1" 2>&1 || true
        return 1
        ;;
    esac
    n=$((n + 1))
    if [ "$n" -ge "$2" ]; then
      echo "sgbox: $1 is not ready after $2 s ($st)"
      docker logs --tail 30 "$1" 2>&1 || true
      return 1
    fi
    sleep 1
  done
}

# admin SOCKET CURL-ARGS...: Caddy's admin API on its unix socket. HTTP/1.0 without a Host
# header: on a socket Caddy accepts no Host at all.
admin() {
  s=$1
  shift
  curl -sS --fail-with-body --max-time 10 --http1.0 -H 'Host:' --unix-socket "$SOCKS/$s" "$@"
}

# within SECONDS COMMAND...: run COMMAND every quarter second until it succeeds (0) or SECONDS
# have passed (1).
within() {
  n=0
  limit=$(($1 * 4))
  shift
  until "$@"; do
    n=$((n + 1))
    if [ "$n" -ge "$limit" ]; then return 1; fi
    sleep 0.25
  done
}

# admin_up SOCKET SECONDS: until the Caddy behind SOCKET has loaded its configuration (and so
# listens on its ports).
admin_up() {
  within "$2" admin "$1" http://caddy/config/ >/dev/null 2>&1 || {
    echo "sgbox: Caddy's admin API on $SOCKS/$1 does not answer after $2 s"
    return 1
  }
}

# upstream SOCKET ADDRESS: load the box's Caddyfile into the Caddy behind SOCKET, with the
# frontend at ADDRESS. Caddy switches atomically and rolls back a configuration it cannot load.
upstream() {
  sed "s/{\$SRC_FRONTEND_ADDRESSES}/$2/" /opt/sgbox/Caddyfile |
    admin "$1" -X POST -H 'Content-Type: text/caddyfile' --data-binary @- http://caddy/load
  echo "sgbox: Caddy ($1) sends requests to $2"
}

# in_flight SOCKET ADDRESS: the requests the Caddy behind SOCKET has in flight to ADDRESS (empty
# when ADDRESS is gone from its upstreams).
in_flight() {
  admin "$1" http://caddy/reverse_proxy/upstreams | tr '{' '\n' | grep "\"address\":\"$2\"" |
    sed -n 's/.*"num_requests":\([0-9]*\).*/\1/p' | head -n 1
}

# idle SOCKET ADDRESS: no request in flight to ADDRESS.
idle() {
  left=$(in_flight "$1" "$2")
  [ "${left:-0}" = 0 ]
}

# drained SOCKET ADDRESS SECONDS: until the Caddy behind SOCKET has no request in flight to
# ADDRESS (gone from its upstreams, or num_requests 0).
drained() {
  within "$3" idle "$1" "$2" || echo "sgbox: $(in_flight "$1" "$2") request(s) still in flight to $2 after $3 s; going on"
}

# retire NAME: stop container NAME gracefully and remove it.
retire() {
  docker stop -t 30 "$1" >/dev/null 2>&1 || true
  docker rm -f "$1" >/dev/null 2>&1 || true
}

# reset_switch: the state of before any switch: Caddy to the frontend of the box's files, no
# copies left. (A resumed apply, and the rollback, start here.)
reset_switch() {
  if [ -S "$SOCKS/caddy.sock" ]; then upstream caddy.sock 127.0.0.1:3080 || true; fi
  for c in $(docker ps -aq --filter "name=-$NEXT\$"); do docker rm -f "$c" >/dev/null; done
}

# migrate: the new release's migrator `up`, run as the service's own container and with its
# dependencies (the databases, current by then), so that the last `up` of the upgrade finds it
# current: a one-off `run` would leave the old migrator container, and `--no-deps` hashes it
# differently; either way the last `up` would recreate it, and the frontends after it, in place.
migrate() {
  say "migrator up"
  $C up -d migrator
  rc=$(docker wait migrator)
  if [ "$rc" != 0 ]; then
    docker logs --tail 50 migrator 2>&1 || true
    echo "sgbox: the migrator exited $rc"
    return 1
  fi
}

# inbound PID: connections to a listening port of PID's network namespace, established or
# half-open (SYN_RECV: answered before the refusal began, its client's ACK still on its way).
inbound() {
  awk 'FNR > 1 { split($2, a, ":"); if ($4 == "0A") listen[a[2]] = 1; else if ($4 == "01" || $4 == "03") est[a[2]]++ }
       END { n = 0; for (p in est) if (p in listen) n += est[p]; print n }' "/proc/$1/net/tcp" "/proc/$1/net/tcp6"
}

# unlist NAME SECONDS: take container NAME out of the name it shares without failing a request,
# as Kubernetes takes a pod out of its endpoints before stopping it: its new connections are
# refused (a client goes on to the name's other address), the ones it has finish (SECONDS at most),
# then it leaves its networks, so Docker's DNS stops giving its address while it still runs. (An
# address whose container has exited does not refuse: it times out, until Docker has caught up.)
unlist() {
  pid=$(docker inspect -f '{{.State.Pid}}' "$1")
  nsenter -t "$pid" -n iptables -w -I INPUT -p tcp --syn ! -i lo -j REJECT --reject-with tcp-reset
  # Drained: no connection at two readings a second apart (a handshake under way shows late).
  n=0
  quiet=0
  while [ "$quiet" -lt 2 ]; do
    if [ "$(inbound "$pid")" -gt 0 ]; then quiet=0; else quiet=$((quiet + 1)); fi
    n=$((n + 1))
    if [ "$n" -ge $(($2 * 2)) ]; then
      echo "sgbox: $1 still has connections after $2 s; going on"
      break
    fi
    sleep 0.5
  done
  for net in $(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$1"); do
    docker network disconnect "$net" "$1"
  done
}

# handover SERVICE...: recreate each SERVICE on the box's files while a copy holds its name (all
# at once: every container start costs the box's CPU, and the waits overlap). Recreated even when
# an image did not change: the old container has left the network.
handover() {
  say "$* (copies of the new release hold their names meanwhile)"
  for s in "$@"; do
    retire "$s-$NEXT"
    $C run -d --no-deps --use-aliases --name "$s-$NEXT" "$s" >/dev/null
  done
  for s in "$@"; do ready "$s-$NEXT" 300; done
  say "copies healthy; the old containers leave their names"
  for s in "$@"; do unlist "$s" 30; done
  say "recreating $*"
  $C up -d --wait --no-deps --force-recreate "$@"
  say "recreated; the copies leave their names"
  next=""
  for s in "$@"; do
    unlist "$s-$NEXT" 30
    next="$next $s-$NEXT"
  done
  # shellcheck disable=SC2086 # one name per word
  docker stop -t 30 $next >/dev/null 2>&1 || true
  # shellcheck disable=SC2086
  docker rm -f $next >/dev/null 2>&1 || true
}

# switch_frontend: the new frontend beside the old one, Caddy switched to it, the old one drained
# and recreated on the new release.
switch_frontend() {
  f=sourcegraph-frontend-0
  say "frontend: the new release beside the old one"
  retire "$f-$NEXT"
  $C run -d --no-deps --name "$f-$NEXT" -p 127.0.0.1:3081:3080 "$f" >/dev/null
  ready "$f-$NEXT" 600
  within 30 curl -fsS --max-time 5 -o /dev/null http://127.0.0.1:3081/healthz || {
    echo "sgbox: the new frontend does not answer on 127.0.0.1:3081"
    return 1
  }
  upstream caddy.sock 127.0.0.1:3081
  drained caddy.sock 127.0.0.1:3080 60
  say "frontend: the old one, drained, recreated on the new release"
  $C up -d --wait "$f"
}

# switch_caddy: the new Caddy beside the old one, the old one stopped gracefully and recreated
# on the new release, then the temporary frontend and Caddy go.
switch_caddy() {
  say "caddy: the new release beside the old one"
  retire "caddy-$NEXT"
  rm -f "$SOCKS/next.sock"
  $C run -d --no-deps --name "caddy-$NEXT" -e SGBOX_CADDY_ADMIN=/run/caddy-admin/next.sock caddy >/dev/null
  admin_up next.sock 120
  say "caddy: the old one stopped (it drains), recreated on the new release"
  $C up -d --no-deps caddy
  admin_up caddy.sock 120
  retire "sourcegraph-frontend-0-$NEXT"
  retire "caddy-$NEXT"
}
