"""Tests for vouch_device_login, with a local issuer that behaves like Vouch.

Run with `python3 -m unittest` (standard library only; tests that need a
reference library skip themselves when it is missing), or `make test`.
`python3 test_vouch_device_login.py demo` runs the demo sign-in.
"""

import base64
import hashlib
import io
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import unittest
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import vouch_device_login as vdl

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "vouch_device_login.py")


# ============================================================================
# A pure-Python ES256 signer for the test issuer (FIPS 186-4, SEC 1 §4.1.3)
# ============================================================================

P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
P256_A = P256_P - 3
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
          0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)


def _ec_add(p1, p2):
    """Affine point addition on P-256; None is the point at infinity."""
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2) = p1, p2
    if x1 == x2 and (y1 + y2) % P256_P == 0:
        return None
    if p1 == p2:
        lam = (3 * x1 * x1 + P256_A) * pow(2 * y1, P256_P - 2, P256_P) % P256_P
    else:
        lam = (y2 - y1) * pow(x2 - x1, P256_P - 2, P256_P) % P256_P
    x3 = (lam * lam - x1 - x2) % P256_P
    return x3, (lam * (x1 - x3) - y1) % P256_P


def _ec_mul(k, point):
    result = None
    while k:
        if k & 1:
            result = _ec_add(result, point)
        point = _ec_add(point, point)
        k >>= 1
    return result


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class EcKey(object):
    """A P-256 signing key for the test issuer."""

    def __init__(self, kid):
        self.kid = kid
        self.d = secrets.randbelow(P256_N - 1) + 1
        self.public = _ec_mul(self.d, P256_G)

    def jwk(self):
        x, y = self.public
        return {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
                "x": b64url(x.to_bytes(32, "big")), "y": b64url(y.to_bytes(32, "big"))}

    def sign(self, message):
        z = int.from_bytes(hashlib.sha256(message).digest(), "big")
        while True:
            k = secrets.randbelow(P256_N - 1) + 1
            r = _ec_mul(k, P256_G)[0] % P256_N
            s = pow(k, P256_N - 2, P256_N) * (z + r * self.d) % P256_N
            if r and s:
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def make_jwt(key, claims, header=None):
    """A compact JWS signed with key (an EcKey); header entries override."""
    head = {"alg": "ES256", "typ": "at+jwt", "kid": key.kid}
    head.update(header or {})
    signing_input = (b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(claims).encode())).encode()
    return signing_input.decode() + "." + b64url(key.sign(signing_input))


def raw_jwt(header_bytes, payload_bytes, signature=b"\0" * 64):
    """A JWS-shaped token whose parts are given as raw bytes (for hostile cases)."""
    return ".".join(b64url(p) for p in (header_bytes, payload_bytes, signature))


# ============================================================================
# The local issuer: an http.server that behaves like Vouch (SPEC §1)
# ============================================================================

USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"


