"""Recipes: YAML -> typed stage configs, validated strictly, with errors that name file:line.

    description: one line saying what the recipe does
    stages:
      - method: magnitude
        targets: [mlp]          # named groups (see model/architecture.py) or "re:<regex>"
        ignore: []              # same syntax; removed from the targets
        params: {sparsity: 0.5}
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from compresscli.core.errors import RecipeError, StageError
from compresscli.methods import METHODS, MethodConfig
from compresscli.core.registry import did_you_mean

RECIPE_KEYS = ("description", "stages")
STAGE_KEYS = ("method", "targets", "ignore", "params")
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class Stage:
    config: MethodConfig
    targets: list[str]
    ignore: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.config.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "targets": self.targets, "ignore": self.ignore, "params": self.config.to_dict()}


@dataclass
class Recipe:
    description: str
    stages: list[Stage]
    source: str = "<recipe>"

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "stages": [s.to_dict() for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- YAML with line numbers

MAX_NODES = 100_000  # a recipe is a few dozen nodes; YAML aliases can expand a short text exponentially
# PyYAML raises more than YAMLError on bad input: ValueError for `!!int 0b2` or `2001-13-45`, AttributeError
# for `!!timestamp 2001-99-99`, TypeError for a list used as a key, RecursionError for deep nesting.
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError, OverflowError)


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _compose(text: str, where: str) -> tuple[Any, dict[tuple, int]]:
    """safe-load the YAML, remembering the line of every key path, for errors that point at it."""
    lines: dict[tuple, int] = {}
    constructor = yaml.SafeLoader("")
    budget = [MAX_NODES]

    def build(node, path: tuple) -> Any:
        budget[0] -= 1
        if budget[0] < 0:  # aliases are expanded here, so `&a [*a, *a]` chains would grow exponentially
            raise RecipeError(f"{where}: the recipe expands to more than {MAX_NODES} YAML nodes",
                              "write it out without nested aliases")
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return constructor.construct_object(node, deep=True)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        return (build(root, ()) if root is not None else None), lines
    except _YAML_ERRORS as err:
        raise RecipeError(f"{where}: not valid YAML ({_first_line(err)})", "fix the YAML syntax") from None


# ----------------------------------------------------------------------------- validation

def _check_type(value: Any, hint: Any, name: str) -> Any:
    """Coerce/validate one parameter against its dataclass type hint (YAML gives ints for floats)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"
                             + (f"; {did_you_mean(str(value), [str(c) for c in choices])}" if isinstance(value, str) else ""))
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; users mean the number
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


def make_config(method: str, params: dict[str, Any]) -> MethodConfig:
    """A method's config from a params dict; raises ValueError with a message naming the key."""
    cls = METHODS.get(method).config_cls
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in known:
            raise KeyError(key, did_you_mean(str(key), known))
    checked = {k: _check_type(v, hints[k], k) for k, v in params.items()}
    return cls(**checked)


def _reject_unknown_keys(raw: dict, allowed: tuple[str, ...], place: Callable[[Any], str]) -> None:
    """A RecipeError at `place(key)` for the first key of `raw` not in `allowed`, with the nearest allowed one."""
    for key in raw:
        if key not in allowed:
            raise RecipeError(f"{place(key)}: unknown key {key!r}", did_you_mean(str(key), allowed))


