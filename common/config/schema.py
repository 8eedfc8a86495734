"""The DermFed configuration's schema: one pydantic model per section, and `DermFedConfig` around them.

Unknown keys, infinities and NaN, and true/false for a number are errors, so that a typo never
silently falls back to a default. Loading and error wording are `loading.py`'s; how a config
travels (YAML, JSON, Flower's run config) is `transport.py`'s.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _registered_format(name: str) -> str:
    """A name from the data-format registry (`common/data/formats/`); imported here, at validation, not at import."""
    from common.data.formats import check_format_name

    return check_format_name(name)


DataFormat = Annotated[str, AfterValidator(_registered_format)]
Artifact = Literal["ruler", "hair", "bubbles", "vignette", "ink"]


class ConfigError(ValueError):
    """A configuration problem, worded for the person who typed the command."""


def _is_numeric(annotation: Any) -> bool:
    """int, float, or Optional of either (but not bool, itself an int)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return any(option in (int, float) for option in options)


class _Section(BaseModel):
    """A config section: unknown keys, infinities and NaN, and true/false for a number are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name, field in cls.model_fields.items():
                if isinstance(values.get(name), bool) and _is_numeric(field.annotation):
                    raise ValueError(f"{name} must be a number, got {str(values[name]).lower()}")
        return values


class DataConfig(_Section):
    """Where the images are and how they are read, split and partitioned."""

    format: DataFormat = Field("synthetic", description="layout of data.root")
    root: Optional[str] = Field(None, description="folder with the images (and metadata CSV)")
    metadata_csv: Optional[str] = Field(
        None, description="metadata/ground-truth CSV; default: the official file name in data.root"
    )
    ham_metadata_csv: Optional[str] = Field(
        None,
        description="isic2019 only: HAM10000_metadata.csv that splits the HAM images into "
        "FLamby's four HAM centres; default: data.root/HAM10000_metadata.csv if present",
    )
    image_size: int = Field(64, ge=32, le=512, description="side of the square model input")
    min_image_side: int = Field(32, ge=1, description="images with a smaller side are skipped")
    non_rgb: Literal["skip", "convert"] = Field(
        "skip", description="grayscale/RGBA/CMYK/16-bit images: skip them or convert to RGB"
    )
    cache_dir: str = Field(".cache/dermfed", description="preprocessing cache (memory-mapped)")
    use_cache: bool = Field(True, description="decode each JPEG once and keep resized arrays")
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    partition: Literal["natural", "iid", "dirichlet"] = Field(
        "natural", description="how pooled data becomes simulated hospitals"
    )
    num_partitions: int = Field(4, ge=1, le=1000, description="hospitals for iid/dirichlet")
    min_site_images: int = Field(10, ge=1, description=(
        "simulation: a hospital must hold at least this many images (and at least train.batch_size); "
        "checked before the run starts"))
    dirichlet_alpha: float = Field(0.5, gt=0.0, description="label skew; small = more skewed")
    site: Optional[str] = Field(None, description="use only this site (local-only arm)")
    pretrain_splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["train"], min_length=1,
        description="splits whose images (without labels) pretraining may see; test images never by default",
    )


class SynthConfig(_Section):
    """The embedded synthetic dermoscopy generator (the default data of the demo)."""

    num_sites: int = Field(4, ge=1, le=16)
    lesions_per_site: int = Field(40, ge=3)
    max_images_per_lesion: int = Field(2, ge=1, le=5)
    image_size: int = Field(128, ge=48, le=1024, description="side of the written JPEGs")
    classes: list[Literal["nv", "mel", "bkl"]] = Field(default_factory=lambda: ["nv", "mel", "bkl"])
    shortcut: bool = Field(False, description="make one artefact track a class in train/val only")
    shortcut_artifact: Artifact = "ruler"
    shortcut_class: Literal["nv", "mel", "bkl"] = "mel"
    shortcut_strength: float = Field(
        0.9, ge=0.5, le=1.0, description="P(artefact | shortcut class) = P(no artefact | other)"
    )
    test_fraction: float = Field(0.25, gt=0.0, lt=0.9, description="lesions in the test split")
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5, description="lesions in the validation split")


OLD_FLAT_VAE_KEYS = ("latent_dim", "decoder_width", "beta", "kl_warmup_steps")  # model.* before model.vae.*


class ModelConfig(_Section):
    """The objective (`common.objectives`) and its encoder; each objective's own keys in `model.<objective>`.

    A section may hold settings for several objectives; `model.objective` picks the one trained, and
    its section is always present (defaults filled in)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)  # extras: objective sections

    objective: str = Field("vae", description="self-supervised objective (common/objectives): vae, ...")
    encoder: str = Field("convnext_tiny", description="timm ConvNeXt name (convnext_atto ... convnext_tiny ...)")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth; must be 0 under DP")

    @classmethod
    def subsections(cls) -> dict[str, type[BaseModel]]:
        from common.objectives import OBJECTIVES  # the registry, as it is now (tests may add to it)

        return {name: objective.Settings for name, objective in OBJECTIVES.items()}

    @model_validator(mode="before")
    @classmethod
    def _objective_sections(cls, values: Any) -> Any:
        """Validate each `model.<objective>` section with the objective's own class (errors keep their key)."""
        if not isinstance(values, dict):
            return values
        values = _migrate_flat_vae_keys(dict(values))
        sections = cls.subsections()
        chosen = values.get("objective", cls.model_fields["objective"].default)
        if isinstance(chosen, str) and chosen in sections and values.get(chosen) is None:
            values[chosen] = {}
        errors: list[Any] = []
        for key, value in list(values.items()):
            if key in cls.model_fields:
                continue
            if key not in sections:
                errors.append({"type": "extra_forbidden", "loc": (key,), "input": value})
                continue
            if isinstance(value, BaseModel):
                value = value.model_dump()
            try:
                values[key] = sections[key].model_validate(value)
            except ValidationError as exc:
                errors += [{"type": e["type"], "loc": (key, *e["loc"]), "input": e["input"], **(
                    {"ctx": e["ctx"]} if "ctx" in e else {})} for e in exc.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return values

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, name: str) -> str:
        return registered_objective(name)

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, name: str) -> str:
        known = timm_convnext_names()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(f"not a ConvNeXt architecture of timm; {hint}known: {', '.join(known)}")
        return name

    def settings(self, name: Optional[str] = None) -> Any:
        """The section `model.<name>` (default: the chosen objective's), validated by that objective's class."""
        return getattr(self, name or self.objective)