class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def get_request(self):
        conn, addr = HTTPServer.get_request(self)
        self.issuer.connections += 1
        return conn, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.issuer.handle(self, "GET")

    def do_POST(self):
        self.server.issuer.handle(self, "POST")

    def send(self, status, body, headers=None, content_type="application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class LocalIssuer(object):
    """A Vouch-like issuer on 127.0.0.1 for tests and the demo.

    Knobs: interval, expires_in, discovery ("both", "oidc", "oauth"), path
    (an issuer with a path), rate_limit (burst 8, then one request per 2 s),
    enforce_interval (slow_down for polls less than interval whole seconds
    apart), approve_after_polls / deny, hardware claims of the user, and
    overrides: path -> callable(handler, body) answering instead.
    """

    def __init__(self, interval=1, expires_in=600, discovery="both", path="", rate_limit=True,
                 enforce_interval=True, approve_after_polls=None, user=None, clients=("cli",),
                 refresh_tokens=False):
        self.interval = interval
        self.expires_in = expires_in
        self.discovery = discovery
        self.path = path
        self.rate_limit = rate_limit
        self.enforce_interval = enforce_interval
        self.approve_after_polls = approve_after_polls
        self.clients = set(clients)
        self.refresh_tokens = refresh_tokens
        self.user = {"sub": "user-1234", "email": "ada@example.com", "hardware_verified": True}
        self.user.update(user or {})
        self.keys = [EcKey("ec-1")]
        self.overrides = {}
        self.token_script = []
        self.requests = []
        self.connections = 0
        self.devices = {}
        self.issued = []
        self.refresh_issued = []
        self.revoked = []
        self._buckets = {}
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.issuer = self
        self.port = self.server.server_address[1]
        self.base = "http://127.0.0.1:%d" % self.port
        self.issuer = self.base + path
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- what tests and the demo drive ------------------------------------

    def approve(self, user_code=None):
        with self.lock:
            for device in self.devices.values():
                if user_code in (None, device["user_code"]) and device["status"] == "pending":
                    device["status"] = "approved"

    def deny(self):
        with self.lock:
            for device in self.devices.values():
                device["status"] = "denied"

    def expire(self):
        with self.lock:
            for device in self.devices.values():
                device["created"] -= 10 ** 6

    def rotate_key(self):
        self.keys = [EcKey("ec-%d" % (len(self.keys) + random.randrange(10 ** 6)))]

    def metadata(self):
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/oauth/authorize",
            "device_authorization_endpoint": self.issuer + "/oauth/device",
            "token_endpoint": self.issuer + "/oauth/token",
            "userinfo_endpoint": self.issuer + "/oauth/userinfo",
            "jwks_uri": self.issuer + "/oauth/jwks",
            "revocation_endpoint": self.issuer + "/oauth/revoke",
            "scopes_supported": ["openid", "email"],
            "grant_types_supported": [vdl.DEVICE_CODE_GRANT],
        }

    def access_token(self, client_id, scope, **extra):
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": self.user["sub"], "aud": client_id, "exp": now + 28800,
                  "iat": now, "nbf": now, "jti": secrets.token_hex(8), "client_id": client_id,
                  "scope": scope, "email": self.user["email"], "email_verified": True}
        if "hardware_verified" in self.user:
            claims["hardware_verified"] = self.user["hardware_verified"]
        if self.user.get("hardware_verified") is True:
            claims.update(amr=["hwk", "pin", "user"], acr="urn:nist:authentication:assurance-level:aal3",
                          auth_time=now - 5)
        if "hardware_aaguid" in self.user:
            claims["hardware_aaguid"] = self.user["hardware_aaguid"]
        claims.update(extra)
        return make_jwt(self.keys[0], claims)

    # -- request handling -------------------------------------------------

    def handle(self, handler, method):
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        route = urlsplit(handler.path).path
        with self.lock:
            self.requests.append({"method": method, "path": route, "headers": dict(handler.headers),
                                  "body": body})
        override = self.overrides.get(route)
        if override is not None:
            answer = override(handler, body)
            if answer is not None:
                handler.send(*answer)
            return
        if route in self._discovery_paths() and method == "GET":
            return handler.send(200, self.metadata())
        local = route[len(self.path):] if route.startswith(self.path + "/") else None
        if local == "/oauth/jwks" and method == "GET":
            return handler.send(200, {"keys": [k.jwk() for k in self.keys]})
        if local == "/oauth/userinfo" and method == "GET":
            return self._userinfo(handler)
        if method == "POST" and local in ("/oauth/device", "/oauth/token", "/oauth/revoke"):
            if handler.headers.get("Content-Type", "").split(";")[0].strip() != \
                    "application/x-www-form-urlencoded":
                return handler.send(415, {"error": "invalid_request",
                                          "error_description": "expected a form-encoded body"})
            form = dict(parse_qsl(body.decode(), keep_blank_values=True))
            if local != "/oauth/revoke" and not self._take_token(handler.client_address[0]):
                return handler.send(429, b"Too Many Requests", {"Retry-After": "2"}, "text/plain")
            return getattr(self, "_" + local.rsplit("/", 1)[1])(handler, form)
        handler.send(404, {"error": "not_found"})

    def _discovery_paths(self):
        paths = []
        if self.discovery in ("both", "oidc"):
            paths.append(self.path + "/.well-known/openid-configuration")
        if self.discovery in ("both", "oauth"):
            paths.append("/.well-known/oauth-authorization-server" + self.path)
        return paths

    def _take_token(self, address):
        if not self.rate_limit:
            return True
        now = time.monotonic()
        with self.lock:
            tokens, last = self._buckets.get(address, (8.0, now))
            tokens = min(8.0, tokens + (now - last) / 2.0)
            if tokens < 1:
                self._buckets[address] = (tokens, now)
                return False
            self._buckets[address] = (tokens - 1, now)
            return True

    def _device(self, handler, form):
        if form.get("client_id") not in self.clients:
            return handler.send(401, {"error": "invalid_client", "error_description": "unknown client"})
        device_code = b64url(secrets.token_bytes(32))
        user_code = "".join(random.choice(USER_CODE_ALPHABET) for _ in range(8))
        user_code = user_code[:4] + "-" + user_code[4:]
        with self.lock:
            self.devices[device_code] = {
                "user_code": user_code, "client_id": form["client_id"], "scope": form.get("scope", ""),
                "created": time.time(), "status": "pending", "last_poll": None, "polls": 0, "form": form}
        handler.send(200, {
            "device_code": device_code, "user_code": user_code,
            "verification_uri": self.issuer + "/device",
            "verification_uri_complete": self.issuer + "/device?user_code=" + user_code,
            "expires_in": self.expires_in, "interval": self.interval})

    def _token(self, handler, form):
        if form.get("grant_type") == "refresh_token" and self.refresh_tokens:
            return self._refresh(handler, form)
        if form.get("grant_type") != vdl.DEVICE_CODE_GRANT:
            return handler.send(400, {"error": "unsupported_grant_type"})
        if form.get("client_id") not in self.clients:
            return handler.send(401, {"error": "invalid_client", "error_description": "unknown client"})
        if self.token_script:
            return handler.send(*self.token_script.pop(0))
        now = time.time()
        with self.lock:
            device = self.devices.get(form.get("device_code"))
            if device is None or device["status"] == "used":
                answer = (400, {"error": "invalid_grant", "error_description": "unknown or used device code"})
            elif now > device["created"] + self.expires_in:
                answer = (400, {"error": "expired_token", "error_description": "the device code expired"})
            elif (self.enforce_interval and device["last_poll"] is not None
                  and int(now - device["last_poll"]) < self.interval):
                device["last_poll"] = now
                answer = (400, {"error": "slow_down", "error_description": "polling too fast"})
            else:
                device["last_poll"] = now
                device["polls"] += 1
                if self.approve_after_polls is not None and device["polls"] > self.approve_after_polls \
                        and device["status"] == "pending":
                    device["status"] = "approved"
                answer = self._token_answer(device)
        handler.send(*answer)

    def _token_answer(self, device):
        if device["status"] == "denied":
            return 400, {"error": "access_denied", "error_description": "the user denied the request"}
        if device["status"] != "approved":
            return 400, {"error": "authorization_pending", "error_description": "waiting for the user"}
        device["status"] = "used"
        return 200, self._tokens(device["client_id"], device["scope"])

    def _tokens(self, client_id, scope):
        token = self.access_token(client_id, scope)
        self.issued.append(token)
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": 28800, "email": self.user["email"]}
        if self.refresh_tokens:
            answer["refresh_token"] = "rt-" + secrets.token_hex(16)
            self.refresh_issued.append(answer["refresh_token"])
        return answer

    def _refresh(self, handler, form):
        with self.lock:
            known = form.get("refresh_token") in self.refresh_issued and form.get("client_id") in self.clients
            if known:
                self.refresh_issued.remove(form["refresh_token"])
        if not known:
            return handler.send(400, {"error": "invalid_grant", "error_description": "unknown refresh token"})
        handler.send(200, self._tokens(form["client_id"], "openid email"))

    def _revoke(self, handler, form):
        with self.lock:
            self.revoked.append(form)
        handler.send(200, b"", content_type="text/plain")

    def _userinfo(self, handler):
        auth = handler.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.issued:
            return handler.send(401, {"error": "invalid_token"}, {"WWW-Authenticate": "Bearer"})
        info = {k: v for k, v in self.user.items()}
        info["email_verified"] = True
        handler.send(200, info)


# ============================================================================
# Helpers for driving the real CLI
# ============================================================================

class FakeClock(object):
    """A monotonic clock that sleep() advances instantly, recording each sleep."""

    def __init__(self, start=1000.0):
        self.now = start
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)


_ENV_KEYS = ("VOUCH_ISSUER", "VOUCH_CLIENT_ID", "VOUCH_SCOPE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
             "http_proxy", "NO_PROXY", "no_proxy", "SSL_CERT_FILE", "VOUCH_CACHE", "NO_COLOR")


class Result(object):
    def __init__(self, code, stdout, stderr):
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def json(self):
        return json.loads(self.stdout)


@contextmanager
def clean_env(**extra):
    saved = {k: os.environ.pop(k) for k in _ENV_KEYS if k in os.environ}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key in list(extra) + list(_ENV_KEYS):
            os.environ.pop(key, None)
        os.environ.update(saved)


def run_main(argv, env=None, clock=None):
    """Run main(argv) in-process with stdout and stderr captured.

    The poller's clock and sleep are a FakeClock, so a test costs no waiting;
    HTTP goes for real to the local issuer.
    """
    clock = clock or FakeClock()
    out, err = io.StringIO(), io.StringIO()
    with clean_env(**(env or {})), \
            mock.patch.object(vdl, "_monotonic", clock), mock.patch.object(vdl, "_sleep", clock.sleep), \
            mock.patch.object(sys, "stdout", out), mock.patch.object(sys, "stderr", err):
        code = vdl.main(argv)
    return Result(code, out.getvalue(), err.getvalue())


def run_cli(args, env=None, timeout=60, stdin=subprocess.DEVNULL, input_bytes=None, argv0=None):
    """Run the script as a real subprocess."""
    environment = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
    environment.update(env or {})
    command = [sys.executable] + ([argv0] if argv0 else [SCRIPT]) + list(args)
    streams = {"stdin": stdin} if input_bytes is None else {"input": input_bytes}
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=environment, timeout=timeout, cwd=HERE, **streams)
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


