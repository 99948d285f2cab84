"""
The development agent's tables, one module each: what one part of Consul's
state store holds and the rules of its endpoints.  They share the
:class:`~connect_native.devagent.store.Store` and, where one table reads
another (health reads the catalog, queries run on health), take it as a
constructor argument.
"""
