#!/usr/bin/env bash
# PostgreSQL for the records' tests: Debian's server binaries (initdb, pg_ctl), installed if absent. Nothing is
# started here: the tests start a throwaway server of their own (tests/postgres.py), as the user 'postgres' when
# they run as root. To use a running server instead, set FASTPADIM_TEST_POSTGRES_URL=postgresql://USER@HOST/postgres
# (a superuser: every test creates and drops a database).
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
    exit 0
fi
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -q
$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
