"""Training of the feed-forward baselines (:mod:`model.baselines`) through the one trainer.

    python train_baseline.py --config configs/train/baseline_aodnet.yaml [--set train.train_steps=2000 ...]

A config has the trainer's sections — ``model`` (``target`` + ``params`` of a network of :mod:`model.baselines`),
``dataset`` (any training dataset: ``StaticPairedData`` pairs, ``HybridTrainingData`` synthesis with its true t,
``ChannelTransfer`` around either), ``train`` (the loop: :class:`training.settings.TrainSettings`; ``sd_path``,
``gradient_checkpointing`` and ``sample_steps`` do not apply) — and ``objective`` (:class:`ObjectiveSettings`):

* data term: ``data_loss`` (mse / l1) between the network output and the clean image, or the true transmission with
  ``predict: transmission`` (MSCNN; synthetic samples only);
* CrossDehaze self-supervised stage: ``ssl_weight`` β0 > 0 adds β(s) · MSE(weak(ŷ), strong(weak(ŷ))), β cosine-decayed
  from β0 over ``ssl_steps`` from ``ssl_start_step`` (:mod:`losses.restoration`); ``init_weights`` starts the
  network from a trained release checkpoint (the first, supervised stage's);
* GAN (DeblurGAN): ``gan: true`` trains the network as the generator against ``critic`` (a model config), with
  ``n_critic`` WGAN-GP critic updates (λ ``gp_weight``) per generator update and the generator loss
  ``adversarial_weight`` · (-D(G(I))) + ``perceptual_weight`` · perceptual(G(I), J) (VGG file ``vgg_path``, L1 without);
  the trainer's non-finite guard checks each of its updates (:func:`gan_step`).

Both optimizers are Adam (``adam_betas``) at ``train.lr_schedule`` / ``learning_rate``; checkpoints
``<exp_dir>/checkpoints/<step:07d>.pt`` hold the network's state dict (``_ema.pt``: its EMA), the file
``inference_baseline.py`` reads.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from losses.restoration import (DATA_LOSSES, PerceptualLoss, critic_loss, data_loss, generator_adversarial_loss,
                                ssl_beta, ssl_consistency)
from training.data import UNREADABLE_KEY, to_device
from training.settings import TrainSettings
from training.state import TrainError
from training.task import Part, TrainTask
from training.trainer import run_config, task_cli, step_seed
from utils.checkpoint import CheckpointError, check_shapes, load_state_dict
from utils.common import instantiate_from_config
from utils.rules import Rule, first_violation, is_int, is_number, optional

log = logging.getLogger("hcdyc.train")


@dataclass(frozen=True)
class ObjectiveSettings:
    """The ``objective.*`` keys of a baseline run (module docstring); defaults: L1 on the image, no SSL, no GAN."""

    data_loss: str = "l1"
    predict: str = "image"
    init_weights: str | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ssl_weight: float = 0.0
    ssl_start_step: int = 0
    ssl_steps: int | None = None
    ssl_crop: float = 0.5
    ssl_sigma: tuple[float, float] = (0.5, 2.0)
    gan: bool = False
    critic: dict | None = None
    n_critic: int = 5
    gp_weight: float = 10.0
    adversarial_weight: float = 1.0
    perceptual_weight: float = 100.0
    vgg_path: str | None = None

    def validate(self) -> None:
        """ValueError naming the ``objective.*`` key of the first bad value."""
        message = first_violation(self, OBJECTIVE_RULES, "objective")
        if message is not None:
            raise ValueError(message)
        if self.gan and (not isinstance(self.critic, dict) or "target" not in self.critic):
            raise ValueError("objective.critic must be a model config (target + params) when objective.gan is true")
        if self.gan and self.predict != "image":
            raise ValueError("objective.gan trains an image-predicting generator: set objective.predict: image")

    def ssl_factor(self, step: int, train_steps: int) -> float:
        """β at optimizer step ``step`` (0 before ``ssl_start_step`` and after the decay)."""
        if self.ssl_weight == 0 or step < self.ssl_start_step:
            return 0.0
        length = self.ssl_steps if self.ssl_steps is not None else train_steps - self.ssl_start_step
        return ssl_beta(step - self.ssl_start_step, length, self.ssl_weight)


def _pair(test):
    return lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(test(x) for x in v)


OBJECTIVE_RULES: tuple[Rule, ...] = (
    (("data_loss",), lambda v: v in DATA_LOSSES, f"one of {', '.join(DATA_LOSSES)}"),
    (("predict",), lambda v: v in ("image", "transmission"), "image or transmission"),
    (("init_weights", "vgg_path"), optional(lambda v: isinstance(v, str)), "a path or null"),
    (("adam_betas",), _pair(lambda x: is_number(x) and 0 <= x < 1), "two numbers in [0, 1)"),
    (("ssl_weight", "gp_weight", "adversarial_weight", "perceptual_weight"), lambda v: is_number(v) and v >= 0,
     "a number >= 0"),
    (("ssl_start_step",), lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    (("ssl_steps",), optional(lambda v: is_int(v) and v > 0), "a positive integer or null"),
    (("n_critic",), lambda v: is_int(v) and v > 0, "a positive integer"),
    (("ssl_crop",), lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    (("ssl_sigma",), _pair(lambda x: is_number(x) and x > 0), "two numbers > 0 (sigma range)"),
    (("gan",), lambda v: isinstance(v, bool), "true or false"),
    (("critic",), optional(lambda v: isinstance(v, dict)), "a model config or null"),
)


def split_baseline_settings(cfg: DictConfig) -> tuple[TrainSettings, ObjectiveSettings]:
    """``cfg.train`` and ``cfg.objective`` -> validated settings; TrainError naming the key otherwise."""
    for section in ("model", "dataset", "train"):
        if section not in cfg:
            raise TrainError(f"config has no '{section}' section")
    train = OmegaConf.to_container(cfg.train, resolve=True)
    objective = OmegaConf.to_container(cfg.get("objective") or {}, resolve=True)
    for name, values, cls in (("train", train, TrainSettings), ("objective", objective, ObjectiveSettings)):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainError(f"unknown {name}.* keys {unknown}; known: {sorted(known)}")
    if train.get("exp_dir") is None:
        raise TrainError("train.exp_dir is required")
    train.setdefault("sd_path", None)
    for key in ("adam_betas", "ssl_sigma"):
        if isinstance(objective.get(key), list):
            objective[key] = tuple(objective[key])
    loop, obj = TrainSettings(**train), ObjectiveSettings(**objective)
    try:
        loop.validate()
        obj.validate()
    except ValueError as err:
        raise TrainError(str(err)) from None
    return loop, obj


def restoration_views(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                       torch.Tensor | None]:
    """(hazy01, clean01, t or None, sample mask or None) of a collated batch: stage-2 pairs hold the hazy input in
    ``condition`` and the clean target in ``target`` ([-1,1]); stage-1 samples (with ``transmission``) the hazy image
    in ``target`` ([-1,1]), the clean one in ``condition``, the true t, and ``is_cond`` False for real photos (no
    clean image: masked out)."""
    if "transmission" in batch:
        return ((batch["target"].float() + 1.0) / 2.0, batch["condition"].float(), batch["transmission"].float(),
                batch["is_cond"].bool())
    return batch["condition"].float(), (batch["target"].float() + 1.0) / 2.0, None, None


class BaselineStep(nn.Module):
    """Loss of one micro-batch for a baseline network (registered submodule ``net``, the only trainable part; the
    perceptual VGG and the GAN critic are plain attributes). ``forward(batch, step, generator, rng)`` ->
    ``{"loss", "terms", "logs"}`` as :class:`training.step.TrainingStep`."""

    def __init__(self, net: nn.Module, objective: ObjectiveSettings, train_steps: int,
                 perceptual: PerceptualLoss | None = None, critic: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.objective, self.train_steps = objective, train_steps
        object.__setattr__(self, "perceptual", perceptual)
        object.__setattr__(self, "critic", critic)

    def forward(self, batch: dict[str, Any], step: int, generator: torch.Generator | None = None,
                rng: random.Random | None = None) -> dict[str, Any]:
        obj = self.objective
        hazy, clean, t, mask = restoration_views(batch)
        pred = self.net(hazy)
        terms: dict[str, torch.Tensor] = {}
        if obj.gan:
            terms["adversarial"] = obj.adversarial_weight * generator_adversarial_loss(self.critic, pred)
            terms["perceptual"] = obj.perceptual_weight * self.perceptual(pred, clean)
        elif obj.predict == "transmission":
            if t is None:
                raise ValueError("objective.predict: transmission needs the true t: a HybridTrainingData dataset")
            terms["data"] = data_loss(obj.data_loss, pred, t, mask)
        else:
            terms["data"] = data_loss(obj.data_loss, pred, clean, mask)
        beta = obj.ssl_factor(step, self.train_steps)
        if beta > 0:
            terms["ssl"] = beta * ssl_consistency(pred, obj.ssl_crop, obj.ssl_sigma, generator)
        loss = sum(terms.values())
        logs = {f"loss_{name}": value.detach() for name, value in terms.items()}
        logs["loss"] = loss.detach()
        return {"loss": loss, "terms": terms, "logs": logs}


def load_network_weights(net: nn.Module, path: str, key: str) -> None:
    """Load a release checkpoint (``checkpoints/<step>.pt``) into ``net``; TrainError naming ``key`` otherwise."""
    try:
        state = load_state_dict(path)
        check_shapes(net, state, path)
        net.load_state_dict(state, strict=True)
    except (FileNotFoundError, CheckpointError, RuntimeError) as err:
        raise TrainError(f"{key}: {str(err).splitlines()[0]}") from None


class BaselineTask(TrainTask):
    """A feed-forward baseline (module docstring): one Adam optimizer, or two with the GAN (custom step)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.loop, self.objective = loop, obj = split_baseline_settings(cfg)
        name = str(cfg.model.get("target", "?")).rsplit(".", 1)[-1]
        self.label, self.run_name = f"baseline {name}", "baseline"
        for key in ("init_weights", "vgg_path"):
            path = getattr(obj, key)
            if path is not None and not Path(path).is_file():
                raise TrainError(f"objective.{key}: file not found: {path}")
        if obj.gan:
            if loop.gradient_accumulation_steps != 1:
                raise TrainError("objective.gan: the critic and generator updates of a step need "
                                 "train.gradient_accumulation_steps: 1")
            self.custom_step = gan_step
        try:
            self.net = instantiate_from_config(cfg.model)
        except (KeyError, TypeError, ValueError, ImportError, AttributeError) as err:
            raise TrainError(f"model section ({cfg.model.get('target')}): {err}") from None

    def build(self, device: torch.device) -> list[Part]:
        obj = self.objective
        self.net = instantiate_from_config(self.cfg.model)  # initialised after the run's seed
        if obj.init_weights is not None:
            load_network_weights(self.net, obj.init_weights, "objective.init_weights")
        perceptual = critic = None
        if obj.gan:
            perceptual = PerceptualLoss(obj.vgg_path).to(device)
            critic = instantiate_from_config(obj.critic).to(device)
        self.step_module = BaselineStep(self.net, obj, self.loop.train_steps, perceptual, critic).to(device)
        parts = [Part(self.step_module, self._adam(self.step_module))]
        if critic is not None:
            parts.append(Part(critic, self._adam(critic)))
        return parts

    def _adam(self, module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=self.loop.lr_at(0),
                                betas=tuple(self.objective.adam_betas))

    def released_weights(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def checkpoint_files(self, ema: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor]]:
        """The network's state dict (+ its EMA copy)."""
        return {"": self.net.state_dict(), **({"_ema": ema} if ema is not None else {})}

    def tracker_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": str(self.cfg.model.get("target"))}
        for key, value in {**dataclasses.asdict(self.loop), **dataclasses.asdict(self.objective)}.items():
            out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        return out

    @torch.no_grad()
    def preview(self, step_module: nn.Module, batch: dict[str, Any], step: int,
                seed: int) -> tuple[torch.Tensor, None]:
        """Rows: restored, clean, hazy, for the first ``train.num_preview`` samples."""
        from torchvision.utils import make_grid

        hazy, clean, _, _ = restoration_views(batch)
        n = self.loop.num_preview
        rows = torch.cat([step_module.net.restore(hazy[:n]), clean[:n], hazy[:n]]).clamp(0, 1).cpu()
        return make_grid(rows, nrow=min(n, hazy.shape[0]), padding=2), None


