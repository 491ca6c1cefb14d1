#!/usr/bin/env python3
"""Makes the benchmark's signing keys, JWKS and long-lived tokens with the openssl CLI (no Python
crypto package needed). Output, committed: bench-keys.jwks.json, tokens.json, *.pem (benchmark-only
keys, never used anywhere else).

    python3 bench/scenarios/extra/make_keys.py
"""

import base64
import json
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ISSUER = "https://bench.tollgate.dev"
AUDIENCE = "bench"


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def run(*args, data: bytes | None = None) -> bytes:
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


def der_ecdsa_to_raw(der: bytes) -> bytes:
    # SEQUENCE { INTEGER r, INTEGER s }
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        v = der[i + 2:i + 2 + n].lstrip(b"\x00")
        out += v.rjust(32, b"\x00")
        i += 2 + n
    return out


def sign(alg: str, key: Path, signing_input: bytes) -> bytes:
    sig = run("openssl", "dgst", "-sha256", "-sign", str(key), data=signing_input)
    return der_ecdsa_to_raw(sig) if alg == "ES256" else sig


def token(alg: str, kid: str, key: Path, claims: dict) -> str:
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    si = f"{b64u(json.dumps(header, separators=(',', ':')).encode())}.{b64u(json.dumps(claims, separators=(',', ':')).encode())}"
    return f"{si}.{b64u(sign(alg, key, si.encode()))}"


def main():
    es = HERE / "es256.pem"
    rs = HERE / "rs256.pem"
    if not es.exists():
        es.write_bytes(run("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"))
    if not rs.exists():
        rs.write_bytes(run("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"))
    # EC public point: the last 65 bytes of the SubjectPublicKeyInfo DER are 04 || X || Y
    spki = run("openssl", "pkey", "-in", str(es), "-pubout", "-outform", "DER")
    point = spki[-65:]
    assert point[0] == 4
    modulus = run("openssl", "rsa", "-in", str(rs), "-noout", "-modulus").decode().strip().split("=", 1)[1]
    jwks = {"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "bench-es256", "alg": "ES256", "use": "sig",
         "x": b64u(point[1:33]), "y": b64u(point[33:65])},
        {"kty": "RSA", "kid": "bench-rs256", "alg": "RS256", "use": "sig",
         "n": b64u(bytes.fromhex(modulus)), "e": b64u((65537).to_bytes(3, "big"))},
    ]}
    (HERE / "bench-keys.jwks.json").write_text(json.dumps(jwks, indent=1) + "\n")
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench-user", "iat": 1763856000, "exp": 4102444800,
              "scope": "read"}
    tokens = {
        "ES256": token("ES256", "bench-es256", es, claims),
        "RS256": token("RS256", "bench-rs256", rs, claims),
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "api_key": "bench-api-key-0123456789abcdef",
    }
    (HERE / "tokens.json").write_text(json.dumps(tokens, indent=1) + "\n")
    # self-check with openssl: verify the RS256 token's signature
    with tempfile.TemporaryDirectory() as d:
        si, sig = tokens["RS256"].rsplit(".", 1)
        sigf = Path(d) / "sig"
        sigf.write_bytes(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
        pub = Path(d) / "pub.pem"
        pub.write_bytes(run("openssl", "pkey", "-in", str(rs), "-pubout"))
        run("openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(sigf), data=si.encode())
    print("wrote", HERE / "bench-keys.jwks.json", HERE / "tokens.json")


if __name__ == "__main__":
    main()
