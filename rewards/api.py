"""Reward plugin API: the `RewardFn` protocol, `@reward` registration, `per_sample`, and the name resolver.

A reward is a plain callable over a batch of rollouts that returns one `RewardResult` per rollout, in order:

    @reward("ranking_ndcg", deterministic=True)
    def ranking_ndcg(rollouts: Sequence[Rollout], *, k: int = 10) -> list[RewardResult]: ...

It may be `async def` (the service awaits it, so I/O-bound judges overlap). Keyword arguments come from the recipe's
`RewardSpec.kwargs`. A reward never handles batching, timeouts, retries or its own errors: the service
(`rewards/service.py`) and the local scorer (`rewards/local.py`) own those, and a reward that raises, returns NaN or
the wrong number of results becomes a `RewardError` naming the reward, the rollout and the cause. A reward may raise
`TransientRewardError` (or `ConnectionError`) for a failure worth retrying, e.g. a judge endpoint that is restarting.

Names resolve in this order (`resolve_reward`, the one resolver recipes, the service and the CLI use):
1. "package.module:function": imported directly (ad-hoc rewards, nothing to register);
2. built-in rewards: `@reward` in the modules of `BUILTIN_MODULES`;
3. installed plugins: entry points in the group `recforge.rewards` (`name = "package.module:function"`);
4. any other `@reward` registered in this process (a notebook, a test module).
Unknown names fail with the known names and a did-you-mean.

This module imports neither ray, vllm nor deepspeed (a test checks `sys.modules`).
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import keyword
import logging
import numbers
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from rl.types import RewardResult, Rollout

ENTRY_POINT_GROUP = "recforge.rewards"
BUILTIN_MODULES: tuple[str, ...] = ("rewards.rules", "rewards.ecpm", "rewards.negative_feedback", "rewards.gui",
                                     "rewards.semantic_judge", "rewards.agent_judge", "rewards.tags")
"""Modules whose `@reward`s are built in. They are imported on first resolution, so they must stay cheap to import
(no ray, vllm, deepspeed or model loading at import time). One that fails to import is reported by
`recforge reward list` and in unknown-name errors; the others still work."""

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class RewardError(ValueError):
    """A reward failed or could not be used. Names the reward, the rollout (when there is one) and the cause."""

    def __init__(self, reward: str, cause: str, *, rollout_id: str | None = None, hint: str = "") -> None:
        self.reward = reward
        self.cause = cause
        self.rollout_id = rollout_id
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" on rollout '{self.rollout_id}'" if self.rollout_id is not None else ""
        return f"Reward '{self.reward}' failed{where}: {self.cause}" + (f" {self.hint}" if self.hint else "")

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only fields survive pickling (Ray, multiprocessing)
        return (_rebuild_error, (type(self), self.reward, self.cause, self.rollout_id, self.hint))


def _rebuild_error(cls: type[RewardError], reward: str, cause: str, rollout_id: str | None, hint: str) -> RewardError:
    return cls(reward, cause, rollout_id=rollout_id, hint=hint)


class UnknownRewardError(RewardError):
    """No reward of that name: not an import path, not built in, not installed, not registered."""

    def _message(self) -> str:
        return f"Unknown reward '{self.reward}': {self.cause}" + (f" {self.hint}" if self.hint else "")


class TransientRewardError(Exception):
    """Raise from a reward for a failure worth retrying (a judge server restarting); retried `max_retries` times."""


@runtime_checkable
class RewardFn(Protocol):
    """A batch reward: `fn(rollouts, **kwargs)` returns (or, if async, resolves to) one RewardResult per rollout.

    Plain numbers are accepted in place of `RewardResult(score=x)`. Results must be finite and in input order.
    """

    def __call__(
        self, rollouts: Sequence[Rollout], /, **kwargs: Any
    ) -> Sequence[RewardResult | float] | Awaitable[Sequence[RewardResult | float]]: ...


@dataclass(frozen=True, kw_only=True)
class RewardDeclaration:
    """What `@reward` attaches to a function (`fn.__recforge_reward__`)."""

    name: str
    deterministic: bool


@dataclass(frozen=True, kw_only=True)
class RewardInfo:
    """A resolved reward: the callable plus what the service and `recforge reward list` need to know about it."""

    name: str
    """The name it was resolved by (registry name, entry-point name, or the import path itself)."""
    fn: RewardFn
    target: str
    """"module:qualname" that imports the same callable in another process (a Ray reward actor)."""
    source: str
    """Where it comes from, for people: "built-in (rewards.rules)", "plugin recforge-reward-x 0.1.0", ..."""
    deterministic: bool
    """Declared deterministic: results may be cached per (sample, completion)."""
    is_async: bool
    description: str
    """First line of the docstring."""


F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, RewardInfo] = {}
_builtins_loaded = False
_builtin_errors: dict[str, str] = {}
logger = logging.getLogger(__name__)


def target_of(fn: Callable[..., Any]) -> str:
    """"module:qualname" of a callable (what another process imports to get it back)."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or getattr(type(fn), "__qualname__", "?")
    return f"{module}:{qualname}"


