#!/bin/sh
# Entrypoint of every splitllm container: shape this container's link from a link profile, then run the tier.
#   Usage: shape-and-run.sh <cloud|edge|user> [--flag value ...]
#
#   LINK_PROFILE   wifi, 4g, 5g, fiber (shared/protocol/link_profiles.json) or none (default: none)
#   SHAPE_DEV      the interface to shape (default: eth0)
#   SHAPE_DRY_RUN  1: print the tc commands and the tier command instead of running them
#   SHAPE_NETEM    auto (default): use netem where the kernel has it; 0: never (tbf, and the emulator)
#   RUN_AS         drop to this user (via setpriv) before starting the tier; empty: stay root
#   SECRETS_DIR    with RUN_AS: where the tier's own copies of its credential go (default: /run/splitllm)
#   PYTHON         interpreter (default: python)
#
# Egress of $SHAPE_DEV (towards the parent tier) gets the profile's uplink rate, its one-way delay
# +- jitter and its loss:   tc qdisc replace dev eth0 root netem rate <up>mbit delay <d>ms <j>ms loss <l>%
# Ingress (the downlink) is redirected to an ifb device shaped the same way at the downlink rate, where
# the kernel has ifb; otherwise the downlink is left unshaped (with a warning). On a kernel without
# sch_netem, tbf shapes the rates and the tier's own link emulator adds the profile's delay, jitter and
# loss (SPLITLLM_LINK_PROFILE with SPLITLLM_LINK_RATE_SHAPED=true), as `splitllm topology` does.
#
# With RUN_AS, the files SPLITLLM_CREDENTIAL and SPLITLLM_TRUST_KEY name (mounted read-only; root's, mode 0600, on
# the host) are copied into $SECRETS_DIR, owned by RUN_AS, mode 0400, and the variables point at the copies.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PROFILES_FILE="${PROFILES_FILE:-$HERE/../shared/protocol/link_profiles.json}"
PROFILE="${LINK_PROFILE:-none}"
DEV="${SHAPE_DEV:-eth0}"
PY="${PYTHON:-python}"
DRY="${SHAPE_DRY_RUN:-0}"
TRY_NETEM="${SHAPE_NETEM:-auto}"
TIER="${1:-}"

