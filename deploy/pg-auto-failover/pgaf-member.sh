#!/bin/sh
# One member of a pg_auto_failover formation in a container (deploy/compose.ha.yml):
#
#   pgaf-member.sh monitor     the monitor, which watches the nodes and orders a failover
#   pgaf-member.sh node        a PostgreSQL node: the first to register is the primary, the
#                              next one its synchronous standby (pg_basebackup from it)
#
# Created from the environment on the first start, then run (`pg_autoctl run`) on every
# start after, so a restarted container rejoins as whatever the monitor says it is (the old
# primary comes back as the new primary's standby). Everything it keeps is under
# PGAF_HOME, the container's volume: the data directory and pg_autoctl's own state, so a
# recreated container finds both.
#
# Environment: PGAF_HOSTNAME (the address the others reach this member at), PGPORT
# (5432), PGAF_MONITOR_PASSWORD (autoctl_node's, set on the monitor); on the nodes also
# PGAF_NAME (the node's name in the formation, the host name by default), PGAF_MONITOR
# and PGAF_MONITOR_PORT (the monitor's address and port, 5432), PGAF_REPLICATION_PASSWORD
# (pgautofailover_replicator's), and POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB: the
# application's role and database, made once on the first primary. Every connection from
# another container needs a password (scram-sha-256); only the monitor's health checks
# are `trust` (pg_autoctl's own rule, for its pgautofailover_monitor role, from the
# monitor's address).
set -eu

role="${1:?say monitor or node}"
: "${PGAF_HOME:=/var/lib/postgresql/data}"
: "${PGAF_HOSTNAME:?set PGAF_HOSTNAME: the address the other members reach this one at}"
: "${PGAF_MONITOR_PASSWORD:?set PGAF_MONITOR_PASSWORD (see .env.example)}"
: "${PGPORT:=5432}"
export PGPORT
export PGDATA="$PGAF_HOME/pgdata"
# pg_autoctl keeps its configuration and state under the XDG directories: on the volume.
export XDG_CONFIG_HOME="$PGAF_HOME/config" XDG_DATA_HOME="$PGAF_HOME/state"
# ... and its pid file under XDG_RUNTIME_DIR: cleared at every start, as nothing else
# runs in this container, so a pid file left by a killed one never blocks the next.
export XDG_RUNTIME_DIR=/tmp/pgaf-run
rm -rf "$XDG_RUNTIME_DIR"
mkdir -m 700 "$XDG_RUNTIME_DIR"
created="$PGAF_HOME/created"

# pg_autoctl passes replication.password to pg_basebackup and pg_rewind, but not to its
# own check that the new primary answers before a rejoining node copies it ("no password
# supplied", seen with 2.0): a password file for that login serves all three, and the
# standby's first copy. Written at every start, from the environment, in the container's
# /tmp (never on the volume).
if [ -n "${PGAF_REPLICATION_PASSWORD:-}" ]; then
    export PGPASSFILE=/tmp/pgaf-run/pgpass
    escaped="$(printf '%s' "$PGAF_REPLICATION_PASSWORD" | sed 's/[\\:]/\\&/g')"
    (umask 077 && printf '*:*:*:pgautofailover_replicator:%s\n' "$escaped" >"$PGPASSFILE")
fi

if [ -s "$PGAF_HOME/PG_VERSION" ]; then
    echo "pgaf-member: $PGAF_HOME holds a single-node database (docker-compose.yml's postgres);" \
        "this formation starts empty: move the data with pg_dump first (docs/operations.md)" >&2
    exit 78
fi
if [ -e "$created" ]; then
    exec pg_autoctl run
fi

# psql on this member's own socket, as the superuser pg_autoctl made (the OS user's name).
local_sql() {
    psql -v ON_ERROR_STOP=1 -X -q -h /var/run/postgresql -p "$PGPORT" "$@"
}

# `pg_autoctl create` stops PostgreSQL when it is done: start it again for the steps
# below, on its socket only, so no other member sees it before `pg_autoctl run`.
start_locally() {
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w -s start
}
stop_locally() {
    pg_ctl -D "$PGDATA" -m fast -w -s stop
}

common="--pgdata $PGDATA --pgport $PGPORT --hostname $PGAF_HOSTNAME --auth scram-sha-256 --no-ssl"
case "$role" in
monitor)
    # shellcheck disable=SC2086  # $common is a list of options
    pg_autoctl create monitor $common
    start_locally
    # The nodes log in as autoctl_node with this password.
    echo "ALTER USER autoctl_node PASSWORD :'password';" |
        local_sql -d pg_auto_failover -v password="$PGAF_MONITOR_PASSWORD"
    ;;
node)
    : "${PGAF_MONITOR:?set PGAF_MONITOR: the monitor's address}"
    : "${PGAF_REPLICATION_PASSWORD:?set PGAF_REPLICATION_PASSWORD (see .env.example)}"
    : "${POSTGRES_USER:?set POSTGRES_USER}"
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (see .env.example)}"
    : "${POSTGRES_DB:?set POSTGRES_DB}"
    monitor="postgres://autoctl_node:$PGAF_MONITOR_PASSWORD@$PGAF_MONITOR:${PGAF_MONITOR_PORT:-5432}/pg_auto_failover?sslmode=prefer"
    # shellcheck disable=SC2086
    pg_autoctl create postgres $common --name "${PGAF_NAME:-$(hostname)}" --monitor "$monitor" \
        --dbname "$POSTGRES_DB"
    pg_autoctl config set replication.password "$PGAF_REPLICATION_PASSWORD"
    start_locally
    if [ "$(local_sql -d postgres -tAc 'SELECT pg_is_in_recovery()')" = f ]; then
        # The first node, and so the primary: its standbys copy all of this. The
        # application's containers (the networks this node is on) log in with a password.
        printf 'host "%s" "%s" samenet scram-sha-256 # the application (pgaf-member.sh)\n' \
            "$POSTGRES_DB" "$POSTGRES_USER" >>"$PGDATA/pg_hba.conf"
        # pg_autoctl's own rules let the other nodes reach --dbname only, but a demoted
        # primary's pg_rewind connects to the postgres database: without this it fails and
        # every rejoin falls back to a full pg_basebackup.
        printf 'host postgres pgautofailover_replicator samenet scram-sha-256 # pg_rewind (pgaf-member.sh)\n' \
            >>"$PGDATA/pg_hba.conf"
        pg_ctl -D "$PGDATA" -s reload
        echo "ALTER USER pgautofailover_replicator PASSWORD :'password';" |
            local_sql -d postgres -v password="$PGAF_REPLICATION_PASSWORD"
        local_sql -d postgres -v user="$POSTGRES_USER" -v password="$POSTGRES_PASSWORD" \
            -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password';
ALTER DATABASE :"db" OWNER TO :"user";
SQL
    fi
    ;;
*)
    echo "pgaf-member: say monitor or node, not $role" >&2
    exit 64
    ;;
esac
stop_locally
touch "$created"
exec pg_autoctl run
