#!/usr/bin/env bash
# `make run`: a whole Herald on this machine. Builds the debug binaries, starts redis-server,
# nats-server (JetStream) and nx-27017 (unless MONGODB_URI is set) with their data under .data/,
# then one dispatcher, two gateways and the demo page (http://127.0.0.1:8080/, built on the JS
# SDK in clients/js). Ctrl-C, SIGTERM, SIGHUP (a closed terminal) or a closed output pipe
# (`make run | tee log`, then Ctrl-C) stops everything it started; so does a guard process if this
# script is killed outright. A process that exits meanwhile is reported and started again.
#
# Settings come from the environment the Makefile exports (see the top of the Makefile).
set -euo pipefail
# `wait -n -p` (which process exited) is bash 5.1's.
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
    echo "run: bash 5.1 or later is needed (this is $BASH_VERSION)" >&2
    exit 1
fi

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

# HERALD_RUN_DATA and HERALD_RUN_TARGET: elsewhere than .data/ and the debug build (for a test).
data="${HERALD_RUN_DATA:-$root/.data}"
logs="$data/logs"
# As messages show it: relative to the repository when inside it.
logs_shown="${logs#"$root/"}"
venv="$root/.venv"
target="${HERALD_RUN_TARGET:-${CARGO_TARGET_DIR:-$root/target}/debug}"

# Where the Herald processes listen; overridable, so that a test can run this beside a dev's own.
dispatcher_addr="${HERALD_RUN_DISPATCHER:-127.0.0.1:8090}"
IFS=, read -r -a gateway_addrs <<<"${HERALD_RUN_GATEWAYS:-127.0.0.1:8081,127.0.0.1:8082}"
demo_addr="${HERALD_RUN_DEMO:-127.0.0.1:8080}"
# Their internal listeners (probes, /metrics, the dispatcher's operator API), one per gateway.
dispatcher_internal="${HERALD_RUN_DISPATCHER_INTERNAL:-127.0.0.1:8190}"
IFS=, read -r -a gateway_internals <<<"${HERALD_RUN_GATEWAYS_INTERNAL:-127.0.0.1:8181,127.0.0.1:8182}"
[ "${#gateway_internals[@]}" -eq "${#gateway_addrs[@]}" ] ||
    { echo "run: HERALD_RUN_GATEWAYS_INTERNAL needs one address per gateway in HERALD_RUN_GATEWAYS" >&2; exit 1; }

# Never fails: with the terminal gone (SIGHUP) or the pipe closed, a message must not stop the
# clean-up.
say() { printf 'run: %s\n' "$*" >&2 2>/dev/null || true; }
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
ports=("$redis_port" "$nats_port" "${dispatcher_addr##*:}" "${dispatcher_internal##*:}" "${demo_addr##*:}")
for addr in "${gateway_addrs[@]}" "${gateway_internals[@]}"; do ports+=("${addr##*:}"); done
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
# HERALD_RUN_SKIP_BUILD=1: the binaries and the SDK as they are (a test that built them already).
if [ -z "${HERALD_RUN_SKIP_BUILD:-}" ]; then
    say "building (cargo build --bins)"
    cargo build --bins
fi
for bin in herald-dispatcher herald-gateway heraldctl; do
    [ -x "$target/$bin" ] || die "$target/$bin was not built"
done
command -v node >/dev/null 2>&1 || die "node is not on PATH: the demo page needs Node.js 20 or later"
if [ -z "${HERALD_RUN_SKIP_BUILD:-}" ]; then
    say "building the JS SDK (npm run build in clients/js)"
    npm --prefix clients/js run --silent build
fi

# --- process supervision -----------------------------------------------------------------------
mkdir -p "$logs" "$data/redis" "$data/nats" "$data/mongo"

# Every process this script runs, by name, in start order; pid_of holds each one's pid while it
# runs (empty once it has exited). $pidfile lists them for the guard (below) and for anyone who
# wants to kill one by hand.
order=()
declare -A pid_of=()
pidfile="$data/run.pids"
: >"$pidfile"
# A background child of this (job-control-less) shell never leads a process group, so setsid
# execs in place rather than forking: $! stays the server's own pid.
setsid=""
if command -v setsid >/dev/null 2>&1; then setsid=setsid; fi

