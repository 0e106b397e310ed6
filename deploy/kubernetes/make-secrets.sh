#!/bin/sh
# Tokens and TLS material for deploy/kubernetes, as the two Secrets the manifests read:
#   splitllm-tokens (token, admin-token) and splitllm-tls (tls.crt, tls.key, ca.crt).
#   Usage: deploy/kubernetes/make-secrets.sh [NAMESPACE] [OUTDIR]      (default splitllm, ./splitllm-secrets)
# Makes a private CA and one server certificate for every tier, whose names cover the Services and the
# per-pod names the tiers call each other back on. Writes the files and secrets.yaml into OUTDIR
# (mode 0700); `kubectl apply -f OUTDIR/secrets.yaml` creates the Secrets. Needs openssl.
set -eu
NS="${1:-splitllm}"
OUT="${2:-splitllm-secrets}"
mkdir -p "$OUT"
chmod 0700 "$OUT"
cd "$OUT"
umask 077
SANS="DNS:splitllm-cloud,DNS:splitllm-cloud.$NS.svc,DNS:splitllm-cloud.$NS.svc.cluster.local"
SANS="$SANS,DNS:splitllm-edge,DNS:splitllm-edge.$NS.svc,DNS:splitllm-edge.$NS.svc.cluster.local"
SANS="$SANS,DNS:*.splitllm-edges.$NS.svc.cluster.local,DNS:*.splitllm-users.$NS.svc.cluster.local"
openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=splitllm CA" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=splitllm" -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$SANS" > san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile san.ext -out tls.crt 2>/dev/null
b64() { base64 < "$1" | tr -d '\n'; }
TOKEN=$(openssl rand -hex 24)
ADMIN=$(openssl rand -hex 24)
cat > secrets.yaml <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: splitllm-tokens
  namespace: $NS
type: Opaque
stringData:
  token: $TOKEN
  admin-token: $ADMIN
---
apiVersion: v1
kind: Secret
metadata:
  name: splitllm-tls
  namespace: $NS
type: kubernetes.io/tls
data:
  tls.crt: $(b64 tls.crt)
  tls.key: $(b64 tls.key)
  ca.crt: $(b64 ca.crt)
YAML
echo "wrote $(pwd)/secrets.yaml (and ca.key: keep it offline); the admin token is in it, under admin-token" >&2
