"""Training configuration: the one schema shared by final training, the search space and checkpoints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tune_agb.errors import TuneAgbError

# Allowed values of the categorical hyperparameters (validated on load).
CHOICES: dict[str, tuple[str, ...]] = {
    "upsampling": ("bilinear", "transpose"),
    "norm": ("batch", "group", "instance", "none"),
    "loss": ("gaussian_nll", "laplacian_nll", "mse", "mae"),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "cosine", "onecycle", "cyclic", "wsd"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "data_mode": ("auto", "resident", "stream"),
    # torch.compile of the training forward: none, fused (only BatchNorm + ReLU and upsampling + concatenation
    # compiled, tune_agb.engine.fused), or one of torch's modes for the whole model (reduce-overhead adds CUDA graphs).
    "compile": ("none", "fused", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"),
}

# Other names accepted for a loss (the original training script's ``--loss_key`` values), by canonical name.
LOSS_ALIASES: dict[str, str] = {
    "gaussian": "gaussian_nll",
    "gaussiannll": "gaussian_nll",
    "nll": "gaussian_nll",
    "laplacian": "laplacian_nll",
    "laplace": "laplacian_nll",
    "laplaciannll": "laplacian_nll",
    "l2": "mse",
    "l1": "mae",
}


# Keys removed in tune_agb 0.2 because the screens in bench/RESULTS.md measured no gain from them, each with the value
# at which it changed nothing (the model and its training were then exactly those of today's engine). A config file or
# checkpoint that holds one at that value loads as before, without it; any other value is refused.
REMOVED_KEYS: dict[str, Any] = {
    "nll_beta": 0.0,
    "aug_gain": 0.0,
    "aug_offset": 0.0,
    "band_dropout": 0.0,
    "ema_decay": 0.0,
    "texture_windows": "",
}


def drop_removed_keys(values: dict[str, Any], source: str, what: str = "config") -> dict[str, Any]:
    """``values`` without the :data:`REMOVED_KEYS` it holds at their neutral value.

    Args:
        values: hyperparameters as read (a config file's, or a checkpoint's ``config``).
        source: names the file in the error.
        what: ``config`` or ``checkpoint``, for the error.

    Raises:
        TuneAgbError: one line naming the first removed key set to anything but its neutral value.
    """
    for key, neutral in REMOVED_KEYS.items():
        if key in values and not _is_neutral(values[key], neutral):
            raise TuneAgbError(
                f"{source}: '{key}' was removed in tune_agb 0.2 (measured no gain, see bench/RESULTS.md); this {what} "
                f"uses {key}={values[key]!r} (only {neutral!r} still loads) and cannot be loaded"
            )
    return {k: v for k, v in values.items() if k not in REMOVED_KEYS}


def _is_neutral(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, str):
        return isinstance(value, str) and value.strip() == neutral
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral


def loss_name(name: str) -> str | None:
    """The canonical loss (a ``CHOICES['loss']`` value) for a loss name or alias (any case, ``-`` or ``_``);
    None when there is none."""
    key = name.lower().replace("-", "_")
    return key if key in CHOICES["loss"] else LOSS_ALIASES.get(key)


@dataclass
class TrainConfig:
    """Every hyperparameter of one training run. Field names are the names used in YAML and search spaces."""

    # model
    in_channels: int = 14
    base_channels: int = 32
    depth: int = 4
    upsampling: str = "bilinear"
    dropout: float = 0.0
    norm: str = "batch"
    logvar_min: float = -10.0
    logvar_max: float = 10.0
    # loss / target
    loss: str = "gaussian_nll"
    standardize_target: bool = True
    # optimisation
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "onecycle"
    cyclic_step_epochs: int = 2
    epochs: int = 40
    # Batches per reported epoch (0: one pass over the train tiles). Batches are drawn without replacement across
    # epochs: every tile is seen once per pass, and a pass may span epochs.
    steps_per_epoch: int = 0
    batch_size: int = 8
    grad_clip: float = 1.0
    # Start from another run's weights instead of a random initialisation ("" = random): a tune_agb checkpoint (a
    # final model's best.pt, e.g. trained on another region). Every tensor must match this architecture.
    # Stored as an absolute path; ignored when resuming (the checkpoint holds the weights).
    init_weights: str = ""
    # execution
    amp: str = "auto"
    channels_last: bool = True
    augment: bool = True
    # How tiles reach the device: auto (CUDA: resident when they fit the trial's share, else streamed; CPU: streamed
    # from the store's memory map), resident, stream.
    data_mode: str = "auto"
    # torch.compile of the model for training steps (compiled once per process; costs tens of seconds up front, so
    # short search trials may not earn it back): none, fused (the memory-bound layers only; norm=batch), default,
    # reduce-overhead, max-autotune-no-cudagraphs, max-autotune.
    compile: str = "none"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return config_from_dict({**self.to_dict(), **changes})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def field_types() -> dict[str, type]:
    return {f.name: type(getattr(TrainConfig(), f.name)) for f in dataclasses.fields(TrainConfig)}


def coerce_value(name: str, value: Any, source: str = "config") -> Any:
    """Check one hyperparameter's type and allowed values; return it with ints widened to float where needed."""
    types = field_types()
    if name == "init_weights":  # a path: kept as written (case included), made absolute for Ray's trial folders
        if not isinstance(value, str):
            raise TuneAgbError(f"{source}: 'init_weights' must be a checkpoint path or \"\", got {value!r}")
        return str(Path(value.strip()).expanduser().absolute()) if value.strip() else ""
    if name not in types:
        raise TuneAgbError(f"{source}: unknown key '{name}'; valid keys: {', '.join(field_names())}")
    want = types[name]
    if want is bool:
        if not isinstance(value, bool):
            raise TuneAgbError(f"{source}: '{name}' must be true or false, got {value!r}")
    elif want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TuneAgbError(f"{source}: '{name}' must be an integer, got {value!r}")
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TuneAgbError(f"{source}: '{name}' must be a number, got {value!r}")
        value = float(value)
    elif want is str:
        if not isinstance(value, str):
            raise TuneAgbError(f"{source}: '{name}' must be a string, got {value!r}")
        value = value.lower()
        if name in CHOICES and value not in CHOICES[name]:
            raise TuneAgbError(f"{source}: '{name}' must be one of {', '.join(CHOICES[name])}, got {value!r}")
    _check_range(name, value, source)
    return value


