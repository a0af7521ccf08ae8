"""The agent host: one process runs one group of agents.

One ZeroMQ context (the pool's), one ROUTER port shared by the group's agents with messages
routed by agent name, and one HTTP port for /health and /metrics. By responsibility:

- server: the ROUTER, the workers, and how a request becomes a reply (AgentHost);
- admission: each instance's places, its waiting requests, and inline answering;
- supervisor: dependencies, agent start and stop, health, the registry heartbeat;
- state: an agent's state in Redis, every write acknowledged only once it is durable;
- web: the read-only HTTP server;
- process: `agentlink run`, signals and exit codes.

The startup config it is given is agentlink.runtime.startup_config.
"""

from agentlink.runtime.host.process import EXIT_DIED, run
from agentlink.runtime.host.server import AgentHost

__all__ = ["EXIT_DIED", "AgentHost", "run"]