class IssuerTest(unittest.TestCase):
    """Base class: a fresh local issuer per test."""

    issuer_options = {}

    def setUp(self):
        self.issuer = LocalIssuer(**self.issuer_options)
        self.issuer.__enter__()
        self.addCleanup(self.issuer.__exit__)

    def sign_in(self, *extra, **kwargs):
        """main() against the local issuer, approved before the first poll."""
        approve = kwargs.pop("approve", True)
        if approve:
            self.issuer.approve_after_polls = 0
        argv = ["--issuer", self.issuer.issuer, "--client-id", "cli"] + list(extra)
        return run_main(argv, **kwargs)

    def assertFailed(self, result, code, fragment=None):
        """A failure: the documented code, nothing on stdout, one clean error line."""
        self.assertEqual(result.code, code, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertNotIn("Traceback", result.stderr)
        errors = [line for line in result.stderr.splitlines() if ": error: " in line]
        self.assertEqual(len(errors), 1, result.stderr)
        if fragment is not None:
            self.assertIn(fragment, errors[0])
        return errors[0]


# ============================================================================
# Building blocks
# ============================================================================

class StrictDecodingTests(unittest.TestCase):
    def test_base64url_accepts_canonical_unpadded_text(self):
        self.assertEqual(vdl._b64url_decode("aGk"), b"hi")
        self.assertEqual(vdl._b64url_decode(""), b"")
        self.assertEqual(vdl._b64url_decode("-_8"), b"\xfb\xff")

    def test_base64url_rejects_padding_other_alphabets_and_loose_bits(self):
        for text in ("aGk=", "+/8", "a Gk", "aGl", "QR", "Q", "aGk\n", "é"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                vdl._b64url_decode(text)

    def test_json_rejects_duplicates_constants_bad_utf8_and_deep_nesting(self):
        self.assertEqual(vdl._loads_json(b'{"a": [1, 2.5, "x"]}'), {"a": [1, 2.5, "x"]})
        for data in (b'{"a": 1, "a": 2}', b'{"a": NaN}', b'[Infinity]', b'[-Infinity]', b'\xff{}',
                     b"[" * 100000 + b"]" * 100000, b"{", b""):
            with self.subTest(data=data[:20]), self.assertRaises(ValueError):
                vdl._loads_json(data)


class TerminalSafetyTests(unittest.TestCase):
    def test_escape_sequences_controls_and_bidi_overrides_never_survive(self):
        hostile = ("A\x1b[2J\x1b[31mB\x1b]8;;https://evil/\x07link\x1b]8;;\x07"
                   "\x1b]52;c;ZXZpbA==\x07C\rD\x9b1mE\u202eF\u2066G\x00H\x7fI\x1bPq#\x1b\\J")
        clean = vdl._sanitize(hostile)
        for bad in ("\x1b", "\r", "\x9b", "\u202e", "\u2066", "\x00", "\x7f", "]52", "]8"):
            self.assertNotIn(bad, clean)
        for kept in "ABCDEFGHIJ":
            self.assertIn(kept, clean)
        self.assertIn("link", clean)

    def test_long_strings_are_capped(self):
        self.assertEqual(len(vdl._sanitize("x" * 10000)), vdl._MAX_SHOWN)
        self.assertTrue(vdl._sanitize("x" * 10000).endswith("..."))


class UrlPolicyTests(unittest.TestCase):
    def test_loopback_hosts(self):
        for host in ("127.0.0.1", "127.9.8.7", "::1", "localhost", "LOCALHOST"):
            self.assertTrue(vdl._is_loopback_host(host), host)
        for host in ("128.0.0.1", "10.0.0.1", "example.com", "127.0.0.1.nip.io", "::2", "0.0.0.0", "127.1"):
            self.assertFalse(vdl._is_loopback_host(host), host)

    def test_plain_http_only_on_loopback_and_no_credentials(self):
        self.assertEqual(vdl._parse_url("https://id.example.com/a?b=1", "x"),
                         ("https", "id.example.com", 443, "/a?b=1"))
        self.assertEqual(vdl._parse_url("http://127.0.0.1:8080", "x"), ("http", "127.0.0.1", 8080, "/"))
        for url in ("http://id.example.com/", "ftp://x/", "https://user:pw@x/", "https:///path", "x",
                    "https://x:99999/", "https://x/a b", None):
            with self.subTest(url=url), self.assertRaises(vdl.ProtocolError):
                vdl._parse_url(url, "x")

    def test_proxy_selection_follows_no_proxy(self):
        env = {"HTTPS_PROXY": "http://user:p%40ss@proxy.corp:3128", "NO_PROXY": "internal.corp, .lan,other:8443"}
        host, port, headers = vdl._proxy_for("https", "us.vouch.sh", 443, env)
        self.assertEqual((host, port), ("proxy.corp", 3128))
        self.assertEqual(base64.b64decode(headers["Proxy-Authorization"].split()[1]), b"user:p@ss")
        self.assertIsNone(vdl._proxy_for("https", "a.internal.corp", 443, env))
        self.assertIsNone(vdl._proxy_for("https", "box.lan", 443, env))
        self.assertIsNone(vdl._proxy_for("https", "other", 8443, env))
        self.assertIsNotNone(vdl._proxy_for("https", "other", 443, env))
        self.assertIsNone(vdl._proxy_for("https", "127.0.0.1", 443, env))
        self.assertIsNone(vdl._proxy_for("https", "x.com", 443, {"https_proxy": "proxy:1", "no_proxy": "*"}))
        self.assertEqual(vdl._proxy_for("https", "x.com", 443, {"https_proxy": "proxy:1"})[:2], ("proxy", 1))
        with self.assertRaises(vdl.UsageError):
            vdl._proxy_for("https", "x.com", 443, {"HTTPS_PROXY": "socks5://proxy:1080"})

    def test_retry_after_seconds_dates_and_garbage(self):
        now = 1700000000
        self.assertEqual(vdl._retry_after("7", now), 7)
        self.assertEqual(vdl._retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now), 20)
        self.assertEqual(vdl._retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now), 0)
        for garbage in (None, "", "soon", "-5", "1e3", "99999999999999", "\x1b[2J"):
            self.assertIsNone(vdl._retry_after(garbage, now), garbage)

    def test_discovery_locations_and_issuer_equality(self):
        self.assertEqual(vdl._discovery_urls("https://id.example.com/tenant/"), [
            "https://id.example.com/tenant/.well-known/openid-configuration",
            "https://id.example.com/.well-known/oauth-authorization-server/tenant"])
        self.assertTrue(vdl._same_issuer("https://us.vouch.sh/", "https://us.vouch.sh"))
        self.assertTrue(vdl._same_issuer("https://us.vouch.sh", "https://us.vouch.sh/"))
        for other in ("https://us.vouch.sh//", "https://US.vouch.sh", "https://us.vouch.sh/x", "http://us.vouch.sh"):
            self.assertFalse(vdl._same_issuer("https://us.vouch.sh", other), other)


