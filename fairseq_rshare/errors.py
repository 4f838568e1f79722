"""The error every bad rshare setting raises."""


class RShareConfigError(ValueError):
    """A bad rshare setting or checkpoint; fairseq_rshare prints its message without a traceback."""
