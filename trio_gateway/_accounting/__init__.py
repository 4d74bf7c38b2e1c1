"""What a finished request leaves behind: limits charged, metrics, usage rows, the JSON log.

Fed by :class:`~trio_gateway._core.record.RequestRecord`\\ s; the rows and
their field list are pure (``usage_rows``), the stores do the I/O.
"""