class DeviceAuthorizationParsingTests(unittest.TestCase):
    def parse(self, **fields):
        document = {"device_code": "d" * 43, "user_code": "BCDF-GHJK",
                    "verification_uri": "https://us.vouch.sh/device"}
        document.update(fields)
        for key in [k for k, v in document.items() if v is DROP]:
            del document[key]
        err = io.StringIO()
        device = vdl.parse_device_authorization(document, 50.0, vdl._Terminal(stream=err))
        return device, err.getvalue()

    def test_defaults_when_optional_fields_are_missing(self):
        device, _ = self.parse()
        self.assertEqual((device.interval, device.expires_in), (5, 600))
        self.assertIsNone(device.verification_uri_complete)

    def test_interval_is_raised_to_one_second_and_capped(self):
        for given, expected in ((0, 1), (0.2, 1), (-7, 1), (1, 1), (2.5, 2.5), (1e9, 60), ("7", 7)):
            with self.subTest(given=given):
                self.assertEqual(self.parse(interval=given)[0].interval, expected)
        self.assertIn("longer than 60", self.parse(interval=1e9)[1])

    def test_expires_in_bounds(self):
        self.assertEqual(self.parse(expires_in=10 ** 9)[0].expires_in, 1800)
        for bad in (0, -1, "abc", True, [5]):
            with self.subTest(bad=bad), self.assertRaises(vdl.ProtocolError):
                self.parse(expires_in=bad)

    def test_wrong_types_and_missing_fields_are_protocol_errors(self):
        for fields in ({"interval": "soon"}, {"interval": True}, {"interval": {}}, {"device_code": DROP},
                       {"device_code": 5}, {"user_code": ""}, {"user_code": "AB\x1b[2JCD"},
                       {"verification_uri": DROP}, {"verification_uri": "javascript:alert(1)"},
                       {"verification_uri": "https://x/\u202edevice"}, {"user_code": "x" * 100}):
            with self.subTest(fields=fields), self.assertRaises(vdl.ProtocolError):
                self.parse(**fields)

    def test_google_verification_url_alias_and_bad_complete_uri(self):
        device, _ = self.parse(verification_uri=DROP, verification_url="https://www.google.com/device")
        self.assertEqual(device.verification_uri, "https://www.google.com/device")
        device, warnings = self.parse(verification_uri_complete="data:text/html,hi")
        self.assertIsNone(device.verification_uri_complete)
        self.assertIn("ignoring verification_uri_complete", warnings)
        _, warnings = self.parse(verification_uri="http://phish.example/device")
        self.assertIn("not https", warnings)


DROP = object()


# ============================================================================
# The poller, branch by branch, with a fake clock against the local issuer
# ============================================================================

def oauth_error(code, description=None, status=400):
    body = {"error": code}
    if description:
        body["error_description"] = description
    return status, body


PENDING = oauth_error("authorization_pending")
SLOW_DOWN = oauth_error("slow_down")


class PollerTests(IssuerTest):
    issuer_options = {"rate_limit": False}

    def poll(self, script, interval=5, expires_in=600):
        """Poll against a scripted token endpoint; returns (outcome, clock, polls)."""
        self.issuer.token_script = list(script)
        clock = FakeClock()
        device = vdl.DeviceAuthorization("dc-" + "x" * 40, "BCDF-GHJK", self.issuer.issuer + "/device", None,
                                         float(expires_in), float(interval), clock())
        http = vdl._HttpClient(timeout=5)
        self.addCleanup(http.close)
        try:
            outcome = vdl.poll_for_token(http, self.issuer.issuer + "/oauth/token", "cli", device,
                                         clock=clock, sleep=clock.sleep, rng=random.Random(7))
        except (vdl.VouchError, vdl._DeviceCodeExpired) as exc:
            outcome = exc
        polls = [r for r in self.issuer.requests if r["path"].endswith("/oauth/token")]
        return outcome, clock, polls

    def test_first_poll_waits_one_interval_and_pending_keeps_going(self):
        outcome, clock, polls = self.poll([PENDING, PENDING, (200, {"access_token": "t", "token_type": "Bearer"})])
        self.assertEqual(outcome["access_token"], "t")
        self.assertEqual(clock.sleeps, [5, 5, 5])
        self.assertEqual(len(polls), 3)
        for poll in polls:
            form = dict(parse_qsl(poll["body"].decode()))
            self.assertEqual(form, {"grant_type": vdl.DEVICE_CODE_GRANT, "device_code": "dc-" + "x" * 40,
                                    "client_id": "cli"})

    def test_slow_down_adds_five_seconds_to_every_later_poll(self):
        outcome, clock, _ = self.poll([SLOW_DOWN, PENDING, SLOW_DOWN, PENDING, (200, {"access_token": "t",
                                                                                    "token_type": "Bearer"})])
        self.assertEqual(clock.sleeps, [5, 10, 10, 15, 15])

    def test_429_honours_retry_after_seconds_and_dates(self):
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
        script = [(429, b"busy", {"Retry-After": "12"}, "text/plain"),
                  (429, b"busy", {"Retry-After": date}, "text/plain"),
                  (429, b"busy", {"Retry-After": "garbage"}, "text/plain"),
                  (429, b"busy", {"Retry-After": "1"}, "text/plain"),
                  (200, {"access_token": "t", "token_type": "Bearer"})]
        outcome, clock, _ = self.poll(script)
        self.assertEqual(outcome["access_token"], "t")
        self.assertEqual(clock.sleeps[:2], [5, 12])
        self.assertTrue(28 <= clock.sleeps[2] <= 31, clock.sleeps)
        self.assertEqual(clock.sleeps[3:], [5, 5])

    def test_retry_after_is_capped_by_the_time_left(self):
        outcome, clock, polls = self.poll([(429, b"busy", {"Retry-After": "100000"}, "text/plain")],
                                          expires_in=60)
        self.assertIsInstance(outcome, vdl._DeviceCodeExpired)
        self.assertEqual(len(polls), 1)
        self.assertEqual(sum(clock.sleeps), 60)

    def test_server_errors_back_off_exponentially_and_keep_the_code(self):
        script = [(500, b"oops", {}, "text/plain"), (502, b"", {}, "text/plain"), (503, b"", {}, "text/plain"),
                  (504, b"", {}, "text/plain"), PENDING, (200, {"access_token": "t", "token_type": "Bearer"})]
        outcome, clock, polls = self.poll(script, interval=1)
        self.assertEqual(outcome["access_token"], "t")
        self.assertEqual(clock.sleeps[0], 1)
        backoffs = clock.sleeps[1:5]
        for failures, delay in enumerate(backoffs, start=1):
            self.assertTrue(2 ** failures / 2 <= delay <= 2 ** failures, backoffs)
        self.assertEqual(clock.sleeps[5], 1)
        self.assertEqual(len({p["body"] for p in polls}), 1)

    def test_connection_failures_back_off_like_server_errors(self):
        calls = []

        def reset(handler, body):
            calls.append(1)
            if len(calls) <= 2:
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return None
            return 200, {"access_token": "t", "token_type": "Bearer"}

        self.issuer.overrides["/oauth/token"] = reset
        outcome, clock, _ = self.poll([], interval=1)
        self.assertEqual(outcome["access_token"], "t")
        self.assertEqual(len(clock.sleeps), 3)
        self.assertTrue(1 <= clock.sleeps[1] <= 2 and 2 <= clock.sleeps[2] <= 4, clock.sleeps)

    def test_errors_until_the_deadline_report_the_network_failure(self):
        outcome, _, _ = self.poll([(503, b"", {}, "text/plain")] * 50, interval=5, expires_in=120)
        self.assertIsInstance(outcome, vdl.NetworkError)
        self.assertIn("503", str(outcome))

    def test_expired_token_and_the_deadline_end_the_code(self):
        outcome, _, polls = self.poll([PENDING, oauth_error("expired_token")])
        self.assertIsInstance(outcome, vdl._DeviceCodeExpired)
        self.assertEqual(len(polls), 2)
        outcome, clock, polls = self.poll([PENDING] * 20, interval=5, expires_in=12)
        self.assertIsInstance(outcome, vdl._DeviceCodeExpired)
        self.assertEqual(sum(clock.sleeps), 12)
        self.assertEqual(len(polls), 2 + 2)  # this run's two, after the previous run's two

    def test_denied_and_refused_answers(self):
        outcome, _, _ = self.poll([oauth_error("access_denied", "user said no")])
        self.assertIsInstance(outcome, vdl.AccessDeniedError)
        for script, fragment in (([oauth_error("invalid_grant", "used code")], "invalid_grant: used code"),
                                 ([oauth_error("invalid_client", "who?", 401)], "invalid_client: who?"),
                                 ([oauth_error("unauthorized_client", status=401)], "unauthorized_client"),
                                 ([oauth_error("made_up_error", "\x1b[31mred")], "made_up_error: red"),
                                 ([(400, b"<html>", {}, "text/html")], "not valid JSON"),
                                 ([(400, {"message": "no"})], "without an OAuth error"),
                                 ([(302, b"", {"Location": "https://evil.example/steal"}, "text/plain")],
                                  "redirect to https://evil.example/steal")):
            with self.subTest(fragment=fragment):
                outcome, _, _ = self.poll(script)
                self.assertIsInstance(outcome, vdl.ProtocolError)
                self.assertIn(fragment, str(outcome))
                self.assertNotIn("\x1b", str(outcome))


