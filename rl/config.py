"""The run configuration: one tree of frozen, keyword-only dataclasses; YAML is its saved form.

Load with `load_config(path_or_dict, overrides=["rollout.temperature=0.8", ...])`. Every key is checked: unknown keys
fail with a did-you-mean, wrong types and out-of-range values fail with the key and the fix, and nothing is rewritten
silently. `save_config` writes the resolved tree back to YAML next to a run's outputs.

This module imports neither ray, vllm nor deepspeed (a test checks `sys.modules`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rl.config_sections import (  # noqa: F401 - re-exported: `from rl.config import RolloutConfig` keeps working
    AlgorithmConfig,
    ClusterConfig,
    CurriculumConfig,
    DataConfig,
    GuiConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    RewardConfig,
    RewardSpec,
    RolloutConfig,
    RunConfig,
    SFTConfig,
    StageConfig,
)


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` is a string; resolve it as the float everyone means (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range. The message names the key and the fix."""


@dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    gui: GuiConfig = field(default_factory=GuiConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


# ---------------------------------------------------------------------------------------------------------------------
# Building a config from plain data, with checks.


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    close = close or [o for o in options if o.startswith(word) or word.startswith(o)][:1]
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(options))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` and return it (dataclasses built recursively); never rewrites."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} matches none of {_type_name(tp)}.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint = _did_you_mean(str(value), [str(a) for a in args]) if isinstance(value, str) else ""
            raise ConfigError(f"{key}={value!r} is not one of {choices}.{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}.")
        return [_coerce(f"{key}.{i}", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # 1 → 1.0 is exact, not a rewrite
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}.")
    if not isinstance(value, tp):
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}.")
    return value


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None or "lo" not in meta:
        return
    lo, hi, lo_open = meta["lo"], meta["hi"], meta["lo_open"]
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value} is out of range: it must be {'>' if lo_open else '>='} {lo}.")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value} is out of range: it must be <= {hi}.")


def build(cls: type, data: Any, *, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key, type and range."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"Unknown key '{full}'.{_did_you_mean(str(key), list(fields))}")
        kwargs[key] = _coerce(full, value, hints[key])
        _check_range(full, kwargs[key], fields[key].metadata)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where} is missing required key(s): {', '.join(missing)}.")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Cross-field checks that a single field's range cannot express."""
    from rl.advantages import ADVANTAGE_ESTIMATORS, LEVEL_ESTIMATORS, REWARD_PAIR_ESTIMATORS  # the tables
    from rl.losses import AGGREGATIONS

    known = [*ADVANTAGE_ESTIMATORS, *REWARD_PAIR_ESTIMATORS, *LEVEL_ESTIMATORS]
    if cfg.algorithm.advantage not in known:
        raise ConfigError(
            f"algorithm.advantage='{cfg.algorithm.advantage}' is not a known estimator."
            f"{_did_you_mean(cfg.algorithm.advantage, known)}"
        )
    if cfg.algorithm.advantage in REWARD_PAIR_ESTIMATORS:
        _validate_reward_pair(cfg)
    if cfg.algorithm.advantage in LEVEL_ESTIMATORS:
        _validate_level_estimator(cfg)
    if cfg.algorithm.aggregation not in AGGREGATIONS:
        raise ConfigError(
            f"algorithm.aggregation='{cfg.algorithm.aggregation}' is not a known aggregation."
            f"{_did_you_mean(cfg.algorithm.aggregation, list(AGGREGATIONS))}"
        )
    if cfg.rollout.num_samples_per_prompt < 2:
        raise ConfigError(
            f"rollout.num_samples_per_prompt={cfg.rollout.num_samples_per_prompt}, but group-relative advantages need "
            "at least 2 samples per prompt (a group of one always gets advantage 0). "
            "Set rollout.num_samples_per_prompt >= 2."
        )
    if not cfg.reward.rewards:
        raise ConfigError("reward.rewards is empty: a run needs at least one reward. Add e.g. `- name: format`.")
    if cfg.algorithm.dual_clip is not None and cfg.algorithm.dual_clip <= 1.0:
        raise ConfigError(f"algorithm.dual_clip={cfg.algorithm.dual_clip} must be > 1 (or null to turn it off).")
    nccl_broadcast = cfg.cluster.weight_sync == "nccl" or (cfg.cluster.weight_sync == "broadcast"
                                                           and cfg.cluster.weight_sync_backend == "nccl")
    if nccl_broadcast and cfg.cluster.colocate:
        raise ConfigError(
            f"cluster.weight_sync='{cfg.cluster.weight_sync}' broadcasts over NCCL between separate devices, but "
            "cluster.colocate=true shares one. Use cluster.weight_sync=path when colocated (or "
            "weight_sync=broadcast with weight_sync_backend=gloo on CPU)."
        )
    bad_k = [k for k in cfg.data.eval_k if k < 1]
    if bad_k or not cfg.data.eval_k:
        raise ConfigError(f"data.eval_k={cfg.data.eval_k}: ranking cutoffs must be a non-empty list of K >= 1.")
    _validate_curriculum(cfg)
    return cfg


def _validate_reward_pair(cfg: Config) -> None:
    names = [spec.alias or spec.name for spec in cfg.reward.rewards]
    algo = cfg.algorithm
    for key, value in (("business_reward", algo.business_reward), ("semantic_reward", algo.semantic_reward)):
        if value not in names:
            raise ConfigError(f"algorithm.{key}='{value}', but reward.rewards has no reward of that name or alias "
                              f"(it has: {', '.join(names)}). algorithm.advantage='{algo.advantage}' fuses two "
                              f"rewards kept apart; name them.{_did_you_mean(value, names)}")
    if algo.business_reward == algo.semantic_reward:
        raise ConfigError(f"algorithm.business_reward and algorithm.semantic_reward are both '{algo.business_reward}'; "
                          f"'{algo.advantage}' needs two different rewards.")


def _validate_level_estimator(cfg: Config) -> None:
    """HEPO: the business reward exists, and the knobs its loss (rl.losses.hepo_loss) does not have are off."""
    algo = cfg.algorithm
    names = [spec.alias or spec.name for spec in cfg.reward.rewards]
    if algo.business_reward not in names:
        raise ConfigError(f"algorithm.business_reward='{algo.business_reward}', but reward.rewards has no reward of "
                          f"that name or alias (it has: {', '.join(names)}). algorithm.advantage='{algo.advantage}' "
                          "gives it to the last semantic-ID level; name it."
                          f"{_did_you_mean(algo.business_reward, names)}")
    unsupported = {"kl_coef": algo.kl_coef or None, "entropy_coef": algo.entropy_coef or None,
                   "tis_cap": algo.tis_cap, "dual_clip": algo.dual_clip}
    set_keys = [f"algorithm.{key}={value}" for key, value in unsupported.items() if value is not None]
    if set_keys:
        raise ConfigError(f"{', '.join(set_keys)}: algorithm.advantage='{algo.advantage}' trains with the per-level "
                          "HEPO loss (clipped policy loss per semantic-ID level + value loss), which has no KL, "
                          "entropy, truncated-IS or dual-clip term. Set kl_coef=0, entropy_coef=0, tis_cap=null, "
                          "dual_clip=null.")
    for key in ("hepo_alpha", "hepo_level_weights"):
        if not getattr(algo, key):
            raise ConfigError(f"algorithm.{key} is empty; give one value per level or a single value for all.")


def _validate_curriculum(cfg: Config) -> None:
    from rl.curriculum import ProgressiveSchedule, schedule_from_config  # local: the schedule lives with the loop

    stages = cfg.curriculum.stages
    if not stages:
        return
    try:
        schedule: ProgressiveSchedule = schedule_from_config(cfg.curriculum, default_kl=cfg.algorithm.kl_coef)
    except ValueError as err:
        raise ConfigError(f"curriculum.stages: {err}") from err
    total = schedule.total_steps
    if total is not None and total < cfg.run.num_steps:
        raise ConfigError(
            f"curriculum.stages budget {total} steps ({', '.join(f'{s.name}={s.num_steps}' for s in stages)}) is "
            f"shorter than run.num_steps={cfg.run.num_steps}. Lengthen a stage, or give the last stage "
            "num_steps: null to run until training ends.")
    for i, stage in enumerate(stages):
        if stage.kl_coef and cfg.algorithm.kl_coef == 0:
            raise ConfigError(
                f"curriculum.stages.{i}.kl_coef={stage.kl_coef}, but algorithm.kl_coef=0 loads no reference model, "
                "so there is nothing to take the KL to. Set algorithm.kl_coef > 0 (the default β of stages that "
                "give none).")


# ---------------------------------------------------------------------------------------------------------------------
# YAML, overrides, saving.


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.sub=value (e.g. rollout.temperature=0.8).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override '{text}' has an empty key.")
    return key.split("."), yaml_load(raw) if raw.strip() else ""


def _set_path(data: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"Override '{full}': '{part}' is not a valid index into a list of {len(node)}.")
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"Override '{full}': '{'.'.join(path[: i + 1])}' is a value, not a section.")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"Override '{full}': '{last}' is not a valid index into a list of {len(node)}.")
        node[int(last)] = value
    else:
        node[last] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain data (the YAML form)."""
    return dataclasses.asdict(cfg)


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Load a config from a YAML path (or a dict), apply `a.b=value` overrides, build and validate it.

    Overrides apply on top of the full default tree, so any key can be overridden even if the YAML omits it.
    """
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        try:
            data = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    try:
        base = to_dict(build(Config, data))
    except ConfigError as err:
        where = f" (in {source})" if not isinstance(source, dict) and source is not None else ""
        raise ConfigError(f"{err}{where}") from err
    for text in overrides:
        path_parts, value = _parse_override(text)
        _check_override_key(path_parts, text)
        _set_path(base, path_parts, value, text)
    return validate(build(Config, base))


def _check_override_key(parts: list[str], text: str) -> None:
    """Unknown override keys fail before anything is set, with a did-you-mean on the wrong segment."""
    cls: Any = Config
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            continue
        if not dataclasses.is_dataclass(cls):
            return
        hints = typing.get_type_hints(cls)
        if part not in hints:
            prefix = ".".join(parts[:i])
            where = f"'{prefix}.{part}'" if prefix else f"'{part}'"
            raise ConfigError(f"Unknown key {where} in override '{text}'.{_did_you_mean(part, list(hints))}")
        tp = hints[part]
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        cls = tp


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_config_path(recipe: str, name_or_path: str, recipes_dir: Path | None = None) -> Path:
    """`debug` → recipes/<recipe>/debug.yaml; an existing path is used as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"Config file {candidate} does not exist.")
        return candidate
    base = recipes_dir or Path(__file__).resolve().parent.parent / "recipes"
    path = base / recipe / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (base / recipe).glob("*.yaml"))
        raise ConfigError(
            f"Recipe '{recipe}' has no config '{name_or_path}' ({path} not found). Known: {', '.join(known) or 'none'}."
        )
    return path
