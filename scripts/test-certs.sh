#!/bin/sh
# Throwaway TLS credentials for the tests (and for trying TLS by hand): a CA, and certificates it
# signs for "src", "dst" and, from a second CA, "stranger", each valid for 127.0.0.1 and localhost,
# for both ends of a connection (serverAuth and clientAuth). Writes DIR/{ca,src,dst,stranger}.pem,
# their .key files and other-ca.pem. Needs the openssl command.
set -eu
dir=${1:?usage: test-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
ca() { # NAME
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.pem" \
        -days 2 -subj "/CN=emu test $1" -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
leaf() { # NAME CA
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
        -subj "/CN=emu test $1" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -out "$1.pem" -days 2 \
        -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
ca ca
ca other-ca
leaf src ca
leaf dst ca
leaf stranger other-ca
