#!/usr/bin/env bash
# The official postgres image's way of starting, for Debian's PostgreSQL: on an empty
# PGDATA, initdb as POSTGRES_USER with POSTGRES_PASSWORD (POSTGRES_INITDB_ARGS passed on),
# listen on every address, password (scram-sha-256) for every remote host, create
# POSTGRES_DB, run /docker-entrypoint-initdb.d/*.sh and *.sql once; then run the server as
# the postgres user. A data directory that is already initialised is used as it is.
set -Eeuo pipefail

if [ "${1:0:1}" = '-' ]; then
  set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
  exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  install -d -o postgres -g postgres -m 3777 /var/run/postgresql
  exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?is not set: the database would have no superuser password}"
  user="${POSTGRES_USER:-postgres}"
  db="${POSTGRES_DB:-$user}"
  # shellcheck disable=SC2086  # POSTGRES_INITDB_ARGS is a list of options
  initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
    ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  echo "host all all all ${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
  psql=(psql -v ON_ERROR_STOP=1 --username "$user" --no-password --dbname postgres)
  if [ "$db" != postgres ]; then
    "${psql[@]}" --set db="$db" <<<'CREATE DATABASE :"db";'
  fi
  for script in /docker-entrypoint-initdb.d/*; do
    case "$script" in
      *.sh) echo "running $script"; bash "$script" ;;
      *.sql) echo "running $script"; "${psql[@]}" --dbname "$db" -f "$script" ;;
      *) ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop
  echo "PostgreSQL init process complete; ready for start up."
fi
exec "$@"
