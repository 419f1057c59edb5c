#!/usr/bin/env bash
# Runs agentd's main job on this machine: agentd (standalone) on a unix-socket channel, the
# host relay (agentctl serve) that owns the channel, and a port forward through them. It checks
# the path with a real TCP echo, then keeps running until Ctrl-C.
#
#   LOCAL=127.0.0.1:18080 TARGET=127.0.0.1:18081 scripts/run-local.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v socat >/dev/null || { echo "run-local: needs socat (apt-get install socat)" >&2; exit 1; }
BUILD=${BUILD:-build}
LOCAL=${LOCAL:-127.0.0.1:18080}
TARGET=${TARGET:-127.0.0.1:18081}
RUN=$(mktemp -d /tmp/agentd-run.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT
trap 'exit 130' INT TERM # Ctrl-C: the EXIT trap stops everything

"$BUILD/agentd" --standalone --port "unix-listen:$RUN/channel.sock" 2>"$RUN/agentd.log" &
pids+=($!)
"$BUILD/agentctl" serve --port "unix:$RUN/channel.sock" --listen "$RUN/agent.sock" 2>"$RUN/serve.log" &
pids+=($!)
"$BUILD/agentctl" wait --connect "$RUN/agent.sock" --timeout 20s
"$BUILD/agentctl" forward --connect "$RUN/agent.sock" "$LOCAL" "$TARGET" 2>"$RUN/forward.log" &
pids+=($!)
for _ in $(seq 100); do grep -q forwarding "$RUN/forward.log" && break; sleep 0.05; done

# A destination "inside the guest" (this machine, since agentd runs standalone) if none is
# listening, so the default run shows bytes crossing the agent.
if ! (exec 3<>"/dev/tcp/${TARGET%:*}/${TARGET##*:}") 2>/dev/null; then
	socat "TCP-LISTEN:${TARGET##*:},bind=${TARGET%:*},reuseaddr,fork" EXEC:cat &
	pids+=($!)
	sleep 0.2
fi
reply=$(echo "hello through agentd" | socat -t 2 - "TCP:$LOCAL")
echo "agent channel: $RUN/channel.sock   relay socket: $RUN/agent.sock"
echo "forward $LOCAL -> guest $TARGET: sent 'hello through agentd', got '$reply'"
echo "logs in $RUN; Ctrl-C to stop"
tail -f "$RUN/agentd.log" "$RUN/serve.log" &
pids+=($!)
wait "${pids[0]}" || true
