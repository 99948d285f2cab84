"""
Helpers for testing Connect-native applications, one module per kind:

- :mod:`~connect_native.testing.strategies`: Hypothesis strategies for
  Consul's SPIFFE identities;
- :mod:`~connect_native.testing.certificates`: a Consul-shaped CA
  (:class:`CertificateFactory`) and its leaves (:class:`TestLeaf`);
- :mod:`~connect_native.testing.fakes`: authorizers, bundle sources,
  resolvers and service instances for the seams;
- :mod:`~connect_native.testing.agent`: the development agent in memory.

Every name is also importable from ``connect_native.testing`` itself.
Hypothesis is a test extra, not a runtime dependency: this package imports
without it, and each strategy imports it when called.
"""

from __future__ import annotations

from connect_native.testing.agent import MemoryAgent
from connect_native.testing.certificates import (
    LEAF_EXTENDED_KEY_USAGES,
    CertificateFactory,
    TestLeaf,
)
from connect_native.testing.fakes import (
    FakeAuthorizer,
    FakeBundleSource,
    FakeResolver,
    FakeServiceInstance,
    RecordingProtocol,
    StaticResolver,
    fake_instance,
    make_bundle,
)
from connect_native.testing.strategies import (
    agent_identities,
    identity_names,
    partitions,
    service_identities,
    signing_identities,
    spiffe_ids,
    trust_domain_labels,
    trust_domains,
)

__all__ = [
    "LEAF_EXTENDED_KEY_USAGES",
    "CertificateFactory",
    "FakeAuthorizer",
    "FakeBundleSource",
    "FakeResolver",
    "FakeServiceInstance",
    "MemoryAgent",
    "RecordingProtocol",
    "StaticResolver",
    "TestLeaf",
    "agent_identities",
    "fake_instance",
    "identity_names",
    "make_bundle",
    "partitions",
    "service_identities",
    "signing_identities",
    "spiffe_ids",
    "trust_domain_labels",
    "trust_domains",
]
