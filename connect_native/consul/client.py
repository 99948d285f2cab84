"""
The Consul agent's HTTP API, on treq: :class:`ConsulClient`.

Every call returns a Deferred of a frozen record from
:mod:`connect_native.consul.records` (reads that can block return an
:class:`~connect_native.consul.records.Indexed`), and fails with one of the
:class:`ConsulError` family.  Each request is bounded by a timeout scheduled
on the injected reactor; a blocking read (``index=``) always carries an
explicit ``wait`` (the agent-cache endpoints block forever without one) and
is bounded by ``wait + wait / 16 + timeout``.

Address, token and TLS come from the arguments or, with
:meth:`ConsulClient.from_environment`, from the standard ``CONSUL_*``
variables.  The token travels in the ``X-Consul-Token`` header and never
appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import quote, urlencode

import treq
from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionLost,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from connect_native._deferreds import bounded
from connect_native.consul.config import TLSConfig, client_settings, parse_address
from connect_native.consul.errors import (
    ConsulConfigurationError,
    ConsulEnterpriseRequired,
    ConsulError,
    ConsulHTTPError,
    ConsulNotFound,
    ConsulPermissionDenied,
    ConsulResponseError,
    ConsulTimeout,
    ConsulUnavailable,
)
from connect_native.consul.records import (
    AgentSelf,
    AuthorizeResult,
    CAConfiguration,
    CARoots,
    CatalogEntry,
    HealthEntry,
    Indexed,
    Intention,
    LeafCert,
    PreparedQueryResult,
    ServiceRegistration,
    decode_agent_self,
    decode_authorize,
    decode_ca_configuration,
    decode_ca_roots,
    decode_catalog_entries,
    decode_health_entries,
    decode_intention,
    decode_intention_check,
    decode_intention_id,
    decode_intentions,
    decode_intentions_match,
    decode_leaf,
    decode_prepared_query_result,
)

if TYPE_CHECKING:
    # Only a type: Twisted exports no public name for it.
    from treq.testing import StubTreq
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "DEFAULT_WAIT",
    "ConsulClient",
    "ConsulConfigurationError",
    "ConsulEnterpriseRequired",
    "ConsulError",
    "ConsulHTTPError",
    "ConsulNotFound",
    "ConsulPermissionDenied",
    "ConsulResponseError",
    "ConsulTimeout",
    "ConsulUnavailable",
    "TLSConfig",
    "shared_client",
]

T = TypeVar("T")

# Twisted's untyped callables, given a type once.
_trust_root_from_certificates: Callable[[list[Certificate]], IOpenSSLTrustRoot] = (
    trustRootFromCertificates
)
_load_private_certificate: Callable[[bytes], PrivateCertificate] = (
    PrivateCertificate.loadPEM
)
_unix_endpoint: Callable[[Any, str], IStreamClientEndpoint] = UNIXClientEndpoint
_connection_pool: Callable[..., HTTPConnectionPool] = HTTPConnectionPool
_agent: Callable[..., Agent] = Agent
_agent_using_endpoints: Callable[..., Agent] = Agent.usingEndpointFactory

DEFAULT_WAIT = 300.0
"""
Seconds a blocking read may be held when ``index`` is given without
``wait``: Consul's own ``default_query_time``.  Sent explicitly, because the
agent-cache endpoints apply no limit at all when ``wait`` is missing.
"""

# The agent's RPC endpoints add up to wait/16 of jitter to a blocking read.
_JITTER_FRACTION = 16
# Enough of an error body to act on, not a whole page of HTML.
_MAX_ERROR_BODY = 2000
_CHECK_STATUSES = ("passing", "warning", "critical")


# -- settings -----------------------------------------------------------------


def _read_pem_certificates(path: Path, setting: str) -> list[Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConsulConfigurationError(
            f"{setting}: cannot read {str(path)!r}: {e.strerror or e}"
        ) from e
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return []
    return [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certs]


def _trust_root(tls: TLSConfig) -> IOpenSSLTrustRoot | None:
    if tls.ca_file:
        certs = _read_pem_certificates(Path(tls.ca_file), "CA file (CONSUL_CACERT)")
        if not certs:
            raise ConsulConfigurationError(
                f"CA file (CONSUL_CACERT) {tls.ca_file!r} holds no PEM certificate"
            )
        return _trust_root_from_certificates(certs)
    if tls.ca_path:
        directory = Path(tls.ca_path)
        if not directory.is_dir():
            raise ConsulConfigurationError(
                f"CA path (CONSUL_CAPATH) {tls.ca_path!r} is not a directory"
            )
        certs = []
        for entry in sorted(directory.iterdir()):
            if entry.is_file():
                certs.extend(_read_pem_certificates(entry, "CA path (CONSUL_CAPATH)"))
        if not certs:
            raise ConsulConfigurationError(
                f"CA path (CONSUL_CAPATH) {tls.ca_path!r} holds no PEM certificate"
            )
        return _trust_root_from_certificates(certs)
    return None  # the platform's trust store


def _client_certificate(tls: TLSConfig) -> PrivateCertificate | None:
    if not tls.client_cert and not tls.client_key:
        return None
    if not (tls.client_cert and tls.client_key):
        raise ConsulConfigurationError(
            "a client certificate (CONSUL_CLIENT_CERT) and its key "
            "(CONSUL_CLIENT_KEY) must be given together"
        )
    try:
        cert = Path(tls.client_cert).read_bytes()
        key = Path(tls.client_key).read_bytes()
    except OSError as e:
        raise ConsulConfigurationError(
            f"cannot read the client certificate or key {e.filename!r}: "
            f"{e.strerror or e}"
        ) from e
    try:
        return _load_private_certificate(cert + b"\n" + key)
    except Exception as e:
        raise ConsulConfigurationError(
            f"client certificate {tls.client_cert!r} / key {tls.client_key!r} "
            f"do not load as a PEM certificate and private key: {e}"
        ) from e


@implementer(IPolicyForHTTPS)
class _AgentTLSPolicy:
    """
    TLS towards the agent: its certificate checked against the configured CA
    and, by service_identity, against the expected server name.
    """

    def __init__(self, tls: TLSConfig) -> None:
        self._tls = tls
        self._trust = _trust_root(tls)
        self._client = _client_certificate(tls)

    def creatorForNetloc(
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        if not self._tls.verify:
            extra: dict[str, Any] = {}
            if self._client is not None:
                extra = {
                    "privateKey": self._client.privateKey.original,
                    "certificate": self._client.original,
                }
            options: IOpenSSLClientConnectionCreator = CertificateOptions(
                verify=False, **extra
            )
            return options
        name = self._tls.server_name or hostname.decode("ascii")
        return optionsForClientTLS(
            name, trustRoot=self._trust, clientCertificate=self._client
        )


@implementer(IAgentEndpointFactory)
class _UnixSocketEndpoints:
    """Every request goes to the agent's UNIX socket, whatever the URL says."""

    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _unix_endpoint(self._reactor, self._path)


