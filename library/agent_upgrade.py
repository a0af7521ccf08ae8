#!/usr/bin/python
"""Ansible module: upgrade one agent host, or list those to upgrade (logic in agentlink)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: agent_upgrade
short_description: Replace one agent host container with drain, health gate and rollback
description:
  - Without C(group), lists the agent hosts that do not run as specified (a new image, a
    changed config or environment), in start order; nothing is touched.
  - With C(group), replaces that host; see agentlink.deploy.upgrade. Its replicated instances are
    drained in the registry, the host is stopped (in-flight requests finish), the old
    container is kept aside, the new one is started and gated on health, then the drain is
    lifted and the old container removed. When the new host does not get healthy, the old
    one is started again and the module fails naming the agent and the rollback's outcome.
  - A host that already runs as specified is left alone. In check mode, says what would be
    replaced and why.
options:
  topology:
    description: Path of the topology file on the controller.
    type: path
    required: true
  machines:
    description: Per machine, how to run its containers, as for agent_launch; C(image) is
      the image to upgrade to.
    type: dict
    required: true
  group:
    description: The agent host group to upgrade; without it, list those to upgrade.
    type: str
  registry:
    description: Where the registry is, C(sentinels) (host:port list) and C(service).
    type: dict
  settle:
    description: Seconds between the drain and the stop, for callers to re-read the registry.
    type: float
    default: 1.0
  prefix:
    description: Container name prefix.
    type: str
    default: agentlink
"""

RETURN = r"""
hosts:
  description: Without group, the hosts to upgrade in start order (group, machine, layer,
    reason, image_from, image_to, drained).
  returned: when group is not given
  type: list
upgraded:
  description: With group, what was replaced, from and to which image, and in how many seconds.
  returned: when the host was replaced
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - after the docs, by convention


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "topology": {"type": "path", "required": True},
            "machines": {"type": "dict", "required": True},
            "group": {"type": "str"},
            "registry": {"type": "dict", "default": {}},
            "settle": {"type": "float", "default": 1.0},
            "prefix": {"type": "str", "default": "agentlink"},
        },
        supports_check_mode=True,
    )
    try:
        from agentlink.deploy import rollout
        from agentlink.deploy.upgrade import UpgradeFailed, Upgrader, pending, pending_host
        from agentlink.runtime.registry import REDIS_ERRORS, Registry, redis_client
    except ImportError as err:
        module.fail_json(msg=f"the agentlink package is not importable by {err.name!r}: run "
                         "modules with the controller's venv (ansible_python_interpreter)")
    p = module.params
    try:
        with rollout.open_deployment(p["topology"], p["machines"], p["prefix"]) as (
                topology, backend):
            if p["group"] is None:
                module.exit_json(changed=False,
                                 hosts=[h.to_dict() for h in pending(topology, backend)])
            host = pending_host(topology, backend, p["group"])
            if host is None or module.check_mode:
                module.exit_json(changed=host is not None,
                                 would_upgrade=host.to_dict() if host else None)
            upgrader = Upgrader(topology, backend, Registry(redis_client(p["registry"])),
                                settle=p["settle"])
            done = upgrader.upgrade(p["group"])
    except UpgradeFailed as err:
        module.fail_json(msg=str(err), group=err.host.group, cause=err.cause,
                         rolled_back=err.restored, image_from=err.host.image_from,
                         image_to=err.host.image_to)
    except REDIS_ERRORS as err:
        module.fail_json(msg=f"the registry does not answer ({err}): check the Sentinels "
                         f"{p['registry'].get('sentinels')}. A drain left behind lifts itself "
                         "within 10 minutes")
    except Exception as err:
        if (failure := rollout.module_failure(err)) is None:
            raise
        module.fail_json(**failure)
    module.exit_json(changed=done is not None, upgraded=done.to_dict() if done else None)


if __name__ == "__main__":
    main()
