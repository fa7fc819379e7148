#!/usr/bin/env bash
# Make what deploy/docker-compose.yml mounts into every replica: a private CA, a server
# certificate for the replicas' names, and an API key file (hashes only); and Grafana's admin
# password (grafana-admin-password, mounted into the grafana service only). Prints the one
# API key it creates (tenant "demo"); keep it, it is not stored anywhere.
#
#   deploy/make-secrets.sh [DIR]        # default DIR: deploy/secrets (git-ignored)
#
# For production use your own CA / cert-manager and `agentd keys create` (README, Security).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/secrets}"
agentd="${AGENTD:-$(command -v agentd || echo "$here/../.venv/bin/agentd")}"
agentd="$(cd "$(dirname "$agentd")" && pwd)/$(basename "$agentd")"  # absolute: we cd below
mkdir -p "$dir"
cd "$dir"
umask 077

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
  -subj "/CN=agentd demo CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=agentd" \
  -keyout tls.key -out tls.csr 2>/dev/null
cat > tls.ext <<'EXT'
basicConstraints = CA:FALSE
keyUsage = digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, DNS:agentd, DNS:agentd-1, DNS:agentd-2, DNS:agentd-3
EXT
openssl x509 -req -in tls.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
  -extfile tls.ext -out tls.crt 2>/dev/null
rm -f tls.csr tls.ext ca.srl
# The replicas run as uid 10001: they must be able to read what they mount.
chmod 644 ca.pem tls.crt tls.key

rm -f keys.json
"$agentd" keys create --file keys.json --tenant demo --subject compose-demo
chmod 644 keys.json

# Grafana's admin password (GF_SECURITY_ADMIN_PASSWORD__FILE): random, no newline. Grafana runs
# as uid 472, so the file must be readable by it too. It applies when Grafana first creates its
# database (the grafana-data volume); afterwards change it in Grafana or `down -v` to start over.
openssl rand -base64 24 | tr -d '\n' > grafana-admin-password
chmod 644 grafana-admin-password
echo "wrote ca.pem, tls.crt, tls.key, keys.json and grafana-admin-password to $dir" >&2