# -- requests -----------------------------------------------------------------


@frozen
class _Answer:
    status: int
    headers: Headers
    body: bytes


def _nonempty(what: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _segment(what: str, value: str) -> str:
    """A path segment, escaped: a name with ``/`` stays one segment."""
    return quote(_nonempty(what, value), safe="")


def _format_wait(wait: float) -> str:
    if isinstance(wait, bool) or not isinstance(wait, int | float):
        raise TypeError(f"wait must be a number of seconds, got {wait!r}")
    if not math.isfinite(wait) or wait < 0.001:
        raise ValueError(
            f"wait must be a finite number of seconds >= 0.001, got {wait!r} "
            "(the agent would block without limit)"
        )
    return f"{round(wait * 1000)}ms"


def _blocking(
    index: int | None, wait: float | None
) -> tuple[list[tuple[str, str]], float | None]:
    """The query parameters and the wait (seconds) of a possibly blocking read."""
    if index is None:
        if wait is not None:
            raise ValueError("wait= only applies to a blocking read: give index= too")
        return [], None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an integer >= 0, got {index!r}")
    if wait is None:
        wait = DEFAULT_WAIT
    return [("index", str(index)), ("wait", _format_wait(wait))], float(wait)


def _header(headers: Headers, name: str) -> str | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    value = values[-1]
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _int_header(headers: Headers, name: str, what: str) -> int | None:
    value = _header(headers, name)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        number = -1
    if number < 0:
        raise ConsulResponseError(
            f"{what}: header {name!r} is {value!r}, expected an integer >= 0"
        )
    return number


def _bool_header(headers: Headers, name: str, what: str) -> bool | None:
    value = _header(headers, name)
    if value is None:
        return None
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConsulResponseError(
        f"{what}: header {name!r} is {value!r}, expected true or false"
    )


def _indexed(answer: _Answer, value: T, what: str) -> Indexed[T]:
    h = answer.headers
    cache = _header(h, "X-Cache")
    return Indexed(
        value=value,
        index=_int_header(h, "X-Consul-Index", what),
        known_leader=_bool_header(h, "X-Consul-Knownleader", what),
        last_contact_ms=_int_header(h, "X-Consul-Lastcontact", what),
        cache_hit=None if cache is None else cache.strip().upper() == "HIT",
        age_s=_int_header(h, "Age", what),
    )


def _json(answer: _Answer, what: str) -> object:
    try:
        return json.loads(answer.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        start = answer.body[:80].decode("utf-8", "replace")
        raise ConsulResponseError(
            f"{what}: the response is not JSON ({e}); it starts with {start!r}"
        ) from None


def _cancelled(e: BaseException) -> bool:
    if isinstance(e, CancelledError | ConnectingCancelledError):
        return True
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list):
        return any(
            isinstance(r, Failure)
            and isinstance(r.value, CancelledError | ConnectingCancelledError)
            for r in reasons
        )
    return False


def _describe(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons:
        parts = [
            r.getErrorMessage() if isinstance(r, Failure) else str(r) for r in reasons
        ]
        return f"{type(e).__name__}: " + "; ".join(parts)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# Failures that mean "the agent could not be talked to", as opposed to bugs.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectError,
    ConnectionLost,
    OSError,
    SSL.Error,
)


# twisted.web's wrappers of the connection's own failures: the public
# subclasses of its private _WrapperException (ResponseNeverReceived is a
# ResponseFailed).
_HTTP_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)