def _stage(raw: Any, index: int, where: str, lines: dict[tuple, int]) -> Stage:
    def at(*path: Any) -> str:
        line = lines.get(("stages", index) + path) or lines.get(("stages", index))
        return f"{where}:{line}" if line else where

    if not isinstance(raw, dict):
        raise RecipeError(f"{at()}: stage {index} must be a mapping with a 'method' key", "see `compress recipes`")
    _reject_unknown_keys(raw, STAGE_KEYS, lambda key: f"{at(key)}: stage {index}")
    method = raw.get("method")
    if method is None:
        raise RecipeError(f"{at()}: stage {index} has no 'method'", f"choose one of: {', '.join(METHODS.names())}")
    if not isinstance(method, str) or method not in METHODS:
        raise RecipeError(f"{at('method')}: stage {index}: unknown method {method!r}", did_you_mean(str(method), METHODS.names()))
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{at('params')}: stage {index} ({method}): params must be a mapping", "write params: {key: value}")
    try:
        config = make_config(method, params)
    except KeyError as err:
        if len(err.args) != 2:  # not make_config's unknown key, but a config's own check
            raise RecipeError(f"{at('params')}: stage {index} ({method}): {err}",
                              "fix the value in the recipe") from None
        key, hint = err.args
        raise RecipeError(f"{at('params', key)}: stage {index} ({method}): unknown parameter {key!r}", hint) from None
    except (StageError, ValueError, TypeError, ArithmeticError, RecursionError) as err:
        message = str(err)
        key = next((k for k in params if message.startswith(str(k))), None)
        path = ("params", key) if key is not None else ("params",)
        raise RecipeError(f"{at(*path)}: stage {index} ({method}): {message}", "fix the value in the recipe") from None
    lists = {}
    for key in ("targets", "ignore"):
        value = raw.get(key, list(config.default_targets) if key == "targets" else [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{at(key)}: stage {index} ({method}): {key} must be a list of names or 're:' regexes",
                              f"write {key}: [mlp] or {key}: ['re:.*fc1']")
        lists[key] = value
    if config.compresses and not lists["targets"]:
        raise RecipeError(f"{at()}: stage {index} ({method}) has no targets", "add targets: [mlp] (or another group)")
    return Stage(config, lists["targets"], lists["ignore"])


def parse_recipe(text: str, where: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    raw, lines = _compose(text, where)
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with 'description' and 'stages'", "see `compress recipes`")
    _reject_unknown_keys(raw, RECIPE_KEYS, lambda key: f"{where}:{lines.get((key,), '?')}")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{where}: the recipe has no stages", "add a list under 'stages:'")
    for override in overrides or []:
        apply_override(stages, override)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise RecipeError(f"{where}:{lines.get(('description',), '?')}: description must be a string", "quote it")
    return Recipe(description, [_stage(s, i, where, lines) for i, s in enumerate(stages)], where)


def _shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, cut to `limit` characters: an error names the input, never dumps it."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def apply_override(stages: list[Any], override: str) -> None:
    """`--set N.key=value`: stage N's param `key` (or its targets/ignore/method) set to YAML `value`."""
    lhs, sep, rhs = override.partition("=")
    index, dot, key = lhs.partition(".")
    key = key.strip()
    if not sep or not dot or not re.fullmatch(r"[0-9]{1,6}", index.strip()) or not key:
        raise RecipeError(f"--set {_shown(override)} is not of the form STAGE.KEY=VALUE", "write e.g. --set 0.sparsity=0.9")
    i = int(index)
    if i >= len(stages):
        raise RecipeError(f"--set {_shown(override)}: the recipe has stages 0..{len(stages) - 1}", "name an existing stage")
    try:
        value = yaml.safe_load(rhs) if rhs.strip() else None
    except _YAML_ERRORS as err:
        raise RecipeError(f"--set {_shown(override)}: the value is not valid YAML ({_first_line(err)})",
                          "quote the value, e.g. --set '0.targets=[mlp]'") from None
    stage = stages[i]
    if not isinstance(stage, dict):
        raise RecipeError(f"--set {_shown(override)}: stage {i} is not a mapping", "fix the stage in the recipe first")
    if key in STAGE_KEYS[:3]:
        stage[key] = value
        return
    if stage.get("params") is None:
        stage["params"] = {}
    if not isinstance(stage["params"], dict):
        raise RecipeError(f"--set {_shown(override)}: the params of stage {i} are not a mapping",
                          "write params: {key: value}")
    stage["params"][key] = value


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe from a file path or a bundled recipe name."""
    path = Path(spec)
    if not path.is_file():
        bundled = BUNDLED_DIR / f"{spec}.yaml"
        if bundled.is_file():
            path = bundled
        elif path.suffix in (".yaml", ".yml") or "/" in str(spec):
            raise RecipeError(f"no such recipe file: {spec}", "check the path, or name a bundled recipe (`compress recipes`)")
        else:
            raise RecipeError(f"unknown recipe {str(spec)!r}", did_you_mean(str(spec), bundled_recipes()))
    return parse_recipe(path.read_text(), str(path), overrides)


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))
