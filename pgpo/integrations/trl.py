"""PGPO for TRL users: ``trl.experimental.sdpo.SDPOTrainer`` with the information-modulated step.

Change one line::

    from pgpo.integrations.trl import PGPOSDPOTrainer as SDPOTrainer

and the trainer computes ``I_k`` (Eq. 8) from the student and teacher logits that TRL already
forms, pooled over the gradient-accumulation micro-batches of one optimizer step and over
processes; ``rho_k = min(exp(alpha I_k), rho_max)`` (Eq. 9, any kind, any alpha schedule); and
scales every param group's learning rate by ``rho_k`` for that optimizer step only. AdamW's
moments are untouched and schedulers of every kind see the unscaled rate. Settings:
``PGPOSDPOTrainer(..., pgpo=PGPOSettings(alpha=1.0, rho_max=2.0))``.

Logged into TRL's logs: ``pgpo/info``, ``pgpo/rho``, ``pgpo/alpha``, ``pgpo/entropy_student``,
``pgpo/entropy_teacher`` and ``pgpo/nonfinite`` (steps whose ``I_k`` was not finite: those take
``rho = 1``, an unmodulated step, since the callback cannot undo TRL's own step). A step with no
distilled token (TRL returns a zero loss) has no signal: ``I_k = 0`` and ``rho = rho(0)``.

The distillation loss itself runs through pgpo's fused head (:func:`pgpo.distill.head_divergence`)
by default: both models return their last hidden states, the LM head is applied a few tokens at a
time inside the loss, and ``[B, T, V]`` logits never exist for the student or the teacher. The
same pass gives Eq. 8's entropies. It computes TRL's loss for every ``distillation_mode``
(``full_logits``, ``topk_logits`` with or without ``distillation_add_tail``, ``sampled_token``),
every ``distillation_alpha``, the IS clip (``distillation_is_clip``) and TRL's reduction (token
mean per sequence, then the batch mean), with TRL's logged ``self_distillation/distillation_loss``.
Where it cannot (``distillation_weight`` below 1, whose policy loss needs the student's logits; a
model that takes no ``logits_to_keep``; an LM head with a bias or adapter; a model whose last
hidden state is not its head's input, found by a check on the first batch) the trainer says so in
one warning that names the reason and runs TRL's own loss. ``PGPOSettings(fused_loss=False)``
turns it off.

Refused in one line, where PGPO cannot work: DeepSpeed (its optimizer steps inside the backward
call), ``use_teacher_server`` (no teacher logits), ``distillation_weight == 0`` (no teacher
logits are formed).

The math is this project's own: :mod:`pgpo.information` for Eq. 8, :mod:`pgpo.multiplier` and
:mod:`pgpo.modulation` for Eq. 9 and the schedules.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import torch

from pgpo.distill import DivergenceSpec, head_divergence, head_token_logprobs
from pgpo.information import token_entropy, weighted_entropy_gap
from pgpo.modulation import AlphaSchedule, Modulation
from pgpo.multiplier import DEFAULT_SHARPNESS, Kind
from pgpo.reduction import ChunkBuffers, reduction_denominator, reduction_weights

TESTED = ("1.16.0", "1.17")  # the TRL versions the tests ran against: [1.16.0, 1.17)


def _check_trl():
    if sys.version_info < (3, 11):  # pgpo[trl] is empty there: say why instead of "no trl"
        raise ImportError(
            f"pgpo.integrations.trl needs TRL, and TRL needs Python >= 3.11; this is Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}, where pip install 'pgpo[trl]' installs "
            "nothing"
        )
    try:
        import trl
        from packaging.version import Version
    except ImportError:
        raise ImportError("pgpo.integrations.trl needs TRL: pip install 'pgpo[trl]'") from None
    version = Version(trl.__version__)
    if not (Version(TESTED[0]) <= version < Version(TESTED[1])):
        raise ImportError(
            f"pgpo.integrations.trl is tested with trl >= {TESTED[0]}, < {TESTED[1]}; found "
            f"{trl.__version__} (pip install 'pgpo[trl]')"
        )


_check_trl()

from transformers import TrainerCallback  # noqa: E402
from trl.experimental.sdpo import SDPOTrainer  # noqa: E402

__all__ = ["PGPOSDPOTrainer", "PGPOSettings"]


@dataclass
class PGPOSettings:
    """The multiplier (Eq. 9), how ``I_k`` is reduced (``token_mean``: Eq. 8; ``seq_mean``: token
    mean per sequence, then over sequences), and the alpha schedule (:mod:`pgpo.modulation`)."""

    alpha: float = 1.0
    rho_max: float = 2.0
    kind: Kind = "paper"
    sharpness: float = DEFAULT_SHARPNESS
    info_reduction: str = "token_mean"
    schedule: AlphaSchedule | None = None
    chunk_size: int = 16  # tokens per chunk of the entropy pass and of the fused loss
    fused_loss: bool = True  # TRL's distillation loss from hidden states (see the module)
    _modulation: Modulation = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.info_reduction not in ("token_mean", "seq_mean"):
            raise ValueError(
                f"info_reduction must be token_mean or seq_mean: {self.info_reduction!r}"
            )
        schedule = self.schedule or AlphaSchedule("constant", self.alpha)
        self._modulation = Modulation(self.rho_max, self.kind, self.sharpness, schedule=schedule)
        self._modulation.multiplier(schedule.current())  # refuses invalid parameters now


class _GapSums:
    """Eq. 8's sums over the micro-batches of one optimizer step: ``sum w (H_S - H_T)``,
    ``sum w H_S``, ``sum w H_T`` (unnormalised weights) and the reduction's denominator."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)

    def add(self, student_logits, teacher_logits, mask, reduction: str, chunk_size: int) -> None:
        keep = mask != 0
        h_s = token_entropy(student_logits, keep, chunk_size=chunk_size)
        h_t = token_entropy(teacher_logits, keep, chunk_size=chunk_size)
        self.add_entropies(h_s, h_t, keep, reduction)

    def add_entropies(self, h_s, h_t, keep, reduction: str) -> None:
        """Eq. 8's sums from per-token entropies ``[B, T]`` of the tokens with ``keep``."""
        weights = reduction_weights(keep, reduction, empty_sequences_count=False, denominator=1.0)
        gap = weighted_entropy_gap(h_s, h_t, weights)
        den = reduction_denominator(keep, reduction, empty_sequences_count=False)
        self.sums += torch.stack([*(g.cpu() for g in gap), torch.tensor(den, dtype=torch.float64)])

    def pooled(self, accelerator) -> tuple[float, float, float, float]:
        """(I_k, H_S, H_T, denominator) over all processes: the sums added, then divided."""
        sums = self.sums.to(accelerator.device)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        info, h_s, h_t, den = sums.cpu().tolist()
        if den == 0:
            return 0.0, 0.0, 0.0, 0.0
        return info / den, h_s / den, h_t / den, den


