"""DINO self-distillation of a ViT on unlabeled images (Caron et al., 2021).

A student ViT + projection head learns to match a teacher (an exponential moving average of the
student) across multi-crop views: the teacher sees the global crops, the student every crop. The
teacher's outputs are centred (running mean) and sharpened (low temperature); the student's are
softened. The teacher backbone is what mining and clustering load afterwards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor, nn
from torchvision.transforms import v2

from maskdistill import distributed
from maskdistill.backbone import check_vit_name
from maskdistill.images import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, ImageRecord, read_rgb
from maskdistill.settings import PretrainSettings, as_config
from maskdistill.storage import atomic_path, write_json
from maskdistill.training import Losses, TrainingRun, fit, seed_everything

log = logging.getLogger("maskdistill")


# ------------------------------------------------------------------ model


class DinoHead(nn.Module):
    """MLP projection (Linear-GELU x nlayers-1 to a bottleneck), L2 normalisation, then a
    weight-normalised prototype layer whose norm is fixed to 1 (``norm_last_layer``) or learnt,
    which lets the logits grow faster (DINO's choice for small ViTs)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, batchnorm: bool = False, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if batchnorm:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False))
        original0 = self.prototypes.parametrizations.weight.original0
        original0.data.fill_(1.0)
        original0.requires_grad_(not norm_last_layer)  # fixed unit-norm prototypes, or learnt norms

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class DinoModel(nn.Module):
    """ViT backbone (CLS token) followed by a :class:`DinoHead`; crops of equal size share a pass."""

    def __init__(self, backbone: nn.Module, head: DinoHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor], return_cls: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        outs, start = [], 0
        sizes = [c.shape[-1] for c in crops]
        while start < len(crops):
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            outs.append(self.backbone.forward_features(torch.cat(list(crops[start:end])))[:, 0])
            start = end
        cls = torch.cat(outs)
        return (self.head(cls), cls) if return_cls else self.head(cls)


class DinoLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher outputs (global crops) and the student's
    outputs of every other crop. Centring is DINO's EMA of the teacher's batch mean (``ema``) or a
    Sinkhorn-Knopp equipartition of the teacher's assignments over the batch (``sinkhorn``)."""

    def __init__(self, out_dim: int, num_crops: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "ema", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"pretrain.centering must be 'ema' or 'sinkhorn', not {centering!r}")
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher: Tensor, teacher_temp: float) -> Tensor:
        """Target distributions of the teacher's outputs (rows sum to 1)."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher / teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher - self.center) / teacher_temp, dim=-1)

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: float) -> Tensor:
        s_chunks = (student / self.student_temp).chunk(self.num_crops)
        t_probs = self.teacher_probs(teacher, teacher_temp).detach().chunk(2)
        total, terms = student.new_zeros(()), 0
        for iq, q in enumerate(t_probs):
            for v, s in enumerate(s_chunks):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """EMA of the teacher's mean output over the (global) batch."""
        batch_center = distributed.batch_mean(teacher)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, iterations: int = 3) -> Tensor:
    """Soft assignments of B samples to K prototypes with equal prototype mass over the batch
    (alternating column and row normalisation of exp(logits)); each row sums to 1. With several
    processes the batch is the global one: sums over samples add up every process's."""
    q = torch.exp(logits.double() - distributed.all_max(logits.max())).t()  # K x B
    q /= distributed.all_sum(q.sum())
    k, b = q.shape[0], q.shape[1] * distributed.world().world_size
    for _ in range(iterations):
        q /= distributed.all_sum(q.sum(dim=1, keepdim=True)) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).t().to(logits.dtype)


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser: minus the mean log distance of each L2-normalised
    feature to its nearest neighbour in the batch (lower when features spread out)."""
    x = F.normalize(features, dim=-1, eps=eps)
    dist = torch.cdist(x, x)
    dist = dist + torch.eye(len(x), dtype=x.dtype, device=x.device) * 1e3
    return -torch.log(dist.min(dim=1).values + eps).mean()


def build_student_teacher(arch: str, out_dim: int, drop_path: float, head_hidden: int,
                          head_bottleneck: int, head_batchnorm: bool = False,
                          norm_last_layer: bool = True) -> tuple[DinoModel, DinoModel]:
    """Student (with stochastic depth) and teacher (a frozen copy of it) for DINO."""
    check_vit_name(arch)
    student_vit = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True,
                                    drop_path_rate=drop_path)
    teacher_vit = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    dim = student_vit.num_features
    student = DinoModel(student_vit, DinoHead(dim, out_dim, head_hidden, head_bottleneck,
                                              batchnorm=head_batchnorm, norm_last_layer=norm_last_layer))
    teacher = DinoModel(teacher_vit, DinoHead(dim, out_dim, head_hidden, head_bottleneck,
                                              batchnorm=head_batchnorm, norm_last_layer=norm_last_layer))
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear warmup from ``warmup_start`` to ``base``, then cosine to ``final``."""
    warm = np.linspace(warmup_start, base, warmup, endpoint=False) if warmup > 0 else np.array([])
    steps = np.arange(max(total - warmup, 0))
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warm, cos])[:total]


