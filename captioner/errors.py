"""Project exceptions: user mistakes surface as one-line messages, never tracebacks.

All are ``ValueError`` subclasses so callers that already guard against bad values keep working;
the CLI prints ``error: <message>`` and exits with ``exit_status``: 2, or 1 for a run stopped from outside.
"""


class CaptionerError(ValueError):
    """Base class for every error caused by the caller's input rather than a bug."""

    exit_status = 2


class ImageError(CaptionerError):
    """An image could not be read: missing, empty, not an image, truncated or too large."""


class DataError(CaptionerError):
    """An annotation file is malformed or points to images that do not exist."""


class CheckpointError(CaptionerError):
    """A checkpoint directory is missing, incomplete, unsafe (pickles) or inconsistent."""


class DecodingError(CaptionerError):
    """A decoder's next-word scores cannot be decoded (NaN or infinite: unusable weights), whatever the input."""


class WeightsError(CaptionerError):
    """No encoder weights could be found; the message lists every remedy."""


class ConfigError(CaptionerError):
    """A configuration value or config file is invalid."""


class OutputError(CaptionerError):
    """An output folder cannot be used: not a folder, not writable, full, or in use by another run."""


class LoaderError(CaptionerError):
    """A process loading images died (killed by hand or by the out-of-memory killer): not a mistake in the
    input, so status 1, like a run with unreadable images."""

    exit_status = 1


class BusyError(CaptionerError):
    """A server cannot take or finish a request now (its queue is full, its deadline passed, it is shutting
    down): nothing wrong with the request, so status 1, and HTTP 503 with ``Retry-After``."""

    exit_status = 1
