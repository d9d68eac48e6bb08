"""Fault injection and verdicts: proxies, nemeses, workloads and the
linearizability checker. Talks to a cluster only from outside (HTTP, TCP
proxies, signals) and imports nothing of the service but its client.
"""
