#!/usr/bin/python
"""Ansible module: start agent host containers in health-gated layers (logic in agentlink)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: agent_launch
short_description: Start the agent host containers of a topology, layer by layer
description:
  - Starts one container per agent host group on each machine's Docker engine, layer by
    layer in dependency order, each layer in parallel across machines, polling the agents'
    own /health until the layer is healthy.
  - An unchanged running container is left alone; a changed image, environment, config
    checksum or limit recreates it. On failure, what this run started is stopped, and the
    module fails naming the agent, its last health answer and its last log lines.
  - In check mode, reports what would be started or removed and why.
options:
  topology:
    description: Path of the topology file on the controller.
    type: path
    required: true
  machines:
    description:
      - Per machine name, how to run its containers. Keys C(image), C(config_dir),
        C(address) (where the controller reaches the machine's ports), and optionally
        C(docker_host), C(network_mode), C(env), C(config_checksum), C(restart_policy),
        C(ssh_args) (for an C(ssh://) docker_host, the SSH options Ansible uses there),
        C(hardening) (C(read_only), C(cap_drop), C(security_opts), as in
        community.docker.docker_container).
    type: dict
    required: true
  state:
    description: C(started) brings containers to the topology; C(absent) removes them all.
    type: str
    choices: [started, absent]
    default: started
  prefix:
    description: Container name prefix.
    type: str
    default: agentlink
  one_by_one:
    description:
      - Start one container at a time, each gated on health before the next, instead of a
        layer's containers together. Slower; the old way, kept for benchmarks.
    type: bool
    default: false
"""

RETURN = r"""
layers:
  description: Per layer, its agents, the containers started or left unchanged, seconds.
  returned: state=started and not check mode
  type: list
seconds:
  description: Launch time, first start to the last layer healthy.
  returned: state=started and not check mode
  type: float
would_start:
  description: In check mode, container name to the reason it would be (re)created.
  returned: check mode
  type: dict
removed:
  description: Containers removed (orphans of groups no longer in the topology, or all).
  returned: always
  type: list
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - after the docs, by convention


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "topology": {"type": "path", "required": True},
            "machines": {"type": "dict", "required": True},
            "state": {"type": "str", "choices": ["started", "absent"], "default": "started"},
            "prefix": {"type": "str", "default": "agentlink"},
            "one_by_one": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    try:
        from agentlink.deploy import rollout
        from agentlink.deploy.launch import LaunchError
    except ImportError as err:
        module.fail_json(msg=f"the agentlink package is not importable by {err.name!r}: run "
                         "modules with the controller's venv (ansible_python_interpreter)")
    p = module.params
    try:
        with rollout.open_deployment(p["topology"], p["machines"], p["prefix"]) as (
                topology, backend):
            if p["state"] == "absent":
                result = ({"changed": bool(rollout.plan(topology, backend)["would_start"])}
                          if module.check_mode else rollout.remove(topology, backend))
            elif module.check_mode:
                result = rollout.plan(topology, backend)
            else:
                result = rollout.launch(topology, backend, one_by_one=p["one_by_one"])
    except LaunchError as err:
        module.fail_json(msg=str(err), agent=err.instance, last_health=err.last_health,
                         log_lines=err.log_lines, stopped=err.stopped)
    except Exception as err:
        if (failure := rollout.module_failure(err)) is None:
            raise
        module.fail_json(**failure)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