def registered_objective(name: str) -> str:
    """A name from the objective registry (`common/objectives/`), or an error listing the registered ones."""
    known = sorted(ModelConfig.subsections())
    if name not in known:
        close = difflib.get_close_matches(name, known, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"not a registered objective; {hint}allowed: {', '.join(known)}")
    return name


def _migrate_flat_vae_keys(values: dict[str, Any]) -> dict[str, Any]:
    """A run written before the objectives registry holds `model.latent_dim`, ... : they are `model.vae.*` now.
    (Loading only: an override must name the new key; `dermfed config` lists them.)"""
    flat = {key: values.pop(key) for key in OLD_FLAT_VAE_KEYS if key in values}
    if not flat:
        return values
    section = values.get("vae")
    section = section.model_dump() if isinstance(section, BaseModel) else dict(section or {})
    twice = sorted(set(flat) & set(section))
    if twice:
        raise ConfigError(f"model.{twice[0]} and model.vae.{twice[0]} are both given; keep model.vae.{twice[0]}")
    values["vae"] = {**flat, **section}
    return values


@functools.lru_cache(maxsize=1)
def timm_convnext_names() -> list[str]:
    """Every ConvNeXt architecture this timm knows (`timm.list_models('convnext*')`)."""
    import timm  # here: only a config with a model section needs it

    return list(timm.list_models("convnext*"))


