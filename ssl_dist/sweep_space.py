"""Sweep parameters: `section.key=dist(args)` -> a Ray Tune search space, checked against the
config before Ray starts.

Pure: parsing and validation read no file and import no Ray (`search_space` imports
ray.tune to build its domains). Every value a trial can be given is checked the way the
config checks a value: an unknown key, a value of the wrong type or out of its range is the
config's own message, and a distribution that does not fit the key's type is refused here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass

from ssl_dist import config as config_lib
from ssl_dist.config import Config, ConfigError

# name -> how it is written; ranges take two numbers, the others a list of values
DISTRIBUTIONS = {"uniform": "uniform(low,high)", "loguniform": "loguniform(low,high)",
                 "randint": "randint(low,high) (low <= value < high)", "choice": "choice(a,b,...)",
                 "grid": "grid(a,b,...) (every value, in order)"}
RANGES = ("uniform", "loguniform", "randint")

# Fixed for every trial of a sweep: where and how a trial runs and is scored, not what it learns.
FIXED_SECTIONS = ("run", "eval", "storage", "track")
FIXED_KEYS = ("train.max_steps",)  # ASHA's time axis

KINDS = {int: "a whole-number key", float: "a real-number key", str: "a text key", bool: "a true/false key"}

PARAM_RE = re.compile(r"\s*([A-Za-z_][\w.]*)\s*=\s*([A-Za-z_]\w*)\s*\((.*)\)\s*")


@dataclass(frozen=True)
class Param:
    """One swept key: its distribution and, for a range, (low, high); for choice and grid, the
    candidate values, already of the key's type."""

    key: str
    dist: str
    values: tuple
    text: str


def parse_params(items: list[str] | tuple[str, ...], base: Config) -> list[Param]:
    """Every `--param`, checked against `base` (the sweep's config); a ConfigError naming the
    parameter and the fix at the first bad one."""
    if not items:
        raise ConfigError("a sweep needs at least one --param, e.g. --param optim.lr=loguniform(1e-4,1e-2)")
    params, seen = [], set()
    for item in items:
        param = parse_param(item, base)
        if param.key in seen:
            raise ConfigError(f"--param {param.key} is given twice: give each key one distribution")
        seen.add(param.key)
        params.append(param)
    return params


def parse_param(text: str, base: Config) -> Param:
    """One `section.key=dist(args)`, checked against `base`."""
    match = PARAM_RE.fullmatch(text)
    if match is None:
        raise ConfigError(f"--param {text!r} is not of the form section.key=dist(args), e.g. "
                          f"optim.lr=loguniform(1e-4,1e-2) (a fixed value is an override: section.key=value)")
    key, dist, inner = match.groups()
    where = f"--param {text}"
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {dist!r}; allowed: {', '.join(DISTRIBUTIONS.values())}")
    args = [a.strip() for a in inner.split(",")]
    if any(not a for a in args):
        raise ConfigError(f"{where}: an empty value; write {DISTRIBUTIONS[dist]}")
    hint = _hint(base, key)
    if hint is None:  # not a key of the config: the config's own message, with its allowed keys
        _merged(base, key, args[0], where)
        raise ConfigError(f"{where}: {key} is not a config key")  # not reached: merge names it
    if key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS:
        raise ConfigError(f"{where}: {key} is the same for every trial of a sweep (where and how a trial runs and "
                          f"is scored): set it in --config or as an override, and sweep what the model learns")
    if dist in RANGES:
        return Param(key, dist, _range(dist, args, key, hint, base, where), text)
    values = tuple(_merged(base, key, raw, where).get(key) for raw in args)
    return Param(key, dist, values, text)


def _hint(base: Config, key: str):
    """The declared type of `section.key`, or None when the config has no such key."""
    section, _, leaf = key.partition(".")
    sub = getattr(base, section, None)
    if not dataclasses.is_dataclass(sub) or not leaf or "." in leaf:
        return None
    return typing.get_type_hints(type(sub)).get(leaf)


def _merged(base: Config, key: str, raw: str, where: str) -> Config:
    """`base` with `key` set to `raw` (parsed as an override value is), validated: the config's
    message for an unknown key, a wrong type or a value out of range."""
    cfg = config_lib.merge(base, config_lib.parse_overrides([f"{key}={raw}"]), origin=where)
    cfg.validate()
    return cfg


def _range(dist: str, args: list[str], key: str, hint, base: Config, where: str) -> tuple:
    """(low, high) of uniform / loguniform (a float key) or randint (an int key), each end a
    value the config accepts."""
    if len(args) != 2:
        raise ConfigError(f"{where}: {dist} takes two numbers, low and high: {DISTRIBUTIONS[dist]}")
    wanted = int if dist == "randint" else float
    if hint is not wanted:
        kind = KINDS.get(hint, "a key with a set of allowed values")
        fit = {int: "randint(low,high) or choice(a,b,...)",
               float: "uniform(low,high), loguniform(low,high) or choice(a,b,...)"}.get(hint, "choice(a,b,...)")
        raise ConfigError(f"{where}: {key} is {kind}, and {dist} draws {'whole' if wanted is int else 'real'} "
                          f"numbers: use {fit}")
    low, high = (_number(a, wanted, where) for a in args)
    if low >= high:
        raise ConfigError(f"{where}: low ({args[0]}) must be below high ({args[1]})")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low (it draws log(value) uniformly); use uniform for a "
                          f"range that reaches 0 or below")
    for end in (low, high - 1 if dist == "randint" else high):  # randint's high itself is never drawn
        _merged(base, key, repr(end), where)
    return low, high


def _number(raw: str, kind: type, where: str):
    """`raw` as a finite float, or an int for randint."""
    try:
        value = kind(raw) if kind is int else float(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{where}: {raw!r} is not {what}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {raw!r} is not a finite number")
    return value


def search_space(params: list[Param]) -> dict:
    """{dotted key: Ray Tune domain} for `Tuner(param_space=...)`; grid values are searched
    in the order given, `--samples` times over."""
    from ray import tune

    build = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
             "randint": lambda v: tune.randint(*v), "choice": lambda v: tune.choice(list(v)),
             "grid": lambda v: tune.grid_search(list(v))}
    return {p.key: build[p.dist](p.values) for p in params}


def apply(base: Config, sampled: dict, *, run_name: str) -> Config:
    """`base` with one trial's sampled values (`{dotted key: value}`, numpy scalars as Tune
    draws them) and its run name, validated."""
    updates: dict = {"run": {"name": run_name}}
    for key, value in sampled.items():
        section, leaf = key.split(".")
        updates.setdefault(section, {})[leaf] = value.item() if hasattr(value, "item") else value
    cfg = config_lib.merge(base, updates, origin="sweep trial")
    cfg.validate()
    return cfg


def describe(sampled: dict) -> str:
    """A trial's values, short: `optim.lr=0.00123 loss.temperature=0.2`."""
    def short(value):
        value = value.item() if hasattr(value, "item") else value
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return " ".join(f"{key}={short(value)}" for key, value in sorted(sampled.items()))
