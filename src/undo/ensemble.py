"""An ensemble of causal LMs served as one Hugging Face model (SISA's shard models).

`EnsembleForCausalLM` holds K member models of one architecture. Its forward returns as
`logits` log(mean_k softmax(logits_k)): the log of the members' mean next-token
distribution. A softmax of these logits is that mean exactly, so argmax, cross-entropy,
sampling and greedy generation all see the ensemble's aggregate, and every tool that reads
`.logits` (evaluation, relearning attacks, quantization) works unchanged.

It is a plain `PreTrainedModel`: `save_pretrained` writes a config (model_type
"undo_ensemble", the members' config inside it) and safetensors weights
(`members.<k>.<member's own names>`), and `AutoModelForCausalLM` / `models.load_model` load
it back: the two classes are registered with the Auto classes when this module is imported
(`models.py` imports it).

Generation keeps one KV cache per member (`EnsembleCache`). What works on it unchanged:
evaluation, relearning attacks (they finetune every member through the aggregate), few-shot
prompting, quantization, UNDO (noise every member, distill into a noised ensemble). Limits:
tools that read the residual stream through `arch.py` (probes, directional ablation) and the
suffix search (`inputs_embeds`) have no single stream or embedding to use and stop with one
clear message; quantization leaves only member 0's output head unrounded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .errors import UndoError

MODEL_TYPE = "undo_ensemble"
# read by tools that look at a model's config (sequence-length checks, generation's token ids)
SHARED_FIELDS = ("vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")


def mean_softmax_logits(member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log(mean_k softmax(l_k)) over the members' logits (float32), computed stably as
    logsumexp_k log_softmax(l_k) - log K."""
    log_probs = torch.stack([F.log_softmax(logits.float(), dim=-1) for logits in member_logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(member_logits))


def architecture(config: PretrainedConfig) -> dict[str, Any]:
    """A member's config as saved inside the ensemble's: without where it was loaded from."""
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}


class EnsembleConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    member: Optional[dict] = None          # the members' config (`to_dict()`), one architecture for all
    num_members: int = 1
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    tie_word_embeddings: bool = False      # the members tie their own heads; the ensemble has none

    def __post_init__(self, **kwargs: Any) -> None:
        self.member = dict(self.member or {})
        for key in SHARED_FIELDS:
            if getattr(self, key) is None:
                setattr(self, key, self.member.get(key))
        super().__post_init__(**kwargs)

    def member_config(self) -> PretrainedConfig:
        if "model_type" not in self.member:
            raise UndoError("an ensemble config needs its members' config (with model_type); "
                            "build ensembles with EnsembleForCausalLM.from_members")
        return CONFIG_MAPPING[self.member["model_type"]].from_dict(self.member)


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    """K causal LMs; logits = log of their mean next-token distribution."""

    config_class = EnsembleConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: EnsembleConfig, members: Optional[Sequence[PreTrainedModel]] = None):
        super().__init__(config)
        if members is None:
            members = [AutoModelForCausalLM.from_config(config.member_config()) for _ in range(config.num_members)]
        self.members = torch.nn.ModuleList(members)
        self.post_init()
        # post_init looks only at direct children; the members' tied heads sit one level down
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    @classmethod
    def from_members(cls, members: Sequence[PreTrainedModel]) -> "EnsembleForCausalLM":
        """The ensemble of these models (used as they are, not copied); all of one architecture."""
        if not members:
            raise UndoError("an ensemble needs at least one member model")
        first = architecture(members[0].config)
        if any(architecture(m.config) != first for m in members[1:]):
            raise UndoError("ensemble members must share one architecture and config; "
                            "train every member from the same model config")
        return cls(EnsembleConfig(member=first, num_members=len(members)), members=list(members))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build one cache for all members: forward keeps one per member

    def get_input_embeddings(self) -> torch.nn.Module:
        # member 0's: with tied members, models.non_embedding_params then counts every member's
        # head (its embedding matrix) exactly once as matmul work
        return self.members[0].get_input_embeddings()

    def get_output_embeddings(self) -> Optional[torch.nn.Module]:
        return self.members[0].get_output_embeddings()

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, labels: Optional[torch.LongTensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, cache: Optional["EnsembleCache"] = None,
                use_cache: Optional[bool] = None, **kwargs: Any) -> CausalLMOutputWithPast:
        if inputs_embeds is not None:
            raise UndoError("an ensemble's members have embeddings of their own; call it with input_ids, "
                            "not inputs_embeds")
        use_cache = bool(use_cache) or cache is not None  # generation asks for one; training never does
        caches = cache.members if cache is not None else [None] * len(self.members)
        outs = [m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=c,
                  use_cache=use_cache) for m, c in zip(self.members, caches)]
        logits = mean_softmax_logits([out.logits for out in outs])
        loss = None
        if labels is not None:  # next-token CE of the aggregate (HF's shift)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      cache=EnsembleCache([out.cache for out in outs]) if use_cache else None)


class EnsembleCache:
    """The members' KV caches, one each, as generate's `cache`: it keeps it between steps and
    hands it back; greedy and sampling ask nothing else of it."""

    is_compileable = False
    is_croppable = False

    def __init__(self, members: list[Any]):
        self.members = members

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.members[0].get_seq_length(layer_idx)


AutoConfig.register(MODEL_TYPE, EnsembleConfig, exist_ok=True)
AutoModelForCausalLM.register(EnsembleConfig, EnsembleForCausalLM, exist_ok=True)
