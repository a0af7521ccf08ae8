"""Plan the images: render Dockerfiles, stage build contexts, compute content tags.

Each image is tagged ``<project version>-<content hash>``, where the hash covers the rendered
Dockerfile text (which names the parent image's tag, so a new base gives a new runtime), every
hashed file staged into the build context, and any extra ``inputs`` (for the base: the
debootstrap script and its package list). The same inputs always give the same tag and any
change gives a new one, so "the tag exists" means "the image is up to date".

The Ansible module library/image_plan.py is a thin shell over this.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DIGEST_LENGTH = 12
DEFAULT_EXCLUDE = ("__pycache__", "*.pyc", "*.egg-info", ".*")
# What build/images.json tells of each image (the module returns these and its name).
MANIFEST_FIELDS = ("repository", "tag", "ref", "digest", "parent")
_VERSION_RE = re.compile(r'^\s*version\s*=\s*"([^"]+)"', re.MULTILINE)
_DIGEST_RE = re.compile(rf"^[0-9a-f]{{{DIGEST_LENGTH}}}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class PlanError(ValueError):
    """A spec that cannot be planned (unknown parent, missing file, bad tag)."""


def project_version(pyproject: str | os.PathLike[str]) -> str:
    """The ``[project] version`` of a pyproject.toml."""
    text = Path(pyproject).read_text(encoding="utf-8")
    project = text.split("[project]", 1)[-1].split("\n[", 1)[0]
    match = _VERSION_RE.search(project)
    if not match:
        raise PlanError(f"{pyproject}: no [project] version")
    return match.group(1)


def render_dockerfile(templates_dir: str | os.PathLike[str], template: str,
                      variables: Mapping[str, Any]) -> str:
    """Render one Dockerfile template with plain Jinja2; an undefined variable is an error."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    return env.get_template(template).render(**variables)


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in exclude)


