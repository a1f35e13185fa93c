"""The protocol: one YAML file, validated into typed records.

Top-level keys are fixed: ``name, seed, data, task, preprocessing, models, training, explain,
metrics, validation, selection, report``. List-valued grid axes (backbones, hidden sizes, finetune, augment,
crop, tasks, synthetic shortcut strengths) expand to the model grid (:mod:`auditbench.protocol.grid`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The study resized to 300 px and centre-cropped 224, removing 38 px per side (12.7%, not the 8%
# its text says); the ratio is kept and scaled to any input size (auditbench.data.transforms).
STUDY_CROP_RATIO = 38 / 300


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_list(value: Any) -> Any:
    """Grid axes accept a scalar as a one-value axis (None stays None: "the default")."""
    return value if isinstance(value, list) or value is None else [value]


class SyntheticSpec(_Strict):
    """Synthetic chest X-ray phantoms with exact lung and artifact masks (the known-answer data)."""

    n_images: int = Field(200, ge=8)
    image_size: int = Field(128, ge=48, le=1024)  # the marker band needs >= 5 px
    classes: list[str] = ["covid", "normal"]
    disease_strength: float | None = Field(None, gt=0)
    base_artifact_rate: float = Field(0.5, ge=0, le=1)
    artifact_band: float = Field(0.12, gt=0, lt=0.5)
    # Grid axes (each a list): where markers are drawn, how strongly they follow the label, and
    # which seed draws the phantom set (None: the protocol seed), so replicates see new images.
    artifact_placement: list[Literal["border", "inside_crop", "anywhere"]] = ["border"]
    shortcut_strength: list[float] = [0.0]
    seed: list[int] | None = None
    test_shortcut_strength: float = Field(0.0, ge=0, le=1)

    _axis = field_validator("shortcut_strength", "artifact_placement", "seed", mode="before")(_as_list)

    @field_validator("shortcut_strength")
    @classmethod
    def _strengths_in_range(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0 <= value <= 1:
                raise ValueError(f"each shortcut strength must lie in [0, 1], got {value}")
        return values


class SourceSpec(_Strict):
    """One real data set in its public layout, under ``data.root`` unless ``root`` is absolute."""

    dataset: str
    root: str
    source: str | None = None
    options: dict[str, Any] = {}


class ExternalSpec(_Strict):
    """A labelled test set from other sources: never used for training or model selection."""

    name: str
    sources: list[SourceSpec] = Field(min_length=1)


class MaskSpec(_Strict):
    lung: Literal["dataset_or_predicted", "dataset", "predicted"] = "dataset_or_predicted"
    lung_model: str = "auditbench-unet"
    artifacts: Literal["dataset_or_detected", "dataset", "detected", "none"] = "dataset_or_detected"


class DataSpec(_Strict):
    # "sources": the real data sets listed in ``sources``; otherwise the name of a registered data set
    # that generates its images ("synthetic", settings in ``synthetic``), which declares its own grid
    # axes and known answer (auditbench.data.synthetic_adapter).
    dataset: str = "synthetic"
    root: str = "data"
    synthetic: SyntheticSpec = SyntheticSpec()
    sources: list[SourceSpec] = []
    external: list[ExternalSpec] = []
    max_side: int = Field(512, ge=64)
    balance: Literal["none", "cap", "balance"] = "none"
    cap_per_class: int | None = Field(None, ge=1)
    masks: MaskSpec = MaskSpec()

    @model_validator(mode="after")
    def _sources_present(self) -> "DataSpec":
        if self.dataset == "sources" and not self.sources:
            raise ValueError("data.dataset is 'sources' but data.sources is empty")
        if self.balance == "cap" and self.cap_per_class is None:
            raise ValueError("data.balance 'cap' needs data.cap_per_class")
        return self


class TaskSpec(_Strict):
    """A binary task: two task classes, each a list of the data sets' raw labels."""

    name: str
    positive: str
    classes: dict[str, list[str]]

    @model_validator(mode="after")
    def _binary(self) -> "TaskSpec":
        if len(self.classes) != 2:
            raise ValueError(f"task {self.name!r} needs exactly 2 classes, got {list(self.classes)}")
        if self.positive not in self.classes:
            raise ValueError(f"task {self.name!r}: positive class {self.positive!r} is not one of {list(self.classes)}")
        seen: dict[str, str] = {}
        for task_class, raw_labels in self.classes.items():
            for raw in raw_labels:
                if raw in seen:
                    raise ValueError(f"task {self.name!r}: raw label {raw!r} is in both {seen[raw]!r} and {task_class!r}")
                seen[raw] = task_class
        return self

    @property
    def negative(self) -> str:
        return next(name for name in self.classes if name != self.positive)

    @property
    def class_names(self) -> list[str]:
        """Index order: negative class 0, positive class 1."""
        return [self.negative, self.positive]

    def label_index(self, raw_label: str) -> int | None:
        """0/1 for raw labels in the task, None for labels the task leaves out."""
        for task_class, raw_labels in self.classes.items():
            if raw_label in raw_labels:
                return int(task_class == self.positive)
        return None


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "covid_vs_non_covid": TaskSpec(
        name="covid_vs_non_covid",
        positive="covid",
        classes={"non_covid": ["normal", "viral", "bacterial", "fungal"], "covid": ["covid"]},
    ),
    "covid_vs_viral": TaskSpec(
        name="covid_vs_viral", positive="covid", classes={"viral": ["viral"], "covid": ["covid"]}
    ),
}