# ------------------------------------------------------------------ data


class _Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if torch.rand(()) < self.p else img


class _Blur:
    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return img
        radius = float(torch.empty(()).uniform_(*self.sigma)) * img.width / 224.0
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class MultiCrop:
    """DINO's multi-crop views: two global crops (blur 1.0 / 0.1, solarise on the second) and
    ``num_local`` small local crops, each flipped, colour-jittered (brightness, contrast,
    saturation, hue) and sometimes grey, then normalised."""

    def __init__(self, global_size: int, local_size: int, num_local: int,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4),
                 color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                 grayscale_p: float = 0.2, solarize_p: float = 0.2):
        flip_colour = v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(*color_jitter)], p=0.8),
            v2.RandomGrayscale(p=grayscale_p),
        ])
        finish = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = v2.InterpolationMode.BICUBIC
        self.global1 = v2.Compose([v2.RandomResizedCrop(global_size, global_scale, interpolation=bicubic),
                                   flip_colour, _Blur(1.0), finish])
        self.global2 = v2.Compose([v2.RandomResizedCrop(global_size, global_scale, interpolation=bicubic),
                                   flip_colour, _Blur(0.1), _Solarize(solarize_p), finish])
        self.local = v2.Compose([v2.RandomResizedCrop(local_size, local_scale, interpolation=bicubic),
                                 flip_colour, _Blur(0.5), finish])
        self.num_local = num_local

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.num_local)]


class ImageCrops(torch.utils.data.Dataset):
    """Unlabeled images, decoded once and kept in memory, each yielding its multi-crop views."""

    def __init__(self, records: list[ImageRecord], transform: MultiCrop, on_bad_image: str = "fail"):
        self.images: list[Image.Image] = []
        self.skipped: list[dict[str, str]] = []
        for rec in records:
            try:
                self.images.append(Image.fromarray(read_rgb(rec.path)))
            except ImageReadError as err:
                if on_bad_image == "fail":
                    raise
                self.skipped.append({"key": rec.key, "reason": str(err)})
                log.warning("skipping %s: %s", rec.path, err)
        if not self.images:
            raise ValueError("pretraining needs at least one readable image; the split is empty")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[Tensor]:
        return self.transform(self.images[index])


def _collate(batch: list[list[Tensor]]) -> list[Tensor]:
    return [torch.stack(views) for views in zip(*batch, strict=True)]


# ------------------------------------------------------------------ training


@dataclass(frozen=True)
class DinoSchedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray


