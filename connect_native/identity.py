"""
Consul's SPIFFE identities: parse, format and compare them, and find the one
a certificate carries.

Consul names every workload in its service mesh with a ``spiffe://`` URI
(``agent/connect/uri_*.go`` in Consul's source):

* a service: ``spiffe://<trust domain>/ns/<namespace>/dc/<datacenter>/svc/<service>``,
  with ``/ap/<partition>`` before ``/ns`` for a non-default admin partition;
* a client agent: ``spiffe://<trust domain>/agent/client/dc/<datacenter>/id/<node id>``,
  with the same optional ``/ap/<partition>`` prefix;
* the CA that signs them: ``spiffe://<trust domain>`` with no path, as in a
  root certificate's URI SAN.

The trust domain is ``<cluster id>.consul``.  It is a host name, so it
compares case-insensitively; the records here hold it lower-cased (see
:func:`normalize_trust_domain`).  Path segments keep their case (Consul's
leaf for service ``Web`` says ``svc/Web``) and are percent-escaped
(``a b`` is ``a%20b``, ``ünï`` is ``%C3%BCn%C3%AF``).

Parsing is strict: anything that is not exactly one of those forms raises
:class:`InvalidIdentity`, whose message says what is wrong with which input.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar
from urllib.parse import quote, unquote_to_bytes

from attrs import field, frozen
from cryptography import x509

from connect_native.errors import (
    InvalidIdentity,
)

__all__ = [
    "AgentIdentity",
    "InvalidIdentity",
    "ServiceIdentity",
    "SigningIdentity",
    "identity_of_certificate",
    "normalize_trust_domain",
    "parse_spiffe_id",
    "spiffe_uris",
]

SCHEME = "spiffe"
_PREFIX = "spiffe://"
DEFAULT_PARTITION = "default"

# Characters left unescaped when formatting a segment: Go's ``url.PathEscape``
# path set (what Consul's ``url.URL.String()`` leaves alone) minus "/", which
# must be escaped inside a segment.  Python's quote() always keeps
# letters, digits and "-._~".
_SEGMENT_SAFE = "$&+,:;=@"

# RFC 3986 pchar: unreserved, sub-delims, ":", "@", or a percent escape.
_RAW_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_TRUST_DOMAIN_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MAX_TRUST_DOMAIN = 255
_MAX_SHOWN = 200


def _shown(value: object) -> str:
    """
    The input as quoted in an error message, cut short so that a huge input
    cannot make a huge message.
    """
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "...(truncated)"
    return text


def normalize_trust_domain(td: str) -> str:
    """
    Check that ``td`` is a DNS-like host name and return it lower-cased.

    Trust domains are the host part of a SPIFFE ID, and host names compare
    case-insensitively; Consul lower-cases its own (``SpiffeIDSigning.Host``).
    The identity records store the lower-cased form, so two records that
    differ only in the case of the trust domain are equal.

    Accepted: ASCII labels of letters, digits, ``-`` and ``_`` (no label
    starts or ends with ``-``), 1 to 63 characters each, separated by single
    dots, 255 characters at most.  No port, user information, trailing dot,
    percent escape or non-ASCII character.

    :raises InvalidIdentity: naming what is wrong.
    """
    if not isinstance(td, str):
        raise InvalidIdentity(
            f"trust domain must be a str, not {type(td).__name__}: {_shown(td)}", td
        )
    if not td:
        raise InvalidIdentity("trust domain is empty", td)
    if not td.isascii():
        raise InvalidIdentity(
            f"trust domain {_shown(td)} contains non-ASCII characters; "
            "a trust domain is an ASCII host name",
            td,
        )
    if len(td) > _MAX_TRUST_DOMAIN:
        raise InvalidIdentity(
            f"trust domain {_shown(td)} is {len(td)} characters long; "
            f"at most {_MAX_TRUST_DOMAIN} are allowed",
            td,
        )
    for bad, what in (
        (":", "a port"),
        ("@", "user information"),
        ("%", "a percent escape"),
    ):
        if bad in td:
            raise InvalidIdentity(
                f"trust domain {_shown(td)} contains {what} ({bad!r}); "
                "it must be a bare host name",
                td,
            )
    lowered = td.lower()
    for position, label in enumerate(lowered.split("."), start=1):
        if not label:
            raise InvalidIdentity(
                f"trust domain {_shown(td)} has an empty label at position "
                f"{position} (leading, trailing or doubled '.')",
                td,
            )
        if not _TRUST_DOMAIN_LABEL.fullmatch(label):
            raise InvalidIdentity(
                f"trust domain {_shown(td)} has an invalid label {label!r}: "
                "labels are 1 to 63 letters, digits, '-' or '_', not starting "
                "or ending with '-'",
                td,
            )
    return lowered


def _check_segment(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidIdentity(
            f"{name} must be a str, not {type(value).__name__}: {_shown(value)}",
            value,
        )
    if not value:
        raise InvalidIdentity(f"{name} is empty", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidIdentity(
            f"{name} {_shown(value)} cannot be encoded as UTF-8 ({e.reason})", value
        ) from None
    return value


def _segment_validator(name: str) -> Any:
    def validate(instance: object, attribute: object, value: object) -> None:
        _check_segment(name, value)

    return validate


def _normalize_partition(partition: str | None) -> str | None:
    """
    ``None``, ``""`` and ``"default"`` (any case) all mean the default
    partition and become ``None``; any other partition is lower-cased, as
    Consul's ``PartitionOrDefault`` does when it formats a SPIFFE ID.
    """
    if partition is None:
        return None
    if isinstance(partition, str) and partition == "":
        return None
    lowered = _check_segment("partition", partition).lower()
    return None if lowered == DEFAULT_PARTITION else lowered


def _escape(value: str) -> str:
    if value in (".", ".."):
        # A raw dot segment would be removed by URI normalization.
        return "%2E" * len(value)
    return quote(value, safe=_SEGMENT_SAFE)


def _fold(value: str) -> str:
    """
    ASCII-only case folding: Go's ``strings.EqualFold`` on the escaped URIs,
    where every non-ASCII character is a percent escape compared exactly.
    """
    return value.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _partition_prefix(partition: str | None) -> str:
    return "" if partition is None else f"/ap/{_escape(partition)}"


@frozen
class ServiceIdentity:
    """
    A Consul service's SPIFFE ID.

    ``trust_domain`` is stored lower-cased (:func:`normalize_trust_domain`);
    ``partition`` is ``None`` for the default partition (``"default"`` and
    ``""`` are accepted and become ``None``; other names are lower-cased, as
    Consul formats them).  ``namespace``, ``datacenter`` and ``service`` keep
    their case and may hold any non-empty text; :attr:`uri` escapes them.

    Equality is exact on those normalized fields; :meth:`matches` is the
    looser comparison Consul's Go library makes when it checks a peer.
    """

    trust_domain: str = field(converter=normalize_trust_domain)
    namespace: str = field(validator=_segment_validator("namespace"))
    datacenter: str = field(validator=_segment_validator("datacenter"))
    service: str = field(validator=_segment_validator("service"))
    partition: str | None = field(default=None, converter=_normalize_partition)

    @property
    def uri(self) -> str:
        """
        The SPIFFE ID, as in the URI SAN of the service's leaf certificate.
        """
        return (
            f"{_PREFIX}{self.trust_domain}{_partition_prefix(self.partition)}"
            f"/ns/{_escape(self.namespace)}/dc/{_escape(self.datacenter)}"
            f"/svc/{_escape(self.service)}"
        )

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> ServiceIdentity:
        """
        Parse a service SPIFFE ID.

        :raises InvalidIdentity: if ``uri`` is not a valid SPIFFE ID, or is
            an agent or CA identity.
        """
        return _parse_as(cls, uri, "a service identity")

    @property
    def signing_identity(self) -> SigningIdentity:
        """
        The identity of the CA that may sign this service's certificate.
        """
        return SigningIdentity(self.trust_domain)

    def matches(self, expected: ServiceIdentity) -> bool:
        """
        Whether this (a peer's) identity is the ``expected`` one.

        Like Consul's Go library (``connect/tls.go``
        ``verifyServerCertMatchesURI``, which compares the two URIs with
        ``strings.EqualFold``): service, namespace, datacenter and partition
        compare ASCII case-insensitively (Consul's catalog treats ``Web`` and
        ``web`` as one service) and non-ASCII characters exactly; the
        default partition is ``None``.

        Unlike the Go library, which copies the peer's trust domain into the
        expected URI and leaves the trust domain to chain verification, the
        trust domains are compared too (case-insensitively, as host names).
        Build ``expected`` with the trust domain of the current CA roots.
        """
        if not isinstance(expected, ServiceIdentity):
            raise TypeError(
                "expected must be a ServiceIdentity, not "
                f"{type(expected).__name__}: {_shown(expected)}"
            )
        return (
            self.trust_domain == expected.trust_domain
            and self.partition == expected.partition
            and _fold(self.namespace) == _fold(expected.namespace)
            and _fold(self.datacenter) == _fold(expected.datacenter)
            and _fold(self.service) == _fold(expected.service)
        )


@frozen
class AgentIdentity:
    """
    A Consul client agent's SPIFFE ID; ``agent`` is the node ID.

    ``trust_domain`` and ``partition`` are normalized as in
    :class:`ServiceIdentity`.
    """

    trust_domain: str = field(converter=normalize_trust_domain)
    datacenter: str = field(validator=_segment_validator("datacenter"))
    agent: str = field(validator=_segment_validator("agent"))
    partition: str | None = field(default=None, converter=_normalize_partition)

    @property
    def uri(self) -> str:
        """
        The SPIFFE ID, as in the URI SAN of the agent's certificate.
        """
        return (
            f"{_PREFIX}{self.trust_domain}{_partition_prefix(self.partition)}"
            f"/agent/client/dc/{_escape(self.datacenter)}/id/{_escape(self.agent)}"
        )

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> AgentIdentity:
        """
        Parse a client agent SPIFFE ID.

        :raises InvalidIdentity: if ``uri`` is not a valid SPIFFE ID, or is
            a service or CA identity.
        """
        return _parse_as(cls, uri, "an agent identity")


@frozen
class SigningIdentity:
    """
    The SPIFFE ID of Consul's CA: the trust domain alone, as in the URI SAN of
    a root or intermediate certificate.
    """

    trust_domain: str = field(converter=normalize_trust_domain)

    @property
    def uri(self) -> str:
        """
        ``spiffe://<trust domain>``, with no path.
        """
        return f"{_PREFIX}{self.trust_domain}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SigningIdentity:
        """
        Parse a CA SPIFFE ID (``spiffe://<trust domain>``).

        :raises InvalidIdentity: if ``uri`` is not a valid SPIFFE ID, or has
            a path.
        """
        return _parse_as(cls, uri, "a CA signing identity")


Identity = ServiceIdentity | AgentIdentity | SigningIdentity

_KIND_NAMES: dict[type[Identity], str] = {
    ServiceIdentity: "a service identity",
    AgentIdentity: "an agent identity",
    SigningIdentity: "the CA signing identity",
}


_I = TypeVar("_I", ServiceIdentity, AgentIdentity, SigningIdentity)


def _parse_as(kind: type[_I], uri: str, wanted: str) -> _I:
    identity = parse_spiffe_id(uri)
    if not isinstance(identity, kind):
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} is {_KIND_NAMES[type(identity)]}, not {wanted}",
            uri,
        )
    return identity


_SERVICE_FORM = "/ns/<namespace>/dc/<datacenter>/svc/<service>"
_AGENT_FORM = "/agent/client/dc/<datacenter>/id/<node id>"
_FORMS = (
    f"expected {_SERVICE_FORM}, {_AGENT_FORM} (either optionally after "
    "/ap/<partition>), or no path for the CA"
)


def _split_authority(uri: str) -> tuple[str, str]:
    """
    Check the scheme and the characters of the whole URI, and split what
    follows ``spiffe://`` into the trust domain and the path.
    """
    if not isinstance(uri, str):
        raise InvalidIdentity(
            f"SPIFFE ID must be a str, not {type(uri).__name__}: {_shown(uri)}", uri
        )
    if not uri:
        raise InvalidIdentity("SPIFFE ID is empty", uri)
    scheme, colon, rest = uri.partition(":")
    if not colon:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has no scheme; it must start with 'spiffe://'",
            uri,
        )
    if scheme != SCHEME:
        if scheme.lower() == SCHEME:
            problem = f"scheme {scheme!r} must be lower-case 'spiffe'"
        else:
            problem = f"scheme is {scheme!r}, not 'spiffe'"
        raise InvalidIdentity(f"SPIFFE ID {_shown(uri)}: {problem}", uri)
    if not rest.startswith("//"):
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has no trust domain: "
            "'spiffe:' must be followed by '//<trust domain>'",
            uri,
        )
    for position, char in enumerate(uri):
        if not ("!" <= char <= "~"):
            raise InvalidIdentity(
                f"SPIFFE ID {_shown(uri)} contains {char!r} at position {position}; "
                "whitespace, control and non-ASCII characters must be "
                "percent-escaped",
                uri,
            )
    if "#" in uri:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has a fragment ('#'); SPIFFE IDs have none",
            uri,
        )
    if "?" in uri:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has a query ('?'); SPIFFE IDs have none", uri
        )
    authority, slash, path = rest[2:].partition("/")
    if not authority:
        raise InvalidIdentity(f"SPIFFE ID {_shown(uri)} has an empty trust domain", uri)
    if "@" in authority:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has user information ('@') before the "
            "trust domain; SPIFFE IDs have none",
            uri,
        )
    if ":" in authority or "[" in authority:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has a port or an IP literal in its "
            f"authority {authority!r}; the trust domain is a bare host name",
            uri,
        )
    try:
        trust_domain = normalize_trust_domain(authority)
    except InvalidIdentity as e:
        raise InvalidIdentity(f"SPIFFE ID {_shown(uri)}: {e}", uri) from None
    return trust_domain, slash + path


def _decode_segment(uri: str, position: int, raw: str) -> str:
    if raw in (".", ".."):
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has a dot segment {raw!r} at path segment "
            f"{position}; a name made of dots must be percent-escaped ('%2E')",
            uri,
        )
    bad_escape = _BAD_ESCAPE.search(raw)
    if bad_escape is not None:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has a bad percent escape "
            f"{raw[bad_escape.start() : bad_escape.start() + 3]!r} in path segment "
            f"{position} ({raw!r}); '%' must be followed by two hex digits",
            uri,
        )
    if not _RAW_SEGMENT.fullmatch(raw):
        bad = next(c for c in raw if not _RAW_SEGMENT.fullmatch(c) and c != "%")
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has {bad!r} in path segment {position} "
            f"({raw!r}); it must be percent-escaped",
            uri,
        )
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has path segment {position} ({raw!r}) "
            "whose percent escapes are not UTF-8",
            uri,
        ) from None


def _expect(
    uri: str,
    segments: list[str],
    offset: int,
    layout: tuple[str | None, ...],
    what: str,
) -> list[str]:
    """
    Match ``segments[offset:]`` against ``layout`` (literal keywords, and
    ``None`` where a name goes) and return the names, decoded.
    """
    rest = segments[offset:]
    form = "/" + "/".join(k if k is not None else "<name>" for k in layout)
    if len(rest) != len(layout):
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} looks like {what} but has {len(rest)} path "
            f"segments where {form} has {len(layout)}",
            uri,
        )
    names = []
    for index, (raw, keyword) in enumerate(zip(rest, layout, strict=True)):
        position = offset + index + 1
        if keyword is None:
            names.append(_decode_segment(uri, position, raw))
        elif raw != keyword:
            raise InvalidIdentity(
                f"SPIFFE ID {_shown(uri)} looks like {what} but path segment "
                f"{position} is {raw!r} where {form} has {keyword!r}",
                uri,
            )
    return names


def parse_spiffe_id(uri: str) -> ServiceIdentity | AgentIdentity | SigningIdentity:
    """
    Parse one of Consul's SPIFFE IDs: a service, a client agent or the CA.

    Strict: the scheme must be ``spiffe`` (lower case); the trust domain a
    host name (:func:`normalize_trust_domain`) with no user information or
    port; no query or fragment; no empty, extra or missing path segments; the
    keywords (``ap``, ``ns``, ``dc``, ``svc``, ``agent``, ``client``, ``id``)
    exactly as Consul writes them; in names, only RFC 3986 path characters,
    with everything else (including ``/``) percent-escaped as UTF-8.
    Consul's server and mesh gateway identities are recognized and refused.

    :raises InvalidIdentity: saying what is wrong with ``uri``.
    """
    trust_domain, path = _split_authority(uri)
    if path == "":
        return SigningIdentity(trust_domain)
    segments = path[1:].split("/")
    for position, segment in enumerate(segments, start=1):
        if not segment:
            raise InvalidIdentity(
                f"SPIFFE ID {_shown(uri)} has an empty path segment at position "
                f"{position} (a doubled or trailing '/')",
                uri,
            )
    partition: str | None = None
    offset = 0
    if segments[0] == "ap":
        if len(segments) < 2:
            raise InvalidIdentity(
                f"SPIFFE ID {_shown(uri)} has '/ap' with no partition after it", uri
            )
        partition = _decode_segment(uri, 2, segments[1])
        offset = 2
    head = segments[offset] if offset < len(segments) else None
    if head == "ns":
        namespace, datacenter, service = _expect(
            uri, segments, offset, ("ns", None, "dc", None, "svc", None), "a service"
        )
        return ServiceIdentity(
            trust_domain=trust_domain,
            namespace=namespace,
            datacenter=datacenter,
            service=service,
            partition=partition,
        )
    if head == "agent" and segments[offset + 1 : offset + 2] == ["client"]:
        datacenter, agent = _expect(
            uri,
            segments,
            offset,
            ("agent", "client", "dc", None, "id", None),
            "an agent",
        )
        return AgentIdentity(
            trust_domain=trust_domain,
            datacenter=datacenter,
            agent=agent,
            partition=partition,
        )
    if head == "agent" and segments[offset + 1 : offset + 2] == ["server"]:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} is a Consul server identity, which "
            "connect_native does not accept",
            uri,
        )
    if head == "gateway":
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} is a Consul gateway identity, which "
            "connect_native does not accept",
            uri,
        )
    if head is None:
        raise InvalidIdentity(
            f"SPIFFE ID {_shown(uri)} has a partition but nothing after it; {_FORMS}",
            uri,
        )
    raise InvalidIdentity(
        f"SPIFFE ID {_shown(uri)} is not in a Consul format: path segment "
        f"{offset + 1} is {head!r}; {_FORMS}",
        uri,
    )


def _describe(cert: x509.Certificate) -> str:
    try:
        subject = cert.subject.rfc4514_string() or "empty subject"
    except ValueError:
        subject = "unreadable subject"
    return f"certificate ({subject}, serial {cert.serial_number:#x})"


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    """
    The URI subject alternative names of ``cert`` whose scheme is
    ``spiffe`` (in any case, so that a mis-cased one is not silently
    ignored), in certificate order.  Other URI SANs are left out.

    :raises InvalidIdentity: if the certificate's extensions cannot be read.
    """
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except (ValueError, x509.DuplicateExtension) as e:
        raise InvalidIdentity(
            f"{_describe(cert)} has extensions that cannot be read: {e}", cert
        ) from None
    uris = extension.value.get_values_for_type(x509.UniformResourceIdentifier)
    return [u for u in uris if u.partition(":")[0].lower() == SCHEME and ":" in u]


def identity_of_certificate(cert: x509.Certificate) -> ServiceIdentity:
    """
    The service identity of a Connect leaf certificate: its one
    ``spiffe://`` URI SAN, which must be a valid service SPIFFE ID.

    The subject (whose CN Consul mangles) is never looked at.

    :raises InvalidIdentity: saying why not: no ``spiffe://`` URI SAN, more
        than one, an agent or CA identity, or an invalid SPIFFE ID.
    """
    uris = spiffe_uris(cert)
    if not uris:
        raise InvalidIdentity(
            f"{_describe(cert)} has no spiffe:// URI SAN; a Consul Connect leaf "
            "certificate carries exactly one",
            cert,
        )
    if len(uris) > 1:
        raise InvalidIdentity(
            f"{_describe(cert)} has {len(uris)} spiffe:// URI SANs "
            f"({', '.join(_shown(u) for u in uris)}); a Consul Connect leaf "
            "certificate carries exactly one, so its identity is ambiguous",
            cert,
        )
    try:
        identity = parse_spiffe_id(uris[0])
    except InvalidIdentity as e:
        raise InvalidIdentity(
            f"{_describe(cert)} has an invalid SPIFFE ID in its URI SAN: {e}", cert
        ) from None
    if isinstance(identity, SigningIdentity):
        raise InvalidIdentity(
            f"{_describe(cert)} carries the CA signing identity {_shown(uris[0])}: "
            "it is a CA certificate, not a service's leaf",
            cert,
        )
    if isinstance(identity, AgentIdentity):
        raise InvalidIdentity(
            f"{_describe(cert)} carries the agent identity {_shown(uris[0])}, "
            "not a service identity",
            cert,
        )
    return identity