def is_async_reward(fn: Callable[..., Any]) -> bool:
    """`async def` functions and objects whose `__call__` is `async def`."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _describe(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _info(name: str, fn: Callable[..., Any], source: str, target: str | None = None) -> RewardInfo:
    decl = getattr(fn, "__recforge_reward__", None)
    return RewardInfo(
        name=name, fn=fn, target=target or target_of(fn), source=source,
        deterministic=bool(decl.deterministic) if isinstance(decl, RewardDeclaration) else False,
        is_async=is_async_reward(fn), description=_describe(fn),
    )


def reward(name: str, *, deterministic: bool = False) -> Callable[[F], F]:
    """Register a batch reward under `name`; returns the function unchanged.

    deterministic: the same (sample, completion) always gets the same result, so the service may cache it.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ":" in name:
        raise ValueError(
            f"Reward name {name!r} is not valid: use letters, digits, '_', '-' or '.', starting with a letter "
            "(':' is reserved for 'package.module:function' paths)."
        )

    def register(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"@reward({name!r}) must decorate a function, got {type(fn).__name__}.")
        existing = _REGISTRY.get(name)
        target = target_of(fn)
        if existing is not None and existing.target != target:
            raise ValueError(
                f"Reward name '{name}' is already registered by {existing.target} ({existing.source}); "
                f"{target} cannot register it too. Pick another name."
            )
        fn.__recforge_reward__ = RewardDeclaration(name=name, deterministic=deterministic)  # type: ignore[attr-defined]
        module = target.split(":", 1)[0]
        source = f"built-in ({module})" if module in BUILTIN_MODULES else f"registered in {module}"
        _REGISTRY[name] = _info(name, fn, source, target)
        return fn

    return register


def _as_result(value: Any) -> Any:
    """A number becomes RewardResult(score=value); anything else is passed on for the result checks to judge."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return RewardResult(score=float(value))
    return value


def per_sample(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn `f(rollout, **kwargs) -> RewardResult | float` into a batch reward (an async `f` is gathered concurrently).

    Put `@reward(...)` above `@per_sample`, so the registered function is the batch one.
    """
    if isinstance(getattr(fn, "__recforge_reward__", None), RewardDeclaration):
        raise TypeError(f"{target_of(fn)}: put @reward(...) above @per_sample, not below it.")
    if is_async_reward(fn):

        @functools.wraps(fn)
        async def batch_async(rollouts: Sequence[Rollout], /, **kwargs: Any) -> list[Any]:
            return [_as_result(x) for x in await asyncio.gather(*(fn(r, **kwargs) for r in rollouts))]

        return batch_async

    @functools.wraps(fn)
    def batch(rollouts: Sequence[Rollout], /, **kwargs: Any) -> list[Any]:
        return [_as_result(fn(r, **kwargs)) for r in rollouts]

    return batch


# ---------------------------------------------------------------------------------------------------------------------
# Resolution.


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except Exception as err:  # one broken reward family must not take the others down
            _builtin_errors[module] = f"{type(err).__name__}: {err}"
            logger.warning("Built-in reward module %s failed to import (%s); its rewards are unavailable.",
                           module, _builtin_errors[module])


Plugins = Mapping[str, list[importlib.metadata.EntryPoint]]
"""Plugin entry points by name (a list: two distributions may claim one name)."""