class PGPOSDPOTrainer(SDPOTrainer):
    """``SDPOTrainer`` whose every optimizer step is scaled by ``rho_k`` (see the module)."""

    def __init__(self, *args, pgpo: PGPOSettings | None = None, **kwargs) -> None:
        config = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        _refuse_unsupported(config)
        self.pgpo = pgpo or PGPOSettings()
        self._gap = _GapSums()
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(_DEEPSPEED)
        self.add_callback(_ModulatedStep(self))
        self._fused = False
        if self.pgpo.fused_loss:
            why = self._why_not_fused()
            if why is None:
                self._fused, self._fused_checked = True, False
                self._divergence = self._divergence_spec()
                self._workspace = None  # the loss's [chunk, V] buffers, made at its first call
            else:
                self._fall_back(why)

    def step_multiplier(self, info: float) -> tuple[float, float]:
        """(alpha, rho) of this optimizer step from its ``I_k`` (Eq. 9 with the schedule)."""
        return self.pgpo._modulation.rho(info)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._fused or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self._fused_self_distillation_loss(model, inputs)
        if loss is None:  # the first batch's check failed: TRL's loss from now on
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's scaling for gradient accumulation, as in its compute_loss.
        scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / scale

    def _why_not_fused(self) -> str | None:
        """Why TRL's loss cannot run through the fused head here, or None."""
        if self.args.distillation_weight != 1.0:
            return (f"distillation_weight={self.args.distillation_weight} (the policy loss needs "
                    "the student's logits)")  # fmt: skip
        if self.args.distillation_mode not in ("full_logits", "topk_logits", "sampled_token"):
            return f"distillation_mode={self.args.distillation_mode!r}"
        if self.args.distillation_mode == "sampled_token" and self.args.distillation_alpha != 1.0:
            return "distillation_mode='sampled_token' is reverse KL only (distillation_alpha 1)"
        if self.args.distillation_mode == "topk_logits" and self.args.distillation_topk is None:
            return "distillation_mode='topk_logits' without distillation_topk"
        if "logits_to_keep" not in self.model_kwarg_keys:
            return "the model takes no logits_to_keep"
        for role, m in (("student", self.model), ("teacher", self.teacher_model)):
            head = self.accelerator.unwrap_model(m).get_output_embeddings()
            if type(head) is not torch.nn.Linear or head.bias is not None:
                kind = type(head).__name__
                return f"the {role}'s LM head is not a plain Linear without bias ({kind})"
        return None

    def _divergence_spec(self) -> DivergenceSpec:
        """TRL's distillation settings as the fused loss takes them (made once)."""
        a = self.args
        sampled = a.distillation_mode == "sampled_token"
        topk = a.distillation_topk if a.distillation_mode == "topk_logits" else None
        mode = "sampled_token" if sampled else "logits"
        return DivergenceSpec(a.distillation_alpha, topk, a.distillation_add_tail,
                              self.temperature, mode)  # fmt: skip

    def _fall_back(self, why: str) -> None:
        self._fused = False
        warnings.warn(f"PGPOSDPOTrainer runs TRL's own distillation loss: {why}", stacklevel=3)

    def _completion_hidden(self, model, input_ids, attention_mask, width: int, check: bool):
        """The last hidden states ``[B, width, H]`` that predict the completion's tokens (TRL's
        alignment: the ``width`` positions before the last). The model computes logits for its
        last position only; with ``check``, those logits are compared with the hidden state
        through the head, and False is returned where they differ."""
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)  # fmt: skip
        last = out.hidden_states[-1]
        if check:
            head = self.accelerator.unwrap_model(model).get_output_embeddings().weight
            direct = (last[:, -1] @ head.T).float()
            if not torch.allclose(direct, out.logits[:, -1].float(), rtol=1e-3, atol=1e-3):
                return False
        return last[:, -width - 1 : -1]

    def _fused_self_distillation_loss(self, model, inputs):
        """TRL's distillation loss (``_compute_teacher_student_logits`` and
        ``_compute_self_distillation_loss``) from hidden states: per sequence the token mean of
        the masked per-token divergence (times the clipped IS ratio), then the mean over the
        batch, as token weights into :func:`pgpo.distill.head_divergence`. None where the first
        batch's check of the hidden states fails."""
        args, mode = self.args, ("train" if model.training else "eval")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        width = completion_ids.size(1)
        sd_mask = inputs.get("self_distillation_mask")
        loss_mask = completion_mask if sd_mask is None else completion_mask * sd_mask.unsqueeze(1)
        check = not self._fused_checked
        student = self._completion_hidden(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            width,
            check,
        )
        if student is False:
            self._fall_back("the model's last hidden state is not its LM head's input")
            return None
        self._fused_checked = True
        head = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        if loss_mask.sum() == 0:  # as TRL: a zero loss on the student's graph, zero gradients
            self._log_self_distillation_metric(mode, 0.0)
            return (student.sum() + head.sum()) * 0.0
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            teacher_model, ids = self.teacher_model, inputs["teacher_input_ids"]
            mask = inputs["teacher_attention_mask"]
            teacher = self._completion_hidden(teacher_model, ids, mask, width, False)
            teacher_head = self.accelerator.unwrap_model(teacher_model).get_output_embeddings()
        keep = loss_mask.float()
        weights = keep / keep.sum(-1, keepdim=True).clamp(min=1.0) / keep.shape[0]
        old = inputs.get("old_per_token_logps")
        if args.distillation_is_clip is not None and old is not None:
            logps = head_token_logprobs(student.detach(), head, completion_ids,
                                        self.pgpo.chunk_size, self.temperature)  # fmt: skip
            # TRL's clipped importance ratio: a constant factor on each token's loss.
            ratio = (logps - old).clamp(min=-20.0, max=20.0).exp()
            ratio = ratio.clamp(max=args.distillation_is_clip)
            keep, weights = keep * ratio, weights * ratio
        sampled = self._divergence.mode == "sampled_token"
        if self._workspace is None:  # kept for every later call: allocated once, not per call
            self._workspace = ChunkBuffers(self.pgpo.chunk_size, head.shape[0], student.device)
        loss, h_s, h_t, per_token = head_divergence(
            student, head, teacher, teacher_head.weight, weights, self._divergence,
            chunk_size=self.pgpo.chunk_size, targets=completion_ids if sampled else None,
            return_per_token=True, workspace=self._workspace,
        )  # fmt: skip
        if model.training:  # evaluation passes do not feed I_k
            self._gap.add_entropies(h_s, h_t, loss_mask != 0, self.pgpo.info_reduction)
        mean = (per_token * keep).sum() / loss_mask.sum().clamp(min=1.0)  # TRL's logged loss
        self._log_self_distillation_metric(mode, self.accelerator.gather(mean).mean().item())
        return loss

    def _compute_self_distillation_loss(self, model, inputs, distillation_logits):
        if model.training:  # evaluation passes do not feed I_k
            d = distillation_logits  # logits already divided by args.temperature
            with torch.no_grad():
                self._gap.add(d.student_logits, d.teacher_logits, d.loss_mask,
                              self.pgpo.info_reduction, self.pgpo.chunk_size)  # fmt: skip
        return super()._compute_self_distillation_loss(model, inputs, distillation_logits)


