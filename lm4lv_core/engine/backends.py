"""Training backends: DeepSpeed (ZeRO 0–3, bf16/fp16) and accelerate (data parallel).

Both expose the same small surface to ``loop.Trainer``: ``wrap`` (model + torch AdamW + LambdaLR),
``forward`` (the module to call), ``backward``, ``step`` (only at accumulation boundaries),
``gathered`` (full parameters under ZeRO-3), ``full_trainable_state_dict``, ``save`` / ``load``
of the optimizer, scheduler and weights into a checkpoint folder.

Non-finite steps: at an accumulation boundary the loop says whether the step's loss was finite on
every rank; the optimizer (:class:`GuardedAdamW`, the innermost one on both engines) refuses the
update when it was not, or when a gradient is non-finite on any rank, leaving weights and
optimizer state as they were. DeepSpeed's own optimizers (ZeRO 1–3, bf16, fp16) already skip a
step whose gradient norm is non-finite; ``step`` reports either skip as a :class:`StepOutcome`,
telling a skip of fp16's dynamic loss scaler (normal while it finds its scale) apart. A skipped
step still advances the learning-rate schedule, which stays a function of the step.

DeepSpeed never builds JIT ops here: the optimizer is a torch ``AdamW`` and the shared-memory
comm op is switched off before ``deepspeed.initialize``. Its checkpoint files are read back with
``torch.load(weights_only=True)``, allowing only DeepSpeed's three checkpoint types.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

import copy

from ..util import dist
from ..defaults import WEIGHTS_FILE
from .checkpoint import load_weights, save_weights
from ..config import load_yaml
from ..errors import ConfigError
from ..precision import precision
from ..util.fsutil import torch_save
from .config import TrainConfig

DS_TAG = "ckpt"


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that refuses a step whose loss the loop reported non-finite (``skip_next``)
    or whose gradients hold a NaN / inf on any rank (a collective: every rank calls ``step``
    alike). ``overflow`` says the last step was refused; DeepSpeed reads it where this optimizer
    is its own (ZeRO-0 in fp32) and then skips the step like an fp16 overflow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_next = False
        self.overflow = False

    def step(self, closure=None):  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = self.skip_next
        if grads and not bad:
            with torch.no_grad():
                bad = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        self.overflow = dist.any_rank(bad)
        if self.overflow:
            return None
        return super().step(closure)


@dataclass(frozen=True)
class StepOutcome:
    """What became of one optimizer step: ``applied`` to the weights, or skipped; a skip of
    fp16's dynamic loss scaler (``loss_scale_skip``) is normal and not a sign of divergence."""

    applied: bool
    loss_scale_skip: bool = False

    @property
    def nonfinite(self) -> bool:
        return not self.applied and not self.loss_scale_skip


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> GuardedAdamW:
    return GuardedAdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                        foreach=False)


