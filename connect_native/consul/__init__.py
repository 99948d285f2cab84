"""
Talking to the Consul agent: the HTTP client, the blocking-query loop and the
records decoded from the agent's JSON.
"""
