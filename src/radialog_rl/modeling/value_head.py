"""Scalar value head on a (PEFT-wrapped) LLaVA policy, sharing its trunk.

``LlavaWithValueHead`` returns the policy's logits and one value per token position, aligned with
the (image-expanded) ``input_ids``. The head is TRL's layout (dropout then ``Linear(hidden, 1)`` on the
last hidden state, keys ``v_head.summary.{weight,bias}``; ``docs/checkpoint-format.md`` §9) so existing PPO
checkpoints resume. It is zero-initialised by default (Huang et al. 2024, detail 9) and its dropout
defaults to 0 so the first PPO ratio is exactly 1.

The reference policy for PPO runs on the same network (no second copy of the model):
:meth:`LlavaWithValueHead.reference_policy` is a context in which forward passes give the
reference's outputs, either with the LoRA adapter disabled (a fresh adapter on a base that already
holds the SFT weights) or with a frozen copy of a pretrained adapter active (RaDialog's LoRA as the
starting policy: disabling it would give plain LLaVA). ``reference_mode`` records which.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from radialog_rl.modeling.llava import unwrap_llava

logger = logging.getLogger(__name__)


class ReferenceMode(str, enum.Enum):
    """How :meth:`LlavaWithValueHead.reference_policy` obtains PPO's reference policy.

    Members compare equal to (and print as) the strings configs, logs and checkpoints have always
    used (``enum.StrEnum`` would do this, but it needs Python 3.11 and we support 3.10).
    """

    #: The LoRA adapter disabled: the base already holds the starting (SFT-merged) weights.
    DISABLE_ADAPTER = "disable_adapter"
    #: A frozen copy of the starting adapter, named :data:`REFERENCE_ADAPTER_NAME`, made active.
    FROZEN_COPY = "frozen_adapter_copy"

    def __str__(self) -> str:
        return self.value


REFERENCE_DISABLE_ADAPTER = ReferenceMode.DISABLE_ADAPTER
REFERENCE_FROZEN_COPY = ReferenceMode.FROZEN_COPY
REFERENCE_ADAPTER_NAME = "reference"


class ValueHead(nn.Module):
    """``[B, T, hidden] -> [B, T]``: dropout, then ``summary = Linear(hidden, 1)`` (TRL's names)."""

    def __init__(self, hidden_size: int, dropout: float = 0.0, zero_init: bool = True):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)
        if zero_init:
            nn.init.zeros_(self.summary.weight)
            nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden_states)).squeeze(-1)


@dataclass
class ValueHeadOutput:
    """``logits [B, T, vocab]``, ``values [B, T]`` (float32), optional LM ``loss``."""

    logits: torch.Tensor
    values: torch.Tensor
    loss: torch.Tensor | None = None


class _HiddenCapture:
    """Forward hook that keeps its module's latest output (the value head reads it).

    The hook object, not the wrapper, is what the trunk's ``model.norm`` holds, so the policy never
    keeps a discarded wrapper alive, and ``copy.deepcopy`` of a wrapper gives the copy its own
    capture (the memo maps this object to the copy's).
    """

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.output = output


def remove_value_head_hooks(llava: nn.Module, capture: _HiddenCapture | None = None) -> int:
    """Remove value-head capture hooks from ``llava.model.norm`` (only ``capture`` when given, else
    all of them, e.g. from a deep copy of a trunk that carried one). Returns how many went."""
    hooks = llava.model.norm._forward_hooks
    keys = [k for k, hook in hooks.items()
            if (hook is capture if capture is not None else isinstance(hook, _HiddenCapture))]
    for key in keys:
        del hooks[key]
    return len(keys)


