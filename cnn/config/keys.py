"""The schema's keys as users meet them: each leaf with its doc (read from schema.py's source with
ast, the only copy), --help text, and the key that was probably meant for an unknown one."""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import inspect
import re
import sys
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, Iterable, Sequence


from cnn.config.schema import Config, ConfigError


@dataclass(frozen=True)
class Key:
    """One leaf of the schema, as --help lists it."""

    name: str  # dotted: "train.batch_size"
    type: str  # as annotated: "int", "list[str]"
    default: Any
    doc: str  # the string under the field


def _field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field: doc}}: the string literal under each field of this file's dataclasses.

    Python keeps no reference to those strings at run time, so they are read from this
    file's source with ast; the source is the only copy of the docs.
    """
    tree = ast.parse(inspect.getsource(inspect.getmodule(Config)))  # type: ignore[arg-type]
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = {
                a.target.id: " ".join(b.value.value.split())
                for a, b in zip(node.body, node.body[1:])
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)
            }
    return docs


def _default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


@functools.cache
def schema_keys() -> tuple[Key, ...]:
    """Every leaf key of Config in declaration order: the top-level keys, then each section's."""
    docs = _field_docs()

    def walk(cls: type, prefix: str):
        for f in fields(cls):
            value = _default(f)
            if is_dataclass(value):
                yield from walk(type(value), f"{prefix}{f.name}.")
            else:
                yield Key(prefix + f.name, str(f.type), value, docs.get(cls.__name__, {}).get(f.name, ""))

    return tuple(walk(Config, ""))


@functools.cache
def sections() -> dict[str, str]:
    """{section name: its one-line doc}, e.g. {"train": "The training loop: ..."}."""
    return {f.name: (inspect.getdoc(type(_default(f))) or "").splitlines()[0]
            for f in fields(Config) if is_dataclass(_default(f))}


def key_names() -> tuple[str, ...]:
    return tuple(k.name for k in schema_keys())


def _show(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or "''"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def schema_help(only: Iterable[str] | None = None) -> str:
    """Every key (or those in `only`) with its type, default and doc, one line each, grouped by section."""
    keys = [k for k in schema_keys() if only is None or k.name in set(only)]
    wn, wt, wd = (max(len(x) for x in col) for col in zip(*((k.name, k.type, _show(k.default)) for k in keys)))
    lines, current = [], None
    for k in keys:
        section = k.name.rpartition(".")[0]
        if section != current:
            current = section
            lines.append(f"\n{section}: {sections()[section]}" if section else "\ntop level:")
        lines.append(f"  {k.name:<{wn}}  {k.type:<{wt}}  {_show(k.default):<{wd}}  {k.doc}")
    return "\n".join(lines).lstrip("\n")


def suggest(key: str, allowed: Iterable[str] | None = None) -> str | None:
    """The allowed key most likely meant by the unknown `key`, or None.

    In order: the same name in another section (lr -> optim.lr); a close spelling
    (train.epoch -> train.epochs); a key whose doc holds every word of the name, in the
    same section if that section exists (optim.learning_rate -> optim.lr, "Peak Adam
    learning rate."); a misspelt section (optimizer.lr -> optim.lr); a looser spelling.
    """
    allowed = list(key_names() if allowed is None else allowed)
    section, _, leaf = key.rpartition(".")
    same_leaf = [k for k in allowed if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.8)
    if close:
        return close[0]
    words = [w for w in re.split(r"[_\-.]+", leaf.lower()) if len(w) > 2]
    docs = {k.name: k.doc.lower() for k in schema_keys() if k.name in allowed}
    if section in sections():
        docs = {k: d for k, d in docs.items() if k.rpartition(".")[0] == section}
    by_doc = [k for k, d in docs.items() if words and all(re.search(rf"\b{re.escape(w)}", d) for w in words)]
    if by_doc:
        return by_doc[0]
    if section and section not in sections():
        near = difflib.get_close_matches(section, list(sections()), n=1, cutoff=0.6)
        if near and f"{near[0]}.{leaf}" in allowed:
            return f"{near[0]}.{leaf}"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key(key: str, allowed: Iterable[str] | None = None) -> ConfigError:
    """One line: the key, the key probably meant, and the valid keys of its section."""
    allowed = list(key_names() if allowed is None else allowed)
    section = key.rpartition(".")[0]
    guess = suggest(key, allowed)
    msg = f"unknown key '{key}'" + (f"; did you mean '{guess}'?" if guess else "")
    here = [k.rpartition(".")[2] for k in allowed if k.rpartition(".")[0] == section]
    if section in sections():
        msg += f" ({section} keys: {', '.join(here) or 'none here'})"
    elif not section and here:
        msg += f" (top-level keys: {', '.join(here)}; sections: {', '.join(sections())})"
    else:
        msg += f" (sections: {', '.join(s for s in sections() if any(k.startswith(s + '.') for k in allowed))})"
    return ConfigError(msg)


def check_key(key: str, allowed: Iterable[str] | None = None) -> None:
    """Raise ConfigError unless `key` is a schema key (and one of `allowed`, if given)."""
    if not key:
        raise ConfigError("an override has no key before its '=' (overrides are key=value)")
    if key in sections():
        example = next(k for k in key_names() if k.startswith(key + "."))
        raise ConfigError(f"'{key}' is a section, not a key: set its keys one by one, e.g. {example}=...")
    if key not in key_names():
        raise unknown_key(key, allowed)
    if allowed is not None and key not in allowed:
        allowed = list(allowed)
        raise ConfigError(f"this command does not take '{key}'; it takes: {', '.join(allowed)}")


def _flat_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix.rstrip(".")]
    return [k for name, value in tree.items() for k in _flat_keys(value, f"{prefix}{name}.")]


def _config_like(name: str) -> bool:
    """An option name that looks like a config key: dotted, or a key's name."""
    return "." in name or name in {k.rpartition(".")[2] for k in key_names()}


def split_argv(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               allowed: Iterable[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The parser's own options, and the key=value overrides (a positional `overrides`
    argument, plus --key=value as `wandb agent` passes them).

    `--optim.lr 0.002`, the habit of other tools, is answered with the spelling that
    works (optim.lr=0.002) instead of argparse's "unrecognized arguments".
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for tok, nxt in zip(argv, [*argv[1:], None]):
        name = tok[2:]
        if tok.startswith("--") and "=" not in tok and _config_like(name):
            right = name if name in key_names() else suggest(name, allowed)
            if right is None:
                raise unknown_key(name, allowed)
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else None
            shown = f"{tok} {value}" if value is not None else tok
            raise ConfigError(f"'{shown}' is not an override: write {right}={value or 'VALUE'}"
                              + ("" if right == name else f" ('{name}' is not a key)"))
    args, unknown = parser.parse_known_intermixed_args(argv)  # options may follow key=value
    extra = [u for u in unknown if u.startswith("--") and "=" in u]
    if len(extra) != len(unknown):
        bad = next(u for u in unknown if u not in extra)
        raise ConfigError(f"unrecognised argument '{bad}' (overrides are key=value)")
    return args, [*args.overrides, *extra]


def keys_epilog(only: Iterable[str] | None = None) -> str:
    """The --help text that lists the config keys, generated from the schema."""
    return ("config keys (key=value on the command line, also --key=value; type, default, meaning):\n\n"
            + schema_help(only))
