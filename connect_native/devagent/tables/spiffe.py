"""
SPIFFE IDs as Consul's ``connect.ParseCertURI`` reads them (the authorize
endpoint's ``ClientCertURI``): the development agent's own reading, not the
library's :mod:`connect_native.identity`, which it checks.
"""

from __future__ import annotations

import re

from attrs import frozen


@frozen
class SpiffeService:
    """
    A service SPIFFE ID as Consul parses it: no check of the host.
    """

    host: str
    namespace: str
    datacenter: str
    service: str


_SPIFFE_SERVICE = re.compile(r"^/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)$")
_SPIFFE_AGENT = re.compile(r"^/agent/client/dc/([^/]+)/id/([^/]+)$")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


class CertURIError(ValueError):
    """
    Not a Connect identifier (``connect.ParseCertURIFromString`` failed).
    """


def _path_unescape(segment: str) -> str:
    if re.search(r"%(?![0-9A-Fa-f]{2})", segment):
        raise CertURIError(f"invalid URL escape in {segment!r}")
    raw = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), segment)
    # The escapes are bytes of UTF-8; Go keeps invalid sequences as bytes.
    return raw.encode("latin-1").decode("utf-8", errors="replace")


def parse_cert_uri(text: str) -> SpiffeService | str:
    """
    Consul 1.8.7's ``connect.ParseCertURIFromString``: a service identity, or
    the kind of another identity (``"agent"``, ``"signing"``).

    :raises CertURIError: when it is not a Connect identifier at all.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CertURIError("net/url: invalid control character in URL")
    scheme_match = _URL_SCHEME.match(text)
    if scheme_match is None or scheme_match.group(1).lower() != "spiffe":
        raise CertURIError("SPIFFE ID must have 'spiffe' scheme")
    rest = text[scheme_match.end() :]
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    if not rest.startswith("//"):
        raise CertURIError("SPIFFE ID is not in the expected format")
    authority, slash, path = rest[2:].partition("/")
    path = slash + path
    host = authority.rpartition("@")[2]
    if ":" in host and not host.startswith("["):
        port = host.rpartition(":")[2]
        if port and not port.isdigit():
            raise CertURIError(f"invalid port {port!r} after host")
    if match := _SPIFFE_SERVICE.match(path):
        ns, dc, service = (_path_unescape(s) for s in match.groups())
        return SpiffeService(host=host, namespace=ns, datacenter=dc, service=service)
    if _SPIFFE_AGENT.match(path):
        return "agent"
    if path == "" and host.find(".") > 0:
        return "signing"
    raise CertURIError("SPIFFE ID is not in the expected format")