def schedules(s: PretrainSettings, steps_per_epoch: int, batch_size: int) -> DinoSchedules:
    """Per-step learning rate (``s.lr`` scaled by ``batch_size / 256``), weight decay, teacher
    momentum and teacher temperature."""
    total = s.epochs * steps_per_epoch
    lr = s.lr * batch_size / 256.0
    temp_warm = s.warmup_teacher_temp_epochs * steps_per_epoch
    temps = np.concatenate([
        np.linspace(s.warmup_teacher_temp, s.teacher_temp, temp_warm),
        np.full(max(total - temp_warm, 0), s.teacher_temp),
    ])[:total]
    return DinoSchedules(
        lr=cosine_schedule(lr, s.min_lr, total, s.warmup_epochs * steps_per_epoch),
        weight_decay=cosine_schedule(s.weight_decay, s.weight_decay_end, total),
        momentum=cosine_schedule(s.momentum_teacher, 1.0, total),
        teacher_temp=temps,
    )


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class DinoSteps:
    """The steps of a DINO run, as hooks of :class:`maskdistill.training.TrainingRun`.

    ``extra["curve"]`` collects one entry per epoch (mean losses, last lr and teacher momentum);
    it is checkpointed with the run, so a resumed run returns the whole curve.
    """

    s: PretrainSettings
    student: DinoModel
    teacher: DinoModel
    loss_fn: DinoLoss
    optimizer: torch.optim.Optimizer
    sched: DinoSchedules
    steps_per_epoch: int
    device: torch.device
    extra: dict[str, Any] = field(default_factory=lambda: {"curve": []})

    def set_schedules(self, step: int, _epoch: int) -> None:
        """Learning rate and weight decay (not of biases and norms) of ``step``."""
        for g, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.sched.lr[step])
            if g == 0:
                group["weight_decay"] = float(self.sched.weight_decay[step])

    def loss(self, student: nn.Module, crops: list[Tensor], step: int) -> Losses:
        """DINO loss of a multi-crop batch (plus the weighted KoLeo term); logs both. ``student`` is
        the student or its DDP wrapper; a process's equal share of the batch contributes 1/N of
        its loss (KoLeo: the nearest neighbours within the share, as DINOv2 does)."""
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        student_out, student_cls = student(crops, return_cls=True)
        dino = self.loss_fn(student_out, teacher_out, float(self.sched.teacher_temp[step]))
        koleo = sum(koleo_loss(c) for c in student_cls[:2 * len(crops[0])].chunk(2))
        weight = self.s.koleo_weight
        total = dino + weight * koleo if weight > 0 else dino
        processes = distributed.world().world_size
        if processes > 1:
            total, dino, koleo = total / processes, dino / processes, koleo / processes
        return total, {"loss": dino.item(), "koleo": float(koleo.detach())}

    def edit_gradients(self, _step: int, epoch: int) -> None:
        """Clip the gradient norm; drop the prototypes' gradients while they are frozen."""
        if self.s.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.s.clip_grad)
        if epoch < self.s.freeze_last_layer:
            for p in self.student.head.prototypes.parameters():
                p.grad = None

    def update_teacher(self, step: int, _epoch: int) -> None:
        """The teacher's EMA step towards the student."""
        ema_update(self.teacher, self.student, float(self.sched.momentum[step]))

    def record_epoch(self, epoch: int, logged: list[dict[str, float]]) -> None:
        """Append the epoch's mean losses to ``extra["curve"]``."""
        last = (epoch + 1) * self.steps_per_epoch - 1
        self.extra["curve"].append({
            "epoch": epoch + 1, "step": last + 1,
            "loss": float(np.mean([v["loss"] for v in logged])),
            "koleo": float(np.mean([v["koleo"] for v in logged])),
            "lr": float(self.sched.lr[last]), "teacher_momentum": float(self.sched.momentum[last])})


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled image order of one epoch (the order a shuffling DataLoader seeded with
    ``seed * 1000 + epoch`` draws, after its worker seed)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the loader's worker seed comes first
    return torch.randperm(n, generator=g).tolist()