# ============================================================================
# The real CLI, main(argv), against the local issuer
# ============================================================================

class SignInTests(IssuerTest):
    def test_json_output_has_every_key_of_the_contract(self):
        result = self.sign_in()
        self.assertEqual(result.code, 0, result.stderr)
        out = result.json()
        for key in ("issuer", "client_id", "access_token", "token_type", "expires_in", "expires_at", "scope",
                    "email", "hardware_verified", "hardware_aaguid", "claims", "verified"):
            self.assertIn(key, out)
        self.assertEqual(out["issuer"], self.issuer.issuer)
        self.assertEqual(out["client_id"], "cli")
        self.assertEqual(out["access_token"], self.issuer.issued[0])
        self.assertEqual(out["token_type"], "Bearer")
        self.assertEqual(out["expires_in"], 28800)
        self.assertTrue(abs(out["expires_at"] - (time.time() + 28800)) < 60)
        self.assertEqual(out["scope"], "openid email")
        self.assertEqual(out["email"], "ada@example.com")
        self.assertIs(out["hardware_verified"], True)
        self.assertIsNone(out["hardware_aaguid"])
        self.assertEqual(out["claims"]["amr"], ["hwk", "pin", "user"])
        self.assertEqual(out["claims"]["acr"], "urn:nist:authentication:assurance-level:aal3")
        self.assertIs(out["verified"], False)
        for absent in ("id_token", "id_token_claims", "refresh_token", "userinfo"):
            self.assertNotIn(absent, out)
        self.assertEqual(result.stdout.count("\n"), 1)

    def test_prompt_goes_to_stderr(self):
        result = self.sign_in()
        device = next(iter(self.issuer.devices.values()))
        self.assertIn(self.issuer.issuer + "/device", result.stderr)
        self.assertIn(device["user_code"], result.stderr)
        self.assertIn("user_code=" + device["user_code"], result.stderr)
        self.assertIn("expires in 10 min 00 s", result.stderr)
        self.assertNotIn(device["user_code"], result.stdout)

    def test_environment_variables_configure_the_sign_in(self):
        self.issuer.approve_after_polls = 0
        result = run_main([], env={"VOUCH_ISSUER": self.issuer.issuer, "VOUCH_CLIENT_ID": "cli",
                                   "VOUCH_SCOPE": "openid"})
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(next(iter(self.issuer.devices.values()))["form"], {"client_id": "cli", "scope": "openid"})

    def test_flags_win_over_environment(self):
        self.issuer.approve_after_polls = 0
        result = run_main(["--issuer", self.issuer.issuer, "--client-id", "cli", "--scope", "email"],
                          env={"VOUCH_ISSUER": "https://elsewhere.invalid", "VOUCH_CLIENT_ID": "other",
                               "VOUCH_SCOPE": "openid"})
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(next(iter(self.issuer.devices.values()))["form"], {"client_id": "cli", "scope": "email"})

    def test_shell_and_token_formats(self):
        result = self.sign_in("--format", "token")
        self.assertEqual(result.stdout, self.issuer.issued[0] + "\n")
        result = self.sign_in("--format", "shell")
        lines = result.stdout.splitlines()
        self.assertEqual([line.split("=")[0] for line in lines], [
            "export VOUCH_ACCESS_TOKEN", "export VOUCH_TOKEN_TYPE", "export VOUCH_EXPIRES_AT",
            "export VOUCH_HARDWARE_VERIFIED", "export VOUCH_HARDWARE_AAGUID", "export VOUCH_EMAIL",
            "export VOUCH_SUBJECT"])
        self.assertIn("export VOUCH_HARDWARE_VERIFIED='true'", lines)
        self.assertIn("export VOUCH_HARDWARE_AAGUID=''", lines)
        self.assertIn("export VOUCH_SUBJECT='user-1234'", lines)

    def test_every_request_asks_for_json_and_the_device_code_goes_only_to_the_token_endpoint(self):
        result = self.sign_in()
        self.assertEqual(result.code, 0, result.stderr)
        device_code = next(iter(self.issuer.devices))
        for request in self.issuer.requests:
            self.assertEqual(request["headers"].get("Accept"), "application/json")
            if device_code.encode() in request["body"] or device_code in str(request["headers"]):
                self.assertEqual(request["path"], "/oauth/token")

    def test_one_connection_for_the_whole_sign_in(self):
        self.issuer.approve_after_polls = 3
        self.issuer.enforce_interval = False
        result = run_main(["--issuer", self.issuer.issuer, "--client-id", "cli"])
        self.assertEqual(result.code, 0, result.stderr)
        self.assertGreaterEqual(len(self.issuer.requests), 6)
        self.assertEqual(self.issuer.connections, 1)

    def test_missing_client_id_names_the_flag_and_the_variable(self):
        result = run_main(["--issuer", self.issuer.issuer])
        line = self.assertFailed(result, 2)
        self.assertIn("--client-id", line)
        self.assertIn("VOUCH_CLIENT_ID", line)
        self.assertEqual(self.issuer.requests, [])

    def test_usage_errors_exit_2_with_one_line(self):
        for argv in (["--bogus"], ["--format", "xml"], ["--timeout", "soon"], ["--client-id", "x", "--timeout", "0"],
                     ["--client-id", "x", "--issuer", "http://id.example.com"],
                     ["--client-id", "x", "--issuer", "not a url"],
                     ["--client-id", "x", "--max-restarts", "-1"], ["--client-id", "x", "--cacert", "/nonexistent"]):
            with self.subTest(argv=argv):
                self.assertFailed(run_main(argv), 2)

    def test_help_and_version(self):
        result = run_main(["--help"])
        self.assertEqual(result.code, 0)
        for text in ("--client-id", "VOUCH_CLIENT_ID", "examples:", "eval", "exit codes"):
            self.assertIn(text, result.stdout)
        result = run_main(["--version"])
        self.assertEqual((result.code, result.stdout), (0, "vouch_device_login %s\n" % vdl.__version__))

    def test_rfc8414_discovery_with_path_insertion(self):
        issuer = LocalIssuer(discovery="oauth", path="/tenant/acme")
        with issuer:
            issuer.approve_after_polls = 0
            result = run_main(["--issuer", issuer.issuer, "--client-id", "cli"])
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(result.json()["issuer"], issuer.base + "/tenant/acme")
        paths = [r["path"] for r in issuer.requests]
        self.assertEqual(paths[:2], ["/tenant/acme/.well-known/openid-configuration",
                                     "/.well-known/oauth-authorization-server/tenant/acme"])

    def test_issuer_trailing_slash_is_tolerated_but_a_mix_up_is_not(self):
        self.issuer.approve_after_polls = 0
        result = run_main(["--issuer", self.issuer.issuer + "/", "--client-id", "cli"])
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(result.json()["issuer"], self.issuer.issuer)
        self.issuer.overrides["/.well-known/openid-configuration"] = lambda h, b: (
            200, dict(self.issuer.metadata(), issuer="https://evil.example"))
        line = self.assertFailed(self.sign_in(), 6, "issuer mix-up")
        self.assertIn("https://evil.example", line)

    def test_missing_discovery_document(self):
        self.issuer.discovery = "none"
        self.assertFailed(self.sign_in(), 6, "no discovery document")

    def test_explicit_endpoints_skip_discovery(self):
        self.issuer.discovery = "none"
        result = self.sign_in("--device-authorization-endpoint", self.issuer.issuer + "/oauth/device",
                              "--token-endpoint", self.issuer.issuer + "/oauth/token")
        self.assertEqual(result.code, 0, result.stderr)
        self.assertNotIn(".well-known", str([r["path"] for r in self.issuer.requests]))

    def test_device_endpoint_falls_back_to_the_vouch_path(self):
        metadata = self.issuer.metadata()
        del metadata["device_authorization_endpoint"]
        self.issuer.overrides["/.well-known/openid-configuration"] = lambda h, b: (200, metadata)
        result = self.sign_in()
        self.assertEqual(result.code, 0, result.stderr)
        self.assertIn("/oauth/device", [r["path"] for r in self.issuer.requests])

    def test_redirects_are_not_followed(self):
        self.issuer.overrides["/.well-known/openid-configuration"] = lambda h, b: (
            301, b"", {"Location": "https://evil.example/.well-known/openid-configuration"}, "text/plain")
        self.assertFailed(self.sign_in(), 6, "redirect to https://evil.example/")
        self.assertEqual(len(self.issuer.requests), 1)

    def test_denied_exits_3(self):
        self.issuer.deny_all = True
        clock = FakeClock()
        original = clock.sleep

        def deny_then_sleep(seconds):
            self.issuer.deny()
            original(seconds)

        clock.sleep = deny_then_sleep
        self.assertFailed(self.sign_in(approve=False, clock=clock), 3, "denied")

    def test_expired_code_exits_4_and_restarts_fetch_new_codes(self):
        self.issuer.expires_in = 5
        self.issuer.enforce_interval = False
        self.issuer.overrides["/oauth/token"] = lambda h, b: oauth_error("expired_token")
        self.assertFailed(self.sign_in(approve=False), 4, "expired")
        self.assertEqual(len(self.issuer.devices), 1)
        result = self.sign_in("--max-restarts", "2", approve=False)
        self.assertFailed(result, 4, "after 2 restarts")
        self.assertEqual(len(self.issuer.devices), 1 + 3)
        self.assertEqual(result.stderr.count("To sign in, open"), 3)

    def test_a_restart_can_succeed(self):
        expired = []

        def first_code_expires(handler, body):
            if not expired:
                expired.append(True)
                return oauth_error("expired_token")
            del self.issuer.overrides["/oauth/token"]
            self.issuer.approve()
            return self.issuer._token(handler, dict(parse_qsl(body.decode())))

        self.issuer.overrides["/oauth/token"] = first_code_expires
        result = self.sign_in("--max-restarts", "1", approve=False)
        self.assertEqual(result.code, 0, result.stderr)
        self.assertIn("restart 1 of 1", result.stderr)

    def test_network_failure_exits_5(self):
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        result = run_main(["--issuer", "http://127.0.0.1:%d" % port, "--client-id", "cli"])
        self.assertFailed(result, 5, "127.0.0.1:%d" % port)

    def test_unknown_client_exits_6_quoting_the_server(self):
        result = run_main(["--issuer", self.issuer.issuer, "--client-id", "stranger"])
        self.assertFailed(result, 6, "invalid_client: unknown client")

    def test_interrupt_exits_130_with_one_line(self):
        clock = FakeClock()

        def interrupt(seconds):
            raise KeyboardInterrupt

        clock.sleep = interrupt
        result = self.sign_in(approve=False, clock=clock)
        self.assertEqual((result.code, result.stdout), (130, ""))
        self.assertTrue(result.stderr.endswith("vouch_device_login: interrupted\n"))
        self.assertNotIn("Traceback", result.stderr)

    def test_a_bug_exits_1_with_one_line_and_the_traceback_only_with_v(self):
        with mock.patch.object(vdl, "token_result", side_effect=RuntimeError("boom")):
            result = self.sign_in()
            self.assertFailed(result, 1, "internal error")
            result = self.sign_in("-v")
        self.assertEqual(result.code, 1)
        self.assertIn("Traceback", result.stderr)

    def test_opaque_access_token_has_null_claims(self):
        self.issuer.overrides["/oauth/token"] = lambda h, b: (200, {"access_token": "opaque-abc.def",
                                                                    "token_type": "Bearer"})
        out = self.sign_in().json()
        self.assertIsNone(out["claims"])
        self.assertIsNone(out["hardware_verified"])
        self.assertIsNone(out["expires_in"])
        self.assertIsNone(out["expires_at"])

    def test_other_providers_fields_pass_through(self):
        id_token = make_jwt(self.issuer.keys[0], {"iss": self.issuer.issuer, "aud": "cli", "sub": "s",
                                                  "exp": int(time.time()) + 60, "hardware_verified": True,
                                                  "hardware_aaguid": "CB69481E-8FF7-4039-93EC-0A2729A154A8"},
                            {"typ": "JWT"})
        self.issuer.overrides["/oauth/token"] = lambda h, b: (200, {
            "access_token": "opaque", "token_type": "Bearer", "expires_in": "3600", "scope": "openid",
            "id_token": id_token, "refresh_token": "refresh-secret"})
        out = self.sign_in().json()
        self.assertEqual(out["id_token"], id_token)
        self.assertEqual(out["id_token_claims"]["sub"], "s")
        self.assertEqual(out["refresh_token"], "refresh-secret")
        self.assertEqual(out["scope"], "openid")
        self.assertEqual(out["expires_in"], 3600)
        self.assertIs(out["hardware_verified"], True)
        self.assertEqual(out["hardware_aaguid"], "cb69481e-8ff7-4039-93ec-0a2729a154a8")

    def test_only_a_json_boolean_counts_as_hardware_verified(self):
        self.issuer.user["hardware_verified"] = "true"
        result = self.sign_in()
        self.assertEqual(result.code, 0, result.stderr)
        self.assertIsNone(result.json()["hardware_verified"])
        self.assertIn("not a boolean", result.stderr)


