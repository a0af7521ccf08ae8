#!/usr/bin/python
"""Ansible module: plan the images (logic in agentlink.deploy.images)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: image_plan
short_description: Render AgentLink Dockerfiles, stage their build contexts, compute content tags
description:
  - Takes a list of image specs (in build order) and returns, per image, its repository,
    content tag (C(<version>-<hash>)) and build context.
  - Stages each build context under O(context_dir)/<name>, and writes the plan's manifest to
    O(manifest) when given; in check mode nothing is written.
options:
  specs:
    description: Images in build order; a spec's parent must come before it.
    type: list
    elements: dict
    required: true
  templates_dir:
    description: Directory holding the Dockerfile templates.
    type: path
    required: true
  context_dir:
    description: Where build contexts are staged (one directory per image).
    type: path
    required: true
  namespace:
    description: Repository namespace; a spec without repository gets C(<namespace>/<name>).
    type: str
    required: true
  version:
    description: Project version, the tag's prefix; read from O(pyproject) when omitted.
    type: str
  pyproject:
    description: pyproject.toml to read the version from.
    type: path
  variables:
    description: Template variables common to every image.
    type: dict
    default: {}
  manifest:
    description: Where to write the manifest (version, each image's ref and details), as JSON.
    type: path
  exclude:
    description: Glob patterns of file or directory names never staged nor hashed.
    type: list
    elements: str
    default: ['__pycache__', '*.pyc', '*.egg-info', '.*']
"""

RETURN = r"""
images:
  description: Per image name, its repository, tag, ref (repository:tag), digest and context.
  type: dict
  returned: always
version:
  description: The project version used as the tag prefix.
  type: str
  returned: always
"""

from pathlib import Path  # noqa: E402 - after the docs, by convention
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from agentlink.deploy.images import (  # noqa: E402
    DEFAULT_EXCLUDE,
    MANIFEST_FIELDS,
    PlanError,
    plan_images,
    project_version,
    stage_context,
    write_manifest,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "specs": {"type": "list", "elements": "dict", "required": True},
            "templates_dir": {"type": "path", "required": True},
            "context_dir": {"type": "path", "required": True},
            "namespace": {"type": "str", "required": True},
            "version": {"type": "str"},
            "pyproject": {"type": "path"},
            "variables": {"type": "dict", "default": {}},
            "manifest": {"type": "path"},
            "exclude": {"type": "list", "elements": "str", "default": list(DEFAULT_EXCLUDE)},
        },
        required_one_of=[("version", "pyproject")],
        supports_check_mode=True,
    )
    params = module.params
    try:
        version = params["version"] or project_version(params["pyproject"])
        planned = plan_images(params["specs"], templates_dir=params["templates_dir"],
                              namespace=params["namespace"], version=version,
                              variables=params["variables"], exclude=params["exclude"])
        changes: dict[str, list[str]] = {}
        images: dict[str, dict[str, Any]] = {}
        for name, image in planned.items():
            context = Path(params["context_dir"]) / name
            changed = stage_context(context, image["dockerfile"], image["files"],
                                    dry_run=module.check_mode)
            if changed:
                changes[name] = changed
            images[name] = {key: image[key] for key in ("name", *MANIFEST_FIELDS)}
            images[name]["context"] = str(context)
        if params["manifest"] and write_manifest(params["manifest"], version, images,
                                                 dry_run=module.check_mode):
            changes["manifest"] = [f"write {params['manifest']}"]
    except (PlanError, OSError, KeyError) as err:
        module.fail_json(msg=f"cannot plan images: {err}")
    module.exit_json(changed=bool(changes), images=images, version=version, staged=changes)


if __name__ == "__main__":
    main()
