#!/bin/sh
# Init container: put this pod's node certificate into $TLS_DIR (an in-memory emptyDir shared
# with the main container). No pod ever gets the cluster CA key:
#
#   tls-init.sh aggregator NAME   copy NAME.pem and NAME.key (issued ahead by the cluster CA,
#                                 one per StatefulSet ordinal) and ca.pem from the
#                                 logmesh-aggregator-tls Secret ($AGG_DIR)
#   tls-init.sh collector         issue a certificate for a node id derived from $NODE_NAME
#                                 from the collector-only intermediate CA in the
#                                 logmesh-collector-ca Secret ($COLLECTOR_CA_DIR); the mesh
#                                 accepts what that CA signs for the collector role only
#
# Writes ca.pem, <id>.pem, <id>.key and node-id into $TLS_DIR; the main container mounts only
# that. If the Secret has a bundle.pem (old + new CA during a CA rotation) it becomes the
# trusted ca.pem. Needs only sh, cp, tr, sed, cut, cksum (all in debian:bookworm-slim).
set -eu

AGG_DIR=${AGG_DIR:-/etc/logmesh/aggregator-tls}
COLLECTOR_CA_DIR=${COLLECTOR_CA_DIR:-/etc/logmesh/collector-ca}
TLS_DIR=${TLS_DIR:-/run/logmesh/tls}
LOGMESH=${LOGMESH:-/usr/local/bin/logmesh}
DAYS=${CERT_DAYS:-365}

role=${1:?usage: tls-init.sh aggregator NAME | tls-init.sh collector}
name=${2:-}

umask 077
mkdir -p "$TLS_DIR"
case "$role" in
    aggregator)
        : "${name:?usage: tls-init.sh aggregator NAME}"
        for f in ca.pem "$name.pem" "$name.key"; do
            if [ ! -s "$AGG_DIR/$f" ]; then
                echo "tls-init: $AGG_DIR/$f is missing: issue it with" \
                    "'logmesh certs issue --dir <cluster CA dir> --name $name --role aggregator'" \
                    "and add it to the logmesh-aggregator-tls Secret (one certificate per" \
                    "StatefulSet ordinal up to the most replicas you run; see deploy/README.md)" >&2
                exit 1
            fi
        done
        cp "$AGG_DIR/ca.pem" "$AGG_DIR/$name.pem" "$AGG_DIR/$name.key" "$TLS_DIR/"
        src=$AGG_DIR
        ;;
    collector)
        # Node names are DNS subdomains (may hold dots, up to 253 chars); node ids must be one
        # DNS label: lower case, dots to dashes, and cut long names with a checksum suffix.
        : "${NODE_NAME:?NODE_NAME is not set (downward API spec.nodeName)}"
        name=$(printf '%s' "$NODE_NAME" | tr 'A-Z._' 'a-z--' | tr -c 'a-z0-9-' '-' | sed 's/^-*//; s/-*$//')
        if [ "${#name}" -gt 63 ]; then
            sum=$(printf '%s' "$NODE_NAME" | cksum | cut -d ' ' -f 1)
            name="$(printf '%s' "$name" | cut -c 1-54 | sed 's/-*$//')-$(printf '%08x' "$sum")"
        fi
        case "$name" in
            '') name=node ;;
            *[!0-9]*) ;;
            *) name="node-$name" ;;
        esac
        "$LOGMESH" certs issue --issuer "$COLLECTOR_CA_DIR" --out-dir "$TLS_DIR" \
            --name "$name" --role collector --days "$DAYS"
        src=$COLLECTOR_CA_DIR
        ;;
    *)
        echo "tls-init: unknown role $role (aggregator or collector)" >&2
        exit 2
        ;;
esac
if [ -s "$src/bundle.pem" ]; then
    cp "$src/bundle.pem" "$TLS_DIR/ca.pem"
fi
printf '%s\n' "$name" > "$TLS_DIR/node-id"
echo "$role certificate for node id $name is in $TLS_DIR"
