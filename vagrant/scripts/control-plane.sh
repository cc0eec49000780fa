#!/usr/bin/env bash
# cp1: the control plane (kubeadm init) and the pod network (flannel).
#
#   kubeadm init advertises the API server on the private network and takes the bootstrap
#   token the Vagrantfile made on the host (so the workers can join with it without anything
#   being copied between machines: synced folders are one-way rsync); the admin kubeconfig
#   goes to the vagrant user too; flannel (pinned release) is applied with --iface set to the
#   private interface, so VXLAN runs between the private addresses and not over the NAT
#   interface every VirtualBox machine shares.
#
# Environment (from the Vagrantfile): NODE_NAME, NODE_IP, POD_CIDR, KUBEADM_TOKEN,
# FLANNEL_VERSION. Idempotent: an initialised control plane is kept, and the token is created
# again if it expired (24 h), so `vagrant provision cp1 --provision-with control-plane` lets a
# late worker join.
set -euo pipefail

: "${NODE_NAME:?NODE_NAME is not set (the Vagrantfile sets it)}"
: "${NODE_IP:?NODE_IP is not set (the Vagrantfile sets it)}"
: "${POD_CIDR:?POD_CIDR is not set (the Vagrantfile sets it)}"
: "${KUBEADM_TOKEN:?KUBEADM_TOKEN is not set (the Vagrantfile sets it)}"
: "${FLANNEL_VERSION:?FLANNEL_VERSION is not set (the Vagrantfile sets it)}"

log() { printf '[control-plane] %s\n' "$*"; }
die() { printf '[control-plane] ERROR: %s\n' "$*" >&2; exit 1; }

export KUBECONFIG=/etc/kubernetes/admin.conf

if [[ -f $KUBECONFIG ]]; then
    log "control plane already initialised; keeping it"
else
    log "kubeadm init (API server on $NODE_IP:6443, pods in $POD_CIDR)"
    kubeadm init \
        --node-name "$NODE_NAME" \
        --apiserver-advertise-address "$NODE_IP" \
        --pod-network-cidr "$POD_CIDR" \
        --cri-socket unix:///run/containerd/containerd.sock \
        --token "$KUBEADM_TOKEN" \
        --token-ttl 24h \
        --skip-token-print
fi

if ! kubeadm token list 2>/dev/null | awk 'NR > 1 {print $1}' | grep -qxF "$KUBEADM_TOKEN"; then
    log "bootstrap token expired or missing: creating it again (24 h)"
    kubeadm token create "$KUBEADM_TOKEN" --ttl 24h >/dev/null
fi

log "kubeconfig for the vagrant user"
install -d -o vagrant -g vagrant -m 0700 /home/vagrant/.kube
install -o vagrant -g vagrant -m 0600 "$KUBECONFIG" /home/vagrant/.kube/config

log "waiting for the API server"
for _ in $(seq 1 60); do
    kubectl get --raw /readyz >/dev/null 2>&1 && break
    sleep 5
done
kubectl get --raw /readyz >/dev/null || die "the API server is not ready after 5 minutes" \
    "(journalctl -u kubelet; crictl ps -a)"

iface=$(ip -o -4 addr show | awk -v ip="$NODE_IP" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}')
[[ -n $iface ]] || die "no interface has $NODE_IP"

log "flannel $FLANNEL_VERSION (--iface=$iface)"
manifest=$(mktemp)
trap 'rm -f "$manifest"' EXIT
curl -fsSL --retry 5 -o "$manifest" \
    "https://github.com/flannel-io/flannel/releases/download/${FLANNEL_VERSION}/kube-flannel.yml"
# The DaemonSet's flanneld args: add --iface after --kube-subnet-mgr (same indentation).
sed -i -E "s/^([[:space:]]*)- --kube-subnet-mgr\$/&\n\1- --iface=${iface}/" "$manifest"
grep -q -- "- --iface=${iface}\$" "$manifest" \
    || die "could not add --iface to flannel's manifest (did its args change in $FLANNEL_VERSION?)"
grep -q "\"Network\": \"${POD_CIDR}\"" "$manifest" \
    || die "flannel's net-conf.json does not use $POD_CIDR; kubeadm's --pod-network-cidr must match"
kubectl apply -f "$manifest"
kubectl -n kube-flannel rollout status daemonset/kube-flannel-ds --timeout=5m

log "waiting for $NODE_NAME to be Ready"
kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=5m
log "done"
