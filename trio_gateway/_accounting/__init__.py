"""What a finished request leaves behind: limits charged, metrics, usage rows, the JSON log.

Fed by :class:`~trio_gateway._core.record.RequestRecord`\\ s, whose stored and
logged fields are declared once, in :data:`~trio_gateway._core.record.FIELDS`.
The usage database's rows are pure (``usage_rows``); the spill file
(``spill``), the usage store (``usage_store``) and the request log
(``json_log``, the JSON line log) do the I/O.
"""
