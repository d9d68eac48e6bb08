"""A Raft-replicated coordination service for multi-agent systems."""

__version__ = "0.1.0"
