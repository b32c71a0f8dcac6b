#!/usr/bin/env bash
# Three letterbox nodes on one PostgreSQL database, on ports 8081-8083 of this machine.
# Put any HTTP load balancer in front of them (or talk to any one: each answers every
# request). Stop with Ctrl-C: each node drains its deliveries and leaves the fleet.
#
#   LETTERBOX_DATABASE_URL=postgres://letterbox:secret@127.0.0.1:5432/letterbox \
#   LETTERBOX_API_TOKEN=a-long-random-token-for-every-node \
#   examples/fleet/run.sh [--smtp smtp://relay:25 ...more serve flags]
#
# Without LETTERBOX_DATABASE_URL it starts a throwaway PostgreSQL (Debian's package,
# as the tests do) and removes it at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -z "${LETTERBOX_DATABASE_URL:-}" ]; then
    exec .ci/with-postgres bash -c 'LETTERBOX_DATABASE_URL=$LETTERBOX_TEST_DATABASE_URL exec "$0" "$@"' "$0" "$@"
fi
: "${LETTERBOX_API_TOKEN:?set LETTERBOX_API_TOKEN: every node must accept the same token}"
cargo build --release
bin=target/release/letterbox
work=$(mktemp -d "${TMPDIR:-/tmp}/letterbox-fleet.XXXXXX")
pids=()
stop() {
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    rm -rf "$work"
}
trap stop EXIT INT TERM

for n in 1 2 3; do
    # Each node has its own data directory: compiled policies and, without --smtp, an
    # outbox. Everything shared is in the database.
    "$bin" serve --listen "127.0.0.1:808$n" --data "$work/node$n" \
        --public-url "http://127.0.0.1:808$n" "$@" >"$work/node$n.log" 2>&1 &
    pids+=("$!")
done
for n in 1 2 3; do
    until curl -fsS "http://127.0.0.1:808$n/readyz" >/dev/null 2>&1; do sleep 0.2; done
done
echo "three nodes up; logs in $work/node*.log"
curl -fsS -H "Authorization: Bearer $LETTERBOX_API_TOKEN" http://127.0.0.1:8081/v1/nodes
echo
echo "try: LETTERBOX_SERVER=http://127.0.0.1:8082 $bin nodes"
wait "${pids[@]}"