class AugmentConfig(_Section):
    """Dermoscopy-appropriate augmentation: lesions have no canonical orientation."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="mild colour jitter")
    contrast: float = Field(0.1, ge=0.0, le=1.0)
    saturation: float = Field(0.1, ge=0.0, le=1.0)
    hue: float = Field(0.02, ge=0.0, le=0.5)


class TrainConfig(_Section):
    """Local training: one call trains `epochs` epochs, or `max_steps` steps when set."""

    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="stop each training call after this many steps")
    batch_size: int = Field(16, ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    scheduler: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    total_steps: Optional[int] = Field(None, ge=1, description="schedule length; default: steps of this call")
    grad_clip: Optional[float] = Field(1.0, gt=0.0, description="global norm clip without DP (DP clips per sample)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    channels_last: bool = Field(True, description="channels-last memory format (CUDA only)")
    num_workers: Optional[int] = Field(None, ge=0, description=(
        "batches read ahead by a background thread; default: 2 on CUDA, 0 on the CPU"))
    progress: bool = Field(True, description="progress bar on a terminal")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class DPConfig(_Section):
    """DP-SGD with Opacus: per-sample clipping and Gaussian noise, accounted per site."""

    enabled: bool = False
    noise_multiplier: Optional[float] = Field(None, ge=0.0, description="fixed sigma; else calibrated to target_epsilon")
    target_epsilon: Optional[float] = Field(None, gt=0.0, description="the site's whole budget over planned_steps")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-sample clipping norm")
    planned_steps: Optional[int] = Field(None, ge=1, description="local steps of the whole run; default: derived")
    accountant: Literal["rdp", "prv"] = "rdp"
    poisson_sampling: bool = Field(True, description="must stay true under DP: the accountant assumes it")
    secure_mode: bool = Field(False, description="not available: needs torchcsprng (see README, DP-SGD)")

    @model_validator(mode="after")
    def _accounted_mechanism(self) -> "DPConfig":
        if self.secure_mode:
            raise ValueError(
                "dp.secure_mode=true needs torchcsprng, which cannot be installed for this Python. Leave it "
                "false: DermFed always draws DP noise and Poisson sampling from generators seeded by the "
                "operating system (README, 'What DP-SGD protects, and against whom')")
        if not self.enabled:
            return self
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dp.enabled needs dp.noise_multiplier or dp.target_epsilon")
        if not self.poisson_sampling:
            raise ValueError(
                "dp.poisson_sampling=false is refused under DP: the accountant computes epsilon for Poisson "
                "sampling, so any other sampling would report an epsilon that does not hold")
        return self


def _listed(names: list[str]) -> str:
    """'a', 'b' or 'c': how pydantic lists a Literal's values."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


