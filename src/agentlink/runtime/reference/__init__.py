"""The reference system's agents: the roadmap's named services and small real workers."""
