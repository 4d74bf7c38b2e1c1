"""The benchmark suite of trio-gateway: ``python -m bench [scenario ...]``.

It measures the gateway against a floor of its own stack (``bare``, a
hypercorn + httpx pass-through), the mock upstream itself (``direct``) and,
when installed, LiteLLM and nginx, side by side in one run. Every server is a
subprocess on loopback, started and stopped here; figures come from outside
those processes (``/proc``) and from a lean load generator in this process.
docs/benchmarks.md explains each scenario and shows the latest results.

Not part of the wheel: ``[tool.setuptools] packages`` names ``trio_gateway`` only.
"""
