"""
Where a service's identity comes from: :class:`IIdentitySource`, which
delivers :class:`~connect_native.certs.Bundle` s (leaf, key, roots, trust
domain), and its two implementations:

- the agent (:data:`~connect_native.sources.agent.AgentIdentitySource`,
  the :class:`~connect_native.certs.CertManager`: blocking queries on the
  agent's leaf and roots endpoints);
- files (:class:`~connect_native.sources.files.FileIdentitySource`: a
  certificate, a key and a CA bundle on disk, watched).

:func:`parse_identity` reads the text form that ``twistd connect-native
--identity`` and the ``identity=`` option of ``connect:`` endpoints take::

    agent
    files:cert=/etc/web/cert.pem,key=/etc/web/key.pem,roots=/etc/web/ca.pem
    files:cert=...,key=...,roots=...,trustDomain=example.org,interval=2
"""

from __future__ import annotations

import math
from pathlib import Path

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from connect_native.certs import IIdentitySource
from connect_native.sources.agent import AgentIdentitySource
from connect_native.sources.files import FileIdentitySource, IdentityFilesStopped

__all__ = [
    "AgentIdentitySource",
    "FileIdentitySource",
    "FilesIdentity",
    "IIdentitySource",
    "IdentityFilesStopped",
    "InvalidIdentityDescription",
    "parse_identity",
]


class InvalidIdentityDescription(ValueError):  # noqa: N818 (a refusal of input)
    """An identity description that cannot be used; the message says why."""


@frozen
class FilesIdentity:
    """
    A files identity, as described: what :func:`parse_identity` returns for
    ``files:...``.  Equal descriptions share one source per process.
    """

    cert: Path
    key: Path
    roots: Path
    trust_domain: str | None = None
    interval: float = 1.0

    def source(self, clock: IReactorTime) -> FileIdentitySource:
        """A new source watching these files."""
        return FileIdentitySource(
            clock,
            cert=self.cert,
            key=self.key,
            roots=self.roots,
            trust_domain=self.trust_domain,
            interval=self.interval,
        )

    def describe(self) -> str:
        return f"files:cert={self.cert},key={self.key},roots={self.roots}"


_FILES_KEYS = {
    "cert": "cert",
    "key": "key",
    "roots": "roots",
    "trustDomain": "trust_domain",
    "trust_domain": "trust_domain",
    "interval": "interval",
}


def parse_identity(text: str) -> FilesIdentity | None:
    """
    Read an identity description: ``agent`` (returns ``None``: the agent,
    the default) or ``files:cert=PATH,key=PATH,roots=PATH`` with optional
    ``trustDomain=`` and ``interval=`` (seconds between two looks at the
    files).

    :raises InvalidIdentityDescription: with a one-line reason.
    """
    kind, colon, rest = text.strip().partition(":")
    if kind == "agent" and not colon:
        return None
    if kind != "files":
        raise InvalidIdentityDescription(
            f"identity must be 'agent' or 'files:cert=PATH,key=PATH,roots=PATH', "
            f"not {text!r}"
        )
    values: dict[str, str] = {}
    for item in rest.split(","):
        if not item.strip():
            continue
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or name not in _FILES_KEYS:
            raise InvalidIdentityDescription(
                f"identity files: {item!r} is not one of cert=, key=, roots=, "
                "trustDomain=, interval="
            )
        key = _FILES_KEYS[name]
        if key in values:
            raise InvalidIdentityDescription(f"identity files: {name}= given twice")
        values[key] = value.strip()
    return files_identity(**values)


def files_identity(
    cert: str | None = None,
    key: str | None = None,
    roots: str | None = None,
    trust_domain: str | None = None,
    interval: str | float | None = None,
) -> FilesIdentity:
    """
    A :class:`FilesIdentity` from its parts, each checked.

    :raises InvalidIdentityDescription: with a one-line reason.
    """
    missing = [
        name
        for name, value in (("cert", cert), ("key", key), ("roots", roots))
        if not value
    ]
    if missing:
        raise InvalidIdentityDescription(
            "identity files: " + ", ".join(f"{m}=PATH" for m in missing) + " missing"
        )
    assert cert
    assert key
    assert roots
    seconds = 1.0
    if interval is not None and interval != "":
        try:
            seconds = float(interval)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise InvalidIdentityDescription(
                f"identity files: interval must be a positive number of seconds, "
                f"not {interval!r}"
            )
    return FilesIdentity(
        cert=Path(cert).expanduser(),
        key=Path(key).expanduser(),
        roots=Path(roots).expanduser(),
        trust_domain=trust_domain or None,
        interval=seconds,
    )
