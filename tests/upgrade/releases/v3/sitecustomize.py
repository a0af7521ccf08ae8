"""Makes every agent of this image report a failed check (the bad release of the test)."""

import agentlink.runtime.host.supervisor
from agentlink.runtime.agent import Check

agentlink.runtime.host.supervisor.checks_of = lambda agent: [
    Check("release", "failed", "v3 cannot load its model")]
