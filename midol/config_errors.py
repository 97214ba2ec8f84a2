"""One line for a config or command-line error of ``midol fit | validate | test``.

jsonargparse reports a misspelt key or a wrong type as a usage dump (about 50 lines) followed by
a nested "Does not validate against any of the Union subtypes" tree. :func:`short_parse_error`
turns that message into the line a user needs, with the closest valid key::

    unknown option 'model.init_args.num_expert' — did you mean 'num_experts'?
    trainer.max_epochs: expected int or None, got 'abc'

A message of another shape is kept, its lines joined. Imports nothing heavy.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any

# Options LightningCLI offers that midol turns off, with what to do instead.
_NOT_OFFERED = {
    "optimizer": "midol's modules build their own optimiser groups: set lr, weight_decay (and "
                 "optimizer where offered) under model.init_args",
    "lr_scheduler": "midol's modules set the learning rate every step from their own schedule: "
                    "set warmup_epochs, min_lr (and schedule where offered) under model.init_args",
}
_UNION = "Does not validate against any of the Union subtypes"
_NOISE = ("Subtypes:", "Given value type:", "Errors:")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` — did you mean 'x'?`` for the closest of ``candidates`` (difflib), else ``""``."""
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" — did you mean {found[0]!r}?" if found else ""


def init_arguments(class_path: str) -> list[str]:
    """Keyword arguments of ``class_path``'s ``__init__`` along its ``**kwargs`` chain (the
    classes jsonargparse has just imported); empty when it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            break
        names += [n for n, p in params.items()
                  if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def parser_keys(parser: Any) -> list[str]:
    """Every option key of a (jsonargparse) parser: ``trainer.max_epochs``, ``seed_everything``."""
    keys = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", None)
        if isinstance(dest, str) and dest not in ("help", "config", "print_config") \
                and not dest.startswith("=="):
            keys.append(dest)
    return keys


def _items(block: str) -> list[str]:
    """The ``- ...`` entries of a Union error's ``Errors:`` list, each with its nested lines."""
    lines = block.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "Errors:"), None)
    if start is None:
        return []
    items: list[list[str]] = []
    indent = None
    for line in lines[start + 1:]:
        stripped = line.lstrip()
        depth = len(line) - len(stripped)
        if indent is None and stripped.startswith("- "):
            indent = depth
        if indent is None:
            continue
        if depth < indent:
            break
        if depth == indent and stripped.startswith("- "):
            items.append([stripped[2:]])
        elif depth == indent:
            break  # "Given value type: ..." of this union
        elif items:
            items[-1].append(line)
    return ["\n".join(item) for item in items]


def _given(block: str) -> str | None:
    found = re.search(r"^\s*Given value: (.*)$", block, re.MULTILINE)
    return found.group(1).strip() if found else None


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = text.strip().rstrip(".")
    found = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    if found:
        return "None" if found.group(1) == "NoneType" else found.group(1)
    found = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if found:
        return f"one of {found.group(1)}"
    return text


def _explain_key(key: str, rest: str) -> str | None:
    """The line for ``Parser key "<key>": <rest>``."""
    first = rest.strip().splitlines()[0].strip() if rest.strip() else ""
    simple = re.match(r"Expected a (.+?)\. Got value: (.*)$", first)
    if simple:
        return f"{key}: expected {_type_name(simple.group(1))}, got {simple.group(2)!r}"
    if _UNION not in rest:
        return f"{key}: {first}" if first else None
    items = _items(rest)
    for item in items:
        problem = re.match(r"Problem with given class_path '([^']+)':\n?(.*)", item, re.DOTALL)
        if problem:
            return _explain_class(key, problem.group(1), problem.group(2))
    expected = [_type_name(m.group(1)) for item in items
                if (m := re.match(r"Expected a (.+)$", item.splitlines()[0]))]
    given = _given(rest)
    if expected:
        got = f", got {given!r}" if given is not None else ""
        return f"{key}: expected {' or '.join(expected)}{got}"
    details = [ln.strip() for item in items for ln in item.splitlines()[:1]]
    return f"{key}: {'; '.join(details)}" if details else None


def _explain_class(key: str, class_path: str, detail: str) -> str:
    """The line for a problem with the ``init_args`` of ``class_path`` given under ``key``."""
    text = inspect.cleandoc(detail) if detail.strip() else ""
    unknown = re.match(r"Option '([^']+)' is not accepted", text)
    if unknown:
        option = unknown.group(1)
        hint = did_you_mean(option, init_arguments(class_path))
        full = f"{key}.init_args.{option}"
        return f"unknown option {full!r}{hint or f' ({class_path} takes no such argument)'}"
    nested = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.DOTALL)
    if nested:
        line = _explain_key(f"{key}.init_args.{nested.group(1)}", nested.group(2))
        if line:
            return line
    first = text.splitlines()[0].strip() if text else "invalid"
    return f"{key} ({class_path}): {first}"


def _unknown_option(option: str, keys: Iterable[str]) -> str:
    option = option.lstrip("-").split("=", 1)[0]
    if option in _NOT_OFFERED:
        return f"unknown option {option!r}: {_NOT_OFFERED[option]}"
    return f"unknown option {option!r}{did_you_mean(option, keys)}"


def short_parse_error(message: str, parser: Any = None, subcommands: Iterable[str] = (),
                      tools: Iterable[str] = ()) -> str:
    """One line for jsonargparse's error ``message`` (see the module docstring); ``parser``
    (the subcommand's) gives the valid top-level keys, ``subcommands`` and ``tools`` the valid
    first words."""
    text = message.strip()
    choice = re.match(r"argument subcommand: invalid choice: '([^']*)'", text)
    if choice:
        word, names, others = choice.group(1), list(subcommands), sorted(tools)
        listed = f"subcommands: {', '.join(names)}" + (f"; tools: {', '.join(others)}" if others else "")
        return f"unknown subcommand {word!r}{did_you_mean(word, [*names, *others])} ({listed})"
    refused = re.match(r"Subcommand '[^']+' does not accept option '([^']+)'", text)
    if refused:
        return _unknown_option(refused.group(1), parser_keys(parser))
    unrecognized = re.match(r"unrecognized arguments: (.*)", text)
    if unrecognized:
        options = [t for t in unrecognized.group(1).split() if t.startswith("--")]
        if options:
            return _unknown_option(options[0], parser_keys(parser))
        return f"unexpected argument(s): {unrecognized.group(1)}"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.DOTALL)
    if key:
        line = _explain_key(key.group(1), key.group(2))
        if line:
            return line
    kept = [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(_NOISE) and ln.strip() != _UNION]
    return "; ".join(kept)[:500] or "invalid arguments"
