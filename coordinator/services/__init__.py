"""Services: they propose commands, wait for their results and react to what
the log applied. They own the node's in-memory state (leases, watchers) and
run on the event loop."""
