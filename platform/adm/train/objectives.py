"""What each training minimises: the only part that differs between the three trainings.

- diffusion: the diffusion's `training_losses` (L_hybrid with a learned variance) at timesteps
  from the configured sampler, importance-weighted; with `class_dropout_prob` > 0, each label
  is replaced by the null class with that probability (classifier-free guidance's training);
- upsampler: the same, with the low-resolution image as `low_res`;
- classifier: cross-entropy of the labels on x_t at uniformly drawn t (or x_0, t = 0, when
  `optim.noised` is off), with top-1/top-5 accuracy; `evaluate` reports held-out accuracy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import factory
from ..diffusion import LossSecondMomentResampler, create_named_schedule_sampler
from .config import TrainConfig


LABEL_DROPOUT_STREAM = 1  # keeps the label-dropout seed of a step apart from its other draws


class DiffusionObjective:
    """L_simple (+ λ L_vlb) of guided-diffusion's `TrainLoop`, for the U-Net or the upsampler."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        flags = cfg.model_flags
        self.diffusion = factory.create_diffusion({**flags, "timestep_respacing": ""})
        self.sampler = create_named_schedule_sampler(cfg.optim.schedule_sampler, self.diffusion)
        self.num_timesteps = self.diffusion.num_timesteps
        self.class_cond = flags.get("class_cond", False)  # classifiers have no such flag
        # Label dropout (classifier-free guidance): the null class is label num_classes.
        self.class_dropout_prob = float(flags.get("class_dropout_prob", 0.0)) \
            if self.class_cond else 0.0
        self.null_label = int(flags.get("num_classes", 0))
        self.label_generator: torch.Generator | None = None  # see `reseed`
        self.superres = cfg.kind == "upsampler"
        self.device = device

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """labels [B] int64 with each replaced by the null class with probability
        `class_dropout_prob` (independently), drawn from the step's generator (`reseed`; the
        global one before any reseed); the labels themselves when the probability is 0."""
        if self.class_dropout_prob <= 0:
            return labels
        u = torch.rand(labels.shape, generator=self.label_generator)  # on the CPU: any device
        drop = (u < self.class_dropout_prob).to(labels.device)
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def losses(self, model, batch: dict):
        """(scalar loss to minimise, per-example terms {name: [B]}, timesteps [B])."""
        x = batch["image"]
        t, weights = self.sampler.sample(x.shape[0], self.device)
        kwargs = {}
        if self.class_cond:
            kwargs["y"] = self.drop_labels(batch["label"])
        if self.superres:
            kwargs["low_res"] = batch["low_res"]
        terms = self.diffusion.training_losses(model, x, t, model_kwargs=kwargs)
        return (terms["loss"] * weights).mean(), {k: v.detach() for k, v in terms.items()}, t

    def reseed(self, seed: int) -> None:
        """Draw the next timesteps, and label dropouts, from generators seeded with `seed` (see
        `loop.step_seed`). The dropout's torch generator takes a seed derived from `seed`
        apart: the loop seeds torch's global generator (the noise of x_t) with `seed` itself,
        and the same seed would make the dropout's uniforms those of the noise's stream."""
        self.sampler.reseed(seed)
        if self.class_dropout_prob > 0:
            derived = np.random.SeedSequence([seed, LABEL_DROPOUT_STREAM]).generate_state(
                1, np.uint64)[0] >> 1
            self.label_generator = torch.Generator().manual_seed(int(derived))

    @property
    def loss_aware(self) -> bool:
        """Whether the timestep sampler learns from the losses (then feed `update_sampler`)."""
        return isinstance(self.sampler, LossSecondMomentResampler)

    def update_sampler(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Feed the loss-aware sampler with every worker's (t, loss), identically everywhere."""
        self.sampler.update_with_all_losses(t.tolist(), losses.float().tolist())

    def state_dict(self) -> dict:
        if isinstance(self.sampler, LossSecondMomentResampler):
            return {k: torch.from_numpy(v) for k, v in self.sampler.state_dict().items()}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state and isinstance(self.sampler, LossSecondMomentResampler):
            self.sampler.load_state_dict({k: v.numpy() for k, v in state.items()})

    def evaluate(self, model, val_shard, cfg, reduce) -> dict:
        return {}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[B] float: 1 where the label is among the k largest logits."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).float()


class ClassifierObjective(DiffusionObjective):
    """The noisy-image classifier of guided-diffusion's `classifier_train.py`."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        super().__init__(cfg, device)
        self.sampler = create_named_schedule_sampler("uniform", self.diffusion)
        self.noised = cfg.optim.noised

    def _noised(self, x: torch.Tensor):
        if not self.noised:
            return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        t, _ = self.sampler.sample(x.shape[0], self.device)
        return self.diffusion.q_sample(x, t), t

    def losses(self, model, batch: dict):
        x_t, t = self._noised(batch["image"])
        logits = model(x_t, self.diffusion.model_timesteps(t)).float()
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels, reduction="none")
        terms = {"loss": loss.detach(), "acc_top1": topk_accuracy(logits.detach(), labels, 1),
                 "acc_top5": topk_accuracy(logits.detach(), labels, 5)}
        return loss.mean(), terms, t

    @torch.no_grad()
    def evaluate(self, model, val_shard, cfg, reduce) -> dict:
        """Held-out loss and top-1/top-5 accuracy on `run.eval_batches` batches, noised as in
        training, averaged over workers."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, device=self.device)
        for i, batch in enumerate(val_shard.iter_torch_batches(
                batch_size=cfg.per_worker_batch, device=self.device)):
            if i >= cfg.run.eval_batches:
                break
            x_t, t = self._noised(batch["image"])
            logits = model(x_t, self.diffusion.model_timesteps(t)).float()
            labels = batch["label"]
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                 topk_accuracy(logits, labels, 1).sum(),
                                 topk_accuracy(logits, labels, 5).sum(),
                                 torch.tensor(float(len(labels)), device=self.device)])
        model.train(was_training)
        sums = reduce(sums)
        n = max(sums[3].item(), 1.0)
        return {"val_loss": sums[0].item() / n, "val_acc_top1": sums[1].item() / n,
                "val_acc_top5": sums[2].item() / n, "val_images": sums[3].item()}


def make_objective(cfg: TrainConfig, device: torch.device) -> DiffusionObjective:
    return (ClassifierObjective if cfg.kind == "classifier" else DiffusionObjective)(cfg, device)
