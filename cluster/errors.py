"""Errors of the consensus engines."""

from coordinator.errors import CoordinatorError


class EngineError(CoordinatorError):
    code = "engine"


class JournalCorrupt(EngineError):
    """The journal holds a damaged record before its end: refuse to start
    rather than serve a state that silently lost committed entries."""

    code = "journal_corrupt"


class MissingSecret(EngineError):
    """The cluster port would accept unauthenticated peers."""

    code = "missing_secret"


class FrameRefused(EngineError):
    """A frame on the Raft port declared a length it may not have (negative,
    or over the cap for what that connection may send yet): the connection is
    closed before the frame is buffered."""

    code = "frame_refused"
