"""Consensus engines behind ``coordinator.ports.ConsensusEngine``."""
