"""Commands of the agent registry. So far the limits and values the API,
the state and other domains' parses share; the command types follow.
"""

from __future__ import annotations

HEALTH_STATES = ("healthy", "unhealthy", "unknown")
MAX_WEIGHT = 1_000_000  # an agent's load-balancing weight
MAX_ENDPOINT_LEN = 2048  # an agent's endpoint URL, in characters