class PreprocessingSpec(_Strict):
    input_size: int | None = Field(None, ge=32, description="None: each backbone's own data config size")
    crop: list[bool] = [False]
    crop_ratio: float = Field(STUDY_CROP_RATIO, ge=0, lt=0.5)

    _axis = field_validator("crop", mode="before")(_as_list)


class BackboneSpec(_Strict):
    name: str
    weights: str = "imagenet"
    # Training modes for this backbone alone (None: ``training.finetune``). Fine-tuning a
    # random-init backbone for a few epochs at a low learning rate teaches it little, so a grid can
    # spend its fine-tuning budget on the pretrained backbones only.
    finetune: list[bool] | None = None

    _axis = field_validator("finetune", mode="before")(_as_list)


class ModelsSpec(_Strict):
    backbones: list[BackboneSpec] = Field(min_length=1)
    hidden: list[int] = [256]
    dropout: float = Field(0.5, ge=0, lt=1)

    @field_validator("backbones", mode="before")
    @classmethod
    def _backbone_shorthand(cls, value: Any) -> Any:
        return [{"name": item} if isinstance(item, str) else item for item in _as_list(value)]

    _axis = field_validator("hidden", mode="before")(_as_list)

    @field_validator("hidden")
    @classmethod
    def _positive_hidden(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError(f"hidden sizes must be >= 1, got {values}")
        return values


class PhaseSpec(_Strict):
    lr: float = Field(gt=0)
    max_epochs: int = Field(ge=1)
    patience: int = Field(ge=1)
    weight_decay: float = Field(0.0, ge=0)


class TrainingSpec(_Strict):
    folds: int = Field(4, ge=2)
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    finetune: list[bool] = [False]
    augment: list[bool] = [False]
    augment_mode: Literal["minority_once", "online"] = "minority_once"
    batch_size: int = Field(32, ge=1)
    head: PhaseSpec = PhaseSpec(lr=1e-3, max_epochs=200, patience=10)
    finetune_phase: PhaseSpec = PhaseSpec(lr=1e-5, max_epochs=10, patience=3)
    device: str = "auto"
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # GPU runs: torch's deterministic algorithms (an op without one raises) and no cuDNN autotuning.
    # CPU runs are deterministic without it.
    deterministic: bool = False
    # NHWC weights and batches for the backbone (GPU tensor cores); numbers differ from NCHW in the
    # last bits, so the feature store keys on it. Off until benchmarks/gpu.sh has measured it.
    channels_last: bool = False
    # Processes that read and frame images while the backbone runs ("auto": none on the CPU, where
    # the backbone already uses every core; half the cores, at most 8, with a GPU).
    loader_workers: int | Literal["auto"] = "auto"

    _axes = field_validator("finetune", "augment", mode="before")(_as_list)

    @field_validator("loader_workers")
    @classmethod
    def _workers(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 'auto' or a number >= 0")
        return value


class ExplainSpec(_Strict):
    # The explanation methods, an evaluation axis: every model is explained by each (the column
    # ``method`` of every result table). The first is the primary method: selection, ``check``,
    # the gallery and the model card use its maps; the others are reported beside it.
    method: list[str] = Field(["gradcam"], min_length=1)
    target: Literal["positive", "predicted"] = "positive"  # the class whose evidence is mapped
    # The score differentiated: "log_odds" = logit[target] - logit[other], the quantity p(positive)
    # depends on (a two-logit head's decision); "logit" = logit[target] alone, as in the Grad-CAM
    # paper, which also shows evidence that raises both logits and so does not move p.
    score: Literal["log_odds", "logit"] = "log_odds"
    # The timm feature_info level explained: "last" (the classifier's own feature map), or the
    # last level with stride <= 16 / <= 8 (finer maps; the backward runs through the top blocks).
    layer: Literal["last", "stride16", "stride8"] = "last"
    batch_size: int = Field(32, ge=1)
    # Methods registered as expensive (Score-CAM: one forward pass of the whole model per feature channel,
    # 320 per image on efficientnet_lite0, 512 on a ResNet-18, about 2-3 s per image at 128 px on a 2-core
    # CPU) explain only the first N images of each split of a model x fold, in split order; their per-image
    # metrics are NaN beyond, and their model values are means over those N (images.csv says which rows). Not
    # applied to the primary method, whose maps selection and ``check`` read on every image.
    expensive_images: int = Field(8, ge=1)

    _axis = field_validator("method", mode="before")(_as_list)

    @field_validator("method")
    @classmethod
    def _unique_methods(cls, methods: list[str]) -> list[str]:
        repeated = sorted({m for m in methods if methods.count(m) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return methods

    @property
    def primary(self) -> str:
        """The method whose maps selection, ``check``, the gallery and the model card use."""
        return self.method[0]


class FaithfulnessSpec(_Strict):
    """Deletion, insertion and ROAD (audit/faithfulness.py) per model x fold x explanation method, on
    the first ``images`` internal test images of the fold (in test-set order; 0: not computed)."""

    # Per image and method: 2 x (steps + 1) + 8 forward passes of the whole model (a frozen model's cell
    # otherwise runs only its head on cached features) and 8 sparse solves for ROAD's imputation (single-
    # threaded; about half the cost at 128 px). Measured on protocols/quick.yaml, a quarter of its grid (both
    # backbones, frozen and fine-tuned, 8 cells) in one process on one thread of a shared CPU: 5 images at 5
    # steps took 2.3 s per model x fold, 10% of the run's other work (1.6x its explain stage), about +11% on
    # the whole grid (8 images: +18%). On two free cores the rest parallelises and the solves do not: an
    # estimated +16%. 5 steps put the deletion curve at ROAD's spacing (fractions 0, 0.2, ..., 1).
    images: int = Field(5, ge=0)
    steps: int = Field(5, ge=1)  # deletion / insertion at fractions k / steps, k = 0..steps


class MetricsSpec(_Strict):
    # Outer band per side as a fraction of the *source* image side, mapped into each model frame,
    # so cropped and uncropped models are scored on the same anatomy. None: the synthetic
    # generator's marker band (data.synthetic.artifact_band, 0.12 by default).
    border_fraction: float | None = Field(None, gt=0, lt=0.5)
    occlusion: bool = True
    bootstrap: int = Field(1000, ge=0)  # patient-level bootstrap resamples for 95% CIs (0: none)
    faithfulness: FaithfulnessSpec = FaithfulnessSpec()


class SanitySpec(_Strict):
    """Sanity checks of the explanation method, once per backbone (pipeline/sanity.py)."""

    # Internal test images of fold 0 whose maps are compared (0: no checks). With 16 the verdict's
    # CI could not show a drop to the random-pair baseline on lite0 (README), hence 64.
    images: int = Field(64, ge=0)
    # The first N of those images for a method registered as expensive (explain.expensive_images): per
    # image it costs (cascade steps + 2) x its forward passes, about 30 s for Score-CAM on lite0 at 128 px.
    expensive_images: int = Field(8, ge=2)
    granularity: Literal["stage", "block"] = "stage"  # what one cascade step re-initialises


class ValidationSpec(_Strict):
    """The known-answer check of the audit (synthetic data): which models rely on the marker."""

    # A model "relies on the shortcut" when removing the marker from a decorrelated test image
    # moves p(positive) by more than this on average. Fixed before any result.
    reliance_threshold: float = Field(0.1, gt=0, lt=1)
    bootstrap: int = Field(2000, ge=0)  # model-level bootstrap resamples for the AUROC CIs


class ConstraintSpec(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> "ConstraintSpec":
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs min or max")
        return self


class SelectionSpec(_Strict):
    primary: str = "accuracy"
    constraints: dict[str, ConstraintSpec] = {}
    pareto: tuple[str, str] = ("accuracy", "lung_mass")


class ReportSpec(_Strict):
    save_models: Literal["selected", "all", "none"] = "selected"
    gallery_per_model: int = Field(2, ge=0)
    html: bool = True


class Protocol(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataSpec = DataSpec()
    task: list[TaskSpec]
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    models: ModelsSpec
    training: TrainingSpec = TrainingSpec()
    explain: ExplainSpec = ExplainSpec()
    metrics: MetricsSpec = MetricsSpec()
    validation: ValidationSpec = ValidationSpec()
    sanity: SanitySpec = SanitySpec()
    selection: SelectionSpec = SelectionSpec()
    report: ReportSpec = ReportSpec()

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, value: Any) -> Any:
        tasks = []
        for item in _as_list(value):
            if isinstance(item, str):
                if item not in BUILTIN_TASKS:
                    raise ValueError(f"unknown built-in task {item!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
                item = BUILTIN_TASKS[item]
            tasks.append(item)
        return tasks

    @model_validator(mode="after")
    def _unique_task_names(self) -> "Protocol":
        names = [t.name for t in self.task]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return self

    @property
    def border_fraction(self) -> float:
        """The border band per side, as a fraction of the source image side (metrics.border_fraction)."""
        if self.metrics.border_fraction is not None:
            return self.metrics.border_fraction
        return self.data.synthetic.artifact_band