# The guard: if this script dies without stopping what it started (kill -9, or anything else
# that skips its clean-up), the guard, in a session of its own, stops every process still
# listed. A clean stop empties the list first, so the guard then finds nothing to do.
# shellcheck disable=SC2016 # expanded by the guard's own shell
# A script killed but not yet reaped by its parent is a zombie, which `kill -0` still finds:
# where /proc says so, that counts as gone.
$setsid bash -c '
    gone() {
        if [ -r "/proc/$1/stat" ]; then
            [ "$(cut -d" " -f3 "/proc/$1/stat" 2>/dev/null)" = Z ]
        else
            ! kill -0 "$1" 2>/dev/null
        fi
    }
    until gone "$1"; do sleep 1; done
    pids=$(cut -d" " -f2 "$2" 2>/dev/null)
    [ -n "$pids" ] || exit 0
    kill -TERM $pids 2>/dev/null
    sleep 10
    kill -KILL $pids 2>/dev/null
    : >"$2"
' run-guard "$$" "$pidfile" </dev/null >/dev/null 2>&1 &

# started NAME PID: records NAME's pid (empty: it has exited).
started() {
    local name="$1" pid="$2" n
    [ -n "${pid_of[$name]+set}" ] || order+=("$name")
    pid_of[$name]="$pid"
    for n in "${order[@]}"; do
        if [ -n "${pid_of[$n]}" ]; then printf '%s %s\n' "$n" "${pid_of[$n]}"; fi
    done >"$pidfile"
}

# start NAME COMMAND...: runs a dependency in the background, its output into .data/logs/NAME.log.
# It gets a session of its own, so the terminal's Ctrl-C reaches only this script and the Herald
# processes: the dependencies stop after Herald has drained, when stop_all tells them to.
start() {
    local name="$1"
    shift
    $setsid "$@" >>"$logs/$name.log" 2>&1 </dev/null &
    started "$name" "$!"
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
    ) 2>&1 </dev/null &
    started "$name" "$!"
}

stopping=false
# shellcheck disable=SC2317 # called from the EXIT trap
stop_all() {
    local status=$?
    $stopping && return
    stopping=true
    # Nothing may cut the clean-up short: not a failing command, not a closed pipe or terminal,
    # not a second Ctrl-C.
    set +e
    trap '' INT TERM HUP PIPE
    [ "${#order[@]}" -gt 0 ] || exit "$status"
    say "stopping"
    # Herald processes first, so they drain and flush while what they depend on is still up.
    local name pid phase
    for phase in herald deps; do
        local group=()
        for name in "${order[@]}"; do
            pid="${pid_of[$name]}"
            [ -n "$pid" ] || continue
            case "$name" in
                gateway-* | dispatcher | demo) [ "$phase" = herald ] && group+=("$pid") ;;
                *) [ "$phase" = deps ] && group+=("$pid") ;;
            esac
        done
        for pid in "${group[@]}"; do kill -TERM "$pid" 2>/dev/null; done
        local deadline=$((SECONDS + 15))
        for pid in "${group[@]}"; do
            while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
        done
    done
    for name in "${order[@]}"; do
        pid="${pid_of[$name]}"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) did not stop within 15s: killing it"
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    : >"$pidfile"
    # Reaps them; not a bare `wait`, which would also wait for the guard, and it outlives us.
    for name in "${order[@]}"; do
        pid="${pid_of[$name]}"
        [ -z "$pid" ] || wait "$pid" 2>/dev/null
    done
    exit "$status"
}

trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
# `make run | tee log`, then Ctrl-C: tee is gone, and a write to the pipe must end this script
# through its clean-up rather than kill it on the spot.
trap 'exit 141' PIPE

# wait_port NAME PORT: waits until PORT answers, or fails if the process NAME died or it took too long.
wait_port() {
    local name="$1" port="$2" pid="${pid_of[$1]}" deadline=$((SECONDS + 30))
    until answers "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logs/$name.log" >&2 || true
            die "$name exited before listening on port $port (log: $logs_shown/$name.log)"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "$name did not listen on port $port within 30s (log: $logs_shown/$name.log)"
        sleep 0.1
    done
}

# The demo page's gateways: ws://host:port,...
gateway_urls=""
for addr in "${gateway_addrs[@]}"; do gateway_urls+="${gateway_urls:+,}ws://$addr"; done

