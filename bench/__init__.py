"""Every benchmark of this project, each run as ``.venv/bin/python -m bench.<name>``
(``--help`` gives its options; ``docs/benchmarks.md`` its results with the
command that produced them):

- ``cluster``: a three-node cluster's kv latency, throughput and failover;
- ``bus``: publish → deliver, unbatched and batched (``--transports``: the
  embedded log next to each broker);
- ``balancer``: invoking an agent through a node next to calling it directly;
- ``engines``: Raft and PBFT side by side;
- ``apply``: what a replica spends applying one committed write, in process
  (``--trees A B``: two source trees interleaved);
- ``eventstore``: the event store's and the transforms' apply cost, in process;
- ``compare``: this project side by side with etcd (``scripts/bench.sh``
  installs etcd and runs it);
- ``ab``: two checkouts' clusters under the same load, interleaved;
- ``gen_ab``: the load generator against its own past.

The shared pieces: ``harness`` (the command line, a local cluster, SIGTERM),
``report`` (percentiles, CPU time, the markdown section a run writes),
``load`` (the multi-process HTTP load generator) and ``etcd`` (a local etcd
cluster). Tooling only: nothing in coordinator/, cluster/ or transports/
imports it (the import contract ``core-independent`` checks the core).
"""
