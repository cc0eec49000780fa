#!/usr/bin/env bash
# Ambit's images (one per component) on every node, built once.
#
#   image.sh build   (cp1) hack/images.sh builds ${AMBIT_IMAGE_PREFIX}{ztunnel,agent,controller,
#                    waypoint}:$AMBIT_TAG from $AMBIT_SRC/Containerfile, podman saves them as
#                    one archive, imports it into containerd's k8s.io namespace (where the
#                    kubelet looks; the manifests use imagePullPolicy IfNotPresent), and serves
#                    the archive on the private network (python3 http.server, a systemd unit
#                    with DynamicUser) together with its HMAC-SHA256 under SHARE_KEY.
#   image.sh fetch   (workers) downloads the archive from cp1, checks the HMAC with the same
#                    key (the key reaches the machines only through the provisioner's
#                    environment, from the host, so a third machine on the network cannot slip
#                    in another image), and imports it.
#
# Why not a synced folder: synced folders are rsync, one way, host to machine.
# Environment (from the Vagrantfile): AMBIT_IMAGE_PREFIX, AMBIT_TAG, SHARE_PORT, SHARE_KEY;
# build: AMBIT_SRC, NODE_IP; fetch: CP_IP.
set -euo pipefail

mode=${1:-}
: "${AMBIT_IMAGE_PREFIX:?AMBIT_IMAGE_PREFIX is not set (the Vagrantfile sets it)}"
: "${AMBIT_TAG:?AMBIT_TAG is not set (the Vagrantfile sets it)}"
: "${SHARE_PORT:?SHARE_PORT is not set (the Vagrantfile sets it)}"
: "${SHARE_KEY:?SHARE_KEY is not set (the Vagrantfile sets it)}"

ARCHIVE=ambit-images.tar
IMAGES=()
for component in ztunnel agent controller waypoint; do
    IMAGES+=("$AMBIT_IMAGE_PREFIX$component:$AMBIT_TAG")
done
SHARE_DIR=/var/lib/ambit-vagrant/share
WORK_DIR=/var/lib/ambit-vagrant

log() { printf '[image %s] %s\n' "$mode" "$*"; }
die() { printf '[image %s] ERROR: %s\n' "$mode" "$*" >&2; exit 1; }

hmac_of() {
    openssl dgst -sha256 -hmac "$SHARE_KEY" -r "$1" | cut -d' ' -f1
}

# A docker-archive holding the four images with their full names (podman save -m), which ctr
# imports under those names.
import_archive() {
    local archive=$1 image
    log "importing into containerd (namespace k8s.io)"
    ctr -n k8s.io images import "$archive"
    for image in "${IMAGES[@]}"; do
        ctr -n k8s.io images ls -q | grep -qxF "$image" \
            || die "the archive imported, but containerd has no image named $image" \
                   "(ctr -n k8s.io images ls)"
    done
    log "containerd has ${IMAGES[*]}"
}

build() {
    : "${AMBIT_SRC:?AMBIT_SRC is not set (the Vagrantfile sets it)}"
    : "${NODE_IP:?NODE_IP is not set (the Vagrantfile sets it)}"
    [[ -f $AMBIT_SRC/Containerfile ]] || die "no $AMBIT_SRC/Containerfile: is the repository" \
        "synced? (vagrant rsync cp1)"
    export DEBIAN_FRONTEND=noninteractive
    log "installing podman, runc and debootstrap"
    apt-get update -q
    apt-get install -y -q podman runc debootstrap

    # hack/images.sh: the Debian base (pulled, or bootstrapped when it cannot be), host network
    # for the builds' RUN steps (no podman bridge next to the node's CNI), pinned packages.
    log "building ${IMAGES[*]} from $AMBIT_SRC/Containerfile (first time: several minutes)"
    IMAGE_PREFIX="$AMBIT_IMAGE_PREFIX" TAG="$AMBIT_TAG" "$AMBIT_SRC/hack/images.sh"

    install -d -m 0755 "$WORK_DIR" "$SHARE_DIR"
    local tmp="$SHARE_DIR/.$ARCHIVE.tmp"
    rm -f "$tmp"
    CONTAINERS_CONF="$AMBIT_SRC/containers/containers.conf" \
        podman save -m --format docker-archive -o "$tmp" "${IMAGES[@]}"
    chmod 0644 "$tmp"
    import_archive "$tmp"
    hmac_of "$tmp" > "$SHARE_DIR/.$ARCHIVE.hmac.tmp"
    chmod 0644 "$SHARE_DIR/.$ARCHIVE.hmac.tmp"
    mv "$tmp" "$SHARE_DIR/$ARCHIVE"
    mv "$SHARE_DIR/.$ARCHIVE.hmac.tmp" "$SHARE_DIR/$ARCHIVE.hmac"

    log "serving $SHARE_DIR on $NODE_IP:$SHARE_PORT for the workers"
    cat > /etc/systemd/system/ambit-image-share.service <<EOF
[Unit]
Description=Ambit images archive for the other Vagrant nodes (private network only)
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/python3 -m http.server ${SHARE_PORT} --bind ${NODE_IP} --directory ${SHARE_DIR}
DynamicUser=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes
Restart=on-failure

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable ambit-image-share.service
    systemctl restart ambit-image-share.service
    for _ in $(seq 1 20); do
        curl -fsS --max-time 5 -o /dev/null "http://$NODE_IP:$SHARE_PORT/$ARCHIVE.hmac" && break
        sleep 1
    done
    curl -fsS --max-time 5 -o /dev/null "http://$NODE_IP:$SHARE_PORT/$ARCHIVE.hmac" \
        || die "the image share does not answer (journalctl -u ambit-image-share)"
    log "done"
}

fetch() {
    : "${CP_IP:?CP_IP is not set (the Vagrantfile sets it)}"
    local url="http://$CP_IP:$SHARE_PORT" expected actual
    log "waiting for cp1's image share ($url)"
    for _ in $(seq 1 180); do
        curl -fsS --max-time 5 -o /dev/null "$url/$ARCHIVE.hmac" && break
        sleep 10
    done
    expected=$(curl -fsS --max-time 10 "$url/$ARCHIVE.hmac") \
        || die "cp1 serves no image after 30 minutes: did 'image.sh build' succeed on cp1?" \
               "(vagrant provision cp1 --provision-with image)"
    install -d -m 0700 "$WORK_DIR"
    log "downloading the image archive"
    curl -fsS --retry 5 -o "$WORK_DIR/$ARCHIVE" "$url/$ARCHIVE"
    actual=$(hmac_of "$WORK_DIR/$ARCHIVE")
    if [[ $actual != "$expected" ]]; then
        rm -f "$WORK_DIR/$ARCHIVE"
        die "the archive's HMAC does not match: not the image cp1 built with this cluster's" \
            "key (or it was cut short); run 'vagrant provision $(hostname) --provision-with image'"
    fi
    import_archive "$WORK_DIR/$ARCHIVE"
    rm -f "$WORK_DIR/$ARCHIVE"
    log "done"
}

case $mode in
    build) build ;;
    fetch) fetch ;;
    *) die "usage: image.sh build|fetch" ;;
esac
