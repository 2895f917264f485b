"""The trainer's one YAML config: dataclasses, validation, dotted command-line overrides.

Everything that can be checked without a model is checked here, before any weights load or any
rank starts: unknown keys (with a suggestion), choices, and the batch arithmetic, so a typo costs
a second and not a GPU allocation. `lightspan train` validates before it calls the launcher.

    store: http://collector:8123
    selection: {service: support-bot, agents: [solver], min_group_size: 4}
    model: {path: ./Qwen2.5-0.5B-Instruct, gradient_checkpointing: true}
    algorithm: {name: grpo, credit: step, kl_coef: 0.01}
    optim: {lr: 1.0e-6}
    deepspeed: {zero_optimization: {stage: 2}}   # or the path of a DeepSpeed JSON
    schedule: {epochs: 1, micro_batch_size: 4, global_batch_size: 64}
    output: {dir: ./checkpoints, save_every: 50, resource_name: policy}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lightspan.algorithms.advantages import EPISODE_GROUP_BY
from lightspan.errors import InvalidInput

Algorithm = Literal["grpo", "rloo", "reinforce_pp", "gigpo", "decomposed", "sft"]


@dataclass
class SelectionConfig:
    """Which rollouts train: filters of `Store.rollouts`, plus group completeness and failures."""

    service: str | None = None
    agents: list[str] | None = None  # names or full-match regexes of the trained agents
    since: datetime | None = None
    until: datetime | None = None
    resources_id: str | None = None
    min_group_size: int = 1  # tasks with fewer rollouts are incomplete groups and wait
    failed: Literal["keep", "drop"] = "keep"
    failed_reward: float | None = 0.0  # reward of a failed rollout when kept (None: as recorded)
    limit: int | None = None  # newest N rollouts per rank, None for all
    # A SQL condition over each rollout's columns (store.ROLLOUT_COLUMNS), e.g. "Reward >= 1":
    # the same language as `lightspan export --where`.
    where: str | None = None

    def store_filters(self) -> dict[str, Any]:
        """The filters of `Store.rollouts` / `iter_rollouts` this selection sets (one agent name is
        matched in SQL; several, or a regex, are applied by `algorithms` when transitions are built)."""
        agents = self.agents
        return {
            "service": self.service,
            "since": self.since,
            "until": self.until,
            "resources_id": self.resources_id,
            "agent": agents[0] if agents and len(agents) == 1 and _plain_name(agents[0]) else None,
            "where": self.where,
        }


def _plain_name(name: str) -> bool:
    """A name SQL can match exactly (a regex selector is applied by `algorithms` instead)."""
    return name.replace("_", "").replace("-", "").replace(".", "").isalnum()


@dataclass
class LoraConfig:
    """PEFT LoRA adapters; checkpoints hold the merged weights so servers load plain folders."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelConfig:
    path: str = ""  # a Hugging Face causal LM folder (or hub id already in the local cache)
    tokenizer: str | None = None  # defaults to `path`
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    max_length: int = 4096  # longer transitions have their response cut; prompts longer are skipped
    trust_remote_code: bool = False
    attn_implementation: str | None = None


@dataclass
class AlgorithmConfig:
    """Credit assignment, advantages and the loss (all from `lightspan.algorithms`)."""

    name: Algorithm = "grpo"
    credit: Literal["identical", "discounted", "step"] = "step"
    gamma: float = 1.0
    group_by: Literal["task", "task_step", "state", "batch"] = "task"
    scale: Literal["group", "batch", "none"] = "group"  # GRPO and GiGPO advantage scaling
    step_weight: float = 1.0  # gigpo and decomposed: the weight of the step term (gigpo's omega)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # verl's clip_ratio_c (e.g. 3): bounds the loss of negative advantages
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    reference: str | None = None  # frozen reference for KL; defaults to model.path when kl_coef > 0
    aggregation: Literal["token", "sequence", "rollout"] = "token"
    # Calls whose recorded prompt extends the previous call's prompt + response train as one
    # sequence, the tokens in between masked (see lightspan.algorithms.turns).
    merge_turns: bool = True
    temperature: float = 1.0  # the sampling temperature, so ratios against engine logprobs are exact
    sft_min_return: float = 0.0  # sft trains on transitions whose credited return exceeds this