class FederationConfig(_Section):
    """Federated pretraining with Flower: rounds, strategy, robustness, simulation resources."""

    num_rounds: int = Field(3, ge=1)
    strategy: str = Field("fedavg", description="a registered aggregation strategy (common/strategies/)")
    proximal_mu: float = Field(0.01, ge=0.0, le=1e4, description=(
        "fedprox: weight of (mu/2)||w - w_global||^2; at most 1e4, which already pins the weights to the global ones "
        "(a mu past float32's range makes the first step NaN at every site)"))
    server_lr: float = Field(0.01, gt=0.0, description="fedadam: server learning rate (eta)")
    server_beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    server_beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    server_tau: float = Field(1e-3, gt=0.0, description="fedadam: adaptivity (tau)")
    share: Literal["encoder", "all"] = Field("encoder", description=(
        "what leaves a site: the encoder only, or the objective's whole model (`vae`, the name before "
        "objectives, means `all`)"))
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0, description="sites that report validation loss")
    min_clients: int = Field(2, ge=1, description="fewest valid updates a round may aggregate")
    round_timeout: float = Field(3600.0, gt=0.0, description="seconds to wait for a round's replies")
    initial_checkpoint: Optional[str] = Field(None, description="start from this checkpoint's weights")
    compression: Literal["none", "fp16", "int8"] = Field("none", description=(
        "what a site sends: its weights (none), or its update relative to the received global weights, "
        "quantised per output channel with stochastic rounding and error feedback (fp16, int8: common/compression.py)"))
    monitor: Literal["none", "reconstruction", "linear-probe"] = Field(
        "none", description="per-round server-side check of the global model (reconstruction needs share=all and an "
        "objective that supports it)")
    client_cpus: int = Field(1, ge=1, description="simulation: CPUs per virtual hospital")
    client_gpu_fraction: Optional[float] = Field(
        None, ge=0.0, le=1.0, description="simulation: GPU share per virtual hospital; default: 1/N with a GPU, else 0")
    superlink_port: int = Field(0, ge=0, le=65535, description="simulation: port of the local SuperLink (0: free port)")

    @field_validator("share", mode="before")
    @classmethod
    def _old_share_name(cls, value: Any) -> Any:
        return "all" if value == "vae" else value  # run configs written before objectives say `vae`

    @field_validator("strategy")
    @classmethod
    def _registered_strategy(cls, name: str) -> str:
        from common.strategies import STRATEGIES  # here: the registry imports torch and its plugins

        if name not in STRATEGIES:
            raise ValueError(f"Input should be {_listed(list(STRATEGIES))}")
        return name

    @model_validator(mode="after")
    def _monitor_needs_decoder(self) -> "FederationConfig":
        if self.monitor == "reconstruction" and self.share != "all":
            raise ValueError("federation.monitor=reconstruction needs federation.share=all (the decoder stays at the sites)")
        return self


EXTERNAL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ExternalSetConfig(_Section):
    """A labelled data set the heads are scored on but never trained or selected on: every image is test data."""

    format: DataFormat = Field(description="layout of root (as data.format); must carry labels")
    root: str = Field(description="folder with the images and metadata, as data.root")
    name: Optional[str] = Field(None, pattern=EXTERNAL_NAME, description="how the report names it; default: root's folder name")
    metadata_csv: Optional[str] = Field(None, description="as data.metadata_csv")
    ham_metadata_csv: Optional[str] = Field(None, description="as data.ham_metadata_csv (isic2019)")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, values: Any) -> Any:
        if isinstance(values, dict) and not values.get("name") and isinstance(values.get("root"), str):
            folder = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(values["root"].rstrip("/\\")).name).lstrip("_.-")
            values = {**values, "name": folder[:64] or "external"}
        return values

    @model_validator(mode="after")
    def _labelled(self) -> "ExternalSetConfig":
        from common.data.formats import FORMATS

        if not FORMATS[self.format].labelled:
            labelled = [name for name, fmt in FORMATS.items() if fmt.labelled]
            raise ValueError(f"external set {self.name!r}: format {self.format} holds no labels; an external test set "
                             f"needs them ({', '.join(labelled[:-1])} or {labelled[-1]})")
        return self