class Backend:
    name = "base"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = dist.device()
        self.module: nn.Module | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None

    @property
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def optimizer_param_count(self) -> int:
        raise NotImplementedError

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self, params: Iterable[nn.Parameter]) -> ContextManager:
        return contextlib.nullcontext()

    def full_trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full-size trainable tensors on every rank (collective under ZeRO-3)."""
        return self.full_state_dict()

    def full_state_dict(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Full-size fp32 CPU copies of the named parameters (default: the trainable ones), frozen
        ones included, on every rank (collective under ZeRO-3, which partitions every parameter)."""
        if names is None:
            named = self.trainable
        else:
            wanted = set(names)
            named = [(n, p) for n, p in self.module.named_parameters() if n in wanted]
        with self.gathered([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- DeepSpeed
def _weights_only_load(path: str, map_location=None):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _save_keeping_write_errors(state_dict, path: str) -> None:
    torch_save(state_dict, path)  # a full disk is reported as such, not as torch's "unexpected pos"


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def setup(self) -> None:
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the shm op
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines drown the progress bar
        deepspeed.init_distributed(dist_backend=dist.backend_name(), verbose=False)

    def ds_config(self) -> dict[str, Any]:
        c = self.cfg
        conf: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": c.micro_batch,
            "gradient_accumulation_steps": c.grad_accum,
            "train_batch_size": c.micro_batch * c.grad_accum * dist.world_size(),
            "gradient_clipping": c.grad_clip,
            "zero_optimization": {"stage": c.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**12,
            "wall_clock_breakdown": False,
        }
        conf.update(copy.deepcopy(precision(c.precision).deepspeed or {}))
        if c.deepspeed_config:
            _deep_update(conf, checked_deepspeed_overrides(c, dist.world_size()))
        return conf

    def wrap(self, model: nn.Module, lr_lambda: Callable[[int], float]) -> None:
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        # DeepSpeed casts the module to bf16/fp16 and builds its float32 masters from that cast;
        # the exact float32 values are put back into the masters below
        exact = [(p, p.detach().clone()) for p in params if p.dtype == torch.float32] \
            if precision(self.cfg.precision).mixed else []
        opt = make_optimizer(params, self.cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, model_parameters=params, config=self.ds_config())
        set_exact_masters(self.optimizer, exact)
        self.engine.checkpoint_engine.load = _weights_only_load
        self.engine.checkpoint_engine.save = _save_keeping_write_errors
        self.module = self.engine.module
        self._torch_optimizer = opt
        self.device = self.engine.device

    def optimizer_param_count(self) -> int:
        """Elements of the parameters the optimizer updates (ZeRO: the groups it partitions)."""
        groups = getattr(self.optimizer, "bit16_groups", None) or getattr(self.optimizer, "fp16_groups", None)
        if groups is None:
            groups = [g["params"] for g in self._torch_optimizer.param_groups]
        return sum(getattr(p, "ds_numel", p.numel()) for g in groups for p in g)

    @property
    def forward(self) -> nn.Module:
        return self.engine

    def no_sync(self, boundary: bool) -> ContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces only at accumulation boundaries itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scaled by 1 / grad_accum inside

    def step(self, boundary: bool, skip: bool = False) -> StepOutcome | None:
        """One micro-step; at the boundary the optimizer step (refused when ``skip``: the loss
        was non-finite) and its outcome."""
        if boundary:
            self._torch_optimizer.skip_next, self._torch_optimizer.overflow = skip, False
        self.engine.step()  # steps optimizer + scheduler only at the boundary
        if not boundary:
            return None
        engine_applied = self.engine.was_step_applied()  # False: DeepSpeed skipped it (non-finite norm)
        refused = self._torch_optimizer.overflow and engine_applied  # refused inside a DeepSpeed optimizer
        if not engine_applied:
            self.scheduler.step()  # DeepSpeed does not advance the schedule over a step it skips
        applied = engine_applied and not refused
        scaler = not applied and not skip and not self._torch_optimizer.overflow \
            and precision(self.cfg.precision).loss_scaled
        return StepOutcome(applied, loss_scale_skip=scaler)

    def gathered(self, params: Iterable[nn.Parameter]) -> ContextManager:
        if self.cfg.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return contextlib.nullcontext()

    def save(self, ckpt: Path, weights: dict[str, torch.Tensor]) -> None:
        if dist.is_main():
            save_weights(weights, ckpt / WEIGHTS_FILE)
        self.engine.save_checkpoint(str(ckpt / "deepspeed"), tag=DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, ckpt: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"{ckpt}: DeepSpeed checkpoint could not be loaded")


def set_exact_masters(optimizer: Any, exact: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Write float32 ``(param, value)`` pairs into DeepSpeed's master copies: ZeRO 1–3 and the
    bf16 optimizer through ``safe_set_full_fp32_param``, ZeRO 0 (fp16/bf16) into ``fp32_groups``."""
    if not exact:
        return
    from deepspeed.utils import safe_set_full_fp32_param

    lp_groups, hp_groups = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if lp_groups is not None and hp_groups is not None and not hasattr(exact[0][0], "_hp_mapping"):
        hp_of = {id(lp): hp for lg, hg in zip(lp_groups, hp_groups) for lp, hp in zip(lg, hg)}
        with torch.no_grad():
            for p, value in exact:
                if id(p) in hp_of:
                    hp_of[id(p)].copy_(value)
        return
    for p, value in exact:
        safe_set_full_fp32_param(p, value.to(p.device))


# ----------------------------------------------------------------------------- accelerate
class AccelerateBackend(Backend):
    name = "accelerate"

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        mp = precision(self.cfg.precision).accelerate  # (fp16: checked by the parent)
        from accelerate.state import AcceleratorState, GradientState

        # a job that runs in this process after another (the Python API, the quickstart) sets up
        # its own precision: accelerate keeps the first one process-wide otherwise and refuses
        # a different one (the process group, held by PartialState, stays)
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision=mp,
                                       kwargs_handlers=[InitProcessGroupKwargs(backend=dist.backend_name())])
        self.device = self.accelerator.device

    def wrap(self, model: nn.Module, lr_lambda: Callable[[int], float]) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.cfg)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        # the scheduler stays unprepared: accelerate would step it once per process
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        self.module = self.accelerator.unwrap_model(self.model)
        self._torch_optimizer = opt

    def optimizer_param_count(self) -> int:
        return sum(p.numel() for g in self._torch_optimizer.param_groups for p in g["params"])

    @property
    def forward(self) -> nn.Module:
        return self.model

    def no_sync(self, boundary: bool) -> ContextManager:
        return contextlib.nullcontext() if boundary else self.accelerator.no_sync(self.model)

    def autocast(self) -> ContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.cfg.grad_accum)

    def step(self, boundary: bool, skip: bool = False) -> StepOutcome | None:
        """At the boundary: clip, the optimizer step (refused when ``skip``: the loss was
        non-finite) and its outcome."""
        if not boundary:
            return None
        if self.cfg.grad_clip:
            self.accelerator.clip_grad_norm_([p for _, p in self.trainable], self.cfg.grad_clip)
        self._torch_optimizer.skip_next, self._torch_optimizer.overflow = skip, False
        self.optimizer.step()
        scaler = bool(self.optimizer.step_was_skipped)  # fp16's GradScaler found an inf/NaN gradient
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        applied = not scaler and not self._torch_optimizer.overflow
        return StepOutcome(applied, loss_scale_skip=scaler and not skip)

    def save(self, ckpt: Path, weights: dict[str, torch.Tensor]) -> None:
        if not dist.is_main():
            return
        save_weights(weights, ckpt / WEIGHTS_FILE)
        state = {"optimizer": self._torch_optimizer.state_dict()}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        torch_save(state, ckpt / "optimizer.pt")
        sd = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        (ckpt / "scheduler.json").write_text(json.dumps(sd), encoding="utf-8")

    def load(self, ckpt: Path) -> None:
        weights = load_weights(ckpt / WEIGHTS_FILE)
        want = {n for n, _ in self.trainable}
        if set(weights) != want:
            raise ConfigError(f"{ckpt}: trainable weights do not match the model "
                              f"(missing {sorted(want - set(weights))[:3]}, extra {sorted(set(weights) - want)[:3]})")
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(weights[n].to(p.dtype))
        state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        self._torch_optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        sd = json.loads((ckpt / "scheduler.json").read_text(encoding="utf-8"))
        sd["lr_lambdas"] = [None]
        self.scheduler.load_state_dict(sd)


def make_backend(cfg: TrainConfig) -> Backend:
    return {"deepspeed": DeepSpeedBackend, "accelerate": AccelerateBackend}[cfg.engine](cfg)


def _read_mapping(path: str) -> dict[str, Any]:
    if str(path).endswith(".json"):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--deepspeed-config {path}: cannot read JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--deepspeed-config {path}: expected a JSON object")
        return data
    return load_yaml(path)


def checked_deepspeed_overrides(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The user's ``--deepspeed-config`` file; batch and clipping keys must agree with the options
    the training loop itself follows (micro-steps, accumulation, schedule)."""
    user = _read_mapping(cfg.deepspeed_config)
    owned = {"train_micro_batch_size_per_gpu": ("--micro-batch", cfg.micro_batch),
             "gradient_accumulation_steps": ("--grad-accum", cfg.grad_accum),
             "train_batch_size": ("--micro-batch x --grad-accum x workers", cfg.micro_batch * cfg.grad_accum * world),
             "gradient_clipping": ("--grad-clip", cfg.grad_clip)}
    for key, (option, value) in owned.items():
        if key in user and user[key] != value:
            raise ConfigError(f"--deepspeed-config {cfg.deepspeed_config}: {key} = {user[key]} disagrees with "
                              f"{option} ({value}); set it through the option instead")
    return user


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
