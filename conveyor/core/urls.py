"""URL parsing, validation, and masking of every secret that could reach output.

Every implementation owns its URL (``from_url``) and uses these helpers so that all of them
reject bad URLs the same way (:class:`~conveyor.core.errors.InvalidURL`) and never print a
secret. Three maskers, public and stable:

* :func:`mask_url` for a URL (or ``;``-joined alternates): the password and every query
  value become ``***``, except the values of known public options (:func:`is_public_option`:
  ``db``, ``ssl_cert_reqs``, ``visibility_timeout``, ...).
* :func:`mask_options` for option mappings (``broker_transport_options``, settings): every
  value under a secret-named key becomes ``***``, recursively through nested maps and lists;
  strings elsewhere go through :func:`mask_text`.
* :func:`mask_text` for free text that may embed URLs or ``key=value`` pairs (a driver's
  error message, a log line).

Over-masking is accepted, a leak never is. The rules:

* **Userinfo**: from the first ``scheme://`` to the *last* ``@`` of the text is credentials.
  A password may hold any character raw (``@ : / ? # ; %``, space, tab), and another URL may
  follow (``;`` alternates), so nothing shorter is safe: ``amqp://u:a@h1//;amqp://u:b@h2//``
  shows as ``amqp://u:***@h2//`` (the first host is hidden with the passwords). The user
  name before the first ``:`` stays visible when it is plain (no ``@ / ; ? #`` or white
  space) and differs from the password (``guest:guest`` hides both); a lone user name with
  no password stays visible (``amqp://guest@rabbit//``). Without ``://`` (``u:pw@h``,
  ``redis:/u:pw@h``) the span runs from the first ``:`` to the last ``@``.
* **Secret keys**: a key names a secret when, lower-cased with everything but letters and
  digits removed, it contains ``pass``, ``pwd``, ``secret``, ``token``, ``key``, ``auth``,
  ``credential``, ``cookie`` or ``signature`` (``password``, ``sentinel_password``,
  ``ssl_keyfile_password``, ``tlsCertificateKeyFilePassword``, ``security_key``,
  ``access_key``, ``api_key``, ``auth_token``, ``authMechanismProperties``). Accepted false
  positives, hidden although not secret: file paths such as ``ssl_keyfile`` or
  ``tlsCertificateKeyFile``, ``key_prefix``, ``routing_key``, ``passive``. Exempt because
  they are never secret and are needed to debug authentication: ``authSource``,
  ``authMechanism``. Keys are percent- and ``+``-decoded before the test (``pass%77ord``).
* **Unknown keys**: in a URL, the value of a query key that is not a known public option
  (:data:`PUBLIC_OPTIONS`: conveyor's own options of every broker and result backend, and
  the common non-secret connection options of the drivers) is masked too: a misspelt secret
  (``?pasword=``, ``?secrte=``) names no secret, and is refused as an unknown option, but its
  value is still a secret. :func:`mask_text` applies this rule to the query of every
  ``scheme://`` URL it finds in free text; other ``key=value`` pairs of free text are masked
  only under secret keys.
* **Query values** masked run to the next ``&`` or the end of the text (a raw ``&`` ends a
  value for every URL parser too); a value that itself embeds a secret
  (``ssl_options={'keyfile_password': ...}``) is masked whole.
* :func:`mask_text` also masks ``key=value``, ``key: value``, ``'key': 'value'`` and
  ``"key": "value"`` pairs under secret keys, and whitespace-free ``user:secret@host``
  tokens.

Several URLs separated by ``;`` are failover alternates, as in kombu and Celery
(``amqp://h1//;amqp://h2//``, ``cache+memcached://h1:11211;h2:11211/``). A password in such a
URL must percent-encode ``;`` (``%3B``): :func:`split_alternates` refuses a ``;`` that falls
inside credentials, without echoing any part of them.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

from conveyor.core.errors import InvalidURL

__all__ = [
    "MASK",
    "PUBLIC_OPTIONS",
    "ParsedURL",
    "is_public_option",
    "is_secret_key",
    "mask_options",
    "mask_text",
    "mask_url",
    "parse_url",
    "refuse_ambiguous_credentials",
    "scheme_of",
    "split_alternates",
]

MASK = "***"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_SECRET_WORDS = (
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "auth",
    "credential",
    "cookie",
    "signature",
)
_NEVER_SECRET = frozenset({"authsource", "authmechanism"})

#: Query keys whose values :func:`mask_url` shows: options known never to hold a secret.
#: Every other key's value is masked (a misspelt ``pasword`` included). Keys are compared
#: lower-cased with everything but letters and digits removed, and a key that names a
#: secret (:func:`is_secret_key`) is masked even if listed. tests/unit/test_secret_masking.py
#: checks that every plain option of every conveyor implementation is listed here.
PUBLIC_OPTIONS = frozenset(
    {
        # conveyor's options (the options dataclasses of conveyor.transports/backends)
        "accept", "accept_compression", "async_settle", "client_name", "collection",
        "compression", "connect_timeout", "connection_name", "consumer_timeout",
        "contention_timeout", "counter_collection", "counter_table", "create_indexes",
        "create_tables", "database", "dead_letter", "default_ttl", "delivery_limit", "echo",
        "group_table", "groupmeta_collection", "health_check_interval", "heartbeat",
        "lease_seconds", "master_name", "max_cached", "max_connections", "max_message_size",
        "max_overflow", "max_poll_interval", "max_pool_size", "max_priority", "max_retries",
        "max_retry_interval", "notify", "operation_timeout", "persistent", "poll_interval",
        "pool_recycle", "pool_size", "pool_timeout", "prefetch_count", "priority_steps",
        "promote_batch", "promote_interval", "queue_type", "reclaim_batch", "reply_to",
        "retry_backoff_cap", "retry_interval", "schema", "sentinel_username", "sep",
        "serializer", "server_selection_timeout", "socket_connect_timeout",
        "socket_keepalive", "socket_timeout", "sqlite_synchronous", "ssl_ca_certs",
        "ssl_cert_reqs", "ssl_certfile", "ssl_check_hostname", "table_name", "task_table",
        "taskmeta_collection", "timeout", "wait_recheck_interval",
        # Celery / kombu / redis-py URL options
        "db", "ssl", "tls", "visibility_timeout", "polling_interval", "virtual_host",
        "frame_max", "channel_max", "login_method", "queue_name_prefix", "region",
        # MongoDB URI options (pymongo.common.URI_OPTIONS_VALIDATOR_MAP, secrets left out)
        "appName", "authSource", "authMechanism", "compressors", "connect",
        "connectTimeoutMS", "directConnection", "heartbeatFrequencyMS", "journal",
        "loadBalanced", "localThresholdMS", "maxConnecting", "maxIdleTimeMS", "maxPoolSize",
        "maxStalenessSeconds", "minPoolSize", "readConcernLevel", "readPreference",
        "readPreferenceTags", "replicaSet", "retryReads", "retryWrites",
        "serverMonitoringMode", "serverSelectionTimeoutMS", "socketTimeoutMS", "srvMaxHosts",
        "srvServiceName", "tlsAllowInvalidCertificates", "tlsAllowInvalidHostnames",
        "tlsCAFile", "tlsCRLFile", "tlsDisableOCSPEndpointCheck", "tlsInsecure",
        "uuidRepresentation", "w", "waitQueueTimeoutMS", "wTimeoutMS", "timeoutMS",
        "zlibCompressionLevel", "tz_aware", "fsync",
        # libpq (PostgreSQL), PyMySQL, pysqlite and SQLAlchemy connection options
        "sslmode", "application_name", "target_session_attrs", "keepalives",
        "keepalives_idle", "keepalives_interval", "keepalives_count", "sslrootcert",
        "sslcert", "gssencmode", "client_encoding", "load_balance_hosts", "channel_binding",
        "host", "hostaddr", "port", "dbname", "user", "charset", "read_timeout",
        "write_timeout", "autocommit", "local_infile", "ssl_ca", "ssl_cert", "ssl_capath",
        "ssl_cipher", "ssl_disabled", "ssl_verify_cert", "ssl_verify_identity", "unix_socket",
        "binary_prefix", "program_name", "sql_mode", "client_flag", "plugin", "uri",
        "isolation_level", "detect_types", "check_same_thread", "cached_statements", "vfs",
        "mode", "cache", "psow", "nolock", "immutable", "modeof",
    }
)  # fmt: skip
#: A user name shown in front of ``:***@``: nothing that could be part of a password's
#: structure.
_PLAIN_USER = re.compile(r"[^@:/;?#\s]*")
_AMPERSAND = re.compile("&")
_ESCAPE = re.compile("[%+]")
#: ``key=`` after a query separator; the key cannot hold a separator or ``=``.
_QUERY_KEY = re.compile(r"[?&;#]([^=&?#;]*)=")
#: A key=value or key: value pair in free text; the value is quoted (with escapes) or bare.
#: The key starts at a word boundary (the look-behind keeps the scan linear on long words).
_TEXT_PAIR = re.compile(
    r"""(?<![A-Za-z0-9_.\-])(?P<q>['"]?)(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P=q)\s*[=:]\s*"""
    r"""(?P<value>b?'(?:[^'\\]|\\.)*'?|b?"(?:[^"\\]|\\.)*"?|[^\s,;&)}\]'"]*)"""
)
#: Whitespace- and bracket-free tokens, searched for ``user:secret@host``.
_TOKEN = re.compile(r"[^\s'\"<>(){}\[\],]+")


def is_secret_key(key: object) -> bool:
    """Whether an option or query key names a secret (see the module docstring)."""
    text = key.decode("latin-1") if isinstance(key, (bytes, bytearray)) else str(key)
    name = _normal_key(text)
    if name in _NEVER_SECRET:
        return False
    return any(word in name for word in _SECRET_WORDS)


def _normal_key(text: str) -> str:
    return _NOT_ALNUM.sub("", unquote_plus(text).lower())


_PUBLIC = frozenset(_normal_key(k) for k in PUBLIC_OPTIONS)


def is_public_option(key: object) -> bool:
    """Whether a URL query key's value may be shown: a known option (:data:`PUBLIC_OPTIONS`)
    that names no secret. :func:`mask_url` masks the values of all other keys."""
    text = key.decode("latin-1") if isinstance(key, (bytes, bytearray)) else str(key)
    return _normal_key(text) in _PUBLIC and not is_secret_key(text)


def _first_scheme_end(text: str, end: int) -> int:
    """The index just past the first ``scheme://`` before ``end``, or -1 (linear time)."""
    pos = text.find("://", 0, end)
    while pos >= 0:
        first = pos
        while first > 0 and text[first - 1] in _SCHEME_CHARS:
            first -= 1
        while first < pos and not text[first].isalpha():  # a scheme starts with a letter
            first += 1
        if first < pos and text[first].isascii():
            return pos + 3
        pos = text.find("://", pos + 1, end)
    return -1


def _userinfo_span(text: str, *, loose_start: bool) -> list[tuple[int, int]]:
    """The credentials span: first ``scheme://`` (or first ``:``) to the last ``@``."""
    at = text.rfind("@")
    if at < 0:
        return []
    start = _first_scheme_end(text, at)
    if start < 0:
        first_colon = text.find(":", 0, at)
        return [(first_colon + 1, at)] if loose_start and first_colon >= 0 else []
    region = text[start:at]
    user, colon, password = region.partition(":")
    if not colon:
        # A lone user name (no password) is shown; anything odd is masked whole.
        return [] if _PLAIN_USER.fullmatch(region) else [(start, at)]
    if not user:
        return [(start + 1, at)]
    if _PLAIN_USER.fullmatch(user) and unquote(user) != unquote(password):
        return [(start + len(user) + 1, at)]
    return [(start, at)]


#: Longest percent-encoded query value decoded to look for secrets inside; a longer one that
#: has escapes is masked whole (keeps masking linear on hostile text).
_DECODE_LIMIT = 1024


def _embeds_secret(text: str, start: int, end: int, escapes: list[int]) -> bool:
    """Whether ``text[start:end]``, percent-decoded, hides a secret (raw text is scanned by
    the callers). ``escapes``: sorted positions of ``%`` and ``+`` in ``text``."""
    nxt = bisect.bisect_left(escapes, start)
    if nxt == len(escapes) or escapes[nxt] >= end:
        return False
    if end - start > _DECODE_LIMIT:
        return True
    plain = unquote_plus(text[start:end])
    return bool(
        _pair_spans(plain) or _userinfo_span(plain, loose_start=False) or _loose_spans(plain)
    )


def _query_spans(text: str, *, unknown_too: bool = False) -> list[tuple[int, int]]:
    """Spans of the query values to mask: under a secret key, embedding a secret, and with
    ``unknown_too`` under any key that is not a public option."""
    if "=" not in text:
        return []
    ampersands = [m.start() for m in _AMPERSAND.finditer(text)]
    escapes = [m.start() for m in _ESCAPE.finditer(text)]
    spans = []
    for match in _QUERY_KEY.finditer(text):
        start = match.end()
        nxt = bisect.bisect_left(ampersands, start)
        end = ampersands[nxt] if nxt < len(ampersands) else len(text)
        key = match.group(1)
        if start < end and (
            (not is_public_option(key) if unknown_too else is_secret_key(key))
            or _embeds_secret(text, start, end, escapes)
        ):
            spans.append((start, end))
    return spans


#: Where a URL embedded in free text ends.
_URL_END = re.compile(r"[\s'\"<>]")


def _url_query_spans(text: str) -> list[tuple[int, int]]:
    """:func:`_query_spans` with ``unknown_too`` over each ``scheme://`` URL in free text (a
    URL runs to the next white space or quote). Linear: a URL is scanned once."""
    spans: list[tuple[int, int]] = []
    pos = text.find("://")
    while pos >= 0:
        first = pos
        while first > 0 and text[first - 1] in _SCHEME_CHARS:
            first -= 1
        found = _URL_END.search(text, pos)
        end = found.start() if found else len(text)
        url = text[first:end]
        if "=" in url:
            spans += [(first + a, first + b) for a, b in _query_spans(url, unknown_too=True)]
        pos = text.find("://", max(end, pos + 3))
    return spans


def _pair_spans(text: str) -> list[tuple[int, int]]:
    return [
        match.span("value")
        for match in _TEXT_PAIR.finditer(text)
        if match.group("value") and is_secret_key(match.group("key"))
    ]


def _loose_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        colon, at = token.find(":"), token.rfind("@")
        if 0 <= colon < at and "://" not in token:  # a URL is the userinfo rule's
            spans.append((match.start() + colon + 1, match.start() + at))
    return spans


def _apply(text: str, spans: Iterable[tuple[int, int]]) -> str:
    merged: list[list[int]] = []
    for start, end in sorted(s for s in spans if s[0] < s[1]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return text
    out, pos = [], 0
    for start, end in merged:
        out += [text[pos:start], MASK]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def mask_url(url: str) -> str:
    """``url`` (or ``;``-joined URLs) with credentials and query values as ``***``; only the
    values of public options (:func:`is_public_option`) stay visible.

    Safe to apply to any text; see the module docstring for the exact rules.
    """
    if not url or not isinstance(url, str):
        return url
    if "@" not in url and "=" not in url:
        return url
    # Pairs inside the query (``ssl_options={'keyfile_password': ...}``), not before it:
    # ``redis://key:pw@h`` is a user named 'key', not a pair.
    query = url.find("?", max(0, url.rfind("@")))
    pairs = [(a + query, b + query) for a, b in _pair_spans(url[query:])] if query >= 0 else []
    return _apply(
        url,
        [*_userinfo_span(url, loose_start=True), *_query_spans(url, unknown_too=True), *pairs],
    )


def mask_text(text: str) -> str:
    """Free ``text`` with every secret the module docstring's rules find masked.

    For messages that may embed URLs, option reprs or ``key=value`` pairs, such as a
    driver's error message; never raises.
    """
    if not text or not isinstance(text, str):
        return text
    return _apply(
        text,
        [
            *_userinfo_span(text, loose_start=False),
            *_query_spans(text),
            *_url_query_spans(text),
            *_pair_spans(text),
            *_loose_spans(text),
        ],
    )


class _Shown:
    """A value shown through its masked ``repr`` (objects :func:`mask_options` cannot walk)."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


_PLAIN_TYPES = (bool, int, float, complex, type(None))


def _mask_value(value: Any, seen: set[int]) -> Any:
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, str):
        return mask_url(value) if _SCHEME_RE.match(value.strip()) else mask_text(value)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("latin-1")
        return value if mask_text(text) == text and mask_url(text) == text else MASK
    if id(value) in seen:
        return _Shown("<...>")
    if isinstance(value, Mapping):
        seen.add(id(value))
        masked = {k: MASK if is_secret_key(k) else _mask_value(v, seen) for k, v in value.items()}
        seen.discard(id(value))
        return masked
    if isinstance(value, (list, tuple, set, frozenset)):
        seen.add(id(value))
        items = [_mask_value(v, seen) for v in value]
        seen.discard(id(value))
        if isinstance(value, list):
            return items
        if isinstance(value, tuple):
            return tuple(items)
        return _Shown(repr(items)) if isinstance(value, set) else _Shown(f"frozenset({items!r})")
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break an error message
        text = f"<{type(value).__name__}>"
    return _Shown(mask_text(text))


def mask_options(options: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of ``options`` fit to print: every value under a secret-named key (see
    :func:`is_secret_key`) is ``***``, at any depth of nested maps and lists; other strings
    go through :func:`mask_url` / :func:`mask_text`; objects show as their masked ``repr``.

    The result is for display only (its ``repr``), never for use as options.
    """
    masked = _mask_value(options, set())
    return masked if isinstance(masked, dict) else {"options": masked}


def scheme_of(url: str) -> str:
    """Return the lower-cased scheme of ``url`` (``sqla+postgresql`` for ``sqla+postgresql://``).

    Raises:
        InvalidURL: ``url`` is empty or has no ``scheme://`` prefix.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidURL(
            "empty URL: give a broker or result backend URL such as 'redis://localhost:6379/0' "
            "(an empty string is not taken as 'use the default')"
        )
    match = _SCHEME_RE.match(url.strip())
    if match is None:
        raise InvalidURL(
            f"{mask_url(url)!r} is not a URL: expected 'scheme://...', "
            "for example 'redis://localhost:6379/0' or 'sqla+sqlite:///conveyor.db'"
        )
    return match.group(1).lower()


def split_alternates(url: str) -> list[str]:
    """Split ``a://x;b://y`` into its alternates. A part without a scheme inherits the
    first part's scheme (``cache+memcached://h1:11211;h2:11211/``).

    Raises:
        InvalidURL: empty; or a ``;`` that must be inside credentials or a secret query
            value (a raw ``;`` in a password): the part after it has no scheme of its own
            but an ``@``, or follows a secret value, or the part before it is not a valid
            URL. The message shows only the masked URL, never a part of it.
    """
    pieces: list[tuple[int, str]] = []  # (offset of the ';' before the part, part)
    offset = -1
    for raw in url.split(";"):
        if raw.strip():
            pieces.append((offset, raw.strip()))
        offset += len(raw) + 1
    if not pieces:
        raise InvalidURL("empty URL")
    first_scheme = scheme_of(pieces[0][1])
    out = [p if _SCHEME_RE.match(p) else f"{first_scheme}://{p}" for _, p in pieces]
    if len(pieces) == 1:
        return out
    secret_values = _query_spans(url)
    for i, (semicolon, part) in enumerate(pieces):
        own_scheme = _SCHEME_RE.match(part) is not None
        ambiguous = (
            i > 0
            and not own_scheme
            and ("@" in part or any(a <= semicolon < b for a, b in secret_values))
        )
        if not ambiguous:
            try:
                parse_url(out[i])
            except InvalidURL:
                ambiguous = True
        if ambiguous:
            raise InvalidURL(
                f"cannot split {mask_url(url)!r} into ';'-separated alternates: alternate "
                f"{i + 1} is not a valid URL. A ';' inside a password or a query value must "
                "be percent-encoded (%3B)"
            )
    return out


@dataclass(frozen=True)
class ParsedURL:
    """A validated URL. ``password`` never appears in ``repr`` or ``str``.

    Attributes:
        scheme: lower-cased scheme, e.g. ``redis``.
        hosts: ``(host, port)`` pairs; several for ``h1:1,h2:2`` or ``;`` alternates.
            ``port`` is ``None`` when absent and no default was given.
        username: decoded user name, or None.
        password: decoded password, or None.
        path: the path without its leading ``/`` (``"0"`` for ``redis://h/0``; ``"/"`` for
            ``amqp://h//``), percent-decoded.
        query: query parameters; a repeated key keeps the last value.
    """

    scheme: str
    hosts: tuple[tuple[str, int | None], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = ""
    query: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (
            f"ParsedURL(scheme={self.scheme!r}, hosts={self.hosts!r}, "
            f"username={self.username!r}, path={self.path!r}, "
            f"query={mask_options(self.query)!r})"
        )

    @property
    def host(self) -> str | None:
        return self.hosts[0][0] if self.hosts else None

    @property
    def port(self) -> int | None:
        return self.hosts[0][1] if self.hosts else None

    def masked(self) -> str:
        """The URL rebuilt with the password masked."""
        auth = ""
        if self.username is not None or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += f":{MASK}"
            auth += "@"
        hosts = ",".join(h if p is None else f"{_host_for_url(h)}:{p}" for h, p in self.hosts)
        query = "&".join(
            f"{k}={mask_text(v) if is_public_option(k) else MASK}" for k, v in self.query.items()
        )
        return f"{self.scheme}://{auth}{hosts}/{self.path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.masked()


def refuse_ambiguous_credentials(url: str) -> None:
    """Refuse a URL with a raw ``?`` or ``#`` before its last ``@``.

    ``redis://u:pa?ss@h/0`` (a raw ``?`` in a password) and ``sqla+sqlite://h?password=a@b``
    (a raw ``@`` in a query value) read differently in every parser: ours takes the last
    ``@``, urllib and SQLAlchemy end the credentials or the host elsewhere, and a driver's
    error may then print a secret as if it were a host. Implementations that hand the URL to
    a driver call this first; :func:`parse_url` does.

    Raises:
        InvalidURL: naming what to percent-encode; the URL shown masked.
    """
    last_at = url.rfind("@")
    if last_at >= 0 and ("?" in url[:last_at] or "#" in url[:last_at]):
        raise InvalidURL(
            f"{mask_url(url)!r} has a raw '?' or '#' before its last '@': percent-encode "
            "'?' (%3F) and '#' (%23) in user names and passwords, and '@' (%40) in query "
            "values (urllib.parse.quote(password, safe=''))"
        )


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _shown(fragment: str, url: str) -> str:
    """``repr(fragment)`` if the masked URL shows it anyway, else the mask: an error never
    reveals more of a URL than :func:`mask_url` does."""
    return repr(fragment) if fragment in mask_url(url) else repr(MASK)


def _parse_port(text: str, url: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise InvalidURL(
            f"bad port {_shown(text, url)} in {mask_url(url)!r}: a port is a number 1-65535"
        )
    port = int(text)
    if not 0 < port < 65536:
        shown = str(port) if text in mask_url(url) else repr(MASK)
        raise InvalidURL(f"bad port {shown} in {mask_url(url)!r}: a port is a number 1-65535")
    return port


def _parse_hostport(item: str, url: str, default_port: int | None) -> tuple[str, int | None]:
    item = item.strip()
    if item.startswith("["):  # [ipv6]:port
        end = item.find("]")
        if end < 0:
            raise InvalidURL(f"unclosed '[' in the host of {mask_url(url)!r}")
        host, rest = item[1:end], item[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidURL(f"bad host {_shown(item, url)} in {mask_url(url)!r}")
        port = _parse_port(rest[1:], url) if rest else default_port
        return host, port
    if item.count(":") > 1:
        raise InvalidURL(
            f"bad host {_shown(item, url)} in {mask_url(url)!r}: put IPv6 addresses in [...]"
        )
    host, sep, port_text = item.partition(":")
    if sep and not port_text:
        raise InvalidURL(f"empty port after {_shown(host, url)}: in {mask_url(url)!r}")
    port = _parse_port(port_text, url) if sep else default_port
    if any(c in host for c in " /?#@"):
        raise InvalidURL(f"bad host {_shown(host, url)} in {mask_url(url)!r}")
    return unquote(host), port


def parse_url(
    url: str,
    *,
    default_host: str | None = None,
    default_port: int | None = None,
    require_host: bool = False,
) -> ParsedURL:
    """Parse and validate ``url``.

    Comma-separated hosts (``mongodb://h1:1,h2:2/db``) become several ``hosts``. Passwords may
    contain any character when percent-encoded; an unencoded ``@``, ``:``, ``/``, ``;``,
    ``%`` or space in a password is accepted too (the last ``@`` separates credentials), but
    a raw ``?`` or ``#`` before the last ``@`` is refused: other parsers (the drivers') would
    end the credentials there.

    Raises:
        InvalidURL: with the password masked, naming what is wrong.
    """
    scheme = scheme_of(url)
    refuse_ambiguous_credentials(url)
    rest = url.strip()[len(scheme) + 3 :]
    # Split off query and fragment first; credentials may contain '?' only percent-encoded.
    netloc_and_path, _, query_text = rest.partition("?")
    query_text = query_text.split("#", 1)[0]
    slash = netloc_and_path.find("/", netloc_and_path.rfind("@") + 1)
    netloc = netloc_and_path if slash < 0 else netloc_and_path[:slash]
    path = "" if slash < 0 else netloc_and_path[slash + 1 :]
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) if user else None
        password = unquote(pw) if sep else None
    hosts: list[tuple[str, int | None]] = []
    if netloc:
        for item in netloc.split(","):
            if not item.strip():
                raise InvalidURL(f"empty host in {mask_url(url)!r}")
            hosts.append(_parse_hostport(item, url, default_port))
    elif default_host is not None:
        hosts.append((default_host, default_port))
    if require_host and not hosts:
        raise InvalidURL(f"{mask_url(url)!r} names no host")
    try:
        query = dict(parse_qsl(query_text, keep_blank_values=True, strict_parsing=False))
    except ValueError as exc:  # pragma: no cover - parse_qsl is lenient
        raise InvalidURL(f"bad query string in {mask_url(url)!r}: {exc}") from None
    # urlsplit validates what we did not (e.g. control characters) without seeing credentials.
    try:
        urlsplit(f"{scheme}://h/{path}")
    except ValueError as exc:
        raise InvalidURL(f"bad URL {mask_url(url)!r}: {exc}") from None
    return ParsedURL(
        scheme=scheme,
        hosts=tuple(hosts),
        username=username,
        password=password,
        path=unquote(path),
        query=query,
    )
