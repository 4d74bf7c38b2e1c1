"""The sans-IO core: configuration, API kinds, records, usage extraction, forms, buckets.

Nothing in this package does I/O at request time or imports trio, httpx,
hypercorn, sqlite3 or threading; ``tests/test_layout.py`` holds that true.
"""
