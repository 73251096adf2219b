#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis the tests use are running on loopback; start them when
# they are installed but stopped, and say clearly what is missing when they are not installed.
set -euo pipefail

pg_ready() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_ready() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
wait_for() { for _ in $(seq 1 60); do "$1" && return 0; sleep 0.5; done; return 1; }

if pg_ready; then
  echo "PostgreSQL: running on 127.0.0.1:5432"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "PostgreSQL: starting cluster $version/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for pg_ready || { echo "PostgreSQL did not come up; see /var/log/postgresql/" >&2; exit 1; }
else
  echo "PostgreSQL is not installed here. Install it (Debian: apt-get install postgresql) or set" >&2
  echo "DATABASE_URL to a reachable server (trust or password auth for the test user)." >&2
  exit 1
fi

if redis_ready; then
  echo "Redis: running on 127.0.0.1:6379"
elif command -v redis-server >/dev/null 2>&1; then
  echo "Redis: starting"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log \
    || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for redis_ready || { echo "Redis did not come up" >&2; exit 1; }
else
  echo "Redis is not installed here. Install it (Debian: apt-get install redis-server) or set" >&2
  echo "REDIS_URL to a reachable server." >&2
  exit 1
fi