class LlavaWithValueHead(nn.Module):
    """A causal LM (``LlavaLlamaForCausalLM`` or a ``PeftModel`` of it) plus a value head.

    Attributes:
        pretrained_model: the policy network (TRL's attribute name).
        v_head: :class:`ValueHead` (kept in float32: it is tiny and its output feeds the losses).
        reference_mode: how :meth:`reference_policy` obtains the reference (None: no reference).
    """

    def __init__(
        self,
        pretrained_model: nn.Module,
        dropout: float = 0.0,
        zero_init: bool = True,
        reference_mode: ReferenceMode | str | None = None,
    ):
        super().__init__()
        self.pretrained_model = pretrained_model
        llava = unwrap_llava(pretrained_model)
        self.config = llava.config
        self.v_head = ValueHead(llava.config.hidden_size, dropout=dropout, zero_init=zero_init)
        device = next(llava.parameters()).device
        self.v_head.to(device=device, dtype=torch.float32)
        self.reference_mode = ReferenceMode(reference_mode) if reference_mode is not None else None
        # The final RMSNorm's output is the last hidden state the LM head sees; a hook captures it
        # without asking the trunk for every layer's hidden states. The hook goes away with the
        # wrapper (__del__) or with remove_hook(); the policy is left as it was before.
        self._capture = _HiddenCapture()
        llava.model.norm.register_forward_hook(self._capture)
        self.train(pretrained_model.training)

    def remove_hook(self) -> None:
        """Detach the value head's capture hook from the policy's ``model.norm`` now (it also goes
        when the wrapper is garbage collected). The wrapper cannot compute values afterwards."""
        try:
            llava = unwrap_llava(self.pretrained_model)
        except (AttributeError, KeyError):  # half-built or being torn down
            return
        remove_value_head_hooks(llava, self._capture)

    def __del__(self) -> None:
        # Runs when the last reference to the wrapper goes (nothing in the policy refers back).
        with contextlib.suppress(Exception):
            self.remove_hook()

    @property
    def llava(self) -> nn.Module:
        """The ``LlavaLlamaForCausalLM`` inside the policy."""
        return unwrap_llava(self.pretrained_model)

    def forward(self, input_ids=None, attention_mask=None, images=None, prior_images=None,
                image_features=None, labels=None, **kwargs) -> ValueHeadOutput:
        """Policy forward plus values.

        Args are those of ``LlavaLlamaForCausalLM.forward``. Returns :class:`ValueHeadOutput` whose
        ``values [B, T']`` align one-to-one with the logits (image positions included).
        """
        self._capture.output = None
        out = self.pretrained_model(
            input_ids=input_ids, attention_mask=attention_mask, images=images, prior_images=prior_images,
            image_features=image_features, labels=labels, **kwargs,
        )
        hidden, self._capture.output = self._capture.output, None
        if hidden is None:
            raise RuntimeError("the value head's hook is gone (remove_hook was called): rebuild the wrapper")
        values = self.v_head(hidden).float()
        return ValueHeadOutput(logits=out.logits, values=values, loss=getattr(out, "loss", None))

    def generate(self, *args, **kwargs):
        """Generation passes straight through to the policy."""
        return self.pretrained_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """Within this context, forward passes compute the reference policy (see module docstring).

        Trainable flags of the adapters are restored on exit. Values computed inside are not
        meaningful (the head belongs to the policy).
        """
        if self.reference_mode == REFERENCE_DISABLE_ADAPTER:
            with self.pretrained_model.disable_adapter():
                yield
        elif self.reference_mode == REFERENCE_FROZEN_COPY:
            peft_model = self.pretrained_model
            active = peft_model.active_adapter
            flags = {p: p.requires_grad for p in peft_model.parameters()}
            peft_model.set_adapter(REFERENCE_ADAPTER_NAME, inference_mode=True)
            try:
                yield
            finally:
                peft_model.set_adapter(active)
                for p, flag in flags.items():
                    p.requires_grad_(flag)
        else:
            raise RuntimeError(
                "this model has no reference policy: build it with one of the PPO entry points "
                "(load_pretrained_llava_model_for_ppo_training...)"
            )

    def value_head_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"v_head.summary.weight": [1, hidden], "v_head.summary.bias": [1]}`` (TRL's keys)."""
        return {f"v_head.{k}": v.detach().cpu() for k, v in self.v_head.state_dict().items()}
