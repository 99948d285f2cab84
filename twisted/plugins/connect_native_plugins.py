"""
connect_native's Twisted plugins.

Kept tiny on purpose: Twisted imports every plugin module to discover plugins,
so this module only instantiates plugin objects; anything heavy is imported
lazily when a plugin is used.
"""

from connect_native.endpoints import ConnectClientParser, ConnectServerParser

#: ``connect:`` endpoint strings for serverFromString and clientFromString.
connect_server_parser = ConnectServerParser()
connect_client_parser = ConnectClientParser()