# ============================================================================
# Sessions and policy: cache, refresh, logout, userinfo, gates, RAR
# ============================================================================

class CacheTests(IssuerTest):
    issuer_options = {"rate_limit": False}

    def setUp(self):
        IssuerTest.setUp(self)
        self.home = os.path.realpath(__import__("tempfile").mkdtemp())
        self.addCleanup(shutil.rmtree, self.home, True)
        self.env = {"XDG_CACHE_HOME": os.path.join(self.home, "cache")}
        self.directory = os.path.join(self.home, "cache", "vouch-device-login")

    def cached_sign_in(self, *extra, **kwargs):
        return self.sign_in("--cache", *extra, env=dict(self.env, **kwargs.pop("env", {})), **kwargs)

    def cache_files(self):
        return sorted(os.listdir(self.directory))

    def test_second_run_reuses_the_token_without_any_network(self):
        first = self.cached_sign_in()
        self.assertEqual(first.code, 0, first.stderr)
        self.assertIs(first.json()["cached"], False)
        requests = len(self.issuer.requests)
        second = self.cached_sign_in()
        self.assertEqual(second.code, 0, second.stderr)
        self.assertIs(second.json()["cached"], True)
        self.assertEqual(second.json()["access_token"], first.json()["access_token"])
        self.assertEqual(len(self.issuer.requests), requests)
        self.assertIn("using the cached token", second.stderr)

    def test_files_are_private_and_written_atomically(self):
        self.cached_sign_in(env={"VOUCH_CACHE": "1"})
        self.assertEqual(os.stat(self.directory).st_mode & 0o777, 0o700)
        files = self.cache_files()
        self.assertEqual([f.rsplit(".", 1)[1] for f in files], ["json", "lock"])
        for name in files:
            self.assertEqual(os.stat(os.path.join(self.directory, name)).st_mode & 0o777, 0o600, name)

    def test_insecure_or_foreign_cache_files_are_refused(self):
        self.cached_sign_in()
        entry = os.path.join(self.directory, [f for f in self.cache_files() if f.endswith(".json")][0])
        os.chmod(entry, 0o644)
        line = self.assertFailed(self.cached_sign_in(), 2, "readable by group or others")
        self.assertIn("chmod 600 " + entry, line)
        os.chmod(entry, 0o600)
        os.chmod(self.directory, 0o755)
        self.assertFailed(self.cached_sign_in(), 2, "chmod 700 " + self.directory)
        os.chmod(self.directory, 0o700)
        if os.geteuid() == 0:
            os.chown(entry, 4242, -1)
            self.assertFailed(self.cached_sign_in(), 2, "owned by uid 4242")

    def test_min_ttl_decides_when_a_cached_token_is_too_old(self):
        self.cached_sign_in()
        result = self.cached_sign_in("--min-ttl", "30000")
        self.assertEqual(result.code, 0, result.stderr)
        self.assertIs(result.json()["cached"], False)
        self.assertEqual(len(self.issuer.devices), 2)

    def test_a_refresh_token_is_used_before_a_new_device_sign_in(self):
        self.issuer.refresh_tokens = True
        first = self.cached_sign_in().json()
        result = self.cached_sign_in("--min-ttl", "30000", approve=False)
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(len(self.issuer.devices), 1)
        out = result.json()
        self.assertNotEqual(out["access_token"], first["access_token"])
        self.assertNotEqual(out["refresh_token"], first["refresh_token"])
        refresh = [dict(parse_qsl(r["body"].decode())) for r in self.issuer.requests
                   if b"grant_type=refresh_token" in r["body"]]
        self.assertEqual(refresh, [{"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
                                    "client_id": "cli"}])

    def test_a_refused_refresh_token_falls_back_to_the_device_flow(self):
        self.issuer.refresh_tokens = True
        self.cached_sign_in()
        self.issuer.refresh_issued.clear()
        result = self.cached_sign_in("--min-ttl", "30000")
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(len(self.issuer.devices), 2)
        self.assertIn("refresh token was not accepted", result.stderr)

    def test_logout_revokes_and_removes_and_is_idempotent(self):
        self.issuer.refresh_tokens = True
        out = self.cached_sign_in().json()
        result = self.sign_in("--logout", env=self.env)
        self.assertEqual((result.code, result.stdout), (0, ""), result.stderr)
        self.assertEqual(self.issuer.revoked, [
            {"token": out["refresh_token"], "token_type_hint": "refresh_token", "client_id": "cli"},
            {"token": out["access_token"], "token_type_hint": "access_token", "client_id": "cli"}])
        self.assertEqual([f for f in self.cache_files() if f.endswith(".json")], [])
        result = self.sign_in("--logout", "--cache", env=self.env)
        self.assertEqual((result.code, result.stdout), (0, ""))
        self.assertIn("no cached sign-in", result.stderr)

    def test_two_processes_at_once_sign_in_only_once(self):
        self.issuer.approve_after_polls = 1
        args = ["--issuer", self.issuer.issuer, "--client-id", "cli", "--cache", "--format", "token"]
        environment = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
        environment.update(self.env)
        procs = [subprocess.Popen([sys.executable, SCRIPT] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, env=environment) for _ in range(2)]
        outputs = [p.communicate(timeout=60) for p in procs]
        self.assertEqual([p.returncode for p in procs], [0, 0], outputs)
        self.assertEqual(len(self.issuer.devices), 1)
        self.assertEqual(outputs[0][0], outputs[1][0])
        self.assertTrue(any(b"another vouch_device_login is signing in" in err for _, err in outputs), outputs)


