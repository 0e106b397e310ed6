#!/bin/sh
# Credentials and TLS material for deploy/kubernetes, as the Secrets the manifests read:
#   splitllm-cloud-credential  credential.json (the cloud's), deployment.pub          the cloud's pod
#   splitllm-edge-credentials  splitllm-edge-<i>.json for each edge, deployment.pub   the edges' init container
#   splitllm-user-credentials  splitllm-user-<i>.json (data client i), deployment.pub the users' init container
#   splitllm-tls               tls.crt, tls.key, ca.crt                                every tier
#   Usage: [EDGES=2] [USERS=4] [TTL_DAYS=30] [PYTHON=python3] deploy/kubernetes/make-secrets.sh [NAMESPACE] [OUTDIR]
#          (default namespace splitllm, OUTDIR ./splitllm-secrets)
# Credentials are issued here, on the operator's machine (`splitllm credentials`), for the pods' own names (the
# StatefulSets' splitllm-edge-<i>, splitllm-user-<i>): each pod's init container copies only its own into the pod.
# The deployment key (OUTDIR/credentials/deployment.key), the admin's bearer credential (OUTDIR/credentials/
# admin.token) and the CA's key (OUTDIR/ca.key) stay in OUTDIR: none of them goes into the cluster. A second run
# with the same OUTDIR keeps its deployment key and issues every credential afresh.
# Makes a private CA and one server certificate for every tier, whose names cover the Services and the per-pod
# names the tiers call each other back on. Writes secrets.yaml into OUTDIR (mode 0700); `kubectl apply -f
# OUTDIR/secrets.yaml` creates the Secrets. Needs openssl, and Python with splitllm's dependencies (PYTHON).
set -eu
NS="${1:-splitllm}"
OUT="${2:-splitllm-secrets}"
EDGES="${EDGES:-2}"
USERS="${USERS:-4}"
TTL_DAYS="${TTL_DAYS:-30}"
PY="${PYTHON:-python3}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
umask 077
mkdir -p "$OUT/credentials"
chmod 0700 "$OUT"
cd "$OUT"

# credentials: a deployment key (kept if OUTDIR has one), one credential per pod, an admin's
splitllm() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m shared.lab.cli "$@"; }
issue() { splitllm credentials issue --dir credentials --ttl-days "$TTL_DAYS" "$@" >&2; }
[ -f credentials/deployment.key ] || splitllm credentials init --dir credentials >&2
issue --role cloud --id cloud --out credentials/cloud.json
for i in $(seq 0 $((EDGES - 1))); do
    issue --role edge --id "splitllm-edge-$i" --out "credentials/splitllm-edge-$i.json"
done
for i in $(seq 0 $((USERS - 1))); do
    issue --role user --id "splitllm-user-$i" --client "$i" --out "credentials/splitllm-user-$i.json"
done
splitllm credentials issue --dir credentials --ttl-days "$TTL_DAYS" --role admin --id admin > credentials/admin.token

# TLS
SANS="DNS:splitllm-cloud,DNS:splitllm-cloud.$NS.svc,DNS:splitllm-cloud.$NS.svc.cluster.local"
SANS="$SANS,DNS:splitllm-edge,DNS:splitllm-edge.$NS.svc,DNS:splitllm-edge.$NS.svc.cluster.local"
SANS="$SANS,DNS:*.splitllm-edges.$NS.svc.cluster.local,DNS:*.splitllm-users.$NS.svc.cluster.local"
openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=splitllm CA" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=splitllm" -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$SANS" > san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile san.ext -out tls.crt 2>/dev/null

b64() { base64 < "$1" | tr -d '\n'; }
secret() {  # secret NAME [TYPE]: a Secret's head; its data lines follow
    printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\ntype: %s\ndata:\n' \
        "$1" "$NS" "${2:-Opaque}"
}
{
    secret splitllm-cloud-credential
    echo "  credential.json: $(b64 credentials/cloud.json)"
    echo "  deployment.pub: $(b64 credentials/deployment.pub)"
    for tier in edge user; do
        secret "splitllm-$tier-credentials"
        count=$EDGES; [ "$tier" = user ] && count=$USERS
        for i in $(seq 0 $((count - 1))); do
            echo "  splitllm-$tier-$i.json: $(b64 "credentials/splitllm-$tier-$i.json")"
        done
        echo "  deployment.pub: $(b64 credentials/deployment.pub)"
    done
    secret splitllm-tls kubernetes.io/tls
    echo "  tls.crt: $(b64 tls.crt)"
    echo "  tls.key: $(b64 tls.key)"
    echo "  ca.crt: $(b64 ca.crt)"
} > secrets.yaml
echo "wrote $(pwd)/secrets.yaml; keep $(pwd)/credentials (deployment.key, admin.token: the admin's bearer) and ca.key" \
     "off the cluster" >&2
