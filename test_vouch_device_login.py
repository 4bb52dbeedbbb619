"""Tests for vouch_device_login, with a local issuer that behaves like Vouch.

Run with `python3 -m unittest` (standard library only; tests that need a
reference library skip themselves when it is missing), or `make test`.
`python3 test_vouch_device_login.py demo` runs the demo sign-in.
"""

import base64
import contextlib
import hashlib
import io
from fractions import Fraction
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


@contextlib.contextmanager
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
# QR code: structure, capacity, masks, rendering, segno and zxing-cpp
# ============================================================================

try:
    import segno
    import segno.encoder
except ImportError:
    segno = None

try:
    import numpy
    import zxingcpp
except ImportError:
    numpy = zxingcpp = None

# ISO/IEC 18004:2015 Table C.1: format information after the 0x5412 mask,
# keyed by level, indexed by mask.
PUBLISHED_FORMAT = {
    'L': ('111011111000100', '111001011110011', '111110110101010',
          '111100010011101', '110011000101111', '110001100011000',
          '110110001000001', '110100101110110'),
    'M': ('101010000010010', '101000100100101', '101111001111100',
          '101101101001011', '100010111111001', '100000011001110',
          '100111110010111', '100101010100000'),
    'Q': ('011010101011111', '011000001101000', '011111100110001',
          '011101000000110', '010010010110100', '010000110000011',
          '010111011011010', '010101111101101'),
    'H': ('001011010001001', '001001110111110', '001110011100111',
          '001100111010000', '000011101100010', '000001001010101',
          '000110100001100', '000100000111011'),
}

# ISO/IEC 18004:2015 Table D.1 (a few rows)
PUBLISHED_VERSION = {
    7: '000111110010010100',
    8: '001000010110111100',
    9: '001001101010011001',
    40: '101000110001101001',
}

FINDER = ('1111111', '1000001', '1011101', '1011101', '1011101', '1000001',
          '1111111')

URL_ALPHABET = ('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
                '0123456789-._~')


def make_urls(count, seed=18004, low=10, high=300):
    """Device-flow style URLs of random length in [low, high]."""
    rng = random.Random(seed)
    urls = []
    for _ in range(count):
        length = rng.randint(low, high)
        code = ''.join(rng.choice('BCDFGHJKLMNPQRSTVWXZ') for _ in range(8))
        url = f'https://us.vouch.sh/device?user_code={code[:4]}-{code[4:]}'
        while len(url) < length:
            url += rng.choice('/&=?#') + ''.join(
                rng.choice(URL_ALPHABET) for _ in range(rng.randint(1, 12)))
        urls.append(url[:length])
    return urls


def to_bits(matrix):
    return [''.join('1' if m else '0' for m in row) for row in matrix]


def bch_remainder(value, generator):
    """Remainder of value * x^deg(generator) / generator, by long division."""
    deg = generator.bit_length() - 1
    value <<= deg
    while value.bit_length() > deg:
        value ^= generator << (value.bit_length() - 1 - deg)
    return value


