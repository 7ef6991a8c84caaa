#!/bin/sh
# Before the packages go in: no cluster of Debian's own (the entrypoint makes one in PGDATA).
set -e
mkdir -p "$1/etc/postgresql-common"
echo 'create_main_cluster = false' >"$1/etc/postgresql-common/createcluster.conf"
