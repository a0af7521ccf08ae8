"""For developers and benchmarks, never in the runtime image: `agentlink up` on one machine
(local), a throwaway Redis, the load generator, the memory footprint and the test harness
for agents (testing)."""
