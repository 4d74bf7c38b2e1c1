"""Serving the gateway under hypercorn's trio worker.

``serve`` runs it with graceful shutdown and uses only hypercorn's public
API; ``hypercorn_private`` is the one module that knows hypercorn's private
API.
"""
