"""
A Consul-compatible agent for development and tests.
"""
