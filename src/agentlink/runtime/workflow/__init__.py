"""Workflows: small graphs of agent calls, run by the replicated RequestCoordinator.

- `definition`: the document, checked like the topology, with payload templates;
- `scheduler`: per-agent concurrency limits, fairness between workflows, back-pressure;
- `engine`: state in Redis, leases, takeover from the last completed step.
"""
