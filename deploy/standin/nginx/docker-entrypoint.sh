#!/bin/sh
# The official nginx image's start: when the command is nginx, run the configuration
# steps in /docker-entrypoint.d in order (*.envsh sourced, *.sh executed), then nginx.
set -e
if [ "$1" = nginx ] || [ "$1" = nginx-debug ]; then
  for step in $(find /docker-entrypoint.d -mindepth 1 -maxdepth 1 -type f | sort -V); do
    case "$step" in
      *.envsh) [ -x "$step" ] && . "$step" ;;
      *.sh) [ -x "$step" ] && "$step" ;;
      *) ;;
    esac
  done
  echo "$0: configuration complete; ready for start up"
fi
exec "$@"