def _is_transport_error(e: BaseException) -> bool:
    return isinstance(e, (*_TRANSPORT_ERRORS, *_HTTP_TRANSPORT_ERRORS))


class ConsulClient:
    """
    A client of one Consul agent's HTTP API.

    :param reactor: schedules the timeouts, and makes the connections when
        ``http_client`` is not given.
    :param address: ``host:port``, ``http(s)://host:port`` or
        ``unix:///path/to/socket``; a scheme in the address wins over
        ``scheme``.
    :param token: the ACL token, sent as ``X-Consul-Token``.
    :param datacenter: sent as ``dc=`` on catalog, health, prepared-query,
        intention and server-roots reads (agent-local calls have none).
    :param namespace: sent as ``ns=`` only when set and not ``"default"``
        (Consul Enterprise); likewise ``partition``.
    :param tls: how to verify the agent over HTTPS (default: the platform's
        trust store, the address's host name).
    :param http_client: a ready treq client (tests pass
        ``treq.testing.StubTreq(resource)``); then ``tls`` is not used.
    :param timeout: seconds each request may take; a blocking read may take
        ``wait + wait / 16`` more.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        address: str = "127.0.0.1:8500",
        scheme: str = "http",
        token: str | None = None,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        tls: TLSConfig | None = None,
        http_client: HTTPClient | StubTreq | None = None,
        timeout: float = 10.0,
    ) -> None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ValueError(
                f"timeout must be a finite number of seconds > 0, got {timeout!r}"
            )
        if token is not None and not isinstance(token, str):
            raise TypeError("token must be a string or None")
        self._reactor = reactor
        self._address = parse_address(address, scheme)
        self._token = token or None
        self.datacenter = datacenter or None
        self.namespace = namespace or None
        self.partition = partition or None
        self.timeout = float(timeout)
        self._pool: HTTPConnectionPool | None = None
        self._error_observers: list[Callable[[ConsulError], object]] = []
        if http_client is not None:
            self._http: Any = http_client
        else:
            self._http = self._make_http_client(reactor, tls)

    def _make_http_client(self, reactor: Any, tls: TLSConfig | None) -> HTTPClient:
        self._pool = _connection_pool(reactor, persistent=True)
        if self._address.scheme == "unix":
            agent = _agent_using_endpoints(
                reactor,
                _UnixSocketEndpoints(reactor, self._address.path),
                pool=self._pool,
            )
        elif self._address.scheme == "https":
            policy = _AgentTLSPolicy(tls if tls is not None else TLSConfig())
            agent = _agent(reactor, contextFactory=policy, pool=self._pool)
        else:
            agent = _agent(reactor, pool=self._pool)
        return HTTPClient(agent)

    @classmethod
    def from_environment(
        cls,
        reactor: IReactorTime,
        environ: Mapping[str, str] = os.environ,
        **overrides: Any,
    ) -> ConsulClient:
        """
        A client configured like Consul's own tools, from ``CONSUL_HTTP_ADDR``,
        ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_TOKEN_FILE`` (wins over the
        token variable, as in Consul's Go client), ``CONSUL_CACERT``,
        ``CONSUL_CAPATH``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``,
        ``CONSUL_TLS_SERVER_NAME``, ``CONSUL_HTTP_SSL``,
        ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_NAMESPACE`` and
        ``CONSUL_PARTITION``.

        Keyword arguments (those of the constructor) win over the
        environment; ``None`` means "not given".  An explicit ``tls=``
        replaces every TLS variable.
        """
        return cls(reactor, **client_settings(environ, overrides))

    # -- introspection ----------------------------------------------------------

    @property
    def address(self) -> str:
        """Where the agent is: ``http://127.0.0.1:8500``, ``unix:///...``."""
        return str(self._address)

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def set_token(self, token: str | None) -> bool:
        """
        Send ``token`` with every request from now on (a rotated token file,
        re-read on SIGHUP); requests already sent keep the one they had.

        :returns: whether it differs from the token before.
        """
        if token is not None and not isinstance(token, str):
            raise TypeError("token must be a string or None")
        token = token or None
        changed = token != self._token
        self._token = token
        return changed

    def __repr__(self) -> str:
        parts = [
            f"address={self.address!r}",
            f"token={'<set>' if self._token else None}",
        ]
        for name in ("datacenter", "namespace", "partition"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        parts.append(f"timeout={self.timeout!r}")
        return f"ConsulClient({', '.join(parts)})"

    def observe_errors(
        self, callback: Callable[[ConsulError], object]
    ) -> Callable[[], None]:
        """
        Call ``callback`` with the :class:`ConsulError` of each request that
        fails (the agent unreachable, a timeout, an error status; not a
        cancellation), before the request's own Deferred fails with it.  The
        service layer counts them (``connect_native_consul_errors_total``)
        without this layer knowing of metrics.  An exception the callback
        raises is ignored.

        :returns: the function that stops the calls.
        """
        self._error_observers.append(callback)

        def unsubscribe() -> None:
            if callback in self._error_observers:
                self._error_observers.remove(callback)

        return unsubscribe

    def _observe_error(self, result: object) -> None:
        if not isinstance(result, Failure):
            return
        error = result.value
        if not isinstance(error, ConsulError):
            return
        for callback in list(self._error_observers):
            try:
                callback(error)
            except Exception:  # noqa: S112 (an observer cannot fail a request)
                continue

    def close(self) -> Deferred[None]:
        """Close idle connections to the agent (the pool of a client it made)."""
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = cast(Any, self._pool).closeCachedConnections()
        return d

    # -- the request machinery -------------------------------------------------

    def _scope(
        self,
        *,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        with_datacenter: bool = False,
        with_namespace: bool = True,
    ) -> list[tuple[str, str]]:
        query: list[tuple[str, str]] = []
        if with_datacenter:
            dc = datacenter if datacenter is not None else self.datacenter
            if dc:
                query.append(("dc", dc))
        if with_namespace:
            ns = namespace if namespace is not None else self.namespace
            if ns and ns != "default":
                query.append(("ns", ns))
            ap = partition if partition is not None else self.partition
            if ap and ap != "default":
                query.append(("partition", ap))
        return query

    def _send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        *,
        body: object = None,
        wait: float | None = None,
    ) -> Deferred[_Answer]:
        target = path + ("?" + urlencode(list(query), quote_via=quote) if query else "")
        seconds = self.timeout
        if wait is not None:
            seconds += wait + wait / _JITTER_FRACTION
        answered = bounded(
            Deferred.fromCoroutine(self._exchange(method, target, body)),
            seconds,
            self._reactor,
            lambda: ConsulTimeout(method, target, seconds, agent=self.address),
            any_failure=True,
        )

        def observed(result: _Answer | Failure) -> _Answer | Failure:
            if self._error_observers:
                self._observe_error(result)
            return result

        return answered.addBoth(observed)

    async def _exchange(self, method: str, target: str, body: object) -> _Answer:
        headers = Headers({b"Accept": [b"application/json"]})
        if self._token is not None:
            headers.setRawHeaders(b"X-Consul-Token", [self._token.encode("utf-8")])
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        try:
            response = await self._http.request(
                method,
                self._address.base_url + target,
                headers=headers,
                data=data,
                # A redirect could carry the token to another host.
                allow_redirects=False,
            )
            content = await treq.content(response)
        except Exception as e:
            if _cancelled(e):
                raise CancelledError() from e
            if _is_transport_error(e):
                raise ConsulUnavailable(
                    method, target, _describe(e), agent=self.address
                ) from e
            raise
        answer = _Answer(status=response.code, headers=response.headers, body=content)
        if not 200 <= answer.status < 300:
            raise self._http_error(method, target, answer)
        return answer

    def _http_error(self, method: str, target: str, answer: _Answer) -> ConsulHTTPError:
        text = answer.body.decode("utf-8", "replace").strip()
        if self._token and self._token in text:
            text = text.replace(self._token, "<redacted>")
        if len(text) > _MAX_ERROR_BODY:
            text = text[:_MAX_ERROR_BODY] + "..."
        status = answer.status
        cls: type[ConsulHTTPError] = ConsulHTTPError
        if status == 403:
            cls = ConsulPermissionDenied
        elif status == 404:
            cls = ConsulNotFound
        elif status == 400 and "Enterprise" in text:
            cls = ConsulEnterpriseRequired
        return cls(status, method, target, text, agent=self.address)

    def _read(
        self,
        what: str,
        path: str,
        decode: Callable[[object], T],
        query: Sequence[tuple[str, str]] = (),
        *,
        index: int | None = None,
        wait: float | None = None,
    ) -> Deferred[Indexed[T]]:
        blocking, wait_seconds = _blocking(index, wait)
        d = self._send("GET", path, [*query, *blocking], wait=wait_seconds)
        return d.addCallback(
            lambda answer: _indexed(answer, decode(_json(answer, what)), what)
        )

    def _fetch(
        self,
        what: str,
        method: str,
        path: str,
        decode: Callable[[object], T],
        query: Sequence[tuple[str, str]] = (),
        *,
        body: object = None,
    ) -> Deferred[T]:
        d = self._send(method, path, query, body=body)
        return d.addCallback(lambda answer: decode(_json(answer, what)))

    def _write(
        self,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        *,
        method: str = "PUT",
        body: object = None,
    ) -> Deferred[None]:
        d = self._send(method, path, query, body=body)
        return d.addCallback(lambda answer: None)

    # -- agent -------------------------------------------------------------------

    def agent_self(self) -> Deferred[AgentSelf]:
        """``GET /v1/agent/self``: the local agent's datacenter, node, version."""
        return self._fetch("agent self", "GET", "/v1/agent/self", decode_agent_self)

    # -- Connect CA ----------------------------------------------------------------

    def agent_ca_roots(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[CARoots]]:
        """``GET /v1/agent/connect/ca/roots`` (the agent's cache; blockable)."""
        return self._read(
            "ca roots",
            "/v1/agent/connect/ca/roots",
            decode_ca_roots,
            index=index,
            wait=wait,
        )

    def ca_roots(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[CARoots]]:
        """``GET /v1/connect/ca/roots`` (the servers; blockable)."""
        return self._read(
            "ca roots",
            "/v1/connect/ca/roots",
            decode_ca_roots,
            self._scope(with_datacenter=True, with_namespace=False),
            index=index,
            wait=wait,
        )

    def leaf(
        self, service: str, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[LeafCert]]:
        """
        ``GET /v1/agent/connect/ca/leaf/<service>``: the leaf certificate and
        key for ``service`` (a name; it need not be registered).  Blocking at
        the current index returns when the agent renews it.
        """
        return self._read(
            "leaf",
            f"/v1/agent/connect/ca/leaf/{_segment('service', service)}",
            decode_leaf,
            self._scope(),
            index=index,
            wait=wait,
        )

    def ca_configuration(self) -> Deferred[CAConfiguration]:
        """``GET /v1/connect/ca/configuration`` (needs operator:read)."""
        return self._fetch(
            "ca configuration",
            "GET",
            "/v1/connect/ca/configuration",
            decode_ca_configuration,
        )

    def set_ca_configuration(
        self,
        provider: str,
        config: Mapping[str, object],
        *,
        force_without_cross_signing: bool = False,
    ) -> Deferred[None]:
        """
        ``PUT /v1/connect/ca/configuration``: e.g. a new ``PrivateKey`` and
        ``RootCert`` rotate the CA (needs operator:write).
        """
        body = {
            "Provider": _nonempty("provider", provider),
            "Config": dict(config),
            "ForceWithoutCrossSigning": force_without_cross_signing,
        }
        return self._write("/v1/connect/ca/configuration", body=body)

    # -- authorize -------------------------------------------------------------------

    def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> Deferred[AuthorizeResult]:
        """
        ``POST /v1/agent/connect/authorize``: may the client with this
        certificate URI connect to ``target``?  The agent checks intentions
        only, not the trust domain: verify the chain first.
        """
        body = {
            "Target": _nonempty("target", target),
            "ClientCertURI": _nonempty("client_cert_uri", client_cert_uri),
            "ClientCertSerial": client_cert_serial,
        }
        return self._fetch(
            "authorize",
            "POST",
            "/v1/agent/connect/authorize",
            decode_authorize,
            self._scope(),
            body=body,
        )

    # -- discovery -------------------------------------------------------------------

    def _discovery_query(
        self,
        *,
        datacenter: str | None,
        namespace: str | None,
        partition: str | None,
        filter: str | None,
        near: str | None,
    ) -> list[tuple[str, str]]:
        query = self._scope(
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            with_datacenter=True,
        )
        if filter:
            query.append(("filter", filter))
        if near:
            query.append(("near", near))
        return query

    def health_connect(
        self,
        service: str,
        *,
        passing: bool = True,
        index: int | None = None,
        wait: float | None = None,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        filter: str | None = None,
        near: str | None = None,
    ) -> Deferred[Indexed[tuple[HealthEntry, ...]]]:
        """
        ``GET /v1/health/connect/<service>``: the Connect-capable instances
        of ``service`` (native ones and sidecar proxies), with only those
        whose every check passes when ``passing``.
        """
        query = self._discovery_query(
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            filter=filter,
            near=near,
        )
        if passing:
            query.insert(0, ("passing", "1"))
        return self._read(
            "health/connect",
            f"/v1/health/connect/{_segment('service', service)}",
            decode_health_entries,
            query,
            index=index,
            wait=wait,
        )

    def catalog_connect(
        self,
        service: str,
        *,
        index: int | None = None,
        wait: float | None = None,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        filter: str | None = None,
        near: str | None = None,
    ) -> Deferred[Indexed[tuple[CatalogEntry, ...]]]:
        """``GET /v1/catalog/connect/<service>``: as health, without checks."""
        query = self._discovery_query(
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            filter=filter,
            near=near,
        )
        return self._read(
            "catalog/connect",
            f"/v1/catalog/connect/{_segment('service', service)}",
            decode_catalog_entries,
            query,
            index=index,
            wait=wait,
        )

    def execute_prepared_query(
        self,
        name: str,
        *,
        connect: bool = True,
        datacenter: str | None = None,
        near: str | None = None,
    ) -> Deferred[Indexed[PreparedQueryResult]]:
        """
        ``GET /v1/query/<name-or-id>/execute``; ``connect`` asks for the
        Connect-capable instances.  Prepared queries cannot block.
        """
        query = self._scope(
            datacenter=datacenter, with_datacenter=True, with_namespace=False
        )
        if connect:
            query.append(("connect", "true"))
        if near:
            query.append(("near", near))
        return self._read(
            "prepared query",
            f"/v1/query/{_segment('name', name)}/execute",
            decode_prepared_query_result,
            query,
        )

    # -- intentions --------------------------------------------------------------------

    def intentions_match(
        self,
        by: Literal["source", "destination"],
        name: str | Sequence[str],
        index: int | None = None,
        wait: float | None = None,
    ) -> Deferred[Indexed[Mapping[str, tuple[Intention, ...]]]]:
        """
        ``GET /v1/connect/intentions/match``: the intentions that apply to
        each name, by precedence.  This endpoint sends no ``X-Consul-Index``
        (``Indexed.index`` is ``None``); block with the index of
        :meth:`intentions_list`.
        """
        if by not in ("source", "destination"):
            raise ValueError(f"by must be 'source' or 'destination', got {by!r}")
        names = [name] if isinstance(name, str) else list(name)
        if not names:
            raise ValueError("intentions_match needs at least one name")
        query: list[tuple[str, str]] = [("by", by)]
        query.extend(("name", _nonempty("name", n)) for n in names)
        query.extend(self._scope(with_datacenter=True))
        return self._read(
            "intentions match",
            "/v1/connect/intentions/match",
            decode_intentions_match,
            query,
            index=index,
            wait=wait,
        )

    def intentions_list(
        self,
        index: int | None = None,
        wait: float | None = None,
        *,
        filter: str | None = None,
    ) -> Deferred[Indexed[tuple[Intention, ...]]]:
        """``GET /v1/connect/intentions``: all of them; any write moves the index."""
        query = self._scope(with_datacenter=True)
        if filter:
            query.append(("filter", filter))
        return self._read(
            "intentions",
            "/v1/connect/intentions",
            decode_intentions,
            query,
            index=index,
            wait=wait,
        )

    def intentions_check(self, source: str, destination: str) -> Deferred[bool]:
        """``GET /v1/connect/intentions/check``: may ``source`` reach it?"""
        query = [
            ("source", _nonempty("source", source)),
            ("destination", _nonempty("destination", destination)),
            *self._scope(with_datacenter=True),
        ]
        return self._fetch(
            "intentions check",
            "GET",
            "/v1/connect/intentions/check",
            decode_intention_check,
            query,
        )

    def get_intention(self, intention_id: str) -> Deferred[Intention]:
        """``GET /v1/connect/intentions/<id>``."""
        return self._fetch(
            "intention",
            "GET",
            f"/v1/connect/intentions/{_segment('intention_id', intention_id)}",
            decode_intention,
            self._scope(with_datacenter=True),
        )

    def create_intention(
        self,
        source: str,
        destination: str,
        action: Literal["allow", "deny"],
        *,
        description: str | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> Deferred[str]:
        """
        ``POST /v1/connect/intentions``: an L4 intention; fires with its ID.
        (Deprecated by Consul 1.9+ in favour of config entries, still served.)
        """
        if action not in ("allow", "deny"):
            raise ValueError(f"action must be 'allow' or 'deny', got {action!r}")
        body: dict[str, object] = {
            "SourceName": _segment("source", source) and source,
            "DestinationName": _segment("destination", destination) and destination,
            "SourceType": "consul",
            "Action": action,
        }
        if description is not None:
            body["Description"] = description
        if meta:
            body["Meta"] = dict(meta)
        return self._fetch(
            "intention create",
            "POST",
            "/v1/connect/intentions",
            decode_intention_id,
            self._scope(with_datacenter=True),
            body=body,
        )

    def delete_intention(self, intention_id: str) -> Deferred[None]:
        """``DELETE /v1/connect/intentions/<id>``."""
        return self._write(
            f"/v1/connect/intentions/{_segment('intention_id', intention_id)}",
            self._scope(with_datacenter=True),
            method="DELETE",
        )

    # -- registration and checks ---------------------------------------------

    def register_service(
        self,
        registration: ServiceRegistration,
        *,
        replace_existing_checks: bool = False,
    ) -> Deferred[None]:
        """``PUT /v1/agent/service/register`` with ``registration``'s body."""
        if not isinstance(registration, ServiceRegistration):
            raise TypeError(
                "register_service needs a ServiceRegistration, got "
                f"{type(registration).__name__}"
            )
        query = self._scope()
        if replace_existing_checks:
            query.append(("replace-existing-checks", "true"))
        return self._write(
            "/v1/agent/service/register", query, body=registration.to_json()
        )

    def deregister_service(self, service_id: str) -> Deferred[None]:
        """``PUT /v1/agent/service/deregister/<id>`` (1.8: unknown IDs are fine)."""
        return self._write(
            f"/v1/agent/service/deregister/{_segment('service_id', service_id)}",
            self._scope(),
        )

    def _check_mark(self, verb: str, check_id: str, note: str | None) -> Deferred[None]:
        query = self._scope()
        if note is not None:
            query.append(("note", note))
        return self._write(
            f"/v1/agent/check/{verb}/{_segment('check_id', check_id)}", query
        )

    def check_pass(self, check_id: str, note: str | None = None) -> Deferred[None]:
        """``PUT /v1/agent/check/pass/<id>``; ``note`` becomes its output."""
        return self._check_mark("pass", check_id, note)

    def check_warn(self, check_id: str, note: str | None = None) -> Deferred[None]:
        """``PUT /v1/agent/check/warn/<id>``."""
        return self._check_mark("warn", check_id, note)

    def check_fail(self, check_id: str, note: str | None = None) -> Deferred[None]:
        """``PUT /v1/agent/check/fail/<id>``."""
        return self._check_mark("fail", check_id, note)

    def check_update(
        self, check_id: str, status: str, output: str = ""
    ) -> Deferred[None]:
        """``PUT /v1/agent/check/update/<id>`` with a status and an output."""
        if status not in _CHECK_STATUSES:
            raise ValueError(
                f"status must be one of {', '.join(_CHECK_STATUSES)}, got {status!r}"
            )
        return self._write(
            f"/v1/agent/check/update/{_segment('check_id', check_id)}",
            self._scope(),
            body={"Status": status, "Output": output},
        )


# One default client per (reactor, address, token, CONSUL_* environment):
# everything in a process that asks for "the agent" shares one, so that what
# is keyed by the client (the certificate manager of a service, its watches)
# is shared too.  Held weakly: a client nothing uses goes, with its pool.
_shared: weakref.WeakValueDictionary[tuple[object, ...], ConsulClient] = (
    weakref.WeakValueDictionary()
)


def shared_client(
    reactor: IReactorTime,
    environ: Mapping[str, str] | None = None,
    *,
    address: str | None = None,
    token: str | None = None,
) -> ConsulClient:
    """
    The process's client for the agent that ``address`` and ``token`` (over
    the ``CONSUL_*`` variables of ``environ``, ``os.environ`` by default)
    name, as :meth:`ConsulClient.from_environment` configures it: made the
    first time, the same object afterwards.

    :raises ConsulConfigurationError: when the settings are not usable.
    """
    env = os.environ if environ is None else environ
    client = ConsulClient.from_environment(reactor, env, address=address, token=token)
    # Keyed by what the client ended up with: "consul=127.0.0.1:8500" and
    # CONSUL_HTTP_ADDR=127.0.0.1:8500 are one agent, one client.
    named = {"CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"}
    key = (
        id(reactor),
        client._address,
        client._token,
        tuple(
            sorted(
                (k, v)
                for k, v in env.items()
                if k.startswith("CONSUL_") and k not in named
            )
        ),
    )
    shared = _shared.get(key)
    if shared is not None:
        return shared
    _shared[key] = client
    return client
