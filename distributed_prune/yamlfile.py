"""Config YAML: the loader behind ``dprune`` config files and ``key=value`` overrides.

YAML 1.1's sexagesimal numbers are off ("0:0.1" stays a string); a mapping may not repeat a key
(YAML forbids it; PyYAML would keep the last one silently); aliases may expand a document to at
most :data:`MAX_EXPANDED_NODES` values (an "alias bomb", anchors nested a few levels deep, is a
few hundred bytes that stand for billions of values and hang whatever walks them); binary,
non-UTF-8 and oversized files are refused. Every error is one line naming the file and line.
Bottom layer: imports nothing from the package but its errors.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .errors import UserError

__all__ = ["MAX_EXPANDED_NODES", "MAX_CONFIG_BYTES", "StrictYAMLError", "yaml_load", "read_yaml_file",
           "yaml_error_line", "dump_yaml"]

# --- YAML: no YAML 1.1 sexagesimal numbers ("0:0.1" must stay a string), no duplicate keys,
# and a bound on what aliases may expand to (an "alias bomb", anchors nested a few levels deep,
# is a few hundred bytes that expand to billions of values and hang whatever walks them).
MAX_EXPANDED_NODES = 10_000  # a full config is ~150 values; aliases may not expand it beyond this
MAX_CONFIG_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts, for every node, how many values it stands for once its aliases
    are expanded (linear time: each node is counted once, when it is composed), refuses
    recursive aliases and documents beyond :data:`MAX_EXPANDED_NODES`, and refuses a mapping
    that repeats a key (YAML forbids it; PyYAML keeps the last one silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._size: dict[int, int] = {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._size:  # alias inside its own anchor
                raise StrictYAMLError(f"alias *{event.anchor} refers to the node that contains it",
                                   event.start_mark)
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._size[id(c)] for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._size[id(k)] + self._size[id(v)] for k, v in node.value)
        else:
            size = 1
        if size > MAX_EXPANDED_NODES:
            raise StrictYAMLError(f"aliases expand this value to {size} or more values (at most "
                               f"{MAX_EXPANDED_NODES} allowed)", node.start_mark)
        self._size[id(node)] = size
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # merge keys ("<<") may repeat what they merge; explicit keys win
                key = self.construct_object(key_node)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: PyYAML reports it below
                    continue
                if first is not None:
                    raise StrictYAMLError(f"duplicate key {key!r} (first on line {first.start_mark.line + 1})",
                                       key_node.start_mark)
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class StrictYAMLError(yaml.MarkedYAMLError):
    """A YAML document this loader refuses (repeated key, recursive alias, alias bomb)."""

    def __init__(self, problem, mark):
        super().__init__(problem=problem, problem_mark=mark)


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf)$|^\.(?:nan|NaN)$"),
    list("-+0123456789."))


def yaml_error_line(source: str, e: yaml.YAMLError) -> str:
    """One line for a YAML error: ``<source>, line N: <problem>``."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f", line {mark.line + 1}" if mark is not None else ""
    if isinstance(e, yaml.reader.ReaderError):  # a control character, e.g. a binary file
        code = e.character if isinstance(e.character, int) else ord(e.character)
        return f"{source}: not a text file (control character 0x{code:02x} at offset {e.position})"
    return f"{source}{where}: {problem if isinstance(e, StrictYAMLError) else 'invalid YAML (' + problem + ')'}"


def yaml_load(text: str, source: str | None = None):
    """Parse config YAML (see :class:`_Loader`). With ``source`` (e.g. "config file x.yaml") errors
    are a :class:`UserError` naming it and the line; without, ``yaml.YAMLError`` propagates."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        if source is None:
            raise
        raise UserError(yaml_error_line(source, e)) from None


def read_yaml_file(path: str | Path, what: str = "config file"):
    """Load a YAML file as :func:`yaml_load` does; missing, unreadable, oversized, binary or
    non-UTF-8 files and YAML errors are one :class:`UserError` naming the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: not found" + (" (a directory)" if p.is_dir() else ""))
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"{what} {p}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"{what} {p}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return yaml_load(text, source=f"{what} {p}")


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared objects out in full: a dumped config never holds an anchor or alias."""

    def ignore_aliases(self, data):
        return True


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)
