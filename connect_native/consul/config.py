"""
How the agent's client is configured: the address forms it accepts
(:func:`parse_address`), how to check the agent's HTTPS certificate
(:class:`TLSConfig`), and the standard ``CONSUL_*`` environment variables
Consul's own tools read (:func:`client_settings`, behind
:meth:`ConsulClient.from_environment
<connect_native.consul.client.ConsulClient.from_environment>`).

Nothing here makes a connection; :mod:`connect_native.consul.client`
exports :class:`TLSConfig` too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from attrs import frozen

from connect_native.consul.errors import ConsulConfigurationError

__all__ = [
    "CLIENT_SETTINGS",
    "Address",
    "TLSConfig",
    "client_settings",
    "parse_address",
    "parse_bool",
]

#: The constructor arguments of
#: :class:`~connect_native.consul.client.ConsulClient`, which
#: :func:`client_settings` accepts as overrides.
CLIENT_SETTINGS = frozenset(
    {
        "address",
        "scheme",
        "token",
        "datacenter",
        "namespace",
        "partition",
        "tls",
        "http_client",
        "timeout",
    }
)


@frozen
class TLSConfig:
    """
    How to check the agent's HTTPS certificate and what to present to it.

    ``ca_file`` (a PEM bundle) wins over ``ca_path`` (a directory of PEM
    files); with neither, the platform's trust store is used.  The agent's
    certificate must match ``server_name`` (default: the host of the
    address), checked by service_identity.  ``verify=False`` turns all of
    that off (``CONSUL_HTTP_SSL_VERIFY=false``): for development only.
    """

    ca_file: str | None = None
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None
    verify: bool = True


@frozen
class Address:
    scheme: Literal["http", "https", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def base_url(self) -> str:
        if self.scheme == "unix":
            # Any host will do: the endpoint factory ignores it.
            return "http://localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return self.base_url


_DEFAULT_PORTS = {"http": 8500, "https": 8501}
_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:/\[\]@\s?#]+))(?::(?P<port>\d+))?"
)


def parse_address(address: str, scheme: str) -> Address:
    def bad(why: str) -> ConsulConfigurationError:
        return ConsulConfigurationError(
            f"bad Consul agent address {address!r}: {why}; expected host:port, "
            "http://host:port, https://host:port or unix:///path/to/socket"
        )

    if scheme not in ("http", "https"):
        raise ConsulConfigurationError(
            f"bad Consul agent scheme {scheme!r}: expected 'http' or 'https'"
        )
    text = address.strip()
    if not text:
        raise bad("it is empty")
    prefix, sep, rest = text.partition("://")
    if sep:
        prefix = prefix.lower()
        if prefix == "unix":
            if not rest.startswith("/"):
                raise bad("a unix socket needs an absolute path")
            return Address("unix", path=rest)
        if prefix not in ("http", "https"):
            raise bad(f"unknown scheme {prefix!r}")
        scheme, text = prefix, rest.rstrip("/")
    m = _HOST_PORT.fullmatch(text)
    if m is None:
        raise bad("not a host and port")
    host = m.group("v6") or m.group("host")
    port = int(m.group("port")) if m.group("port") else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise bad(f"port {port} is out of range")
    return Address("https" if scheme == "https" else "http", host=host, port=port)


def parse_bool(name: str, value: str) -> bool:
    # The spellings Go's strconv.ParseBool accepts, as Consul's own tools do.
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ConsulConfigurationError(
        f"{name}={value!r} is not a boolean: use true or false"
    )


def client_settings(
    environ: Mapping[str, str], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """
    The :class:`~connect_native.consul.client.ConsulClient` arguments that
    the ``CONSUL_*`` variables of ``environ`` give, with ``overrides`` (the
    constructor's keyword arguments; ``None`` means "not given") winning
    over them; see :meth:`ConsulClient.from_environment
    <connect_native.consul.client.ConsulClient.from_environment>`.

    :raises TypeError: for an override that is not a constructor argument.
    :raises ~connect_native.consul.errors.ConsulConfigurationError: naming
        the variable that is not usable.
    """
    unknown = set(overrides) - CLIENT_SETTINGS
    if unknown:
        raise TypeError(
            f"from_environment() got unexpected keyword arguments {sorted(unknown)}"
        )

    def env(name: str) -> str | None:
        value = environ.get(name)
        return value if value else None

    settings: dict[str, Any] = {}
    addr = env("CONSUL_HTTP_ADDR")
    ssl = env("CONSUL_HTTP_SSL")
    if ssl is not None:
        settings["scheme"] = "https" if parse_bool("CONSUL_HTTP_SSL", ssl) else "http"
    if addr is not None:
        settings["address"] = addr
        try:
            parse_address(addr, settings.get("scheme", "http"))
        except ConsulConfigurationError as e:
            raise ConsulConfigurationError(f"CONSUL_HTTP_ADDR: {e}") from None

    token_file = env("CONSUL_HTTP_TOKEN_FILE")
    token = env("CONSUL_HTTP_TOKEN")
    if token_file is not None and overrides.get("token") is None:
        try:
            from_file = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConsulConfigurationError(
                f"CONSUL_HTTP_TOKEN_FILE: cannot read {token_file!r}: "
                f"{getattr(e, 'strerror', None) or type(e).__name__}"
            ) from None
        token = from_file or token
    if token is not None:
        settings["token"] = token

    verify_text = env("CONSUL_HTTP_SSL_VERIFY")
    verify = (
        True
        if verify_text is None
        else parse_bool("CONSUL_HTTP_SSL_VERIFY", verify_text)
    )
    tls_values = {
        "ca_file": env("CONSUL_CACERT"),
        "ca_path": env("CONSUL_CAPATH"),
        "client_cert": env("CONSUL_CLIENT_CERT"),
        "client_key": env("CONSUL_CLIENT_KEY"),
        "server_name": env("CONSUL_TLS_SERVER_NAME"),
    }
    if any(v is not None for v in tls_values.values()) or not verify:
        settings["tls"] = TLSConfig(verify=verify, **tls_values)

    for name, variable in (
        ("namespace", "CONSUL_NAMESPACE"),
        ("partition", "CONSUL_PARTITION"),
    ):
        value = env(variable)
        if value is not None:
            settings[name] = value

    for name, value in overrides.items():
        if value is not None:
            settings[name] = value
    return settings
