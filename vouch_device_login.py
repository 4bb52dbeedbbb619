#!/usr/bin/env python3
"""Sign in to Vouch (or any OpenID Connect provider) from a terminal.

vouch_device_login runs the OAuth 2.0 Device Authorization Grant (RFC 8628):
it shows a URL and a short code on stderr, the person approves the sign-in on
another device, and the token with its hardware-attestation claims comes out
on stdout as JSON, as `export` lines for `eval`, or as the bare token.

One file, standard library only, CPython 3.6 and later and PyPy3:

    python3 vouch_device_login.py --client-id CLIENT_ID
    curl -fsSL https://example.com/vouch_device_login.py | python3 - --client-id X
    eval "$(python3 vouch_device_login.py --format shell)"
    python3 vouch_device_login.py --install   # then vouch-device-login: starts faster

Python API: main(), decode_jwt(), verify_jws(), verify_jwt(),
verify_signature(), and the VouchError family of exceptions, each of which
carries the exit code the command line uses for it.
"""

import os
import sys

__version__ = "1.0.0"

__all__ = [
    "AccessDeniedError",
    "ExpiredError",
    "NetworkError",
    "PolicyError",
    "ProtocolError",
    "TokenVerificationError",
    "UsageError",
    "VouchError",
    "decode_jwt",
    "main",
    "verify_jws",
    "verify_jwt",
    "verify_signature",
]

# Start-up time is measured (`--version` must cost little more than a bare
# interpreter), so everything beyond os and sys is imported where it is used.


# ============================================================================
# Errors: one base class, each subclass carries its exit code (SPEC §2)
# ============================================================================

class VouchError(Exception):
    """Base class of every error the tool reports; carries the exit code."""

    exit_code = 1


class UsageError(VouchError):
    """Bad command line or configuration (exit 2)."""

    exit_code = 2


class AccessDeniedError(VouchError):
    """The user or the server denied the request (exit 3)."""

    exit_code = 3


class ExpiredError(VouchError):
    """The device code expired after any restarts (exit 4)."""

    exit_code = 4


class NetworkError(VouchError):
    """Network, TLS or HTTP failure (exit 5)."""

    exit_code = 5


class ProtocolError(VouchError):
    """The server said something malformed or refused the client (exit 6)."""

    exit_code = 6


class TokenVerificationError(VouchError):
    """A token failed signature or claim verification (exit 7)."""

    exit_code = 7


class PolicyError(VouchError):
    """A policy flag such as --require-hardware was not met (exit 8)."""

    exit_code = 8


class _TimeLimitError(NetworkError):
    """A request hit --timeout; retrying it at once would only wait as long again."""


class _DeviceCodeExpired(Exception):
    """The current device code died; the caller may start a new one."""


# ============================================================================
# Configuration
# ============================================================================

DEFAULT_ISSUER = "https://us.vouch.sh"
DEFAULT_SCOPE = "openid email"
DEFAULT_TIMEOUT = 30.0
DEFAULT_INTERVAL = 5
MIN_INTERVAL = 1
# A server asking for more than this between polls is broken or hostile; the
# user is waiting at a prompt, and slow_down still adds 5 s on top of it.
MAX_INTERVAL = 60
DEFAULT_EXPIRES_IN = 600
# RFC 8628 §3.2 gives 1800 s as its example lifetime; longer waits at a prompt
# only keep a forgotten process alive.
MAX_EXPIRES_IN = 1800
# Every response body is read up to this many bytes; JWKS documents are the
# largest legitimate answers and stay far below it.
MAX_BODY_BYTES = 1 << 20
# Backoff for 5xx answers, timeouts and connection errors while polling.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 60.0
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
_PROG = "vouch_device_login"


def _monotonic():
    """The poller's clock; tests replace it (and _sleep) with a fake one."""
    import time
    return time.monotonic()


def _sleep(seconds):
    import time
    time.sleep(seconds)


class _Config:
    """Everything the command line and the environment decided, in one place."""

    def __init__(self, **values):
        self.__dict__.update(values)


# ============================================================================
# Terminal output: everything for people goes to stderr, sanitised
# ============================================================================

_MAX_SHOWN = 300


def _sanitize(text, limit=_MAX_SHOWN):
    """Make a server-supplied string safe to show on a terminal.

    Escape sequences (CSI, OSC such as OSC 8 links and OSC 52 clipboard
    writes), C0 and C1 controls, carriage returns and bidirectional overrides
    could rewrite or hide what the person reads, so they never get through.
    """
    import re
    text = str(text)
    # ECMA-48 §5.4 CSI, §5.6 OSC/DCS/APC/PM/SOS strings, in 7- and 8-bit forms.
    text = re.sub(
        "(?:\x1b\\[|\x9b)[\x20-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
        "|(?:\x1b[\\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\\\|\x9c)?"
        "|\x1b[\x20-\x2f]*[\x30-\x7e]?",
        "",
        text,
    )
    text = re.sub("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]", "?", text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class _Terminal:
    """Writes messages for the person to stderr, honouring -q and -v."""

    def __init__(self, quiet=False, verbose=False, stream=None, prog=_PROG):
        self.quiet = quiet
        self.verbose = verbose
        self.stream = stream
        self.prog = prog
        self._secrets = set()
        self._status = None

    def output(self):
        """The stream messages go to: stderr unless a test or caller gave another."""
        return self.stream if self.stream is not None else sys.stderr

    def write(self, text):
        """Write text as it is; callers sanitise what came from a server."""
        stream = self.output()
        if stream is None:
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass

    def line(self, text):
        """Write a whole line; a live status line up is cleared first and drawn again below it."""
        if self._status:
            text = self._clear_status() + text + self._status
        self.write(text)

    def status(self, text):
        """Show text as the one live line, rewritten in place; None or "" clears it.

        The caller keeps it narrower than the terminal: only the last row of a
        wrapped line can be rewritten.
        """
        self.write(self._clear_status() + (text or ""))
        self._status = text or None

    def _clear_status(self):
        up = (len(self._status) - 1) // self.size()[0] if self._status else 0
        if up:
            # The terminal got narrower, and one that reflows (tmux, VTE, iTerm2,
            # Terminal.app) wrapped the line: erase from its first row down.
            return "\r\x1b[%dA\x1b[J" % up
        return "\r\x1b[K"

    # Messages are sanitised once more here: whatever a server managed to get
    # into one, it cannot reach the terminal as an escape sequence.
    def error(self, message):
        """The one line a failure prints."""
        self.line("%s: error: %s\n" % (self.prog, _sanitize(self.mask(message), 1000)))

    def warn(self, message):
        """A warning; -q silences it."""
        if not self.quiet:
            self.line("%s: warning: %s\n" % (self.prog, _sanitize(self.mask(message), 1000)))

    def info(self, message):
        """Progress for the person; -q silences it."""
        if not self.quiet:
            self.line("%s: %s\n" % (self.prog, _sanitize(self.mask(message), 1000)))

    def add_secret(self, value):
        """Remember a value that must never reach a log line."""
        # Short values would mask ordinary words; real tokens and codes are long.
        if isinstance(value, str) and len(value) >= 12:
            self._secrets.add(value)

    def mask(self, text):
        """Text with every remembered secret replaced by its masked form."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, _masked(secret))
        return text

    def debug(self, message):
        """A -v log line, masked and sanitised."""
        if self.verbose:
            self.line("%s: debug: %s\n" % (self.prog, _sanitize(self.mask(message), 2000)))

    def isatty(self):
        """Whether messages go to a terminal (and so may use colour and cursor control)."""
        stream = self.output()
        try:
            return bool(stream is not None and stream.isatty())
        except (OSError, ValueError, AttributeError):
            return False

    def size(self):
        """(columns, rows) of the terminal, read anew each time (it may be resized); rows None when unknown."""
        try:
            columns, rows = os.get_terminal_size(self.output().fileno())
        except (OSError, ValueError, AttributeError):
            columns, rows = 0, 0
        # A pseudo-terminal nobody sized reports 0 x 0.
        return columns or 80, rows or None


def _masked(secret):
    """A secret as it may appear in a log: its length, never its content."""
    return "<%d chars masked>" % len(secret)


# ============================================================================
# Strict decoding: JSON from servers and base64url (RFC 8259 §4, RFC 7515 §2)
# ============================================================================

_B64URL_ALPHABET = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64url_decode(text):
    """Strict base64url: alphabet only, no padding, canonical trailing bits."""
    # binascii, not base64: base64 imports re, which costs --dpop-proof more than its signature
    import binascii
    if not isinstance(text, str) or len(text) % 4 == 1 or not _B64URL_ALPHABET.issuperset(text):
        raise ValueError("not base64url")
    raw = binascii.a2b_base64(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4))
    if _b64url_encode(raw) != text:
        raise ValueError("non-canonical base64url")
    return raw


def _b64url_encode(raw):
    import binascii
    return binascii.b2a_base64(raw, newline=False).rstrip(b"=").decode("ascii").replace("+", "-").replace("/", "_")


def _reject_constant(name):
    raise ValueError("JSON constant %s is not allowed" % name)


def _unique_object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("duplicate JSON key %r" % _sanitize(key, 40))
        obj[key] = value
    return obj


# Legitimate documents nest a few levels; a deep one only exhausts recursion
# later, in whatever walks it (json.dumps with indent among them).
MAX_JSON_DEPTH = 64
# exp and friends need 10 digits; a million-digit number costs quadratic time
# to convert before Python 3.11 limits it.
MAX_JSON_INTEGER_DIGITS = 100


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("JSON number %s is out of range" % _sanitize(text, 40))
    return value


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_JSON_INTEGER_DIGITS:
        raise ValueError("JSON integer with more than %d digits" % MAX_JSON_INTEGER_DIGITS)
    return int(text)


def _loads_json(data):
    """Parse JSON strictly: UTF-8, no duplicate keys, no NaN or infinities.

    Numbers must be finite (1e400 is not) and integers shorter than 100
    digits; nesting deeper than 64 levels is refused. Raises ValueError
    (json.JSONDecodeError and UnicodeDecodeError included).
    """
    import json
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    try:
        value = json.loads(data, object_pairs_hook=_unique_object, parse_constant=_reject_constant,
                           parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("JSON nested too deeply")
    _check_depth(value)
    return value


def _check_depth(value):
    """Refuse containers nested deeper than MAX_JSON_DEPTH, without recursion."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_JSON_DEPTH:
                    raise ValueError("JSON nested deeper than %d levels" % MAX_JSON_DEPTH)
                pending.append((child, depth + 1))


# ============================================================================
# HTTP: one persistent connection per origin, verified TLS, hard limits
# ============================================================================

_SECRET_FIELDS = frozenset((
    "access_token", "refresh_token", "id_token", "device_code", "client_secret",
    "token", "code", "assertion", "client_assertion", "authorizationToken", "SecretAccessKey", "SessionToken",
))


def _is_loopback_host(host):
    """True for 127.0.0.0/8, ::1 and localhost: the only hosts http:// may use."""
    import socket
    if host.lower() == "localhost":
        return True
    try:
        return socket.inet_pton(socket.AF_INET, host)[0] == 127 and host.count(".") == 3
    except (OSError, ValueError):
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, host) == b"\0" * 15 + b"\1"
    except (OSError, ValueError):
        return False


def _parse_url(url, what):
    """Split an endpoint URL, refusing anything but https (or http on loopback).

    Returns (scheme, host, port, target) where target is the request path.
    """
    from urllib.parse import urlsplit
    if not isinstance(url, str) or not url:
        raise ProtocolError("%s is not a URL" % what)
    if not all("\x21" <= ch <= "\x7e" for ch in url):
        raise ProtocolError("%s contains white space, control or non-ASCII characters: %s"
                            % (what, _sanitize(url)))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ProtocolError("%s is not a valid URL: %s" % (what, _sanitize(url)))
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("https", "http") or not host:
        raise ProtocolError("%s must be an absolute https URL: %s" % (what, _sanitize(url)))
    try:
        # What the resolver and TLS (SNI) will need; "a..b" or a 64-byte label cannot be sent.
        host.encode("idna")
    except UnicodeError:
        raise ProtocolError("%s has an invalid host name: %s" % (what, _sanitize(host)))
    if parts.username is not None or parts.password is not None:
        raise ProtocolError("%s must not carry credentials: %s" % (what, _sanitize(url.split("@")[-1])))
    if scheme == "http" and not _is_loopback_host(host):
        raise ProtocolError(
            "%s uses plain http on a non-loopback host (%s); only https is allowed"
            % (what, _sanitize(host)))
    if port is None:
        port = 443 if scheme == "https" else 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, target


def _proxy_for(scheme, host, port, environ, platform=None):
    """The (host, port, headers) of the proxy to tunnel through, or None.

    Follows the curl conventions: HTTPS_PROXY/https_proxy for https targets,
    HTTP_PROXY/http_proxy for http ones, NO_PROXY/no_proxy lists hosts or
    domain suffixes (optionally with a port) or "*". With none of those set,
    macOS (System Settings) and Windows (the registry) have proxy settings of
    their own, which a managed machine relies on. Loopback targets never go
    through a proxy: a proxy cannot reach this machine's loopback.
    """
    if _is_loopback_host(host):
        return None
    names = ("https_proxy", "HTTPS_PROXY") if scheme == "https" else ("http_proxy", "HTTP_PROXY")
    proxy = next((environ[n] for n in names if environ.get(n)), None)
    variables = names + ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY")
    if not proxy and (platform or sys.platform) in ("darwin", "win32") and not any(environ.get(n) for n in variables):
        import urllib.request
        if urllib.request.proxy_bypass(host):
            return None
        proxy = urllib.request.getproxies().get(scheme)
        # Python before 3.9 reads a Windows "host:port" setting as https://host:port.
        if proxy and proxy.lower().startswith("https://"):
            proxy = "http://" + proxy[8:]
    if not proxy:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    host_l = host.lower().rstrip(".")
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return None
        entry_host, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        entry_host = entry_host.lstrip("*").lstrip(".").rstrip(".")
        if host_l == entry_host or host_l.endswith("." + entry_host):
            return None
    from urllib.parse import unquote, urlsplit
    if "://" not in proxy:
        proxy = "http://" + proxy
    try:
        parts = urlsplit(proxy)
        proxy_port = parts.port or 80
    except ValueError:
        raise UsageError("the proxy setting is not a valid URL: %s" % _sanitize(proxy.rpartition("@")[2]))
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise UsageError("only http:// proxies are supported (got %s)" % _sanitize(parts.scheme))
    headers = {}
    if parts.username is not None:
        import base64
        userpass = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(userpass.encode("utf-8")).decode("ascii")
    return parts.hostname, proxy_port, headers


class _Response:
    """A fully read HTTP response."""

    def __init__(self, status, reason, headers, body, url):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.url = url

    def header(self, name):
        """A response header by case-insensitive name, or None."""
        return self.headers.get(name.lower())


class _StaleConnection(Exception):
    """A kept-alive connection was closed by the server before it answered."""


class _BadAnswer(Exception):
    """The peer's bytes are not HTTP/1.1 as RFC 9112 frames it."""


class _BodyTooLarge(Exception):
    pass


# Limits on what a peer may make us read before the body: a status line or
# header line (64 KiB, as http.client: real Content-Security-Policy and
# Set-Cookie lines pass 8 KiB), the whole head, and its number of fields.
_MAX_LINE = 65536
_MAX_HEAD = 262144
_MAX_FIELDS = 100
# After this long without an answer to the first request, a person at a
# terminal is told what is being contacted and how long it may take.
_SLOW_NOTICE = 3.0


class _Connection:
    """One connection to an origin: the socket, and bytes read but not used.

    The socket is non-blocking and every wait goes through _HttpClient._await
    with the request's deadline. That is the whole time limit: no thread, no
    watchdog, and nothing that can outlive the deadline whatever the framing,
    because no call ever blocks for longer than the time that is left.
    """

    def __init__(self, sock, want_read, want_write):
        self.sock = sock
        # The exceptions a non-blocking call raises when it must wait to read
        # or to write (TLS may need either, whichever way data flows).
        self.want_read = want_read
        self.want_write = want_write
        # TLS errors, which at the end of a close-delimited body mean it was cut.
        self.tls_errors = ()
        self.buffer = bytearray()
        self.answered = False

    def idle_and_open(self):
        """Whether a kept-alive connection is fit for the next request: nothing came while it was idle.

        A server closing an idle connection may first send an answer nobody
        asked for (HAProxy and Node send 408), which would be taken for the
        answer to the next request; a close shows as readable too.
        """
        if self.buffer:
            return False
        if not _ready(self.sock, False, 0):
            return True
        try:
            self.sock.recv(1)
        except self.want_read:
            # TLS: a record without data (a TLS 1.3 session ticket) was all there was.
            return True
        except OSError:
            pass
        return False

    def close(self):
        """Close the socket (and the TLS layer over it)."""
        try:
            self.sock.close()
        except OSError:
            pass


class _HttpClient:
    """HTTP/1.1 client keeping one connection per origin for a whole sign-in.

    Polling reuses the connection, so it pays for one TLS handshake, not one
    per poll. Every request has a total time limit, connect, TLS handshake,
    proxy CONNECT, interim answers, head and body included; every head and
    body a size cap. The framing is parsed here (RFC 9112), not by
    http.client, so no answer can make it read past the cap or the deadline.
    Redirects are returned to the caller, never followed: the device code
    goes to the token endpoint and nowhere else.
    """

    def __init__(self, timeout=DEFAULT_TIMEOUT, cafile=None, terminal=None, environ=None, platform=None):
        self.timeout = timeout
        self.platform = platform or sys.platform
        self.cafile = cafile
        self.terminal = terminal or _Terminal()
        self.environ = os.environ if environ is None else environ
        self._connections = {}
        self._ssl_context = None
        self._notice = None
        self.requests = 0
        self.connections = 0
        self.client_assertion = None

    def close(self):
        """Close every kept-alive connection."""
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def get(self, url, what, headers=None):
        """GET url; `what` names the request in error messages."""
        return self.request("GET", url, what, headers=headers)

    def post(self, url, what, form, headers=None, idempotent=True):
        """POST form (a dict or list of pairs) form-encoded to url."""
        return self.request("POST", url, what, form=form, headers=headers, idempotent=idempotent)

    def request(self, method, url, what, form=None, headers=None, idempotent=True, content=None):
        """Send one request and return the whole _Response.

        The body is the form, form-encoded, or content (bytes, its
        Content-Type among the headers). A form naming a client_id is an
        authorization server's: with client_assertion set (a registered
        client, RFC 7523 §2.2) it gains a fresh assertion on every send.

        A request that must not be sent twice (idempotent=False: a refresh
        with rotation, a revocation, STS) goes on a connection of its own,
        never on a kept-alive one, so it is never sent again after a close
        (RFC 9110 §9.2.2). Polls stay on the kept-alive connection: polling
        is repeating the request. Raises NetworkError for connection, TLS,
        time-limit and size-limit failures, ProtocolError for a URL the
        policy refuses.
        """
        import time
        from urllib.parse import urlencode
        scheme, host, port, target = _parse_url(url, what)
        body = b""
        all_headers = {
            "Accept": "application/json",
            "User-Agent": "%s/%s" % (_PROG, __version__),
        }
        if form is not None:
            if self.client_assertion is not None and any(name == "client_id" for name, _ in _form_items(form)):
                form = list(_form_items(form)) + self.client_assertion()
            body = urlencode(form).encode("ascii")
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif content is not None:
            body = content
        all_headers.update(headers or {})
        self.requests += 1
        self._log_request(method, url, all_headers, form)
        message = _request_bytes(method, scheme, host, port, target, all_headers, body, what)
        key = (scheme, host.lower(), port)
        # One deadline for the request, whatever it takes: a reconnect, a
        # proxy, a TLS handshake and interim answers all spend from it.
        started = time.monotonic()
        deadline = started + self.timeout
        if self.requests == 1 and not self.terminal.quiet and self.terminal.isatty():
            self._notice = (started + _SLOW_NOTICE, key)
        if not idempotent:
            self._drop(key)
        try:
            # A reused connection the server closed is retried once, on a fresh one.
            while True:
                conn, reused = self._connection(key, url, deadline)
                try:
                    response, reusable = self._exchange(conn, reused, method, message, url, deadline)
                except _StaleConnection:
                    self._drop(key)
                    if reused:
                        self.terminal.debug("kept-alive connection to %s was closed; reconnecting" % host)
                        continue
                    raise NetworkError("%s: %s closed the connection without answering" % (what, _origin(url)))
                except BaseException:
                    self._drop(key)
                    raise
                break
        finally:
            self._notice = None
        if not reusable:
            self._drop(key)
        self.terminal.debug("%d bytes in %.0f ms" % (len(response.body), (time.monotonic() - started) * 1000))
        self._log_response(response)
        return response

    def _context(self):
        if self._ssl_context is None:
            import ssl
            cafile = self.cafile or self.environ.get("SSL_CERT_FILE") or None
            try:
                context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError("cannot load CA certificates from %s: %s" % (cafile, exc))
            # minimum_version (3.7+) where it exists: the option bits it replaces
            # print a DeprecationWarning from 3.10 on. Python 3.6 has only the bits.
            if hasattr(ssl, "TLSVersion"):
                context.minimum_version = ssl.TLSVersion.TLSv1_2
            else:
                context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
            # Python 3.8 and 3.9 built with OpenSSL 3 take a bare FIN for close_notify,
            # which would let a cut close-delimited body pass as whole (RFC 9112 §9.8).
            context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
            self._ssl_context = context
        return self._ssl_context

    def _connection(self, key, url, deadline):
        conn = self._connections.get(key)
        if conn is not None:
            if conn.idle_and_open():
                return conn, True
            self.terminal.debug("kept-alive connection to %s was closed while idle; reconnecting" % key[1])
            self._drop(key)
        scheme, host, port = key
        conn = self._open(scheme, host, port, url, deadline, self._context() if scheme == "https" else None)
        self._connections[key] = conn
        self.connections += 1
        return conn, False

    def _drop(self, key):
        conn = self._connections.pop(key, None)
        if conn is not None:
            conn.close()

    def _open(self, scheme, host, port, url, deadline, context):
        """A new connection to the origin, through the proxy if one applies."""
        proxy = _proxy_for(scheme, host, port, self.environ, self.platform)
        try:
            if proxy:
                self.terminal.debug("connecting to %s:%d through the proxy %s:%d" % (host, port, proxy[0], proxy[1]))
                sock = self._connect(proxy[0], proxy[1], deadline)
            else:
                sock = self._connect(host, port, deadline)
        except OSError as exc:
            raise self._network_error(exc, url, deadline, proxy)
        conn = _Connection(sock, (BlockingIOError,), (BlockingIOError,))
        try:
            if proxy:
                self._tunnel(conn, host, port, proxy, url, deadline)
            if context is not None:
                self._handshake(conn, context, host, url, deadline)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self, host, port, deadline):
        """A non-blocking TCP socket connected to the first address that answers."""
        import errno
        import socket
        last = None
        for family, kind, proto, _name, address in self._resolve(host, port, deadline):
            sock = None
            try:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                code = sock.connect_ex(address)
                if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                    self._await_socket(sock, True, deadline)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                return sock
            except BaseException as exc:
                if sock is not None:
                    sock.close()
                if not isinstance(exc, OSError) or isinstance(exc, socket.timeout):
                    raise
                last = exc
        raise last or OSError("no address for %s" % host)

    def _resolve(self, host, port, deadline):
        """getaddrinfo within the deadline: a resolver that never answers is a stall like any other.

        The standard library has no resolver with a time limit, so it runs on
        a daemon thread that is left behind if the deadline comes first.
        """
        import socket
        import threading
        answer = []

        def resolve():
            try:
                answer.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
            except (OSError, UnicodeError) as exc:
                answer.append(exc)

        worker = threading.Thread(target=resolve, daemon=True)
        worker.start()
        self._await(lambda timeout: worker.join(timeout) or bool(answer), deadline)
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]

    def _tunnel(self, conn, host, port, proxy, url, deadline):
        """Ask the proxy for a tunnel to host:port (RFC 9110 §9.3.6)."""
        authority = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        lines = ["CONNECT %s HTTP/1.1" % authority, "Host: " + authority]
        lines.extend("%s: %s" % item for item in proxy[2].items())
        try:
            self._send(conn, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"), deadline)
            status, reason, _version, _fields = self._read_head(conn, deadline)
        except (OSError, _BadAnswer) as exc:
            raise self._network_error(exc, url, deadline, proxy)
        if not 200 <= status < 300:
            raise NetworkError("%s: the proxy %s:%d refused the tunnel: HTTP %d %s"
                               % (_origin(url), proxy[0], proxy[1], status, _sanitize(reason, 80)))
        if conn.buffer:
            raise NetworkError("%s: the proxy %s:%d sent data before the tunnel was open"
                               % (_origin(url), proxy[0], proxy[1]))

    def _handshake(self, conn, context, host, url, deadline):
        import ssl
        try:
            # A body that ends when the connection does is complete only after
            # close_notify (RFC 9112 §9.8): a bare FIN may be an attacker's cut.
            conn.sock = context.wrap_socket(conn.sock, server_hostname=host, do_handshake_on_connect=False,
                                            suppress_ragged_eofs=False)
            conn.want_read = (ssl.SSLWantReadError, BlockingIOError)
            conn.want_write = (ssl.SSLWantWriteError,)
            conn.tls_errors = (ssl.SSLError,)
            while True:
                try:
                    conn.sock.do_handshake()
                    return
                except conn.want_read:
                    self._await_socket(conn.sock, False, deadline)
                except conn.want_write:
                    self._await_socket(conn.sock, True, deadline)
        except (OSError, ValueError) as exc:
            # Python 3.6 checks the host name itself and raises CertificateError, a ValueError.
            raise self._network_error(exc, url, deadline, None, handshake=True)

    def _await_socket(self, sock, writable, deadline):
        """Wait until sock can be read (or written), at most until the deadline."""
        self._await(lambda timeout: _ready(sock, writable, timeout), deadline)

    def _await(self, ready, deadline):
        """Call ready(timeout) until it says True; socket.timeout at the deadline."""
        import socket
        import time
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise socket.timeout()
            until = deadline
            if self._notice is not None and self._notice[0] < deadline:
                until = self._notice[0]
                if now >= until:
                    self._show_notice()
                    continue
            if ready(until - now):
                return

    def _show_notice(self):
        scheme, host, port = self._notice[1]
        self._notice = None
        proxy = _proxy_for(scheme, host, port, self.environ, self.platform)
        self.terminal.info("waiting for %s://%s:%d%s to answer; giving up after %g s (--timeout)" % (
            scheme, host, port, " through the proxy %s:%d" % proxy[:2] if proxy else "", self.timeout))

    def _send(self, conn, data, deadline):
        import socket
        import time
        view = memoryview(data)
        while view:
            if time.monotonic() >= deadline:
                raise socket.timeout()
            try:
                view = view[conn.sock.send(view):]
            except conn.want_write:
                self._await_socket(conn.sock, True, deadline)
            except conn.want_read:
                self._await_socket(conn.sock, False, deadline)

    def _fill(self, conn, deadline):
        """Read what the peer has sent next into the buffer; False at end of stream."""
        import socket
        import time
        while True:
            # A peer that never pauses never makes us wait, so the clock is read here too.
            if time.monotonic() >= deadline:
                raise socket.timeout()
            try:
                data = conn.sock.recv(65536)
            except conn.want_read:
                self._await_socket(conn.sock, False, deadline)
                continue
            except conn.want_write:
                self._await_socket(conn.sock, True, deadline)
                continue
            if data:
                conn.answered = True
                conn.buffer += data
            return bool(data)

    def _read_line(self, conn, deadline, limit=_MAX_LINE):
        """One line without its CRLF (a bare LF ends one too, RFC 9112 §2.2)."""
        start = 0
        while True:
            end = conn.buffer.find(b"\n", start, limit + 1)
            if end >= 0:
                line = bytes(conn.buffer[:end])
                del conn.buffer[:end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(conn.buffer) > limit:
                raise _BadAnswer("a line longer than %d bytes" % limit)
            start = len(conn.buffer)
            if not self._fill(conn, deadline):
                raise _BadAnswer("the connection closed in the middle of the answer")

    def _read_exactly(self, conn, size, deadline):
        while len(conn.buffer) < size:
            if not self._fill(conn, deadline):
                raise _BadAnswer("the connection closed in the middle of the body")
        data = bytes(conn.buffer[:size])
        del conn.buffer[:size]
        return data

    def _read_fields(self, conn, deadline):
        """Header (or trailer) fields up to the empty line, as {lower name: value}."""
        fields = {}
        total = count = 0
        name = None
        while True:
            line = self._read_line(conn, deadline)
            if not line:
                return fields
            total += len(line) + 2
            count += 1
            if total > _MAX_HEAD or count > _MAX_FIELDS:
                raise _BadAnswer("a header block over %d bytes or %d fields" % (_MAX_HEAD, _MAX_FIELDS))
            text = line.decode("latin-1")
            if text[0] in " \t" and name is not None:
                # Obsolete line folding (RFC 9112 §5.2): one space instead.
                fields[name] += " " + text.strip()
                continue
            name, colon, value = text.partition(":")
            name = name.lower()
            if not colon or not name or name != name.strip():
                raise _BadAnswer("a malformed header line: %s" % _sanitize(text, 80))
            value = value.strip(" \t")
            # Repeated fields combine into one list (RFC 9110 §5.3).
            fields[name] = fields[name] + ", " + value if name in fields else value

    def _read_head(self, conn, deadline):
        """(status, reason, version, fields) of the final answer, skipping 1xx."""
        while True:
            line = self._read_line(conn, deadline)
            version, _, rest = line.partition(b" ")
            status, _, reason = rest.partition(b" ")
            if version not in (b"HTTP/1.0", b"HTTP/1.1") or len(status) != 3 or not status.isdigit():
                raise _BadAnswer("not an HTTP/1.x status line: %s" % _sanitize(line.decode("latin-1"), 80))
            fields = self._read_fields(conn, deadline)
            status = int(status)
            # Interim answers (RFC 9110 §15.2) come before the real one, in any
            # number; 101 would switch protocols, which was never asked for.
            if status == 101:
                raise _BadAnswer("an unasked-for 101 Switching Protocols")
            if 100 <= status < 200:
                continue
            return status, reason.decode("latin-1"), version, fields

    def _read_body(self, conn, method, status, fields, deadline):
        """(body, framed) as RFC 9112 §6.3 frames it, never more than the cap."""
        if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
            return b"", True
        coding = fields.get("transfer-encoding")
        if coding is not None:
            if coding.rpartition(",")[2].strip().lower() == "chunked":
                return self._read_chunked(conn, deadline), "content-length" not in fields
            return self._read_to_close(conn, deadline), False
        length = fields.get("content-length")
        if length is None:
            return self._read_to_close(conn, deadline), False
        values = {value.strip(" \t") for value in length.split(",")}
        if len(values) != 1 or not _is_ascii_digits(next(iter(values)), 19):
            raise _BadAnswer("a malformed Content-Length: %s" % _sanitize(length, 40))
        length = int(values.pop())
        if length > MAX_BODY_BYTES:
            raise _BodyTooLarge()
        return self._read_exactly(conn, length, deadline), True

    def _read_chunked(self, conn, deadline):
        body = bytearray()
        while True:
            line = self._read_line(conn, deadline)
            size = line.partition(b";")[0].strip(b" \t")
            # Hex digits only: int() would also take "-1", "0x10" or "1_0".
            if not 0 < len(size) <= 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise _BadAnswer("a malformed chunk size: %s" % _sanitize(line.decode("latin-1"), 40))
            size = int(size, 16)
            if size == 0:
                self._read_fields(conn, deadline)
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise _BodyTooLarge()
            body += self._read_exactly(conn, size, deadline)
            if self._read_exactly(conn, 2, deadline) != b"\r\n":
                raise _BadAnswer("a chunk longer than its size line says")

    def _read_to_close(self, conn, deadline):
        try:
            while self._fill(conn, deadline):
                if len(conn.buffer) > MAX_BODY_BYTES:
                    raise _BodyTooLarge()
        except conn.tls_errors as exc:
            raise _BadAnswer("the body was cut off: the connection closed without TLS close_notify (%s)"
                             % _sanitize(str(exc), 80))
        body = bytes(conn.buffer)
        conn.buffer.clear()
        return body

    def _exchange(self, conn, reused, method, message, url, deadline):
        """Send one request and read its whole answer: (_Response, reusable)."""
        import socket
        conn.answered = False
        try:
            try:
                self._send(conn, message, deadline)
                status, reason, version, fields = self._read_head(conn, deadline)
            except (OSError, _BadAnswer) as exc:
                # Closed before a byte of the answer: on a kept-alive connection,
                # whichever way it shows (TLS reports EOF in several), the server
                # had closed it; a fresh one may only have been closed or reset.
                closed = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, _BadAnswer)
                if not conn.answered and not isinstance(exc, socket.timeout) and (reused or isinstance(exc, closed)):
                    raise _StaleConnection()
                raise
            body, framed = self._read_body(conn, method, status, fields, deadline)
        except _BodyTooLarge:
            raise NetworkError("%s: response body larger than %d bytes" % (_origin(url), MAX_BODY_BYTES))
        except _BadAnswer as exc:
            raise NetworkError("%s: a malformed HTTP answer: %s" % (_origin(url), exc))
        except OSError as exc:
            raise self._network_error(exc, url, deadline, None)
        tokens = {token.strip().lower() for token in fields.get("connection", "").split(",")}
        reusable = framed and version == b"HTTP/1.1" and "close" not in tokens and not conn.buffer
        return _Response(status, reason, fields, body, url), reusable

    def _log_request(self, method, url, headers, form):
        if not self.terminal.verbose:
            return
        shown = dict(headers)
        for name in ("Authorization", "Proxy-Authorization", "Cookie"):
            if name in shown:
                shown[name] = shown[name].split(" ")[0] + " " + _masked(shown[name])
        if "X-Amz-Security-Token" in shown:
            shown["X-Amz-Security-Token"] = _masked(shown["X-Amz-Security-Token"])
        line = "%s %s %s" % (method, url, shown)
        if form:
            line += " form=%s" % {
                k: (_masked(str(v)) if k in _SECRET_FIELDS else v) for k, v in _form_items(form)}
        self.terminal.debug(line)

    def _masked_document(self, value):
        # secrets at any depth (ECR's authorizationData[0].authorizationToken): masked, and masked from then on
        if isinstance(value, list):
            return [self._masked_document(item) for item in value]
        if not isinstance(value, dict):
            return value
        masked = {}
        for name, item in value.items():
            if name in _SECRET_FIELDS and isinstance(item, str):
                self.terminal.add_secret(item)
                item = _masked(item)
            masked[name] = self._masked_document(item)
        return masked

    def _log_response(self, response):
        if not self.terminal.verbose:
            return
        try:
            document = _loads_json(response.body)
        except ValueError:
            document = None
        if isinstance(document, dict):
            import json
            shown = json.dumps(self._masked_document(document))[:2000]
        else:
            # Only a JSON object can be masked field by field; anything else
            # (a form-encoded token answer, JSON with a BOM) might hold a token.
            shown = "<%d bytes of %s, not a JSON object; not shown>" % (
                len(response.body), response.header("content-type") or "unknown type")
        self.terminal.debug("-> %d %s %s" % (response.status, response.reason, shown))

    def _network_error(self, exc, url, deadline, proxy, handshake=False):
        """The NetworkError (or UsageError) that explains a failed socket call."""
        import socket
        import time
        through = " through the proxy %s:%d" % proxy[:2] if proxy else ""
        if isinstance(exc, socket.timeout) or time.monotonic() >= deadline:
            return _TimeLimitError("%s%s: no complete answer within %g s (--timeout)"
                                   % (_origin(url), through, self.timeout))
        if isinstance(exc, socket.gaierror):
            host = proxy[0] if proxy else _parse_url(url, "URL")[1]
            return NetworkError(
                "cannot resolve %s (%s): check the network connection, the --issuer URL and, "
                "behind a proxy, HTTPS_PROXY" % (_sanitize(host), _sanitize(_describe_os_error(exc))))
        if _is_certificate_failure(exc):
            return NetworkError(_tls_failure_message(url, exc, self, deadline))
        if handshake or type(exc).__module__ == "ssl":
            return NetworkError("%s%s: TLS failure: %s" % (_origin(url), through, _sanitize(str(exc))))
        return NetworkError("%s%s: %s" % (_origin(url), through, _sanitize(_describe_os_error(exc))))


def _host_header(scheme, host, port):
    """The Host field of a request to host:port (RFC 9110 §7.2): the port only when it is not the default."""
    host_header = "[%s]" % host if ":" in host else host
    if port != (443 if scheme == "https" else 80):
        host_header += ":%d" % port
    return host_header


def _request_bytes(method, scheme, host, port, target, headers, body, what):
    """The request line, header fields and body as bytes (RFC 9112 §3)."""
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: " + _host_header(scheme, host, port)]
    for name, value in headers.items():
        # A token the server sent goes back in Authorization: CR or LF in it
        # would let the server's answer write our next request's headers.
        if not all(" " <= ch <= "~" or ch == "\t" for ch in value):
            raise ProtocolError("%s: refusing to send a %s header with control or non-ASCII characters"
                                % (what, name))
        lines.append("%s: %s" % (name, value))
    if body or method == "POST":
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _form_items(form):
    return form.items() if isinstance(form, dict) else form


def _ready(sock, writable, timeout):
    """Whether sock can be read (or written) within timeout seconds."""
    import select
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLOUT if writable else select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000 + 1))))
    # Windows reports a failed non-blocking connect only in the exception set.
    readable, written, failed = select.select([] if writable else [sock], [sock] if writable else [],
                                              [sock] if writable else [], max(0, timeout))
    return bool(readable or written or failed)