# launch NAME: starts the process NAME, the first time or again.
launch() {
    case "$1" in
        redis)
            start redis redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
                --dir "$data/redis" --daemonize no
            ;;
        nats) start nats "$venv/bin/nats-server" -js -sd "$data/nats" -p "$nats_port" -a 127.0.0.1 ;;
        mongo)
            # nx-27017 logs to stderr in the foreground; its own log file would only duplicate that.
            start mongo "$venv/bin/nx-27017" --db "$data/mongo/herald.db" --host 127.0.0.1 -p "$mongo_port" \
                --log-file /dev/null --pid-file "$data/mongo/nx-27017.pid"
            ;;
        dispatcher)
            HERALD_DISPATCHER_LISTEN="$dispatcher_addr" HERALD_DISPATCHER_INTERNAL_LISTEN="$dispatcher_internal" \
                start_herald dispatcher "$target/herald-dispatcher"
            ;;
        gateway-*)
            local i="${1#gateway-}"
            HERALD_GATEWAY_LISTEN="${gateway_addrs[$((i - 1))]}" \
                HERALD_GATEWAY_INTERNAL_LISTEN="${gateway_internals[$((i - 1))]}" \
                start_herald "$1" "$target/herald-gateway"
            ;;
        # The demo page and its dev-only helpers (tokens for any user, the API with the admin
        # token): clients/js/demo/server.js. It listens on 127.0.0.1 only.
        demo)
            HERALD_DEMO_LISTEN="$demo_addr" HERALD_DEMO_GATEWAYS="$gateway_urls" \
                HERALD_DEMO_API="http://$dispatcher_addr" HERALD_DEMO_HERALDCTL="$target/heraldctl" \
                start_herald demo node clients/js/demo/server.js
            ;;
    esac
}

# port_for NAME: the port NAME listens on.
port_for() {
    case "$1" in
        redis) echo "$redis_port" ;;
        nats) echo "$nats_port" ;;
        mongo) echo "$mongo_port" ;;
        dispatcher) echo "${dispatcher_addr##*:}" ;;
        gateway-*)
            local i="${1#gateway-}"
            echo "${gateway_addrs[$((i - 1))]##*:}"
            ;;
        demo) echo "${demo_addr##*:}" ;;
    esac
}

# --- start everything --------------------------------------------------------------------------
all=(redis nats)
if $own_mongo; then all+=(mongo); else say "using MONGODB_URI for MongoDB; not starting nx-27017"; fi
all+=(dispatcher)
for i in "${!gateway_addrs[@]}"; do all+=("gateway-$((i + 1))"); done
all+=(demo)
for name in "${all[@]}"; do
    launch "$name"
    wait_port "$name" "$(port_for "$name")"
done

cat >&2 <<EOF || true

Herald is running (logs in $logs_shown/; Ctrl-C stops everything).
  demo page:  http://$demo_addr/   (connect as a user, publish, watch receipts)
  gateways:   $(for a in "${gateway_addrs[@]}"; do printf 'ws://%s/v1/connect   ' "$a"; done)
  dispatcher: http://$dispatcher_addr   (operator API, probes, metrics: http://$dispatcher_internal)
  probes and metrics of the gateways: $(for a in "${gateway_internals[@]}"; do printf 'http://%s/metrics   ' "$a"; done)

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
  HERALD_ADMIN_URL=http://$dispatcher_internal target/debug/heraldctl status

Try a fault: kill -9 a gateway (the pids are in ${pidfile#"$root/"}) and watch its clients move to the
other one. Whatever exits is reported here and started again.

EOF

# --- run until a signal ------------------------------------------------------------------------
# A process that exits is reported and started again after RESTART_DELAY seconds, as an
# orchestrator would; one that exits RESTART_LIMIT times within RESTART_WINDOW seconds is left
# down, with a message. The rest keeps running either way: killing a gateway or Redis by hand is
# a fault to watch Herald heal, not a reason to stop everything.
RESTART_DELAY=2
RESTART_LIMIT=3
RESTART_WINDOW=60
declare -A exits=()
set +e
while true; do
    running=()
    for name in "${order[@]}"; do
        if [ -n "${pid_of[$name]}" ]; then running+=("${pid_of[$name]}"); fi
    done
    if [ "${#running[@]}" -eq 0 ]; then
        say "nothing is left running"
        exit 1
    fi
    exited=""
    wait -n -p exited "${running[@]}"
    status=$?
    [ -n "$exited" ] || continue
    for name in "${order[@]}"; do [ "${pid_of[$name]}" = "$exited" ] && break; done
    started "$name" ""
    # This exit and the earlier ones still within the window.
    recent=""
    for t in ${exits[$name]:-} "$SECONDS"; do
        if [ $((SECONDS - t)) -lt "$RESTART_WINDOW" ]; then recent+="$t "; fi
    done
    exits[$name]="$recent"
    read -r -a times <<<"$recent"
    if [ "${#times[@]}" -ge "$RESTART_LIMIT" ]; then
        say "$name exited (status $status), ${#times[@]} times within ${RESTART_WINDOW}s: leaving it down (log: $logs_shown/$name.log). The rest keeps running; Ctrl-C stops all"
        continue
    fi
    say "$name exited (status $status; log: $logs_shown/$name.log): starting it again in ${RESTART_DELAY}s"
    sleep "$RESTART_DELAY"
    launch "$name"
done
