"""`agentlink run`: one agent host as the process's life, stopped by a signal."""

from __future__ import annotations

import logging
import os

import zmq

from agentlink.runtime.host.server import REPLY_LINGER_MS, AgentHost
from agentlink.runtime.startup_config import HostConfig

log = logging.getLogger("agentlink.runtime.host")
# How `agentlink run` exits when a thread of the host died (EX_SOFTWARE): Docker restarts it.
EXIT_DIED = 70


def run(config: HostConfig) -> int:
    """Run a host until SIGTERM or SIGINT, then stop gracefully; if a thread it cannot
    serve without dies, stop and exit EXIT_DIED."""
    import signal

    # Block the stop signals before any thread exists, so every thread (ours and libzmq's)
    # inherits the mask and none is interrupted mid-call; the main thread takes the signal
    # synchronously below.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # A thread of the host that dies wakes the main thread with SIGUSR1.
    wake = {*stop_signals, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, wake)
    host = AgentHost(config)
    host.on_death = lambda: os.kill(os.getpid(), signal.SIGUSR1)
    try:
        host.start()
    except (zmq.ZMQError, OSError) as err:
        log.error("group %s cannot start: %s (is another process on port %d or %d?)",
                  config.group, err, config.port, config.http_port)
        return 1
    received = signal.sigwait(wake)
    if host.died is not None:
        log.critical("group %s: exiting, %s", config.group, host.died)
    else:
        log.info("group %s received %s: stopping", config.group, signal.Signals(received).name)
    host.stop()
    # Terminating the context is what lets the last replies leave: libzmq sends what the
    # lingering sockets still hold. Without it the process exits and drops them.
    host.pool.context.destroy(linger=REPLY_LINGER_MS)
    return EXIT_DIED if host.died is not None else 0
