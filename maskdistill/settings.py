"""Typed, frozen settings: the validated config as one dataclass per section.

The config is checked once, at the edge (the Snakefile, or a command line call), by
:func:`load_settings`: the JSON schema fills the defaults and names any bad key, then every section
becomes a frozen dataclass whose fields are the schema's keys with their Python types (lists become
tuples). Stages receive these objects: no stage merges defaults, casts values or looks up config
keys. ``tests/test_settings.py`` keeps the fields and the schema's properties equal.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from maskdistill.config import validate_config

T = TypeVar("T")


@dataclass(frozen=True)
class VitSettings:
    """A timm ViT and where its weights come from."""

    name: str
    pretrained: bool = False
    checkpoint: str | None = None


@dataclass(frozen=True)
class SplitSettings:
    """A folder of images and, optionally, its COCO instances file."""

    images: str | None = None
    annotations: str | None = None


@dataclass(frozen=True)
class VocSettings:
    root: str | None
    train_split: str
    train_list: str | None
    val_split: str


@dataclass(frozen=True)
class Coco20kSettings:
    images: str | None
    filenames: str | None
    annotations: str | None


@dataclass(frozen=True)
class DemoSettings:
    num_train: int
    num_val: int
    image_size: int
    min_objects: int
    max_objects: int
    seed: int
    background: str


@dataclass(frozen=True)
class DatasetSettings:
    source: Literal["demo", "images", "voc", "coco20k"]
    num_shards: int
    on_bad_image: Literal["fail", "skip"]
    train: SplitSettings
    val: SplitSettings
    voc: VocSettings
    coco20k: Coco20kSettings
    demo: DemoSettings


@dataclass(frozen=True)
class PretrainSettings:
    enabled: bool
    arch: str
    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_epochs: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: int
    student_temp: float
    centering: str
    sinkhorn_iterations: int
    koleo_weight: float
    out_dim: int
    head_hidden_dim: int
    head_bottleneck_dim: int
    norm_last_layer: bool
    head_batchnorm: bool
    drop_path: float
    clip_grad: float
    freeze_last_layer: int
    global_crop_size: int
    local_crop_size: int
    local_crops: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    color_jitter: tuple[float, float, float, float]
    grayscale_p: float
    demo_scenes: int | None
    solarize_p: float
    num_workers: int
    log_every: int
    seed: int
    gpus: int


@dataclass(frozen=True)
class MiningSettings:
    backbone: VitSettings
    short_side: int
    cls_heads: int | None
    mass: float
    proposal_ratio: float
    center_keys: bool
    seed_from: str
    preprocess: str
    batch_size: int
    decode_threads: int
    log_every: int


@dataclass(frozen=True)
class ClusteringSettings:
    backbone: VitSettings
    crop: str
    crop_size: int
    batch_size: int
    decode_threads: int
    num_clusters: int
    overclustering: int
    kmeans_batch_size: int
    n_init: int
    seed: int
    center: bool
    fit_on: tuple[str, ...]
    extra_images: tuple[str, ...]

    @property
    def num_centroids(self) -> int:
        """K-means centroids: ``num_clusters x overclustering``."""
        return self.num_clusters * self.overclustering


@dataclass(frozen=True)
class SgdSettings:
    """What every stage trained with SGD sets (detector, segmentation model, linear probe)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_drop_epochs: tuple[int, ...]
    num_workers: int
    log_every: int
    seed: int
    gpus: int


@dataclass(frozen=True)
class DetectorSettings(SgdSettings):
    backend: str
    architecture: str
    batchnorm: str
    backbone: str
    pretrained_backbone: str | None
    trainable_layers: int
    train_min_size: tuple[int, int]
    test_min_size: int
    max_size: int
    warmup_iters: int
    score_threshold: float
    detections_per_image: int
    fpn_channels: int
    mask_head_convs: int
    box_head_dim: int
    rpn_batch_size_per_image: int
    roi_batch_size_per_image: int
    checkpoint_every_epochs: int


@dataclass(frozen=True)
class PseudoLabelSettings:
    tau: float


