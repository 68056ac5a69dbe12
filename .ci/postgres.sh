#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with trust auth for user `postgres`
# and a database `test`, for the `postgres` feature's tests; installs and starts one when it is
# missing. Run it (bash .ci/postgres.sh) or source it; it fails non-zero, loudly, otherwise.
# The tests create (and drop) a schema of their own per run: nothing else is touched.

racefree_ensure_postgres() (
    set -euo pipefail
    fail() {
        echo "ci/postgres.sh: $*" >&2
        exit 1
    }
    ready() {
        psql "postgresql://postgres@127.0.0.1:5432/postgres" -XtAc "select 1" >/dev/null 2>&1
    }

    if ! command -v psql >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
        if ! ready; then
            echo "ci/postgres.sh: installing postgresql" >&2
            command -v apt-get >/dev/null 2>&1 || fail "postgresql is missing and apt-get is not available"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq || fail "apt-get update failed"
            apt-get install -y -qq postgresql >/dev/null || fail "apt-get install postgresql failed"
        fi
    fi

    if ! ready; then
        echo "ci/postgres.sh: starting PostgreSQL" >&2
        if command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
            read -r version cluster _ < <(pg_lsclusters -h | head -n1)
            pg_ctlcluster "$version" "$cluster" start || true
        else
            bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
            data=/var/lib/postgresql/racefree-ci
            if [ ! -d "$data" ]; then
                install -d -o postgres -g postgres "$data"
                su postgres -c "$bin/initdb -D $data -A trust -U postgres" >/dev/null || fail "initdb failed"
            fi
            install -d -o postgres -g postgres /var/run/postgresql
            su postgres -c "$bin/pg_ctl -D $data -l $data/server.log -o '-c listen_addresses=127.0.0.1 -p 5432' -w start" \
                || fail "pg_ctl start failed (see $data/server.log)"
        fi
    fi
    for _ in $(seq 1 100); do
        ready && break
        sleep 0.1
    done
    ready || fail "PostgreSQL on 127.0.0.1:5432 does not accept user postgres without a password (trust auth needed)"
    if [ "$(psql "postgresql://postgres@127.0.0.1:5432/postgres" -XtAc "select 1 from pg_database where datname = 'test'")" != "1" ]; then
        psql "postgresql://postgres@127.0.0.1:5432/postgres" -Xqc "create database test" || fail "cannot create database test"
    fi
    echo "ci/postgres.sh: $(psql "postgresql://postgres@127.0.0.1:5432/test" -XtAc 'show server_version') answers on 127.0.0.1:5432" >&2
)

if ! racefree_ensure_postgres; then
    return 1 2>/dev/null || exit 1
fi
