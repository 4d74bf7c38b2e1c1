"""What a finished request leaves behind: limits charged, metrics, usage rows, the JSON log.

Fed by :class:`~trio_gateway._core.record.RequestRecord`\\ s, whose stored and
logged fields are declared once, in :data:`~trio_gateway._core.record.FIELDS`.
The usage database's rows are pure (``usage_rows``); the spill files
(``spill``), the usage store (``usage_store``, over one ``usage_db``
interface: ``sqlite_store`` or ``postgres_store``), the limiters
(``limiter``, ``redis_limiter``) and the request log (``json_log``, the
JSON line log) do the I/O.
"""
