"""Helpers for tests/test_auth.py: a small identity provider (JWKS, OIDC discovery, RFC 7662
introspection) whose answers a test can change, and demo tokens minted with the
`mint-token` example (filters/auth/examples/mint-token.rs) and the DEMO-ONLY keys in
envoy/demo-keys/.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from harness import ROOT

KEYS = ROOT / "envoy" / "demo-keys"
MINT = ROOT / "target" / "release" / "examples" / "mint-token"
ISSUER = "https://demo.tollgate.local"


def build_mint():
    """The minting tool is built by `make build` (never inside a test): say so when it is missing."""
    if not MINT.exists():
        raise RuntimeError(f"{MINT} is missing: run `make build` first")


def mint(kid="demo-es256", keys: Path | None = None, header: dict | None = None, claims: dict | None = None,
         **opts) -> str:
    """A signed token. opts: sub, scopes, iss, aud, ttl, nbf_in, iat_in, no_exp (True)."""
    opts.setdefault("sub", "alice")
    args = [str(MINT), "--kid", kid]
    if keys:
        args += ["--keys", str(keys)]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    if header:
        args += ["--header", json.dumps(header)]
    if claims:
        args += ["--claims", json.dumps(claims)]
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hs256(header: dict, claims: dict, secret: bytes) -> str:
    """An HS256 token made with Python's own HMAC (for attacks: any header we like)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


def demo_claims(**extra) -> dict:
    now = int(time.time())
    c = {"iss": ISSUER, "aud": "tollgate-demo", "sub": "alice", "iat": now, "exp": now + 600}
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


def public_jwks(*kids: str, files=("jwks.json",)) -> bytes:
    keys = []
    for f in files:
        for k in json.loads((KEYS / f).read_text())["keys"]:
            if not kids or k["kid"] in kids:
                keys.append({n: v for n, v in k.items() if n not in ("d", "p", "q")})
    return json.dumps({"keys": keys}).encode()


class Idp:
    """A threaded HTTP identity provider on a free loopback port.

    routes: path -> (status, content_type, body bytes); change them at any time.
    `/introspect` answers RFC 7662: tokens starting with `active-` are active (sub = the rest,
    scope `orders:read`, plan `pro`), others are inactive. `hits` counts requests per path.

    Holds order events without timing: a route set with `hold=True` (and `/introspect` while
    `introspect_hold` is set) answers only after `release()` (or when the Idp stops); `held(path)`
    says how many requests wait there now. There is no delay knob: a test that wants a slow
    answer holds it (a sleep would make the test depend on the machine's speed).
    """

    def __init__(self):
        self.routes: dict[str, tuple[int, str, bytes]] = {}
        self.hits: dict[str, int] = {}
        self.introspect_hold = False
        self.holding: set[str] = set()
        self.waiting: dict[str, int] = {}
        self.released = threading.Event()
        self.lock = threading.Lock()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, ctype, body):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                with idp.lock:
                    idp.hits[path] = idp.hits.get(path, 0) + 1
                    route = idp.routes.get(path)
                if route is None:
                    return self._send(404, "text/plain", b"no such path")
                status, ctype, body = route
                if path in idp.holding:
                    idp._wait(path)
                self._send(status, ctype, body)

            def do_POST(self):
                path = self.path.split("?")[0]
                length = int(self.headers.get("content-length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                with idp.lock:
                    idp.hits[path] = idp.hits.get(path, 0) + 1
                if path != "/introspect":
                    return self._send(404, "text/plain", b"no such path")
                if idp.introspect_hold:
                    idp._wait(path)
                token = (form.get("token") or [""])[0]
                if token.startswith("active-"):
                    answer = {"active": True, "sub": token[len("active-"):], "scope": "orders:read",
                              "plan": "pro", "client_id": "demo-client", "exp": int(time.time()) + 300}
                else:
                    answer = {"active": False}
                self._send(200, "application/json", json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # Envoy gives up on slow answers (that is what the tests check): no broken-pipe noise.
        self.server.handle_error = lambda request, client_address: None
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, path: str, body: bytes, status: int = 200, ctype: str = "application/json", hold: bool = False):
        with self.lock:
            self.routes[path] = (status, ctype, body)
            if hold:
                self.holding.add(path)
            else:
                self.holding.discard(path)

    def _wait(self, path: str):
        with self.lock:
            self.waiting[path] = self.waiting.get(path, 0) + 1
        try:
            self.released.wait(60)
        finally:
            with self.lock:
                self.waiting[path] -= 1

    def held(self, path: str) -> int:
        """Requests waiting at `path` now (a hold)."""
        with self.lock:
            return self.waiting.get(path, 0)

    def release(self):
        """Let every held request answer, and later ones pass (until `hold_again`)."""
        self.released.set()

    def hold_again(self):
        self.released.clear()

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits.get(path, 0)

    def stop(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()
