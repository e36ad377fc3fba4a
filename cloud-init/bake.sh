#!/bin/sh
# sgbox-bake: turns a fresh Debian 13 machine into a Sourcegraph image (`sgbox image build`).
# Started by the builder's user-data outside cloud-init, since its last act is to clean
# cloud-init's state. Installs what the box installs, pulls every image of the release by the
# reference the box's compose file uses, records /etc/sgbox/image.json, scrubs what must not be
# published (cloud-init's state and logs, the machine id, SSH host keys, authorized keys, Docker's
# identity and networks, shell histories, logs, temporary files), and powers off. Its one signal
# is a console line: "sgbox-bake: ok recipe=<recipe>", or "sgbox-bake: failed step=<step>" (then
# it powers off too, and the image is not made).
set -u
. /etc/sgbox/bake.env
say() {
  echo "sgbox-bake: $*" >&2
  for c in /dev/ttyS0 /dev/console; do
    if [ -w "$c" ]; then echo "sgbox-bake: $*" >"$c" 2>/dev/null && break; fi
  done
}
fail() {
  say "failed step=$1"
  sync
  systemctl poweroff
  exit 1
}

# Until cloud-init is done: its state is cleaned below.
cloud-init status --wait >/dev/null 2>&1 || true
say "started release=$RELEASE recipe=$RECIPE"

missing=
for p in $PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  n=0
  until apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; do
    n=$((n + 1))
    [ "$n" -lt 3 ] || fail packages
    sleep $((n * 10))
  done
fi

if [ -n "$INSECURE_REGISTRY" ]; then
  mkdir -p /etc/docker
  printf '{"insecure-registries": ["%s"]}\n' "$INSECURE_REGISTRY" >/etc/docker/daemon.json
fi
systemctl restart docker || fail docker

while read -r service ref; do
  [ -n "$service" ] || continue
  n=0
  until docker pull -q "$ref" >/dev/null; do
    n=$((n + 1))
    [ "$n" -lt 5 ] || fail "pull:$service"
    sleep $((n * 5))
  done
done </etc/sgbox/bake-images

images=
while read -r service ref; do
  [ -n "$service" ] || continue
  docker image inspect "$ref" >/dev/null 2>&1 || fail "verify:$service"
  images="$images${images:+,}\"$service\": \"$ref\""
done </etc/sgbox/bake-images
printf '{"format": 1, "release": "%s", "recipe": "%s", "sgbox_version": "%s", "baked_at": "%s", "docker_root": "/var/lib/docker", "images": {%s}}\n' \
  "$RELEASE" "$RECIPE" "$SGBOX_VERSION" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$images" >/etc/sgbox/image.json.tmp || fail record
mv /etc/sgbox/image.json.tmp /etc/sgbox/image.json

# The image's default configuration, for a launch without sgbox (from a cloud console): cloud-init
# reads it under any user-data, and `sgbox up`'s user-data replaces every key of it.
install -m 0644 /etc/sgbox/image-default.cfg /etc/cloud/cloud.cfg.d/90-sgbox-image-default.cfg || fail default-config
rm -f /etc/sgbox/image-default.cfg

# Scrub. Docker keeps its image store (image/, overlay2/); its identity (engine-id), networks,
# containers and build state are per machine.
systemctl stop docker.socket docker.service containerd.service || fail stop-docker
for d in containers network volumes buildkit swarm tmp runtimes plugins engine-id; do
  rm -rf "/var/lib/docker/$d"
done
rm -f /etc/docker/daemon.json /etc/docker/key.json
rm -rf /root/.docker /etc/sgbox/bake-images /etc/sgbox/bake.env
apt-get clean
rm -rf /var/lib/apt/lists/*
rm -f /etc/ssh/ssh_host_*
# The builder's own login users (cloud-init's default user): a box makes its own.
for u in $(getent passwd | awk -F: '$3 >= 1000 && $3 < 60000 { print $1 }'); do
  userdel -r "$u" >/dev/null 2>&1 || userdel "$u" || fail "userdel:$u"
done
find /root /home -name authorized_keys -type f -delete 2>/dev/null
find /root /home -maxdepth 2 -name '.*_history' -type f -delete 2>/dev/null
rm -rf /tmp/* /tmp/.[!.]* /var/tmp/*
cloud-init clean --logs --seed --machine-id --configs all >/dev/null 2>&1 || cloud-init clean --logs --seed --machine-id || fail cloud-init-clean
# D-Bus's copy of the machine id: systemd takes it over the empty /etc/machine-id at first boot,
# and every box of the image would share it.
if [ -e /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
  rm -f /var/lib/dbus/machine-id
  ln -s /etc/machine-id /var/lib/dbus/machine-id || fail dbus-machine-id
fi
journalctl --rotate >/dev/null 2>&1
journalctl --vacuum-time=1s >/dev/null 2>&1
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -f /usr/local/sbin/sgbox-bake
fstrim -a >/dev/null 2>&1 || true
sync
say "ok recipe=$RECIPE"
systemctl poweroff
