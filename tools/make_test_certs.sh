#!/bin/sh
# Make a throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate in DIR.
# Used by the TLS tests (tests/test_security.py); also handy to try mosquitto TLS by hand.
# NOT for production: real deployments should use their own CA and keep ca.key off the Pi.
# Usage: tools/make_test_certs.sh DIR [CLIENT_CN]
set -eu
dir=${1:?usage: make_test_certs.sh DIR [CLIENT_CN]}
client_cn=${2:-edgeface-test-client}
mkdir -p "$dir"
cd "$dir"
umask 077
days=2
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days "$days" \
    -subj "/CN=edgeface test CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > server.ext
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=127.0.0.1" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days "$days" \
    -extfile server.ext 2>/dev/null
printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > client.ext
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=$client_cn" 2>/dev/null
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days "$days" \
    -extfile client.ext 2>/dev/null
rm -f server.csr client.csr server.ext client.ext ca.srl
echo "$dir: ca.crt server.crt server.key client.crt client.key"
