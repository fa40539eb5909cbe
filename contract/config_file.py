"""Reading a run config from a YAML file (SPEC S1, S96): the YAML reader refuses a key given
twice in one mapping (naming its dotted path and both lines) and reads exponent numbers as
floats; the mapping is then validated by `contract.config.parse_config`."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from contract.config import ConfigError, RunConfig, parse_config


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (PyYAML would silently keep the last)."""

    def __init__(self, path: str, key: str, first_line: int, line: int):
        super().__init__(f"{path}: duplicate key {key!r} (lines {first_line} and {line}); "
                         "a key may appear once per mapping")


def _refuse_duplicate_keys(node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
    """Walk a composed YAML document; raise DuplicateKeyError at the first mapping that
    holds a key twice, naming its dotted config path and both (1-based) lines."""
    if id(node) in seen:  # an alias of a node already walked (and no cycles)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; overriding is its point
                continue
            key = (k.tag, k.value) if isinstance(k, yaml.ScalarNode) else (k.tag, repr(k))
            if key in first:
                raise DuplicateKeyError(".".join((*path, str(k.value))), str(k.value), first[key],
                                        k.start_mark.line + 1)
            first[key] = k.start_mark.line + 1
            _refuse_duplicate_keys(v, (*path, str(k.value)), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _refuse_duplicate_keys(v, (*path, str(i)), seen)


class ConfigLoader(yaml.SafeLoader):
    """The YAML reader of run configs: `yaml.SafeLoader` that refuses duplicate keys (S96) and
    reads a number with an exponent as a float whether or not it has a dot (`1e-3`, `2E5`;
    YAML 1.2. PyYAML's YAML 1.1 resolver reads `1e-3` as a string, which a strict float
    field would refuse)."""

    def construct_document(self, node):
        _refuse_duplicate_keys(node, (), set())
        return super().construct_document(node)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read as text: {e}") from None
    try:
        d = yaml.load(text, Loader=ConfigLoader)  # a SafeLoader subclass
    except DuplicateKeyError as e:
        raise ConfigError(f"invalid config {path}:\n  {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return parse_config(d, str(path))
