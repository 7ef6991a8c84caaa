#!/usr/bin/env bash
# Stand-ins for the official images docker-compose.yml names (python:3.11-slim, postgres:16,
# redis:7, nginx:1.27, and the monitoring profile's prom/prometheus), built from Debian
# bookworm's packages, for a machine whose engine cannot pull from a registry. Each is tagged
# with the official name and labelled `log-aggregator.standin`; an image of that name without
# the label (a real one, pulled) is never replaced. README.md beside this file says what each
# one mimics and where it differs.
#
#   deploy/standin/build.sh images        # pull each image, else build its stand-in (cached)
#   deploy/standin/build.sh wheels        # download requirements.lock's files for the image build
#   deploy/standin/build.sh serve-wheels  # serve them to builds on the engine's bridge (foreground)
#
# Needs root on Debian (debootstrap, chroot) and a running engine (engine.sh start). The
# base system is made once with debootstrap and kept as an image; a stand-in is rebuilt
# only when its recipe (its directory here, this script) changes.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${AGGREGATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/log-aggregator}/standin"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
ENGINE_POOL="${ENGINE_POOL:-10.213.0.0/16}"
WHEELS_HOST="${ENGINE_POOL%.0.0/16}.0.1"   # docker0's address (engine.sh's bip)
WHEELS_PORT=3141
BASE_TAG=log-aggregator-standin/debian:bookworm
LABEL=log-aggregator.standin

# official name -> directory here (the Dockerfile, its files and `packages`)
declare -A IMAGES=(
  [python:3.11-slim]=python
  [postgres:16]=postgres
  [redis:7]=redis
  [nginx:1.27]=nginx
  [prom/prometheus:v3.5.5]=prometheus
)

say() { echo "standin: $*" >&2; }

recipe_digest() {
  # The directory's files and this script: a change to either rebuilds the image.
  (cd "$HERE" && find "$1" -type f -print0 | sort -z | xargs -0 sha256sum; sha256sum build.sh) |
    { cat; echo "$ENGINE_POOL"; } | sha256sum | cut -c1-16
}

label_of() { docker image inspect --format "{{index .Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null; }

with_chroot() {
  # Run a command inside a root file system, with /proc and the host's DNS, services kept down.
  local rootfs=$1
  shift
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  mount -t proc proc "$rootfs/proc"
  local status=0
  chroot "$rootfs" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    LC_ALL=C.UTF-8 "$@" || status=$?
  umount "$rootfs/proc"
  rm -f "$rootfs/usr/sbin/policy-rc.d"
  : >"$rootfs/etc/resolv.conf"
  return $status
}

slim() {
  # What an image does not need: package lists and downloaded archives.
  rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb
}

base_rootfs() {
  # A bookworm minbase tree, made once with debootstrap and kept as an image.
  local rootfs="$CACHE/work/base"
  if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    local container
    container="$(docker create "$BASE_TAG" /bin/true)"
    docker export "$container" | tar -x -C "$rootfs"
    docker rm "$container" >/dev/null
    return
  fi
  command -v debootstrap >/dev/null || {
    say "installing debootstrap from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  say "debootstrap bookworm (minbase) from $MIRROR"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
    tail -20 "$CACHE/debootstrap.log" >&2
    return 1
  }
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
  # Like Debian's own container images: no recommends, no docs.
  echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/01-no-recommends"
  slim "$rootfs"
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE_TAG" >/dev/null
}

build_one() {
  local name=$1 dir=$2 digest rootfs packages
  digest="$(recipe_digest "$dir")"
  rootfs="$CACHE/work/$dir"
  say "building $name from Debian's packages ($(tr '\n' ' ' <"$HERE/$dir/packages"))"
  rm -rf "$rootfs" && cp -a "$CACHE/work/base" "$rootfs"
  if [ -x "$HERE/$dir/prepare.sh" ]; then "$HERE/$dir/prepare.sh" "$rootfs"; fi
  packages="$(tr '\n' ' ' <"$HERE/$dir/packages")"
  # shellcheck disable=SC2086  # one word per package
  with_chroot "$rootfs" sh -c "apt-get update -qq && apt-get install -y -qq $packages >/dev/null" \
    >"$CACHE/$dir.log" 2>&1 || { tail -30 "$CACHE/$dir.log" >&2; return 1; }
  slim "$rootfs"
  tar -C "$rootfs" -c . | docker import - "log-aggregator-standin/$dir-rootfs:latest" >/dev/null
  rm -rf "$rootfs"
  docker build --quiet --build-arg "ROOTFS=log-aggregator-standin/$dir-rootfs:latest" \
    --build-arg "WHEELS_URL=http://$WHEELS_HOST:$WHEELS_PORT/" \
    --label "$LABEL=$digest" -t "$name" "$HERE/$dir" >>"$CACHE/$dir.log" 2>&1 ||
    { tail -30 "$CACHE/$dir.log" >&2; return 1; }
  say "$name: stand-in $digest built"
}

images() {
  mkdir -p "$CACHE/work"
  local name wanted=()
  for name in "${!IMAGES[@]}"; do
    local dir=${IMAGES[$name]} have
    if docker image inspect "$name" >/dev/null 2>&1; then
      have="$(label_of "$name")"
      if [ -z "$have" ]; then
        say "$name: the real image is here; using it"
        continue
      fi
      [ "$have" = "$(recipe_digest "$dir")" ] && { say "$name: stand-in $have is current"; continue; }
    elif timeout 30 docker pull -q "$name" >/dev/null 2>&1; then
      say "$name: pulled"
      continue
    fi
    wanted+=("$name")
  done
  [ ${#wanted[@]} -gt 0 ] || return 0
  base_rootfs
  for name in "${wanted[@]}"; do build_one "$name" "${IMAGES[$name]}"; done
  rm -rf "$CACHE/work/base"
  docker image prune -f >/dev/null  # the replaced stand-ins' layers
}

wheels() {
  # The files requirements.lock pins (hash-checked), plus what pip needs to build the two
  # source distributions (the project itself and psycogreen); again only when the lock changed.
  local dir="$CACHE/wheels" stamp
  stamp="$(sha256sum "$ROOT/requirements.lock" | cut -c1-64)"
  mkdir -p "$dir"
  if [ "$(cat "$dir/.lock-sha256" 2>/dev/null)" != "$stamp" ]; then
    python3 -m pip download --quiet --disable-pip-version-check --dest "$dir" --require-hashes \
      --only-binary :all: --no-binary psycogreen -r "$ROOT/requirements.lock"
    python3 -m pip download --quiet --disable-pip-version-check --dest "$dir" \
      --only-binary :all: "setuptools>=68" wheel
    echo "$stamp" >"$dir/.lock-sha256"
  fi
  echo "$dir"
}

serve_wheels() {
  exec python3 -m http.server --bind "$WHEELS_HOST" --directory "$CACHE/wheels" "$WHEELS_PORT"
}

case "${1:-}" in
  images) images ;;
  wheels) wheels ;;
  serve-wheels) serve_wheels ;;
  *) echo "usage: $0 images|wheels|serve-wheels" >&2; exit 2 ;;
esac