class UserinfoAndPolicyTests(IssuerTest):
    def test_userinfo_is_added_and_feeds_the_hardware_claims(self):
        self.issuer.user["hardware_aaguid"] = "CB69481E-8FF7-4039-93EC-0A2729A154A8"
        self.issuer.overrides["/oauth/token"] = lambda h, b: (200, {"access_token": "opaque-123",
                                                                    "token_type": "Bearer"})
        self.issuer.issued.append("opaque-123")
        result = self.sign_in("--userinfo")
        self.assertEqual(result.code, 0, result.stderr)
        out = result.json()
        self.assertEqual(out["userinfo"]["email"], "ada@example.com")
        self.assertIsNone(out["claims"])
        self.assertIs(out["hardware_verified"], True)
        self.assertEqual(out["hardware_aaguid"], "cb69481e-8ff7-4039-93ec-0a2729a154a8")

    def test_userinfo_for_another_subject_is_refused(self):
        self.issuer.overrides["/oauth/userinfo"] = lambda h, b: (200, {"sub": "someone-else"})
        self.assertFailed(self.sign_in("--userinfo"), 6, "does not match")

    def test_require_hardware(self):
        self.assertEqual(self.sign_in("--require-hardware").code, 0)
        self.issuer.user["hardware_verified"] = False
        self.assertFailed(self.sign_in("--require-hardware"), 8, "hardware_verified is false, not true")
        del self.issuer.user["hardware_verified"]
        self.assertFailed(self.sign_in("--require-hardware"), 8, "hardware_verified is null")

    def test_require_aaguid_is_repeatable_and_case_insensitive(self):
        yubikey = "cb69481e-8ff7-4039-93ec-0a2729a154a8"
        other = "ee882879-721c-4913-9775-3dfcce97072a"
        self.issuer.user["hardware_aaguid"] = yubikey
        result = self.sign_in("--require-aaguid", other, "--require-aaguid", yubikey.upper())
        self.assertEqual(result.code, 0, result.stderr)
        line = self.assertFailed(self.sign_in("--require-aaguid", other), 8, "hardware_aaguid is \"%s\"" % yubikey)
        self.assertIn(other, line)
        self.assertFailed(self.sign_in("--require-aaguid", "not-a-uuid"), 2, "not a UUID")


