#!/usr/bin/env bash
# Every node: what kubeadm and Ambit need on a Debian 12 machine.
#
#   kernel modules overlay + br_netfilter (containerd, flannel's bridge) and the TPROXY/socket
#   matches of Ambit's iptables redirect mode; forwarding and bridge sysctls; swap off;
#   containerd from Debian with the systemd cgroup driver and kubeadm's pause image;
#   kubelet/kubeadm/kubectl and the CNI reference plugins from pkgs.k8s.io (one pinned minor
#   version, held); the kubelet's --node-ip set to the private-network address, so the nodes
#   talk over the private network and not over the NAT interface every VirtualBox machine
#   shares; tcpdump (the smoke test's packet capture), python3-venv (the ambit CLI on cp1),
#   and the kernel headers of the running kernel when Debian still has them (bcc for Ambit's
#   eBPF mode; without them the agent says why and `auto` uses iptables).
#
# Environment (from the Vagrantfile): NODE_NAME, NODE_IP, K8S_VERSION (v1.NN), CLUSTER_HOSTS
# ("ip name,ip name,..."). Idempotent: a second run changes nothing that is already right.
set -euo pipefail

: "${NODE_NAME:?NODE_NAME is not set (the Vagrantfile sets it)}"
: "${NODE_IP:?NODE_IP is not set (the Vagrantfile sets it)}"
: "${K8S_VERSION:?K8S_VERSION is not set (the Vagrantfile sets it)}"
CLUSTER_HOSTS=${CLUSTER_HOSTS:-}

log() { printf '[common %s] %s\n' "$NODE_NAME" "$*"; }
die() { printf '[common %s] ERROR: %s\n' "$NODE_NAME" "$*" >&2; exit 1; }

[[ $K8S_VERSION =~ ^v1\.[0-9]+$ ]] || die "K8S_VERSION=$K8S_VERSION: expected v1.NN"
export DEBIAN_FRONTEND=noninteractive

log "hostname and /etc/hosts"
hostnamectl set-hostname "$NODE_NAME"
# Vagrant maps the hostname to 127.0.1.1; the cluster's names go to their private addresses.
sed -i '/# ambit-vagrant$/d' /etc/hosts
IFS=',' read -r -a host_lines <<< "$CLUSTER_HOSTS"
for line in "${host_lines[@]}"; do
    [[ -n $line ]] && printf '%s # ambit-vagrant\n' "$line" >> /etc/hosts
done

log "private interface"
iface=$(ip -o -4 addr show | awk -v ip="$NODE_IP" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}')
[[ -n $iface ]] || die "no interface has $NODE_IP: is the private network up? ('ip -4 addr')"
log "$NODE_IP is on $iface"

log "kernel modules and sysctls"
cat > /etc/modules-load.d/ambit-vagrant.conf <<'EOF'
overlay
br_netfilter
xt_TPROXY
xt_socket
xt_mark
EOF
for module in overlay br_netfilter; do
    modprobe "$module"
done
# The iptables redirect mode's matches; the kernel also loads them on first use.
modprobe -a xt_TPROXY xt_socket xt_mark || log "could not load the TPROXY modules now"
cat > /etc/sysctl.d/90-ambit-vagrant.conf <<'EOF'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
EOF
sysctl --quiet --system

log "swap off"
swapoff -a
sed -i -E '/^[^#].*[[:space:]]swap[[:space:]]/ s/^/# disabled by ambit-vagrant: /' /etc/fstab

log "packages"
apt-get update -q
apt-get install -y -q --no-install-recommends \
    apt-transport-https ca-certificates curl gpg iptables iproute2 conntrack socat ebtables ethtool \
    containerd runc tcpdump python3 python3-venv openssl rsync
if apt-get install -y -q --no-install-recommends "linux-headers-$(uname -r)"; then
    log "kernel headers for $(uname -r) installed (eBPF mode possible)"
else
    log "no linux-headers-$(uname -r) in Debian's archive any more (the box's kernel is" \
        "older than the archive's); Ambit's redirect mode auto falls back to iptables and" \
        "says why. For eBPF: upgrade the kernel (apt-get install linux-image-amd64" \
        "linux-headers-amd64) and reboot."
fi

log "Kubernetes $K8S_VERSION packages from pkgs.k8s.io"
install -d -m 0755 /etc/apt/keyrings
keyring=/etc/apt/keyrings/kubernetes-apt-keyring.gpg
repo="https://pkgs.k8s.io/core:/stable:/${K8S_VERSION}/deb/"
curl -fsSL --retry 5 "${repo}Release.key" | gpg --batch --yes --dearmor -o "$keyring"
printf 'deb [signed-by=%s] %s /\n' "$keyring" "$repo" > /etc/apt/sources.list.d/kubernetes.list
apt-get update -q
apt-mark unhold kubelet kubeadm kubectl >/dev/null 2>&1 || true
# kubernetes-cni: the reference plugins (bridge, portmap, host-local, loopback) in
# /opt/cni/bin, which flannel's config chains.
apt-get install -y -q kubelet kubeadm kubectl kubernetes-cni
apt-mark hold kubelet kubeadm kubectl >/dev/null
installed=$(kubeadm version -o short)
[[ $installed == "$K8S_VERSION".* ]] || die "kubeadm is $installed, expected $K8S_VERSION.x"
for plugin in bridge portmap host-local loopback; do
    [[ -x /opt/cni/bin/$plugin ]] || die "no CNI plugin /opt/cni/bin/$plugin (package kubernetes-cni)"
done

log "containerd (systemd cgroups, CNI in /opt/cni/bin, kubeadm's pause image)"
pause=$(kubeadm config images list --kubernetes-version "$installed" 2>/dev/null | grep '/pause:' || true)
[[ -n $pause ]] || die "kubeadm did not name its pause image"
mkdir -p /etc/containerd
# Debian's own config.toml points the CNI at /usr/lib/cni; the defaults with a few edits are
# what kubeadm expects.
containerd config default > /etc/containerd/config.toml.new
sed -i -E \
    -e 's/^([[:space:]]*SystemdCgroup = ).*/\1true/' \
    -e "s#^([[:space:]]*sandbox_image = ).*#\\1\"${pause}\"#" \
    -e 's#^([[:space:]]*bin_dir = ).*#\1"/opt/cni/bin"#' \
    -e 's#^([[:space:]]*conf_dir = ).*#\1"/etc/cni/net.d"#' \
    /etc/containerd/config.toml.new
for expected in 'SystemdCgroup = true' "sandbox_image = \"${pause}\"" 'bin_dir = "/opt/cni/bin"'; do
    grep -qF "$expected" /etc/containerd/config.toml.new \
        || die "containerd config: could not set '$expected'"
done
if ! cmp -s /etc/containerd/config.toml.new /etc/containerd/config.toml; then
    mv /etc/containerd/config.toml.new /etc/containerd/config.toml
    systemctl restart containerd
else
    rm /etc/containerd/config.toml.new
fi
systemctl enable --now containerd
printf 'runtime-endpoint: unix:///run/containerd/containerd.sock\nimage-endpoint: unix:///run/containerd/containerd.sock\n' \
    > /etc/crictl.yaml

log "kubelet --node-ip=$NODE_IP"
printf 'KUBELET_EXTRA_ARGS=--node-ip=%s\n' "$NODE_IP" > /etc/default/kubelet
systemctl enable kubelet
if systemctl is-active --quiet kubelet; then
    systemctl restart kubelet
fi

log "done"
