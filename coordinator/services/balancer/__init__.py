"""The load balancer: which instance of an agent type serves a request."""
