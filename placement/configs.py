"""Locate and read the JSON files under configs/ (model presets, hardware profiles)."""

import json
from pathlib import Path


class ConfigError(ValueError):
    pass


def config_dir() -> Path:
    """configs/ as installed in the wheel (placement/configs), else the one in the source tree."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    if installed.is_dir():
        return installed
    return here.parent / "configs"


def list_configs(kind: str) -> dict:
    """{name: path} of configs/<kind>/*.json."""
    d = config_dir() / kind
    return {p.stem: p for p in sorted(d.glob("*.json"))} if d.is_dir() else {}


def load_config(kind: str, name_or_path) -> dict:
    """A config by name (configs/<kind>/<name>.json) or by path to a JSON file."""
    p = Path(str(name_or_path))
    if not (p.suffix == ".json" and p.is_file()):
        known = list_configs(kind)
        if str(name_or_path) not in known:
            raise ConfigError(
                f"no {kind} config named {name_or_path!r}; known: {', '.join(known) or '(none)'} "
                f"(or give a path to a .json file)")
        p = known[str(name_or_path)]
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot read {kind} config: {e}") from None
