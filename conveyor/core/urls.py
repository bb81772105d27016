"""URL parsing, validation and password masking.

Every implementation owns its URL (``from_url``) and uses these helpers so that all of them
reject bad URLs the same way (:class:`~conveyor.core.errors.InvalidURL`) and never print a
password: :func:`mask_url` is applied to every URL that reaches a message, log line or
``repr``.

Several URLs separated by ``;`` are failover alternates, as in kombu and Celery
(``amqp://h1//;amqp://h2//``, ``cache+memcached://h1:11211;h2:11211/``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from conveyor.core.errors import InvalidURL

__all__ = ["ParsedURL", "mask_url", "parse_url", "scheme_of", "split_alternates"]

MASK = "***"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# user:password@ in any URL-ish text; the password part stops at the last '@' before the host.
# The password may contain '@' (the last '@' before the path or query ends it).
# The password runs to the LAST '@' that is followed by a host (no '@' before the next '/',
# '?', '#', ';', white space or the end): a raw password may hold '@', '#', '?' or '/'. An
# '@' in a query string makes it mask the host too: over-masking, never a leak.
_USERINFO_RE = re.compile(
    r"(?P<pre>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@;\s]*):(?P<pw>[^;\s]*)@"
    r"(?=[^@/?#;\s]*(?:[/?#;\s]|$))"
)
# Fallback for text that is not a well-formed URL ('redis:/u:pw@h', 'u:pw@h:6379'): any
# 'user:secret@' token. The password part stops at '/', '@', ';' or white space.
_LOOSE_USERINFO_RE = re.compile(r"(?P<pre>(?:^|(?<=[\s;/'\"]))[^:/@;\s'\"]+):(?P<pw>[^/@;\s]+)@")


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


def mask_url(url: str) -> str:
    """Replace every password in ``url`` (or ``;``-joined URLs) with ``***``.

    Works on text that does not parse as a URL too, so it is safe to apply to anything.
    """
    if not url:
        return url
    masked = _USERINFO_RE.sub(lambda m: f"{m.group('pre')}:{MASK}@", url)
    return _LOOSE_USERINFO_RE.sub(lambda m: f"{m.group('pre')}:{MASK}@", masked)


def split_alternates(url: str) -> list[str]:
    """Split ``a://x;b://y`` into its alternates. A part without a scheme inherits the
    first part's scheme (``cache+memcached://h1:11211;h2:11211/``)."""
    parts = [p.strip() for p in url.split(";") if p.strip()]
    if not parts:
        raise InvalidURL("empty URL")
    first_scheme = scheme_of(parts[0])
    return [p if _SCHEME_RE.match(p) else f"{first_scheme}://{p}" for p in parts]


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
    query: Mapping[str, str] = field(default_factory=dict)

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
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        return f"{self.scheme}://{auth}{hosts}/{self.path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.masked()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _parse_port(text: str, url: str) -> int:
    if not text.isdigit():
        raise InvalidURL(f"bad port {text!r} in {mask_url(url)!r}: a port is a number 1-65535")
    port = int(text)
    if not 0 < port < 65536:
        raise InvalidURL(f"bad port {port} in {mask_url(url)!r}: a port is a number 1-65535")
    return port


def _parse_hostport(item: str, url: str, default_port: int | None) -> tuple[str, int | None]:
    item = item.strip()
    if item.startswith("["):  # [ipv6]:port
        end = item.find("]")
        if end < 0:
            raise InvalidURL(f"unclosed '[' in the host of {mask_url(url)!r}")
        host, rest = item[1:end], item[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidURL(f"bad host {item!r} in {mask_url(url)!r}")
        port = _parse_port(rest[1:], url) if rest else default_port
        return host, port
    if item.count(":") > 1:
        raise InvalidURL(f"bad host {item!r} in {mask_url(url)!r}: put IPv6 addresses in [...]")
    host, sep, port_text = item.partition(":")
    if sep and not port_text:
        raise InvalidURL(f"empty port after {host!r}: in {mask_url(url)!r}")
    port = _parse_port(port_text, url) if sep else default_port
    if any(c in host for c in " /?#@"):
        raise InvalidURL(f"bad host {host!r} in {mask_url(url)!r}")
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
    contain any character when percent-encoded; an unencoded ``@`` in a password is accepted
    too (the last ``@`` before the host separates credentials).

    Raises:
        InvalidURL: with the password masked, naming what is wrong.
    """
    scheme = scheme_of(url)
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