def _origin(url):
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        return _sanitize("%s://%s" % (parts.scheme, parts.netloc.rpartition("@")[2]))
    except ValueError:
        return _sanitize(url)


def _is_certificate_failure(exc):
    import ssl
    verification_error = getattr(ssl, "SSLCertVerificationError", None)
    if verification_error is not None:
        return isinstance(exc, (verification_error, ssl.CertificateError))
    return isinstance(exc, ssl.CertificateError) or "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _describe_os_error(exc):
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _tls_failure_message(url, exc, client, deadline):
    """Explain a certificate failure and name the certificate that was shown.

    A TLS-inspecting corporate proxy is the usual cause, so the message names
    the certificate the server presented and points at --cacert; a Python
    with no CA certificates at all (python.org's on macOS before its "Install
    Certificates.command" has run) needs those installed instead.
    """
    detail = getattr(exc, "verify_message", None) or str(exc)
    message = "%s: TLS certificate verification failed (%s)" % (_origin(url), _sanitize(detail))
    if _no_default_ca_certificates(client):
        return message + ("; this Python has no CA certificates: on macOS run \"Install Certificates.command\" "
                          "from its folder in Applications, or pass --cacert /etc/ssl/cert.pem")
    presented = _presented_certificate(url, client, deadline)
    if presented:
        message += "; the server presented %s" % presented
    return message + "; if a TLS-inspecting proxy is in the way, pass its CA with --cacert FILE"


def _no_default_ca_certificates(client):
    """True when the default trust store was used and is empty."""
    import ssl
    if client.cafile or client.environ.get("SSL_CERT_FILE"):
        return False
    if client._context().cert_store_stats()["x509_ca"]:
        return False
    # A hashed directory is read on demand, so its certificates are not counted.
    capath = ssl.get_default_verify_paths().capath
    try:
        return not (capath and os.listdir(capath))
    except OSError:
        return True


def _presented_certificate(url, client, deadline):
    """Fetch (without trusting it) the certificate a server shows, described."""
    import hashlib
    import ssl
    scheme, host, port, _target = _parse_url(url, "URL")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        conn = client._open(scheme, host, port, url, deadline, context)
    except VouchError:
        return None
    try:
        der = conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()
    if not der:
        return None
    subject, issuer = _certificate_names(der)
    fingerprint = hashlib.sha256(der).hexdigest().upper()
    fingerprint = ":".join(fingerprint[i:i + 2] for i in range(0, len(fingerprint), 2))
    return "subject %s, issuer %s, SHA-256 fingerprint %s" % (
        _sanitize(subject or "?"), _sanitize(issuer or "?"), fingerprint)


def _der_items(data):
    """Split DER TLVs (X.690 §8.1) into (tag, value) pairs."""
    items = []
    i = 0
    while i < len(data):
        tag = data[i]
        length = data[i + 1]
        i += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[i:i + count], "big")
            i += count
        items.append((tag, data[i:i + length]))
        i += length
    return items


def _certificate_names(der):
    """(subject, issuer) of an X.509 certificate as "CN=…, O=…" strings."""
    names = {b"\x55\x04\x03": "CN", b"\x55\x04\x0a": "O", b"\x55\x04\x0b": "OU"}

    def describe(name):
        parts = []
        for _set_tag, rdn in _der_items(name):
            for _seq_tag, attribute in _der_items(rdn):
                pair = _der_items(attribute)
                if len(pair) == 2 and pair[0][1] in names:
                    parts.append("%s=%s" % (names[pair[0][1]], pair[1][1].decode("utf-8", "replace")))
        return ", ".join(parts)

    try:
        tbs = _der_items(_der_items(_der_items(der)[0][1])[0][1])
        if tbs[0][0] == 0xA0:
            tbs = tbs[1:]
        # RFC 5280 §4.1: serialNumber, signature, issuer, validity, subject.
        return describe(tbs[4][1]), describe(tbs[2][1])
    except (IndexError, ValueError):
        return None, None


def _json_document(response, what):
    """Parse a response body as a JSON object, or raise ProtocolError."""
    try:
        document = _loads_json(response.body)
    except ValueError as exc:
        raise ProtocolError("%s: the answer (HTTP %d) is not valid JSON: %s"
                            % (what, response.status, _sanitize(str(exc), 120)))
    if not isinstance(document, dict):
        raise ProtocolError("%s: expected a JSON object, got %s" % (what, _json_type(document)))
    return document


def _json_type(value):
    if isinstance(value, bool) or value is None:
        return "JSON %s" % {True: "true", False: "false", None: "null"}[value]
    return {dict: "a JSON object", list: "a JSON array", str: "a string",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _check_redirect(response, what):
    if 300 <= response.status < 400:
        location = response.header("location") or "(no Location header)"
        raise ProtocolError("%s: HTTP %d redirect to %s (redirects are not followed)"
                            % (what, response.status, _sanitize(location)))


def _oauth_error(document):
    """The (error, error_description) of an RFC 6749 §5.2 error body, or None."""
    error = document.get("error")
    if not isinstance(error, str) or not error:
        return None
    description = document.get("error_description")
    if not isinstance(description, str):
        description = None
    return error, description


def _describe_oauth_error(error, description):
    text = _sanitize(error, 80)
    if description:
        text += ": " + _sanitize(description, 200)
    return text


def _is_ascii_digits(text, most):
    """1 to `most` ASCII digits: str.isdigit() also accepts "²", which int() refuses."""
    return 0 < len(text) <= most and all("0" <= ch <= "9" for ch in text)


def _retry_after(value, now_epoch):
    """Seconds a Retry-After header asks for (RFC 9110 §10.2.3), or None."""
    if value is None:
        return None
    value = value.strip()
    if _is_ascii_digits(value, 9):
        return float(int(value))
    from email.utils import mktime_tz, parsedate_tz
    try:
        parsed = parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, mktime_tz(parsed) - now_epoch)
    except (TypeError, ValueError, OverflowError):
        return None


# ============================================================================
# Discovery (OpenID Connect Discovery 1.0 §4, RFC 8414 §3)
# ============================================================================

_ENDPOINT_FIELDS = (
    "device_authorization_endpoint", "token_endpoint", "jwks_uri",
    "userinfo_endpoint", "revocation_endpoint",
)


def _discovery_urls(issuer):
    """Where an issuer's metadata may live, in the order they are tried."""
    from urllib.parse import urlsplit, urlunsplit
    base = issuer.rstrip("/")
    urls = [base + "/.well-known/openid-configuration"]
    parts = urlsplit(base)
    # RFC 8414 §3.1: the well-known segment goes between host and path.
    path = parts.path.rstrip("/")
    urls.append(urlunsplit((parts.scheme, parts.netloc,
                            "/.well-known/oauth-authorization-server" + path, "", "")))
    return urls


def _same_issuer(configured, reported):
    """Issuer equality per RFC 8414 §3.3, tolerating one trailing slash."""
    if configured == reported:
        return True
    return configured.endswith("/") != reported.endswith("/") and \
        configured.rstrip("/") == reported.rstrip("/") and \
        len(configured) - len(reported) in (1, -1)


def discover(http, issuer):
    """Fetch and check the issuer's metadata; return it as a dict.

    Tries OpenID Connect discovery, then RFC 8414 with the path-insertion
    rule. The document's `issuer` must equal the configured one (a trailing
    slash aside): anything else is a mix-up and a ProtocolError.
    """
    tried = []
    for url in _discovery_urls(issuer):
        response = http.get(url, "discovery")
        _check_redirect(response, "discovery (%s)" % url)
        if response.status in (404, 405, 410) or (400 <= response.status < 500 and response.status != 429
                                                  and response.status not in (401, 403)):
            tried.append("%s (HTTP %d)" % (url, response.status))
            continue
        if response.status != 200:
            _raise_http_status(response, "discovery (%s)" % url)
        metadata = _json_document(response, "discovery (%s)" % url)
        reported = metadata.get("issuer")
        if not isinstance(reported, str):
            raise ProtocolError("discovery (%s): the document has no issuer string" % url)
        if not _same_issuer(issuer, reported):
            raise ProtocolError("issuer mix-up: the server at %s calls itself %s, not %s; if that is the "
                                "issuer you mean, pass --issuer %s" % (_origin(url), _sanitize(reported),
                                                                       _sanitize(issuer), _sanitize(reported)))
        for field in _ENDPOINT_FIELDS:
            if field in metadata:
                _parse_url(metadata[field], "%s in the metadata" % field)
        return metadata
    raise ProtocolError("no discovery document at %s" % " or ".join(_sanitize(t) for t in tried))


def _raise_http_status(response, what):
    """Turn an unexpected HTTP status into the right error."""
    _check_redirect(response, what)
    if response.status >= 500:
        raise NetworkError("%s: HTTP %d %s" % (what, response.status, _sanitize(response.reason, 80)))
    if response.status == 429:
        raise NetworkError("%s: HTTP 429 rate limited" % what)
    raise ProtocolError("%s: unexpected HTTP %d %s" % (what, response.status, _sanitize(response.reason, 80)))


# ============================================================================
# Device flow: authorization request (RFC 8628 §3.1-3.2), prompt, polling
# ============================================================================

class DeviceAuthorization:
    """The checked answer of the device authorization endpoint (RFC 8628 §3.2)."""

    def __init__(self, device_code, user_code, verification_uri, verification_uri_complete,
                 expires_in, interval, received_at):
        self.device_code = device_code
        self.user_code = user_code
        self.verification_uri = verification_uri
        self.verification_uri_complete = verification_uri_complete
        self.expires_in = expires_in
        self.interval = interval
        self.received_at = received_at


def _number_field(document, name, default, what, terminal):
    """A non-negative number field; numeric strings are accepted (old Azure AD)."""
    value = document.get(name)
    if value is None:
        return default
    if isinstance(value, str) and _is_ascii_digits(value.strip(), 11):
        terminal.warn("%s: %s is a string; using it as a number" % (what, name))
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("%s: %s must be a number, got %s" % (what, name, _json_type(value)))
    return value


def _string_field(document, name, what, limit, required=True):
    value = document.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError("%s: %s must be a non-empty string, got %s"
                            % (what, name, "nothing" if value is None else _json_type(value)))
    if len(value) > limit:
        raise ProtocolError("%s: %s is longer than %d characters" % (what, name, limit))
    return value


def parse_device_authorization(document, received_at, terminal=None):
    """Check a device authorization response field by field (RFC 8628 §3.2).

    `verification_url` (Google) is accepted for `verification_uri`. `interval`
    defaults to 5 s, is raised to 1 s when lower and capped at 60 s; a
    missing `expires_in` means 600 s and a longer one is capped at 1800 s.
    """
    terminal = terminal or _Terminal(quiet=True)
    what = "device authorization"
    device_code = _string_field(document, "device_code", what, 4096)
    user_code = _string_field(document, "user_code", what, 64)
    if _sanitize(user_code) != user_code or user_code.strip() != user_code:
        raise ProtocolError("%s: user_code contains control or invisible characters: %s"
                            % (what, _sanitize(user_code)))
    name = "verification_url" if "verification_uri" not in document and "verification_url" in document \
        else "verification_uri"
    verification_uri = _string_field(document, name, what, 2048)
    _check_shown_url(verification_uri, name, what, terminal, required=True)
    complete = _string_field(document, "verification_uri_complete", what, 2048, required=False)
    if complete is not None and not _check_shown_url(complete, "verification_uri_complete", what, terminal):
        complete = None
    expires_in = _number_field(document, "expires_in", DEFAULT_EXPIRES_IN, what, terminal)
    if expires_in <= 0:
        raise ProtocolError("%s: expires_in must be positive, got %s" % (what, expires_in))
    if expires_in > MAX_EXPIRES_IN:
        terminal.warn("%s: expires_in %s s is longer than %d s; waiting %d s at most"
                      % (what, _sanitize(expires_in, 30), MAX_EXPIRES_IN, MAX_EXPIRES_IN))
        expires_in = MAX_EXPIRES_IN
    interval = _number_field(document, "interval", DEFAULT_INTERVAL, what, terminal)
    if interval < MIN_INTERVAL:
        interval = MIN_INTERVAL
    elif interval > MAX_INTERVAL:
        terminal.warn("%s: interval %s s is longer than %d s; polling every %d s"
                      % (what, _sanitize(interval, 30), MAX_INTERVAL, MAX_INTERVAL))
        interval = MAX_INTERVAL
    return DeviceAuthorization(device_code, user_code, verification_uri, complete,
                               float(expires_in), float(interval), received_at)


def _check_shown_url(url, name, what, terminal, required=False):
    """A URL the person is asked to open: https, or http with a warning.

    Returns False when an optional one must be dropped.
    """
    from urllib.parse import urlsplit
    problem = None
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("https", "http") or not parts.hostname:
            problem = "is not an http(s) URL"
    except ValueError:
        problem = "is not a valid URL"
    if problem is None and _sanitize(url, 4096) != url:
        problem = "contains control or invisible characters"
    if problem is None and any(ch.isspace() for ch in url):
        problem = "contains white space"
    if problem:
        if required:
            raise ProtocolError("%s: %s %s: %s" % (what, name, problem, _sanitize(url)))
        terminal.warn("%s: ignoring %s, which %s" % (what, name, problem))
        return False
    if parts.scheme.lower() != "https" and not _is_loopback_host(parts.hostname):
        terminal.warn("%s: %s is not https; check the address before you sign in" % (what, name))
    return True


def request_device_authorization(http, endpoint, client_id, scope, extra=None, clock=None):
    """POST the device authorization request and return a DeviceAuthorization."""
    clock = clock or _monotonic
    form = [("client_id", client_id)]
    if scope:
        form.append(("scope", scope))
    form.extend(extra or ())
    what = "device authorization"
    response = _post_with_retries(http, endpoint, what, form)
    received_at = clock()
    if response.status != 200:
        unknown = "check --client-id (or VOUCH_CLIENT_ID): the issuer does not take client id %s" % _sanitize(client_id)
        _raise_for_error_answer(response, what, {"invalid_client": unknown, "unauthorized_client": unknown})
    return parse_device_authorization(_json_document(response, what), received_at, http.terminal)


def _post_with_retries(http, url, what, form, attempts=4, headers=None, retryable=None, idempotent=True):
    """POST, retrying 5xx, 429 and network failures a few times with backoff.

    retryable(response), when given, names more answers to retry (STS
    throttles with HTTP 400); idempotent as for _HttpClient.request.
    """
    import time
    last = None
    for attempt in range(attempts):
        if attempt:
            delay = _backoff_delay(attempt)
            if last is not None and last.status == 429:
                delay = max(delay, min(_retry_after(last.header("retry-after"), time.time()) or 0, BACKOFF_MAX))
            http.terminal.debug("retrying in %.1f s" % delay)
            _sleep(delay)
        try:
            last = http.post(url, what, form, headers=headers, idempotent=idempotent)
        except _TimeLimitError:
            raise
        except NetworkError:
            if attempt == attempts - 1:
                raise
            last = None
            continue
        if last.status < 500 and last.status != 429 and not (retryable and retryable(last)):
            return last
    return last


# Polls in a row that reach no server before the live line says so: one can be a blip.
_UNREACHABLE_AFTER = 3


def _unreachable_text(url, what, exc):
    """"host:port (reason)" of a failed request, short enough for a live line."""
    origin = _origin(url)
    reason = str(exc)
    for prefix in (what + ": ", origin + ": ", origin + " "):
        if reason.startswith(prefix):
            reason = reason[len(prefix):]
    return "%s (%s)" % (origin.split("://", 1)[-1], reason)


def _backoff_delay(failures, rng=None):
    """Exponential backoff with full jitter (half to all of the step)."""
    import random
    step = min(BACKOFF_MAX, BACKOFF_BASE * (2 ** min(failures, 16)))
    return step * (0.5 + 0.5 * (rng or random).random())


def _raise_for_error_answer(response, what, advice=None):
    """Raise the right error for a non-200 answer of an OAuth endpoint.

    `advice` maps an OAuth error code to what the person can do about it.
    """
    document = _error_document(response, what)
    error = _oauth_error(document) if isinstance(document, dict) else None
    if error is None:
        raise ProtocolError("%s: HTTP %d %s without an OAuth error"
                            % (what, response.status, _sanitize(response.reason, 80)))
    if error[0] == "access_denied":
        raise AccessDeniedError("%s: the request was denied (%s)" % (what, _describe_oauth_error(*error)))
    hint = (advice or {}).get(error[0])
    raise ProtocolError("%s: the server refused: %s%s" % (what, _describe_oauth_error(*error),
                                                          "; " + hint if hint else ""))


def _error_document(response, what):
    """The JSON of a refusal, or None; a redirect, a 5xx and a 429 are raised as what they are."""
    _check_redirect(response, what)
    if response.status >= 500 or response.status == 429:
        _raise_http_status(response, what)
    try:
        return _loads_json(response.body)
    except ValueError:
        return None


def _format_duration(seconds):
    """A duration as people say it, in its two largest units: 45 s, 9 min 57 s, 7 h 59 min, 2 d 3 h."""
    seconds = max(0, int(seconds + 0.5))
    # Rounded to the smaller unit shown: 28799 s is 8 h, not 7 h 59 min.
    if seconds >= 3600:
        seconds = (seconds + 30) // 60 * 60
    if seconds >= 86400:
        seconds = (seconds + 1800) // 3600 * 3600
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, rest = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "min"), (rest, "s")]
    first = next((i for i, (value, _unit) in enumerate(units) if value), 3)
    parts = ["%d %s" % units[first]]
    if first < 3 and units[first + 1][0]:
        parts.append("%d %s" % units[first + 1])
    return " ".join(parts)


def show_prompt(device, terminal, presenters=(), bold=False, picture=None):
    """Tell the person where to go and which code to enter, on stderr.

    `picture`, a callable taking (device, terminal, lines), draws the QR code
    before the text `lines`, so that the URL and the code, written last, stay
    in view. `presenters` are callables taking (device, terminal), run after
    the text: the seam where browsers and clipboards plug in.
    """
    code = _sanitize(device.user_code, 64)
    lines = [
        "To sign in, open:  %s" % _sanitize(device.verification_uri, 2048),
        "and enter the code:  %s   (%s)" % ("\x1b[1m%s\x1b[0m" % code if bold else code, _spoken(code)),
    ]
    if device.verification_uri_complete:
        lines.append("or open directly:  %s" % _sanitize(device.verification_uri_complete, 2048))
    lines.append("The code expires in %s." % _format_duration(device.expires_in))
    if picture is not None:
        _present(picture, device, terminal, lines)
    elif not terminal.quiet:
        # A blank line sets the prompt apart; -q adds nothing of its own.
        lines.insert(0, "")
    terminal.write("\n".join(lines) + "\n")
    for presenter in presenters:
        _present(presenter, device, terminal)


def _present(presenter, device, terminal, *lines):
    """Run one prompt extra: the text prompt is enough to sign in, so no failure of an extra ends the flow."""
    try:
        presenter(device, terminal, *lines)
    except Exception as exc:  # noqa: BLE001 - a QR code, colour, clipboard or browser is never worth a sign-in
        extra = getattr(presenter, "__qualname__", "").split(".")[0].strip("_").replace("_presenter", "")
        terminal.info("the %s extra failed (%s: %s); the link and the code work without it"
                      % (extra or "prompt", type(exc).__name__, exc))


def poll_for_token(http, token_endpoint, client_id, device, clock=None, sleep=None, rng=None, dpop=None,
                   report=None):
    """Poll the token endpoint until the person approves (RFC 8628 §3.4-3.5).

    Returns the token response as a dict. The first poll waits `interval`;
    no poll follows the previous answer sooner than `interval`; slow_down
    adds 5 s for every later poll; 429 honours Retry-After; 5xx answers,
    timeouts and connection errors back off exponentially while the code is
    alive. Raises _DeviceCodeExpired when the code dies (expired_token or
    the deadline), AccessDeniedError, ProtocolError or NetworkError. With
    `dpop` (a _DPoP) every poll carries a proof; a use_dpop_nonce answer is
    retried at once inside the same poll, so it neither counts as one nor
    moves the next. `report`, when given, hears "origin (reason)" once
    _UNREACHABLE_AFTER polls in a row found no server, and None when one
    answers again.
    """
    import time
    clock = clock or _monotonic
    sleep = sleep or _sleep
    terminal = http.terminal
    what = "token request"
    form = [("grant_type", DEVICE_CODE_GRANT), ("device_code", device.device_code), ("client_id", client_id)]
    interval = device.interval
    deadline = device.received_at + device.expires_in
    next_poll = device.received_at + interval
    failures = unreachable = 0
    last_failure = None
    while True:
        if next_poll >= deadline:
            remaining = deadline - clock()
            if remaining > 0:
                sleep(remaining)
            if last_failure is not None:
                raise last_failure
            raise _DeviceCodeExpired()
        wait = next_poll - clock()
        if wait > 0:
            sleep(wait)
        if clock() >= deadline:
            # A sleep that overran (a suspended laptop) must not start a poll
            # with a dead code: no poll starts after the deadline.
            next_poll = deadline
            continue
        try:
            if dpop is None:
                response = http.post(token_endpoint, what, form)
            else:
                response = dpop.request(http, "POST", token_endpoint, what, form)
        except NetworkError as exc:
            failures += 1
            unreachable += 1
            last_failure = exc
            delay = max(interval, _backoff_delay(failures, rng))
            terminal.debug("poll failed (%s); next poll in %.1f s" % (exc, delay))
            if report is not None and unreachable >= _UNREACHABLE_AFTER:
                report(_unreachable_text(token_endpoint, what, exc))
            next_poll = clock() + delay
            continue
        if unreachable >= _UNREACHABLE_AFTER and report is not None:
            report(None)
        unreachable = 0
        arrived = clock()
        status = response.status
        if status == 200:
            return _json_document(response, what)
        if status == 429:
            asked = _retry_after(response.header("retry-after"), time.time())
            if asked is None:
                # No hint from the server: back off as for a server error.
                failures += 1
                delay = max(interval, _backoff_delay(failures, rng))
            else:
                delay = max(interval, min(asked, deadline - arrived))
            terminal.debug("rate limited; next poll in %.1f s" % delay)
            next_poll = arrived + delay
            continue
        if status >= 500:
            failures += 1
            last_failure = NetworkError("%s: HTTP %d %s" % (what, status, _sanitize(response.reason, 80)))
            delay = max(interval, _backoff_delay(failures, rng))
            terminal.debug("server error %d; next poll in %.1f s" % (status, delay))
            next_poll = arrived + delay
            continue
        failures = 0
        last_failure = None
        _check_redirect(response, what)
        document = _json_document(response, what)
        error = _oauth_error(document)
        if error is None:
            raise ProtocolError("%s: HTTP %d without an OAuth error" % (what, status))
        code = error[0]
        if code == "authorization_pending":
            next_poll = arrived + interval
        elif code == "slow_down":
            interval += 5
            terminal.debug("slow_down: polling every %g s from now on" % interval)
            next_poll = arrived + interval
        elif code == "expired_token":
            raise _DeviceCodeExpired()
        elif code == "access_denied":
            raise AccessDeniedError("the sign-in was denied (%s)" % _describe_oauth_error(*error))
        else:
            raise ProtocolError("%s: the server refused: %s" % (what, _describe_oauth_error(*error)))


# ============================================================================
# QR code (ISO/IEC 18004:2015): byte mode, level M (L for long URLs), 8 masks
# ============================================================================
#
# Shows verification_uri_complete as a code a phone can scan (RFC 8628
# §3.3.1). Level M; level L only when M would need a symbol wider than an
# 80-column terminal (version > _QR_M_MAX_VERSION) and L fits in a smaller
# version, or when M does not fit at all: a code on a screen suffers no print
# damage, and a code that wraps cannot be scanned at any level.

# Largest version drawn at level M: 17 + 4 * 13 + 2 * 4 quiet = 77 columns.
_QR_M_MAX_VERSION = 13

# ISO/IEC 18004:2015 §7.9.1 Table 12 error correction level indicators
_QR_LEVEL_BITS = {'L': 1, 'M': 0, 'Q': 3, 'H': 2}

# ISO/IEC 18004:2015 §7.5 Table 9 error correction codewords per block,
# indexed by version - 1
_QR_EC_PER_BLOCK = {
    'L': (7, 10, 15, 20, 26, 18, 20, 24, 30, 18, 20, 24, 26, 30, 22, 24, 28,
          30, 28, 28, 28, 28, 30, 30, 26, 28, 30, 30, 30, 30, 30, 30, 30, 30,
          30, 30, 30, 30, 30, 30),
    'M': (10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28,
          26, 26, 26, 26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28,
          28, 28, 28, 28, 28, 28),
    'Q': (13, 22, 18, 26, 18, 24, 18, 22, 20, 24, 28, 26, 24, 20, 30, 24, 28,
          28, 26, 30, 28, 30, 30, 30, 30, 28, 30, 30, 30, 30, 30, 30, 30, 30,
          30, 30, 30, 30, 30, 30),
    'H': (17, 28, 22, 16, 22, 28, 26, 26, 24, 28, 24, 28, 22, 24, 24, 30, 28,
          28, 26, 28, 30, 24, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30,
          30, 30, 30, 30, 30, 30),
}

# ISO/IEC 18004:2015 §7.5 Table 9 number of error correction blocks,
# indexed by version - 1
_QR_BLOCKS = {
    'L': (1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8, 8, 9, 9,
          10, 12, 12, 12, 13, 14, 15, 16, 17, 18, 19, 19, 20, 21, 22, 24, 25),
    'M': (1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17,
          17, 18, 20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45,
          47, 49),
    'Q': (1, 1, 2, 2, 4, 4, 6, 6, 8, 8, 8, 10, 12, 16, 12, 17, 16, 18, 21, 20,
          23, 23, 25, 27, 29, 34, 34, 35, 38, 40, 43, 45, 48, 51, 53, 56, 59,
          62, 65, 68),
    'H': (1, 1, 2, 4, 4, 4, 5, 6, 8, 8, 11, 11, 16, 16, 18, 16, 19, 21, 25, 25,
          25, 34, 30, 32, 35, 37, 40, 42, 45, 48, 51, 54, 57, 60, 63, 66, 70,
          74, 77, 81),
}