def _check_range(name: str, value: Any, source: str) -> None:
    positive = {"base_channels", "depth", "epochs", "batch_size", "in_channels", "lr", "cyclic_step_epochs"}
    non_negative = {"weight_decay", "momentum", "grad_clip", "steps_per_epoch"}
    if name in positive and value <= 0:
        raise TuneAgbError(f"{source}: '{name}' must be > 0, got {value!r}")
    if name in non_negative and value < 0:
        raise TuneAgbError(f"{source}: '{name}' must be >= 0, got {value!r}")
    if name == "dropout" and not 0.0 <= value < 1.0:
        raise TuneAgbError(f"{source}: 'dropout' must be in [0, 1), got {value!r}")


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a validated :class:`TrainConfig`; unknown keys are errors that list the valid ones, and a key of
    :data:`REMOVED_KEYS` is dropped at its neutral value and an error at any other."""
    if not isinstance(values, dict):
        raise TuneAgbError(f"{source}: expected a mapping of hyperparameters, got {type(values).__name__}")
    clean = {k: coerce_value(k, v, source) for k, v in drop_removed_keys(values, source).items()}
    cfg = TrainConfig(**clean)
    if cfg.logvar_min >= cfg.logvar_max:
        raise TuneAgbError(f"{source}: 'logvar_min' must be < 'logvar_max'")
    if cfg.compile == "fused" and cfg.norm != "batch":
        raise TuneAgbError(f"{source}: 'compile: fused' needs 'norm: batch' (it fuses BatchNorm), got {cfg.norm!r}")
    return cfg


def read_yaml_or_json(path: str | Path, what: str) -> Any:
    """Parse a YAML (or ``.json``) file; an unreadable or malformed file is one error line naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TuneAgbError(f"{path}: cannot read {what} ({exc.strerror})") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise TuneAgbError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None


def read_config_values(path: str | Path) -> dict[str, Any]:
    """The keys a config file names (a ``config:`` wrapper, as in best.yaml, is accepted), not yet validated."""
    values = read_yaml_or_json(path, "config file")
    if values is None:
        return {}
    if isinstance(values, dict) and isinstance(values.get("config"), dict):
        return values["config"]
    if not isinstance(values, dict):
        raise TuneAgbError(f"{path}: expected a mapping of hyperparameters, got {type(values).__name__}")
    return values


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML or JSON file of hyperparameters."""
    return config_from_dict(read_config_values(path), source=str(path))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