@dataclass
class OptimConfig:
    """A torch AdamW handed to DeepSpeed (no compiled ops), unless the DeepSpeed config names one."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """Batches count transitions (LLM calls). global = micro x accumulation x world size."""

    steps: int | None = None  # stop after this many optimiser steps (None: run all epochs)
    epochs: int = 1
    micro_batch_size: int = 4
    global_batch_size: int = 32
    seed: int = 0


@dataclass
class OutputConfig:
    dir: str = "./checkpoints"
    save_every: int = 0  # optimiser steps between checkpoints; 0 saves only at the end
    resource_name: str = "policy"
    keep_optimizer_state: int = 2  # newest checkpoints that keep their DeepSpeed state (for --resume)


@dataclass
class FollowConfig:
    """`--follow`, the closed loop's trainer: wait for data of the serving version, train, publish, repeat.

    Each iteration waits until `min_groups` complete task groups (of `selection.min_group_size`
    rollouts whose root span has landed) were produced by the latest published version, or by up
    to `max_staleness` versions before it (off-policy: the importance ratio then uses the
    logprobs the engine recorded), trains `steps_per_iteration` optimiser steps (default: the
    schedule's epochs over that data) and publishes the next version.
    """

    min_groups: int = 1
    max_staleness: int = 0
    steps_per_iteration: int | None = None
    poll_seconds: float = 1.0
    iterations: int | None = None  # versions to publish before exiting (None: until stopped)
    wait_timeout: float | None = None  # seconds to wait for one iteration's data (None: forever)
    # Seconds a rollout must be quiet (no span newer) before it trains: late rewards, such as user
    # feedback sent minutes after the answer, join their rollout within this grace period.
    grace_seconds: float = 0.0


@dataclass
class GateConfig:
    """Follow mode's promotion gate (`lightspan.store.gate`): each new version gets traffic only
    if the mean reward of its validation rollouts (`service`, run with `model="NAME:VERSION"`) is
    no worse than the incumbent's by more than `margin`; else the incumbent keeps the traffic and
    the decision, with its numbers, is recorded in `train_metrics` (run `NAME/gate`)."""

    margin: float = 0.0
    service: str = ""  # the service name the validation runners trace under (required)
    min_rollouts: int = 1  # validation rollouts of the candidate to wait for
    timeout: float | None = None  # seconds to wait for them (None: forever); then it is kept out


@dataclass
class TrainConfig:
    store: str | None = None  # store URL; None: LIGHTSPAN_STORE or ./lightspan-data
    run: str | None = None  # run id in train_metrics; default <resource_name>-<UTC time>
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: dict[str, Any] | str = field(default_factory=dict)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    follow: FollowConfig = field(default_factory=FollowConfig)
    gate: GateConfig | None = None  # follow mode only; None: every new version gets the traffic

    # --- derived ------------------------------------------------------------------------------
    def deepspeed_dict(self) -> dict[str, Any]:
        """The DeepSpeed section as a dict (reading the JSON file when a path was given)."""
        if isinstance(self.deepspeed, dict):
            return json.loads(json.dumps(self.deepspeed))
        path = Path(self.deepspeed)
        try:
            loaded = json.loads(path.read_text())
        except OSError as error:
            raise InvalidInput(f"deepspeed: cannot read {path}: {error.strerror}") from None
        except ValueError as error:
            raise InvalidInput(f"deepspeed: {path} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise InvalidInput(f"deepspeed: {path} must hold a JSON object")
        return loaded

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed_dict().get("zero_optimization", {}).get("stage", 0))

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimiser step on each rank; raises when the numbers do not divide."""
        s = self.schedule
        per_step = s.micro_batch_size * world_size
        if s.global_batch_size % per_step:
            lower = max(per_step, s.global_batch_size // per_step * per_step)
            raise InvalidInput(
                f"schedule.global_batch_size={s.global_batch_size} is not a multiple of "
                f"micro_batch_size x world size = {s.micro_batch_size} x {world_size} = {per_step}; "
                f"set schedule.global_batch_size={lower} or {lower + per_step}, or change micro_batch_size"
            )
        return s.global_batch_size // per_step

    def validate(self, world_size: int | None = None) -> TrainConfig:
        """Checks that need no model; with `world_size`, the batch arithmetic too."""
        s, a, o, m = self.schedule, self.algorithm, self.output, self.model
        if not m.path:
            raise InvalidInput("model.path is required: a Hugging Face causal LM folder")
        for name, value in (
            ("schedule.micro_batch_size", s.micro_batch_size),
            ("schedule.global_batch_size", s.global_batch_size),
            ("schedule.epochs", s.epochs),
            ("selection.min_group_size", self.selection.min_group_size),
            ("model.max_length", m.max_length),
        ):
            if value < 1:
                raise InvalidInput(f"{name} must be at least 1, got {value}")
        if s.steps is not None and s.steps < 1:
            raise InvalidInput(f"schedule.steps must be at least 1 (or null for all epochs), got {s.steps}")
        if s.global_batch_size < s.micro_batch_size:
            raise InvalidInput(
                f"schedule.global_batch_size={s.global_batch_size} is smaller than micro_batch_size="
                f"{s.micro_batch_size}; raise global_batch_size to a multiple of micro_batch_size x ranks"
            )
        f = self.follow
        if f.min_groups < 1 or f.max_staleness < 0 or f.poll_seconds <= 0 or f.grace_seconds < 0:
            raise InvalidInput(
                "follow.min_groups must be >= 1, follow.max_staleness >= 0, follow.poll_seconds > 0, "
                "follow.grace_seconds >= 0"
            )
        if (f.steps_per_iteration is not None and f.steps_per_iteration < 1) or (
            f.iterations is not None and f.iterations < 1
        ):
            raise InvalidInput("follow.steps_per_iteration and follow.iterations must be >= 1 (or null)")
        g = self.gate
        if g is not None and not g.service:
            raise InvalidInput(
                "gate.service is required: the service the validation rollouts are traced under"
            )
        if g is not None and (
            g.margin < 0 or g.min_rollouts < 1 or (g.timeout is not None and g.timeout <= 0)
        ):
            raise InvalidInput(
                "gate.margin must be >= 0, gate.min_rollouts >= 1 and gate.timeout > 0 (or null)"
            )
        if o.save_every < 0 or o.keep_optimizer_state < 1:
            raise InvalidInput("output.save_every must be >= 0 and output.keep_optimizer_state >= 1")
        if not 0.0 <= a.gamma <= 1.0:
            raise InvalidInput(f"algorithm.gamma must be in [0, 1], got {a.gamma}")
        if a.step_weight < 0:
            raise InvalidInput(f"algorithm.step_weight must be >= 0, got {a.step_weight}")
        if a.name == "gigpo" and a.group_by not in EPISODE_GROUP_BY:
            raise InvalidInput(
                f"algorithm.group_by must be {' or '.join(EPISODE_GROUP_BY)} with gigpo (its episode "
                f"groups; calls are grouped by anchor state), got {a.group_by!r}"
            )
        if a.clip_low < 0 or a.clip_high < 0 or a.kl_coef < 0 or a.temperature <= 0:
            raise InvalidInput("algorithm.clip_low/clip_high/kl_coef must be >= 0 and temperature > 0")
        if a.dual_clip is not None and a.dual_clip <= 1.0:
            raise InvalidInput(
                f"algorithm.dual_clip must be > 1 (verl's clip_ratio_c, e.g. 3), got {a.dual_clip}"
            )
        if self.optim.lr <= 0 or len(self.optim.betas) != 2:
            raise InvalidInput("optim.lr must be > 0 and optim.betas a pair like [0.9, 0.999]")
        ds = self.deepspeed_dict()
        stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        if stage not in (0, 1, 2, 3):
            raise InvalidInput(f"deepspeed.zero_optimization.stage must be 0-3, got {stage}")
        if m.lora is not None and stage == 3:
            raise InvalidInput(
                "model.lora with ZeRO stage 3 is not supported; use zero_optimization.stage <= 2"
            )
        self._check_deepspeed_batches(ds, world_size)
        if world_size is not None:
            self.accumulation_steps(world_size)
        return self

    def _check_deepspeed_batches(self, ds: Mapping[str, Any], world_size: int | None) -> None:
        """Batch sizes belong to `schedule`; a DeepSpeed file that says otherwise is a conflict."""
        s = self.schedule
        expected = {
            "train_micro_batch_size_per_gpu": s.micro_batch_size,
            "train_batch_size": s.global_batch_size,
        }
        if world_size is not None:
            expected["gradient_accumulation_steps"] = self.accumulation_steps(world_size)
        for key, value in expected.items():
            given = ds.get(key)
            if given is not None and given != "auto" and int(given) != value:
                raise InvalidInput(
                    f"deepspeed.{key}={given} contradicts schedule (which gives {value}); remove it from the "
                    'DeepSpeed config or set it to "auto": batch sizes are set in the schedule section'
                )


# --- loading ---------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read the YAML file (if any), apply `key.sub=value` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise InvalidInput(f"cannot read config {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise InvalidInput(f"config {path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InvalidInput(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw).validate()


def apply_override(raw: dict[str, Any], override: str) -> None:
    """`optim.lr=1e-5` sets raw["optim"]["lr"]; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise InvalidInput(f"override {override!r} must look like section.key=value, e.g. optim.lr=1e-5")
    value = yaml.safe_load(text) if text.strip() else ""
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise InvalidInput(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    return _build(TrainConfig, raw, "")


def to_dict(config: Any) -> Any:
    """A plain, YAML/JSON-serialisable copy (datetimes as ISO text)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    if isinstance(config, datetime):
        return config.isoformat()
    return config


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"; did you mean {_join(where, close[0])!r}?"
                if close
                else f"; known keys: {', '.join(names)}"
            )
            raise InvalidInput(f"unknown config key {_join(where, str(key))!r}{hint}")
        values[key] = _coerce(hints[key], value, _join(where, key))
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except InvalidInput as error:
                errors.append(str(error))
        raise InvalidInput(errors[-1] if len(errors) == 1 else f"{where}: {value!r} fits none of its types")
    if origin is Literal:
        if value not in args:
            raise InvalidInput(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, where)
    if origin is list:
        if not isinstance(value, list):
            raise InvalidInput(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidInput(f"{where} must be a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidInput(f"{where} must be a string, got {value!r}")
        return value
    if hint is datetime:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.fromisoformat(str(value))
        except ValueError:
            raise InvalidInput(
                f"{where} must be an ISO date-time like 2025-01-31T12:00:00, got {value!r}"
            ) from None
    raise InvalidInput(f"{where}: unsupported type {hint!r}")  # a bug in the dataclasses above
