"""
Frozen attrs records decoded from the Consul agent's JSON.

JSON is decoded once, at the edge (the client), into these records; nothing
past the client sees a dict of JSON.  The decoders follow the shapes a real
Consul 1.8.7 agent sends (``IntermediateCerts`` and ``Meta`` may be ``null``,
a root's ``SerialNumber`` is a number and a leaf's a hex string, native
health entries carry no ``Kind`` key, ...) and are lenient only where newer
agents omit a field (``omitempty``).  Anything else of the wrong shape raises
:class:`ConsulResponseError` naming the field, e.g.
``leaf: field 'CertPEM' missing``.

The request side lives here too: :class:`ServiceRegistration` and
:class:`TTLCheck` render the body of ``PUT /v1/agent/service/register``.

One module per API area, every name exported here too:

* :mod:`~connect_native.consul.records.agent`: the agent itself and
  registration;
* :mod:`~connect_native.consul.records.connect`: the CA roots and
  configuration, leaf certificates, authorize;
* :mod:`~connect_native.consul.records.catalog`: nodes, service instances,
  health checks;
* :mod:`~connect_native.consul.records.queries`: prepared queries;
* :mod:`~connect_native.consul.records.intentions`: intentions and their
  permissions;
* :mod:`~connect_native.consul.records.values`: the checks of seconds and
  counts, and Go durations;
* ``_base``: :class:`Indexed`, :class:`FrozenDict` and the decoding helpers.
"""

from __future__ import annotations

from connect_native.consul.errors import ConsulError, ConsulResponseError
from connect_native.consul.records._base import (
    FrozenDict,
    Indexed,
)
from connect_native.consul.records.agent import (
    AgentSelf,
    ServiceRegistration,
    TTLCheck,
    decode_agent_self,
)
from connect_native.consul.records.catalog import (
    CatalogEntry,
    HealthCheck,
    HealthEntry,
    Node,
    ServiceAddress,
    ServiceInstance,
    decode_catalog_entries,
    decode_health_entries,
)
from connect_native.consul.records.connect import (
    AuthorizeResult,
    CAConfiguration,
    CARoot,
    CARoots,
    LeafCert,
    decode_authorize,
    decode_ca_configuration,
    decode_ca_roots,
    decode_leaf,
)
from connect_native.consul.records.intentions import (
    Intention,
    IntentionHTTPHeaderPermission,
    IntentionHTTPPermission,
    IntentionPermission,
    decode_intention,
    decode_intention_check,
    decode_intention_id,
    decode_intentions,
    decode_intentions_match,
)
from connect_native.consul.records.queries import (
    PreparedQueryResult,
    decode_prepared_query_result,
)
from connect_native.consul.records.values import (
    format_duration,
    positive_seconds,
    seconds_or_zero,
    whole_number,
)

__all__ = [
    "AgentSelf",
    "AuthorizeResult",
    "CAConfiguration",
    "CARoot",
    "CARoots",
    "CatalogEntry",
    "ConsulError",
    "ConsulResponseError",
    "FrozenDict",
    "HealthCheck",
    "HealthEntry",
    "Indexed",
    "Intention",
    "IntentionHTTPHeaderPermission",
    "IntentionHTTPPermission",
    "IntentionPermission",
    "LeafCert",
    "Node",
    "PreparedQueryResult",
    "ServiceAddress",
    "ServiceInstance",
    "ServiceRegistration",
    "TTLCheck",
    "decode_agent_self",
    "decode_authorize",
    "decode_ca_configuration",
    "decode_ca_roots",
    "decode_catalog_entries",
    "decode_health_entries",
    "decode_intention",
    "decode_intention_check",
    "decode_intention_id",
    "decode_intentions",
    "decode_intentions_match",
    "decode_leaf",
    "decode_prepared_query_result",
    "format_duration",
    "positive_seconds",
    "seconds_or_zero",
    "whole_number",
]
