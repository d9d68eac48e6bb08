"""PBFT (Castro & Liskov, OSDI 1999 / TOCS 2002): a Byzantine fault tolerant
engine for 3f+1 replicas.

- ``messages``: the signed wire messages and their canonical encoding.
- ``replica``: the pure protocol core (no clock, no randomness, no I/O).
- ``sim``: a deterministic in-process simulation with Byzantine replicas.

See ``design.md`` for the state diagram and the choices made.
"""
