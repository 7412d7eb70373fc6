"""The scoring service: export loading, user state, A/B routing, the HTTP API.

Filled in from Foundation B onward.
"""