_DEEPSPEED = (
    "PGPO cannot modulate DeepSpeed's optimizer step (it runs inside the backward call): "
    "use PGPOSDPOTrainer without DeepSpeed"
)


def _refuse_unsupported(config) -> None:
    if config is None:
        raise ValueError("PGPOSDPOTrainer needs args=SDPOConfig(...)")
    if getattr(config, "deepspeed", None):
        raise ValueError(_DEEPSPEED)
    if config.use_teacher_server:
        raise ValueError("PGPO needs teacher logits: use_teacher_server=True has none")
    if config.distillation_weight == 0:
        raise ValueError("PGPO needs teacher logits: distillation_weight=0 forms none")


class _ModulatedStep(TrainerCallback):
    """Scales every param group's lr by rho_k after clipping (``on_pre_optimizer_step``) and
    restores it right after the step (``on_optimizer_step``, before the scheduler steps)."""

    def __init__(self, trainer: PGPOSDPOTrainer) -> None:
        self.trainer = trainer
        self.saved: list[float] | None = None
        self.last: tuple[float, float] | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        t = self.trainer
        info, h_s, h_t, _ = t._gap.pooled(t.accelerator)
        finite = math.isfinite(info)
        alpha, rho = t.step_multiplier(info) if finite else (float("nan"), 1.0)
        if not math.isfinite(rho):
            finite, rho = False, 1.0
        self.saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * rho
        self.last = (info, rho) if finite else None
        metrics = t._metrics["train"]
        for key, value in (("info", info), ("rho", rho), ("alpha", alpha),
                           ("entropy_student", h_s), ("entropy_teacher", h_t),
                           ("nonfinite", float(not finite))):  # fmt: skip
            metrics[f"pgpo/{key}"].append(value)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        for group, lr in zip(optimizer.param_groups, self.saved or []):
            group["lr"] = lr
        self.saved = None
        if self.last is not None:
            self.trainer.pgpo._modulation.observe(*self.last)
        self.trainer._gap.reset()
