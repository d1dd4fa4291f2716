"""Reading configurations from YAML files and ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import yaml

from mln_core.config import Config


class ConfigError(ValueError):
    """An invalid configuration file or override; the message names the key and the fix."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.steps=100"`` into (["train", "steps"], 100); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is invalid: expected key=value, for example train.steps=100")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r} has a value that is not valid YAML: {error}") from None
    return key.strip().split("."), value


def _set_nested(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r} is invalid: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def describe_validation_error(error: pydantic.ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            lines.append(f"{location}: unknown key; run 'mln config --describe' to list the valid keys")
        elif "input" in item and item["type"] != "value_error":
            lines.append(f"{location}={item['input']!r}: {item['msg']}")
        else:
            # Cross-field checks name their fields in the message itself.
            lines.append(item["msg"].removeprefix("Value error, "))
    return "invalid configuration:\n  " + "\n  ".join(lines)


def config_from_dict(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except pydantic.ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merge(base[key], value) if nested else value
    return merged


def load_config_tree(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> dict:
    """Merge an optional YAML file over ``base``, then apply ``key=value`` overrides in order (unvalidated)."""
    tree: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = _merge(tree, loaded or {})
    for text in overrides:
        key_path, value = parse_override(text)
        _set_nested(tree, key_path, value, text)
    return tree


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> Config:
    """Build a Config from ``base``, an optional YAML file and ``key=value`` overrides, in that order."""
    return config_from_dict(load_config_tree(path, overrides, base))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _describe_type(annotation: object) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def describe_fields(model: type[pydantic.BaseModel] = Config, prefix: str = "") -> list[str]:
    """List every configuration key as one line: name, default and description."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            lines += describe_fields(annotation, f"{prefix}{name}.")
            continue
        allowed = _describe_type(annotation)
        bounds = " ".join(
            f"{op}{getattr(item, attr)}"
            for item in field.metadata
            for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length "))
            if getattr(item, attr, None) is not None
        )
        detail = ", ".join(part for part in (allowed, bounds) if part)
        lines.append(f"{prefix}{name} = {field.default!r}  # {field.description or ''} [{detail}]")
    return lines