class AuthorizationDetailsTests(IssuerTest):
    DETAILS = [{"type": "payment_initiation", "amount": "1.00"}, {"type": "account_information"}]

    def test_details_and_resources_are_sent_and_passed_through(self):
        self.issuer.overrides["/oauth/token"] = lambda h, b: (200, {
            "access_token": "opaque", "token_type": "Bearer", "authorization_details": self.DETAILS})
        result = self.sign_in("--authorization-details", json.dumps(self.DETAILS),
                              "--resource", "https://api.example.com/", "--resource", "urn:example:ledger")
        self.assertEqual(result.code, 0, result.stderr)
        device = [r for r in self.issuer.requests if r["path"] == "/oauth/device"][0]
        form = parse_qsl(device["body"].decode())
        self.assertEqual(json.loads(dict(form)["authorization_details"]), self.DETAILS)
        self.assertEqual([v for k, v in form if k == "resource"], ["https://api.example.com/", "urn:example:ledger"])
        self.assertEqual(result.json()["authorization_details"], self.DETAILS)

    def test_details_from_a_file(self):
        path = os.path.join(__import__("tempfile").mkdtemp(), "details.json")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "w") as handle:
            json.dump(self.DETAILS, handle)
        self.assertEqual(self.sign_in("--authorization-details", "@" + path).code, 0)
        self.assertFailed(self.sign_in("--authorization-details", "@" + path + ".missing"), 2, "cannot read")

    def test_bad_details_or_resources_fail_before_any_request(self):
        for value in ("{}", "[]", "[1]", '[{"type": 5}]', '[{"kind": "x"}]', "not json", '[{"type": "a", "type": "b"}]',
                      json.dumps([{"type": "x", "pad": "y" * 9000}])):
            with self.subTest(value=value[:30]):
                self.assertFailed(self.sign_in("--authorization-details", value), 2)
        for value in ("relative/path", "https://api.example.com/#frag", "https://a b/"):
            with self.subTest(value=value):
                self.assertFailed(self.sign_in("--resource", value), 2)
        self.assertEqual(self.issuer.requests, [])


# ============================================================================
# End to end: the script as a real process, with real waiting (interval 1 s)
# ============================================================================

class EndToEndTests(IssuerTest):
    def test_a_person_approves_after_a_few_polls(self):
        self.issuer.approve_after_polls = 1
        result = run_cli(["--issuer", self.issuer.issuer, "--client-id", "cli"])
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(result.json()["access_token"], self.issuer.issued[0])
        self.assertIn("To sign in, open", result.stderr)
        device = next(iter(self.issuer.devices.values()))
        self.assertEqual(device["polls"], 2)
        polls = [r for r in self.issuer.requests if r["path"] == "/oauth/token"]
        self.assertEqual(len(polls), 2)

    def test_piped_into_python_with_stdin_as_the_script(self):
        self.issuer.approve_after_polls = 0
        with open(SCRIPT, "rb") as handle:
            source = handle.read()
        result = run_cli(["--issuer", self.issuer.issuer, "--client-id", "cli", "--format", "token"],
                         input_bytes=source, argv0="-")
        self.assertEqual(result.code, 0, result.stderr)
        self.assertEqual(result.stdout, self.issuer.issued[0] + "\n")

    def test_runs_with_stdin_closed_altogether(self):
        self.issuer.approve_after_polls = 0
        code = ("import os, sys, runpy; os.close(0); sys.stdin = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
        proc = subprocess.run([sys.executable, "-c", code, SCRIPT, "--issuer", self.issuer.issuer,
                               "--client-id", "cli", "--format", "token"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.decode(), self.issuer.issued[0] + "\n")

    def test_shell_output_round_trips_through_eval(self):
        self.issuer.user.update(email="o'brien \"$(touch /tmp/pwned-vdl)\" `id` \\ $HOME\nline2 ü",
                                sub="x';touch /tmp/pwned-vdl;'")
        self.issuer.approve_after_polls = 0
        shells = [s for s in ("sh", "dash", "bash", "zsh") if shutil.which(s)]
        result = run_cli(["--issuer", self.issuer.issuer, "--client-id", "cli", "--format", "shell"])
        self.assertEqual(result.code, 0, result.stderr)
        for shell in shells:
            with self.subTest(shell=shell):
                proc = subprocess.run([shell, "-c", 'eval "$1"; printf %s "$VOUCH_EMAIL"; printf "\\0";'
                                       'printf %s "$VOUCH_SUBJECT"; printf "\\0"; printf %s "$VOUCH_ACCESS_TOKEN"',
                                       "sh", result.stdout], stdout=subprocess.PIPE, timeout=30)
                email, subject, token = proc.stdout.decode("utf-8").split("\0")
                self.assertEqual(email, self.issuer.user["email"])
                self.assertEqual(subject, self.issuer.user["sub"])
                self.assertEqual(token, self.issuer.issued[0])
                self.assertFalse(os.path.exists("/tmp/pwned-vdl"))


# ============================================================================
# make demo: the whole flow against the bundled issuer, approved by a "person"
# ============================================================================

def run_demo():
    """Start the local issuer, run the real CLI, approve after a few seconds."""
    with LocalIssuer(interval=1, user={"hardware_aaguid": "cb69481e-8ff7-4039-93ec-0a2729a154a8"}) as issuer:
        sys.stderr.write("[demo] local Vouch-like issuer at %s (client id \"cli\")\n" % issuer.issuer)
        sys.stderr.write("[demo] running: python3 vouch_device_login.py --issuer %s --client-id cli\n"
                         % issuer.issuer)

        def person():
            while not issuer.devices:
                time.sleep(0.05)
            time.sleep(3)
            sys.stderr.write("[demo] a person opens the link, enters the code and touches their YubiKey...\n")
            issuer.approve()

        threading.Thread(target=person, daemon=True).start()
        environment = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
        code = subprocess.call([sys.executable, SCRIPT, "--issuer", issuer.issuer, "--client-id", "cli"],
                               env=environment, stdin=subprocess.DEVNULL)
        sys.stderr.write("[demo] exit code %d; the JSON above is what went to stdout\n" % code)
        return code


if __name__ == "__main__":
    if sys.argv[1:] == ["demo"]:
        sys.exit(run_demo())
    unittest.main()
