#!/usr/bin/env bash
# `make run`: a whole Herald on this machine. Builds the debug binaries, starts redis-server,
# nats-server (JetStream) and nx-27017 (unless MONGODB_URI is set) with their data under .data/,
# then one dispatcher, two gateways and the demo page (http://127.0.0.1:8080/, built on the JS
# SDK in clients/js). Ctrl-C or SIGTERM stops everything it started.
#
# Settings come from the environment the Makefile exports (see the top of the Makefile).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

: "${HERALD_JWT_SECRET:?not set: start this with make run}"
: "${HERALD_ADMIN_TOKEN:?not set: start this with make run}"
: "${HERALD_REDIS_URL:?not set: start this with make run}"
: "${HERALD_NATS_URL:?not set: start this with make run}"
: "${HERALD_MONGODB_URI:?not set: start this with make run}"
export HERALD_JWT_SECRET HERALD_ADMIN_TOKEN HERALD_REDIS_URL HERALD_NATS_URL HERALD_MONGODB_URI
# Optional: scoped API tokens and the CORS allow-list (the Makefile sets dev values).
export HERALD_PUBLISH_TOKEN="${HERALD_PUBLISH_TOKEN:-}" HERALD_READ_TOKEN="${HERALD_READ_TOKEN:-}"
export HERALD_API_CORS_ORIGINS="${HERALD_API_CORS_ORIGINS:-}"

data="$root/.data"
logs="$data/logs"
venv="$root/.venv"
target="${CARGO_TARGET_DIR:-$root/target}/debug"

dispatcher_addr=127.0.0.1:8090
gateway_addrs=(127.0.0.1:8081 127.0.0.1:8082)
demo_addr=127.0.0.1:8080

say() { printf 'run: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}

# The port of a URL such as redis://127.0.0.1:16379 or mongodb://user:pw@host:27117/db.
port_of() {
    local port
    port="$(sed -nE 's#^[a-z+]+://([^@/]*@)?[^:/]+:([0-9]+)([/?].*)?$#\2#p' <<<"$1")"
    [ -n "$port" ] || die "cannot find a port in $1"
    printf '%s' "$port"
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

redis_port="$(port_of "$HERALD_REDIS_URL")"
nats_port="$(port_of "$HERALD_NATS_URL")"
own_mongo=true
if [ -n "${MONGODB_URI:-}" ]; then
    own_mongo=false
else
    mongo_port="$(port_of "$HERALD_MONGODB_URI")"
fi

# --- refuse to start over something else ------------------------------------------------------
ports=("$redis_port" "$nats_port" "${dispatcher_addr##*:}" "${demo_addr##*:}")
for addr in "${gateway_addrs[@]}"; do ports+=("${addr##*:}"); done
if $own_mongo; then ports+=("$mongo_port"); fi
for port in "${ports[@]}"; do
    if answers "$port"; then
        who=""
        if command -v ss >/dev/null 2>&1; then
            who="$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n1 || true)"
        fi
        die "port $port on 127.0.0.1 is already in use${who:+ ($who)}: stop that process (a previous make run?) and try again"
    fi
done

for bin in "$venv/bin/nats-server" "$venv/bin/nx-27017"; do
    [ -x "$bin" ] || die "$bin is missing: run make deps"
done
command -v redis-server >/dev/null 2>&1 || die "redis-server is not on PATH: run make deps"

# --- build -------------------------------------------------------------------------------------
say "building (cargo build --bins)"
cargo build --bins
for bin in herald-dispatcher herald-gateway heraldctl; do
    [ -x "$target/$bin" ] || die "$target/$bin was not built"
done
say "building the JS SDK (npm run build in clients/js)"
command -v node >/dev/null 2>&1 || die "node is not on PATH: the demo page needs Node.js 20 or later"
npm --prefix clients/js run --silent build

# --- process supervision -----------------------------------------------------------------------
mkdir -p "$logs" "$data/redis" "$data/nats" "$data/mongo"

names=()
pids=()
# A background child of this (job-control-less) shell never leads a process group, so setsid
# execs in place rather than forking: $! stays the server's own pid.
setsid=""
if command -v setsid >/dev/null 2>&1; then setsid=setsid; fi

# start NAME COMMAND...: runs a dependency in the background, its output into .data/logs/NAME.log.
# It gets a session of its own, so the terminal's Ctrl-C reaches only this script and the Herald
# processes: the dependencies stop after Herald has drained, when stop_all tells them to.
start() {
    local name="$1"
    shift
    $setsid "$@" >>"$logs/$name.log" 2>&1 &
    names+=("$name")
    pids+=("$!")
}

# start_herald NAME COMMAND...: like start, and also shows the output here with a NAME prefix.
start_herald() {
    local name="$1"
    shift
    # The log readers ignore Ctrl-C so that they outlive the process they read, which shuts down
    # (and logs) after the terminal's SIGINT.
    "$@" > >(
        trap '' INT
        tee -a "$logs/$name.log" | sed -u "s/^/$(printf '%-11s' "$name") | /"
    ) 2>&1 &
    names+=("$name")
    pids+=("$!")
}

stopping=false
# shellcheck disable=SC2317 # called from the EXIT trap
stop_all() {
    local status=$?
    $stopping && return
    stopping=true
    trap - INT TERM HUP
    [ "${#pids[@]}" -gt 0 ] || exit "$status"
    say "stopping"
    # Herald processes first, so they drain and flush while what they depend on is still up.
    local i pid
    for phase in herald deps; do
        local group=()
        for i in "${!pids[@]}"; do
            case "${names[$i]}" in
                gateway-* | dispatcher | demo) [ "$phase" = herald ] && group+=("${pids[$i]}") ;;
                *) [ "$phase" = deps ] && group+=("${pids[$i]}") ;;
            esac
        done
        for pid in "${group[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        local deadline=$((SECONDS + 15))
        for pid in "${group[@]}"; do
            while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        done
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            say "${names[$i]} (pid ${pids[$i]}) did not stop within 15s: killing it"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
    exit "$status"
}

trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# wait_port NAME PORT: waits until PORT answers, or fails if the process NAME died or it took too long.
wait_port() {
    local name="$1" port="$2" pid="${pids[-1]}" deadline=$((SECONDS + 30))
    until answers "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logs/$name.log" >&2 || true
            die "$name exited before listening on port $port (log: .data/logs/$name.log)"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "$name did not listen on port $port within 30s (log: .data/logs/$name.log)"
        sleep 0.1
    done
}

# --- dependencies ------------------------------------------------------------------------------
start redis redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$data/redis" --daemonize no
wait_port redis "$redis_port"

start nats "$venv/bin/nats-server" -js -sd "$data/nats" -p "$nats_port" -a 127.0.0.1
wait_port nats "$nats_port"

if $own_mongo; then
    # nx-27017 logs to stderr in the foreground; its own log file would only duplicate that.
    start mongo "$venv/bin/nx-27017" --db "$data/mongo/herald.db" --host 127.0.0.1 -p "$mongo_port" \
        --log-file /dev/null --pid-file "$data/mongo/nx-27017.pid"
    wait_port mongo "$mongo_port"
else
    say "using MONGODB_URI for MongoDB; not starting nx-27017"
fi

# --- Herald ------------------------------------------------------------------------------------
HERALD_DISPATCHER_LISTEN="$dispatcher_addr" start_herald dispatcher "$target/herald-dispatcher"
wait_port dispatcher "${dispatcher_addr##*:}"
for i in "${!gateway_addrs[@]}"; do
    HERALD_GATEWAY_LISTEN="${gateway_addrs[$i]}" start_herald "gateway-$((i + 1))" "$target/herald-gateway"
    wait_port "gateway-$((i + 1))" "${gateway_addrs[$i]##*:}"
done

# The demo page and its dev-only helpers (tokens for any user, the API with the admin token):
# clients/js/demo/server.js. It listens on 127.0.0.1 only.
gateway_urls=""
for addr in "${gateway_addrs[@]}"; do gateway_urls+="${gateway_urls:+,}ws://$addr"; done
HERALD_DEMO_LISTEN="$demo_addr" HERALD_DEMO_GATEWAYS="$gateway_urls" \
    HERALD_DEMO_API="http://$dispatcher_addr" HERALD_DEMO_HERALDCTL="$target/heraldctl" \
    start_herald demo node clients/js/demo/server.js
wait_port demo "${demo_addr##*:}"

cat >&2 <<EOF

Herald is running (logs in .data/logs/; Ctrl-C stops everything).
  demo page:  http://$demo_addr/   (connect as a user, publish, watch receipts)
  gateways:   ws://${gateway_addrs[0]}/v1/connect   ws://${gateway_addrs[1]}/v1/connect
  dispatcher: http://$dispatcher_addr

Or by hand, in another terminal:
  TOKEN=\$(make -s token USER=alice)
  websocat "ws://${gateway_addrs[0]}/v1/connect?token=\$TOKEN"
      then ack what arrives by typing:  {"type":"ack","ids":["<id>"]}
  or in a browser console, with TOKEN set to the token:
      const ws = new WebSocket('ws://${gateway_addrs[0]}/v1/connect?token=' + TOKEN);
      ws.onmessage = (e) => { const f = JSON.parse(e.data); console.log(f);
        if (f.type === 'notification') ws.send(JSON.stringify({type: 'ack', ids: [f.id]})); };
  make publish TO=alice MSG='{"title":"hi"}'
  curl -H "Authorization: Bearer $HERALD_PUBLISH_TOKEN" -d '{"to":["alice"],"payload":{"title":"hi"}}' http://$dispatcher_addr/v1/publish
  curl -H "Authorization: Bearer $HERALD_ADMIN_TOKEN" http://$dispatcher_addr/v1/users/alice/pending

EOF

# Run until a signal, or until one of the processes exits on its own (then stop the rest).
set +e
wait -n "${pids[@]}"
status=$?
set -e
for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
        say "${names[$i]} exited (status $status; log: .data/logs/${names[$i]}.log)"
    fi
done
exit 1
