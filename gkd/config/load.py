"""Loading a run configuration: defaults <- YAML file(s) <- ``key=value`` overrides (OmegaConf), into the
dataclasses of :mod:`gkd.config.schema`, then checked by :func:`gkd.config.checks.validate`. Unknown keys
are errors listing the valid keys of their section; a removed key's error names what replaced it."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from gkd.config.checks import validate
from gkd.config.schema import Config, ConfigError, _sections


def _valid_keys(full_key: str | None) -> str:
    """The sentence listing valid keys for the section an unknown ``full_key`` was found in."""
    parts = (full_key or "").split(".")
    sections = _sections()
    if len(parts) >= 2 and parts[0] in sections:
        cls, at = sections[parts[0]], parts[0]
        for part in parts[1:-1]:  # a nested section (model.lora), or a list's item (data.sources[0])
            name = part.split("[")[0]
            inner = typing.get_type_hints(cls).get(name)
            if typing.get_origin(inner) is list:
                inner = typing.get_args(inner)[0]
            if not dataclasses.is_dataclass(inner):
                break
            cls, at = inner, f"{at}.{name}"
        names = [f.name for f in dataclasses.fields(cls)]
        return f"valid keys in '{at}': {', '.join(names)}"
    return f"valid sections: {', '.join(sections)}"


# Keys that existed once: the error says what replaced them.
_PRECISION_KEYS = (
    "use model.param_dtype (master weights and optimizer state, default float32) and model.compute_dtype "
    "(forward/backward compute: auto = bfloat16 on GPU, float32 on CPU)"
)
_REMOVED_KEYS = {"model.dtype": _PRECISION_KEYS, "model.autocast": _PRECISION_KEYS}


def _wrap_list_scalars(raw: DictConfig) -> None:
    """``data.train_files: a.parquet`` means a one-element list (in YAML and on the command line)."""
    for name, cls in _sections().items():
        section = raw.get(name) if isinstance(raw, DictConfig) else None
        if not isinstance(section, DictConfig):
            continue
        hints = typing.get_type_hints(cls)
        for key, tp in hints.items():
            value = section.get(key)
            if typing.get_origin(tp) is list and isinstance(value, str) and "," in value:
                section[key] = [v.strip() for v in value.split(",") if v.strip()]  # a,b on the command line
            elif typing.get_origin(tp) is list and isinstance(value, str | int | float):
                section[key] = [value]


def _merge(base: DictConfig, raw: DictConfig, source: str) -> DictConfig:
    _wrap_list_scalars(raw)
    try:
        return typing.cast(DictConfig, OmegaConf.merge(base, raw))
    except ConfigKeyError as e:
        if e.full_key in _REMOVED_KEYS:
            raise ConfigError(f"{source}: '{e.full_key}' was removed; {_REMOVED_KEYS[e.full_key]}") from None
        raise ConfigError(f"{source}: unknown config key '{e.full_key}'; {_valid_keys(e.full_key)}") from None
    except OmegaConfBaseException as e:
        msg = str(e.msg).splitlines()[0] if e.msg else str(e)
        key = f" '{e.full_key}'" if e.full_key else ""
        raise ConfigError(f"{source}: bad value for config key{key}: {msg}") from None


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip() or key.startswith("-"):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if "." not in key:
            raise ConfigError(f"override {item!r}: name a key inside a section; {_valid_keys(key)}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line override: {e}") from None


def _load_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: say which file
        raise ConfigError(f"config file {path}: cannot parse YAML: {e}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return raw


def _to_config(cfg: DictConfig) -> Config:
    try:
        return typing.cast(Config, OmegaConf.to_object(cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {str(e.msg or e).splitlines()[0]} (key '{e.full_key}')") from None


def from_mapping(raw: Mapping[str, Any], source: str = "config") -> Config:
    """A Config from nested mappings (and dataclasses) of sections, ``{"model": {"student_path": ...}}``,
    on top of the defaults; not checked (:func:`validate`). ``source`` names it in errors."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        created = OmegaConf.create(dict(raw))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {str(e.msg or e).splitlines()[0]}") from None
    return _to_config(_merge(OmegaConf.structured(Config), created, source))


def load_config(
    paths: Sequence[str] | str = (), overrides: Sequence[str] = (), *, check: bool = True
) -> Config:
    """Defaults, then each YAML file in order, then ``key=value`` overrides; validated unless ``check`` is
    False (tests that build partial configs). Raises :class:`ConfigError`."""
    if isinstance(paths, str):
        paths = [paths]
    cfg = OmegaConf.structured(Config)
    for path in paths:
        cfg = _merge(cfg, _load_yaml(str(path)), f"config file {path}")
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "command line override")
    obj = _to_config(cfg)
    if check:
        validate(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written next to checkpoints; loadable by :func:`load_config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
