#!/bin/sh
# Init container: issue this pod's node certificate from the cluster CA.
#
#   issue-cert.sh aggregator NAME   certificate for NAME (the StatefulSet pod name)
#   issue-cert.sh collector         certificate for a node id derived from $NODE_NAME
#
# Reads ca.pem and ca.key from the logmesh-ca Secret ($CA_DIR), writes ca.pem, <id>.pem,
# <id>.key and node-id into $TLS_DIR (an in-memory emptyDir shared with the main container)
# and removes the CA key from it again: the main container never sees the CA key.
# If the Secret has a bundle.pem (old + new CA during a CA rotation) it becomes the trusted
# ca.pem. Needs only sh, cp, rm, tr, sed, cut, cksum (all in debian:bookworm-slim).
set -eu

CA_DIR=${CA_DIR:-/etc/logmesh/ca}
TLS_DIR=${TLS_DIR:-/run/logmesh/tls}
LOGMESH=${LOGMESH:-/usr/local/bin/logmesh}
DAYS=${CERT_DAYS:-365}

role=${1:?usage: issue-cert.sh aggregator|collector [NAME]}
name=${2:-}

if [ -z "$name" ]; then
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
fi

umask 077
mkdir -p "$TLS_DIR"
cp "$CA_DIR/ca.pem" "$CA_DIR/ca.key" "$TLS_DIR/"
"$LOGMESH" certs issue --dir "$TLS_DIR" --name "$name" --role "$role" --days "$DAYS"
rm -f "$TLS_DIR/ca.key"
if [ -s "$CA_DIR/bundle.pem" ]; then
    cp "$CA_DIR/bundle.pem" "$TLS_DIR/ca.pem"
fi
printf '%s\n' "$name" > "$TLS_DIR/node-id"
echo "issued $role certificate for node id $name"