def collect_files(src: str | os.PathLike[str], dest: str,
                  exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict[str, Path]:
    """Map context-relative destination paths to source files (a directory is walked)."""
    exclude = tuple(exclude)
    root = Path(src)
    if root.is_file():
        return {dest: root}
    if not root.is_dir():
        raise PlanError(f"{root}: no such file or directory")
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d, exclude))
        for filename in sorted(filenames):
            if _excluded(filename, exclude):
                continue
            path = Path(dirpath) / filename
            found[f"{dest}/{path.relative_to(root).as_posix()}"] = path
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_digest(dockerfile: str, files: Mapping[str, bytes | None],
                   inputs: Mapping[str, Any] | None = None) -> str:
    """The content hash of an image's inputs: Dockerfile text, hashed files, extra inputs.

    A file mapped to None is an optional file that is absent; it hashes differently from an
    empty one.
    """
    document = {
        "dockerfile": _sha256(dockerfile.encode("utf-8")),
        "files": {name: None if data is None else _sha256(data)
                  for name, data in sorted(files.items())},
        "inputs": dict(inputs or {}),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return _sha256(canonical.encode("utf-8"))[:DIGEST_LENGTH]


def content_tag(version: str, digest: str) -> str:
    """``<version>-<digest>``: a valid Docker tag, never ``latest`` nor a bare version."""
    tag = f"{version}-{digest}".replace("+", "_")
    if not version or not _DIGEST_RE.match(digest) or not _TAG_RE.match(tag):
        raise PlanError(f"invalid image tag {tag!r}")
    return tag


def plan_images(specs: Iterable[Mapping[str, Any]], *, templates_dir: str | os.PathLike[str],
                namespace: str, version: str, variables: Mapping[str, Any] | None = None,
                exclude: Iterable[str] = DEFAULT_EXCLUDE) -> dict[str, dict[str, Any]]:
    """Plan every image: rendered Dockerfile, staged files (in memory) and content tag.

    A spec is a mapping with ``name``, and optionally ``repository`` (default
    ``<namespace>/<name>``), ``template`` (no template: an image built otherwise, such as the
    debootstrap base), ``parent`` (an earlier spec; its ref is the template variable
    ``<parent>_image``), ``vars``, ``files`` (list of ``{dest, src or content, hash: true,
    optional: false, exclude: []}``; an absent optional src is staged empty, ``exclude``
    adds name patterns left out of a walked directory) and ``inputs`` (extra data hashed
    into the tag).
    Template variables are ``variables`` + the spec's ``vars`` + ``version`` and ``image_name``.
    """
    exclude = tuple(exclude)
    planned: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name = spec["name"]
        if name in planned:
            raise PlanError(f"image {name!r} is listed twice")
        context_vars: dict[str, Any] = {**(variables or {}), **(spec.get("vars") or {}),
                                        "version": version, "image_name": name}
        parent = spec.get("parent")
        if parent:
            if parent not in planned:
                raise PlanError(f"image {name!r}: parent {parent!r} is not planned before it")
            context_vars[f"{parent}_image"] = planned[parent]["ref"]
        template = spec.get("template")
        dockerfile = render_dockerfile(templates_dir, template, context_vars) if template else ""

        staged: dict[str, bytes] = {}
        hashed: dict[str, bytes | None] = {}
        for entry in spec.get("files") or []:
            dest, src = entry["dest"], entry.get("src")
            if entry.get("content") is not None:
                data = str(entry["content"]).encode("utf-8")
                staged[dest] = data
                if entry.get("hash", True):
                    hashed[dest] = data
                continue
            if src is None:
                raise PlanError(f"image {name!r}: file {dest!r} has neither src nor content")
            if entry.get("optional") and not Path(src).exists():
                staged[dest] = b""
                if entry.get("hash", True):
                    hashed[dest] = None
                continue
            entry_exclude = (*exclude, *(entry.get("exclude") or ()))
            for rel, path in collect_files(src, dest, entry_exclude).items():
                data = path.read_bytes()
                staged[rel] = data
                if entry.get("hash", True):
                    hashed[rel] = data

        digest = content_digest(dockerfile, hashed, spec.get("inputs"))
        repository = spec.get("repository") or f"{namespace}/{name}"
        tag = content_tag(version, digest)
        planned[name] = {
            "name": name,
            "repository": repository,
            "tag": tag,
            "ref": f"{repository}:{tag}",
            "digest": digest,
            "parent": parent or None,
            "dockerfile": dockerfile,
            "files": staged,
        }
    return planned


def _write_if_changed(path: Path, data: bytes, dry_run: bool) -> bool:
    """Make path hold data (its directories too) unless it already does; True when it was,
    or in a dry run would be, written."""
    if path.is_file() and path.read_bytes() == data:
        return False
    if not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return True


def stage_context(context: str | os.PathLike[str], dockerfile: str, files: Mapping[str, bytes],
                  dry_run: bool = False) -> list[str]:
    """Make ``context`` hold exactly the Dockerfile and files; return what changed."""
    root = Path(context)
    wanted = dict(files)
    if dockerfile:
        wanted["Dockerfile"] = dockerfile.encode("utf-8")
    changes: list[str] = []
    for rel, data in sorted(wanted.items()):
        if _write_if_changed(root / rel, data, dry_run):
            changes.append(f"write {rel}")
    if root.is_dir():
        for path in sorted(root.rglob("*"), reverse=True):
            rel = path.relative_to(root).as_posix()
            if path.is_dir():
                if not any(key.startswith(rel + "/") for key in wanted):
                    changes.append(f"remove {rel}/")
                    if not dry_run:
                        shutil.rmtree(path, ignore_errors=True)
            elif rel not in wanted:
                changes.append(f"remove {rel}")
                if not dry_run:
                    path.unlink()
    return changes



def write_manifest(path: str | os.PathLike[str], version: str,
                   images: Mapping[str, Mapping[str, Any]], dry_run: bool = False) -> bool:
    """Write the plan's manifest (version, each image's ref and details) where tests and
    benches read it; True when it was, or in a dry run would be, written."""
    manifest = {"version": version,
                "images": {name: image["ref"] for name, image in images.items()},
                "details": {name: {key: image[key] for key in MANIFEST_FIELDS}
                            for name, image in images.items()}}
    text = json.dumps(manifest, indent=4, sort_keys=True, ensure_ascii=False) + "\n"
    return _write_if_changed(Path(path), text.encode("utf-8"), dry_run)

