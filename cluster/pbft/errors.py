"""Errors of the PBFT engine."""

from __future__ import annotations

from cluster.errors import EngineError


class PbftError(EngineError):
    code = "pbft"


class MalformedMessage(PbftError):
    """Bytes that are not a well-formed PBFT message or envelope. Raised by the
    decoders only; the replica catches it and counts the message as dropped."""

    code = "pbft_malformed"


class PbftConfigError(PbftError):
    """A replica was configured with impossible parameters."""

    code = "pbft_config"
