"""Reading docker-compose files as Compose would, for static checks (no Docker runs here).

YAML with anchors, merge keys and Compose's ``!override``/``!reset`` tags; ``${VAR:-default}``
interpolation; the merge of an override file over a base file (mappings merge, ``!override``
replaces, ``!reset`` removes, anything else replaces); the official Compose specification's
JSON schema as vendored by the ``check-jsonschema`` package.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
REDIS_BROKER = ROOT / "docker-compose.redis-broker.yml"


class Override(dict[str, Any]):
    """A mapping tagged ``!override``: replaces the base's value instead of merging."""


class Reset:
    """A value tagged ``!reset``: removes the key from the base."""


class _ComposeConstructor(SafeConstructor):
    pass


def _override(constructor: SafeConstructor, node: Node) -> Any:
    if isinstance(node, MappingNode):
        return Override(constructor.construct_mapping(node, deep=True))
    if isinstance(node, SequenceNode):
        return constructor.construct_sequence(node, deep=True)
    return constructor.construct_scalar(node)


def _reset(constructor: SafeConstructor, node: Node) -> Reset:
    return Reset()


_ComposeConstructor.add_constructor("!override", _override)
_ComposeConstructor.add_constructor("!reset", _reset)


def load(path: Path) -> dict[str, Any]:
    yaml = YAML(typ="safe", pure=True)
    yaml.Constructor = _ComposeConstructor
    data = yaml.load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def plain(value: Any) -> Any:
    """The document as plain JSON types (tags dropped), for the schema."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def merge(base: Any, override: Any) -> Any:
    if isinstance(override, Override):
        return plain(override)
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base.get(key), value) if key in base else plain(value)
        return merged
    return plain(override)


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_]\w*)")


def variables(value: Any) -> set[str]:
    """Names of the variables ``value`` interpolates."""
    if isinstance(value, Mapping):
        return set().union(*(variables(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables(v) for v in value)) if value else set()
    if isinstance(value, str):
        return {m.group(1) or m.group(4) for m in _VAR.finditer(value) if m.group(0) != "$$"}
    return set()


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` with ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$`` resolved
    from ``env`` (as Compose does with the shell's environment and .env)."""
    if isinstance(value, Mapping):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and not current):
                raise KeyError(f"{name} must be set: {arg}")
            return current
        if op in (":+", "+"):
            return arg if current else ""
        return current or ""

    return _VAR.sub(one, value)


def schema() -> dict[str, Any]:
    """The Compose specification's schema, as shipped by check-jsonschema."""
    files = importlib.resources.files("check_jsonschema")
    text = (files / "builtin_schemas" / "vendor" / "compose-spec.json").read_text()
    loaded = json.loads(text)
    assert isinstance(loaded, dict)
    return loaded


def schema_errors(document: Any) -> list[str]:
    spec = schema()
    validator_class = jsonschema.validators.validator_for(spec)
    validator_class.check_schema(spec)
    validator = validator_class(spec)
    return sorted(
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(plain(document))
    )


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a dict (list or mapping form), values as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {k: v for k, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def active_services(document: Mapping[str, Any], profiles: set[str]) -> dict[str, Any]:
    """Services ``docker compose up`` starts with these profiles enabled."""
    return {
        name: service
        for name, service in document["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & profiles
    }
