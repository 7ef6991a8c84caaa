#!/bin/sh
# The official redis image's way of starting: a first argument that is an option or a
# .conf file means redis-server; redis-server runs as the redis user in /data. Debian's
# binary has protected mode on by default, which refuses every client from another
# container when no password is set; the official image is built with it off (the
# container network is the boundary), so the stand-in says so, before the caller's
# options (which still win).
set -e
case "$1" in
  -*|*.conf) set -- redis-server "$@" ;;
esac
if [ "$1" = redis-server ]; then
  shift
  case "${1:-}" in
    *.conf) conf=$1; shift; set -- redis-server "$conf" --protected-mode no "$@" ;;
    *) set -- redis-server --protected-mode no "$@" ;;
  esac
  if [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
