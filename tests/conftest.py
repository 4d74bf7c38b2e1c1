"""Rules for every test in this suite (docs/testing.md says more).

1. Nothing leaves the machine: network tests use 127.0.0.1 on port 0.
2. Time is deterministic: anything that depends on a timeout runs under
   ``autojump_clock`` (``MockClock(autojump_threshold=0)``) against the
   in-memory doubles in ``tests/helpers.py``. No real sleeps in unit tests.
3. End-to-end tests (a real hypercorn) carry an absolute ``trio.fail_after``.
4. Fake upstreams are mocked at the byte boundary: each test picks its
   chunks, and where they split.
5. Where both sides could close first, the test chooses which one does.
"""
