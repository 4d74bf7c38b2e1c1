"""Serving the gateway under hypercorn's trio worker.

``serve`` runs it with graceful shutdown; ``hypercorn_h11`` is the one
module that knows hypercorn's private API.
"""