# ISO/IEC 18004:2015 §7.8.2 Table 10 data mask conditions (i = row, j = column)
_QR_MASKS = (
    lambda i, j: (i + j) % 2 == 0,
    lambda i, j: i % 2 == 0,
    lambda i, j: j % 3 == 0,
    lambda i, j: (i + j) % 3 == 0,
    lambda i, j: (i // 2 + j // 3) % 2 == 0,
    lambda i, j: (i * j) % 2 + (i * j) % 3 == 0,
    lambda i, j: ((i * j) % 2 + (i * j) % 3) % 2 == 0,
    lambda i, j: ((i + j) % 2 + (i * j) % 3) % 2 == 0,
)

# Filled on first use so that importing the program stays cheap.
_QR_GF_CACHE = []


def _qr_gf():
    # ISO/IEC 18004:2015 §7.5.2 GF(2^8) with prime polynomial 0x11D
    if not _QR_GF_CACHE:
        exp = bytearray(512)
        log = bytearray(256)
        x = 1
        for i in range(255):
            exp[i] = x
            log[x] = i
            x <<= 1
            if x & 0x100:
                x ^= 0x11D
        exp[255:510] = exp[:255]
        _QR_GF_CACHE.append((exp, log))
    return _QR_GF_CACHE[0]


def _qr_rs(data, ec_len):
    """Reed-Solomon error correction codewords for one block."""
    exp, log = _qr_gf()
    # ISO/IEC 18004:2015 Annex A generator polynomial prod(x - a^i), i < ec_len
    gen = [1]
    for i in range(ec_len):
        nxt = gen + [0]
        for k, coef in enumerate(gen):
            if coef:
                nxt[k + 1] ^= exp[log[coef] + i]
        gen = nxt
    terms = [(k, log[c]) for k, c in enumerate(gen[1:]) if c]
    # ISO/IEC 18004:2015 §7.5.2 remainder of data(x) * x^ec_len / gen(x)
    rem = bytearray(ec_len)
    for byte in data:
        factor = byte ^ rem[0]
        del rem[0]
        rem.append(0)
        if factor:
            lf = log[factor]
            for k, lc in terms:
                rem[k] ^= exp[lf + lc]
    return bytes(rem)


def _qr_raw_codewords(version):
    # ISO/IEC 18004:2015 Table 1: modules left for data and EC, in bits
    bits = (16 * version + 128) * version + 64
    if version >= 2:
        align = version // 7 + 2
        bits -= (25 * align - 10) * align - 55
        if version >= 7:
            bits -= 36
    return bits // 8


def _qr_data_codewords(version, level):
    ec = _QR_EC_PER_BLOCK[level][version - 1] * _QR_BLOCKS[level][version - 1]
    return _qr_raw_codewords(version) - ec


def _qr_fits(length, version, level):
    # ISO/IEC 18004:2015 §7.4.5 byte mode: 4-bit mode, 8/16-bit count, data
    count_bits = 8 if version < 10 else 16
    needed = 4 + count_bits + 8 * length
    return needed <= 8 * _qr_data_codewords(version, level)


def _qr_smallest_version(length, level, version):
    for ver in ((version,) if version else range(1, 41)):
        if _qr_fits(length, ver, level):
            return ver
    return None


def _qr_choose(length, level, version):
    """Return (version, level) for `length` bytes under the M/L policy."""
    if level is not None:
        chosen = _qr_smallest_version(length, level, version)
    else:
        chosen = _qr_smallest_version(length, 'M', version)
        level = 'M'
        if chosen is None or chosen > _QR_M_MAX_VERSION:
            low = _qr_smallest_version(length, 'L', version)
            if low is not None and (chosen is None or low < chosen):
                chosen, level = low, 'L'
    if chosen is None:
        where = f'version {version}' if version else 'a QR code'
        raise ValueError(
            f'{length} bytes do not fit in {where} at level {level}')
    return chosen, level


def _qr_codewords(data, version, level):
    """Final interleaved message codewords (data then error correction)."""
    data_len = _qr_data_codewords(version, level)
    # ISO/IEC 18004:2015 §7.4.5 byte mode indicator 0100, count, then bytes
    count_bits = 8 if version < 10 else 16
    nbits = 4 + count_bits + 8 * len(data)
    value = ((4 << count_bits | len(data)) << 8 * len(data)
             | int.from_bytes(data, 'big'))
    # ISO/IEC 18004:2015 §7.4.9 terminator, then §7.4.10 zero bits to a byte
    pad = min(4, 8 * data_len - nbits)
    pad += -(nbits + pad) % 8
    nbits += pad
    stream = bytearray((value << pad).to_bytes(nbits // 8, 'big'))
    # ISO/IEC 18004:2015 §7.4.10 alternating pad codewords
    fill = data_len - len(stream)
    stream += (b'\xec\x11' * (fill // 2 + 1))[:fill]
    # ISO/IEC 18004:2015 §7.6 split into blocks, shorter blocks first
    nblocks = _QR_BLOCKS[level][version - 1]
    ec_len = _QR_EC_PER_BLOCK[level][version - 1]
    short_len = data_len // nblocks
    nlong = data_len % nblocks
    blocks, start = [], 0
    for b in range(nblocks):
        size = short_len + (b >= nblocks - nlong)
        blocks.append(bytes(stream[start:start + size]))
        start += size
    ecs = [_qr_rs(block, ec_len) for block in blocks]
    out = bytearray()
    for i in range(short_len + 1):
        out.extend(block[i] for block in blocks if i < len(block))
    for i in range(ec_len):
        out.extend(ec[i] for ec in ecs)
    return out


def _qr_alignment_positions(version):
    # ISO/IEC 18004:2015 Annex E: evenly spaced from row/column 6 to size - 7
    if version == 1:
        return []
    count = version // 7 + 2
    step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2
    size = 17 + 4 * version
    return [6] + [size - 7 - i * step for i in range(count - 2, -1, -1)]


def _qr_format_bits(level, mask):
    # ISO/IEC 18004:2015 §7.9.1 and Annex C: BCH(15,5), generator 0x537
    data = _QR_LEVEL_BITS[level] << 3 | mask
    rem = data
    for _ in range(10):
        rem = rem << 1 ^ (rem >> 9) * 0x537
    return (data << 10 | rem) ^ 0x5412


def _qr_version_bits(version):
    # ISO/IEC 18004:2015 §7.10 and Annex D: BCH(18,6), generator 0x1F25
    rem = version
    for _ in range(12):
        rem = rem << 1 ^ (rem >> 11) * 0x1F25
    return version << 12 | rem


def _qr_format_positions(size):
    """(row, column) of format bit 0..14, for each of its two copies."""
    # ISO/IEC 18004:2015 §7.9.1 format information placement
    first = [(i, 8) for i in range(6)] + [(7, 8), (8, 8), (8, 7)]
    first += [(8, 14 - i) for i in range(9, 15)]
    second = [(8, size - 1 - i) for i in range(8)]
    second += [(size - 15 + i, 8) for i in range(8, 15)]
    return first + second


def _qr_penalty(rows, size):
    """Total penalty of a masked symbol given as row bitmasks."""
    import re
    # ISO/IEC 18004:2015 §7.8.3.1 Table 11; string and integer operations
    # keep the per-module work in C.
    lines = [f'{r:0{size}b}' for r in rows]
    lines += [''.join(col) for col in zip(*lines)]
    # N1: runs of five or more same-colour modules cost 3 + (run - 5)
    runs = re.findall('0{5,}|1{5,}', '2'.join(lines))
    score = sum(map(len, runs)) - 2 * len(runs)
    # N2: each 2x2 same-colour block costs 3; clear bits mark a block
    low = (1 << size - 1) - 1
    broken = 0
    prev = rows[0]
    prev_h = prev ^ prev >> 1
    for cur in rows[1:]:
        cur_h = cur ^ cur >> 1
        unequal = ((prev ^ cur) | prev_h | cur_h) & low
        # int.bit_count() needs Python 3.10
        broken += bin(unequal).count('1')
        prev, prev_h = cur, cur_h
    score += 3 * ((size - 1) * (size - 1) - broken)
    # N3: 1:1:3:1:1 with 4 light modules on either side costs 40; the
    # "0000" separators make the area outside the symbol count as light.
    text = '0000'.join([''] + lines + [''])
    both = len(re.findall('(?=000010111010000)', text))
    score += 40 * (text.count('00001011101') + text.count('10111010000')
                   - both)
    # N4: 10 per full 5 % step of dark modules away from 50 %
    dark = sum(line.count('1') for line in lines[:size])
    total = size * size
    score += 10 * (abs(20 * dark - 10 * total) // total)
    return score


def _qr_encode(data, level=None, mask=None, version=None):
    """Encode `data` in byte mode.

    Returns (matrix, version, level, mask); matrix is a list of rows of
    bools, True for dark, without quiet zone.  `level` ('L', 'M', 'Q' or
    'H'), `mask` (0-7) and `version` (1-40) override the automatic choices.
    """
    if isinstance(data, str):
        data = data.encode('utf-8')
    if level is not None and level not in _QR_LEVEL_BITS:
        raise ValueError(f'invalid QR error correction level {level!r}')
    if mask is not None and mask not in range(8):
        raise ValueError(f'invalid QR mask {mask!r}')
    if version is not None and version not in range(1, 41):
        raise ValueError(f'invalid QR version {version!r}')
    version, level = _qr_choose(len(data), level, version)
    size = 17 + 4 * version
    dark = [bytearray(size) for _ in range(size)]
    func = [bytearray(size) for _ in range(size)]

    def put(r, c, value):
        dark[r][c] = value
        func[r][c] = 1

    # ISO/IEC 18004:2015 §6.3.5 timing patterns
    for i in range(size):
        put(6, i, i % 2 == 0)
        put(i, 6, i % 2 == 0)
    # ISO/IEC 18004:2015 §6.3.3 finder patterns with §6.3.4 separators
    for top, left in ((0, 0), (0, size - 7), (size - 7, 0)):
        for dr in range(-1, 8):
            for dc in range(-1, 8):
                r, c = top + dr, left + dc
                if 0 <= r < size and 0 <= c < size:
                    ring = max(abs(dr - 3), abs(dc - 3))
                    put(r, c, ring != 2 and ring != 4)
    # ISO/IEC 18004:2015 §6.3.6 alignment patterns, skipping the finders
    centres = _qr_alignment_positions(version)
    last = size - 7
    for r in centres:
        for c in centres:
            if (r, c) in ((6, 6), (6, last), (last, 6)):
                continue
            for dr in range(-2, 3):
                for dc in range(-2, 3):
                    put(r + dr, c + dc, max(abs(dr), abs(dc)) != 1)
    # ISO/IEC 18004:2015 §7.9.1 format areas are reserved before placement
    fmt_positions = _qr_format_positions(size)
    for r, c in fmt_positions:
        put(r, c, 0)
    # ISO/IEC 18004:2015 §7.9.1 the dark module beside the lower finder
    put(size - 8, 8, 1)
    # ISO/IEC 18004:2015 §7.10 version information, versions 7 and up
    if version >= 7:
        bits = _qr_version_bits(version)
        for i in range(18):
            a, b = size - 11 + i % 3, i // 3
            put(b, a, bits >> i & 1)
            put(a, b, bits >> i & 1)
    # ISO/IEC 18004:2015 §7.7.3 two-module columns zigzag from bottom right;
    # modules left over are the §7.6 remainder bits, zero before masking.
    codewords = _qr_codewords(data, version, level)
    nbits = 8 * len(codewords)
    pos = 0
    for right in range(size - 1, 0, -2):
        if right <= 6:
            right -= 1
        upward = (right + 1) & 2 == 0
        for vert in range(size):
            r = size - 1 - vert if upward else vert
            row, frow = dark[r], func[r]
            for c in (right, right - 1):
                if not frow[c] and pos < nbits:
                    row[c] = codewords[pos >> 3] >> (7 - (pos & 7)) & 1
                    pos += 1
    # ISO/IEC 18004:2015 §7.8 masking, on row bitmasks (column 0 = MSB)
    to_bits = bytes.maketrans(b'\x00\x01', b'01')
    to_free = bytes.maketrans(b'\x00\x01', b'10')
    base = [int(row.translate(to_bits), 2) for row in dark]
    free = [int(row.translate(to_free), 2) for row in func]
    reps = size // 6 + 1

    def masked(m):
        # Mask conditions repeat every 12 rows and every 6 columns.
        cond = _QR_MASKS[m]
        period = [int((''.join('1' if cond(i, j) else '0' for j in range(6))
                       * reps)[:size], 2) for i in range(12)]
        fmt = _qr_format_bits(level, m)
        rows = [b ^ (period[i % 12] & f)
                for i, (b, f) in enumerate(zip(base, free))]
        for k, (r, c) in enumerate(fmt_positions):
            if fmt >> (k % 15) & 1:
                rows[r] |= 1 << (size - 1 - c)
        return rows

    if mask is None:
        # ISO/IEC 18004:2015 §7.8.3.1 scores "the complete symbol", format
        # information included (segno and python-qrcode leave it out and
        # may pick another mask); ties keep the lower mask.
        scores = [(_qr_penalty(masked(m), size), m) for m in range(8)]
        mask = min(scores)[1]
    matrix = [[bit == '1' for bit in f'{r:0{size}b}']
              for r in masked(mask)]
    return matrix, version, level, mask


def _qr_matrix(data, level=None, mask=None, version=None):
    """Module matrix (rows of bools, True = dark) of `data`, see _qr_encode."""
    return _qr_encode(data, level, mask, version)[0]


def _qr_render(matrix, unicode=True, quiet=4, invert=False):
    """Draw `matrix` as terminal text with a quiet zone of `quiet` modules.

    Without colour escapes the renderer cannot know the terminal's colours,
    so it draws "ink" (block characters) for the LIGHT modules and the quiet
    zone and leaves dark modules as blank background.  On the usual dark
    terminal theme (and in CI log viewers) that is a correct dark-on-light
    code; on a light theme it shows as a reflectance-reversed code, which
    most readers also accept.  invert=True inks the dark modules instead,
    which is correct on light themes.  Colour escapes would fix both themes
    but garble logs and NO_COLOR output, hence plain characters.

    unicode=True packs two module rows per text line with the half blocks
    U+2580/U+2584/U+2588; unicode=False draws each module as "##" or two
    spaces, one text line per module row, for terminals limited to ASCII.
    """
    # ISO/IEC 18004:2015 §6.3.8 quiet zone of 4 modules; 2 still reads
    quiet = max(2, int(quiet))
    width = len(matrix) + 2 * quiet
    margin = [not invert] * quiet
    ink = [[not invert] * width for _ in range(quiet)]
    ink += [margin + [d == invert for d in row] + margin for row in matrix]
    ink += [[not invert] * width for _ in range(quiet)]
    if not unicode:
        return ''.join(''.join('##' if x else '  ' for x in row).rstrip()
                       + '\n' for row in ink)
    if len(ink) % 2:
        ink.append([False] * width)
    lines = []
    for top, bottom in zip(ink[::2], ink[1::2]):
        line = ''.join(' \u2580\u2584\u2588'[t + 2 * b]
                       for t, b in zip(top, bottom))
        lines.append(line.rstrip() + '\n')
    return ''.join(lines)


# ============================================================================
# Prompt extras: QR code, browser, clipboard (OSC 52), live countdown
# ============================================================================

def _live_allowed(terminal, environ):
    """Cursor control (the live countdown) only on a terminal that is not TERM=dumb."""
    return terminal.isatty() and environ.get("TERM") != "dumb"


def _color_allowed(terminal, environ):
    """Colour where cursor control is allowed, unless NO_COLOR is set and not empty (no-color.org: colour only)."""
    return _live_allowed(terminal, environ) and not environ.get("NO_COLOR")


def _can_encode(stream, text):
    import codecs
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        codecs.lookup(encoding)
        text.encode(encoding)
        return True
    except (LookupError, UnicodeError):
        return False


# Tried in this order until one fits: the full quiet zone first, then the
# lower error correction level (a code on a screen suffers no print damage),
# then the 2-module quiet zone readers still accept.
_QR_FITTINGS = (("M", 4), ("L", 4), ("M", 2), ("L", 2))


def _qr_fitting(data, unicode, columns, rows):
    """(matrix, quiet, fits): the first QR code of data within columns x rows (rows None: any height), else
    the smallest one."""
    smallest = None
    for level, quiet in _QR_FITTINGS:
        matrix = _qr_matrix(data, level)
        width, height = _qr_extent(matrix, quiet, unicode)
        if width <= columns and (rows is None or height <= rows):
            return matrix, quiet, True
        if smallest is None or width * height < smallest[2]:
            smallest = (matrix, quiet, width * height)
    return smallest[0], smallest[1], False


def _qr_extent(matrix, quiet, unicode):
    """(columns, rows) the drawn code takes: half blocks put two modules in a cell, ASCII two cells in a module."""
    side = len(matrix) + 2 * quiet
    return (side, (side + 1) // 2) if unicode else (2 * side, side)


def _rows_taken(lines, columns):
    """How many terminal rows these lines fill once wrapped at columns."""
    return sum(max(1, -(-len(_sanitize(line, 4096)) // columns)) for line in lines)


def _qr_presenter(environ):
    """Draw verification_uri_complete (else verification_uri) as a QR code sized to fit.

    On a terminal the code, the text lines after it, the live line and the
    command line that started the tool must fit the screen together; in a log
    it must fit 80 columns. A code that does not fit is not drawn (a cut-off
    code cannot be scanned): one line says what it needs instead.
    """

    def present(device, terminal, lines):
        url = device.verification_uri_complete or device.verification_uri
        unicode = _can_encode(terminal.output(), "\u2580\u2584\u2588")
        tty = terminal.isatty()
        columns, rows = terminal.size() if tty else (80, None)
        below = _rows_taken(lines, columns) + 2
        try:
            matrix, quiet, fits = _qr_fitting(url.encode("utf-8"), unicode, columns, rows and rows - below)
        except ValueError as exc:
            terminal.write("No QR code: %s.\n" % exc)
            return
        # A log has no width to keep to: one wider than 80 columns is still drawn, the smallest there is.
        if not fits and tty:
            width, height = _qr_extent(matrix, quiet, unicode)
            need, have = "%dx%d" % (width, height + below), "%dx%s" % (columns, rows or "?")
            terminal.write(_fitted((
                "No QR code: with the text below it, it needs a terminal of %s and this one is %s; "
                "enlarge it, or use the link." % (need, have),
                "No QR code: it needs %s; this terminal is %s." % (need, have),
                "No QR code: needs %s." % need), columns) + "\n")
            return
        text = _qr_render(matrix, unicode=unicode, quiet=quiet)
        if _color_allowed(terminal, environ):
            # Light modules in bright white on black: right on dark and light themes alike.
            width = _qr_extent(matrix, quiet, unicode)[0]
            text = "".join("\x1b[97;40m%s\x1b[0m\n" % line.ljust(width) for line in text.splitlines())
        terminal.write(text)
    return present


def _over_ssh(environ):
    return bool(environ.get("SSH_CONNECTION") or environ.get("SSH_TTY") or environ.get("SSH_CLIENT"))


def _browser_visible(environ, terminal, platform=None):
    """Whether a browser opened here would be seen by the person (SPEC §4)."""
    platform = platform or sys.platform
    if _over_ssh(environ):
        return False
    if not terminal.isatty():
        return False
    if platform.startswith("linux") or "bsd" in platform:
        return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))
    return True


def _browser_presenter(device, terminal):
    """Open the verification URL in a browser, on a thread: never block the poller."""
    import threading
    url = device.verification_uri_complete or device.verification_uri

    def open_browser():
        try:
            import webbrowser
            if not webbrowser.open(url, new=2):
                terminal.debug("no browser could be opened")
        except Exception as exc:  # noqa: BLE001 - any browser failure is only worth a debug line
            terminal.debug("opening a browser failed: %s" % exc)

    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.scheme != "https" and not _is_loopback_host(parts.hostname or ""):
        terminal.info("no browser opened: the sign-in URL is not https, so check it before you open it yourself")
        return
    thread = threading.Thread(target=open_browser, name="browser")
    thread.daemon = True
    thread.start()


def _copy_presenter(environ, platform=None):
    """Put the user code on the clipboard: pbcopy in a local macOS session, else OSC 52 (which also crosses SSH).

    Nothing can tell whether a terminal honoured OSC 52 (Terminal.app
    ignores it), so the message says what was done, not what happened.
    """
    platform = platform or sys.platform

    def present(device, terminal):
        import shutil
        pbcopy = shutil.which("pbcopy", path=environ.get("PATH")) \
            if platform == "darwin" and not _over_ssh(environ) else None
        if pbcopy:
            import subprocess
            try:
                subprocess.run([pbcopy], input=device.user_code.encode("utf-8"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=5, check=True)
                terminal.info("the code is on the clipboard")
                return
            except (OSError, subprocess.SubprocessError) as exc:
                terminal.debug("pbcopy failed: %s" % exc)
        if not terminal.isatty():
            return
        import base64
        payload = base64.b64encode(device.user_code.encode("utf-8")).decode("ascii")
        terminal.write("\x1b]52;c;%s\x07" % payload)
        terminal.info("the code was sent to the terminal's clipboard (OSC 52, which some terminals ignore)")
    return present


def _spoken(user_code):
    """The user code spaced out in groups, easy to read aloud."""
    groups = [" ".join(group) for group in user_code.split("-")]
    return "  -  ".join(groups)


class _Countdown:
    """Shows the time left while the poller waits.

    On a terminal one line is rewritten in place every second; elsewhere
    (a CI log) a plain line is written now and then.
    """

    PLAIN_EVERY = 60.0

    def __init__(self, terminal, deadline, live):
        self.terminal = terminal
        self.deadline = deadline
        self.live = live
        self.next_plain = _monotonic() + self.PLAIN_EVERY
        self.shown = False
        self.trouble = None

    def unreachable(self, trouble):
        """Say on the live line that polls reach no server ("origin (reason)"), or, with None, that they do again."""
        if trouble and not self.trouble and not self.live:
            self.terminal.info("cannot reach %s; still trying, %s left"
                               % (trouble, _format_duration(self.deadline - _monotonic())))
        self.trouble = trouble

    def sleep(self, seconds):
        """Sleep like time.sleep, updating the countdown meanwhile."""
        end = _monotonic() + seconds
        while True:
            now = _monotonic()
            self._show(now)
            left = end - now
            if left <= 0:
                return
            # Live: wake when the shown figure changes (it is rounded to the second).
            step = (self.deadline - now + 0.5) % 1.0 + 0.01 if self.live else self.next_plain - now
            _sleep(max(0.01, min(left, step)))

    def _show(self, now):
        left = _format_duration(self.deadline - now)
        if self.live:
            # The width is read on every update, so a resize takes effect at the next one.
            self.terminal.status(_countdown_text(left, self.terminal.size()[0], self.trouble))
            self.shown = True
        elif now >= self.next_plain:
            self.terminal.info("still waiting for approval; %s left" % left)
            self.next_plain = now + self.PLAIN_EVERY

    def finish(self):
        """Clear the countdown line before anything else is written."""
        if self.shown:
            self.terminal.status(None)
            self.shown = False


def _countdown_text(left, columns, trouble=None):
    """The live line for a terminal this wide: shorter wording when narrow, nothing when absurdly narrow.

    Always narrower than the terminal, so that it never wraps (only the last
    row of a wrapped line could be rewritten, the rest would pile up).
    With trouble, what polls cannot reach, that comes first.
    """
    wordings = ("Waiting for approval... %s left" % left, "%s left" % left, left)
    if trouble:
        wordings = ("cannot reach %s; still trying, %s left" % (_sanitize(trouble, 200), left),
                    "cannot reach the issuer; still trying, %s left" % left, "no connection; %s left" % left) + wordings
    for text in wordings:
        if len(text) < columns:
            return text
    return ""


def _fitted(wordings, columns):
    """The first wording narrower than the terminal, else the last one broken between words."""
    for text in wordings:
        if len(text) < columns:
            return text
    import textwrap
    return "\n".join(textwrap.wrap(wordings[-1], max(1, columns - 1), break_long_words=False))


# ============================================================================
# JOSE: compact JWS (RFC 7515) and JWT (RFC 7519) verification against a JWKS
# (RFC 7517), algorithms from RFC 7518 and RFC 8037, access-token typ from
# RFC 9068
# ============================================================================

def _jws_parts(token):
    """The three parts of a compact JWS, or None when the token has another shape."""
    if not isinstance(token, str):
        return None
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return None
    return parts


_MAX_TOKEN_LENGTH = 64 * 1024

# RSA key policy. The lower bound is NIST SP 800-131A's minimum. The upper
# bound is OpenSSL's OPENSSL_RSA_MAX_MODULUS_BITS: nobody deploys larger keys,
# and it bounds the cost of the modular exponentiation a published key buys.
_RSA_MIN_BITS = 2048
_RSA_MAX_BITS = 16384
# e = 65537 only: small exponents (e = 3) are what makes PKCS#1 v1.5 forgeries
# practical against lax verifiers, and e = 1 makes every signature "valid".
_RSA_EXPONENT = 65537

# RFC 7518 §3.1 algorithm names -> hash (and for ECDSA: curve, coordinate size).
_RSA_PKCS1_ALGS = {"RS256": "sha256", "RS384": "sha384", "RS512": "sha512"}
_RSA_PSS_ALGS = {"PS256": "sha256", "PS384": "sha384", "PS512": "sha512"}
_EC_ALGS = {
    "ES256": ("P-256", "sha256", 32),
    "ES384": ("P-384", "sha384", 48),
    "ES512": ("P-521", "sha512", 66),
}
# "EdDSA" (RFC 8037 §3.1) and its fully-specified name "Ed25519" (RFC 9864);
# with the key's crv pinned to Ed25519 both mean exactly the same algorithm.
_EDDSA_ALGS = frozenset(("EdDSA", "Ed25519"))
_ALGORITHMS = frozenset(_RSA_PKCS1_ALGS) | frozenset(_RSA_PSS_ALGS) | frozenset(_EC_ALGS) | _EDDSA_ALGS

# DER DigestInfo prefixes for EMSA-PKCS1-v1_5, RFC 8017 §9.2 Note 1. The
# expected block is rebuilt from these and compared whole; nothing is parsed.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

# Header parameters that change how the JWS must be processed. None of the
# extensions is supported, so their presence alone is a reason to reject.
_REJECTED_HEADERS = (
    ("crit", "crit header is not supported: no JWS extensions are understood (RFC 7515 §4.1.11)"),
    ("b64", "b64 header (RFC 7797 unencoded payload) is not supported"),
    ("zip", "zip header is not allowed in a JWS (compression is a JWE feature, RFC 7516 §4.1.3)"),
)

# verify_jwt(typ=NOT_AT_JWT): the header typ must NOT be at+jwt, which is how an
# ID token is kept from being accepted as an access token and back (RFC 9068 §4).
# A leading "!" negates any typ; it cannot begin a media type (RFC 6838 §4.2).
NOT_AT_JWT = "!at+jwt"


class _UnknownKidError(TokenVerificationError):
    """The token's kid is not in the JWKS; the caller may refetch it once (key rotation)."""


def _show(value):
    """repr() of a value taken from a token or key, cut short: safe in one error line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_time(value):
    import time
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    except (OverflowError, OSError, ValueError):
        return _show(value)


def _b64_part(text, what):
    try:
        return _b64url_decode(text)
    except ValueError:
        raise TokenVerificationError(f"{what} is not strict base64url") from None


def _json_object(raw, what):
    try:
        value = _loads_json(raw)
    except ValueError as exc:
        # The reason may quote a key from the token (duplicate key): keep it short.
        raise TokenVerificationError(f"{what} is not valid JSON: {str(exc)[:100]}") from None
    if not isinstance(value, dict):
        raise TokenVerificationError(f"{what} is not a JSON object")
    return value


def _parse_compact(token):
    """Split a JWS Compact Serialization (RFC 7515 §7.1) and parse its header."""
    if not isinstance(token, str):
        raise TokenVerificationError("token must be a string")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise TokenVerificationError(f"token is longer than {_MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenVerificationError(
            f"token has {len(parts)} dot-separated parts; a compact JWS has exactly 3")
    header = _json_object(_b64_part(parts[0], "token header"), "token header")
    return header, parts


def decode_jwt(token):
    """Decode a compact JWT without checking its signature.

    Returns ``(header, claims)``, both dicts. The token must have exactly three
    strict-base64url parts (RFC 7515 §2, §7.1) and be at most 64 KiB; header
    and payload must be JSON objects without duplicate keys, NaN or
    infinities. Raises TokenVerificationError otherwise. Use verify_jwt
    before trusting anything returned here.
    """
    header, parts = _parse_compact(token)
    claims = _json_object(_b64_part(parts[1], "token payload"), "token payload")
    # Not verified, but still held to the same encoding rules as the rest.
    _b64_part(parts[2], "token signature")
    return header, claims


def _check_alg(alg, allowed=None):
    """Allow-list check of a JWS alg (RFC 8725 §3.1), before any key is touched."""
    if not isinstance(alg, str):
        raise TokenVerificationError("alg must be a string")
    if alg.lower() == "none":
        raise TokenVerificationError("alg none is not allowed")
    if alg.upper().startswith("HS"):
        raise TokenVerificationError(
            f"alg {_show(alg)} is not allowed: symmetric (HMAC) algorithms are never accepted")
    if alg not in _ALGORITHMS:
        raise TokenVerificationError(f"alg {_show(alg)} is not supported")
    if allowed is not None and alg not in allowed:
        raise TokenVerificationError(
            f"alg {alg} is not among the accepted algorithms ({', '.join(sorted(map(str, allowed)))})")


def _key_label(jwk):
    kid = jwk.get("kid")
    return f"key {_show(kid)}" if isinstance(kid, str) else "key (no kid)"


def _jwk_bytes(jwk, name, label):
    """A JWK member's octets: a string of strict base64url."""
    value = jwk.get(name)
    if not isinstance(value, str):
        raise TokenVerificationError(f"{label} has no string {name} member")
    try:
        return _b64url_decode(value)
    except ValueError:
        raise TokenVerificationError(f"{label}: {name} is not strict base64url") from None


def _jwk_uint(jwk, name, label):
    """An RSA JWK integer member (RFC 7518 §6.3.1): strict base64url, big-endian."""
    raw = _jwk_bytes(jwk, name, label)
    # RFC 7518 §6.3.1.1 forbids leading zero octets, but Java's
    # BigInteger.toByteArray() adds a 0x00 sign octet before a first byte >= 0x80
    # and real issuers publish that (Jenkins' OIDC provider, OpenAM/WrenAM,
    # Terrakube). The integer is the same, so exactly that one octet is
    # tolerated; any other leading zero is rejected.
    if not raw or (raw[0] == 0 and (len(raw) == 1 or raw[1] < 0x80)):
        raise TokenVerificationError(
            f"{label}: {name} is not a minimal unsigned integer (RFC 7518 §6.3.1)")
    return int.from_bytes(raw, "big")


def _jwk_octets(jwk, name, size, label):
    """A fixed-size JWK coordinate: RFC 7518 §6.2.1.2-3 (EC), RFC 8037 §2 (OKP)."""
    raw = _jwk_bytes(jwk, name, label)
    if len(raw) != size:
        raise TokenVerificationError(
            f"{label}: {name} is {len(raw)} octets; the curve needs exactly {size}")
    return raw


def _rsa_key(jwk, label):
    n = _jwk_uint(jwk, "n", label)
    e = _jwk_uint(jwk, "e", label)
    bits = n.bit_length()
    if bits < _RSA_MIN_BITS:
        raise TokenVerificationError(
            f"{label}: RSA modulus has {bits} bits; at least {_RSA_MIN_BITS} are required")
    if bits > _RSA_MAX_BITS:
        raise TokenVerificationError(
            f"{label}: RSA modulus has {bits} bits; at most {_RSA_MAX_BITS} are accepted")
    if not n & 1:
        raise TokenVerificationError(f"{label}: RSA modulus is even")
    if e != _RSA_EXPONENT:
        shown = str(e) if e.bit_length() <= 64 else f"of {e.bit_length()} bits"
        raise TokenVerificationError(
            f"{label}: RSA public exponent {shown} is not allowed; only {_RSA_EXPONENT} is accepted")
    return n, e


def _same_alg(key_alg, alg):
    if not isinstance(key_alg, str):
        return False
    return key_alg == alg or (key_alg in _EDDSA_ALGS and alg in _EDDSA_ALGS)


def _load_key(alg, jwk):
    """Check that a JWK may verify ``alg`` (RFC 8725 §3.1) and return its public key.

    ``alg`` must already have passed _check_alg. Returns (n, e) for RSA, (x, y)
    octets for EC and the 32-octet public key for Ed25519. Raises
    TokenVerificationError naming the rule the key breaks.
    """
    if not isinstance(jwk, dict):
        raise TokenVerificationError("JWK must be a JSON object")
    label = _key_label(jwk)
    kty = jwk.get("kty")
    if kty == "oct":
        raise TokenVerificationError(f"{label} is a symmetric (oct) key; those are never accepted")
    if alg in _RSA_PKCS1_ALGS or alg in _RSA_PSS_ALGS:
        wanted = "RSA"
    elif alg in _EC_ALGS:
        wanted = "EC"
    else:
        wanted = "OKP"
    if kty != wanted:
        raise TokenVerificationError(
            f"{label} has kty {_show(kty)}; alg {alg} needs kty {wanted}")
    # RFC 7517 §9.2: a published private key is a compromised one.
    if any(member in jwk for member in ("d", "p", "q", "dp", "dq", "qi", "oth")):
        raise TokenVerificationError(f"{label} contains private key material; refusing a compromised key")
    # RFC 7517 §4.4: a key that names its algorithm is for that algorithm only.
    if "alg" in jwk and not _same_alg(jwk["alg"], alg):
        raise TokenVerificationError(f"{label} is for alg {_show(jwk['alg'])}, not {alg}")
    # RFC 7517 §4.2 and §4.3: an encryption key must never verify signatures.
    if "use" in jwk and jwk["use"] != "sig":
        raise TokenVerificationError(
            f"{label} has use {_show(jwk['use'])}; only use 'sig' keys verify signatures")
    if "key_ops" in jwk:
        ops = jwk["key_ops"]
        if not isinstance(ops, list) or "verify" not in ops:
            raise TokenVerificationError(
                f"{label} has key_ops {_show(ops)} without 'verify'")
    if wanted == "RSA":
        return _rsa_key(jwk, label)
    if wanted == "EC":
        crv, _, size = _EC_ALGS[alg]
        if jwk.get("crv") != crv:
            raise TokenVerificationError(
                f"{label} has crv {_show(jwk.get('crv'))}; alg {alg} needs {crv}")
        return _jwk_octets(jwk, "x", size, label), _jwk_octets(jwk, "y", size, label)
    # RFC 8037 §2: OKP key; only Ed25519 is supported (Ed448 is not).
    if jwk.get("crv") != "Ed25519":
        raise TokenVerificationError(
            f"{label} has crv {_show(jwk.get('crv'))}; alg {alg} needs Ed25519")
    return _jwk_octets(jwk, "x", 32, label)


def _rsa_pkcs1v15_verify(n, e, hash_name, message, signature):
    """RSASSA-PKCS1-v1_5-VERIFY, RFC 8017 §8.2.2.

    The expected EMSA-PKCS1-v1_5 block (§9.2) is rebuilt in full and compared
    byte for byte with the recovered one. Nothing is parsed: parsing the
    DigestInfo is what lets e = 3 "garbage after the hash" forgeries through.
    """
    import hashlib
    import hmac
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:  # §8.2.2 step 1
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:  # RSAVP1, §5.2.2 step 1
        return False
    em = pow(s, e, n).to_bytes(k, "big")
    t = _DIGEST_INFO[hash_name] + getattr(hashlib, hash_name)(message).digest()
    if k < len(t) + 11:  # §9.2 step 3
        return False
    expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return hmac.compare_digest(em, expected)


def _mgf1(hash_fn, seed, length):
    """MGF1, RFC 8017 §B.2.1."""
    h_len = hash_fn().digest_size
    blocks = (length + h_len - 1) // h_len
    return b"".join(hash_fn(seed + c.to_bytes(4, "big")).digest() for c in range(blocks))[:length]


def _rsa_pss_verify(n, e, hash_name, message, signature):
    """RSASSA-PSS-VERIFY, RFC 8017 §8.1.2, with EMSA-PSS-VERIFY, §9.1.2.

    MGF1 uses the message hash and the salt is exactly one hash long, as
    RFC 7518 §3.5 requires for PS256/384/512.
    """
    import hashlib
    import hmac
    hash_fn = getattr(hashlib, hash_name)
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:  # §8.1.2 step 1
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:  # RSAVP1, §5.2.2 step 1
        return False
    m = pow(s, e, n)
    em_bits = n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    if m >> (8 * em_len):  # I2OSP(m, emLen) fails, §8.1.2 step 2c
        return False
    em = m.to_bytes(em_len, "big")
    h_len = s_len = hash_fn().digest_size
    m_hash = hash_fn(message).digest()  # §9.1.2 step 2
    if em_len < h_len + s_len + 2:  # step 3
        return False
    if em[-1] != 0xBC:  # step 4
        return False
    db_len = em_len - h_len - 1
    masked_db, h = em[:db_len], em[db_len:-1]  # step 5
    top_mask = 0xFF >> (8 * em_len - em_bits)
    if masked_db[0] & ~top_mask:  # step 6: the leftmost 8emLen - emBits bits are zero
        return False
    db_mask = _mgf1(hash_fn, h, db_len)  # step 7
    db = (int.from_bytes(masked_db, "big") ^ int.from_bytes(db_mask, "big")).to_bytes(db_len, "big")
    db = bytes((db[0] & top_mask,)) + db[1:]  # steps 8-9
    ps_len = em_len - h_len - s_len - 2
    if db[:ps_len] != bytes(ps_len) or db[ps_len] != 0x01:  # step 10
        return False
    salt = db[db_len - s_len:]  # step 11
    h_prime = hash_fn(bytes(8) + m_hash + salt).digest()  # steps 12-13
    return hmac.compare_digest(h, h_prime)  # step 14


def _verify_with_key(alg, key, signing_input, signature):
    """Verify with a key returned by _load_key for the same alg."""
    if alg in _RSA_PKCS1_ALGS:
        return _rsa_pkcs1v15_verify(key[0], key[1], _RSA_PKCS1_ALGS[alg], signing_input, signature)
    if alg in _RSA_PSS_ALGS:
        return _rsa_pss_verify(key[0], key[1], _RSA_PSS_ALGS[alg], signing_input, signature)
    if alg in _EC_ALGS:
        import hashlib
        crv, hash_name, _ = _EC_ALGS[alg]
        digest = getattr(hashlib, hash_name)(signing_input).digest()
        # RFC 7518 §3.4: the signature is raw r || s; ec.py checks lengths and ranges.
        return _ecdsa_verify(crv, key[0], key[1], digest, signature) is True
    return _ed25519_verify(key, signing_input, signature) is True


def verify_signature(alg, jwk, signing_input, signature):
    """Verify one JWS signature with one JWK: the raw primitive.

    ``alg`` is a JWS algorithm name: RS256/384/512, PS256/384/512,
    ES256/384/512, EdDSA or Ed25519. ``jwk`` is a public key as a dict
    (RFC 7517). ``signing_input`` is ASCII(header "." payload) as bytes and
    ``signature`` the decoded signature bytes (raw r || s for ECDSA).

    Returns True when the signature verifies and False when it does not.
    Raises TokenVerificationError when the algorithm or the key is
    unacceptable: alg none, HS* or unknown; a symmetric (oct) key; kty or crv
    not fitting the alg; a JWK alg other than ``alg``; use other than sig;
    key_ops without verify; an RSA modulus outside 2048..16384 bits or even;
    an RSA exponent other than 65537; a JWK carrying private key material;
    ``signing_input`` or ``signature`` not bytes.
    """
    _check_alg(alg)
    if not isinstance(signing_input, bytes) or not isinstance(signature, bytes):
        raise TokenVerificationError("signing input and signature must be bytes")
    return _verify_with_key(alg, _load_key(alg, jwk), signing_input, signature)


def _select_key(alg, kid, jwks):
    """Pick the key for a token from a JWKS or one JWK and load it (RFC 7515 §6).

    ``kid`` is the header's kid or None.
    """
    if not isinstance(jwks, dict):
        raise TokenVerificationError("JWKS must be a JSON object")
    if "keys" not in jwks:
        # One JWK: the caller chose it. Its kid, when both sides have one, must match.
        if kid is not None and "kid" in jwks and jwks["kid"] != kid:
            raise _UnknownKidError(f"no key with kid {_show(kid)}: the JWK has another kid")
        return _load_key(alg, jwks)
    keys = jwks["keys"]
    if not isinstance(keys, list):
        raise TokenVerificationError("JWKS keys member must be an array")
    # RFC 7517 §5: members that are not keys are ignored.
    keys = [jwk for jwk in keys if isinstance(jwk, dict)]
    seen = set()
    for jwk in keys:
        key_id = jwk.get("kid")
        if isinstance(key_id, str):
            if key_id in seen:
                raise TokenVerificationError(f"JWKS has more than one key with kid {_show(key_id)}")
            seen.add(key_id)
    if kid is not None:
        for jwk in keys:
            if jwk.get("kid") == kid:
                # The issuer named this key: if it breaks policy, that is an error,
                # not a reason to try another key.
                return _load_key(alg, jwk)
        raise _UnknownKidError(f"no key with kid {_show(kid)} in the JWKS")
    # No kid: usable only when exactly one key in the set fits the alg and policy.
    loaded, reasons = [], []
    for jwk in keys:
        try:
            loaded.append(_load_key(alg, jwk))
        except TokenVerificationError as exc:
            reasons.append(str(exc))
    if len(loaded) == 1:
        return loaded[0]
    if loaded:
        raise TokenVerificationError(
            f"token has no kid and {len(loaded)} keys in the JWKS fit alg {alg}")
    detail = f" ({'; '.join(reasons[:3])})" if reasons else ""
    raise TokenVerificationError(f"no key in the JWKS fits alg {alg}{detail}")


def verify_jws(token, jwks, algorithms=None):
    """Verify a compact JWS against a JWK Set and return ``(header, payload)``.

    ``jwks`` is a JWK Set (``{"keys": [...]}``) or one JWK; ``algorithms``
    optionally narrows the built-in allow-list (RS*, PS*, ES*, EdDSA,
    Ed25519). The payload is returned as raw bytes, whatever it holds.

    Keys come only from ``jwks``: jku, x5u, jwk and x5c headers are ignored;
    crit, b64 and zip headers are rejected. A header kid is matched exactly;
    without one, exactly one key in the set must fit the alg. Duplicate kids
    in the set are an error. Raises _UnknownKidError (a
    TokenVerificationError) when the kid is not in the set, so the caller can
    refetch the JWKS once after a key rotation, and TokenVerificationError
    for every other failure, including "signature does not verify".
    """
    header, parts = _parse_compact(token)
    if "alg" not in header:
        raise TokenVerificationError("token header has no alg")
    if algorithms is None:
        allowed = None
    elif isinstance(algorithms, str):
        allowed = frozenset((algorithms,))
    else:
        allowed = frozenset(algorithms)
    alg = header["alg"]
    _check_alg(alg, allowed)
    for name, message in _REJECTED_HEADERS:
        if name in header:
            raise TokenVerificationError(message)
    kid = header.get("kid")
    if "kid" in header and not isinstance(kid, str):
        raise TokenVerificationError("kid header must be a string")
    payload = _b64_part(parts[1], "token payload")
    signature = _b64_part(parts[2], "token signature")
    # jku, x5u, jwk and x5c are never read: a token must not choose its own key.
    key = _select_key(alg, kid, jwks)
    signing_input = (parts[0] + "." + parts[1]).encode("ascii")  # RFC 7515 §5.2 step 8
    if not _verify_with_key(alg, key, signing_input, signature):
        raise TokenVerificationError("signature does not verify")
    return header, payload


def _media_type(value):
    # RFC 7515 §4.1.9: a typ without "/" means "application/" + typ; media
    # types compare case-insensitively (RFC 2045 §5.1).
    value = value.lower()
    return value if "/" in value else "application/" + value


def _check_typ(header, typ):
    negate = typ.startswith("!")
    wanted = _media_type(typ[1:] if negate else typ)
    actual = header.get("typ")
    if "typ" in header and not isinstance(actual, str):
        raise TokenVerificationError("typ header must be a string")
    if negate:
        # Refused whatever parameters or spacing dress it up: an ID token must
        # never be an access token in disguise (RFC 9068 §4).
        if actual is not None and _media_type(actual.split(";", 1)[0].strip()) == wanted:
            raise TokenVerificationError(f"typ {_show(actual)} is not allowed for this token")
    elif actual is None or _media_type(actual) != wanted:
        raise TokenVerificationError(
            f"typ is {_show(actual) if actual is not None else 'missing'}; expected {typ}")


def _numeric_date(claims, name):
    """A NumericDate claim (RFC 7519 §2) or None when absent; booleans are not numbers."""
    value = claims.get(name)
    if name in claims and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TokenVerificationError(f"{name} claim must be a number, not {_show(value)}")
    return value


def verify_jwt(token, jwks, *, issuer=None, audience=None, algorithms=None, typ=None,
               leeway=60, now=None, azp=None):
    """Verify a JWT's signature (verify_jws) and its claims; return the claims dict.

    The payload must be a JSON object (no duplicate keys, NaN or infinities).
    Always checked: ``exp`` present and numeric with now < exp + leeway;
    ``nbf`` and ``iat`` numeric when present, nbf <= now + leeway and
    iat <= now + leeway. Checked when the keyword is given:

    - ``issuer``: ``iss`` equals it exactly.
    - ``audience``: ``aud`` (a string or an array of strings) contains it.
    - ``typ``: the header typ is that media type, case-insensitively and with
      or without "application/" (RFC 9068 §4: pass "at+jwt" for access
      tokens). ``typ=NOT_AT_JWT`` instead requires that typ is not at+jwt
      (ID tokens); any typ starting with "!" is negated the same way.
    - ``azp``: the client id; an ``azp`` claim, when present, must equal it
      (OpenID Connect Core §3.1.3.7 step 5).

    ``leeway`` is the allowed clock skew in seconds; ``now`` defaults to
    time.time(). Whatever the token and the JWKS hold, every failure raises
    TokenVerificationError (or _UnknownKidError) whose message names the
    check; it never contains the token. The keyword arguments are the
    caller's and are trusted to have the documented types.
    """
    header, payload = verify_jws(token, jwks, algorithms)
    if typ is not None:
        _check_typ(header, typ)
    claims = _json_object(payload, "token payload")
    if issuer is not None and claims.get("iss") != issuer:
        if "iss" not in claims:
            raise TokenVerificationError(f"token has no iss claim; expected {_show(issuer)}")
        raise TokenVerificationError(
            f"iss {_show(claims['iss'])} is not the expected issuer {_show(issuer)}")
    if audience is not None:
        if "aud" not in claims:
            raise TokenVerificationError(f"token has no aud claim; expected {_show(audience)}")
        aud = claims["aud"]
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not all(isinstance(item, str) for item in auds):
            raise TokenVerificationError("aud must be a string or an array of strings (RFC 7519 §4.1.3)")
        if audience not in auds:
            raise TokenVerificationError(f"aud {_show(aud)} does not contain {_show(audience)}")
    if azp is not None and "azp" in claims and claims["azp"] != azp:
        raise TokenVerificationError(
            f"azp {_show(claims['azp'])} is not the client id {_show(azp)}")
    if now is None:
        import time
        now = time.time()
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise TokenVerificationError("token has no exp claim")
    if not now < exp + leeway:
        raise TokenVerificationError(
            f"token expired at {_format_time(exp)} (now {_format_time(now)}, leeway {leeway} s)")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise TokenVerificationError(
            f"token is not valid before {_format_time(nbf)} (now {_format_time(now)}, leeway {leeway} s)")
    iat = _numeric_date(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise TokenVerificationError(
            f"token issued in the future, at {_format_time(iat)} (now {_format_time(now)}, leeway {leeway} s)")
    return claims


# ============================================================================
# Elliptic curves: ECDSA P-256/384/521 (SEC 1) and Ed25519 (RFC 8032) verify;
# ES256 and Ed25519 sign
# ============================================================================
#
#
# Verification works on public data, so nothing here tries to be
# constant-time (signing, at the end of this section, says what that means
# for it).  Both verify entry points return False for any malformed or
# invalid input and never raise.
#
# ECDSA (JWS ES256/ES384/ES512, RFC 7518 §3.4; math SEC 1 v2 §4.1.4):
#   * x and y must each be exactly 32/48/66 bytes, each < p, and (x, y) must
#     satisfy the curve equation (SEC 1 §3.2.2.1).  The NIST curves have
#     cofactor 1, so this also puts the key in the order-n group; the point
#     at infinity has no affine encoding and so can never pass.
#   * The signature must be the raw r||s of exactly 64/96/132 bytes, so a DER
#     signature is rejected by its length alone.
#   * r and s must be in [1, n-1]: r = s = 0 (the "psychic signature" bug)
#     and values >= n are rejected before any curve arithmetic.
#   * The digest becomes an integer from its leftmost min(bitlen(n),
#     8*len(digest)) bits (SEC 1 §4.1.3 step 5), so P-521 with SHA-512 uses
#     all 512 bits.
#   * u1*G + u2*Q is computed with interleaved wNAF (window 6 for G, from a
#     table built once per curve on first use; window 5 for Q, per call), in
#     Jacobian coordinates with the a = -3 doubling; the mixed addition
#     handles P == Q (falls back to doubling) and P == -Q (gives infinity).
#     A result at infinity is rejected; x(R) mod n == r is checked as
#     X == c*Z^2 for c in {r, r+n, ...} < p, which needs no inversion.
#
# Ed25519 (JWS EdDSA, RFC 8037; math RFC 8032 §5.1.7):
#   * Public key exactly 32 bytes, signature exactly 64 bytes.
#   * S must be < L (S >= L is rejected), so a valid signature cannot be
#     re-encoded into a second valid one.
#   * A is decoded strictly (RFC 8032 §5.1.3): y >= p (a non-canonical
#     encoding) is rejected, x = 0 with the sign bit set is rejected, and a y
#     with no square root is rejected.
#   * R is held to the same standard without being decoded: [S]B - [k]A is
#     encoded canonically and compared byte for byte with R, so an R that is
#     non-canonical or not on the curve can never match (and a square root
#     is saved).
#   * A and R of small order (the 8 points whose order divides 8) are
#     rejected by comparing their bytes with the 8 canonical encodings of
#     those points; since A and R only get through in canonical form, the 8
#     are the complete list.  This closes the "identity key verifies every
#     message" trick and its small-subgroup relatives.
#   * The cofactorless equation [S]B == R + [k]A is checked (RFC 8032 §5.1.7 step 3
#     allows it in place of the cofactored one).  A key with a small-order
#     component is not rejected; it verifies only what that exact equation
#     accepts.
#   * Together these are the acceptance rules of libsodium's
#     crypto_sign_verify_detached.

_NIST_CURVES = {
    # name: (p, b, n, Gx, Gy, field size in bytes); FIPS 186-4 §D.1.2, a = -3
    "P-256": (
        0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF,
        0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
        0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
        0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
        32,
    ),
    "P-384": (
        int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFE"
            "FFFFFFFF0000000000000000FFFFFFFF",
            16,
        ),
        int(
            "B3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875A"
            "C656398D8A2ED19D2A85C8EDD3EC2AEF",
            16,
        ),
        int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973",
            16,
        ),
        int(
            "AA87CA22BE8B05378EB1C71EF320AD746E1D3B628BA79B9859F741E082542A38"
            "5502F25DBF55296C3A545E3872760AB7",
            16,
        ),
        int(
            "3617DE4A96262C6F5D9E98BF9292DC29F8F41DBD289A147CE9DA3113B5F0B8C0"
            "0A60B1CE1D7E819D7A431D7C90EA0E5F",
            16,
        ),
        48,
    ),
    "P-521": (
        (1 << 521) - 1,
        int(
            "051953EB9618E1C9A1F929A21A0B68540EEA2DA725B99B315F3B8B489918EF10"
            "9E156193951EC7E937B1652C0BD3BB1BF073573DF883D2C34F1EF451FD46B503F00",
            16,
        ),
        int(
            "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
            "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
            16,
        ),
        int(
            "00C6858E06B70404E9CD9E3ECB662395B4429C648139053FB521F828AF606B4D"
            "3DBAA14B5E77EFE75928FE1DC127A2FFA8DE3348B3C1856A429BF97E7E31C2E5BD66",
            16,
        ),
        int(
            "011839296A789A3BC0045C8A5FB42C7D1BD998F54449579B446817AFBD17273E"
            "662C97EE72995EF42640C550B9013FAD0761353C7086A272C24088BE94769FD16650",
            16,
        ),
        66,
    ),
}
_EC_G_WINDOW = 6
_EC_Q_WINDOW = 5
# curve name -> wNAF table of the base point, filled on first use of the curve
_BASE_TABLES = {}

_ED_P = (1 << 255) - 19
_ED_L = (1 << 252) + 27742317777372353535851937790883648493
# d = -121665/121666 mod p and sqrt(-1) = 2^((p-1)/4) mod p, RFC 8032 §5.1
_ED_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_ED_SQRT_M1 = (
    19681161376707505956807079304988542015446066515923890162744021073123829784752
)
_ED_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_ED_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_ED_B_WINDOW = 6
_ED_A_WINDOW = 5
# The 8 points of order dividing 8, canonically encoded: one order 1, one order 2,
# two order 4, four order 8 (non-canonical encodings never get this far)
_ED_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    )
)


def _inv(x, m):
    # pow(x, -1, m) needs Python 3.8; Fermat's little theorem covers 3.6/3.7 (m is prime)
    try:
        return pow(x, -1, m)
    except ValueError:
        return pow(x, m - 2, m)


def _batch_inv(values, m):
    # Montgomery's trick: n inverses for the price of one inversion and 3n products
    prefix = []
    acc = 1
    for v in values:
        prefix.append(acc)
        acc = acc * v % m
    inv = _inv(acc, m)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inv % m
        inv = inv * values[i] % m
    return out


def _wnaf(k, w):
    # Width-w NAF, least significant digit first: odd digits with |d| < 2^(w-1),
    # each followed by at least w-1 zeros; runs of zeros are emitted in one go
    digits = []
    full = 1 << w
    half = full >> 1
    mask = full - 1
    while k:
        if k & 1:
            d = k & mask
            if d >= half:
                d -= full
            k = (k - d) >> 1
            digits.append(d)
        else:
            zeros = (k & -k).bit_length() - 1
            digits.extend([0] * zeros)
            k >>= zeros
    return digits


def _straus_schedule(k1, table1, w1, k2, table2, w2):
    # Interleaved wNAF of two scalars: for each bit position, most significant
    # first, the table points to add after that position's doubling
    n1 = _wnaf(k1, w1)
    n2 = _wnaf(k2, w2)
    schedule = [()] * max(len(n1), len(n2))
    for i, d in enumerate(n1):
        if d:
            schedule[i] = (table1[d],)
    for i, d in enumerate(n2):
        if d:
            schedule[i] += (table2[d],)
    schedule.reverse()
    return schedule


def _jac_double(X, Y, Z, p):
    # dbl-2001-b (a = -3); Z = 0 (infinity) stays at Z = 0
    delta = Z * Z % p
    gamma = Y * Y % p
    beta = X * gamma % p
    alpha = 3 * (X - delta) * (X + delta) % p
    X3 = (alpha * alpha - 8 * beta) % p
    Y3 = (alpha * (4 * beta - X3) - 8 * gamma * gamma) % p
    Z3 = 2 * Y * Z % p
    return X3, Y3, Z3


def _jac_add_affine(X1, Y1, Z1, x2, y2, p):
    # madd-2004-hmv: Jacobian + affine, with the cases the formula cannot take
    if not Z1:
        return x2, y2, 1
    Z1Z1 = Z1 * Z1 % p
    H = (x2 * Z1Z1 - X1) % p
    r = (y2 * Z1 * Z1Z1 - Y1) % p
    if not H:
        if not r:
            # P == Q: the chord is undefined, use the tangent
            return _jac_double(X1, Y1, Z1, p)
        # P == -Q
        return 1, 1, 0
    HH = H * H % p
    HHH = H * HH % p
    V = X1 * HH % p
    X3 = (r * r - HHH - 2 * V) % p
    Y3 = (r * (V - X3) - Y1 * HHH) % p
    Z3 = Z1 * H % p
    return X3, Y3, Z3


def _ec_odd_multiples(x, y, w, p):
    # [1]P, [3]P, ..., [2^(w-1) - 1]P in affine form, indexed by the wNAF digit;
    # -[k]P = (x, p - y) sits at the negative index so a digit indexes directly
    X2, Y2, Z2 = _jac_double(x, y, 1, p)
    zi = _inv(Z2, p)
    zi2 = zi * zi % p
    x2 = X2 * zi2 % p
    y2 = Y2 * zi2 * zi % p
    points = [(x, y, 1)]
    for _ in range((1 << (w - 2)) - 1):
        X, Y, Z = points[-1]
        points.append(_jac_add_affine(X, Y, Z, x2, y2, p))
    inverses = _batch_inv([Z for _, _, Z in points], p)
    table = [None] * (1 << w)
    for i, (X, Y, _), zi in zip(range(1, 1 << (w - 1), 2), points, inverses):
        zi2 = zi * zi % p
        ax = X * zi2 % p
        ay = Y * zi2 * zi % p
        table[i] = (ax, ay)
        table[-i] = (ax, p - ay)
    return table


def _ec_base_table(crv):
    # wNAF table of the base point, built on first use of the curve
    if crv not in _BASE_TABLES:
        p, _, _, gx, gy, _ = _NIST_CURVES[crv]
        _BASE_TABLES[crv] = _ec_odd_multiples(gx, gy, _EC_G_WINDOW, p)
    return _BASE_TABLES[crv]


def _ec_mul_add(crv, u1, u2, qx, qy):
    # u1*G + u2*Q by interleaved (Straus) wNAF; returns Jacobian (X, Y, Z), Z = 0 at infinity
    p = _NIST_CURVES[crv][0]
    q_table = _ec_odd_multiples(qx, qy, _EC_Q_WINDOW, p)
    schedule = _straus_schedule(u1, _ec_base_table(crv), _EC_G_WINDOW, u2, q_table, _EC_Q_WINDOW)
    X, Y, Z = 1, 1, 0
    # _jac_double and _jac_add_affine inlined: this loop is nearly all of the verify time
    for points in schedule:
        if Z:
            delta = Z * Z % p
            gamma = Y * Y % p
            beta = X * gamma % p
            alpha = 3 * (X - delta) * (X + delta) % p
            X = (alpha * alpha - 8 * beta) % p
            Z = 2 * Y * Z % p
            Y = (alpha * (4 * beta - X) - 8 * gamma * gamma) % p
        for x2, y2 in points:
            if not Z:
                X, Y, Z = x2, y2, 1
                continue
            Z1Z1 = Z * Z % p
            H = (x2 * Z1Z1 - X) % p
            r = (y2 * Z % p * Z1Z1 - Y) % p
            if not H:
                X, Y, Z = _jac_add_affine(X, Y, Z, x2, y2, p)
                continue
            HH = H * H % p
            HHH = H * HH % p
            V = X * HH % p
            X = (r * r - HHH - 2 * V) % p
            Y = (r * (V - X) - Y * HHH) % p
            Z = Z * H % p
    return X, Y, Z


def _ecdsa_verify(crv, x, y, digest, signature):
    """Verify a JWS ES256/ES384/ES512 signature (raw r||s) over a precomputed digest."""
    if not isinstance(crv, str) or crv not in _NIST_CURVES:
        return False
    for value in (x, y, digest, signature):
        if not isinstance(value, (bytes, bytearray)):
            return False
    p, b, n, _, _, size = _NIST_CURVES[crv]
    # SEC 1 §3.2.2.1: the key must be a finite point on the curve
    if len(x) != size or len(y) != size:
        return False
    qx = int.from_bytes(x, "big")
    qy = int.from_bytes(y, "big")
    if qx >= p or qy >= p:
        return False
    if (qy * qy - (qx * qx * qx - 3 * qx + b)) % p:
        return False
    # RFC 7518 §3.4: fixed-width r||s, nothing else
    if len(signature) != 2 * size:
        return False
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    # SEC 1 §4.1.4 step 1
    if not (0 < r < n and 0 < s < n):
        return False
    # SEC 1 §4.1.4 step 3 (leftmost bits, §4.1.3 step 5)
    e = int.from_bytes(digest, "big")
    excess = 8 * len(digest) - n.bit_length()
    if excess > 0:
        e >>= excess
    # SEC 1 §4.1.4 step 4
    w = _inv(s, n)
    u1 = e * w % n
    u2 = r * w % n
    # SEC 1 §4.1.4 step 5
    X, _, Z = _ec_mul_add(crv, u1, u2, qx, qy)
    if not Z:
        return False
    # SEC 1 §4.1.4 steps 6-7: x_R = X/Z^2 and v = x_R mod n, so x_R is r + k*n below p
    zz = Z * Z % p
    c = r
    while c < p:
        if (c * zz - X) % p == 0:
            return True
        c += n
    return False


def _ed_decode(s):
    # RFC 8032 §5.1.3, strictly: returns (x, y) or None
    p = _ED_P
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    # step 1
    if y >= p:
        return None
    # step 2: x = u v^3 (u v^7)^((p-5)/8)
    yy = y * y % p
    u = (yy - 1) % p
    v = (_ED_D * yy + 1) % p
    v3 = v * v * v % p
    x = u * v3 * pow(u * v3 * v3 * v % p, (p - 5) // 8, p) % p
    # step 3
    vxx = v * x * x % p
    if vxx != u:
        if vxx != p - u:
            return None
        x = x * _ED_SQRT_M1 % p
    # step 4
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = p - x
    return x, y


def _ed_double(X, Y, Z, p):
    # RFC 8032 §5.1.4 doubling; T is not an input, so it is left to the caller
    A = X * X % p
    B = Y * Y % p
    C = 2 * Z * Z % p
    H = A + B
    E = H - (X + Y) * (X + Y) % p
    G = A - B
    F = C + G
    return E * F % p, G * H % p, F * G % p, E * H % p


def _ed_add(X1, Y1, Z1, T1, yp, ym, t2d, z2, p):
    # RFC 8032 §5.1.4 addition, second point pre-cached as (Y+X, Y-X, 2dT, 2Z);
    # the formula is complete on edwards25519, so no special cases
    A = (Y1 - X1) * ym % p
    B = (Y1 + X1) * yp % p
    C = T1 * t2d % p
    D = Z1 * z2 % p
    E = B - A
    F = D - C
    G = D + C
    H = B + A
    return E * F % p, G * H % p, F * G % p, E * H % p


def _ed_cached(X, Y, Z, T, p):
    return (Y + X) % p, (Y - X) % p, 2 * _ED_D * T % p, 2 * Z % p


def _ed_odd_multiples(x, y, w):
    # [1]P, [3]P, ..., [2^(w-1) - 1]P cached for _ed_add and indexed by the wNAF
    # digit; -(Y+X, Y-X, 2dT, 2Z) = (Y-X, Y+X, -2dT, 2Z) sits at the negative index
    p = _ED_P
    P = (x, y, 1, x * y % p)
    P2 = _ed_cached(*_ed_double(x, y, 1, p), p=p)
    points = [P]
    for _ in range((1 << (w - 2)) - 1):
        points.append(_ed_add(*points[-1], *P2, p=p))
    table = [None] * (1 << w)
    for i, point in zip(range(1, 1 << (w - 1), 2), points):
        yp, ym, t2d, z2 = _ed_cached(*point, p=p)
        table[i] = (yp, ym, t2d, z2)
        table[-i] = (ym, yp, (p - t2d) % p, z2)
    return table


def _ed_base_table():
    # Odd multiples of B normalised to Z = 1 with one inversion, built on first use
    table = _BASE_TABLES.get("Ed25519")
    if table is None:
        p = _ED_P
        table = _ed_odd_multiples(_ED_BX, _ED_BY, _ED_B_WINDOW)
        digits = range(1, 1 << (_ED_B_WINDOW - 1), 2)
        inverses = _batch_inv([table[i][3] for i in digits], p)
        for i, zi in zip(digits, inverses):
            # each cached coordinate scales with Z, so times 1/Z; zi is 1/(2Z)
            zi2 = 2 * zi
            for j in (i, -i):
                yp, ym, t2d, _ = table[j]
                table[j] = (yp * zi2 % p, ym * zi2 % p, t2d * zi2 % p, 2)
        _BASE_TABLES["Ed25519"] = table
    return table


def _ed25519_verify(public_key, message, signature):
    """Verify a JWS EdDSA (Ed25519) signature; see the policy comment above."""
    for value in (public_key, message, signature):
        if not isinstance(value, (bytes, bytearray)):
            return False
    if len(public_key) != 32 or len(signature) != 64:
        return False
    p = _ED_P
    public_key = bytes(public_key)
    r_bytes = bytes(signature[:32])
    # RFC 8032 §5.1.7 step 1
    S = int.from_bytes(signature[32:], "little")
    if S >= _ED_L:
        return False
    # small-order A or R, see the policy above
    if public_key in _ED_SMALL_ORDER or r_bytes in _ED_SMALL_ORDER:
        return False
    point_a = _ed_decode(public_key)
    if point_a is None:
        return False
    # RFC 8032 §5.1.7 step 2
    import hashlib

    h = hashlib.sha512(r_bytes)
    h.update(public_key)
    h.update(message)
    k = int.from_bytes(h.digest(), "little") % _ED_L
    # RFC 8032 §5.1.7 step 3, cofactorless, as [S]B + [k](-A) == R
    a_table = _ed_odd_multiples(-point_a[0] % p, point_a[1], _ED_A_WINDOW)
    schedule = _straus_schedule(
        S, _ed_base_table(), _ED_B_WINDOW, k, a_table, _ED_A_WINDOW
    )
    # compare encodings: R needs no decoding, and a non-canonical R can never match
    return _ed_sum_encoded(schedule) == r_bytes


def _ed_sum_encoded(schedule):
    # The point a Straus or comb schedule adds up, encoded (RFC 8032 §5.1.2)
    p = _ED_P
    X, Y, Z = 0, 1, 1
    # _ed_double and _ed_add inlined (this loop is nearly all of a verify's or a
    # signature's time); T = E*H is only formed when an addition needs it
    for points in schedule:
        A = X * X % p
        B = Y * Y % p
        C = 2 * Z * Z % p
        H = A + B
        E = H - (X + Y) * (X + Y) % p
        G = A - B
        F = C + G
        X = E * F % p
        Y = G * H % p
        Z = F * G % p
        for yp, ym, t2d, z2 in points:
            A = (Y - X) * ym % p
            B = (Y + X) * yp % p
            C = E * H % p * t2d % p
            D = Z * z2 % p
            E = B - A
            F = D - C
            G = D + C
            H = B + A
            X = E * F % p
            Y = G * H % p
            Z = F * G % p
    zi = _inv(Z, p)
    x = X * zi % p
    return (Y * zi % p | (x & 1) << 255).to_bytes(32, "little")


# Signing (the DPoP proofs of RFC 9449) reuses the formulas above.  Unlike
# verification it handles a secret, and Python integers are not constant-time:
# the time a signature takes leaks something about the nonce and the key.  The
# key is made for one sign-in and lives as long as its token (README, "DPoP").
#
# Both signers multiply the base point with a Lim-Lee comb of 8 teeth: a table
# of the 255 sums of 2^(32 i) G, after which k*G costs 32 doublings and at most
# 32 additions, an eighth of the doublings of wNAF (python-ecdsa signs on
# precomputed tables too, and `make bench` holds us to its speed).  The table
# costs about three wNAF multiplications, so the first multiplication of a
# process goes by wNAF on the verifier's small base table, and the comb's table
# is built at the second: --dpop-proof signs once, a sign-in once per poll.
# ECDSA nonces are RFC 6979's (deterministic, HMAC-SHA-256), so no signature
# depends on the quality of a random k.

_COMB_TEETH = 8
# the curves that have done their first base multiplication in this process
_BASE_MULTIPLIED = set()


def _base_schedule(name, k, comb_table, wnaf_table, window):
    # The points to add after each doubling for k times the base point (see above)
    if name not in _BASE_MULTIPLIED:
        _BASE_MULTIPLIED.add(name)
        return _straus_schedule(k, wnaf_table(), window, 0, None, 0)
    spacing, table = comb_table()
    return [(table[index],) if index else () for index in _comb_columns(k, spacing)]


def _comb_columns(k, spacing):
    # Column j holds bit j + i*spacing of k in bit i, most significant column first
    teeth = [k >> (i * spacing) for i in range(_COMB_TEETH - 1, -1, -1)]
    columns = []
    for j in range(spacing - 1, -1, -1):
        index = 0
        for tooth in teeth:
            index = index << 1 | (tooth >> j) & 1
        columns.append(index)
    return columns


def _jac_affine_all(points, p):
    # Jacobian points (none at infinity) to affine with a single inversion
    out = []
    for (X, Y, _), zi in zip(points, _batch_inv([Z for _, _, Z in points], p)):
        zi2 = zi * zi % p
        out.append((X * zi2 % p, Y * zi2 * zi % p))
    return out


def _ec_comb_table(crv):
    # (spacing, T) with T[c] = sum of 2^(i*spacing) G over the bits i set in c, affine
    key = crv + " comb"
    if key not in _BASE_TABLES:
        p, _, n, gx, gy, _ = _NIST_CURVES[crv]
        spacing = -(-n.bit_length() // _COMB_TEETH)
        teeth = [(gx, gy, 1)]
        for _ in range(_COMB_TEETH - 1):
            X, Y, Z = teeth[-1]
            for _ in range(spacing):
                X, Y, Z = _jac_double(X, Y, Z, p)
            teeth.append((X, Y, Z))
        # every sum is m*G with 0 < m < 2^(8*32-31) < n: never infinity, never P == -Q
        sums = [(1, 1, 0)]
        for x, y in _jac_affine_all(teeth, p):
            sums += [_jac_add_affine(X, Y, Z, x, y, p) for X, Y, Z in sums]
        _BASE_TABLES[key] = spacing, [None] + _jac_affine_all(sums[1:], p)
    return _BASE_TABLES[key]


def _ec_mul_base(crv, k):
    # k*G for 0 < k < n, affine (x, y)
    p = _NIST_CURVES[crv][0]
    X, Y, Z = 1, 1, 0
    for points in _base_schedule(crv, k, lambda: _ec_comb_table(crv), lambda: _ec_base_table(crv), _EC_G_WINDOW):
        X, Y, Z = _jac_double(X, Y, Z, p)
        for x, y in points:
            X, Y, Z = _jac_add_affine(X, Y, Z, x, y, p)
    return _jac_affine_all([(X, Y, Z)], p)[0]


def _rfc6979_nonces(crv, d, digest, hash_name):
    # RFC 6979 §3.2: the candidates k for key d and message hash h1 = digest, in order
    n = _NIST_CURVES[crv][2]
    qlen = n.bit_length()
    rlen = (qlen + 7) // 8

    def bits2int(octets):
        # §2.3.2
        value = int.from_bytes(octets, "big")
        excess = 8 * len(octets) - qlen
        return value >> excess if excess > 0 else value

    block = _hash(hash_name).block_size
    ipad = int.from_bytes(b"\x36" * block, "big")
    opad = int.from_bytes(b"\x5c" * block, "big")

    def mac(key, data):
        # RFC 2104 HMAC (importing hmac costs --dpop-proof more than this); keys here are one hash long
        key = int.from_bytes(key.ljust(block, b"\0"), "big")
        inner = _hash(hash_name, (key ^ ipad).to_bytes(block, "big") + data).digest()
        return _hash(hash_name, (key ^ opad).to_bytes(block, "big") + inner).digest()

    seed = d.to_bytes(rlen, "big") + (bits2int(digest) % n).to_bytes(rlen, "big")
    # steps b-g
    V = b"\x01" * len(digest)
    K = mac(b"\x00" * len(digest), V + b"\x00" + seed)
    V = mac(K, V)
    K = mac(K, V + b"\x01" + seed)
    V = mac(K, V)
    while True:
        # step h
        T = b""
        while len(T) < rlen:
            V = mac(K, V)
            T += V
        k = bits2int(T)
        if 0 < k < n:
            yield k
        K = mac(K, V + b"\x00")
        V = mac(K, V)


def _ecdsa_sign(crv, d, digest, hash_name):
    """ECDSA signature (SEC 1 §4.1.3) as JWS wants it: raw r || s, RFC 6979 nonce."""
    _, _, n, _, _, size = _NIST_CURVES[crv]
    e = int.from_bytes(digest, "big")
    excess = 8 * len(digest) - n.bit_length()
    if excess > 0:
        e >>= excess
    for k in _rfc6979_nonces(crv, d, digest, hash_name):
        # SEC 1 §4.1.3 steps 1-6
        r = _ec_mul_base(crv, k)[0] % n
        s = _inv(k, n) * (e + r * d) % n
        if r and s:
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _ed_comb_table():
    # (spacing, T) as for _ec_comb_table, T[c] cached for _ed_add with Z = 1
    if "Ed25519 comb" not in _BASE_TABLES:
        p = _ED_P
        spacing = -(-255 // _COMB_TEETH)
        teeth = [(_ED_BX, _ED_BY, 1, _ED_BX * _ED_BY % p)]
        for _ in range(_COMB_TEETH - 1):
            X, Y, Z, _ = teeth[-1]
            for _ in range(spacing):
                X, Y, Z, T = _ed_double(X, Y, Z, p)
            teeth.append((X, Y, Z, T))
        sums = [(0, 1, 1, 0)]
        for tooth in teeth:
            cached = _ed_cached(*tooth, p=p)
            sums += [_ed_add(*point, *cached, p=p) for point in sums]
        table = [None]
        for point, zi in zip(sums[1:], _batch_inv([Z for _, _, Z, _ in sums[1:]], p)):
            yp, ym, t2d, _ = _ed_cached(*point, p=p)
            table.append((yp * zi % p, ym * zi % p, t2d * zi % p, 2))
        _BASE_TABLES["Ed25519 comb"] = spacing, table
    return _BASE_TABLES["Ed25519 comb"]


def _ed_mul_base(k):
    # [k]B encoded (RFC 8032 §5.1.2)
    return _ed_sum_encoded(_base_schedule("Ed25519", k, _ed_comb_table, _ed_base_table, _ED_B_WINDOW))


def _ed_expand(seed):
    # RFC 8032 §5.1.5 steps 1-2: the secret scalar s and the prefix
    h = _hash("sha512", seed).digest()
    s = int.from_bytes(h[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    return s, h[32:]


def _ed25519_public(seed):
    """The public key of a 32-byte Ed25519 private key (RFC 8032 §5.1.5)."""
    return _ed_mul_base(_ed_expand(seed)[0])


def _ed25519_sign(seed, public_key, message):
    """Ed25519 signature (RFC 8032 §5.1.6) by the private key seed, whose public key is given."""
    s, prefix = _ed_expand(seed)
    # steps 2-3
    r = int.from_bytes(_hash("sha512", prefix + message).digest(), "little") % _ED_L
    R = _ed_mul_base(r)
    # steps 4-5
    k = int.from_bytes(_hash("sha512", R + public_key + message).digest(), "little") % _ED_L
    return R + ((r + k * s) % _ED_L).to_bytes(32, "little")


# ============================================================================
# DPoP (RFC 9449): a key per sign-in, proofs, server nonces, the binding check
# ============================================================================
#
# --dpop binds the token to a key pair made for this sign-in, so a token that
# leaks is useless without the private key. --dpop-proof signs one proof for a
# script's request; it runs before argparse and imports neither json nor
# urllib (their imports cost more than the signature), hence the small JSON
# writer and reader below.

# The algorithms this tool signs with, in the order it prefers them.
DPOP_ALGORITHMS = ("EdDSA", "ES256")
_MAX_NONCE = 1024
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _json_compact(value):
    # json.dumps(value, separators=(",", ":")) for objects of strings and integers
    if isinstance(value, dict):
        return "{%s}" % ",".join("%s:%s" % (_json_compact(k), _json_compact(v)) for k, v in value.items())
    if isinstance(value, int):
        return str(value)
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')


def _flat_json_object(text):
    # {"name": "value", ...}: the string-valued JWKs this tool prints; None for anything else
    text = text.strip()
    if text[:1] != "{" or text[-1:] != "}":
        return None
    members = {}
    for item in text[1:-1].split(","):
        name, colon, value = (part.strip() for part in item.partition(":"))
        quoted = (name, value)
        if not colon or any(len(q) < 2 or q[0] != '"' or q[-1] != '"' or '"' in q[1:-1] or "\\" in q
                            for q in quoted) or name[1:-1] in members:
            return None
        members[name[1:-1]] = value[1:-1]
    return members


def _dpop_htu(url):
    """RFC 9449 §4.2 htu: the URL without query and fragment; None unless absolute http(s)."""
    if not isinstance(url, str) or not url or not all("\x21" <= ch <= "\x7e" for ch in url):
        return None
    htu = url.split("#", 1)[0].split("?", 1)[0]
    scheme, separator, rest = htu.partition("://")
    authority = rest.split("/", 1)[0]
    if scheme.lower() not in ("http", "https") or not separator or not authority.strip(":") or "@" in authority:
        return None
    return htu


def _is_nonce(value):
    # RFC 9449 §8.1: nonce = 1*NQCHAR
    return isinstance(value, str) and 0 < len(value) <= _MAX_NONCE and \
        all("\x21" <= ch <= "\x7e" and ch not in '"\\' for ch in value)


def _dpop_generate(alg):
    """A fresh private JWK for alg (EdDSA or ES256), from os.urandom."""
    if alg == "EdDSA":
        seed = os.urandom(32)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url_encode(_ed25519_public(seed)),
                "d": _b64url_encode(seed)}
    n = _NIST_CURVES["P-256"][2]
    d = 0
    while not 0 < d < n:
        d = int.from_bytes(os.urandom(32), "big")
    x, y = _ec_mul_base("P-256", d)
    return {"kty": "EC", "crv": "P-256", "x": _b64url_encode(x.to_bytes(32, "big")),
            "y": _b64url_encode(y.to_bytes(32, "big")), "d": _b64url_encode(d.to_bytes(32, "big"))}


def _dpop_key_problem(key):
    """Why key is not a private JWK this tool can sign with, or None; never quotes the key."""
    if not isinstance(key, dict):
        return "not a JSON object"
    shape = {("OKP", "Ed25519"): ("x", "d"), ("EC", "P-256"): ("x", "y", "d")}.get((key.get("kty"), key.get("crv")))
    if shape is None:
        return "not an Ed25519 (OKP) or P-256 (EC) key"
    values = {}
    for name in shape:
        try:
            values[name] = _b64url_decode(key.get(name))
        except ValueError:
            values[name] = b""
        if len(values[name]) != 32:
            return "member %s is not 32 octets of base64url" % name
    # A public part that is not the private one's would sign proofs for a key the token is not bound to.
    if key["kty"] == "EC":
        n = _NIST_CURVES["P-256"][2]
        x, y, d = (int.from_bytes(values[name], "big") for name in shape)
        # SEC 1 §3.2.1: Q = dG
        if not 0 < d < n or _ec_mul_base("P-256", d) != (x, y):
            return "its public point (x, y) is not d times the base point"
    elif _ed25519_public(values["d"]) != values["x"]:
        # RFC 8032 §5.1.5
        return "its public key x is not the one its private key d makes"
    return None


class _DPoP:
    """The key of one DPoP sign-in and the nonces servers gave for it (RFC 9449 §4, §8)."""

    def __init__(self, key):
        self.key = key
        self.alg = "EdDSA" if key["kty"] == "OKP" else "ES256"
        # RFC 7638 §3.2 (RFC 8037 §2 for OKP): the required members, sorted, are the thumbprint's input
        self.public = {name: key[name] for name in ("crv", "kty", "x", "y") if name in key}
        self.nonces = {}

    def thumbprint(self):
        """The RFC 7638 SHA-256 thumbprint of the public key (the token's cnf.jkt)."""
        return _b64url_encode(_sha256(_json_compact(self.public).encode("ascii")).digest())

    def output(self):
        """What the result carries: {"alg", "jkt", "key"} with the private JWK."""
        return {"alg": self.alg, "jkt": self.thumbprint(), "key": self.key}

    def proof(self, method, url, access_token=None, nonce=None):
        """A DPoP proof JWT for one request (RFC 9449 §4.2); ath when a token goes with it."""
        import time
        htu = _dpop_htu(url)
        if htu is None:
            raise ProtocolError("%s is not an absolute http(s) URL; no DPoP proof can name it" % _sanitize(url))
        claims = {"jti": _b64url_encode(os.urandom(16)), "htm": method, "htu": htu, "iat": int(time.time())}
        nonce = nonce or self.nonces.get(_dpop_server(htu))
        if nonce:
            claims["nonce"] = nonce
        if access_token is not None:
            claims["ath"] = _b64url_encode(_sha256(access_token.encode("ascii")).digest())
        return self.jws({"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public}, claims)

    def jws(self, header, claims):
        """The compact JWS of claims under header, signed with this key (RFC 7515 §7.1)."""
        signing_input = (_b64url_encode(_json_compact(header).encode("ascii")) + "."
                         + _b64url_encode(_json_compact(claims).encode("ascii")))
        return signing_input + "." + _b64url_encode(self.sign(signing_input.encode("ascii")))

    def sign(self, message):
        """Ed25519 (RFC 8032 §5.1.6), or ECDSA P-256 with SHA-256 as R || S (RFC 7518 §3.4)."""
        if self.alg == "EdDSA":
            return _ed25519_sign(_b64url_decode(self.key["d"]), _b64url_decode(self.key["x"]), message)
        return _ecdsa_sign("P-256", int.from_bytes(_b64url_decode(self.key["d"]), "big"),
                           _sha256(message).digest(), "sha256")

    def request(self, http, method, url, what, form=None, access_token=None, idempotent=True):
        """Send a request with a proof; when the server asks for a fresh nonce, once more with it."""
        headers = {}
        if access_token is not None:
            headers["Authorization"] = "DPoP " + access_token
        for attempt in (1, 2):
            headers["DPoP"] = self.proof(method, url, access_token)
            response = http.request(method, url, what, form=form, headers=headers, idempotent=idempotent)
            fresh = self._take_nonce(url, response, what)
            if attempt == 2 or not fresh or not _asks_for_nonce(response):
                return response
            http.terminal.debug("%s: the server asked for a DPoP nonce; sending the proof again with it" % what)

    def _take_nonce(self, url, response, what):
        # RFC 9449 §8.2: a DPoP-Nonce header replaces the nonce for that server
        nonce = response.header("dpop-nonce")
        if nonce is None:
            return False
        if not _is_nonce(nonce):
            raise ProtocolError("%s: the DPoP-Nonce header is not a valid nonce: %s" % (what, _sanitize(nonce, 80)))
        server = _dpop_server(url)
        fresh = self.nonces.get(server) != nonce
        self.nonces[server] = nonce
        return fresh


def _dpop_server(url):
    # nonces are per server: scheme and authority
    return "/".join((_dpop_htu(url) or url).split("/", 3)[:3]).lower()


def _asks_for_nonce(response):
    """A use_dpop_nonce answer: 400 from an authorization server (§8), 401 from a resource (§9)."""
    if response.status == 401:
        return 'error="use_dpop_nonce"' in (response.header("www-authenticate") or "")
    if response.status != 400:
        return False
    try:
        document = _loads_json(response.body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("error") == "use_dpop_nonce"


def _dpop_algorithm(requested, metadata):
    """--dpop-alg, else the first of DPOP_ALGORITHMS the issuer lists, else ES256 (RFC 9449 §5.1)."""
    listed = metadata.get("dpop_signing_alg_values_supported")
    if listed is None:
        return requested or "ES256"
    if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
        raise ProtocolError("the issuer metadata's dpop_signing_alg_values_supported is not a list of strings")
    shown = _sanitize(", ".join(listed), 200) or "nothing"
    usable = [alg for alg in DPOP_ALGORITHMS if alg in listed and requested in (None, alg)]
    if not usable:
        if requested:
            raise ProtocolError("--dpop-alg %s: the issuer signs DPoP proofs only with %s" % (requested, shown))
        raise ProtocolError("the issuer accepts DPoP proofs signed with %s; this tool signs with %s only"
                            % (shown, " or ".join(DPOP_ALGORITHMS)))
    return usable[0]


def _check_dpop_binding(dpop, result, verify):
    """The answer must be a DPoP token, bound (cnf.jkt) to our key when it says so (RFC 9449 §5, §6.1)."""
    if result["token_type"].lower() != "dpop":
        raise ProtocolError("the issuer ignored DPoP: token_type is %s, not DPoP" % _sanitize(result["token_type"], 64))
    claims = result.get("claims") or {}
    if "cnf" in claims:
        cnf = claims["cnf"]
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else cnf
        if (jkt is not None or not isinstance(cnf, dict)) and jkt != dpop.thumbprint():
            error = TokenVerificationError if verify else ProtocolError
            raise error("the access token is bound to another key: its cnf.jkt is %s, this sign-in's key is %s"
                        % (_sanitize(_json_text(jkt), 80), dpop.thumbprint()))
    result["dpop"] = dpop.output()


def _cached_dpop(result):
    """The _DPoP of a cached result, or None when it has no usable key."""
    dpop = result.get("dpop")
    key = dpop.get("key") if isinstance(dpop, dict) else None
    return None if _dpop_key_problem(key) else _DPoP(key)


def _dpop_proof_text(method, url, nonce, environ, config=None):
    """--dpop-proof METHOD URL: a proof for that request, with the key and token of the
    environment (VOUCH_DPOP_KEY, VOUCH_ACCESS_TOKEN), else of the cached sign-in."""
    # RFC 9110 §5.6.2 token
    if not method or not all(ch in _TCHAR for ch in method):
        raise UsageError("--dpop-proof: %s is not an HTTP method" % _sanitize(method, 40))
    if _dpop_htu(url) is None:
        raise UsageError("--dpop-proof: %s is not an absolute http(s) URL" % _sanitize(url, 200))
    if nonce is not None and not _is_nonce(nonce):
        raise UsageError("--dpop-nonce: not a DPoP nonce (1 to %d printable ASCII characters, no quotes or"
                         " backslashes)" % _MAX_NONCE)
    text = environ.get("VOUCH_DPOP_KEY")
    if text:
        key = _flat_json_object(text)
        problem = _dpop_key_problem(key) if key is not None else "not a JSON object of strings"
        if problem:
            raise UsageError("VOUCH_DPOP_KEY is not a DPoP key of this tool: %s" % problem)
        token = environ.get("VOUCH_ACCESS_TOKEN")
        if not token:
            raise UsageError("VOUCH_DPOP_KEY is set but VOUCH_ACCESS_TOKEN is not; eval the whole --format shell output")
    else:
        entry = _cache_for(config).load() if config is not None else None
        cached = (entry["result"].get("dpop") or {}) if entry else {}
        problem = _dpop_key_problem(cached.get("key")) if isinstance(cached, dict) and "key" in cached else None
        if problem:
            raise UsageError("--dpop-proof: the cached DPoP key is unusable (%s); sign in again with --dpop --cache"
                             % problem)
        dpop = _cached_dpop(entry["result"]) if entry else None
        if dpop is None:
            raise UsageError("--dpop-proof: no DPoP key; set VOUCH_DPOP_KEY and VOUCH_ACCESS_TOKEN (eval the"
                             " --dpop --format shell output) or sign in with --dpop --cache")
        key, token = dpop.key, entry["result"].get("access_token")
    if not isinstance(token, str) or not all("\x21" <= ch <= "\x7e" for ch in token):
        raise UsageError("--dpop-proof: the access token is not printable ASCII")
    return _DPoP(key).proof(method, url, token, nonce)


def _quick_proof_arguments(argv):
    """(METHOD, URL, NONCE) when argv is only --dpop-proof METHOD URL [--dpop-nonce NONCE], else None."""
    if len(argv) in (3, 5) and argv[0] == "--dpop-proof" and (len(argv) == 3 or argv[3] == "--dpop-nonce"):
        return argv[1], argv[2], argv[4] if len(argv) == 5 else None
    return None


# ============================================================================
# A client of our own (RFC 7591) that authenticates with its key (RFC 7523),
# and requests signed with it (RFC 9421, RFC 9530), as Vouch's /v1 API wants
# ============================================================================

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Vouch's CLI says 60 s; a clock a little off still gets through.
_ASSERTION_LIFETIME = 60
_SIGNATURE_LABEL = "sig1"
_SIGNED_COMPONENTS = ("@method", "@authority", "@path", "@query", "authorization", "dpop")
_FIELD_NAMES = {"dpop": "DPoP"}


class _RegisteredClient:
    """The client id the issuer gave this tool and the P-256 key it registered (RFC 7591 §3.2.1)."""

    def __init__(self, issuer, client_id, key):
        self.issuer = issuer
        self.client_id = client_id
        self.signer = _DPoP(key)
        # RFC 7638 thumbprint as the kid: the same in the JWKS, assertions and Signature-Input
        self.kid = self.signer.thumbprint()
        self.nonces = {}

    def assertion(self):
        """[client_assertion_type, client_assertion] for one request (RFC 7523 §2.2, §3): aud is the issuer."""
        import time
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.issuer,
                  "jti": _b64url_encode(os.urandom(16)), "iat": now, "exp": now + _ASSERTION_LIFETIME}
        header = {"alg": "ES256", "kid": self.kid, "typ": "JWT"}
        return [("client_assertion_type", CLIENT_ASSERTION_TYPE), ("client_assertion", self.signer.jws(header, claims))]


def _client_store(environ, issuer):
    """Where the registered client of issuer lives: beside the cache entries, under the same rules."""
    key = "registered client of " + issuer.rstrip("/")
    return _Cache(_cache_directory(environ), digest="client-" + _sha256(key.encode("utf-8")).hexdigest()[:32], key=key)


def _load_client(store, issuer):
    """The _RegisteredClient kept in store, or None; one that is unusable is reported, not used."""
    entry = store.load()
    if store.unreadable:
        raise UsageError("the registered client %s cannot be used (%s); remove it (rm %s) and run --register again"
                         % (store.path, store.unreadable, store.path))
    if entry is None:
        return None
    kept = entry["result"]
    problem = _dpop_key_problem(kept.get("key"))
    if problem or kept["key"].get("kty") != "EC" or not isinstance(kept.get("client_id"), str):
        raise UsageError("the registered client %s is damaged (%s); remove it (rm %s) and run --register again"
                         % (store.path, problem or "no P-256 key or client id", store.path))
    return _RegisteredClient(issuer.rstrip("/"), kept["client_id"], kept["key"])


def register_client(http, endpoint, key):
    """Register this tool with its public key (RFC 7591 §3.1) and return the client id the issuer chose.

    The client authenticates with private_key_jwt and asks for DPoP-bound
    tokens, as Vouch's /v1 API requires; nothing is secret in the request.
    """
    import json
    import socket
    signer = _DPoP(key)
    public = dict(signer.public, kid=signer.thumbprint(), alg="ES256", use="sig")
    request = {
        "client_name": "%s/%s" % (_PROG, _sanitize(socket.gethostname(), 64) or "unknown"),
        "software_id": _PROG, "software_version": __version__,
        "token_endpoint_auth_method": "private_key_jwt", "token_endpoint_auth_signing_alg": "ES256",
        "grant_types": [DEVICE_CODE_GRANT, "refresh_token"], "response_types": [],
        "dpop_bound_access_tokens": True, "jwks": {"keys": [public]},
    }
    what = "client registration"
    response = http.request("POST", endpoint, what, headers={"Content-Type": "application/json"},
                            content=json.dumps(request).encode("ascii"), idempotent=False)
    if response.status not in (200, 201):
        _raise_for_error_answer(response, what)
    document = _json_document(response, what)
    client_id = document.get("client_id")
    # printable ASCII without blanks or quotes: what later runs, the cache key and the fast path take as it is
    if not isinstance(client_id, str) or not 0 < len(client_id) <= 256 \
            or not all("\x21" <= ch <= "\x7e" and ch not in '"\\' for ch in client_id):
        raise ProtocolError("%s: the answer has no usable client_id: %s" % (what, _sanitize(_json_text(client_id), 80)))
    method = document.get("token_endpoint_auth_method", "private_key_jwt")
    if method != "private_key_jwt":
        # RFC 7591 §3.2.1: the server may change what was asked; a client without its key is not ours
        raise ProtocolError("%s: the issuer registered the client for %s, not private_key_jwt"
                            % (what, _sanitize(_json_text(method), 64)))
    return client_id


def _registered_client(config, http, terminal):
    """The client --register made for this issuer, registered now if there is none (under the cache lock)."""
    store = _client_store(config.environ, config.issuer)
    client = _load_client(store, config.issuer)
    if client is not None or not config.register:
        return client
    store.acquire(terminal)
    try:
        client = _load_client(store, config.issuer)
        if client is None:
            metadata = discover(http, config.issuer)
            # where Vouch's own CLI registers when the metadata names no registration_endpoint
            endpoint = metadata.get("registration_endpoint") or config.issuer.rstrip("/") + "/oauth/register"
            key = _dpop_generate("ES256")
            terminal.add_secret(key["d"])
            client_id = register_client(http, endpoint, key)
            try:
                store.save({"result": {"client_id": client_id, "key": key}})
            except _CacheUnwritable as exc:
                raise UsageError("registered client %s, but could not keep its key (%s); nothing can use it"
                                 % (_sanitize(client_id), exc))
            terminal.info("registered client %s at %s; its key is in %s" % (_sanitize(client_id), config.issuer,
                                                                            store.path))
            client = _RegisteredClient(config.issuer.rstrip("/"), client_id, key)
        return client
    finally:
        store.release()


def _digest_header(body):
    """RFC 9530 §2: Content-Digest with sha-256, a Structured Field byte sequence."""
    import base64
    return "sha-256=:%s:" % base64.b64encode(_sha256(body).digest()).decode("ascii")


def _der_signature(raw):
    """R || S as the DER SEQUENCE of two INTEGERs (RFC 3279 §2.2.3) that Vouch's verifier reads."""
    def integer(octets):
        octets = octets.lstrip(b"\0") or b"\0"
        if octets[0] & 0x80:
            octets = b"\0" + octets
        return b"\x02" + bytes((len(octets),)) + octets
    half = len(raw) // 2
    body = integer(raw[:half]) + integer(raw[half:])
    return b"\x30" + bytes((len(body),)) + body


def _signature_base(method, url, headers, components, parameters):
    """The signature base (RFC 9421 §2.5) of a request; headers by lower-case name."""
    scheme, host, port, target = _parse_url(url, "the signed request's URL")
    path, _, query = target.partition("?")
    # §2.2.3: @authority as the Host field goes; §2.2.7: "?" alone for no query
    derived = {"@method": method.upper(), "@authority": _host_header(scheme, host.lower(), port), "@path": path,
               "@query": "?" + query}
    lines = []
    for name in components:
        value = derived[name] if name.startswith("@") else headers[name].strip()
        lines.append('"%s": %s' % (name, value))
    lines.append('"@signature-params": ' + parameters)
    return "\n".join(lines)


def _signature_parameters(components, created, keyid, nonce):
    # RFC 9421 §2.3, as a Structured Field inner list with parameters (RFC 8941 §3.1.1)
    text = "(%s);created=%d;keyid=\"%s\";alg=\"ecdsa-p256-sha256\"" % (
        " ".join('"%s"' % name for name in components), created, keyid)
    if nonce is not None:
        text += ';nonce="%s"' % nonce
    return text


def _is_signature_nonce(value):
    # an sf-string's characters (RFC 8941 §3.3.3) without the two that would need escaping
    return isinstance(value, str) and 0 < len(value) <= _MAX_NONCE and \
        all(" " <= ch <= "~" and ch not in '"\\' for ch in value)


def signed_request(http, client, method, url, what, access_token, dpop, document=None):
    """A /v1 request as Vouch wants it: DPoP-bound token, RFC 9421 signature, RFC 9530 digest.

    The signature covers @method @authority @path @query authorization dpop
    (and content-type content-digest with a JSON body), carries the
    single-use nonce the server's last answer gave, and is DER-encoded as
    Vouch's verifier reads it. A 401 that brings a fresh nonce is retried once.
    """
    import base64
    import json
    import time
    body = None if document is None else json.dumps(document).encode("ascii")
    server = _dpop_server(url)
    for attempt in (1, 2):
        headers = {"authorization": "DPoP " + access_token, "dpop": dpop.proof(method, url, access_token)}
        components = _SIGNED_COMPONENTS
        if body is not None:
            headers.update({"content-type": "application/json", "content-digest": _digest_header(body)})
            components += ("content-type", "content-digest")
        parameters = _signature_parameters(components, int(time.time()), client.kid, client.nonces.get(server))
        base = _signature_base(method, url, headers, components, parameters)
        signature = base64.b64encode(_der_signature(client.signer.sign(base.encode("utf-8")))).decode("ascii")
        headers["signature-input"] = "%s=%s" % (_SIGNATURE_LABEL, parameters)
        headers["signature"] = "%s=:%s:" % (_SIGNATURE_LABEL, signature)
        response = http.request(method, url, what, headers={_FIELD_NAMES.get(k, k.title()): v for k, v in headers.items()},
                                content=body, idempotent=method == "GET")
        nonce = response.header("signature-nonce")
        fresh = False
        # single-use: the one just sent is spent, whatever the answer
        used = client.nonces.pop(server, None)
        if nonce is not None:
            if not _is_signature_nonce(nonce):
                raise ProtocolError("%s: the Signature-Nonce header is not a nonce: %s" % (what, _sanitize(nonce, 80)))
            fresh = used != nonce
            client.nonces[server] = nonce
        dpop_fresh = dpop._take_nonce(url, response, what)
        if attempt == 2 or response.status != 401 or not (fresh or dpop_fresh):
            return response
        http.terminal.debug("%s: HTTP 401 with a fresh nonce; signing the request again with it" % what)


# ============================================================================
# Tokens: check the token response and gather what the output reports
# ============================================================================

def _claims_of(token, name):
    """Claims of a JWT-shaped token, None for an opaque one.

    A token shaped like a JWS must decode cleanly: a half-valid one is more
    likely an attack or a broken server than an opaque token.
    """
    if _jws_parts(token) is None:
        return None
    try:
        return decode_jwt(token)[1]
    except TokenVerificationError as exc:
        raise ProtocolError("the %s looks like a JWT but is malformed: %s" % (name, exc))


def _hardware_claims(sources, terminal):
    """hardware_verified and hardware_aaguid from the first source that has each.

    Only a JSON boolean counts for hardware_verified: the string "true" is
    reported as null with a warning, never as verified.
    """
    verified = aaguid = None
    found_verified = found_aaguid = False
    for label, claims in sources:
        if not isinstance(claims, dict):
            continue
        if not found_verified and "hardware_verified" in claims:
            found_verified = True
            value = claims["hardware_verified"]
            if isinstance(value, bool):
                verified = value
            else:
                terminal.warn("hardware_verified in the %s is %s, not a boolean; reporting null"
                              % (label, _json_type(value)))
        if not found_aaguid and "hardware_aaguid" in claims:
            found_aaguid = True
            value = claims["hardware_aaguid"]
            if _is_uuid(value):
                aaguid = value.lower()
            elif value is not None:
                terminal.warn("hardware_aaguid in the %s is not a UUID; reporting null" % label)
    return verified, aaguid


def _is_uuid(value):
    """A hyphenated UUID such as an authenticator's AAGUID (RFC 4122 §3)."""
    import re
    return isinstance(value, str) and re.match(
        r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z", value) is not None


def _first_string(name, *sources):
    for source in sources:
        if isinstance(source, dict) and isinstance(source.get(name), str):
            return source[name]
    return None


def token_result(issuer, client_id, document, terminal=None, requested_scope=None, now=None):
    """Check a successful token response and build the output object (SPEC §2).

    The access token and any ID token are decoded without verification;
    `verified` is False until verify_tokens() has checked them.
    """
    import time
    terminal = terminal or _Terminal(quiet=True)
    now = time.time() if now is None else now
    what = "token response"
    access_token = _string_field(document, "access_token", what, _MAX_TOKEN_LENGTH)
    if not all("\x21" <= ch <= "\x7e" for ch in access_token):
        raise ProtocolError("%s: access_token contains characters outside printable ASCII" % what)
    token_type = _string_field(document, "token_type", what, 64)
    expires_in = _number_field(document, "expires_in", None, what, terminal)
    if expires_in is not None and (expires_in < 0 or expires_in > 10 ** 9):
        raise ProtocolError("%s: expires_in out of range: %s" % (what, _sanitize(expires_in, 30)))
    optional = {}
    for name in ("refresh_token", "id_token", "scope"):
        if document.get(name) is not None:
            optional[name] = _string_field(document, name, what, _MAX_TOKEN_LENGTH)
    claims = _claims_of(access_token, "access token")
    id_claims = None
    if "id_token" in optional:
        id_claims = _claims_of(optional["id_token"], "ID token")
        if id_claims is None:
            raise ProtocolError("%s: id_token is not a JWT" % what)
    if expires_in is None and claims is not None and _is_number(claims.get("exp")):
        expires_in = max(0, claims["exp"] - now)
    expires_in = None if expires_in is None else int(expires_in)
    result = {
        "issuer": issuer,
        "client_id": client_id,
        "access_token": access_token,
        "token_type": token_type,
        "expires_in": expires_in,
        "expires_at": None if expires_in is None else int(now) + expires_in,
        "scope": optional.get("scope") or _first_string("scope", claims) or requested_scope,
        "email": _first_string("email", document, claims, id_claims),
        "hardware_verified": None,
        "hardware_aaguid": None,
        "claims": claims,
        "verified": False,
    }
    if "id_token" in optional:
        result["id_token"] = optional["id_token"]
        result["id_token_claims"] = id_claims
    if "refresh_token" in optional:
        result["refresh_token"] = optional["refresh_token"]
    if isinstance(document.get("authorization_details"), list):
        result["authorization_details"] = document["authorization_details"]
    _fill_hardware_claims(result, terminal)
    return result


def _fill_hardware_claims(result, terminal):
    sources = [("access token", result.get("claims")), ("ID token", result.get("id_token_claims")),
               ("userinfo", result.get("userinfo"))]
    result["hardware_verified"], result["hardware_aaguid"] = _hardware_claims(sources, terminal)
    if result.get("email") is None:
        result["email"] = _first_string("email", result.get("userinfo"))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ============================================================================
# Output on stdout: json, shell or the bare token; nothing at all on failure
# ============================================================================

_SHELL_VARIABLES = (
    ("VOUCH_ACCESS_TOKEN", "access_token"),
    ("VOUCH_TOKEN_TYPE", "token_type"),
    ("VOUCH_EXPIRES_AT", "expires_at"),
    ("VOUCH_HARDWARE_VERIFIED", "hardware_verified"),
    ("VOUCH_HARDWARE_AAGUID", "hardware_aaguid"),
    ("VOUCH_EMAIL", "email"),
    ("VOUCH_SUBJECT", "sub"),
    ("VOUCH_DPOP_KEY", "dpop_key"),
    ("VOUCH_DPOP_JKT", "dpop_jkt"),
)


_AWS_PROCESS_FIELDS = ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")
_AWS_SHELL_VARIABLES = (
    ("AWS_ACCESS_KEY_ID", "AccessKeyId"),
    ("AWS_SECRET_ACCESS_KEY", "SecretAccessKey"),
    ("AWS_SESSION_TOKEN", "SessionToken"),
    ("AWS_CREDENTIAL_EXPIRATION", "Expiration"),
)


def _shell_quote(value):
    """POSIX single quoting: nothing inside single quotes is special but the quote."""
    return "'" + value.replace("'", "'\\''") + "'"


# What must never reach a terminal raw (the characters _sanitize replaces): C0,
# DEL, C1 (ESC starts OSC 52, which writes the clipboard) and bidi controls.
_SHELL_UNSHOWABLE = "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"


def _shell_export(name, value):
    """One `export` line that gives eval exactly value in sh, dash, bash, zsh and busybox.

    A value holding a control character is rebuilt by printf from octal
    escapes (POSIX printf: \\ddd), so no control byte is ever written; the
    "_" it ends with survives the command substitution's removal of trailing
    newlines and is then cut off.
    """
    import re
    if not re.search(_SHELL_UNSHOWABLE, value):
        return "export %s=%s\n" % (name, _shell_quote(value))
    escaped = re.sub(_SHELL_UNSHOWABLE, lambda match: "".join("\\%03o" % byte for byte in match.group().encode("utf-8")),
                     value.replace("\\", "\\\\").replace("%", "%%"))
    return 'export %s="$(printf -- %s)"; %s="${%s%%_}"\n' % (name, _shell_quote(escaped + "_"), name, name)


def _shell_value(result, key):
    if key == "sub":
        value = _first_string("sub", result.get("claims"), result.get("id_token_claims"))
    elif key in _AWS_PROCESS_FIELDS:
        value = result["aws"][key]
    elif key.startswith("dpop_"):
        import json
        dpop = result.get("dpop") or {}
        value = json.dumps(dpop["key"], separators=(",", ":")) if key == "dpop_key" and dpop else dpop.get("jkt")
    else:
        value = result.get(key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    value = str(value)
    if "\x00" in value:
        raise ProtocolError("%s contains a NUL character, which no shell variable can hold" % key)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("%s is not valid Unicode text" % key)
    return value


def render_output(result, output_format, pretty=False, exec_api_version=None):
    """The text printed on stdout for --format json, shell, token, exec-credential or aws."""
    import json
    if output_format == "token":
        return result["access_token"] + "\n"
    if output_format == "shell":
        return "".join(_shell_export(name, _shell_value(result, key))
                       for name, key in _SHELL_VARIABLES + (_AWS_SHELL_VARIABLES if "aws" in result else ()))
    if output_format == "exec-credential":
        result = _exec_credential(result, exec_api_version or EXEC_CREDENTIAL_API_VERSIONS[0])
    elif output_format == "aws":
        # credential_process output, Version 1 (the AWS SDKs' process credential provider)
        result = dict(Version=1, **{k: result["aws"][k] for k in _AWS_PROCESS_FIELDS})
    # ensure_ascii keeps every server-supplied control character escaped.
    return json.dumps(result, indent=2 if pretty else None, ensure_ascii=True, allow_nan=False) + "\n"


def _write_stdout(text):
    """Write the result in one go; a closed or broken stdout is a clean UsageError."""
    stream = sys.stdout
    try:
        if stream is None:
            raise OSError("stdout is closed")
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(text.encode("utf-8"))
            buffer.flush()
        else:
            stream.write(text)
            stream.flush()
    except (OSError, ValueError) as exc:
        _silence_stdout()
        raise UsageError("cannot write the result to stdout: %s" % (getattr(exc, "strerror", None) or exc))


def _check_stdout():
    """Refuse to start when stdout is closed (`>&-`): a sign-in the person approved would be lost at the end."""
    import io
    stream = sys.stdout
    try:
        if stream is None:
            raise OSError("stdout is closed")
        os.fstat(stream.fileno())
    except io.UnsupportedOperation:
        # not a file (a caller's StringIO): writable, nothing to check
        return
    except (OSError, ValueError):
        raise UsageError("stdout is closed, so the result would be lost: give the command somewhere to write it")


def _silence_stdout():
    """Point a broken stdout at /dev/null, so the interpreter's last flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# ============================================================================
# Cache (--cache): one 0600 file per sign-in configuration in a 0700 directory
# ============================================================================

CACHE_FORMAT = 2
DEFAULT_MIN_TTL = 300
# Long enough for another process's whole sign-in, restarts aside.
CACHE_LOCK_WAIT = MAX_EXPIRES_IN + 120
# How long a JWKS kept beside a cached token may be reused by --verify.
CACHED_JWKS_TTL = 300


def _cache_directory(environ):
    # XDG Base Directory: a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vouch-device-login")


def _hash(name, data=b""):
    """hashlib's name(data), for sha256, sha384 and sha512 from the interpreter's own modules where it has
    them: loading OpenSSL's costs a cached credential (kubectl, credential_process) or a --dpop-proof more than
    all the rest it does."""
    constructor = _HASHES.get(name)
    if constructor is None:
        try:
            import _sha2 as module  # CPython 3.12 and later
        except ImportError:
            try:
                module = __import__("_sha256" if name == "sha256" else "_sha512")
            except ImportError:
                module = None
        constructor = getattr(module, name, None)
        if constructor is None:
            import hashlib
            constructor = getattr(hashlib, name)
        _HASHES[name] = constructor
    return constructor(data)


_HASHES = {}


def _sha256(data):
    """SHA-256 of data (a hash object), as _hash gets it."""
    return _hash("sha256", data)


class _CacheRefused(UsageError):
    """The cache is not safe to use (another user could write it, a symlink, a file not ours)."""


class _CacheUnwritable(UsageError):
    """The cache could not be written (read-only, full, over quota, not permitted)."""


def _check_private(path, stat_result, kind):
    """Refuse a cache file or directory another user could read or plant."""
    import stat
    geteuid = getattr(os, "geteuid", None)
    if geteuid is not None and stat_result.st_uid != geteuid():
        raise _CacheRefused("%s %s is owned by uid %d, not by you; remove it (rm -rf %s)"
                            % (kind, path, stat_result.st_uid, path))
    if kind == "cache file" and not stat.S_ISREG(stat_result.st_mode):
        raise _CacheRefused("cache file %s is not a regular file; remove it (rm -rf %s)" % (path, path))
    if stat_result.st_mode & 0o077:
        wanted = "700" if kind == "cache directory" else "600"
        raise _CacheRefused("%s %s is readable by group or others (mode %03o); fix it with: chmod %s %s"
                            % (kind, path, stat_result.st_mode & 0o777, wanted, path))


def _check_ancestor(path, stat_result):
    """OpenSSH's rule for the folders above ~/.ssh: root's or ours, and nobody else may write there."""
    import stat
    geteuid = getattr(os, "geteuid", None)
    if geteuid is not None and stat_result.st_uid not in (0, geteuid()):
        raise _CacheRefused("the folder %s above the cache belongs to uid %d, who could swap the cache; use a "
                            "cache of your own (XDG_CACHE_HOME)" % (path, stat_result.st_uid))
    if stat_result.st_mode & 0o022 and not stat_result.st_mode & stat.S_ISVTX:
        raise _CacheRefused("the folder %s above the cache is writable by other users (mode %03o) without the "
                            "sticky bit; fix it with: chmod go-w %s" % (path, stat_result.st_mode & 0o777, path))


# Every step below the cache folder goes through its descriptor where the
# platform can (dir_fd): a folder renamed or swapped after the checks is
# never followed. Elsewhere (Windows) the same steps and checks go by path,
# which a rename between check and use could still defeat.
_AT = {os.open, os.unlink, os.rename, os.stat} <= os.supports_dir_fd
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_TEMPORARY_AGE = 60


def _open_cache_directory(directory, create):
    """A descriptor of the cache directory, every folder from / to it checked; FileNotFoundError when absent.

    Without dir_fd (Windows) the same checks go by path and None stands for the folder.
    """
    import stat
    base, leaf = os.path.split(directory)
    # Symlinks above the cache's own folder (a /home that is a link) are the system's: resolved once, then
    # every component is opened without following one, so none can be swapped in after the check.
    names = [name for name in os.path.realpath(base).split(os.sep) if name] + [leaf]
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(os.sep, flags) if _AT else None
    shown = os.sep
    try:
        for name in names:
            _check_ancestor(shown, os.fstat(fd) if _AT else os.stat(shown))
            parent, shown = shown, os.path.join(shown, name)
            where = {"dir_fd": fd} if _AT else {}
            target = name if _AT else shown
            try:
                status = os.stat(target, follow_symlinks=False, **where)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(target, 0o700, **where)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise _CacheUnwritable("cannot create the cache directory %s: %s" % (shown, exc.strerror or exc))
                status = os.stat(target, follow_symlinks=False, **where)
            except OSError as exc:
                raise _CacheRefused("cannot use %s on the way to the cache: %s" % (parent, exc.strerror or exc))
            if stat.S_ISLNK(status.st_mode):
                raise _CacheRefused("%s is a symlink, which another user could point anywhere; replace it "
                                    "with a folder of your own (rm %s)" % (shown, shown))
            if not stat.S_ISDIR(status.st_mode):
                raise _CacheRefused("%s is not a folder; remove it (rm %s)" % (shown, shown))
            if _AT:
                try:
                    child = os.open(name, flags, dir_fd=fd)
                except OSError as exc:
                    raise _CacheRefused("cannot use %s on the way to the cache: %s" % (shown, exc.strerror or exc))
                os.close(fd)
                fd = child
        _check_private(directory, os.fstat(fd) if _AT else os.stat(directory), "cache directory")
        return fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


class _Cache:
    """The cache entry of one (issuer, client, scope, details, resources).

    The directory is reached as OpenSSH reaches ~/.ssh and then used through
    its descriptor; every file is 0600 and ours, opened without following a
    symlink or waiting on a FIFO. Writes go to a temporary file, fsync,
    rename, fsync of the folder: a run killed at any instant leaves the old
    entry or the new one. The entry and, beside it, the answers a cached
    kubectl or credential_process run prints (_fast_answers) each name the
    sign-in they are for, checked on every load. A lock file keeps two runs
    at once from both signing in.
    """

    def __init__(self, directory, key_parts=None, digest=None, key=None):
        self.directory = directory
        if key is None and digest is None:
            import json
            key = json.dumps(key_parts, sort_keys=True)
        # the text the entry is named after, and that the entry and its answers carry; None: any (--logout)
        self.key = key
        if digest is None:
            digest = _sha256(key.encode("utf-8")).hexdigest()[:32]
        self.digest = digest
        self.path = os.path.join(directory, digest + ".json")
        self.lock_path = os.path.join(directory, digest + ".lock")
        self.answers_path = os.path.join(directory, digest + ".answers")
        self._lock_fd = None
        self._dir_fd = None
        # set by load(): the entry on disk could not be used (unparsable, too large, another sign-in's)
        self.unreadable = None

    def _directory_fd(self, create=False):
        if self._dir_fd is None:
            self._dir_fd = _open_cache_directory(self.directory, create)
        return self._dir_fd if _AT else None

    def _done(self):
        """Close the folder's descriptor after a step, unless the lock keeps it for the steps to come."""
        if self._dir_fd is not None and self._lock_fd is None:
            if _AT:
                os.close(self._dir_fd)
            self._dir_fd = None

    def _at(self, name, create=False):
        """(name, dir_fd) to reach a file of the cache by: relative to the folder's descriptor where possible."""
        fd = self._directory_fd(create)
        return (name, fd) if _AT else (os.path.join(self.directory, name), None)

    def _open_private(self, name, flags, create=False):
        """Open a cache file without following symlinks or blocking; refuse it unless it is ours, regular and 0600.

        FileNotFoundError passes through.
        """
        target, dir_fd = self._at(name, create)
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(target, flags | _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            import errno
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):
                raise _CacheRefused("cache file %s is a symlink or not a regular file; remove it (rm -rf %s)"
                                    % (path, path))
            raise _CacheUnwritable("cannot open the cache file %s: %s" % (path, exc.strerror or exc))
        try:
            _check_private(path, os.fstat(fd), "cache file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read(self, name):
        """A private file's bytes, or None when there is none (or no cache folder yet)."""
        try:
            fd = self._open_private(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        finally:
            self._done()
        with os.fdopen(fd, "rb") as handle:
            try:
                return handle.read(MAX_BODY_BYTES + 1)
            except OSError as exc:
                raise UsageError("cannot read the cache file %s: %s" % (os.path.join(self.directory, name),
                                                                         exc.strerror or exc))

    def load(self, legacy=False):
        """The stored entry as a dict, or None when there is none or it cannot serve this sign-in.

        legacy: also an entry of the format before the key was stored in it, for --logout to revoke.
        """
        self.unreadable = None
        data = self._read(self.digest + ".json")
        if data is None:
            return None
        if len(data) > MAX_BODY_BYTES:
            self.unreadable = "it is larger than the %d bytes a run reads" % MAX_BODY_BYTES
            return None
        try:
            entry = _loads_json(data)
        except ValueError:
            self.unreadable = "it cannot be parsed"
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("result"), dict) \
                or entry.get("format") not in ((CACHE_FORMAT, 1) if legacy else (CACHE_FORMAT,)):
            self.unreadable = "it was written by another version"
            return None
        if self.key is not None and entry.get("key") != self.key and entry["format"] == CACHE_FORMAT:
            self.unreadable = "it was written for another sign-in (%s), not this one (%s)" % (
                _sanitize(entry.get("key"), 200), _sanitize(self.key, 200))
            return None
        return entry

    def save(self, entry):
        """Write the entry and its answers, both or neither; _CacheUnwritable says what failed."""
        import json
        entry = dict(entry, format=CACHE_FORMAT, key=self.key)
        files = [(self.digest + ".json", json.dumps(entry).encode("utf-8"))]
        answers = _fast_answers(entry)
        if answers:
            files.append((self.digest + ".answers", answers.encode("utf-8")))
        for name, data in files:
            if len(data) > MAX_BODY_BYTES:
                raise _CacheUnwritable("the cache file %s would be %d bytes, more than the %d a run reads back"
                                       % (os.path.join(self.directory, name), len(data), MAX_BODY_BYTES))
        import errno
        temporaries = []
        renamed = False
        try:
            for name, data in files:
                temporaries.append((self._write_temporary(name, data), name))
            # The old answers go first: they must never outlive the entry they came from.
            self._discard(self.digest + ".answers")
            while temporaries:
                temporary, name = temporaries[0]
                source, dir_fd = self._at(temporary)
                os.replace(source, self._at(name)[0], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                temporaries.pop(0)
                renamed = True
            if _AT:
                try:
                    os.fsync(self._dir_fd)
                except OSError as exc:
                    # some network and FUSE file systems cannot sync a folder: the renames stand
                    if exc.errno not in (errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL),
                                         getattr(errno, "EOPNOTSUPP", errno.EINVAL)):
                        raise
        except OSError as exc:
            failure = _CacheUnwritable("cannot write the cache file %s: %s"
                                       % (exc.filename or self.path, exc.strerror or exc))
            # the new entry is in place (without its answers, which kubectl then does without)
            failure.saved = renamed
            raise failure
        finally:
            try:
                for temporary, _name in temporaries:
                    self._discard(temporary)
            finally:
                self._done()

    def _write_temporary(self, name, data):
        """A new 0600 file beside name holding data, synced; its name."""
        temporary = ".%s.%s.tmp" % (name, _b64url_encode(os.urandom(9)))
        fd = self._open_private(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, create=True)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            self._discard(temporary)
            # Named after the file being written, not the temporary one.
            raise OSError(exc.errno, exc.strerror, os.path.join(self.directory, name))
        return temporary

    def delete(self):
        """Remove the entry and its answers; True when there was an entry."""
        try:
            self._discard(self.digest + ".answers")
            return self._discard(self.digest + ".json")
        finally:
            self._done()

    def _discard(self, name):
        try:
            target, dir_fd = self._at(name)
            os.unlink(target, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _CacheUnwritable("cannot remove the cache file %s: %s"
                                   % (os.path.join(self.directory, name), exc.strerror or exc))

    def load_answers(self):
        """The lines _fast_answers wrote for this very sign-in, or None when there are none."""
        data = self._read(self.digest + ".answers")
        try:
            text = None if data is None else data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError("cannot read the cache file %s: %s" % (self.answers_path, exc))
        header = "key\t%s\n" % self.key
        return text[len(header):] if text is not None and text.startswith(header) else None

    def acquire(self, terminal, wait=CACHE_LOCK_WAIT):
        """Take the entry's lock, waiting (bounded) for another run holding it; then clear stale temporaries.

        A lock that cannot be made (a read-only cache) is a warning: the run goes on unlocked.
        """
        try:
            import fcntl
        except ImportError:
            terminal.debug("no fcntl here; concurrent runs are not serialised")
            return
        import errno
        deadline = _monotonic() + wait
        told = False
        while True:
            try:
                fd = self._open_private(self.digest + ".lock", os.O_RDWR | os.O_CREAT, create=True)
            except _CacheUnwritable as exc:
                self._done()
                terminal.warn("%s; going on without the lock" % exc)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    # NFS without lockd, a FUSE file system without flock: nobody holds it, nobody can
                    self._done()
                    terminal.warn("cannot lock the cache file %s: %s; going on without the lock"
                                  % (self.lock_path, exc.strerror or exc))
                    return
                if _monotonic() >= deadline:
                    self._done()
                    raise ExpiredError("gave up after %d s waiting for another sign-in to finish (%s)"
                                       % (wait, self.lock_path))
                if not told:
                    terminal.info("another vouch_device_login is signing in; waiting for it")
                    told = True
                _sleep(0.2)
                continue
            # A lock file that --logout removed while we waited locks nothing any more: take the new one.
            target, dir_fd = self._at(self.digest + ".lock")
            try:
                now_there = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                now_there = None
            held = os.fstat(fd)
            if now_there is not None and (now_there.st_dev, now_there.st_ino) == (held.st_dev, held.st_ino):
                self._lock_fd = fd
                break
            os.close(fd)
        self._remove_stale_temporaries(terminal)

    def _remove_stale_temporaries(self, terminal):
        """Temporary files of this tool that a killed run left (they may hold tokens): gone after a minute."""
        import re
        import stat
        import time
        try:
            names = os.listdir(self._dir_fd if _AT else self.directory)
        except OSError:
            return
        for name in names:
            if re.match(r"\.(client-)?[0-9a-f]{32}\.(json|answers)\.[A-Za-z0-9_-]+\.tmp\Z", name):
                target, dir_fd = self._at(name)
                try:
                    status = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISREG(status.st_mode) and time.time() - status.st_mtime > _TEMPORARY_AGE:
                        os.unlink(target, dir_fd=dir_fd)
                        terminal.debug("removed %s, left by a run that was killed" % name)
                except OSError:
                    pass

    def release(self, remove=False):
        """Let the next run in; closing the descriptor drops the flock.

        remove=True deletes the lock file first, while it is still held: a
        run waiting on it then signs in anew, which is all it would have done.
        """
        if self._lock_fd is not None:
            if remove:
                try:
                    self._discard(self.digest + ".lock")
                except UsageError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None
        self._done()


def _write_replacing(path, data, mode):
    """Write data to path with this mode through a temporary file and a rename.

    Readers see the old file or the new one, never half of one, and a symlink
    at path is replaced, never followed (mkstemp creates its file 0600 with
    O_EXCL and O_NOFOLLOW).
    """
    import tempfile
    folder, name = os.path.split(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            # on the open file: a path could be swapped for a symlink in between (Windows has only the path)
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), mode)
        if not hasattr(os, "fchmod"):
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError):
            # Named after the file being written, not the temporary one.
            raise OSError(exc.errno, exc.strerror, path)
        raise


def _reusable(entry, min_ttl, now, dpop=False, dpop_alg=None):
    """The cached result when its token has more than min_ttl seconds left.

    A DPoP sign-in and a bearer one do not stand in for each other, nor keys of
    another algorithm than an explicit --dpop-alg.
    """
    if entry is None:
        return None
    cached = _cached_dpop(entry["result"])
    if (cached is not None) != dpop or (cached is not None and dpop_alg not in (None, cached.alg)):
        return None
    expires_at = entry["result"].get("expires_at")
    if _is_number(expires_at) and expires_at - now > min_ttl:
        return entry["result"]
    return None


def _reusable_for(config, entry, now):
    """The cached result this run can use without signing in, or None.

    Cached AWS credentials of the role asked for do not need the token any
    more; a token handed to kubectl or STS (the ID token, when there is one)
    must itself have more than --min-ttl seconds left.
    """
    if config.aws_role_arn and _cached_aws(config, entry, now) is not None:
        return entry["result"]
    result = _reusable(entry, config.min_ttl, now, config.dpop, config.dpop_alg)
    if result is not None and (config.aws_role_arn or config.output_format == "exec-credential"):
        expires_at = _handed_token(result)[1]
        if expires_at is not None and expires_at - now <= config.min_ttl:
            return None
    return result


# ============================================================================
# Sign-in: endpoints, device code, prompt, polling, restarts
# ============================================================================

def _resolve_endpoints(config, http):
    """The endpoints to use: explicit flags win, then discovery (SPEC §2)."""
    metadata = {}
    explicit = {
        "device_authorization_endpoint": config.device_authorization_endpoint,
        "token_endpoint": config.token_endpoint,
    }
    if not all(explicit.values()) or config.needs_metadata:
        metadata = dict(discover(http, config.issuer))
    for name, value in explicit.items():
        if value:
            metadata[name] = value
    metadata.setdefault("issuer", config.issuer)
    metadata.setdefault("device_authorization_endpoint", config.issuer.rstrip("/") + "/oauth/device")
    if not metadata.get("token_endpoint"):
        raise ProtocolError("the issuer metadata names no token_endpoint; pass --token-endpoint")
    if config.client is not None:
        # RFC 7523 §3: the assertion's aud names the issuer exactly as it names itself
        config.client.issuer = metadata["issuer"]
    return metadata


def _sign_in(config, http, terminal, metadata, dpop=None):
    """Run the device flow, restarting with a new code when one expires."""
    if config.interactive is False:
        if config.helper:
            raise UsageError("no usable sign-in for %s at %s: run %s --cache in a terminal to sign in, then retry"
                             % (config.helper, config.issuer, _LAUNCHER_NAME))
        raise UsageError("a sign-in is needed, but kubectl runs this without a terminal (KUBERNETES_EXEC_INFO "
                         "says interactive: false): run the same command in a terminal to sign in, then retry")
    restarts = 0
    while True:
        device = request_device_authorization(
            http, metadata["device_authorization_endpoint"], config.client_id, config.scope,
            config.extra_device_parameters)
        terminal.add_secret(device.device_code)
        show_prompt(device, terminal, _presenters(config, terminal), bold=_color_allowed(terminal, config.environ),
                    picture=_qr_presenter(config.environ) if config.qr else None)
        countdown = _Countdown(terminal, device.received_at + device.expires_in,
                               live=_live_allowed(terminal, config.environ))
        try:
            document = poll_for_token(http, metadata["token_endpoint"], config.client_id, device,
                                      sleep=None if terminal.quiet else countdown.sleep, dpop=dpop,
                                      report=None if terminal.quiet else countdown.unreachable)
        except _DeviceCodeExpired:
            if restarts >= config.max_restarts:
                raise ExpiredError("the code expired before the sign-in was approved%s"
                                   % (" (after %d restarts)" % restarts if restarts else ""))
            restarts += 1
            terminal.info("the code expired; getting a new one (restart %d of %d)"
                          % (restarts, config.max_restarts))
            continue
        finally:
            countdown.finish()
        _remember_secrets(terminal, document)
        return document


def _presenters(config, terminal):
    """The prompt extras this run asked for or that suit this terminal."""
    presenters = []
    if config.copy:
        presenters.append(_copy_presenter(config.environ))
    browser = config.browser
    if browser is None:
        browser = _browser_visible(config.environ, terminal)
    if browser:
        presenters.append(_browser_presenter)
    return presenters


def _remember_secrets(terminal, document):
    for name in ("access_token", "refresh_token", "id_token"):
        terminal.add_secret(document.get(name))
    if isinstance(document.get("aws"), dict):
        for name in ("SecretAccessKey", "SessionToken"):
            terminal.add_secret(document["aws"].get(name))
    if isinstance(document.get("dpop"), dict) and isinstance(document["dpop"].get("key"), dict):
        terminal.add_secret(document["dpop"]["key"].get("d"))


def _refresh(config, http, terminal, metadata, refresh_token, dpop=None):
    """Trade a refresh token for new tokens (RFC 6749 §6), with the DPoP key of the sign-in if any.

    None when refused.
    """
    form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token), ("client_id", config.client_id)]
    try:
        if dpop is None:
            response = http.post(metadata["token_endpoint"], "token refresh", form, idempotent=False)
        else:
            response = dpop.request(http, "POST", metadata["token_endpoint"], "token refresh", form, idempotent=False)
    except NetworkError as exc:
        terminal.warn("could not refresh the cached token (%s); signing in again" % exc)
        return None
    if response.status != 200:
        terminal.info("the refresh token was not accepted (HTTP %d); signing in again" % response.status)
        return None
    document = _json_document(response, "token refresh")
    _remember_secrets(terminal, document)
    if document.get("refresh_token") is None:
        # RFC 6749 §6: without a new refresh token the old one stays valid.
        document = dict(document, refresh_token=refresh_token)
    return document


def fetch_userinfo(http, endpoint, access_token, subject=None, dpop=None):
    """GET the UserInfo endpoint (OpenID Connect Core §5.3) with the access token.

    The answer must be a JSON object whose `sub`, when the token has one,
    is the token's subject (§5.3.2): anything else could be another user's.
    With `dpop` the token goes as `DPoP` with a proof (RFC 9449 §7).
    """
    if dpop is None:
        response = http.get(endpoint, "userinfo", headers={"Authorization": "Bearer " + access_token})
    else:
        response = dpop.request(http, "GET", endpoint, "userinfo", access_token=access_token)
    if response.status != 200:
        _raise_for_error_answer(response, "userinfo")
    info = _json_document(response, "userinfo")
    if subject is not None and info.get("sub") != subject:
        raise ProtocolError("userinfo: sub %s does not match the token's subject"
                            % _sanitize(_json_text(info.get("sub")), 80))
    return info


def _json_text(value):
    """A value as compact JSON, for messages."""
    import json
    return json.dumps(value)


def _revoke(config, http, terminal, metadata, result):
    """Revoke the refresh token, then the access token (RFC 7009 §2.1).

    Returns a list of failure descriptions; an empty list means all went well.
    """
    endpoint = metadata.get("revocation_endpoint")
    if not endpoint:
        terminal.info("the issuer has no revocation endpoint; removing the tokens locally only")
        return []
    failures = []
    for hint in ("refresh_token", "access_token"):
        token = result.get(hint)
        if not token:
            continue
        form = [("token", token), ("token_type_hint", hint), ("client_id", config.client_id)]
        try:
            response = http.post(endpoint, "token revocation", form, idempotent=False)
        except NetworkError as exc:
            failures.append(str(exc))
            continue
        if response.status != 200:
            failures.append("revoking the %s: HTTP %d" % (hint.replace("_", " "), response.status))
    return failures


class _KeySource:
    """The JWKS to verify with: --jwks FILE, --jwks-uri, discovery, or a cached copy.

    Fetched on first use; an unknown kid may refetch it once (key rotation).
    """

    def __init__(self, config, http, metadata, cached=None):
        self.config = config
        self.http = http
        self.metadata = metadata
        self.jwks = cached
        self.fetched_at = None
        self.refetched = False

    def keys(self):
        """The JWKS, loaded or fetched on first use."""
        if self.jwks is None:
            self.jwks = self.config.jwks if self.config.jwks_file else self._fetch()
        return self.jwks

    def refetch(self):
        """A fresh JWKS from the network, at most once; None when not possible."""
        if self.config.jwks_file or self.refetched:
            return None
        self.refetched = True
        self.http.terminal.debug("unknown kid; fetching the JWKS again")
        self.jwks = self._fetch()
        return self.jwks

    def _fetch(self):
        import time
        url = self.config.jwks_uri or self.metadata.get("jwks_uri")
        if not url:
            raise TokenVerificationError("--verify: the issuer metadata names no jwks_uri; pass --jwks-uri or --jwks")
        response = self.http.get(url, "JWKS")
        if response.status != 200:
            _raise_http_status(response, "JWKS (%s)" % _sanitize(url))
        # Judged by parsing, not by Content-Type: providers use several +json types.
        jwks = _check_jwks(_loads_or_none(response.body), url)
        self.fetched_at = time.time()
        return jwks


def _loads_or_none(data):
    try:
        return _loads_json(data)
    except ValueError:
        return None


def _check_jwks(document, source):
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise TokenVerificationError("%s is not a JWK Set (a JSON object with a keys array)" % _sanitize(source))
    return document


def _read_jwks_file(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BODY_BYTES + 1)
    except OSError as exc:
        raise UsageError("--jwks %s: %s" % (path, exc.strerror or exc))
    return _check_jwks(_loads_or_none(data), path)


def _verify_token(token, source, **checks):
    try:
        return verify_jwt(token, source.keys(), **checks)
    except _UnknownKidError:
        jwks = source.refetch()
        if jwks is None:
            raise
        return verify_jwt(token, jwks, **checks)


def _verify_result(config, source, result):
    """Check every token of a result against the issuer's JWKS (SPEC §3)."""
    if result.get("claims") is None:
        raise TokenVerificationError("--verify: the access token is opaque (not a JWT), so it cannot be verified")
    issuer = source.metadata.get("issuer") or config.issuer
    try:
        _verify_token(result["access_token"], source, issuer=issuer, audience=config.audience,
                      typ="at+jwt", leeway=config.leeway)
    except TokenVerificationError as exc:
        raise TokenVerificationError("access token: %s%s" % (exc, _audience_advice(exc, config)))
    if result.get("id_token"):
        try:
            _verify_token(result["id_token"], source, issuer=issuer, audience=config.client_id,
                          typ=NOT_AT_JWT, azp=config.client_id, leeway=config.leeway)
        except TokenVerificationError as exc:
            raise TokenVerificationError("ID token: %s" % exc)
    result["verified"] = True


def _audience_advice(exc, config):
    """What to do when aud was the check that failed: some servers (Glewlwyd for one) put the scopes there."""
    if not str(exc).startswith(("aud ", "token has no aud")):
        return ""
    if config.audience != config.client_id:
        return " (the audience --audience asked for)"
    return ("; the expected audience is the client id, the default: pass --audience with the one this issuer "
            "puts in aud (some, Glewlwyd for one, put the scopes there)")


def _check_policy(config, result):
    """Apply --require-hardware and --require-aaguid (exit 8 when not met)."""
    if config.require_hardware and result.get("hardware_verified") is not True:
        raise PolicyError("--require-hardware: hardware_verified is %s, not true"
                          % _json_text(result.get("hardware_verified")))
    if config.require_aaguid and result.get("hardware_aaguid") not in config.require_aaguid:
        raise PolicyError("--require-aaguid: hardware_aaguid is %s, not one of %s"
                          % (_json_text(result.get("hardware_aaguid")), ", ".join(config.require_aaguid)))


def _fresh_result(config, http, terminal, entry):
    """Sign in (or refresh a cached sign-in) and build the checked result."""
    import time
    metadata = _resolve_endpoints(config, http)
    document = None
    if entry is not None:
        _remember_secrets(terminal, entry["result"])
    refresh_token = (entry or {}).get("result", {}).get("refresh_token")
    # a DPoP-bound refresh token works only with its key, a bearer one only without
    dpop = _cached_dpop(entry["result"]) if entry is not None else None
    if isinstance(refresh_token, str) and (dpop is not None) == config.dpop:
        document = _refresh(config, http, terminal, metadata, refresh_token, dpop)
    if document is None:
        dpop = None
        if config.dpop:
            dpop = _DPoP(_dpop_generate(_dpop_algorithm(config.dpop_alg, metadata)))
            terminal.add_secret(dpop.key["d"])
            terminal.debug("DPoP: a new %s key, thumbprint %s" % (dpop.alg, dpop.thumbprint()))
        document = _sign_in(config, http, terminal, metadata, dpop)
    result = token_result(metadata["issuer"], config.client_id, document, terminal,
                          requested_scope=config.scope or None, now=time.time())
    if dpop is not None:
        _check_dpop_binding(dpop, result, config.verify)
    if config.userinfo:
        _add_userinfo(config, http, terminal, metadata, result, dpop)
    source = _KeySource(config, http, metadata)
    if config.verify:
        _verify_result(config, source, result)
    return result, metadata, source


def _add_userinfo(config, http, terminal, metadata, result, dpop=None):
    endpoint = metadata.get("userinfo_endpoint")
    if not endpoint:
        raise ProtocolError("--userinfo: the issuer metadata names no userinfo_endpoint")
    subject = _first_string("sub", result.get("claims"), result.get("id_token_claims"))
    result["userinfo"] = fetch_userinfo(http, endpoint, result["access_token"], subject,
                                        dpop or _cached_dpop(result))
    _fill_hardware_claims(result, terminal)


def _cache_for(config):
    return _Cache(_cache_directory(config.environ), [
        config.issuer.rstrip("/"), config.client_id, config.scope, config.authorization_details,
        sorted(config.resources)])


def _metadata_subset(metadata):
    return {k: metadata[k] for k in ("issuer",) + _ENDPOINT_FIELDS if metadata.get(k)}


def _run(config, http, terminal):
    """Do what the command line asked; return the result to print, or None."""
    import time
    if config.register and config.client is None:
        config.client = _registered_client(config, http, terminal)
        config.client_id = config.client.client_id
    if config.client is not None:
        http.client_assertion = config.client.assertion
        config.audience = config.audience or config.client_id
    if config.logout:
        _logout(config, http, terminal)
        return None
    if config.inspect is not None:
        return _inspect(config, http)
    cache = _cache_for(config) if config.cache else None
    entry = result = None
    if cache is not None:
        try:
            entry = _load_warning(cache, terminal)
            result = _reusable_for(config, entry, time.time())
            if result is None:
                cache.acquire(terminal)
        except UsageError as exc:
            # kubectl and credential_process would sign in on every command without it: theirs is an error
            if config.output_format in ("exec-credential", "aws"):
                raise
            terminal.warn("%s; signing in without the cache" % exc)
            cache.release()
            cache = None
    if cache is None:
        result = _fresh_result(config, http, terminal, None)[0]
        _check_policy(config, result)
        if config.aws_role_arn:
            _add_aws_credentials(config, http, terminal, result)
        if config.k8s_audience:
            _add_k8s_token(config, http, terminal, result)
        terminal.info(_summary(result, time.time()))
        return result
    if result is None:
        try:
            try:
                entry = _load_warning(cache, terminal) if cache.unreadable is None else cache.load()
            except UsageError as exc:
                # changed since the first look: signed in anew, and the new entry replaces it
                terminal.warn("%s; signing in again" % exc)
                entry = None
            result = _reusable_for(config, entry, time.time())
            if result is None:
                result, metadata, source = _fresh_result(config, http, terminal, entry)
                stored = {"result": result, "metadata": _metadata_subset(metadata)}
                if config.client is not None:
                    # its answers (Vouch's tokens for kubectl, AWS credentials) are the fast path's
                    stored["registered"] = True
                if source.fetched_at is not None:
                    stored.update(jwks=source.jwks, jwks_fetched_at=source.fetched_at)
                _save_or_warn(cache, stored, entry, terminal)
                result["cached"] = False
        finally:
            cache.release()
    if "cached" not in result:
        _remember_secrets(terminal, result)
        result.update(cached=True, verified=False)
        metadata = entry.get("metadata") or {}
        wants_jwks_uri = config.verify and not (config.jwks_file or config.jwks_uri)
        if (config.userinfo and not metadata.get("userinfo_endpoint")) or \
                (wants_jwks_uri and not metadata.get("jwks_uri")):
            metadata = dict(discover(http, config.issuer), **metadata)
        if config.userinfo and "userinfo" not in result:
            _add_userinfo(config, http, terminal, metadata, result)
        if config.verify:
            fetched_at = entry.get("jwks_fetched_at")
            fresh = _is_number(fetched_at) and 0 <= time.time() - fetched_at < CACHED_JWKS_TTL
            _verify_result(config, _KeySource(config, http, metadata, entry.get("jwks") if fresh else None), result)
    _check_policy(config, result)
    if config.aws_role_arn:
        # After the policy check: no token reaches STS unless the policy allows it.
        _add_aws_credentials(config, http, terminal, result, cache, entry)
    if config.k8s_audience:
        _add_k8s_token(config, http, terminal, result, cache, entry)
    # kubectl shows its plugin's stderr on every command: only a sign-in is news there.
    quiet_hit = result.get("cached") and (config.output_format in ("exec-credential", "aws")
                                          or config.helper in ("git", "Docker"))
    (terminal.debug if quiet_hit else terminal.info)(_summary(result, time.time()))
    return result


def _load_warning(cache, terminal):
    """cache.load(), saying why an entry that is there cannot serve this sign-in."""
    entry = cache.load()
    if cache.unreadable:
        terminal.warn("the cache entry %s is not used: %s; signing in again" % (cache.path, cache.unreadable))
    return entry


def _save_or_warn(cache, stored, old, terminal):
    """Save a new sign-in; when the cache cannot take it, the token is still printed and the warning says so.

    The old entry goes too when its refresh token was just spent: presented
    again, a rotating issuer would take it for theft and end the session.
    """
    try:
        cache.save(stored)
        return
    except UsageError as exc:
        problem = str(exc)
        if getattr(exc, "saved", False):
            terminal.warn("the token was saved in the cache, but not all of it: %s" % problem)
            return
    spent = (old or {}).get("result", {}).get("refresh_token")
    if spent and spent != stored["result"].get("refresh_token"):
        try:
            cache.delete()
            problem += "; the old entry was removed, as its refresh token is spent"
        except UsageError:
            problem += "; the old refresh token is spent, so the next run signs in again"
    terminal.warn("the token was not saved in the cache (neither the entry nor its answers): %s" % problem)


def _summary(result, now):
    """The line that ends a sign-in: who, whether hardware-verified, and for how long."""
    who = result.get("email") or _first_string("sub", result.get("claims"), result.get("id_token_claims"),
                                               result.get("userinfo"))
    parts = [_sanitize(who, 200) if who else "an unnamed user",
             {True: "hardware-verified", False: "not hardware-verified", None: "no hardware claim"}[
                 result.get("hardware_verified")]]
    expires_at = result.get("expires_at")
    if result.get("cached"):
        if _is_number(expires_at):
            parts.append("%s left" % _format_duration(expires_at - now))
        return "using the cached token: " + ", ".join(parts)
    if _is_number(expires_at):
        parts.append("for %s" % _format_duration(expires_at - now))
    return "signed in as " + ", ".join(parts)


def _inspect(config, http):
    """--inspect: decode (and with --verify, verify) a token given by the user."""
    try:
        header, claims = decode_jwt(config.inspect)
    except TokenVerificationError as exc:
        if config.verify:
            raise
        raise UsageError("--inspect: %s" % exc)
    result = {"header": header, "claims": claims, "verified": False}
    hardware_verified, aaguid = _hardware_claims([("token", claims)], http.terminal)
    if config.verify:
        metadata = {} if (config.jwks_file or config.jwks_uri) else discover(http, config.issuer)
        source = _KeySource(config, http, metadata)
        typ = header.get("typ")
        access = isinstance(typ, str) and _media_type(typ) == "application/at+jwt"
        checks = {"issuer": metadata.get("issuer") or config.issuer, "audience": config.audience,
                  "leeway": config.leeway, "typ": "at+jwt" if access else NOT_AT_JWT}
        if not access:
            checks["azp"] = config.client_id
        try:
            _verify_token(config.inspect, source, **checks)
        except TokenVerificationError as exc:
            raise TokenVerificationError("%s%s" % (exc, _audience_advice(exc, config) if access else ""))
        result["verified"] = True
    _check_policy(config, {"hardware_verified": hardware_verified, "hardware_aaguid": aaguid})
    return result


def _logout(config, http, terminal):
    """Revoke and delete every cached sign-in of the issuer and client id; nothing to remove is not an error.

    Whatever scope, resources or authorization details a sign-in was made
    with, it is the same person's session with this client: all of them go.
    """
    own = _cache_for(config)
    own.load(legacy=True)
    if own.unreadable:
        # Unreadable, it could still be served by its answers; whoever it was for, it goes.
        own.delete()
        terminal.info("removed the cache entry %s and its answers: %s" % (own.path, own.unreadable))
    caches = _cached_sign_ins(config)
    if not caches:
        if not own.unreadable:
            terminal.info("no cached sign-in of client %s at %s to remove" % (config.client_id, config.issuer))
        return
    discovered = None
    failures = []
    removed = 0
    for cache in caches:
        cache.acquire(terminal)
        try:
            entry = cache.load(legacy=True)
            if not _same_sign_in(entry, config):
                continue
            _remember_secrets(terminal, entry["result"])
            metadata = entry.get("metadata") or {}
            if not metadata.get("revocation_endpoint") and not config.token_endpoint:
                if discovered is None:
                    try:
                        discovered = discover(http, config.issuer)
                    except VouchError as exc:
                        terminal.warn("cannot find the revocation endpoint (%s)" % exc)
                        discovered = {}
                metadata = discovered
            failures.extend(_revoke(config, http, terminal, metadata, entry["result"]))
            cache.delete()
            removed += 1
        finally:
            cache.release(remove=True)
    count = "the cached sign-in" if removed == 1 else "%d cached sign-ins" % removed
    if failures:
        raise NetworkError("removed %s, but revocation failed: %s" % (count, "; ".join(failures)))
    terminal.info("signed out: %s revoked and removed" % count)


def _cached_sign_ins(config):
    """The cache entries of the configured issuer and client id, whatever else they were made with."""
    directory = _cache_directory(config.environ)
    try:
        fd = _open_cache_directory(directory, create=False)
    except FileNotFoundError:
        return []
    try:
        names = sorted(os.listdir(fd if _AT else directory))
    except OSError as exc:
        raise UsageError("cannot use the cache directory %s: %s" % (directory, exc.strerror or exc))
    finally:
        os.close(fd)
    caches = []
    for name in names:
        digest, _dot, extension = name.partition(".")
        if extension == "json" and len(digest) == 32:
            cache = _Cache(directory, digest=digest)
            if _same_sign_in(cache.load(legacy=True), config):
                caches.append(cache)
    return caches


def _same_sign_in(entry, config):
    result = (entry or {}).get("result") or {}
    issuer = result.get("issuer")
    return result.get("client_id") == config.client_id and isinstance(issuer, str) \
        and issuer.rstrip("/") == config.issuer.rstrip("/")


# ============================================================================
# Credentials for other tools: kubectl's exec plugin (client-go ExecCredential)
# and AWS STS AssumeRoleWithWebIdentity (for credential_process)
# ============================================================================

# v1beta1 is read by every kubectl since 1.11, v1 only since 1.22.
EXEC_CREDENTIAL_API_VERSIONS = ("client.authentication.k8s.io/v1beta1", "client.authentication.k8s.io/v1")
DEFAULT_AWS_DURATION = 3600
_STS_VERSION = "2011-06-15"
# A real AssumeRoleWithWebIdentity answer is about 2 KB, most of it the session token.
MAX_STS_BODY_BYTES = 64 * 1024
# Error codes STS sends with HTTP 400 that mean "try again later"; the AWS SDKs retry them.
_STS_RETRYABLE = frozenset(("Throttling", "ThrottlingException", "RequestLimitExceeded", "IDPCommunicationError"))
# STS's own patterns (API reference, AssumeRoleWithWebIdentity), ASCII only.
_ROLE_ARN_PATTERN = r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}\Z"
_SESSION_NAME_PATTERN = r"[\w+=,.@-]{2,64}\Z"
_REGION_PATTERN = r"[a-z]{2,4}(-[a-z0-9]+){1,4}\Z"
# The largest year RFC 3339 can write.
_MAX_EPOCH = 253402300799


def _exec_info(environ):
    """(apiVersion, interactive) from KUBERNETES_EXEC_INFO, which kubectl sets for its exec plugins.

    v1beta1 when the variable is absent, unreadable or names another version;
    interactive is None unless the variable says true or false.
    """
    text = environ.get("KUBERNETES_EXEC_INFO")
    try:
        info = _loads_json(text) if text else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return EXEC_CREDENTIAL_API_VERSIONS[0], None
    api_version = info.get("apiVersion")
    if api_version not in EXEC_CREDENTIAL_API_VERSIONS:
        api_version = EXEC_CREDENTIAL_API_VERSIONS[0]
    spec = info.get("spec")
    interactive = spec.get("interactive") if isinstance(spec, dict) else None
    return api_version, interactive if isinstance(interactive, bool) else None


def _handed_token(result):
    """The token other tools get, with its expiry: Vouch's token for the cluster (a registered client), the ID
    token when there is one (as kubelogin does), else the access token."""
    if isinstance(result.get("k8s"), dict):
        return result["k8s"]["token"], result["k8s"]["expires_at"]
    if result.get("id_token"):
        expires_at = (result.get("id_token_claims") or {}).get("exp")
        return result["id_token"], expires_at if _is_number(expires_at) else None
    return result["access_token"], result.get("expires_at")


def _rfc3339(epoch):
    """Epoch seconds as RFC 3339 UTC, 2026-11-30T12:00:00Z."""
    import time
    if not 0 <= epoch <= _MAX_EPOCH:
        raise ProtocolError("the token's expiry is out of range: %s" % _sanitize(epoch, 40))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))


def _exec_credential(result, api_version=EXEC_CREDENTIAL_API_VERSIONS[0]):
    """The client-go ExecCredential (kubectl's exec plugin answer) for a result."""
    token, expires_at = _handed_token(result)
    status = {"token": token}
    if expires_at is not None:
        status["expirationTimestamp"] = _rfc3339(expires_at)
    return {"kind": "ExecCredential", "apiVersion": api_version, "spec": {}, "status": status}


def _aws_settings(args, environ):
    """The --aws-* settings as _Config fields, checked; UsageError for a bad one."""
    import re
    role_arn = _role_arn(args.aws_role_arn, args.format, environ)
    if role_arn is None:
        for flag in ("aws_region", "aws_sts_endpoint", "aws_session_name", "aws_duration"):
            if getattr(args, flag) is not None:
                raise UsageError("--%s needs --aws-role-arn (or VOUCH_AWS_ROLE_ARN)" % flag.replace("_", "-"))
        if args.format == "aws":
            raise UsageError("--format aws needs --aws-role-arn ARN (or VOUCH_AWS_ROLE_ARN)")
        return {"aws_role_arn": None}
    if args.format not in ("json", "shell", "aws"):
        raise UsageError("--aws-role-arn prints AWS credentials with --format aws, json or shell, not %s"
                         % args.format)
    if not re.match(_ROLE_ARN_PATTERN, role_arn, re.ASCII):
        raise UsageError("--aws-role-arn %s: not an IAM role ARN like arn:aws:iam::123456789012:role/NAME"
                         % _sanitize(role_arn))
    endpoint, what, region = _sts_endpoint(args.aws_sts_endpoint, args.aws_region, environ)
    # A region from the environment that names no endpoint may be meant for other tools.
    if region is not None and (what is None or args.aws_region) and not re.match(_REGION_PATTERN, region):
        raise UsageError("AWS region %s: not a region name like eu-west-1" % _sanitize(region))
    if what is not None:
        try:
            _parse_url(endpoint, what)
        except ProtocolError as exc:
            raise UsageError(str(exc))
    session_name = args.aws_session_name
    if session_name is not None and not re.match(_SESSION_NAME_PATTERN, session_name, re.ASCII):
        raise UsageError("--aws-session-name %s: 2 to 64 of the characters A-Z a-z 0-9 _ + = , . @ -"
                         % _sanitize(session_name))
    duration = DEFAULT_AWS_DURATION if args.aws_duration is None else args.aws_duration
    if not 900 <= duration <= 43200:
        raise UsageError("--aws-duration must be between 900 and 43200 seconds")
    return {"aws_role_arn": role_arn, "aws_sts_endpoint": endpoint, "aws_session_name": session_name,
            "aws_duration": duration}


def _role_arn(flag, output_format, environ):
    """--aws-role-arn, else VOUCH_AWS_ROLE_ARN for the formats that print AWS credentials, else None.

    The variable is ignored by the others, so that one exported for the AWS
    CLI does not break kubectl's --format exec-credential.
    """
    if flag:
        return flag
    return (environ.get("VOUCH_AWS_ROLE_ARN") or None) if output_format in ("json", "shell", "aws") else None


def _sts_endpoint(endpoint, region, environ):
    """(URL, the flag or variable naming it or None, region): --aws-sts-endpoint, AWS_ENDPOINT_URL_STS,
    the region's endpoint (--aws-region, AWS_REGION, AWS_DEFAULT_REGION), else the global one."""
    region = region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None
    if endpoint:
        return endpoint, "--aws-sts-endpoint", region
    if environ.get("AWS_ENDPOINT_URL_STS"):
        return environ["AWS_ENDPOINT_URL_STS"], "AWS_ENDPOINT_URL_STS", region
    if region:
        return "https://sts.%s.amazonaws.com%s/" % (region, ".cn" if region.startswith("cn-") else ""), None, region
    return "https://sts.amazonaws.com/", None, region


def _session_name(config, result):
    """--aws-session-name, else the email or subject reduced to STS's alphabet and length."""
    import re
    if config.aws_session_name:
        return config.aws_session_name
    name = _first_string("email", result) or _first_string("sub", result.get("claims"), result.get("id_token_claims"))
    name = re.sub(r"[^\w+=,.@-]", "-", name or "", flags=re.ASCII)[:64]
    return name if len(name) >= 2 else _PROG


def _assume_role_with_web_identity(http, endpoint, role_arn, token, session_name, duration):
    """Trade an OIDC token for temporary AWS credentials with STS AssumeRoleWithWebIdentity.

    An unsigned form POST (the token is the proof), retried on 5xx, 429 and
    STS throttling. Returns (credentials, expires_at): the credentials as the
    output's `aws` object and their expiry in epoch seconds.
    """
    what = "STS AssumeRoleWithWebIdentity"
    http.terminal.add_secret(token)
    form = [("Action", "AssumeRoleWithWebIdentity"), ("Version", _STS_VERSION), ("RoleArn", role_arn),
            ("RoleSessionName", session_name), ("WebIdentityToken", token), ("DurationSeconds", str(duration))]
    # STS answers JSON when asked for it (the client's default Accept); the XML is what it documents.
    # Each attempt on a connection of its own, so that the retries chosen here (as the AWS SDKs retry
    # this call) are the only resends, never one on a kept-alive connection the server was closing.
    response = _post_with_retries(http, endpoint, what, form, headers={"Accept": "text/xml"},
                                  retryable=_sts_throttled, idempotent=False)
    if response.status == 200:
        credentials, expires_at = _sts_credentials(_sts_xml(response, what), what)
        for name in ("SecretAccessKey", "SessionToken"):
            http.terminal.add_secret(credentials[name])
        return credentials, expires_at
    _check_redirect(response, what)
    if response.status >= 500 or response.status == 429:
        _raise_http_status(response, what)
    code, message = _sts_error(response, what)
    text = "%s: %s%s" % (what, code, ": " + message if message else "")
    if code == "AccessDenied":
        raise AccessDeniedError(text)
    if code in _STS_RETRYABLE:
        raise NetworkError(text + " (still, after retries)")
    raise ProtocolError(text)


def _sts_throttled(response):
    """Whether an STS answer is a throttling error worth retrying."""
    if response.status != 400:
        return False
    try:
        return _sts_error(response, "STS")[0] in _STS_RETRYABLE
    except ProtocolError:
        return False


def _sts_xml(response, what):
    """Parse an STS answer into (tag, children, text parts) nodes; return the document element.

    Strict and safe: a size cap, UTF-8 only, and no DTD or entity
    declaration at all (billion laughs, external entities). Namespaces are
    not processed: the documented answers use only the default namespace.
    """
    from xml.parsers import expat
    body = response.body
    if len(body) > MAX_STS_BODY_BYTES:
        raise ProtocolError("%s: the answer (HTTP %d) is larger than %d bytes"
                            % (what, response.status, MAX_STS_BODY_BYTES))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("%s: the answer (HTTP %d) is not UTF-8" % (what, response.status))
    upper = text.upper()
    if "<!DOCTYPE" in upper or "<!ENTITY" in upper:
        raise ProtocolError("%s: the answer (HTTP %d) declares a DTD or entities, which are refused"
                            % (what, response.status))
    document = ["", [], []]
    stack = [document]

    def start(tag, attributes):
        node = [tag, [], []]
        stack[-1][1].append(node)
        stack.append(node)

    def refuse(*args):
        raise ProtocolError("%s: the answer declares a DTD or entities, which are refused" % what)

    # The encoding given here overrides whatever the XML declaration names.
    parser = expat.ParserCreate("UTF-8")
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: stack.pop()
    parser.CharacterDataHandler = lambda data: stack[-1][2].append(data)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise ProtocolError("%s: the answer (HTTP %d) is not well-formed XML: %s"
                            % (what, response.status, _sanitize(str(exc), 120)))
    return document[1][0]


def _xml_child(node, name, what, optional=False):
    found = [child for child in node[1] if child[0] == name]
    if len(found) > 1 or not (found or optional):
        raise ProtocolError("%s: expected one <%s> in <%s>, found %d" % (what, name, node[0], len(found)))
    return found[0] if found else None


def _xml_text(node, name, what, pattern, optional=False):
    """The text of node's one child element `name`, which must match pattern (ASCII)."""
    import re
    child = _xml_child(node, name, what, optional)
    if child is None:
        return None
    text = "".join(child[2]).strip()
    if child[1] or not re.match(pattern, text, re.ASCII):
        raise ProtocolError("%s: <%s> is empty or malformed" % (what, name))
    return text


def _sts_error(response, what):
    """(code, message) of an STS ErrorResponse; ProtocolError when the body is something else."""
    root = _sts_xml(response, what)
    if root[0] != "ErrorResponse":
        raise ProtocolError("%s: HTTP %d without an STS ErrorResponse" % (what, response.status))
    error = _xml_child(root, "Error", what)
    code = _xml_text(error, "Code", what, r"[\w.:-]{1,100}\Z")
    message = _xml_child(error, "Message", what, optional=True)
    return code, _sanitize("".join(message[2]).strip(), 200) if message else ""


def _sts_credentials(root, what):
    """The checked credentials of an AssumeRoleWithWebIdentityResponse, and their expiry (epoch seconds)."""
    import calendar
    import re
    import time
    if root[0] != "AssumeRoleWithWebIdentityResponse":
        raise ProtocolError("%s: expected <AssumeRoleWithWebIdentityResponse>, got <%s>"
                            % (what, _sanitize(root[0], 80)))
    result = _xml_child(root, "AssumeRoleWithWebIdentityResult", what)
    credentials = _xml_child(result, "Credentials", what)
    printable = r"[\x21-\x7e]{%d,%d}\Z"
    aws = {
        "AccessKeyId": _xml_text(credentials, "AccessKeyId", what, r"\w{16,128}\Z"),
        "SecretAccessKey": _xml_text(credentials, "SecretAccessKey", what, printable % (16, 256)),
        "SessionToken": _xml_text(credentials, "SessionToken", what, printable % (16, 16384)),
    }
    expiration = _xml_text(credentials, "Expiration", what,
                           r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]00:?00)\Z")
    fields = tuple(int(part) for part in re.findall(r"\d+", expiration)[:6])
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        raise ProtocolError("%s: <Expiration> is not a valid time: %s" % (what, expiration))
    expires_at = calendar.timegm(fields)
    if expires_at <= time.time():
        raise ProtocolError("%s: the credentials expired already (%s)" % (what, expiration))
    aws["Expiration"] = _rfc3339(expires_at)
    aws["AssumedRoleArn"] = _xml_text(_xml_child(result, "AssumedRoleUser", what), "Arn", what,
                                      r"arn:[\x21-\x7e]{1,2044}\Z")
    return aws, expires_at


def _aws_slot(config):
    """Where a cache entry keeps the AWS credentials of this role, endpoint, session name and duration.

    Checked values hold no white space, so the fields cannot run into each other.
    """
    return "%s %s %s %d" % (config.aws_sts_endpoint, config.aws_role_arn, config.aws_session_name or "-",
                            config.aws_duration)


def _cached_aws(config, entry, now):
    """This role's cached AWS credentials while they have more than --min-ttl seconds left, else None."""
    slots = (entry or {}).get("aws")
    slot = slots.get(_aws_slot(config)) if isinstance(slots, dict) else None
    if isinstance(slot, dict) and isinstance(slot.get("credentials"), dict) \
            and _is_number(slot.get("expires_at")) and slot["expires_at"] - now > config.min_ttl:
        return slot["credentials"]
    return None


def _add_aws_credentials(config, http, terminal, result, cache=None, entry=None):
    """--aws-role-arn: put AWS credentials in result["aws"], cached ones while they last, else from STS.

    New credentials are cached only in the entry of the very token they were
    exchanged for: a new sign-in replaces the entry and drops them.
    """
    import time
    credentials = _cached_aws(config, entry, time.time())
    if credentials is not None:
        terminal.debug("using the cached AWS credentials (until %s)" % credentials.get("Expiration"))
    elif cache is None:
        credentials = _exchange_for_aws(config, http, terminal, result)[0]
    else:
        cache.acquire(terminal)
        try:
            entry = cache.load()
            credentials = _cached_aws(config, entry, time.time())
            if credentials is None:
                credentials, expires_at = _exchange_for_aws(config, http, terminal, result)
                if entry is not None and entry["result"].get("access_token") == result["access_token"]:
                    now = time.time()
                    slots = entry.get("aws") if isinstance(entry.get("aws"), dict) else {}
                    slots = {key: slot for key, slot in slots.items()
                             if isinstance(slot, dict) and _is_number(slot.get("expires_at")) and slot["expires_at"] > now}
                    slots[_aws_slot(config)] = {"credentials": credentials, "expires_at": expires_at}
                    try:
                        cache.save(dict(entry, aws=slots))
                    except UsageError as exc:
                        terminal.warn("the AWS credentials were not cached: %s" % exc)
        finally:
            cache.release()
    _remember_secrets(terminal, {"aws": credentials})
    result["aws"] = credentials


def _exchange_for_aws(config, http, terminal, result):
    credentials, expires_at = _assume_role_with_web_identity(
        http, config.aws_sts_endpoint, config.aws_role_arn, _web_identity_token(config, http, result),
        _session_name(config, result), config.aws_duration)
    terminal.info("AWS credentials for %s until %s" % (credentials["AssumedRoleArn"], credentials["Expiration"]))
    return credentials, expires_at


def _web_identity_token(config, http, result):
    """The token STS gets: Vouch's own AWS token for the role when the client is registered, else the sign-in's."""
    if config.client is None:
        return _handed_token(result)[0]
    from urllib.parse import quote
    document = _v1_document(config, http, _signed_session(result), "GET", "/v1/credentials/aws/token?role_arn="
                            + quote(config.aws_role_arn, safe=""), "AWS token")
    return _one_line(document.get("id_token"), "the AWS token the server sent", _MAX_TOKEN_LENGTH)


def _add_k8s_token(config, http, terminal, result, cache=None, entry=None):
    """exec-credential with a registered client: Vouch's token for the cluster's audience, cached while it lasts."""
    import time
    # only what this very session got: a new sign-in's entry starts without
    same = entry is not None and entry["result"].get("access_token") == result["access_token"]
    slots = entry.get("k8s") if same and isinstance(entry.get("k8s"), dict) else {}
    slot = slots.get(config.k8s_audience)
    if not (isinstance(slot, dict) and _is_number(slot.get("expires_at")) and isinstance(slot.get("token"), str)
            and slot["expires_at"] - time.time() > config.min_ttl):
        from urllib.parse import quote
        document = _v1_document(config, http, _signed_session(result), "GET",
                                "/v1/credentials/k8s/token?audience=" + quote(config.k8s_audience, safe=""),
                                "Kubernetes token")
        expires_in = document.get("expires_in")
        if not _is_number(expires_in) or not 0 < expires_in <= 86400 * 7:
            raise ProtocolError("Kubernetes token: expires_in is not a number of seconds")
        slot = {"token": _one_line(document.get("id_token"), "the Kubernetes token the server sent", _MAX_TOKEN_LENGTH),
                "expires_at": int(time.time() + expires_in)}
        if cache is not None:
            cache.acquire(terminal)
            try:
                latest = cache.load()
                if latest is not None and latest["result"].get("access_token") == result["access_token"]:
                    now = time.time()
                    kept = latest.get("k8s") if isinstance(latest.get("k8s"), dict) else {}
                    kept = {audience: value for audience, value in kept.items()
                            if isinstance(value, dict) and _is_number(value.get("expires_at")) and value["expires_at"] > now}
                    kept[config.k8s_audience] = slot
                    cache.save(dict(latest, k8s=kept))
            except UsageError as exc:
                terminal.warn("the Kubernetes token was not cached: %s" % exc)
            finally:
                cache.release()
    result["k8s"] = slot


# ============================================================================
# Vouch's own credentials for git, Docker and SSH: its /v1 API, signed requests
# ============================================================================

MAX_HELPER_INPUT = 64 * 1024
# what ssh-keygen makes, in the order ssh tries them
_SSH_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_ed25519_sk", "id_ecdsa_sk", "id_rsa")
_SSH_KEY_TYPES = frozenset(("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                            "ssh-rsa", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"))
_DOCKER_NOT_FOUND = "credentials not found in native keychain"
_GHCR = "ghcr.io"


def _v1_document(config, http, session, method, path, what, document=None):
    """The JSON object a /v1 endpoint answers a signed request with; errors as the exit codes say."""
    result, dpop = session
    url = config.issuer.rstrip("/") + path
    response = signed_request(http, config.client, method, url, what, result["access_token"], dpop, document)
    if response.status == 200:
        return _json_document(response, what)
    said = _refusal(response, what)
    if response.status == 401:
        raise AccessDeniedError("%s: the server did not accept the sign-in (HTTP 401%s); sign in again with %s"
                                " --logout, then --cache" % (what, said, _LAUNCHER_NAME))
    if response.status == 403:
        raise AccessDeniedError("%s: refused (HTTP 403%s)" % (what, said))
    raise ProtocolError("%s: HTTP %d%s" % (what, response.status, said))


def _refusal(response, what):
    """': what the server said' of a JSON error answer, or ''; 5xx, 429 and redirects are raised here."""
    answer = _error_document(response, what)
    said = next((answer[k] for k in ("message", "Message", "error_description", "error")
                 if isinstance(answer.get(k), str)), "") if isinstance(answer, dict) else ""
    return ": " + _sanitize(said, 200) if said else ""


def _session(config, http, terminal):
    """The sign-in /v1 requests go with: the cached one (refreshed if need be), else a new one where allowed."""
    return _signed_session(_run(config, http, terminal))


def _signed_session(result):
    """(result, its _DPoP) for signed_request; a sign-in without a DPoP key cannot make /v1 requests."""
    dpop = _cached_dpop(result)
    if dpop is None:
        raise ProtocolError("the sign-in has no DPoP key; Vouch's /v1 API takes DPoP-bound tokens only")
    return result, dpop


def _one_line(value, what, limit=16384):
    """A string another program will read as one line: printable ASCII, no blanks at its ends."""
    if not isinstance(value, str) or not value or len(value) > limit or value != value.strip() \
            or not all(" " <= ch <= "~" for ch in value):
        raise ProtocolError("%s is not one line of printable text" % what)
    return value


def _ssh_key_line(text, what):
    """`type base64 [comment]` of an OpenSSH public key or certificate, checked; the line."""
    import base64
    import binascii
    line = _one_line(text.strip(), what)
    fields = line.split()
    try:
        blob = base64.b64decode(fields[1], validate=True) if len(fields) > 1 else b""
    except (binascii.Error, ValueError):
        blob = b""
    # RFC 4253 §6.6: the blob starts with the key type as an SSH string
    named = blob[4:4 + int.from_bytes(blob[:4], "big")] if len(blob) > 4 else b""
    if named != fields[0].encode("ascii"):
        raise ProtocolError("%s is not an OpenSSH key line" % what)
    return line


def _ssh_public_key(argument):
    """(path, line) of the public key to sign: PUBKEY, else the first of ~/.ssh's usual ones."""
    if argument:
        # a private key's name means its .pub
        path = argument if argument.endswith(".pub") or not os.path.exists(argument + ".pub") else argument + ".pub"
    else:
        folder = os.path.join(os.path.expanduser("~"), ".ssh")
        path = next((os.path.join(folder, name + ".pub") for name in _SSH_DEFAULT_KEYS
                     if os.path.isfile(os.path.join(folder, name + ".pub"))), None)
        if path is None:
            raise UsageError("--ssh-certificate: no public key in %s (%s); make one with ssh-keygen -t ed25519, or "
                             "name it" % (folder, ", ".join(name + ".pub" for name in _SSH_DEFAULT_KEYS)))
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_HELPER_INPUT + 1)
    except OSError as exc:
        raise UsageError("--ssh-certificate: cannot read %s: %s" % (path, exc.strerror or exc))
    if b"PRIVATE KEY" in data:
        raise UsageError("--ssh-certificate: %s is a private key; name its .pub file" % path)
    try:
        line = _ssh_key_line(data.decode("ascii"), path)
    except (UnicodeDecodeError, ProtocolError):
        raise UsageError("--ssh-certificate: %s is not an OpenSSH public key (one line: type, base64, comment)" % path)
    if line.split()[0] not in _SSH_KEY_TYPES:
        raise UsageError("--ssh-certificate: %s is a %s key, which OpenSSH certificates do not carry"
                         % (path, _sanitize(line.split()[0], 40)))
    return path, line


def _ssh_strings_end(blob, count):
    """Where the first count SSH strings (RFC 4251 §5: uint32 length, bytes) of blob end, or None."""
    at = 0
    for _ in range(count):
        if at + 4 > len(blob):
            return None
        at += 4 + int.from_bytes(blob[at:at + 4], "big")
    return at if at <= len(blob) else None


def _ssh_certificate(config, http, terminal):
    """--ssh-certificate: POST /v1/credentials/ssh; the certificate goes beside the key, its path on stdout."""
    import base64
    path, line = _ssh_public_key(config.ssh_certificate)
    what = "SSH certificate"
    document = _v1_document(config, http, _session(config, http, terminal), "POST", "/v1/credentials/ssh", what,
                            {"public_key": line})
    certificate = _ssh_key_line(document.get("certificate") if isinstance(document.get("certificate"), str)
                                else "", "the SSH certificate the server sent")
    if certificate.split()[0] != line.split()[0].replace("@openssh.com", "") + "-cert-v01@openssh.com":
        raise ProtocolError("the server sent a %s certificate for a %s key"
                            % (_sanitize(certificate.split()[0], 60), line.split()[0]))
    # PROTOCOL.certkeys: type and nonce, then the very fields of the key signed (after its own type)
    key_blob, cert_blob = (base64.b64decode(text.split()[1]) for text in (line, certificate))
    start = _ssh_strings_end(cert_blob, 2)
    if start is None or not cert_blob.startswith(key_blob[_ssh_strings_end(key_blob, 1):], start):
        raise ProtocolError("the server sent a certificate for another key than %s" % path)
    target = (path[:-len(".pub")] if path.endswith(".pub") else path) + "-cert.pub"
    try:
        _write_replacing(target, (certificate + "\n").encode("ascii"), 0o644)
    except OSError as exc:
        raise UsageError("cannot write the certificate to %s: %s" % (target, exc.strerror or exc))
    valid = document.get("valid_for_seconds")
    principals = document.get("principals")
    terminal.info("wrote %s%s%s" % (
        target, " for %s" % _sanitize(", ".join(principals), 200)
        if isinstance(principals, list) and all(isinstance(p, str) for p in principals) and principals else "",
        ", valid for %s" % _format_duration(valid) if _is_number(valid) and valid > 0 else ""))
    return target + "\n"


def _ssh_ca(config, http):
    """--ssh-ca: the CA's public key line (GET /v1/credentials/ssh/ca, no sign-in needed)."""
    what = "SSH CA key"
    response = http.get(config.issuer.rstrip("/") + "/v1/credentials/ssh/ca", what)
    if response.status != 200:
        _raise_http_status(response, what)
    document = _json_document(response, what)
    key = document.get("public_key")
    line = _ssh_key_line(key if isinstance(key, str) else "", "the SSH CA key the server sent")
    comment = document.get("comment")
    if len(line.split()) == 2 and isinstance(comment, str) and comment and " " not in comment:
        line += " " + _one_line(comment, "the CA key's comment", 200)
    return line + "\n"


def _helper_input(stdin):
    """What git or Docker wrote on stdin, as text; a cap keeps a runaway writer from filling memory."""
    data = stdin.read(MAX_HELPER_INPUT + 1) if stdin is not None else b""
    if len(data) > MAX_HELPER_INPUT:
        raise UsageError("more than %d bytes on stdin; a credential request is a few lines" % MAX_HELPER_INPUT)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the credential request on stdin is not UTF-8")


def _github_token(config, http, terminal, owner=None):
    """POST /v1/credentials/github/token: an installation token, checked to be one line."""
    what = "GitHub token"
    document = _v1_document(config, http, _session(config, http, terminal), "POST", "/v1/credentials/github/token",
                            what, {"owner": owner, "repositories": None})
    return _one_line(document.get("token"), "the GitHub token the server sent", 4096)


def _is_github_host(host, environ):
    """github.com, GitHub Enterprise Cloud (*.ghe.com) as Vouch's CLI takes them, or a host in VOUCH_GITHUB_HOSTS."""
    host = host.lower()
    extra = [name.strip().lower() for name in environ.get("VOUCH_GITHUB_HOSTS", "").split(",") if name.strip()]
    return host in ("github.com", "ghe.com") or host.endswith((".github.com", ".ghe.com")) or host in extra


def _git_credential(config, http, terminal, stdin):
    """git's credential protocol (gitcredentials(7)): get answers username and password; store and erase keep nothing."""
    attributes = {}
    for line in _helper_input(stdin).split("\n"):
        name, equals, value = line.partition("=")
        if equals:
            attributes[name] = value
    if config.git_credential != "get":
        return ""
    if attributes.get("protocol") != "https" or not _is_github_host(attributes.get("host", ""), config.environ):
        # git asks every helper in turn: one that has nothing says nothing. A GitHub token goes to GitHub only,
        # whatever host a submodule or a remote names.
        return ""
    path = attributes.get("path", "").strip("/")
    token = _github_token(config, http, terminal, path.split("/", 1)[0] or None)
    return "protocol=https\nhost=%s\nusername=x-access-token\npassword=%s\n" % (attributes.get("host", ""), token)


def _docker_host(registry):
    # Docker names a registry as a host, a host/path or a URL
    return registry.strip().split("://", 1)[-1].split("/", 1)[0].lower()


def _docker_without_vouch(operation, text):
    """What Docker gets without a word to Vouch: list, erase, store, and get for a registry Vouch has nothing
    for (before any configuration is read, so that a pull from elsewhere never fails on this helper); None for a
    get that needs Vouch."""
    if operation == "list":
        return "{}\n"
    if operation == "erase":
        return ""
    if operation == "store":
        registry = _loads_or_none(text.encode("utf-8"))
        host = _docker_host(registry.get("ServerURL") or "") if isinstance(registry, dict) \
            and isinstance(registry.get("ServerURL"), str) else ""
        if host == _GHCR or _ecr_region(host):
            return ""  # Vouch hands these out itself, fresh each time
        raise VouchError("docker-credential-vouch keeps no passwords: it answers for ghcr.io and ECR only; name it in"
                         " credHelpers for those registries instead of credsStore")
    host = _docker_host(text)
    if host == _GHCR or _ecr_region(host):
        return None
    raise _DockerNotFound(_DOCKER_NOT_FOUND)


def _docker_credential(config, http, terminal):
    """Docker's credential-helper get for ghcr.io (the GitHub token) or ECR: {ServerURL, Username, Secret}."""
    import json
    registry = config.docker_input.strip()
    host = _docker_host(registry)
    if host == _GHCR:
        username, secret = "x-access-token", _github_token(config, http, terminal)
    else:
        username, secret = _ecr_login(config, http, terminal, host)
    return json.dumps({"ServerURL": registry, "Username": username, "Secret": secret}) + "\n"


class _DockerNotFound(VouchError):
    """Docker's helper protocol: this exact text on stdout says the helper has no credentials for a registry."""


def _ecr_region(host):
    """The region of an ECR registry host (ACCOUNT.dkr.ecr[-fips].REGION.amazonaws.com[.cn]), or None."""
    import re
    match = re.match(r"[0-9]{12}\.dkr\.ecr(-fips)?\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?\Z", host)
    return match.group(2) if match else None


_ECR_TARGET = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"


def _sigv4_headers(credentials, region, service, url, headers, body, now):
    """headers plus X-Amz-Date, X-Amz-Security-Token and Authorization: AWS Signature Version 4 of a POST to
    url (one _parse_url took, with a path of unreserved characters and no query: nothing to encode)."""
    import hashlib
    import hmac
    import time
    scheme, host, port, path = _parse_url(url, "the %s endpoint" % service)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    signed = {k.lower(): v.strip() for k, v in headers.items()}
    # the Host field as _request_bytes sends it
    signed.update({"host": _host_header(scheme, host, port), "x-amz-date": amz_date,
                   "x-amz-security-token": credentials["SessionToken"]})
    names = sorted(signed)
    # the canonical request: method, path, query, header lines, their names, the body's hash
    canonical = "\n".join(["POST", path, "", "".join("%s:%s\n" % (n, signed[n]) for n in names),
                           ";".join(names), hashlib.sha256(body).hexdigest()])
    scope = "%s/%s/%s/aws4_request" % (amz_date[:8], region, service)
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + credentials["SecretAccessKey"]).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return dict(headers, **{"X-Amz-Date": amz_date, "X-Amz-Security-Token": credentials["SessionToken"],
                            "Authorization": "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s"
                            % (credentials["AccessKeyId"], scope, ";".join(names), signature)})


def _ecr_login(config, http, terminal, host):
    """An ECR registry's login: AWS credentials for the role (from Vouch's AWS token), then GetAuthorizationToken."""
    import base64
    import binascii
    import re
    import time
    if not config.aws_role_arn:
        raise UsageError("%s is an ECR registry: set VOUCH_AWS_ROLE_ARN to the IAM role to log in with" % host)
    region = _ecr_region(host)
    endpoint = config.environ.get("AWS_ENDPOINT_URL_ECR") or "https://api.ecr.%s.amazonaws.com%s/" % (
        region, ".cn" if region.startswith("cn-") else "")
    try:
        target = _parse_url(endpoint, "AWS_ENDPOINT_URL_ECR")[3]
    except ProtocolError as exc:
        raise UsageError(str(exc))
    if not re.match(r"/[A-Za-z0-9/_.~-]*\Z", target):
        raise UsageError("AWS_ENDPOINT_URL_ECR: %s has a query or a path that needs escaping" % _sanitize(endpoint))
    result = _run(config, http, terminal)
    what = "ECR GetAuthorizationToken"
    body = b"{}"
    headers = _sigv4_headers(result["aws"], region, "ecr", endpoint, {
        "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": _ECR_TARGET}, body, time.time())
    response = http.request("POST", endpoint, what, headers=headers, content=body)
    if response.status != 200:
        raise AccessDeniedError("%s: HTTP %d%s" % (what, response.status, _refusal(response, what)))
    data = _json_document(response, what).get("authorizationData")
    token = data[0].get("authorizationToken") if isinstance(data, list) and data and isinstance(data[0], dict) else None
    try:
        user, _, password = base64.b64decode(token if isinstance(token, str) else "", validate=True).decode(
            "ascii").partition(":")
    except (binascii.Error, ValueError):
        user = password = ""
    if user != "AWS" or not password:
        raise ProtocolError("%s: the answer holds no AWS:password authorization token" % what)
    return user, _one_line(password, "the ECR password", 16384)


def _credential(config, http, terminal, stdin):
    """The answer of the credential mode config asks for, as its consumer reads it."""
    if not (config.docker_credential and _ecr_region(_docker_host(config.docker_input))):
        # a VOUCH_AWS_ROLE_ARN exported for the AWS CLI is for ECR logins only, not for git, ssh or ghcr.io
        config.aws_role_arn = None
    if config.ssh_ca:
        return _ssh_ca(config, http)
    if config.ssh_certificate is not None:
        return _ssh_certificate(config, http, terminal)
    if config.git_credential is not None:
        return _git_credential(config, http, terminal, stdin)
    return _docker_credential(config, http, terminal)


# Options a cached credential is answered for without argparse, and whether
# each takes a value; anything else goes the whole way through the parser.
_FAST_OPTIONS = {
    "--issuer": True, "--client-id": True, "--scope": True, "--format": True, "--min-ttl": True,
    "--cacert": True, "--timeout": True, "--max-restarts": True, "--require-aaguid": True,
    "--aws-role-arn": True, "--aws-region": True, "--aws-sts-endpoint": True, "--aws-session-name": True,
    "--aws-duration": True, "--k8s-audience": True, "--cache": False, "--require-hardware": False, "-q": False, "--quiet": False,
    "--qr": False, "--copy": False, "--browser": False, "--no-browser": False,
}


def _fast_answers(entry):
    """What cached kubectl and credential_process runs print, one tab-separated line each.

    A line holds what it answers ("exec" and an ExecCredential apiVersion, or
    "aws" and an _aws_slot), until when (epoch seconds), hardware_verified,
    hardware_aaguid ("-" for none) and the output. Kept beside the cache
    entry so that _cached_credential can answer without json, whose import
    alone (re, enum) costs such a run more than everything else it does.
    """
    result = entry["result"]
    if "access_token" not in result:
        # a registered client's entry: the fast path needs its id to find the sign-in's entry
        client_id = result.get("client_id")
        return "key\t%s\nclient\t%s\n" % (entry["key"], client_id) if isinstance(client_id, str) else ""
    facts = "%s\t%s" % (_json_text(result.get("hardware_verified")), result.get("hardware_aaguid") or "-")
    lines = []
    token_expiry, expires_at = _handed_token(result)[1], result.get("expires_at")
    # A DPoP-bound token is useless without proofs, which kubectl and the AWS SDKs never send; what Vouch's
    # /v1 API gave for it (a cluster's token, AWS credentials) is theirs, tagged as a registered client's.
    if result.get("dpop") and not entry.get("registered"):
        return ""
    dpop = "dpop " if result.get("dpop") else ""
    k8s = entry.get("k8s") if dpop and isinstance(entry.get("k8s"), dict) else {}
    for audience, slot in sorted(k8s.items()):
        if isinstance(slot, dict) and _is_number(slot.get("expires_at")) and _is_number(expires_at):
            lines.extend(("dpop k8s %s %s" % (version, audience), min(slot["expires_at"], expires_at),
                          render_output(dict(result, k8s=slot), "exec-credential", exec_api_version=version))
                         for version in EXEC_CREDENTIAL_API_VERSIONS)
    if not dpop and _is_number(token_expiry) and _is_number(expires_at):
        try:
            lines = [("exec " + version, min(token_expiry, expires_at),
                      render_output(result, "exec-credential", exec_api_version=version))
                     for version in EXEC_CREDENTIAL_API_VERSIONS]
        except ProtocolError:
            pass  # an expiry RFC 3339 cannot write; the full path reports it
    slots = entry.get("aws")
    for slot, value in sorted(slots.items()) if isinstance(slots, dict) else ():
        lines.append((dpop + "aws " + slot, value["expires_at"],
                      render_output(dict(result, aws=value["credentials"]), "aws")))
    if not lines:
        return ""
    # The sign-in these answers are for: _cached_credential serves them only to the very same one.
    return "key\t%s\n" % entry["key"] + "".join("%s\t%d\t%s\t%s" % (tag, until, facts, output)
                                                for tag, until, output in lines)


def _cached_credential(argv, environ):
    """The output of a --format exec-credential or aws run that the cache answers, or None.

    kubectl and credential_process run the tool before every command. This
    answers their cache hits from _fast_answers, without argparse, json, URL
    parsing or OpenSSL. An option it does not know, a value it would have to
    check with more than a glance, a policy not met or a miss returns None,
    and main() takes the full path, which reports any error. The values that
    name the cache entry and the answer were checked by the run that wrote them.
    """
    import time
    values, flags, aaguids = {}, set(), []
    items = iter(argv)
    for item in items:
        name, equals, value = item.partition("=")
        takes_value = _FAST_OPTIONS.get(name)
        if takes_value is None or (equals and not takes_value):
            return None
        if takes_value and not equals:
            value = next(items, None)
            if value is None or value.startswith("-"):
                return None
        if name == "--require-aaguid":
            aaguids.append(value.lower())
        elif takes_value:
            values[name] = value
        else:
            flags.add(name)
    output_format = values.get("--format")
    issuer = (values.get("--issuer") or environ.get("VOUCH_ISSUER") or DEFAULT_ISSUER).rstrip("/")
    client_id = values.get("--client-id") or environ.get("VOUCH_CLIENT_ID")
    registered = ""
    if not client_id and output_format in ("exec-credential", "aws"):
        # a client of --register: its id, from the answers file beside its key
        kept = _client_store(environ, issuer).load_answers() or ""
        if kept.startswith("client\t") and kept.endswith("\n") and kept.count("\n") == 1:
            client_id, registered = kept[len("client\t"):-1], "dpop "
    if environ.get("VOUCH_DPOP", "").lower() in ("1", "true", "yes", "on") and not registered:
        return None
    audience = values.get("--k8s-audience") or (environ.get("VOUCH_K8S_AUDIENCE") if output_format == "exec-credential"
                                                 else None)
    if bool(audience) != (bool(registered) and output_format == "exec-credential"):
        return None
    cache = output_format == "exec-credential" or "--cache" in flags \
        or environ.get("VOUCH_CACHE", "").lower() in ("1", "true", "yes", "on")
    role_arn = _role_arn(values.get("--aws-role-arn"), output_format, environ)
    # Pretty output (stdout a terminal) is the full path's.
    if output_format not in ("exec-credential", "aws") or not client_id or not cache or _isatty(sys.stdout) \
            or (output_format == "aws") != (role_arn is not None) \
            or (output_format != "aws" and any(name.startswith("--aws-") for name in values)) \
            or ("--cacert" in values and not os.path.isfile(values["--cacert"])):
        return None
    try:
        min_ttl, timeout = int(values.get("--min-ttl", DEFAULT_MIN_TTL)), float(values.get("--timeout", DEFAULT_TIMEOUT))
        restarts, duration = int(values.get("--max-restarts", 0)), int(values.get("--aws-duration", DEFAULT_AWS_DURATION))
    except ValueError:
        return None
    if min_ttl < 0 or not 0 < timeout <= 3600 or not 0 <= restarts <= 100:
        return None
    key = (issuer, client_id, values["--scope"] if "--scope" in values else environ.get("VOUCH_SCOPE", DEFAULT_SCOPE))
    if any(not "\x20" <= ch <= "\x7e" or ch in "\"\\" for part in key for ch in part):
        return None
    # For such values this is the very text _Cache hashes: json.dumps([issuer, client_id, scope, None, []]).
    answers = _Cache(_cache_directory(environ), key='["%s", "%s", "%s", null, []]' % key).load_answers()
    if output_format == "aws":
        endpoint = _sts_endpoint(values.get("--aws-sts-endpoint"), values.get("--aws-region"), environ)[0]
        tag = registered + "aws " + _aws_slot(_Config(aws_sts_endpoint=endpoint, aws_role_arn=role_arn,
                                                      aws_session_name=values.get("--aws-session-name"),
                                                      aws_duration=duration))
    else:
        # kubectl writes KUBERNETES_EXEC_INFO with Go's encoding/json: compact, kind before apiVersion.
        info = environ.get("KUBERNETES_EXEC_INFO")
        versions = [v for v in EXEC_CREDENTIAL_API_VERSIONS
                    if not info or info.startswith('{"kind":"ExecCredential","apiVersion":"%s",' % v)]
        if not versions:
            return None
        tag = "dpop k8s %s %s" % (versions[0], audience) if registered else "exec " + versions[0]
    for line in (answers or "").splitlines(True):
        fields = line.split("\t", 4)
        if len(fields) == 5 and fields[0] == tag:
            until, verified, aaguid, output = fields[1:]
            if _is_ascii_digits(until, 12) and int(until) - time.time() > min_ttl \
                    and (verified == "true" or "--require-hardware" not in flags) \
                    and (aaguid in aaguids or not aaguids):
                return output
            return None
    return None


# ============================================================================
# Installation (--install): a launcher that runs the module from bytecode
# ============================================================================

# Python compiles a file run as a script from source on every run, and for
# this file that costs more than everything --version does; a module it
# imports is loaded from cached bytecode instead. --install keeps the module
# and its bytecode in a directory of their own and writes a small launcher
# that imports it, for the shell profiles that run the tool many times a day.
DEFAULT_INSTALL_PREFIX = "~/.local"
_LAUNCHER_NAME = "vouch-device-login"
# -I keeps the working directory, PYTHONPATH and the user's site-packages out
# of the import path, so no file planted there can stand in for a module; -S
# skips site, which a standard-library-only program has no use for: no .pth
# file runs, and every start saves the millisecond site costs.
_LAUNCHER = """\
#!{python} -IS
# {name} {version}, written by `vouch_device_login.py --install`: runs the module
# from its compiled bytecode, which a file run as a script never gets.
import sys
sys.path.insert(0, {library!r})
from vouch_device_login import main
sys.exit(main({arguments}))
"""
# Docker finds its credential helpers on PATH by this name (docker-credential-<credsStore>).
_DOCKER_HELPER_NAME = "docker-credential-vouch"
# Linux reads at most 127 bytes of a #! line before 5.1.
_MAX_SHEBANG = 127


def _install(prefix, terminal, source_path=None):
    """--install: copy this module to PREFIX/lib, compile it, write PREFIX/bin/vouch-device-login.

    Returns the launcher's path. The module and its bytecode come first and
    the launcher last, so a failure never leaves a launcher without a module.
    """
    import py_compile
    source_path = source_path or globals().get("__file__")
    if not source_path or not os.path.isfile(source_path):
        # Run from stdin, the name is "<stdin>" or missing altogether.
        raise UsageError("--install copies this file, and it was not run from one: download "
                         "vouch_device_login.py, then run python3 vouch_device_login.py --install")
    if not prefix:
        raise UsageError("--install: the PREFIX is empty")
    python = sys.executable
    if not python or not os.path.isabs(python) or not python.isprintable() or any(ch.isspace() for ch in python) \
            or len(python.encode("utf-8", "replace")) + len(" -IS") > _MAX_SHEBANG - len("#!"):
        raise UsageError("--install: cannot name this interpreter (%s) on a #! line; run it with "
                         "python3 from PATH instead" % _sanitize(repr(python)))
    cache_tag = sys.implementation.cache_tag
    if cache_tag is None:
        raise UsageError("--install: this Python (%s) keeps no bytecode, so there is nothing to gain" % python)
    try:
        with open(source_path, "rb") as handle:
            source = handle.read()
        compile(source, source_path, "exec")
    except OSError as exc:
        raise UsageError("--install: cannot read %s: %s" % (source_path, exc.strerror or exc))
    except (SyntaxError, ValueError) as exc:
        raise UsageError("--install: %s is not a module this Python can run: %s" % (source_path, exc))
    try:
        # Resolved once, so that what is checked is what is written and what
        # the launcher names: a symlink on the way stays out of both.
        prefix = os.path.realpath(os.path.expanduser(prefix))
        library = os.path.join(prefix, "lib", "vouch_device_login")
        bin_directory = os.path.join(prefix, "bin")
        module = os.path.join(library, "vouch_device_login.py")
        # Named here rather than by py_compile, which would follow
        # PYTHONPYCACHEPREFIX to a place the launcher (-I) never looks.
        bytecode = os.path.join(library, "__pycache__", "vouch_device_login.%s.pyc" % cache_tag)
        launcher = os.path.join(bin_directory, _LAUNCHER_NAME)
        for directory in (os.path.dirname(bytecode), bin_directory):
            _make_directories(directory)
            if os.path.realpath(directory) != directory:
                raise UsageError("--install: %s changed into a symbolic link while installing" % directory)
            _check_install_path(directory)
        _write_replacing(module, source, 0o644)
        options = {}
        if hasattr(py_compile, "PycInvalidationMode"):
            # Not the hash-checked bytecode SOURCE_DATE_EPOCH would select: the
            # launcher would hash the whole source on every start.
            options["invalidation_mode"] = py_compile.PycInvalidationMode.TIMESTAMP
        # optimize=0: the bytecode the launcher (which runs without -O) loads.
        py_compile.compile(module, cfile=bytecode, doraise=True, optimize=0, **options)
        os.chmod(bytecode, 0o644)
        for name, arguments in ((_DOCKER_HELPER_NAME, '["--docker-credential"] + sys.argv[1:]'), (_LAUNCHER_NAME, "")):
            text = _LAUNCHER.format(python=python, name=name, version=__version__, library=library, arguments=arguments)
            _write_replacing(os.path.join(bin_directory, name), text.encode("utf-8"), 0o755)
    except OSError as exc:
        raise UsageError("--install: %s: %s" % (getattr(exc, "filename", None) or prefix, exc.strerror or exc))
    except py_compile.PyCompileError as exc:
        raise UsageError("--install: cannot compile %s: %s" % (module, exc.msg))
    terminal.info("installed %s and %s (%s, for %s)" % (launcher, _DOCKER_HELPER_NAME, __version__, python))
    on_path = [os.path.realpath(entry) for entry in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(entry)]
    if bin_directory not in on_path:
        terminal.info("%s is not on PATH: add it, or run %s by its full path" % (bin_directory, launcher))
    return launcher


def _make_directories(path):
    """Create path and its missing parents, each 0755 whatever the umask (os.makedirs' mode reaches only the last).

    The deepest directory that exists already is checked first, so nothing is
    created inside one that _check_install_path refuses.
    """
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    _check_install_path(path)
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        os.chmod(directory, 0o755)


def _check_install_path(path):
    """Refuse a directory another user could change, or whose parents they could (ssh's StrictModes rule).

    Whoever can write a directory on the way can rename what lies below it
    and put a module of their own in its place. A sticky directory such as
    /tmp only lets them rename their own entries; a group that is your own
    user-private group is you, unless an ACL lets others in (with an ACL
    the group bits are its mask, the most any named user may do).
    """
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None:
        return
    path = os.path.realpath(path)
    while True:
        stat_result = os.stat(path)
        if stat_result.st_uid not in (geteuid(), 0):
            raise UsageError("--install: %s is owned by uid %d, not by you or root" % (path, stat_result.st_uid))
        writable_by_others = stat_result.st_mode & 0o002 or (
            stat_result.st_mode & 0o020 and not (_is_private_group(stat_result.st_gid) and not _has_acl(path)))
        if writable_by_others and not stat_result.st_mode & 0o1000:
            raise UsageError("--install: %s is writable by group or others (mode %03o); fix it with: chmod go-w %s"
                             % (path, stat_result.st_mode & 0o777, path))
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _is_private_group(gid):
    """Whether gid is the effective user's own group, named after them, with no other members."""
    try:
        import grp
        import pwd
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    # Members are listed in the group entry, or have it as their primary group.
    return gid == os.getegid() and group.gr_name == user and set(group.gr_mem) <= {user} \
        and all(entry.pw_name == user for entry in pwd.getpwall() if entry.pw_gid == gid)


def _has_acl(path):
    """Whether path may carry a POSIX access ACL; where that cannot be read, assume it does."""
    listxattr = getattr(os, "listxattr", None)
    if listxattr is None:
        return True
    try:
        return "system.posix_acl_access" in listxattr(path)
    except OSError as exc:
        import errno
        # A file system without extended attributes has no ACLs either.
        return exc.errno != errno.ENOTSUP


# ============================================================================
# Command line
# ============================================================================

_DESCRIPTION = """\
Sign in with the OAuth 2.0 Device Authorization Grant (RFC 8628): the code to \
enter goes to stderr, the token to stdout (JSON, shell variables or bare).

  {command} --client-id ID
  eval "$({command} --client-id ID --format shell)"
  eval "$({command} --client-id ID --cache --format shell)"
"""
_INSTALL_EXAMPLE = "  {command} --install   # installs vouch-device-login\n"
_EPILOG = """\
Settings: flag, else environment variable, else default. Exit codes: 0 signed \
in, 1 internal error, 2 usage, 3 denied, 4 code expired, 5 network/TLS/HTTP, \
6 protocol error, 7 verification failed, 8 policy not met, 130 interrupted."""


def _invoked_as(argv0):
    """(name, command): what the tool calls itself in messages, and how its help shows running it.

    The installed launcher is vouch-device-login; a script is run as
    python3 vouch_device_login.py, also when it was piped into python3 -.
    """
    name = os.path.basename(argv0 or "")
    if name in ("", "-", "-c"):
        name = "vouch_device_login.py"
    return name, ("python3 " + name if name.endswith(".py") else name)


def _argument_parser(prog=_PROG, command="python3 vouch_device_login.py"):
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse that reports a usage error as one line and exit code 2."""

        def error(self, message):
            """One line and exit 2 instead of argparse's usage block."""
            raise UsageError("%s (see --help)" % message)

    class Formatter(argparse.HelpFormatter):
        """Wraps paragraphs to the terminal's width; indented lines (the examples) stay as they are."""

        def _fill_text(self, text, width, indent):
            import textwrap
            return "\n".join(line if line.startswith(" ") or not line else
                             textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                             for line in text.splitlines())

    description = _DESCRIPTION.format(command=command)
    if command.endswith(".py"):
        description += _INSTALL_EXAMPLE.format(command=command)
    parser = Parser(
        prog=prog,
        # Short enough for 40 columns; the examples below show the flags that matter.
        usage="%(prog)s [options]",
        description=description,
        epilog=_EPILOG,
        add_help=False,
        formatter_class=lambda prog: Formatter(prog, max_help_position=30),
    )
    # The groups run from what every sign-in needs to what few runs need.
    add = parser.add_argument_group("sign-in").add_argument
    add("--client-id", metavar="ID", help="OAuth client id (env VOUCH_CLIENT_ID; required)")
    add("--issuer", metavar="URL", help="env VOUCH_ISSUER; default %s" % DEFAULT_ISSUER)
    add("--scope", metavar="SCOPE", help="env VOUCH_SCOPE; default %r" % DEFAULT_SCOPE)
    add("--qr", action="store_true", help="also draw the sign-in URL as a QR code")
    add("--copy", action="store_true", help="put the code on the clipboard")
    add("--browser", dest="browser", action="store_const", const=True, default=None,
        help="open the sign-in URL in a browser")
    add("--no-browser", dest="browser", action="store_const", const=False, help="never (default: only where one is seen)")
    add("--max-restarts", metavar="N", type=int,
        help="new codes if one expires (terminal: 2, else 0)")
    add("-q", "--quiet", action="store_true", help="only the prompt and errors on stderr")
    add("-v", "--verbose", action="store_true", help="log requests and responses, secrets masked")
    add = parser.add_argument_group("output").add_argument
    add("--format", metavar="FORMAT", choices=("json", "shell", "token", "exec-credential", "aws"),
        default="json", help="json (default), shell, token, exec-credential "
        "(kubectl; implies --cache) or aws (AWS SDKs)")
    add = parser.add_argument_group("AWS credentials").add_argument
    add("--aws-role-arn", metavar="ARN", help="for this IAM role (env VOUCH_AWS_ROLE_ARN)")
    add("--aws-region", metavar="REGION", help="regional STS (env AWS_REGION; default global)")
    add("--aws-sts-endpoint", metavar="URL", help="STS URL (env AWS_ENDPOINT_URL_STS)")
    add("--aws-session-name", metavar="NAME", help="role session name (default: email or sub)")
    add("--aws-duration", metavar="SECONDS", type=int,
        help="credential lifetime, 900-43200 (default %d)" % DEFAULT_AWS_DURATION)
    add = parser.add_argument_group("sessions").add_argument
    add("--cache", action="store_true", help="reuse a fresh cached token (env VOUCH_CACHE=1)")
    add("--min-ttl", metavar="SECONDS", type=int, default=DEFAULT_MIN_TTL,
        help="least lifetime left to reuse one (default %d)" % DEFAULT_MIN_TTL)
    add("--logout", action="store_true", help="revoke and remove cached sign-ins, then exit")
    add = parser.add_argument_group("verification and policy").add_argument
    add("--verify", action="store_true", help="check token signatures and claims (else exit 7)")
    add("--jwks-uri", metavar="URL", help="with --verify: this JWKS URL, not discovery")
    add("--jwks", metavar="FILE", help="with --verify: the JWK Set in FILE (offline)")
    add("--audience", metavar="AUD", help="with --verify: audience (default: client id)")
    add("--leeway", metavar="SECONDS", type=int, default=60,
        help="with --verify: clock skew allowed (default 60)")
    add("--require-hardware", action="store_true", help="exit 8 unless hardware_verified is true")
    add("--require-aaguid", metavar="UUID", action="append", default=[],
        help="exit 8 unless hardware_aaguid is one of these")
    add("--userinfo", action="store_true", help="add the userinfo endpoint's answer")
    add("--inspect", metavar="TOKEN", help="show TOKEN's claims (or @FILE's), no sign-in")
    add = parser.add_argument_group("requests").add_argument
    add("--authorization-details", metavar="JSON", help="RFC 9396 details: a JSON array, or @FILE")
    add("--resource", metavar="URI", action="append", default=[],
        help="RFC 8707 resource indicator (repeatable)")
    add("--device-authorization-endpoint", metavar="URL", help="use this URL instead of discovery")
    add("--token-endpoint", metavar="URL", help="use this URL instead of discovery")
    add("--timeout", metavar="SECONDS", type=float, default=DEFAULT_TIMEOUT,
        help="limit for each HTTP request (default %g)" % DEFAULT_TIMEOUT)
    add("--cacert", metavar="FILE", help="trust these CA certificates (env SSL_CERT_FILE)")
    add = parser.add_argument_group("Vouch credentials").add_argument
    add("--register", action="store_true", help="register this tool with the issuer, once")
    add("--ssh-certificate", metavar="PUBKEY", nargs="?", const="",
        help="write PUBKEY's certificate (~/.ssh/id_*.pub)")
    add("--ssh-ca", action="store_true", help="print the SSH CA's key (TrustedUserCAKeys)")
    add("--git-credential", metavar="OP", choices=("get", "store", "erase"),
        help="git credential helper: get, store or erase")
    # what the docker-credential-vouch launcher runs: Docker's helper protocol, not a person's flag
    add("--docker-credential", metavar="OP", choices=("get", "list", "store", "erase"), help=argparse.SUPPRESS)
    add("--k8s-audience", metavar="AUD", help="exec-credential: the cluster's audience")
    add = parser.add_argument_group("DPoP").add_argument
    add("--dpop", action="store_true", help="a token bound to a new key (env VOUCH_DPOP=1)")
    add("--dpop-alg", choices=DPOP_ALGORITHMS, help="its algorithm; implies --dpop")
    add("--dpop-proof", nargs=2, metavar=("METHOD", "URL"),
        help="print a proof for one request, no network")
    add("--dpop-nonce", metavar="NONCE", help="with --dpop-proof: the server's nonce")
    add = parser.add_argument_group("this command").add_argument
    add("--install", metavar="PREFIX", nargs="?", const=DEFAULT_INSTALL_PREFIX,
        help="install %s (PREFIX: %s)" % (_LAUNCHER_NAME, DEFAULT_INSTALL_PREFIX))
    add("--version", action="version", version="%s %s" % (prog, __version__), help="print the version and exit")
    add("-h", "--help", action="help", help="show this help and exit")
    return parser


def _config_from_args(args, environ, terminal):
    """Combine flags, environment and defaults into a _Config, or raise UsageError."""
    if args.issuer is not None and not args.issuer.strip():
        # an empty flag is a mistake (an unset variable in a script), not a request for the default
        raise UsageError("--issuer is empty: pass the issuer's URL (e.g. %s), or leave the flag out" % DEFAULT_ISSUER)
    issuer = args.issuer or environ.get("VOUCH_ISSUER") or DEFAULT_ISSUER
    client_id = args.client_id or environ.get("VOUCH_CLIENT_ID")
    inspect = _inspect_argument(args.inspect)
    helper = _helper_mode(args)
    client = None
    if client_id and args.register:
        raise UsageError("--register makes a client of its own; drop --client-id (and VOUCH_CLIENT_ID)")
    if not client_id and inspect is None and not args.ssh_ca:
        client = _load_client(_client_store(environ, issuer), issuer)
        if client is None and not args.register:
            if helper:
                raise UsageError("%s needs a client registered with --register: run %s --register --cache once in a"
                                 " terminal" % (helper, _LAUNCHER_NAME))
            raise UsageError("no client id: pass --client-id, set VOUCH_CLIENT_ID, or register this tool with"
                             " --register")
        client_id = client.client_id if client is not None else None
    if client_id and (client_id != client_id.strip() or _has_control_character(client_id)):
        raise UsageError("the client id %r holds control characters or blanks at its ends; pass it as the issuer"
                         " shows it" % client_id)
    audience = args.audience or client_id
    if inspect is not None:
        if args.format != "json":
            raise UsageError("--inspect prints JSON only; drop --format %s" % args.format)
        if args.verify and not audience:
            raise UsageError("--inspect --verify needs the expected audience: pass --audience or --client-id")
    if not 0 <= args.leeway <= 600:
        raise UsageError("--leeway must be between 0 and 600 seconds")
    if args.jwks_uri is not None:
        try:
            _parse_url(args.jwks_uri, "--jwks-uri")
        except ProtocolError as exc:
            raise UsageError(str(exc))
    if args.jwks and args.jwks_uri:
        raise UsageError("pass --jwks or --jwks-uri, not both")
    scope = args.scope if args.scope is not None else environ.get("VOUCH_SCOPE", DEFAULT_SCOPE)
    # RFC 6749 §3.3: scope tokens of %x21 / %x23-5B / %x5D-7E, separated by spaces; "" asks for no scope
    if scope and (not scope.strip(" ") or any(not ("\x20" <= ch <= "\x7e") or ch in '"\\' for ch in scope)):
        raise UsageError("the scope %r is not a space-separated list of scope tokens (RFC 6749 §3.3); pass --scope ''"
                         " for none" % scope)
    for what, url in (("--issuer", issuer), ("--device-authorization-endpoint", args.device_authorization_endpoint),
                      ("--token-endpoint", args.token_endpoint)):
        if url is not None:
            _check_url_argument(url, what)
    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be more than 0 and at most 3600 seconds")
    max_restarts = args.max_restarts
    if max_restarts is None:
        max_restarts = 2 if terminal.isatty() else 0
    if not 0 <= max_restarts <= 100:
        raise UsageError("--max-restarts must be between 0 and 100")
    # Every local file is read now: a mistake in one must not cost a sign-in the person already approved.
    if args.cacert:
        _check_cacert(args.cacert)
    jwks = _read_jwks_file(args.jwks) if args.jwks else None
    if args.min_ttl < 0:
        raise UsageError("--min-ttl must not be negative")
    # a registered client's every grant is DPoP-bound, as Vouch requires of it
    dpop = bool(args.dpop or args.dpop_alg or client or args.register) \
        or environ.get("VOUCH_DPOP", "").lower() in ("1", "true", "yes", "on")
    # kubectl runs its exec plugin before every command, git and Docker theirs before every pull: only a
    # cache makes that bearable.
    cache = args.cache or args.format == "exec-credential" or bool(helper) \
        or environ.get("VOUCH_CACHE", "").lower() in ("1", "true", "yes", "on")
    if dpop and args.format == "token" and not cache and args.dpop_proof is None:
        raise UsageError("--format token with --dpop needs --cache: the token is useless without its key, "
                         "which only the cache, json and shell outputs keep")
    details = _authorization_details(args.authorization_details)
    aws = _aws_settings(args, environ)
    exec_api_version, interactive = _exec_info(environ) if args.format == "exec-credential" else (None, None)
    if helper in ("git", "Docker"):
        # git and Docker run helpers without a terminal and swallow their stderr: nobody would see a prompt
        interactive = False
    k8s_audience = args.k8s_audience or (environ.get("VOUCH_K8S_AUDIENCE") if args.format == "exec-credential"
                                         else None)
    if k8s_audience is not None and (args.format != "exec-credential" or not k8s_audience
                                     or not all("\x21" <= ch <= "\x7e" for ch in k8s_audience)):
        raise UsageError("--k8s-audience goes with --format exec-credential and names the cluster's audience")
    if (client or args.register) and args.format == "exec-credential" and not k8s_audience:
        raise UsageError("kubectl's token comes from Vouch's /v1 API for a registered client: pass --k8s-audience AUD"
                         " (env VOUCH_K8S_AUDIENCE), the audience the cluster's OIDC settings expect")
    if (args.ssh_certificate is not None or k8s_audience) and not (client or args.register):
        raise UsageError("--ssh-certificate and --k8s-audience use Vouch's /v1 API, which takes requests signed with"
                         " the key of a client registered with --register; drop --client-id and run --register")
    for resource in args.resource:
        _check_resource(resource)
    extra = [("resource", r) for r in args.resource]
    if details is not None:
        extra.insert(0, ("authorization_details", details))
    return _Config(
        issuer=issuer,
        client_id=client_id,
        scope=scope,
        device_authorization_endpoint=args.device_authorization_endpoint,
        token_endpoint=args.token_endpoint,
        timeout=args.timeout,
        cacert=args.cacert,
        output_format=args.format,
        max_restarts=max_restarts,
        needs_metadata=args.userinfo or (args.verify and not (args.jwks or args.jwks_uri)),
        verify=args.verify,
        jwks_uri=args.jwks_uri,
        jwks_file=args.jwks,
        jwks=jwks,
        audience=audience,
        leeway=args.leeway,
        inspect=inspect,
        extra_device_parameters=extra,
        qr=args.qr,
        copy=args.copy,
        browser=args.browser,
        environ=environ,
        cache=cache,
        min_ttl=args.min_ttl,
        logout=args.logout,
        userinfo=args.userinfo,
        require_hardware=args.require_hardware,
        require_aaguid=[_aaguid_argument(a) for a in args.require_aaguid],
        authorization_details=details,
        resources=list(args.resource),
        exec_api_version=exec_api_version,
        interactive=interactive,
        dpop=dpop,
        dpop_alg=args.dpop_alg,
        register=args.register,
        client=client,
        helper=helper,
        ssh_certificate=args.ssh_certificate,
        ssh_ca=args.ssh_ca,
        git_credential=args.git_credential,
        docker_credential=args.docker_credential,
        docker_input=getattr(args, "docker_input", None),
        k8s_audience=k8s_audience,
        **aws
    )


def _helper_mode(args):
    """The name of the credential mode asked for (git, Docker, SSH), or None; two at once are a usage error."""
    modes = [name for name, on in (("git", args.git_credential), ("Docker", args.docker_credential),
                                   ("SSH", args.ssh_certificate is not None or args.ssh_ca)) if on]
    if len(modes) > 1:
        raise UsageError("one credential at a time: %s" % " or ".join(modes))
    if modes and (args.logout or args.inspect is not None or args.format != "json"):
        raise UsageError("a credential mode prints what its consumer reads; drop --format, --logout and --inspect")
    return modes[0] if modes else None


MAX_AUTHORIZATION_DETAILS = 8 * 1024


def _check_cacert(path):
    """--cacert must name a readable file of PEM CA certificates."""
    import ssl
    if not os.path.isfile(path):
        raise UsageError("--cacert %s: no such file" % path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise UsageError("--cacert %s: no PEM certificates in it" % path)
    except OSError as exc:
        raise UsageError("--cacert %s: %s" % (path, exc.strerror or exc))


def _inspect_argument(value):
    """The token of --inspect TOKEN or --inspect @FILE (surrounding white space dropped)."""
    if value is None:
        return None
    if value.startswith("@"):
        try:
            with open(value[1:], "rb") as handle:
                data = handle.read(_MAX_TOKEN_LENGTH + 1)
        except OSError as exc:
            raise UsageError("--inspect %s: %s" % (value[1:], exc.strerror or exc))
        try:
            value = data.decode("ascii")
        except UnicodeDecodeError:
            raise UsageError("--inspect %s: not an ASCII token" % value[1:])
    return value.strip()


def _authorization_details(value):
    """Check --authorization-details (RFC 9396 §2) and return it as compact JSON text."""
    import json
    if value is None:
        return None
    source = "--authorization-details"
    if value.startswith("@"):
        source = value[1:]
        try:
            with open(source, "rb") as handle:
                value = handle.read(MAX_AUTHORIZATION_DETAILS + 1)
        except OSError as exc:
            raise UsageError("--authorization-details: cannot read %s: %s" % (source, exc.strerror or exc))
    if len(value) > MAX_AUTHORIZATION_DETAILS:
        raise UsageError("%s: authorization details longer than %d bytes" % (source, MAX_AUTHORIZATION_DETAILS))
    try:
        details = _loads_json(value)
    except ValueError as exc:
        raise UsageError("%s: not valid JSON: %s" % (source, exc))
    if not isinstance(details, list) or not details:
        raise UsageError("%s: authorization details must be a non-empty JSON array of objects" % source)
    for index, item in enumerate(details):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not item["type"]:
            raise UsageError("%s: item %d must be an object with a string \"type\"" % (source, index))
    return json.dumps(details, separators=(",", ":"))


def _check_url_argument(url, what):
    """A URL flag: like an endpoint URL, and a bare host name gets the URL it probably meant."""
    from urllib.parse import urlsplit
    if "://" not in url and url.strip() and all("\x21" <= ch <= "\x7e" for ch in url):
        try:
            host = urlsplit("//" + url).hostname
        except ValueError:
            host = None
        if host:
            # Loopback is where plain http is allowed, and where local test issuers listen.
            scheme = "http" if _is_loopback_host(host) else "https"
            raise UsageError("%s %s is not a URL; did you mean %s://%s?" % (what, url, scheme, url))
    try:
        _parse_url(url, what)
    except ProtocolError as exc:
        raise UsageError(str(exc))


def _check_resource(resource):
    """RFC 8707 §2: an absolute URI without a fragment."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(resource)
    except ValueError:
        parts = None
    if parts is None or not parts.scheme or not (parts.netloc or parts.path) or "#" in resource \
            or any(ch.isspace() or ord(ch) < 0x20 for ch in resource):
        raise UsageError("--resource %s: must be an absolute URI without a fragment" % _sanitize(resource))


def _aaguid_argument(value):
    if not _is_uuid(value):
        raise UsageError("--require-aaguid %s: not a UUID like cb69481e-8ff7-4039-93ec-0a2729a154a8"
                         % _sanitize(value))
    return value.lower()


def main(argv=None):
    """Run the command line; returns the exit code (SPEC §2).

    Prints the result on stdout only when everything succeeded; every
    message for the person goes to stderr.
    """
    prog, command = _PROG, "python3 vouch_device_login.py"
    if argv is None:
        argv = sys.argv[1:]
        prog, command = _invoked_as(sys.argv[0] if sys.argv else "")
    argv = list(argv)
    terminal = _Terminal(verbose="-v" in argv or "--verbose" in argv, prog=prog)
    http = None
    docker = False
    try:
        if "--version" in argv[: argv.index("--") if "--" in argv else len(argv)]:
            # Answered before argparse is imported: shell profiles call this often.
            _write_stdout("%s %s\n" % (prog, __version__))
            return 0
        quick = _quick_proof_arguments(argv)
        if quick is not None and os.environ.get("VOUCH_DPOP_KEY"):
            # Also answered before argparse: scripts run it once per request.
            _write_stdout(_dpop_proof_text(*quick, environ=os.environ) + "\n")
            return 0
        cached = _cached_credential(argv, os.environ)
        if cached is not None:
            _write_stdout(cached)
            return 0
        args = _argument_parser(prog, command).parse_args(argv)
        terminal = _Terminal(quiet=args.quiet, verbose=args.verbose, prog=prog)
        docker = args.docker_credential is not None
        if docker:
            args.docker_input = _helper_input(getattr(sys.stdin, "buffer", None))
            answer = _docker_without_vouch(args.docker_credential, args.docker_input)
            if answer is not None:
                _write_stdout(answer)
                return 0
        if args.dpop_proof is not None:
            # the cache entry to read is that of the configuration; without a client id there is none
            registered = os.path.exists(_client_store(os.environ, args.issuer or os.environ.get("VOUCH_ISSUER")
                                                      or DEFAULT_ISSUER).path)
            config = None if os.environ.get("VOUCH_DPOP_KEY") or not (args.client_id or os.environ.get(
                "VOUCH_CLIENT_ID") or registered) else _config_from_args(args, os.environ, terminal)
            _write_stdout(_dpop_proof_text(*args.dpop_proof, nonce=args.dpop_nonce, environ=os.environ,
                                           config=config) + "\n")
            return 0
        if args.dpop_nonce is not None:
            raise UsageError("--dpop-nonce goes with --dpop-proof")
        if args.install is not None:
            if args.inspect is not None or args.logout:
                raise UsageError("--install is done on its own; drop --inspect and --logout")
            _install(args.install, terminal)
            return 0
        config = _config_from_args(args, os.environ, terminal)
        if not config.logout:
            _check_stdout()
        http = _HttpClient(timeout=config.timeout, cafile=config.cacert, terminal=terminal)
        if config.helper:
            _write_stdout(_credential(config, http, terminal, getattr(sys.stdin, "buffer", None)
                                      if config.git_credential else None))
            return 0
        result = _run(config, http, terminal)
        if result is not None:
            _write_stdout(render_output(result, config.output_format, pretty=_isatty(sys.stdout),
                                        exec_api_version=config.exec_api_version))
        return 0
    except SystemExit as exc:
        # argparse's --help exits 0 after printing on stdout.
        return exc.code if isinstance(exc.code, int) else 0
    except VouchError as exc:
        terminal.error(str(exc))
        if docker:
            # Docker reads a helper's error from its stdout (its not-found text by the letter), not its stderr
            try:
                _write_stdout(str(exc) + "\n")
            except VouchError:
                pass
        return exc.exit_code
    except KeyboardInterrupt:
        terminal.write("\n%s: interrupted\n" % terminal.prog)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if terminal.verbose:
            import traceback
            terminal.write(traceback.format_exc())
        terminal.error("internal error (a bug; rerun with -v for details): %s: %s"
                       % (type(exc).__name__, _sanitize(str(exc), 200)))
        return 1
    finally:
        if http is not None:
            http.close()


def _has_control_character(text):
    """Whether text holds a C0 or C1 control or DEL."""
    return any(ch < "\x20" or "\x7f" <= ch <= "\x9f" for ch in text)


def _isatty(stream):
    try:
        return bool(stream is not None and stream.isatty())
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
