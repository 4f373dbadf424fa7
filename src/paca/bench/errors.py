"""The one error `paca bench` reports as a message (bad input, a method this install cannot run)."""


class BenchError(ValueError):
    """Bad benchmark input or an unavailable method; the message says what was wrong and what to do."""