class EvaluationConfig(_Section):
    """Central evaluation: frozen encoders under identical classifier heads."""

    image_size: Optional[int] = Field(None, ge=32, le=512, description="default: the checkpoint's data.image_size")
    head: Literal["linear", "mlp"] = "linear"
    mlp_hidden: int = Field(256, ge=8)
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="mlp head only")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    imbalance: Literal["class-weights", "balanced-sampling", "none"] = "class-weights"
    augment: bool = Field(False, description="augment training images (recomputes encoder features every epoch)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="head seeds: the head's initialisation and batch order")
    split_seeds: list[int] = Field(default_factory=list, description=(
        "also redraw the train/val/test split with these seeds (default: only `seed`'s split); an arm "
        "pretrained on another split is refused"))
    bootstrap_replicates: int = Field(2000, ge=100, description="paired bootstrap over test lesions and seeds")
    min_test_groups: int = Field(30, ge=1, description=(
        "fewest test lesions (or patients) a test set needs for a verdict; below it the report gives the intervals "
        "and says there are too few test lesions to decide"))
    select_on: Literal["val_balanced_accuracy", "val_loss"] = Field(
        "val_balanced_accuracy", description="validation quantity that picks each head's best epoch")
    arms: list[str] = Field(  # names in server/evaluation/arms' registry, checked there (common/ cannot import it)
        default_factory=lambda: ["federated", "imagenet", "random", "pooled", "local"],
        description="arms to run when their inputs exist (registered in server/evaluation/arms/)")
    feature_batch_size: int = Field(64, ge=1)
    imagenet_model: str = Field("convnext_tiny.fb_in1k", description="timm model (with tag) of the ImageNet arm")
    external: list[ExternalSetConfig] = Field(default_factory=list, description=(
        "labelled data sets scored as external test sets (heads trained and selected on data.* only); "
        "`dermfed evaluate --external FORMAT:ROOT[:NAME]` adds entries"))

    @model_validator(mode="after")
    def _unique_external_names(self) -> "EvaluationConfig":
        names = [entry.name for entry in self.external]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"external test sets must have distinct names; {twice} given twice (set each entry's name)")
        return self


class StudyConfig(_Section):
    """`dermfed study`: which objectives are pretrained federatedly, and the controls pretrained beside each."""

    objectives: Optional[list[Annotated[str, AfterValidator(registered_objective)]]] = Field(
        None, min_length=1, description="registered objectives, each pretrained federatedly (and its controls); "
        "default: [model.objective]")
    controls: list[Literal["pooled", "local"]] = Field(
        default_factory=lambda: ["pooled", "local"], description=(
            "controls pretrained with each objective: pooled (all sites' images, `dermfed pretrain`) and local (one "
            "site's images, `dermfed pretrain data.site=...`)"))
    local_site: Optional[str] = Field(None, description="the local-only control's site; default: the site with the "
                                                        "most pretraining images")
    control_rounds: Optional[int] = Field(None, ge=1, description=(
        "the controls' budget in federated rounds' worth of local training (a site's train.epochs, or "
        "train.max_steps, per round); default: federation.num_rounds, the federated run's own budget"))

    @field_validator("objectives", "controls")
    @classmethod
    def _distinct(cls, names: Optional[list[str]]) -> Optional[list[str]]:
        twice = sorted({name for name in names or [] if names.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice; list each once")
        return names


class DermFedConfig(_Section):
    """Everything a DermFed run needs; one instance per run, written beside its outputs."""

    seed: int = Field(0, ge=0)
    output_dir: str = Field("runs", description="where run folders are created")
    run_name: Optional[str] = Field(None, description="run folder name; default: subcommand+time")
    data: DataConfig = Field(default_factory=DataConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> "DermFedConfig":
        if self.data.image_size % 32:
            raise ValueError(f"data.image_size={self.data.image_size} must be a multiple of 32 (ConvNeXt downsamples by 32)")
        generic_monitors = ("none", "linear-probe")
        supported = _objective_monitors(self.model.objective)
        if self.federation.monitor not in generic_monitors and self.federation.monitor not in supported:
            raise ValueError(f"federation.monitor={self.federation.monitor} is not supported by model.objective="
                             f"{self.model.objective}; it supports: {', '.join([*generic_monitors, *supported])}")
        if self.dp.enabled and self.model.drop_path_rate > 0:
            raise ValueError("model.drop_path_rate must be 0 when dp.enabled (per-sample gradients cannot replay its random masks)")
        if self.synth.shortcut and self.synth.shortcut_class not in self.synth.classes:
            raise ValueError(
                f"synth.shortcut_class={self.synth.shortcut_class!r} is not one of "
                f"synth.classes={self.synth.classes}"
            )
        return self


def _objective_monitors(name: str) -> tuple[str, ...]:
    from common.objectives import get_objective

    return get_objective(name).monitors
