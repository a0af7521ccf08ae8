"""Makes every agent of this image report a failed check (the bad release of the test)."""

import agentlink.host
from agentlink.agent import Check

agentlink.host.checks_of = lambda agent: [Check("release", "failed", "v3 cannot load its model")]