def gf_mul(a, b):
    """GF(256) product modulo 0x11D without tables."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return out


def reference_penalty(matrix):
    """ISO/IEC 18004:2015 Table 11 penalty, written for clarity not speed."""
    size = len(matrix)
    grid = [[1 if m else 0 for m in row] for row in matrix]
    lines = grid + [list(col) for col in zip(*grid)]
    score = 0
    for line in lines:
        run = 1
        for k in range(1, size + 1):
            if k < size and line[k] == line[k - 1]:
                run += 1
                continue
            if run >= 5:
                score += 3 + run - 5
            run = 1
    for r in range(size - 1):
        for c in range(size - 1):
            if grid[r][c] == grid[r][c + 1] == grid[r + 1][c] == \
                    grid[r + 1][c + 1]:
                score += 3
    core = [1, 0, 1, 1, 1, 0, 1]
    for line in lines:
        for k in range(size - 6):
            if line[k:k + 7] != core:
                continue
            before = not any(line[max(0, k - 4):k])
            after = not any(line[k + 7:k + 11])
            if before or after:
                score += 40
    dark = sum(map(sum, grid))
    deviation = abs(Fraction(100 * dark, size * size) - 50)
    score += 10 * int(deviation // 5)
    return score


def function_free_cells(size):
    """Cells left light while segno scores masks (format, version, dark)."""
    cells = [(8, c) for c in range(9) if c != 6]
    cells += [(r, 8) for r in range(9) if r != 6]
    cells += [(8, size - 1 - i) for i in range(8)]
    cells += [(size - 1 - i, 8) for i in range(8)]
    if size >= 45:
        for i in range(6):
            for j in range(size - 11, size - 8):
                cells += [(i, j), (j, i)]
    return cells


@contextlib.contextmanager
def segno_fixed_padding():
    """Patch segno's pad-bit bug (heuer/segno#123, #148).

    segno 1.6 adds eight zero bits instead of none when the bit stream
    already ends on a codeword boundary (ISO/IEC 18004:2015 §7.4.10), which
    in byte mode is every symbol whose terminator fits: an extra 0x00 data
    codeword shifts the pad codewords, so the matrices differ although
    both decode to the same text.
    """
    def fixed(buff, version, length):
        buff.extend([0] * (-length % 8))
    original = segno.encoder.write_padding_bits
    segno.encoder.write_padding_bits = fixed
    try:
        yield
    finally:
        segno.encoder.write_padding_bits = original


def parse_render(text, unicode, quiet, size, invert=False):
    """Turn rendered text back into a dark-module grid (quiet zone incl.)."""
    width = size + 2 * quiet
    height = size + 2 * quiet
    ink = []
    for line in text.split('\n')[:-1]:
        if unicode:
            line = line.ljust(width)
            ink.append([ch in '\u2580\u2588' for ch in line])
            ink.append([ch in '\u2584\u2588' for ch in line])
        else:
            line = line.ljust(2 * width)
            ink.append([line[2 * k:2 * k + 2] == '##' for k in range(width)])
    extra = ink[height:]
    assert all(not any(row) for row in extra), 'ink below the quiet zone'
    return [[x == invert for x in row] for row in ink[:height]], len(extra)


class TestStructure(unittest.TestCase):

    def test_version1_function_patterns(self):
        matrix, version, level, mask = vdl._qr_encode(b'HELLO', 'M', 0)
        self.assertEqual((version, level, mask), (1, 'M', 0))
        bits = to_bits(matrix)
        self.assertEqual(len(bits), 21)
        self.assertTrue(all(len(row) == 21 for row in bits))
        for top, left in ((0, 0), (0, 14), (14, 0)):
            got = [bits[top + r][left:left + 7] for r in range(7)]
            self.assertEqual(tuple(got), FINDER)
        # separators
        self.assertEqual(bits[7][:8], '0' * 8)
        self.assertEqual(bits[7][13:], '0' * 8)
        self.assertEqual(bits[13][:8], '0' * 8)
        self.assertEqual(''.join(bits[r][7] for r in range(8)), '0' * 8)
        self.assertEqual(''.join(bits[r][13] for r in range(8)), '0' * 8)
        self.assertEqual(''.join(bits[r][7] for r in range(13, 21)), '0' * 8)
        # timing patterns
        self.assertEqual(bits[6][8:13], '10101')
        self.assertEqual(''.join(bits[r][6] for r in range(8, 13)), '10101')
        # dark module at (4V + 9, 8)
        self.assertEqual(bits[13][8], '1')
        # both copies of the format information, most significant bit first
        first = [(8, c) for c in (0, 1, 2, 3, 4, 5, 7, 8)]
        first += [(r, 8) for r in (7, 5, 4, 3, 2, 1, 0)]
        second = [(r, 8) for r in range(20, 13, -1)]
        second += [(8, c) for c in range(13, 21)]
        for cells in (first, second):
            got = ''.join(bits[r][c] for r, c in cells)
            self.assertEqual(got, '101010000010010')

    def test_version7_version_information(self):
        matrix, version, _, _ = vdl._qr_encode(b'x' * 120, 'M', version=7)
        self.assertEqual(version, 7)
        bits = to_bits(matrix)
        size = len(bits)
        # ISO/IEC 18004:2015 §7.10: bit i at row i // 3, column
        # size - 11 + i % 3 (upper right) and transposed (lower left)
        upper = ''.join(bits[i // 3][size - 11 + i % 3]
                        for i in range(17, -1, -1))
        lower = ''.join(bits[size - 11 + i % 3][i // 3]
                        for i in range(17, -1, -1))
        self.assertEqual(upper, PUBLISHED_VERSION[7])
        self.assertEqual(lower, PUBLISHED_VERSION[7])

    def test_alignment_pattern_centres(self):
        # ISO/IEC 18004:2015 Table E.1 (a few rows)
        published = {1: [], 2: [6, 18], 7: [6, 22, 38],
                     22: [6, 26, 50, 74, 98],
                     32: [6, 34, 60, 86, 112, 138],
                     36: [6, 24, 50, 76, 102, 128, 154],
                     40: [6, 30, 58, 86, 114, 142, 170]}
        for version, centres in published.items():
            self.assertEqual(vdl._qr_alignment_positions(version), centres)

    def test_format_information_all_32(self):
        codes = []
        for level, indicator in (('L', 1), ('M', 0), ('Q', 3), ('H', 2)):
            for mask in range(8):
                data = indicator << 3 | mask
                expected = (data << 10 | bch_remainder(data, 0x537)) ^ 0x5412
                got = vdl._qr_format_bits(level, mask)
                self.assertEqual(got, expected)
                self.assertEqual(format(got, '015b'),
                                 PUBLISHED_FORMAT[level][mask])
                codes.append(got)
        # BCH(15,5) keeps every pair of codes at least 7 bits apart
        for i, a in enumerate(codes):
            for b in codes[i + 1:]:
                distance = bin(a ^ b).count('1')
                self.assertGreaterEqual(distance, 7)

    def test_version_information(self):
        for version in range(7, 41):
            expected = version << 12 | bch_remainder(version, 0x1F25)
            self.assertEqual(vdl._qr_version_bits(version), expected)
        for version, text in PUBLISHED_VERSION.items():
            self.assertEqual(format(vdl._qr_version_bits(version), '018b'),
                             text)

    def test_reed_solomon_known_vector(self):
        # ISO/IEC 18004:2015 Annex I: "01234567" as 1-M
        data = bytes([0x10, 0x20, 0x0C, 0x56, 0x61, 0x80, 0xEC, 0x11,
                      0xEC, 0x11, 0xEC, 0x11, 0xEC, 0x11, 0xEC, 0x11])
        expected = bytes([0xA5, 0x24, 0xD4, 0xC1, 0xED, 0x36, 0xC7, 0x87,
                          0x2C, 0x55])
        self.assertEqual(vdl._qr_rs(data, 10), expected)

    def test_reed_solomon_codeword_divisible_by_generator(self):
        rng = random.Random(7)
        for ec_len in (7, 10, 13, 17, 18, 22, 26, 28, 30):
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 60)))
            word = data + vdl._qr_rs(data, ec_len)
            alpha_i = 1
            for _ in range(ec_len):
                value = 0
                for coef in word:  # Horner, highest degree first
                    value = gf_mul(value, alpha_i) ^ coef
                self.assertEqual(value, 0)
                alpha_i = gf_mul(alpha_i, 2)

    def test_gf_tables_are_built_lazily(self):
        code = ('import sys; sys.path.insert(0, sys.argv[1]); import vouch_device_login as vdl; '
                'assert vdl._QR_GF_CACHE == []; '
                'vdl._qr_encode("x"); assert len(vdl._QR_GF_CACHE) == 1')
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.check_call([sys.executable, '-c', code, here])


class TestCapacity(unittest.TestCase):

    def test_version_boundaries(self):
        self.assertEqual(vdl._qr_encode(b'a' * 14, 'M')[1], 1)
        self.assertEqual(vdl._qr_encode(b'a' * 15, 'M')[1], 2)
        for level, most in (('L', 17), ('M', 14), ('Q', 11), ('H', 7)):
            self.assertEqual(vdl._qr_choose(most, level, None), (1, level))
            self.assertEqual(vdl._qr_choose(most + 1, level, None),
                             (2, level))
        for level, most in (('L', 2953), ('M', 2331), ('Q', 1663),
                            ('H', 1273)):
            self.assertEqual(vdl._qr_choose(most, level, None), (40, level))
            with self.assertRaises(ValueError):
                vdl._qr_choose(most + 1, level, None)

    def test_version40_encodes(self):
        matrix, version, level, _ = vdl._qr_encode(b'\xff' * 2331, 'M')
        self.assertEqual((version, level, len(matrix)), (40, 'M', 177))

    def test_too_long_is_a_clear_error(self):
        with self.assertRaises(ValueError) as ctx:
            vdl._qr_encode(b'a' * 2954)
        self.assertIn('2954 bytes', str(ctx.exception))
        with self.assertRaises(ValueError):
            vdl._qr_encode(b'a' * 2332, 'M')
        with self.assertRaises(ValueError):
            vdl._qr_encode(b'a' * 15, 'M', version=1)

    def test_level_policy(self):
        url = 'https://us.vouch.sh/device?user_code=BCDF-GHJK'
        self.assertEqual(vdl._qr_encode(url)[1:3], (4, 'M'))
        # M up to version 13 (77 columns with the quiet zone)
        self.assertEqual(vdl._qr_choose(331, None, None), (13, 'M'))
        self.assertEqual(vdl._qr_choose(332, None, None), (12, 'L'))
        self.assertEqual(vdl._qr_choose(332, 'M', None), (14, 'M'))
        self.assertEqual(vdl._qr_choose(2331, None, None), (36, 'L'))
        self.assertEqual(vdl._qr_choose(2953, None, None), (40, 'L'))
        # a forced version keeps M while M fits in it
        self.assertEqual(vdl._qr_choose(332, None, 14), (14, 'M'))
        self.assertEqual(vdl._qr_choose(363, None, 14), (14, 'L'))

    def test_invalid_overrides(self):
        for kwargs in ({'level': 'X'}, {'mask': 8}, {'mask': -1},
                       {'version': 0}, {'version': 41}):
            with self.assertRaises(ValueError):
                vdl._qr_encode(b'abc', **kwargs)

    def test_str_is_utf8(self):
        self.assertEqual(vdl._qr_encode('caf\xe9'),
                         vdl._qr_encode(b'caf\xc3\xa9'))
        self.assertEqual(vdl._qr_matrix('abc'), vdl._qr_encode(b'abc')[0])


class TestMasking(unittest.TestCase):

    def test_penalty_matches_reference(self):
        rng = random.Random(11)
        matrices = []
        for _ in range(30):
            size = rng.choice((21, 25, 29, 33))
            density = rng.random()
            matrices.append([[rng.random() < density for _ in range(size)]
                             for _ in range(size)])
        # chained 1:1:3:1:1 patterns sharing their light run
        row = [False] * 4 + [True, False, True, True, True, False, True]
        row = (row * 3 + [False] * 4)[:25]
        matrices.append([row[:] for _ in range(25)])
        for text in ('x', 'https://us.vouch.sh/device', 'y' * 100):
            for mask in range(8):
                matrices.append(vdl._qr_matrix(text, 'M', mask))
        for matrix in matrices:
            rows = [int(line, 2) for line in to_bits(matrix)]
            self.assertEqual(vdl._qr_penalty(rows, len(matrix)),
                             reference_penalty(matrix))

    def test_auto_mask_is_lowest_penalty(self):
        for text in make_urls(6, seed=3, high=120):
            _, version, level, mask = vdl._qr_encode(text)
            scores = [reference_penalty(vdl._qr_matrix(text, level, m, version))
                      for m in range(8)]
            self.assertEqual(mask, scores.index(min(scores)))


class TestRender(unittest.TestCase):

    def setUp(self):
        self.matrix = vdl._qr_matrix('https://us.vouch.sh/device?user_code=BCDF')
        self.size = len(self.matrix)

    def check_lines(self, text, charset):
        self.assertTrue(text.endswith('\n'))
        for line in text.split('\n')[:-1]:
            self.assertEqual(line, line.rstrip())
            self.assertLessEqual(set(line), set(charset))

    def test_unicode_round_trip(self):
        for invert in (False, True):
            for quiet in (4, 2, 6):
                text = vdl._qr_render(self.matrix, quiet=quiet, invert=invert)
                self.check_lines(text, ' \u2580\u2584\u2588')
                lines = text.split('\n')[:-1]
                self.assertEqual(len(lines), (self.size + 2 * quiet + 1) // 2)
                grid, _ = parse_render(text, True, quiet, self.size, invert)
                self.assertEqual(
                    [row[quiet:quiet + self.size]
                     for row in grid[quiet:quiet + self.size]], self.matrix)
                border = grid[:quiet] + grid[-quiet:]
                border += [row[:quiet] + row[-quiet:] for row in grid]
                self.assertFalse(any(map(any, border)))

    def test_ascii_round_trip(self):
        for invert in (False, True):
            text = vdl._qr_render(self.matrix, unicode=False, invert=invert)
            self.check_lines(text, ' #')
            lines = text.split('\n')[:-1]
            self.assertEqual(len(lines), self.size + 8)
            grid, extra = parse_render(text, False, 4, self.size, invert)
            self.assertEqual(extra, 0)
            self.assertEqual([row[4:-4] for row in grid[4:-4]], self.matrix)

    def test_default_inks_light_modules(self):
        text = vdl._qr_render(self.matrix)
        first = text.split('\n')[0]
        self.assertEqual(first, '\u2588' * (self.size + 8))
        inverted = vdl._qr_render(self.matrix, invert=True)
        self.assertEqual(inverted.split('\n')[0], '')

    def test_quiet_zone_clamped(self):
        for quiet in (0, 1, -3):
            self.assertEqual(vdl._qr_render(self.matrix, quiet=quiet),
                             vdl._qr_render(self.matrix, quiet=2))


@unittest.skipUnless(segno, 'segno is not installed')
class TestAgainstSegno(unittest.TestCase):

    def compare(self, urls, level):
        """Matrix, version and mask agreement with segno at one level.

        segno's QRCode.matrix is a tuple of bytearrays, one per row from the
        top, 0x1 for dark and 0x0 for light, without the quiet zone (segno
        adds the border only when serialising), so it maps onto our rows of
        bools directly.
        """
        disagree = []
        with segno_fixed_padding():
            for url in urls:
                ref = segno.make_qr(url, mode='byte', error=level,
                                    boost_error=False)
                ref_rows = [''.join(map(str, row)) for row in ref.matrix]
                ours, version, got_level, mask = vdl._qr_encode(url, level)
                self.assertEqual((version, got_level), (ref.version, level))
                if mask != ref.mask:
                    disagree.append((url, version, ref.mask))
                    ours = vdl._qr_matrix(url, level, ref.mask, ref.version)
                self.assertEqual(to_bits(ours), ref_rows, url)
        # checking a sample keeps the run within a few seconds
        for url, version, ref_mask in disagree[:12]:
            self.check_mask_disagreement(url, level, version, ref_mask)
        return disagree

    def check_mask_disagreement(self, url, level, version, ref_mask):
        """A different mask must come from scoring, not from the symbols.

        ISO/IEC 18004:2015 §7.8.3.1 scores the complete symbol, format and
        version information included.  segno scores its matrix before that
        information and the dark module are placed, and its N3 scan resumes
        7 modules after a counted pattern, missing a second one that shares
        the last dark module ("1011101011101" + light).  Fed our symbols
        with those cells left light, segno's own scorer must pick segno's
        mask, so our symbols for every mask equal segno's.
        """
        size = 17 + 4 * version
        blank = []
        for m in range(8):
            rows = [bytearray(row) for row in
                    vdl._qr_matrix(url, level, m, version)]
            for r, c in function_free_cells(size):
                rows[r][c] = 0
            blank.append(segno.encoder.evaluate_mask(rows, size, size))
        self.assertEqual(blank.index(min(blank)), ref_mask, url)

    def test_200_urls_level_m(self):
        urls = make_urls(200)
        disagree = self.compare(urls, 'M')
        self.assertLess(len(disagree), len(urls) // 2)

    def test_urls_level_l(self):
        self.compare(make_urls(25, seed=99), 'L')

    def test_every_version_at_capacity(self):
        # one level per version, all four at version 40
        cases = [(v, 'LMQH'[v % 4]) for v in range(1, 40)]
        cases += [(40, level) for level in 'LMQH']
        rng = random.Random(40)
        with segno_fixed_padding():
            for version, level in cases:
                count = (8 * vdl._qr_data_codewords(version, level) - 4
                         - (8 if version < 10 else 16)) // 8
                data = bytes(rng.randrange(256) for _ in range(count))
                mask = (version + ord(level)) % 8
                ref = segno.make_qr(data, mode='byte', error=level,
                                    version=version, mask=mask,
                                    boost_error=False)
                ref_rows = [''.join(map(str, row)) for row in ref.matrix]
                got = vdl._qr_matrix(data, level, mask, version)
                self.assertEqual(to_bits(got), ref_rows, (version, level))


def decode(grid, scale=4, invert_pixels=False, try_invert=False):
    """Decode a dark-module grid that already includes its quiet zone."""
    dark, light = (255, 0) if invert_pixels else (0, 255)
    img = numpy.array([[dark if m else light for m in row] for row in grid],
                      dtype=numpy.uint8)
    img = numpy.kron(img, numpy.ones((scale, scale), dtype=numpy.uint8))
    found = zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.QRCode,
                                   try_invert=try_invert)
    return found[0] if found else None


def with_quiet_zone(matrix, quiet=4):
    width = len(matrix) + 2 * quiet
    blank = [[False] * width for _ in range(quiet)]
    return blank + [[False] * quiet + list(row) + [False] * quiet
                    for row in matrix] + blank


@unittest.skipUnless(zxingcpp, 'zxing-cpp or numpy is not installed')
class TestDecode(unittest.TestCase):

    urls = tuple(url for length in (10, 47, 120, 300, 700, 2000)
                 for url in make_urls(1, seed=length, low=length, high=length))

    def test_decode_matrix(self):
        for url in self.urls:
            matrix, version, level, _ = vdl._qr_encode(url)
            found = decode(with_quiet_zone(matrix))
            self.assertIsNotNone(found, (len(url), version))
            self.assertEqual(found.text, url)
            self.assertEqual(found.ec_level, level)

    def test_decode_rendered_text(self):
        for url in self.urls[:4]:
            matrix = vdl._qr_matrix(url)
            size = len(matrix)
            for unicode in (True, False):
                # default rendering on a dark theme: ink is light
                text = vdl._qr_render(matrix, unicode=unicode)
                grid, _ = parse_render(text, unicode, 4, size)
                found = decode(grid)
                self.assertEqual(found and found.text, url)
                # the same text on a light theme reads as reversed
                found = decode(grid, invert_pixels=True, try_invert=True)
                self.assertEqual(found and found.text, url)
                # invert=True on a light theme: ink is dark
                text = vdl._qr_render(matrix, unicode=unicode, invert=True)
                grid, _ = parse_render(text, unicode, 4, size, invert=True)
                found = decode(grid)
                self.assertEqual(found and found.text, url)


if __name__ == '__main__':
    unittest.main()


# ============================================================================
# The prompt on a real terminal: QR block, countdown, OSC 52, browser
# ============================================================================

def run_in_pty(args, env=None, timeout=60):
    """Run the script with stderr on a pseudo-terminal; returns (code, stdout, terminal text)."""
    import pty
    import select
    master, slave = pty.openpty()
    environment = {k: v for k, v in os.environ.items()
                   if k not in _ENV_KEYS + ("DISPLAY", "WAYLAND_DISPLAY", "SSH_CONNECTION", "SSH_TTY",
                                            "SSH_CLIENT", "BROWSER")}
    environment.update(TERM="xterm-256color", PYTHONIOENCODING="utf-8")
    environment.update(env or {})
    proc = subprocess.Popen([sys.executable, SCRIPT] + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=environment)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.stdout.read()
    proc.stdout.close()
    proc.wait(timeout=10)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode("utf-8", "replace")


def modules_from_text(lines, unicode=True):
    """Turn rendered QR text (ink = light modules) back into a dark/light matrix."""
    rows = []
    for line in lines:
        if unicode:
            top = [ch in "\u2580\u2588" for ch in line]
            bottom = [ch in "\u2584\u2588" for ch in line]
            rows += [top, bottom]
        else:
            rows.append([line[i:i + 2] == "##" for i in range(0, len(line), 2)])
    width = max(len(r) for r in rows)
    return [[not ink for ink in r + [False] * (width - len(r))] for r in rows]


def decoded_text(grid):
    """What zxing-cpp reads in a dark-module grid, or None."""
    found = decode(grid, scale=4)
    return found.text if found else None


@unittest.skipUnless(sys.platform.startswith("linux"), "pseudo-terminal tests need Linux")
class TerminalPromptTests(IssuerTest):
    def setUp(self):
        IssuerTest.setUp(self)
        self.issuer.approve_after_polls = 1
        self.args = ["--issuer", self.issuer.issuer, "--client-id", "cli"]

    def test_live_prompt_with_qr_countdown_and_clipboard(self):
        code, stdout, screen = run_in_pty(self.args + ["--qr", "--copy", "--no-browser"])
        self.assertEqual(code, 0, screen)
        self.assertEqual(json.loads(stdout)["access_token"], self.issuer.issued[0])
        device = next(iter(self.issuer.devices.values()))
        self.assertIn("\x1b[1m%s\x1b[0m" % device["user_code"], screen)
        self.assertIn(" ".join(device["user_code"][:4]), screen)
        osc52 = "\x1b]52;c;%s\x07" % base64.b64encode(device["user_code"].encode()).decode()
        self.assertIn(osc52, screen)
        self.assertGreaterEqual(screen.count("\r\x1b[KWaiting for approval... "), 2)
        self.assertIn("min", screen.split("Waiting for approval... ")[1][:12])
        self.assertTrue(screen.rstrip("\r\n").endswith("\r\x1b[K") or "\r\x1b[K" in screen[-200:])
        qr_lines = [line[len("\x1b[97;40m"):line.index("\x1b[0m")] for line in screen.replace("\r", "").split("\n")
                    if line.startswith("\x1b[97;40m")]
        self.assertGreater(len(qr_lines), 10)
        self.assertTrue(all("\u2588" in line or "\u2580" in line for line in qr_lines))
        if zxingcpp is not None:
            self.assertEqual(decoded_text(modules_from_text(qr_lines)), self.issuer.issuer +
                             "/device?user_code=" + device["user_code"])

    def test_no_color_keeps_the_prompt_plain(self):
        code, _, screen = run_in_pty(self.args + ["--qr", "--no-browser"], env={"NO_COLOR": "1"})
        self.assertEqual(code, 0, screen)
        self.assertNotIn("\x1b[1m", screen)
        self.assertNotIn("\x1b[97;40m", screen)
        self.assertIn("\u2588", screen)

    def test_browser_opens_only_where_a_person_can_see_it(self):
        folder = __import__("tempfile").mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        opened = os.path.join(folder, "opened")
        recorder = os.path.join(folder, "browser")
        with open(recorder, "w") as handle:
            handle.write("#!/bin/sh\nprintf '%%s\\n' \"$1\" >> %s\n" % opened)
        os.chmod(recorder, 0o755)
        browser = {"BROWSER": recorder + " %s"}
        cases = [({"DISPLAY": ":99"}, [], True),
                 ({"DISPLAY": ":99", "SSH_CONNECTION": "10.0.0.1 5000 10.0.0.2 22"}, [], False),
                 ({"DISPLAY": ":99", "SSH_TTY": "/dev/pts/3"}, [], False),
                 ({}, [], False),
                 ({"DISPLAY": ":99"}, ["--no-browser"], False),
                 ({"SSH_TTY": "/dev/pts/3"}, ["--browser"], True)]
        for env, flags, expected in cases:
            with self.subTest(env=env, flags=flags):
                if os.path.exists(opened):
                    os.unlink(opened)
                self.issuer.approve_after_polls = 0
                code, _, screen = run_in_pty(self.args + flags, env=dict(browser, **env))
                self.assertEqual(code, 0, screen)
                if expected:
                    with open(opened) as handle:
                        self.assertEqual(handle.read().split(), [self.issuer.issuer + "/device?user_code="
                                                                 + list(self.issuer.devices.values())[-1]["user_code"]])
                else:
                    self.assertFalse(os.path.exists(opened))

    def test_no_browser_when_stderr_is_not_a_terminal(self):
        err = vdl._Terminal(stream=io.StringIO())
        self.assertFalse(vdl._browser_visible({"DISPLAY": ":0"}, err, "linux"))
        with mock.patch.object(err, "isatty", return_value=True):
            self.assertTrue(vdl._browser_visible({"DISPLAY": ":0"}, err, "linux"))
            self.assertTrue(vdl._browser_visible({"WAYLAND_DISPLAY": "wayland-0"}, err, "linux"))
            self.assertFalse(vdl._browser_visible({}, err, "linux"))
            self.assertTrue(vdl._browser_visible({}, err, "darwin"))
            self.assertFalse(vdl._browser_visible({"SSH_CLIENT": "x"}, err, "darwin"))


class PlainPromptTests(IssuerTest):
    def test_qr_is_drawn_even_when_stderr_is_a_log(self):
        self.issuer.approve_after_polls = 0
        result = run_cli(["--issuer", self.issuer.issuer, "--client-id", "cli", "--qr"],
                         env={"PYTHONIOENCODING": "utf-8"})
        self.assertEqual(result.code, 0, result.stderr)
        lines = [line for line in result.stderr.splitlines() if set(line) & set("\u2580\u2584\u2588")]
        self.assertGreater(len(lines), 10)
        self.assertNotIn("\x1b", result.stderr)
        if zxingcpp is not None:
            device = next(iter(self.issuer.devices.values()))
            self.assertEqual(decoded_text(modules_from_text(lines)),
                             self.issuer.issuer + "/device?user_code=" + device["user_code"])

    def test_ascii_fallback_when_stderr_cannot_show_half_blocks(self):
        self.issuer.approve_after_polls = 0
        result = run_cli(["--issuer", self.issuer.issuer, "--client-id", "cli", "--qr"],
                         env={"PYTHONIOENCODING": "ascii"})
        self.assertEqual(result.code, 0, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("####")]
        self.assertGreater(len(lines), 20)
        if zxingcpp is not None:
            device = next(iter(self.issuer.devices.values()))
            self.assertEqual(decoded_text(modules_from_text(lines, unicode=False)),
                             self.issuer.issuer + "/device?user_code=" + device["user_code"])

    def test_a_plain_line_now_and_then_while_waiting_in_a_log(self):
        self.issuer.approve_after_polls = 30
        self.issuer.enforce_interval = False
        self.issuer.rate_limit = False
        self.issuer.interval = 5
        result = run_main(["--issuer", self.issuer.issuer, "--client-id", "cli"])
        self.assertEqual(result.code, 0, result.stderr)
        waiting = [line for line in result.stderr.splitlines() if "still waiting for approval" in line]
        self.assertEqual(len(waiting), 2)
        self.assertIn("min", waiting[0])
        self.assertNotIn("\r", result.stderr)
        self.assertNotIn("still waiting", self.sign_in("-q").stderr)


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
