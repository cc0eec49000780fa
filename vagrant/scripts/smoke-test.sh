#!/usr/bin/env bash
# End-to-end smoke test of Ambit on the Vagrant cluster. Run on cp1 as root, after install.sh:
#
#   vagrant ssh cp1 -c 'sudo /ambit/vagrant/scripts/smoke-test.sh'
#
# One PASS or FAIL line per check, a summary, exit status 1 if anything failed:
#   1. Ambit runs and captures: every ambit-system pod Ready, the node DaemonSet on every
#      node, the sample and its waypoint ready, `ambit status` finds no problem, and the node
#      agents' pod lists it shows have every sample pod captured;
#   2. traffic goes through the waypoint: client -> Service server answers 200 with the echo
#      and the x-ambit-waypoint header only the waypoint's route adds;
#   3. policy: POST /admin from client is 403 (waypoint DENY), intruder gets 403 (waypoint
#      ALLOW names only client), and dialling the server's pod IP directly is refused for both
#      (L4 policy: only the waypoint's identity may connect to the server);
#   4. mTLS on the wire: a packet capture on the nodes of the client, the server and the
#      waypoint, taken while 2 and 3 ran, holds none of the requests' bytes in clear text,
#      the sample pods' traffic between nodes is HBONE (port 15008) only, and HBONE
#      connections open with TLS;
#   5. mTLS in the metrics (counted over this run only): the waypoint saw the client's SPIFFE
#      identity (istio_requests_total), the client's ztunnel opened mutual_tls connections as
#      the client, the server's ztunnel accepted mutual_tls connections from the waypoint, and
#      denied the intruder.
#
# Environment: AMBIT_SRC (/ambit), AMBIT_TRUST_DOMAIN (cluster.local), AMBIT_EXPECTED_NODES
# (3), KUBECONFIG (/etc/kubernetes/admin.conf), AMBIT_SMOKE_KEEP=1 keeps the work directory
# (captures, metrics) even when everything passed.
set -euo pipefail

AMBIT_SRC=${AMBIT_SRC:-/ambit}
AMBIT_TRUST_DOMAIN=${AMBIT_TRUST_DOMAIN:-cluster.local}
AMBIT_EXPECTED_NODES=${AMBIT_EXPECTED_NODES:-3}
AMBIT_SMOKE_KEEP=${AMBIT_SMOKE_KEEP:-0}
export KUBECONFIG=${KUBECONFIG:-/etc/kubernetes/admin.conf}
export PATH=/opt/ambit-cli/bin:$PATH

NS=demo
SERVICE_URL=http://server.$NS.svc.cluster.local
REQUESTS=5
HELPER=(env PYTHONPATH="$AMBIT_SRC" python3 "$AMBIT_SRC/vagrant/scripts/smokecheck.py")
CAPTURE_TEMPLATE=$AMBIT_SRC/vagrant/scripts/capture-pod.yaml
CAPTURE_DIR=/var/tmp/ambit-smoke
MARKER=ambit-smoke-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
WORK=$(mktemp -d /tmp/ambit-smoke.XXXXXX)

passed=0
failed=0
capture_nodes=()

pass() { printf 'PASS  %s\n' "$1"; passed=$((passed + 1)); }
fail() {
    printf 'FAIL  %s\n' "$1"
    shift
    local line
    for line in "$@"; do
        printf '%s\n' "$line" | sed 's/^/      /'
    done
    failed=$((failed + 1))
}
section() { printf '\n== %s\n' "$*"; }
# Counts the PASS/FAIL lines of a smokecheck.py run and shows them.
tally() {
    local out=$1
    printf '%s\n' "$out"
    passed=$((passed + $(grep -c '^PASS' <<< "$out" || true)))
    failed=$((failed + $(grep -c '^FAIL' <<< "$out" || true)))
}
# check TITLE COMMAND...: PASS if the command succeeds, else FAIL with its output.
check() {
    local title=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$title"
    else
        fail "$title" "\$ $*" "$(tail -n 20 <<< "$out")"
    fi
}

principal() { printf 'spiffe://%s/ns/%s/sa/%s' "$AMBIT_TRUST_DOMAIN" "$NS" "$1"; }
pod_of() { kubectl -n "$NS" get pods -l "$1" -o jsonpath='{.items[0].metadata.name}'; }
pod_field() { kubectl -n "$NS" get pod "$1" -o jsonpath="{$2}"; }
agent_pod_on() {
    kubectl -n ambit-system get pods --field-selector "spec.nodeName=$1" -o name \
        | sed -n 's#^pod/\(ambit-node-.*\)#\1#p' | head -n 1
}
# The API server proxies to pod ports: no route from here to the pods is needed.
pod_get() { kubectl get --raw "/api/v1/namespaces/$1/pods/$2:$3/proxy/$4"; }

