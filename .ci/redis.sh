#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:6379 for the `redis` feature's tests, and that
# redis-server and redis-cli are installed (the cluster tests start their own nodes with them).
# Run it (bash .ci/redis.sh) or source it; it fails non-zero, loudly, if Redis cannot be had.

# A subshell, so that sourcing this file changes none of the caller's shell options.
racefree_ensure_redis() (
    set -euo pipefail
    fail() {
        echo "ci/redis.sh: $*" >&2
        exit 1
    }
    ping() {
        [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]
    }

    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        echo "ci/redis.sh: installing redis-server (provides redis-cli)" >&2
        command -v apt-get >/dev/null 2>&1 || fail "redis-server is missing and apt-get is not available"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || fail "apt-get update failed"
        apt-get install -y -qq redis-server >/dev/null || fail "apt-get install redis-server failed"
    fi
    command -v redis-server >/dev/null 2>&1 || fail "redis-server still missing after install"
    command -v redis-cli >/dev/null 2>&1 || fail "redis-cli still missing after install"

    # `SET ... NX GET`, used by the idempotency claim, needs Redis 7.0 or newer.
    version=$(redis-server --version | sed -n 's/.*v=\([0-9][0-9]*\)\..*/\1/p')
    [ -n "$version" ] && [ "$version" -ge 7 ] || fail "Redis >= 7.0 required, found: $(redis-server --version)"

    if ! ping; then
        echo "ci/redis.sh: starting redis-server on 127.0.0.1:6379" >&2
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            || fail "redis-server did not start"
    fi
    for _ in $(seq 1 100); do
        if ping; then
            echo "ci/redis.sh: $(redis-server --version | cut -d' ' -f1-3) answers on 127.0.0.1:6379" >&2
            exit 0
        fi
        sleep 0.1
    done
    fail "redis on 127.0.0.1:6379 does not answer PING after 10 s"
)

if ! racefree_ensure_redis; then
    return 1 2>/dev/null || exit 1
fi
