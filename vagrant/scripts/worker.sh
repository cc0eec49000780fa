#!/usr/bin/env bash
# A worker: join the cluster with the bootstrap token the Vagrantfile made on the host.
#
# Discovery: the worker fetches the cluster-info ConfigMap from cp1, which kubeadm signs with
# this token (JWS), so a machine without the token cannot forge it. The CA hash pin is skipped
# (--discovery-token-unsafe-skip-ca-verification) because the hash exists only on cp1 and
# nothing is copied between machines (rsync synced folders are one-way); the token reaches the
# machines only through their provisioners' environment, from the host. On a shared or
# untrusted network, pin the hash instead (README.md, "Security").
#
# Environment (from the Vagrantfile): NODE_NAME, CP_IP, KUBEADM_TOKEN. Idempotent: a node that
# already joined is left as it is.
set -euo pipefail

: "${NODE_NAME:?NODE_NAME is not set (the Vagrantfile sets it)}"
: "${CP_IP:?CP_IP is not set (the Vagrantfile sets it)}"
: "${KUBEADM_TOKEN:?KUBEADM_TOKEN is not set (the Vagrantfile sets it)}"

log() { printf '[join %s] %s\n' "$NODE_NAME" "$*"; }
die() { printf '[join %s] ERROR: %s\n' "$NODE_NAME" "$*" >&2; exit 1; }

if [[ -f /etc/kubernetes/kubelet.conf ]]; then
    log "already joined; keeping it"
    exit 0
fi

log "waiting for the API server at $CP_IP:6443"
# Anonymous /readyz is allowed by kubeadm's default RBAC (system:public-info-viewer).
for _ in $(seq 1 120); do
    curl -ksf --max-time 5 "https://$CP_IP:6443/readyz" >/dev/null && break
    sleep 10
done
curl -ksf --max-time 5 "https://$CP_IP:6443/readyz" >/dev/null \
    || die "cp1's API server did not answer in 20 minutes; is cp1 up? (vagrant status;" \
           "vagrant ssh cp1 -c 'sudo journalctl -u kubelet')"

log "kubeadm join"
kubeadm join "$CP_IP:6443" \
    --node-name "$NODE_NAME" \
    --cri-socket unix:///run/containerd/containerd.sock \
    --token "$KUBEADM_TOKEN" \
    --discovery-token-unsafe-skip-ca-verification \
    || die "kubeadm join failed. If cp1 was set up more than 24 hours ago its token" \
           "expired: run 'vagrant provision cp1 --provision-with control-plane', then" \
           "'vagrant provision $NODE_NAME'."
log "done"