# Run by the EXIT trap (shellcheck 0.9 takes trap-only functions for unreachable code).
# shellcheck disable=SC2317
cleanup() {
    local node
    for node in "${capture_nodes[@]}"; do
        kubectl -n default delete pod "ambit-smoke-capture-$node" --ignore-not-found \
            --wait=false >/dev/null 2>&1 || true
    done
    if [[ $failed -gt 0 || $AMBIT_SMOKE_KEEP == 1 ]]; then
        printf '\nwork directory kept: %s\n' "$WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
summary() {
    printf '\nsmoke test: %d passed, %d failed\n' "$passed" "$failed"
    [[ $failed -eq 0 ]] || exit 1
    exit 0
}

[[ -r $KUBECONFIG ]] || { echo "cannot read $KUBECONFIG: run on cp1 as root" >&2; exit 2; }
echo "smoke test, marker $MARKER, work directory $WORK"

# --- 1. Ambit runs and captures ----------------------------------------------------------------
section "1. Ambit runs and captures the sample pods"
check "every pod in ambit-system is Ready" \
    kubectl -n ambit-system wait --for=condition=Ready pod --all --timeout=3m
ds=$(kubectl -n ambit-system get daemonset ambit-node \
    -o jsonpath='{.status.desiredNumberScheduled} {.status.numberReady}' 2>&1) || true
if [[ $ds == "$AMBIT_EXPECTED_NODES $AMBIT_EXPECTED_NODES" ]]; then
    pass "DaemonSet ambit-node is ready on all $AMBIT_EXPECTED_NODES nodes"
else
    fail "DaemonSet ambit-node is ready on all $AMBIT_EXPECTED_NODES nodes" \
        "desired/ready: $ds" "$(kubectl -n ambit-system get pods -o wide 2>&1)"
fi
for deployment in server client intruder waypoint; do
    check "deployment $NS/$deployment is available" \
        kubectl -n "$NS" rollout status "deployment/$deployment" --timeout=3m
done
check "Gateway $NS/waypoint is Programmed" \
    kubectl -n "$NS" wait --for=condition=Programmed gateway/waypoint --timeout=1m

client_pod=$(pod_of app=client 2>/dev/null) || true
intruder_pod=$(pod_of app=intruder 2>/dev/null) || true
server_pod=$(pod_of app=server 2>/dev/null) || true
waypoint_pod=$(pod_of gateway.networking.k8s.io/gateway-name=waypoint 2>/dev/null) || true
if [[ -z $client_pod || -z $intruder_pod || -z $server_pod || -z $waypoint_pod ]]; then
    fail "the sample's pods exist (client, intruder, server, waypoint)" \
        "$(kubectl -n "$NS" get pods -o wide 2>&1)" \
        "run install.sh first (vagrant provision cp1 --provision-with ambit)"
    summary
fi
server_ip=$(pod_field "$server_pod" .status.podIP)
client_ip=$(pod_field "$client_pod" .status.podIP)
intruder_ip=$(pod_field "$intruder_pod" .status.podIP)
client_node=$(pod_field "$client_pod" .spec.nodeName)
server_node=$(pod_field "$server_pod" .spec.nodeName)
waypoint_node=$(pod_field "$waypoint_pod" .spec.nodeName)
app_pods=("$NS/$client_pod" "$NS/$intruder_pod" "$NS/$server_pod")
printf 'client %s (%s on %s), intruder %s (%s), server %s (%s on %s), waypoint %s (on %s)\n' \
    "$client_pod" "$client_ip" "$client_node" "$intruder_pod" "$intruder_ip" \
    "$server_pod" "$server_ip" "$server_node" "$waypoint_pod" "$waypoint_node"

# `ambit status` reads every node agent's pod list through the API server's pod proxy; it
# exits 0 only when it finds no problem.
status_rc=0
ambit status --json > "$WORK/ambit-status.json" 2>"$WORK/ambit-status.err" || status_rc=$?
if [[ $status_rc -eq 0 ]]; then
    pass "ambit status reports no problem"
else
    fail "ambit status reports no problem (exit $status_rc)" \
        "$(ambit status --pods 2>&1 | tail -n 40)" "$(cat "$WORK/ambit-status.err")"
fi
if [[ -s $WORK/ambit-status.json ]]; then
    tally "$("${HELPER[@]}" captured --ambit-status "$WORK/ambit-status.json" "${app_pods[@]}" || true)"
fi

# --- metrics before the requests (the checks count this run only) ------------------------------
scrape() {  # scrape SUFFIX: the waypoint's and the client's and server's nodes' metrics
    local suffix=$1 node agent
    pod_get "$NS" "$waypoint_pod" 15020 metrics > "$WORK/waypoint.$suffix.prom" || return 1
    for node in "$client_node" "$server_node"; do
        agent=$(agent_pod_on "$node")
        [[ -n $agent ]] || return 1
        pod_get ambit-system "$agent" 15022 metrics > "$WORK/node-$node.$suffix.prom" || return 1
    done
}
if ! scrape before 2>"$WORK/scrape.err"; then
    fail "metrics endpoints answer (waypoint :15020, node agents :15022)" "$(cat "$WORK/scrape.err")"
fi

# --- packet capture ----------------------------------------------------------------------------
section "packet capture on the nodes of the client, the server and the waypoint"
mapfile -t capture_nodes < <(printf '%s\n' "$client_node" "$server_node" "$waypoint_node" | sort -u)
for node in "${capture_nodes[@]}"; do
    # A pod left by an interrupted run would hold the old capture: start from scratch.
    kubectl -n default delete pod "ambit-smoke-capture-$node" --ignore-not-found \
        --timeout=60s >/dev/null 2>&1 || true
    if ! sed "s/__NODE__/$node/g" "$CAPTURE_TEMPLATE" | kubectl create -f - >/dev/null \
            2>"$WORK/capture-$node.err"; then
        fail "packet capture pod on $node is created" "$(cat "$WORK/capture-$node.err")"
    fi
done
capturing=1
for node in "${capture_nodes[@]}"; do
    pod=ambit-smoke-capture-$node
    ok=0
    for _ in $(seq 1 60); do
        if kubectl -n default logs "$pod" 2>/dev/null | grep -q 'listening on'; then
            ok=1
            break
        fi
        sleep 2
    done
    if [[ $ok == 1 ]]; then
        echo "capturing on $node"
    else
        fail "packet capture starts on $node" "$(kubectl -n default describe pod "$pod" 2>&1 | tail -n 15)" \
            "$(kubectl -n default logs "$pod" 2>&1 | tail -n 5)"
        capturing=0
    fi
done

# --- 2 and 3: requests -------------------------------------------------------------------------
# http FROM URL [CURL ARGS...]: sets HTTP_EXIT, HTTP_STATUS (empty without an answer), HTTP_OUT.
http() {
    local from=$1 url=$2
    shift 2
    HTTP_EXIT=0
    HTTP_OUT=$(kubectl -n "$NS" exec "deploy/$from" -c "$from" -- \
        curl -sS -i --max-time 10 -H "x-ambit-smoke: $MARKER" "$@" "$url" 2>&1) || HTTP_EXIT=$?
    HTTP_OUT=${HTTP_OUT//$'\r'/}
    HTTP_STATUS=$(awk 'NR == 1 && /^HTTP\// {print $2}' <<< "$HTTP_OUT")
}
# expect TITLE FROM WANT URL [CURL ARGS...]; WANT: an HTTP status, or "refused" (no answer).
expect() {
    local title=$1 from=$2 want=$3 url=$4
    shift 4
    http "$from" "$url" "$@"
    if [[ $want == refused && -z $HTTP_STATUS && $HTTP_EXIT -ne 0 ]]; then
        pass "$title (curl exit $HTTP_EXIT: $(grep -m1 '^curl:' <<< "$HTTP_OUT" || true))"
    elif [[ $want != refused && $HTTP_STATUS == "$want" ]]; then
        pass "$title"
    else
        fail "$title" "expected $want, got status '${HTTP_STATUS:-none}' (exit $HTTP_EXIT):" \
            "$(head -c 800 <<< "$HTTP_OUT")"
    fi
}

section "2. client -> server goes through the waypoint"
for i in $(seq 1 "$REQUESTS"); do
    http client "$SERVICE_URL/echo?msg=$MARKER"
    title="GET /echo from client ($i/$REQUESTS): 200, echoed, stamped by the waypoint"
    if [[ $HTTP_STATUS == 200 ]] && grep -qF "$MARKER" <<< "$HTTP_OUT" \
            && grep -qi '^x-ambit-waypoint: demo/waypoint$' <<< "$HTTP_OUT"; then
        pass "$title"
    else
        fail "$title" "status '${HTTP_STATUS:-none}' (exit $HTTP_EXIT):" "$(head -c 800 <<< "$HTTP_OUT")"
    fi
done
expect "POST /echo from client: 200 (POST itself is allowed)" client 200 \
    "$SERVICE_URL/echo" --data "msg=$MARKER"

section "3. policy"
expect "POST /admin from client: 403 (waypoint DENY policy)" client 403 \
    "$SERVICE_URL/admin" --data "marker=$MARKER"
expect "GET /admin from client: 200 (only POST is denied)" client 200 "$SERVICE_URL/admin"
expect "GET /shell from client: 403 (agnhost's remote control is denied)" client 403 \
    "$SERVICE_URL/shell?cmd=true"
expect "GET /echo from intruder: 403 (waypoint ALLOW names only client)" intruder 403 \
    "$SERVICE_URL/echo?msg=$MARKER"
expect "intruder -> server pod IP directly: refused (L4: only the waypoint may connect)" \
    intruder refused "http://$server_ip:8080/echo?msg=$MARKER"
expect "client -> server pod IP directly: refused (no way around the waypoint)" \
    client refused "http://$server_ip:8080/echo?msg=$MARKER"

# --- 4. the wire -------------------------------------------------------------------------------
section "4. mTLS on the wire"
pcaps=()
for node in "${capture_nodes[@]}"; do
    pod=ambit-smoke-capture-$node
    kubectl -n default exec "$pod" -- chroot /host touch "$CAPTURE_DIR/stop" >/dev/null 2>&1 || true
    for _ in $(seq 1 15); do
        kubectl -n default exec "$pod" -- chroot /host test -e "$CAPTURE_DIR/done" 2>/dev/null && break
        sleep 1
    done
    if kubectl -n default exec "$pod" -- chroot /host cat "$CAPTURE_DIR/capture.pcap" \
            > "$WORK/capture-$node.pcap" 2>"$WORK/capture-$node.err" && [[ -s $WORK/capture-$node.pcap ]]; then
        pcaps+=(--pcap "$WORK/capture-$node.pcap")
        echo "capture from $node: $(stat -c %s "$WORK/capture-$node.pcap") bytes"
    else
        fail "packet capture from $node" "$(cat "$WORK/capture-$node.err")"
    fi
    kubectl -n default exec "$pod" -- chroot /host rm -rf "$CAPTURE_DIR" >/dev/null 2>&1 || true
    kubectl -n default delete pod "$pod" --wait=false >/dev/null 2>&1 || true
done
if [[ $capturing == 1 && ${#pcaps[@]} -gt 0 ]]; then
    tally "$("${HELPER[@]}" wire "${pcaps[@]}" --marker "$MARKER" --app-ip "$server_ip" \
        --app-ip "$client_ip" --app-ip "$intruder_ip" || true)"
fi

# --- 5. metrics --------------------------------------------------------------------------------
section "5. mTLS and identities in the metrics (this run only)"
# The waypoint's metrics come from Envoy's access log stream: give them a moment.
metric() {  # metric FILE-STEM TITLE NAME AT-LEAST LABEL=VALUE...
    local stem=$1 title=$2 name=$3 at_least=$4 out=""
    shift 4
    local args=(--file "$WORK/$stem.after.prom" --before "$WORK/$stem.before.prom"
        --name "$name" --at-least "$at_least" --title "$title")
    local label
    for label in "$@"; do
        args+=(--label "$label")
    done
    for _ in $(seq 1 10); do
        scrape after 2>/dev/null || true
        if out=$("${HELPER[@]}" metric "${args[@]}"); then
            break
        fi
        sleep 2
    done
    tally "$out"
}
client_p=$(principal client)
metric waypoint "the waypoint served client's requests, identified by its certificate" \
    istio_requests_total "$REQUESTS" reporter=waypoint "source_principal=$client_p" response_code=200
metric waypoint "the waypoint's requests from client were mutual TLS" \
    istio_requests_total "$REQUESTS" "source_principal=$client_p" connection_security_policy=mutual_tls
metric waypoint "the waypoint answered client's POST /admin with 403" \
    istio_requests_total 1 "source_principal=$client_p" response_code=403
metric waypoint "the waypoint answered intruder with 403" \
    istio_requests_total 1 "source_principal=$(principal intruder)" response_code=403
metric "node-$client_node" "client's ztunnel ($client_node) opened mutual_tls connections as client" \
    istio_tcp_connections_opened_total 1 reporter=source "source_principal=$client_p" \
    connection_security_policy=mutual_tls
metric "node-$server_node" "server's ztunnel ($server_node) accepted mutual_tls connections from the waypoint" \
    istio_tcp_connections_opened_total 1 reporter=destination \
    "source_principal=$(principal waypoint)" destination_workload=server \
    connection_security_policy=mutual_tls
metric "node-$server_node" "server's ztunnel ($server_node) denied intruder's direct connection" \
    istio_tcp_connections_opened_total 1 "source_principal=$(principal intruder)" response_flags=DENY

summary
