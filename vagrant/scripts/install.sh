#!/usr/bin/env bash
# cp1, once every node has joined: Ambit and the sample app.
#
#   1. wait until $AMBIT_EXPECTED_NODES nodes are Ready and report the agent's image (the four
#      images come in one archive: image.sh);
#   2. the ambit CLI in a venv (/opt/ambit-cli, an editable install of $AMBIT_SRC: after
#      `vagrant rsync cp1` the CLI runs the new code);
#   3. the upstream Gateway API standard CRDs (pinned release; waypoints are Gateways, and
#      `ambit install` adds the GatewayClass ambit-waypoint only when the Gateway API is served);
#   4. ambit install --image-prefix $AMBIT_IMAGE_PREFIX --tag $AMBIT_TAG, then wait for the
#      controller and the node DaemonSet;
#   5. the sample app (vagrant/sample: namespace demo, server behind the waypoint, client,
#      intruder, policies), then wait for it and for the waypoint the controller deploys.
#
# Environment (from the Vagrantfile, all with defaults): AMBIT_SRC, AMBIT_IMAGE_PREFIX, AMBIT_TAG,
# AMBIT_TRUST_DOMAIN, AMBIT_REDIRECT_MODE, AMBIT_EXPECTED_NODES, GATEWAY_API_VERSION.
# Idempotent: `ambit install` applies server-side, and so does kubectl here.
set -euo pipefail

AMBIT_SRC=${AMBIT_SRC:-/ambit}
AMBIT_IMAGE_PREFIX=${AMBIT_IMAGE_PREFIX:-localhost/ambit-}
AMBIT_TAG=${AMBIT_TAG:-0.1.0}
AGENT_IMAGE="${AMBIT_IMAGE_PREFIX}agent:$AMBIT_TAG"
AMBIT_TRUST_DOMAIN=${AMBIT_TRUST_DOMAIN:-cluster.local}
AMBIT_REDIRECT_MODE=${AMBIT_REDIRECT_MODE:-auto}
AMBIT_EXPECTED_NODES=${AMBIT_EXPECTED_NODES:-3}
GATEWAY_API_VERSION=${GATEWAY_API_VERSION:-v1.2.1}
VENV=/opt/ambit-cli
export KUBECONFIG=${KUBECONFIG:-/etc/kubernetes/admin.conf}

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

[[ -r $KUBECONFIG ]] || die "cannot read $KUBECONFIG: run this on cp1 as root"

ready_nodes() {
    kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
        | awk '$2 == "True" {print $1}'
}

log "waiting for $AMBIT_EXPECTED_NODES Ready nodes"
for _ in $(seq 1 120); do
    [[ $(ready_nodes | wc -l) -ge $AMBIT_EXPECTED_NODES ]] && break
    sleep 10
done
mapfile -t nodes < <(ready_nodes)
[[ ${#nodes[@]} -ge $AMBIT_EXPECTED_NODES ]] \
    || die "only ${#nodes[@]} of $AMBIT_EXPECTED_NODES nodes are Ready (kubectl get nodes -o wide)"
log "nodes: ${nodes[*]}"

# The kubelet lists a node's images in its status (refreshed every few seconds to a minute).
log "waiting for every node to report $AGENT_IMAGE"
for node in "${nodes[@]}"; do
    for _ in $(seq 1 30); do
        kubectl get node "$node" -o jsonpath='{.status.images[*].names}' | grep -qF "\"$AGENT_IMAGE\"" \
            && break
        sleep 10
    done
    kubectl get node "$node" -o jsonpath='{.status.images[*].names}' | grep -qF "\"$AGENT_IMAGE\"" \
        || log "warning: $node does not report $AGENT_IMAGE yet; its pods may fail with" \
               "ErrImagePull (fix: vagrant provision $node --provision-with image)"
done

log "ambit CLI in $VENV"
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/pip" install --quiet --disable-pip-version-check --editable "$AMBIT_SRC"
ln -sf "$VENV/bin/ambit" /usr/local/bin/ambit
ambit --version

log "Gateway API $GATEWAY_API_VERSION standard CRDs"
kubectl apply --server-side --force-conflicts -f \
    "https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml"
kubectl wait --for=condition=Established --timeout=2m \
    crd/gatewayclasses.gateway.networking.k8s.io crd/gateways.gateway.networking.k8s.io \
    crd/httproutes.gateway.networking.k8s.io

log "ambit install --image-prefix $AMBIT_IMAGE_PREFIX --tag $AMBIT_TAG"
# It waits until the controller and every node pod run (the agents compile their eBPF
# programs on first start: give slow machines time).
ambit install --manifests "$AMBIT_SRC/deploy/daemonset" --image-prefix "$AMBIT_IMAGE_PREFIX" \
    --tag "$AMBIT_TAG" \
    --trust-domain "$AMBIT_TRUST_DOMAIN" --redirect-mode "$AMBIT_REDIRECT_MODE" --timeout 900
kubectl -n ambit-system rollout status deployment/ambit-controller --timeout=10m
kubectl -n ambit-system rollout status daemonset/ambit-node --timeout=10m
kubectl get gatewayclass ambit-waypoint >/dev/null \
    || die "ambit install did not create the GatewayClass ambit-waypoint"

# Only now: pods created before Ambit's CNI entry was chained (flannel is a bridge CNI) would
# not be captured until they restart (docs/agent.md, "What is not done yet").
log "sample app (namespace demo)"
kubectl apply --server-side -f "$AMBIT_SRC/vagrant/sample/"
for deployment in server client intruder; do
    kubectl -n demo rollout status "deployment/$deployment" --timeout=5m
done
log "waiting for the controller to deploy the waypoint"
for _ in $(seq 1 60); do
    kubectl -n demo get deployment waypoint >/dev/null 2>&1 && break
    sleep 5
done
kubectl -n demo rollout status deployment/waypoint --timeout=5m \
    || die "the waypoint did not become ready (kubectl -n demo describe gateway waypoint;" \
           "kubectl -n ambit-system logs deploy/ambit-controller)"
kubectl -n demo wait --for=condition=Programmed gateway/waypoint --timeout=2m
kubectl -n demo get pods -o wide
log "done; next: smoke-test.sh"