def gan_step(trainer, data_iter: Iterator[dict[str, Any]]
             ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """One DeblurGAN step on one batch: ``n_critic`` WGAN-GP critic updates against the generator's current output,
    then one generator update (critic frozen). Every draw comes from a generator seeded by (seed, step, process).

    Non-finite values (the trainer's guard, :class:`training.guard.NonFiniteGuard`, as for one optimizer): before each
    update the loss (``critic`` for the critic, the generator's terms) and the gradients of the part it updates are
    checked on every process; the first update with a NaN or an infinity is not taken and ends the step (no later
    critic update, no generator update; the finite critic updates before it stand). Returns (batch, logs, the
    offending names; [] when every update was taken)."""
    acc, loop, obj, guard = trainer.accelerator, trainer.loop, trainer.task.objective, trainer.guard
    critic, critic_optimizer = trainer.extra_parts[0].module, trainer.extra_parts[0].optimizer
    step = trainer.progress.step
    check_gradients = acc.scaler is None  # fp16: overflowing scaled gradients are the gradient scaler's business
    for optimizer in (trainer.optimizer, critic_optimizer):
        for group in optimizer.param_groups:
            group["lr"] = loop.lr_at(step)
    batch = next(data_iter)
    trainer.unreadable.note(batch.pop(UNREADABLE_KEY))
    batch = to_device(batch, acc.device)
    seed = step_seed(loop.seed, step, 0, acc.process_index)
    gen = torch.Generator(device=acc.device).manual_seed(seed)
    hazy, clean, _, _ = restoration_views(batch)
    with torch.no_grad():
        fake = trainer.step_module.net(hazy)
    for _ in range(obj.n_critic):
        critic_optimizer.zero_grad(set_to_none=True)
        loss_critic, critic_logs = critic_loss(critic, clean, fake, obj.gp_weight, gen)
        acc.backward(loss_critic)
        guard.watch_terms({"critic": loss_critic})
        offending = guard.decide(acc, ["critic"], critic.parameters(), check_gradients)
        if offending:
            critic_optimizer.zero_grad(set_to_none=True)
            critic_logs = {"loss": loss_critic.detach(), "loss_critic": loss_critic.detach(), **critic_logs}
            return batch, [critic_logs], offending
        if loop.max_grad_norm is not None:
            acc.clip_grad_norm_(critic.parameters(), loop.max_grad_norm)
        critic_optimizer.step()
    critic_optimizer.zero_grad(set_to_none=True)
    critic.requires_grad_(False)
    try:
        out = trainer.model(batch, step, gen, random.Random(seed))
        acc.backward(out["loss"])
        guard.watch_terms(out["terms"])
        net_parameters = list(trainer.step_module.net.parameters())
        offending = guard.decide(acc, out["terms"], net_parameters, check_gradients)
        if not offending:
            if loop.max_grad_norm is not None:
                acc.clip_grad_norm_(net_parameters, loop.max_grad_norm)
            trainer.optimizer.step()
            guard.took_step(trainer.optimizer.step_was_skipped or critic_optimizer.step_was_skipped)
        trainer.optimizer.zero_grad(set_to_none=True)
    finally:
        critic.requires_grad_(True)
    return batch, [{**out["logs"], "loss_critic": loss_critic.detach(), **critic_logs}], offending


def train_baseline(config: str | Path, overrides: list[str] | None = None) -> int:
    """Train the baseline of a config file with ``--set``-style overrides (``["train.train_steps=100", ...]``) in
    this process; returns the exit status (2: start-up problem, logged as one line)."""
    return run_config(config, overrides, BaselineTask)


def main(default_config: str = "configs/train/baseline_aodnet.yaml") -> None:
    """CLI of ``train_baseline.py``: ``--config`` and ``--set key=value ...``."""
    task_cli("Train a feed-forward dehazing baseline", default_config,
             "baseline YAML (model / dataset / train / objective)", "train.train_steps=1000 train.resume=latest",
             train_baseline)
