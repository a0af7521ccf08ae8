"""What every agent process runs, and all the runtime image carries besides the shared
modules (agentlink.topology, agentlink.security, agentlink.cli): the agent host and its
agents, the failover client and its pool, the registry, durable state, the workflow engine
and the reference agents."""