if [ $# -lt 1 ]; then
    echo "usage: $0 <cloud|edge|user> [flags]" >&2
    exit 2
fi

say() { echo "shape-and-run: $*" >&2; }

act() {  # run (or, dry, print) one command
    if [ "$DRY" = 1 ]; then
        echo "$*"
    else
        "$@"
    fi
}

if [ "$PROFILE" != none ] && [ -n "$PROFILE" ]; then
    VALUES=$("$PY" -c '
import json, sys
profiles = json.load(open(sys.argv[1]))["profiles"]
if sys.argv[2] not in profiles:
    sys.exit("unknown LINK_PROFILE %r; known: %s or none" % (sys.argv[2], ", ".join(sorted(profiles))))
p = profiles[sys.argv[2]]
values = [format(float(p.get(k, 0.0)), "g") for k in ("up_mbps", "down_mbps", "delay_ms", "jitter_ms", "loss_pct")]
# tbf bursts as splitllm topology sets them: 4 ms at the rate, and at least 16 KiB
values += [str(max(16 * 1024, int(float(p[k]) * 1e6 / 8 * 0.004))) for k in ("up_mbps", "down_mbps")]
print(" ".join(values))
' "$PROFILES_FILE" "$PROFILE")
    read -r UP DOWN DELAY JITTER LOSS UPBURST DOWNBURST <<VALUES_EOF
$VALUES
VALUES_EOF
    EGRESS="rate ${UP}mbit delay ${DELAY}ms ${JITTER}ms loss ${LOSS}% limit 10000"
    INGRESS="rate ${DOWN}mbit delay ${DELAY}ms ${JITTER}ms loss ${LOSS}% limit 10000"
    say "profile $PROFILE on $DEV: up $UP Mbit/s, down $DOWN Mbit/s, delay ${DELAY}ms +- ${JITTER}ms, loss ${LOSS}%"

    if [ "$TRY_NETEM" != 0 ] && { [ "$DRY" = 1 ] || tc qdisc replace dev "$DEV" root netem $EGRESS 2>/dev/null; }; then
        [ "$DRY" = 1 ] && act tc qdisc replace dev "$DEV" root netem $EGRESS
        NETEM=1
    else
        say "no tc netem (not in this kernel, or SHAPE_NETEM=0): tbf shapes the rates; the tier's link emulator" \
            "adds delay, jitter and loss"
        act tc qdisc replace dev "$DEV" root tbf rate "${UP}mbit" burst "$UPBURST" latency 50ms || {
            say "ERROR: cannot shape $DEV (does the container have cap_add: [NET_ADMIN]?)"; exit 1; }
        NETEM=0
        case "$TIER" in
            edge|user) export SPLITLLM_LINK_PROFILE="$PROFILE" SPLITLLM_LINK_RATE_SHAPED=true
                       [ "$DRY" = 1 ] && echo "export SPLITLLM_LINK_PROFILE=$PROFILE SPLITLLM_LINK_RATE_SHAPED=true" ;;
        esac
    fi

    # the downlink: ingress -> ifb0 -> the same shaping at the downlink rate
    if [ "$DRY" = 1 ] || ip link add ifb0 type ifb 2>/dev/null || ip link show ifb0 >/dev/null 2>&1; then
        act ip link set ifb0 up
        act tc qdisc replace dev "$DEV" handle ffff: ingress
        act tc filter replace dev "$DEV" parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev ifb0
        if [ "$NETEM" = 1 ]; then
            act tc qdisc replace dev ifb0 root netem $INGRESS
        else
            act tc qdisc replace dev ifb0 root tbf rate "${DOWN}mbit" burst "$DOWNBURST" latency 50ms
        fi
    else
        say "WARNING: no ifb device (modprobe ifb on the host): the downlink ($DOWN Mbit/s) is not shaped"
    fi
else
    say "no link profile: $DEV not shaped"
fi

# the tier's credential and the trust key, readable by the user the tier runs as and by no one else
own_copy() {  # own_copy VARIABLE FILE NAME: FILE copied to $SECRETS/NAME, owned by RUN_AS, mode 0400
    if [ "$DRY" != 1 ] && [ ! -f "$2" ]; then
        say "ERROR: $1: no file $2 (splitllm credentials provision --dir compose/credentials makes them)"
        exit 1
    fi
    act install -d -o "$RUN_AS" -g "$RUN_AS" -m 0500 "$SECRETS"
    act install -o "$RUN_AS" -g "$RUN_AS" -m 0400 "$2" "$SECRETS/$3"
    [ "$DRY" = 1 ] && echo "export $1=$SECRETS/$3"
    export "$1=$SECRETS/$3"
}
if [ -n "${RUN_AS:-}" ]; then
    SECRETS="${SECRETS_DIR:-/run/splitllm}"
    case "${SPLITLLM_CREDENTIAL:-}" in /*) own_copy SPLITLLM_CREDENTIAL "$SPLITLLM_CREDENTIAL" credential.json ;; esac
    case "${SPLITLLM_TRUST_KEY:-}" in /*) own_copy SPLITLLM_TRUST_KEY "$SPLITLLM_TRUST_KEY" deployment.pub ;; esac
fi  # (a value that is no path, the JSON or PEM text itself, stays as it is)

if [ -n "${RUN_AS:-}" ] && command -v setpriv >/dev/null 2>&1; then
    RUN_HOME=$(getent passwd "$RUN_AS" | cut -d: -f6 || true)
    [ -n "$RUN_HOME" ] && export HOME="$RUN_HOME"  # the model cache lives under ~/.cache/splitllm
    set -- setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --init-groups --inh-caps=-all "$PY" -m shared.lab.cli "$@"
else
    set -- "$PY" -m shared.lab.cli "$@"
fi
if [ "$DRY" = 1 ]; then
    echo "exec $*"
    exit 0
fi
exec "$@"