def pretrain_dino(records: list[ImageRecord], out: Path, checkpoint_dir: Path, s: PretrainSettings,
                  device: torch.device, on_bad_image: str = "fail",
                  data_recipe: dict[str, Any] | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Train a ViT with DINO on ``records``; write the teacher backbone to ``out`` (safetensors)
    and its training curve next to it (``<out>.curve.json``). Resumes from ``checkpoint_dir``.
    ``data_recipe`` (e.g. the demo generator's settings) is recorded in the weights' metadata.
    With several processes each takes a share of every batch (and draws its own crops); rank 0
    writes the files.

    Returns the summary written to the curve file: arch, images, out_dim, skipped, steps, curve.
    """
    world = distributed.world()
    seed_everything(s.seed)
    transform = MultiCrop(s.global_crop_size, s.local_crop_size, s.local_crops, s.global_scale,
                          s.local_scale, s.color_jitter, s.grayscale_p, s.solarize_p)
    data = ImageCrops(records, transform, on_bad_image)
    batch_size = min(s.batch_size, len(data))
    distributed.check_batch_size(batch_size, "pretrain.batch_size")
    steps_per_epoch = max(len(data) // batch_size, 1)
    sched = schedules(s, steps_per_epoch, batch_size)
    student, teacher = build_student_teacher(s.arch, s.out_dim, s.drop_path, s.head_hidden_dim,
                                             s.head_bottleneck_dim, s.head_batchnorm, s.norm_last_layer)
    student.to(device)
    teacher.to(device)
    if world.distributed:  # the teacher's BatchNorm (head_batchnorm) sees the global batch too
        teacher = distributed.convert_sync_batchnorm(teacher, device)
    if world.rank:  # random crops and stochastic depth of its own (DDP gives every process rank 0's weights)
        torch.manual_seed(s.seed * 1000 + world.rank)
    loss_fn = DinoLoss(s.out_dim, 2 + s.local_crops, s.student_temp, centering=s.centering,
                       sinkhorn_iterations=s.sinkhorn_iterations).to(device)
    optimizer = torch.optim.AdamW(_param_groups(student), lr=0.0)
    job = DinoSteps(s, student, teacher, loss_fn, optimizer, sched, steps_per_epoch, device)

    def batches(epoch: int) -> torch.utils.data.DataLoader:
        order = epoch_order(len(data), s.seed, epoch)
        full = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        workers = torch.Generator().manual_seed(s.seed * 1000 + epoch + 7919 * world.rank)
        return torch.utils.data.DataLoader(
            data, batch_sampler=[share for _, share, _ in distributed.shared_batches(full)],
            collate_fn=_collate, generator=workers, num_workers=s.num_workers)

    result = fit(TrainingRun(
        name="dino", model=student, optimizer=optimizer, epochs=s.epochs, steps_per_epoch=steps_per_epoch,
        batches=batches, loss=job.loss, checkpoint_dir=Path(checkpoint_dir), log_every=s.log_every,
        state={"teacher": teacher, "loss": loss_fn}, extra=job.extra, before_step=job.set_schedules,
        before_update=job.edit_gradients, after_step=job.update_teacher, after_epoch=job.record_epoch,
        hint="; lower pretrain.lr", precision=precision))
    curve = job.extra["curve"]
    summary = {"arch": s.arch, "images": len(data), "out_dim": s.out_dim, "skipped": data.skipped,
               "steps": result.steps, "curve": curve}
    if not world.is_main:
        return summary
    export_backbone(teacher.backbone, out, {"arch": s.arch, "epochs": str(s.epochs),
                                            "images": str(len(data)),
                                            "pretrain_config": json.dumps(as_config(s), sort_keys=True,
                                                                          default=str),
                                            "data_recipe": json.dumps(data_recipe or {}, sort_keys=True)})
    write_json(Path(str(out) + ".curve.json"), summary)
    return summary


def export_backbone(backbone: nn.Module, out: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a ViT's weights (no head) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()
             if not k.startswith("head")}
    with atomic_path(out, suffix=".tmp.safetensors") as tmp:
        save_file(state, str(tmp), metadata=metadata or {})