@dataclass(frozen=True)
class SegmentationSettings(SgdSettings):
    arch: str
    output_stride: int
    atrous_rates: tuple[int, int, int]
    pretrained_backbone: str | None
    frozen_stages: int
    crop_size: int
    scale_range: tuple[float, float]
    rotation_degrees: float
    hard_pixel_fraction: float
    hard_pixel_count: str
    transform: str
    test_short_side: int | None


@dataclass(frozen=True)
class EvaluationSettings:
    matching: str
    figure_rows: int
    diagnostics: bool
    crf: bool
    mask_ap: bool
    mapping: str
    mask_ap_split: str
    single_object: str
    majority: str
    absent_classes: str


@dataclass(frozen=True)
class CrfSettings:
    self_training: bool
    iterations: int
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    label_confidence: float
    unary: str
    channel_order: str


@dataclass(frozen=True)
class LinearProbeSettings(SgdSettings):
    enabled: bool
    train_labels: str | None
    val_labels: str | None
    crop_size: int
    scale_range: tuple[float, float]
    rotation_degrees: float
    transform: str
    head_init: str


@dataclass(frozen=True)
class SegmentSettings:
    images: str | None
    batch_size: int
    overlay_alpha: float


@dataclass(frozen=True)
class GallerySettings:
    enabled: bool
    samples: int
    crop_size: int


@dataclass(frozen=True)
class ChooseKSettings:
    enabled: bool
    k_min: int
    k_max: int
    k_step: int
    sample_size: int

    @property
    def ks(self) -> tuple[int, ...]:
        """The k to try, k_min to k_max (inclusive) by k_step."""
        return tuple(range(self.k_min, self.k_max + 1, self.k_step))


@dataclass(frozen=True)
class Settings:
    """Every section of a validated config."""

    device: str
    weights_cache: str | None
    precision: Literal["fp32", "bf16", "fp16"]
    dataset: DatasetSettings
    pretrain: PretrainSettings
    mining: MiningSettings
    clustering: ClusteringSettings
    detector: DetectorSettings
    pseudo_labels: PseudoLabelSettings
    segmentation: SegmentationSettings
    evaluation: EvaluationSettings
    crf: CrfSettings
    linear_probe: LinearProbeSettings
    segment: SegmentSettings
    gallery: GallerySettings
    choose_k: ChooseKSettings

    @property
    def num_labels(self) -> int:
        """Labels of every label map: background plus one per K-means centroid."""
        return self.clustering.num_centroids + 1


def load_settings(raw: Mapping[str, Any] | None = None) -> Settings:
    """Validate a config (missing keys take their defaults) into :class:`Settings`.

    Raises :class:`maskdistill.config.ConfigError` naming every bad key.
    """
    return build(Settings, validate_config(dict(raw or {})))


def section_settings(section: str, values: Mapping[str, Any] | None = None) -> Any:
    """One section's settings from (partial) ``values``, validated like a whole config."""
    return getattr(load_settings({section: dict(values or {})}), section)


def stored_settings(section: str, stored: Mapping[str, Any]) -> Any:
    """A section's settings as stored beside a trained model, read by today's schema: keys the
    schema no longer has are dropped, keys added since take their defaults."""
    known = {f.name for f in dataclasses.fields(typing.get_type_hints(Settings)[section])}
    return section_settings(section, {k: v for k, v in stored.items() if k in known})


def build(cls: type[T], data: Mapping[str, Any]) -> T:
    """A settings dataclass from a validated mapping: nested sections become their dataclasses
    and lists become tuples. Keys the class does not know are an error (the schema forbids them)."""
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    values = {name: _value(hints[name], data[name]) for name in hints if name in data}
    return cls(**values)


def _value(hint: Any, value: Any) -> Any:
    target = _dataclass_in(hint)
    if target is not None and isinstance(value, Mapping):
        return build(target, value)
    if isinstance(value, list):
        return tuple(value)
    return value


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next((h for h in typing.get_args(hint) if dataclasses.is_dataclass(h)), None)
    return None


def as_config(settings: Any) -> dict[str, Any]:
    """Settings back to plain config values (tuples as lists), e.g. to store beside a model."""
    return _plain(dataclasses.asdict(settings))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
