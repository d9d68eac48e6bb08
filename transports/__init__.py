"""Broker transports of the message bus, one module per broker.

Empty until the bus lands (issue 4/5): each plugin will implement
``coordinator.ports.BusTransport`` and register under the
``coordinator.transports`` entry point group.
"""
