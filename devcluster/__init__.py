"""A local cluster of this project's nodes on one machine, for scripts, tests,
benchmarks and chaos runs (``devcluster.cluster``). Not part of the service:
the core never imports it."""