def group_entry_points(eps: Iterable[importlib.metadata.EntryPoint]) -> dict[str, list[importlib.metadata.EntryPoint]]:
    """`eps` by name; one entry per distinct target (a distribution seen twice on sys.path is listed once)."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in eps:
        if not any(ep.value == other.value for other in found.get(ep.name, [])):
            found.setdefault(ep.name, []).append(ep)
    return found


def installed_entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Installed entry points of the group `recforge.rewards` by name (`group_entry_points`)."""
    importlib.invalidate_caches()  # a plugin pip-installed after start-up must still be found
    return group_entry_points(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _dist_label(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"plugin {dist.name} {dist.version}" if dist is not None else "plugin (unknown distribution)"


def _load_entry_point(name: str, eps: list[importlib.metadata.EntryPoint]) -> RewardInfo:
    if len(eps) > 1:
        claims = "; ".join(f"{_dist_label(ep)} → {ep.value}" for ep in eps)
        raise RewardError(name, f"several installed plugins declare this name: {claims}.",
                          hint="Uninstall one, or name the reward by its 'package.module:function' path.")
    ep = eps[0]
    try:
        fn = ep.load()
    except Exception as err:  # a broken plugin must say which one and why
        raise RewardError(name, f"installed {_dist_label(ep)} failed to import {ep.value}: "
                                f"{type(err).__name__}: {err}") from err
    if not callable(fn):
        raise RewardError(name, f"entry point {ep.value} ({_dist_label(ep)}) is a {type(fn).__name__}, "
                                "not a callable reward.")
    return _info(name, fn, f"{_dist_label(ep)} ({ep.value})", ep.value.replace(" ", ""))


def load_target(path: str) -> Callable[..., Any]:
    """Import "package.module:attr.sub" and return the attribute; errors name what is missing and suggest names."""
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise UnknownRewardError(path, "expected 'package.module:function'.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownRewardError(path, f"cannot import module '{module_name}': {err}.",
                                 hint="Is the package installed in this environment (and on the Ray workers)?") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            options = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, options, n=1, cutoff=0.6)
            hint = f"Did you mean '{close[0]}'?" if close else f"It has: {', '.join(options[:20]) or 'nothing'}."
            raise UnknownRewardError(path, f"'{getattr(obj, '__name__', module_name)}' has no attribute '{part}'.",
                                     hint=hint)
        obj = getattr(obj, part)
    if not callable(obj):
        raise UnknownRewardError(path, f"'{attr_path}' is a {type(obj).__name__}, not a callable reward.")
    return obj


def known_reward_names() -> list[str]:
    _load_builtins()
    return sorted(set(_REGISTRY) | set(installed_entry_points()))


def resolve_reward(name: str, *, plugins: Plugins | None = None) -> RewardInfo:
    """The reward a recipe's `RewardSpec.name` (or `recforge reward test <name>`) refers to; see the module doc.
    `plugins`: the entry points plugin names resolve among (None: the installed ones, `installed_entry_points()`)."""
    if ":" in name:
        fn = load_target(name)
        return _info(name, fn, "import path", name)
    _load_builtins()
    info = _REGISTRY.get(name)
    if info is not None and info.source.startswith("built-in"):
        return info
    eps = installed_entry_points() if plugins is None else plugins
    if name in eps:
        return _load_entry_point(name, eps[name])
    if info is not None:
        return info
    known = sorted(set(_REGISTRY) | set(eps))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    broken = "".join(f" Built-in module {m} failed to import: {e}." for m, e in _builtin_errors.items())
    raise UnknownRewardError(
        name, f"not built in, not an installed plugin (entry-point group '{ENTRY_POINT_GROUP}'), not registered.",
        hint=f"{hint}Known rewards: {', '.join(known) or 'none'}. "
             f"An ad-hoc reward can be named by its 'package.module:function' path.{broken}",
    )


@dataclass(frozen=True, kw_only=True)
class ListedReward:
    """One row of `recforge reward list`: a reward, or an installed plugin that failed to load."""

    name: str
    source: str
    info: RewardInfo | None
    error: str | None = None


def list_rewards(*, plugins: Plugins | None = None) -> list[ListedReward]:
    """Built-in rewards, installed plugins (each loaded, so a broken one shows its error), then other registrations.
    `plugins` as in `resolve_reward`."""
    _load_builtins()
    rows = [ListedReward(name=n, source=i.source, info=i) for n, i in sorted(_REGISTRY.items())
            if i.source.startswith("built-in")]
    rows += [ListedReward(name=f"({module})", source="built-in", info=None, error=f"failed to import: {error}")
             for module, error in _builtin_errors.items()]
    plugin_targets = set()
    for name, eps in sorted((installed_entry_points() if plugins is None else plugins).items()):
        try:
            info = _load_entry_point(name, eps)
        except RewardError as err:
            error = f"failed to load: {err.cause}"
            rows.append(ListedReward(name=name, source=_dist_label(eps[0]), info=None, error=error))
            continue
        plugin_targets.add(info.target)
        rows.append(ListedReward(name=name, source=info.source, info=info))
    for name, info in sorted(_REGISTRY.items()):
        if not info.source.startswith("built-in") and info.target not in plugin_targets:
            rows.append(ListedReward(name=name, source=info.source, info=info))
    return rows


def check_kwargs(info: RewardInfo, kwargs: dict[str, Any], *, label: str | None = None) -> None:
    """Fail now, not at the first batch, when `RewardSpec.kwargs` do not fit the reward's signature."""
    try:
        sig = inspect.signature(info.fn)
    except (TypeError, ValueError):
        return  # builtins or C callables: nothing to check
    bad = [k for k in kwargs if not k.isidentifier() or keyword.iskeyword(k)]
    try:
        if bad:
            raise TypeError(f"invalid keyword name(s) {bad}")
        sig.bind(None, **kwargs)
    except TypeError as err:
        accepted = [p.name for p in list(sig.parameters.values())[1:]
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        raise RewardError(
            label or info.name, f"kwargs {sorted(kwargs)} do not fit {info.target}{sig}: {err}.",
            hint=f"It accepts: {', '.join(accepted) or 'no keyword arguments'}.",
        ) from err
