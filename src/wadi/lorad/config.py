"""LoRaD adapter configuration: which layers to rotate and at what rank."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "adapter_config.json"


@dataclass
class LoRaDConfig:
    """What a LoRaD adapter wraps and how large its angle factors are.

    Module names are matched as PEFT does: a list matches a module whose full
    name equals an entry or ends with ``"." + entry``; a single string is a
    regular expression that must match the full module name.  ``None`` for
    ``target_modules`` selects every ``nn.Linear`` (and ``nn.Conv2d`` with
    ``include_conv``).  ``exclude_modules`` uses the same rules and wins.
    """

    rank: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    include_conv: bool = False
    adapter_type: str = field(default="lorad", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRaD rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        for pattern in (self.target_modules, self.exclude_modules):
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"invalid module regex {pattern!r}: {err}") from None

    def matches(self, module_name: str) -> bool:
        """Whether a module of a supported type with this name gets an adapter."""
        if self.exclude_modules and _matches(self.exclude_modules, module_name):
            return False
        if self.target_modules is None:
            return True
        return _matches(self.target_modules, module_name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoRaDConfig:
        data = dict(data)
        kind = data.pop("adapter_type", "lorad")
        data.pop("role", None)  # run metadata written by save_adapter, not a LoRaD setting
        if kind != "lorad":
            raise ValueError(f"not a LoRaD adapter config (adapter_type={kind!r})")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRaD config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoRaDConfig:
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LoRaDConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a wadi adapter folder?")
        return cls.from_json(path.read_text())


def _matches(patterns: list[str] | str, name: str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
