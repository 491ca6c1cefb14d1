#!/usr/bin/env python3
"""Generate the DEMO-ONLY signing keys (never use them for anything real).

    python3 envoy/demo-keys/generate.py      # needs the openssl command

Writes private.jwks.json (demo private keys, used by `make token` and the tests) and
jwks.json (the public keys, served by the demo services at /.well-known/jwks.json).
"""
import base64, json, re, subprocess, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def b64(n: bytes) -> str:
    return base64.urlsafe_b64encode(n).rstrip(b"=").decode()


def text(args, pem):
    return subprocess.run(["openssl"] + args + ["-text", "-noout"], input=pem, capture_output=True, check=True).stdout.decode()


def field(t, name, nxt):
    m = re.search(re.escape(name) + r":?\s*(?:\d+ \(0x[0-9a-f]+\))?\n?((?:\s+[0-9a-f:]+\n)+)", t)
    hexs = re.sub(r"[\s:]", "", m.group(1))
    return bytes.fromhex(hexs)


def gen(args):
    return subprocess.run(["openssl"] + args, capture_output=True, check=True).stdout


def ec_key(curve, size, kid, alg):
    pem = gen(["genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{curve}"])
    t = text(["pkey"], pem)
    priv = field(t, "priv", "pub").lstrip(b"\0").rjust(size, b"\0")
    pub = field(t, "pub", "ASN1")
    assert pub[0] == 4 and len(pub) == 1 + 2 * size
    x, y = pub[1:1 + size], pub[1 + size:]
    crv = {"P-256": "P-256", "P-384": "P-384"}[curve]
    public = {"kty": "EC", "crv": crv, "x": b64(x), "y": b64(y), "kid": kid, "alg": alg, "use": "sig"}
    return public, dict(public, d=b64(priv))


def rsa_key(kid, alg):
    pem = gen(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
    t = text(["pkey"], pem)
    get = lambda name: field(t, name, "").lstrip(b"\0")
    n, d = get("modulus"), get("privateExponent")
    p, q = get("prime1"), get("prime2")
    e = int(re.search(r"publicExponent: (\d+)", t).group(1)).to_bytes(3, "big").lstrip(b"\0")
    public = {"kty": "RSA", "n": b64(n), "e": b64(e), "kid": kid, "alg": alg, "use": "sig"}
    return public, dict(public, d=b64(d), p=b64(p), q=b64(q))


def ed_key(kid):
    pem = gen(["genpkey", "-algorithm", "ED25519"])
    t = text(["pkey"], pem)
    priv, pub = field(t, "priv", "pub"), field(t, "pub", "")
    public = {"kty": "OKP", "crv": "Ed25519", "x": b64(pub), "kid": kid, "alg": "EdDSA", "use": "sig"}
    return public, dict(public, d=b64(priv))


def main():
    pairs = [ec_key("P-256", 32, "demo-es256", "ES256"), rsa_key("demo-rs256", "RS256"),
             ec_key("P-384", 48, "demo-es384", "ES384"), ed_key("demo-eddsa"),
             rsa_key("demo-ps256", "PS256")]
    (HERE / "jwks.json").write_text(json.dumps({"keys": [p for p, _ in pairs]}, indent=1) + "\n")
    (HERE / "private.jwks.json").write_text(json.dumps({
        "WARNING": "DEMO ONLY: these private keys are public in the repository; never trust them",
        "keys": [k for _, k in pairs]}, indent=1) + "\n")
    # A second, unpublished key (for key-rotation tests): same kid scheme, not in jwks.json.
    rot_pub, rot_priv = ec_key("P-256", 32, "demo-es256-next", "ES256")
    (HERE / "rotation.jwks.json").write_text(json.dumps({
        "WARNING": "DEMO ONLY: a key the demo JWKS does not publish (key-rotation tests)",
        "keys": [rot_priv]}, indent=1) + "\n")
    print("wrote", ", ".join(["jwks.json", "private.jwks.json", "rotation.jwks.json"]))


if __name__ == "__main__":
    sys.exit(main())
