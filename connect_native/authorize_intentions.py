"""
The old name of :mod:`connect_native.authorize.intentions`
(:class:`~connect_native.authorize.intentions.IntentionAuthorizer`: cached
intentions decided locally), kept so that imports written for it keep
working.  New code imports from :mod:`connect_native.authorize.intentions`.
"""

from __future__ import annotations

from connect_native.authorize.intentions import IntentionAuthorizer, IntentionsClient

__all__ = ["IntentionAuthorizer", "IntentionsClient"]
