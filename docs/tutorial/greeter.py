"""
The tutorial's first service, ``greeter``: a Klein app that greets whoever
calls it by the service name their certificate proves.

Run it next to an agent (``CONSUL_HTTP_ADDR`` says where)::

    python greeter.py
"""

from klein import Klein

from connect_native import peer_identity

app = Klein()


@app.route("/")
def hello(request):
    # Who called: the identity the caller's certificate proved in the TLS
    # handshake, not anything the caller wrote in the request.
    caller = peer_identity(request)
    return f"hello, {caller.service}\n"


# Mutual TLS with greeter's certificate from the agent, callers authorized
# by Consul intentions, and the instance registered with the agent so that
# callers find it.  port=0: any free port; nobody needs to know which.
app.run(endpoint_description="connect:greeter:port=0:interface=127.0.0.1:register=yes")
