"""Benchmarks that compare this project with other systems on one machine
(``python -m bench.compare``: etcd side by side). Tooling only: nothing in
coordinator/, cluster/ or transports/ imports it."""
