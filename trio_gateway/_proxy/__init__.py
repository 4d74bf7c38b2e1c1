"""One proxied request, from the ASGI scope to the upstream and back (the trio shell).

``asgi`` (scope and send helpers, headers parsed once) → ``checks`` (auth,
route, body, validation) → ``upstream`` (the httpx boundary and its one error
map) → ``pipeline`` (a stream) or ``upstream.read_whole_body`` (a JSON answer)
→ ``router`` (the attempts before the first byte: deployments, retries,
fallbacks) → ``exchange`` (one answer, filling the usage record) → ``app`` (the
``Gateway``: routing, lifespan, drain).
"""
