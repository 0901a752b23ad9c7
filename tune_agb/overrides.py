"""Command-line overrides of a YAML document: ``--set SECTION.KEY=VALUE`` (repeatable), shared by the commands.

An override names a key by its dotted path in the document (``experiment.num_samples``, ``fixed.lr``,
``params.lr.high``: a section, then one or more keys) and gives its value as YAML text, so ``12`` is an integer,
``0.001`` and ``1.0e-3`` are floats, ``true`` a boolean, ``null`` None, ``[a, b]`` a list and anything else text.
Note that YAML reads ``1e-3`` (no dot) as text: the document's validation says how to write it as a number.

This module only parses the items and puts them into a plain nested mapping; the command then validates the whole
overridden document exactly as it validates the file, so an unknown section or key, or a value of the wrong type,
is the same one-line :class:`~tune_agb.errors.TuneAgbError` a bad file gives. Importing it imports only PyYAML.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from tune_agb.errors import TuneAgbError

FORM = "SECTION.KEY=VALUE (e.g. experiment.num_samples=12)"

# The search command's convenience flags (dest -> the space key they set, as a ``--set`` path). Also the keys under
# which searches started before ``--set`` existed recorded their overrides in search.yaml.
FLAG_PATHS: dict[str, str] = {
    "num_samples": "experiment.num_samples",
    "max_concurrent": "experiment.max_concurrent",
    "time_budget": "experiment.time_budget_s",
    "max_failures": "experiment.max_failures",
    "cpus_per_trial": "resources.cpu",
    "gpus_per_trial": "resources.gpu",
    "seed": "searcher.seed",
}


def parse_override(item: str, flag: str = "--set") -> tuple[str, Any]:
    """One ``SECTION.KEY=VALUE`` item as (``SECTION.KEY``, the value read as YAML).

    Args:
        item: the text after the flag, e.g. ``fixed.lr=0.001``.
        flag: how errors name the flag.

    Raises:
        TuneAgbError: one line naming the item and the expected form when it has no ``=``, its path has fewer
            than two dot-separated names or an empty one, or the value is not valid YAML.
    """
    path, eq, text = item.partition("=")
    path = path.strip()
    names = path.split(".")
    if not eq or len(names) < 2 or not all(n.strip() for n in names):
        raise TuneAgbError(f"{flag} {item}: expected {FORM}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TuneAgbError(f"{flag} {item}: the value is not valid YAML ({first}); expected {FORM}") from None
    return path, value


def parse_overrides(items: Mapping[str, Any] | Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """Overrides as ``{"SECTION.KEY": value}``, in the order given (a path given twice keeps its last value).

    Args:
        items: ``SECTION.KEY=VALUE`` strings (values read as YAML), or a mapping ``{"SECTION.KEY": value}``
            whose values are taken as they are.
        flag: how errors name the flag.

    Raises:
        TuneAgbError: one line for a malformed item (see :func:`parse_override`).
    """
    if isinstance(items, Mapping):
        out: dict[str, Any] = {}
        for path, value in items.items():
            names = str(path).split(".")
            if len(names) < 2 or not all(n.strip() for n in names):
                raise TuneAgbError(f"{flag} {path}={value!r}: expected {FORM}")
            out[str(path)] = value
        return out
    if isinstance(items, str):
        items = [items]
    return dict(parse_override(item, flag) for item in items)


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any], flag: str = "--set") -> dict[str, Any]:
    """A deep copy of the document ``raw`` with every ``{"SECTION.KEY": value}`` set.

    Missing sections (or missing or null mappings on the way) are created. Nothing is validated here beyond the
    shape: the caller validates the result like the file it came from.

    Raises:
        TuneAgbError: one line when a name on the path holds a value that is not a mapping (e.g. ``fixed.lr.x=1``).
    """
    out = copy.deepcopy(dict(raw))
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node = out
        for i, name in enumerate(parents):
            if node.get(name) is None:
                node[name] = {}
            node = node[name]
            if not isinstance(node, dict):
                where = ".".join(parents[: i + 1])
                raise TuneAgbError(f"{flag} {path}: {where} is a {type(node).__name__}, not a section with keys")
        node[last] = value
    return out


def format_overrides(overrides: Mapping[str, Any], flag: str = "--set") -> str:
    """Overrides as command-line text: ``--set a.b=1 --set c.d=x`` (values written as YAML flow scalars)."""
    return " ".join(f"{flag} {path}={yaml_scalar(v)}" for path, v in overrides.items())


def yaml_scalar(value: Any) -> str:
    """``value`` as the YAML text :func:`parse_override` reads back to it (``null``, ``true``, ``0.001``...)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
