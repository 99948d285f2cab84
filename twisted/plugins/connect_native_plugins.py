"""
connect_native's Twisted plugins.

Kept tiny on purpose: Twisted imports every plugin module to discover plugins,
so this module only instantiates plugin objects; anything heavy is imported
lazily when a plugin is used.
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

from connect_native.endpoints import ConnectClientParser, ConnectServerParser

#: ``connect:`` endpoint strings for serverFromString and clientFromString.
connect_server_parser = ConnectServerParser()
connect_client_parser = ConnectClientParser()

#: ``twistd connect-native``: the TLS terminator (connect_native.terminator).
connect_native_terminator = ServiceMaker(
    "connect-native",
    "connect_native.terminator",
    "A Consul Connect mutual-TLS terminator and upstream listeners",
    "connect-native",
)

#: ``twistd --reactor uvloop``: Twisted's asyncio reactor on uvloop
#: (connect_native.uvloopreactor; needs the optional uvloop package).
connect_native_uvloop_reactor = Reactor(
    "uvloop", "connect_native.uvloopreactor", "asyncio reactor on a uvloop loop"
)

#: ``twistd --reactor cn-epoll``: Twisted's epoll reactor making one
#: epoll_ctl per descriptor per turn at most (connect_native.epollreactor).
connect_native_epoll_reactor = Reactor(
    "cn-epoll",
    "connect_native.epollreactor",
    "epoll reactor applying interest changes once per turn",
)
