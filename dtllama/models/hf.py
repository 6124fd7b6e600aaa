"""Any Hugging Face decoder on dtllama's stack: transformers' own modules, run on packed batches.

verl patches each family's attention and forward per transformers version. This adapter instead uses the public
extension points of transformers, once, for every family: the model is transformers' own (`AutoModelForCausalLM`
built with `attn_implementation="dtllama"`, names and numerics its own), and

- attention goes through a function registered in transformers' `AttentionInterface`, which hands the packed
  q/k/v of each layer to an `AttentionCore` child of that layer's attention module (dtllama's varlen dispatch,
  with the layer's `scaling`, `sliding_window`, logit `softcap` and attention sinks), so Ulysses CP wraps it as it
  wraps a native family's;
- the decoder runs on `input_ids[1, T]` with positions restarting per sequence and `cu_seq_lens_q/k`,
  `max_length_q/k` in the attention kwargs: no padding, no mask (transformers makes none for an attention
  implementation without a mask function), no position-id search for sequence starts;
- the head is dtllama's (fused log-probs + entropy, temperature, top-k, the SFT loss), from the last hidden state
  and the output embedding, tied or not; a value head reads the same hidden state.

Tensor parallelism follows transformers' own `base_model_tp_plan` (column-wise q/k/v/gate/up, row-wise o/down, head
norms replicated with their gradients summed) without sequence parallel, the head vocab-parallel as a native
family's. What the adapter cannot honour it refuses by name: layers that are not token-wise attention (linear
attention, Mamba, convolutions), a final logit softcap or scale, attention dropout, chunked attention; pipeline
parallelism, EP and TP without a plan (or with a plan style dtllama does not map) are refused by the config
(`parallel_limits`). FSDP2/HSDP, CP, activation checkpointing and per-block compile run as for native families,
through the same `parallelize`.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import torch
from torch import nn

from dtllama.models import protocol as P
from dtllama.models.blocks import (
    AttentionCore, CausalLM, Linear, LogprobsHead, ValueModel, copy_full_into, hf_name,
)
from dtllama.models.config import read_config_json
from dtllama.models.hf_vl import check_images, merge_images, mrope_positions
from dtllama.ops import prepare_batch

ATTENTION = "dtllama"
# Layer kinds of `config.layer_types` that are token-wise causal attention (the rest are refused by name).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Config fields of a final transform of the logits, which the fused head does not apply.
LOGIT_FIELDS = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0}
# transformers' TP style names (`base_model_tp_plan`) as the model protocol's: TP without sequence parallel, the
# residual stream replicated over the TP ranks; head norms' weights replicated with their gradients summed.
HF_TP_STYLES = {
    "colwise": P.Colwise(), "rowwise": P.RowwiseReplicated(), "colwise_gather_output": P.ColwiseGathered(),
    "rowwise_split_input": P.RowwiseOfFull(), "replicated_with_grad_allreduce": P.HeadNorm(),
    "embedding_rowwise": P.VocabEmbeddingReplicated(),
}
# Vision-language families whose visual inputs `hf_vl` places (tested against transformers).
VISION_MODEL_TYPES = ("qwen2_5_vl",)
# Submodule class names of token mixers that are not attention.
_NOT_ATTENTION = re.compile(r"Mamba|GatedDeltaNet|LinearAttention|ShortConv|Conv1d|RWKV|Lightning", re.I)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               sliding_window: int | None = None, softcap: float | None = None, s_aux=None, **kwargs):
    """transformers' attention-function contract (`[1, H, T, D]` in, `([1, T, H, D], None)` out) over a packed
    batch: the layer's `attn_core` (an `AttentionCore`, or Ulysses around it) with the kwargs' sequence bounds."""
    core = getattr(module, "attn_core", None)
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if core is None or cu is None:
        raise RuntimeError(f"attn_implementation={ATTENTION!r} runs inside dtllama.models.hf only (the attention "
                           f"module {type(module).__name__} has no attn_core, or the call no cu_seq_lens_q); build "
                           "the model with dtllama.models.hf.HFCausalLM")
    if query.shape[0] != 1:
        raise ValueError(f"the dtllama attention takes one packed row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError(f"attention dropout={dropout} is not supported; set the config's attention_dropout=0")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = core(q, k, v, cu, max_len, scale=scaling, window=sliding_window, softcap=softcap, sinks=s_aux)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Register the packed attention function with transformers (idempotent; every `HFConfig.build` does it, so
    importing dtllama does not import transformers)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)


class HFConfig:
    """A transformers config as a dtllama config: the text model's fields (`num_attention_heads`, `vocab_size`,
    ...) read through, plus what dtllama's layers ask of a config (`tp_widths`, `to_hf`, the value head's layout,
    `parallel_limits`). `hf` is the transformers config itself."""

    LIMITS = {
        "pp": "the Hugging Face adapter runs transformers' own decoder forward, which no pipeline stage can cut; "
              "use a native family for pp",
        "ep": "the Hugging Face adapter runs transformers' own MoE blocks, which EP does not shard; use a native "
              "MoE family (Qwen3-MoE, Llama 4) for ep",
    }
    moe_layers = None

    @property
    def parallel_limits(self) -> dict[str, str]:
        """The layouts this model refuses, with the reason: pp, ep, and tp where transformers has no plan for it."""
        plan, limits = self.tp_plan, dict(self.LIMITS)
        unknown = sorted({style for style in (plan or {}).values() if style not in HF_TP_STYLES})
        nested = sorted(k for k in plan or {} if "*" in k.removeprefix("layers.*."))
        dropout = {k: v for k, v in self.text.to_dict().items()
                   if (k.endswith("dropout") or k.endswith("pdrop")) and isinstance(v, (int, float)) and v}
        if not plan:
            limits["tp"] = (f"transformers has no tensor-parallel plan (base_model_tp_plan) for {self.model_type}; "
                            "use dp_shard / cp, or a native family")
        elif unknown or nested:
            limits["tp"] = (f"{self.model_type}'s base_model_tp_plan uses {unknown or nested}, which dtllama does not "
                            f"map (it maps {sorted(HF_TP_STYLES)} on `layers.*.` paths); use dp_shard / cp")
        elif dropout:  # each TP rank would drop other elements of the replicated residual stream
            limits["tp"] = f"dropout {dropout} under tp (the residual stream is replicated): set them to 0"
        return limits

    @property
    def tp_plan(self) -> dict[str, str] | None:
        """transformers' TP plan of the decoder (`base_model_tp_plan`: module patterns -> style names)."""
        return getattr(self.text, "base_model_tp_plan", None)

    def __init__(self, hf):
        self.__dict__["hf"] = hf
        self.__dict__["text"] = hf.get_text_config()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["text"], name)

    def __setattr__(self, name: str, value) -> None:  # `--set field=value` edits the text model's config
        setattr(self.text, name, value)

    def __deepcopy__(self, memo):
        return HFConfig(copy.deepcopy(self.hf, memo))

    def __repr__(self) -> str:
        return f"HFConfig({type(self.hf).__name__}, model_type={self.hf.model_type!r})"

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "HFConfig":
        """Read a folder's `config.json` (or its dict) with transformers' `AutoConfig`."""
        from transformers import AutoConfig

        d = read_config_json(path_or_dict)
        model_type = d.pop("model_type", None)
        if model_type is None:
            raise ValueError("config.json has no model_type; the Hugging Face adapter needs one to pick the family")
        return cls(AutoConfig.for_model(model_type, **d))

    @property
    def model_type(self) -> str:
        return self.hf.model_type

    @property
    def head_dim(self) -> int:
        return getattr(self.text, "head_dim", None) or self.text.hidden_size // self.text.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return getattr(self.text, "num_key_value_heads", None) or self.text.num_attention_heads

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf, "tie_word_embeddings", False))

    @property
    def architectures(self) -> list[str]:
        return list(self.hf.architectures or [])

    @property
    def vision(self) -> bool:
        """A vision-language model (Qwen2.5-VL): a vision tower whose image features replace the image tokens'
        embeddings, and 3-row mRoPE positions."""
        return getattr(self.hf, "vision_config", None) is not None

    @property
    def _lm_class_name(self) -> str:
        from transformers.models.auto import modeling_auto as auto

        vision, text = auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        names = vision if self.vision else text
        return names.get(self.hf.model_type) or (self.architectures or ["ModelForCausalLM"])[0]

    @property
    def hf_prefix(self) -> str:
        """The family's class-name prefix (`Qwen3` of `Qwen3ForCausalLM`)."""
        return re.sub(r"For\w+$", "", self._lm_class_name)

    @property
    def lm_architecture(self) -> str:
        """The language model's class-name suffix: `ForCausalLM`, `ForConditionalGeneration` (a VL model)."""
        return re.search(r"For\w+$", self._lm_class_name).group(0)

    @property
    def value_head(self) -> str:
        token = any(a.endswith("ForTokenClassification") for a in self.architectures)
        return "ForTokenClassification" if token else "ForSequenceClassification"

    @property
    def score_bias(self) -> bool:
        return self.value_head == "ForTokenClassification"

    def tp_widths(self) -> dict[str, int]:
        """What transformers' plan splits besides the query heads: the KV heads (column-wise k/v, never replicated
        per rank as dtllama's own plan can) and the MLP width."""
        if not self.tp_plan:
            return {}
        widths = {"num_key_value_heads": self.num_key_value_heads}
        if any(".mlp." in k for k in self.tp_plan) and getattr(self.text, "intermediate_size", None):
            widths["intermediate_size"] = self.text.intermediate_size
        return widths

    def num_params(self, value_head: bool = False, active: bool = False) -> int:
        """Parameters of the causal LM (or value model), counted on a meta-device build; `active`: routed experts
        counted at `num_experts_per_tok` of their number (what one token runs)."""
        with torch.device("meta"):
            model = self.build(value=value_head)
        experts = next((getattr(self.text, f) for f in ("num_experts", "num_local_experts", "n_routed_experts")
                        if getattr(self.text, f, None)), None)
        share = self.text.num_experts_per_tok / experts if active and experts else 1.0
        return int(sum(p.numel() * (share if ".experts." in n else 1.0) for n, p in model.named_parameters()))

    def field_names(self) -> set[str]:
        """The text model's config fields (what `--set` may change)."""
        return set(self.text.to_dict())

    def replace(self, changes: dict) -> "HFConfig":
        """A copy with the text model's fields changed; a new depth re-derives `layer_types` by repeating them."""
        out = copy.deepcopy(self)
        for name, value in changes.items():
            setattr(out.text, name, value)
        if "num_hidden_layers" in changes and getattr(out.text, "layer_types", None):
            kinds = out.text.layer_types
            out.text.layer_types = [kinds[i % len(kinds)] for i in range(out.text.num_hidden_layers)]
        return out

    def to_hf(self, architecture: str = "ForCausalLM") -> dict[str, Any]:
        """The `config.json` dict transformers writes, naming `architecture` of this family."""
        d = self.hf.to_dict()
        d["architectures"] = [self.hf_prefix + architecture]
        return d

    def auto_class(self, value: bool = False):
        """transformers' auto class of the causal LM, or of the value model's HF layout."""
        import transformers

        if self.vision:
            if value:
                raise ValueError(f"a value model of {self.model_type}: transformers has no classification head for "
                                 "vision-language models; train the critic on the text model")
            return transformers.AutoModelForImageTextToText
        head = self.value_head if value else "ForCausalLM"
        return getattr(transformers, "AutoModel" + head)

    def build(self, value: bool = False) -> nn.Module:
        """transformers' model of this config (on the current default device), attention through dtllama; a vision
        tower keeps transformers' SDPA (its attention runs per image, on every rank: not Ulysses')."""
        register_attention()
        hf = copy.deepcopy(self.hf)
        if value:
            hf.num_labels = 1
        attention = {"text_config": ATTENTION, "vision_config": "sdpa"} if self.vision else ATTENTION
        return self.auto_class(value).from_config(hf, attn_implementation=attention)


class LayerDict(nn.ModuleDict):
    """transformers' `layers` ModuleList as the model protocol's ModuleDict, under the same names (`layers.0`):
    transformers' decoder indexes, slices and iterates it as a list; dtllama's parallel layer reads and replaces its
    entries by key (`items`, `values`, `layers[key] = wrapped`)."""

    def __getitem__(self, idx):
        if isinstance(idx, (int, slice)):
            return list(self.values())[idx]
        return super().__getitem__(idx)

    def __iter__(self):
        return iter(self.values())


class DecoderInputs(nn.Module):
    """The identity on the packed batch `(input_ids, position_ids, cu_seqlens, max_seqlen)`: the model protocol's
    `inputs` hook point, where context parallelism takes this rank's token shard (`ModelPlan.inputs`)."""

    def forward(self, x, position_ids, cu_seqlens, max_seqlen):
        return x, position_ids, cu_seqlens, max_seqlen


def _attention_path(layer: nn.Module, index: str, config: HFConfig) -> str:
    """The path of the layer's attention module, or a ValueError naming what else mixes its tokens."""
    kinds = getattr(config.text, "layer_types", None)
    if kinds is not None and kinds[int(index)] not in ATTENTION_LAYER_TYPES:
        raise ValueError(f"{config.model_type} layer {index} is {kinds[int(index)]!r}, not token-wise attention; the "
                         f"Hugging Face adapter runs {list(ATTENTION_LAYER_TYPES)} layers only")
    for name, module in layer.named_modules():
        if _NOT_ATTENTION.search(type(module).__name__):
            raise ValueError(f"{config.model_type} layer {index} mixes tokens with {name} ({type(module).__name__}), "
                             "not attention; the Hugging Face adapter runs attention layers only")
    paths = [n for n, m in layer.named_children() if type(m).__name__.endswith("Attention")]
    if len(paths) != 1:
        raise ValueError(f"{config.model_type} layer {index} ({type(layer).__name__}) has attention modules {paths}; "
                         "the Hugging Face adapter needs exactly one per decoder layer")
    return paths[0]


def _check_config(config: HFConfig) -> None:
    """Refuse by name what the fused head or the packed attention would not honour."""
    if config.vision and config.model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"{config.model_type} is a vision-language model the adapter does not place images for "
                         f"(it runs {list(VISION_MODEL_TYPES)}; Qwen3-VL's deepstack features, for one, would be "
                         "dropped); train its text model, or use another trainer for it")
    for field, neutral in LOGIT_FIELDS.items():
        v = getattr(config.text, field, neutral)
        if v is not None and v != neutral:
            raise ValueError(f"config field {field}={v} transforms the logits, which dtllama's fused head does not; "
                             f"set it to {neutral} (the log-probs then differ from the checkpoint's) or use another "
                             "trainer for this family")
    if getattr(config.text, "attention_dropout", 0.0):
        raise ValueError(f"config field attention_dropout={config.text.attention_dropout} is not supported by the "
                         "packed attention; set it to 0.0")
    if getattr(config.text, "attention_chunk_size", None):
        raise ValueError(f"config field attention_chunk_size={config.text.attention_chunk_size} (chunked attention) "
                         "is not supported by the Hugging Face adapter")
    rope = getattr(config.text, "rope_parameters", None) or getattr(config.text, "rope_scaling", None) or {}
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    if section is not None and 2 * sum(section) != config.head_dim:  # transformers fails in a split, unnamed
        raise ValueError(f"mrope_section={section} covers {2 * sum(section)} rotary dims, but head_dim is "
                         f"{config.head_dim}: the sections (temporal, height, width) must sum to head_dim / 2")


def adapt_decoder(decoder: nn.Module, config: HFConfig) -> dict[str, str]:
    """Make transformers' decoder (`model.model`) fit the protocol, in place: its layers a `LayerDict`, an
    `AttentionCore` child (`attn_core`) in each attention module. Returns each layer's attention path."""
    for part in ("embed_tokens", "layers", "norm"):
        if not isinstance(getattr(decoder, part, None), nn.Module):
            raise ValueError(f"{type(decoder).__name__} has no {part}; the Hugging Face adapter needs a decoder with "
                             "embed_tokens, layers and norm")
    layers = LayerDict({str(i): layer for i, layer in enumerate(decoder.layers)})
    decoder.layers = layers
    paths = {}
    for i, layer in layers.items():
        paths[i] = _attention_path(layer, i, config)
        layer.get_submodule(paths[i]).attn_core = AttentionCore()
    return paths


class _Adapter:
    """What the causal LM and the value model share: transformers' decoder as `model`, the protocol."""

    def _adopt(self, config: HFConfig, hf: nn.Module, layers, first: bool, last: bool, stage) -> None:
        if layers is not None or not first or not last or stage is not None:
            raise ValueError(f"pipeline stages of {config.model_type}: {HFConfig.LIMITS['pp']}")
        nn.Module.__init__(self)
        _check_config(config)
        self.config, self.stage = config, None
        base = hf.base_model if hf.base_model is not hf else hf.model
        # A VL model's decoder is `language_model`, beside the tower `visual`: adopted under the names its
        # checkpoints use (`model.layers.*`, `visual.*`); `_vlm` (unregistered) runs transformers' image steps.
        self.model = getattr(base, "language_model", base) if config.vision else base
        if config.vision:
            self.visual = base.visual
            object.__setattr__(self, "_vlm", base)
        paths = {id(m): n for n, m in hf.named_modules()}
        self._hf_prefixes = {n: paths[id(m)] for n, m in self.named_children() if paths.get(id(m), n) != n}
        self._attn = adapt_decoder(self.model, config)
        self.decoder_inputs = DecoderInputs()
        self._value = False

    def _tp_styles(self, root: nn.Module, layer: bool) -> dict[str, P.Style]:
        """transformers' plan entries for a decoder layer (`layers.*.` patterns) or for the decoder around them, as
        protocol styles; entries naming no module here (a dense MLP's in an MoE layer) are left out."""
        out = {}
        for pattern, style in (self.config.tp_plan or {}).items():
            # A style dtllama does not map makes the config refuse tp (`parallel_limits`): never applied.
            if pattern.startswith("layers.*.") != layer or style not in HF_TP_STYLES:
                continue
            path = pattern.removeprefix("layers.*.")
            try:
                root.get_submodule(path)
            except AttributeError:
                continue
            out[path] = HF_TP_STYLES[style]
        return out

    def layer_plan(self, layer: nn.Module) -> P.LayerPlan:
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        index = next(k for k, v in self.model.layers.items() if v is layer or v is inner)
        return P.LayerPlan(self._tp_styles(inner, True), attn_cores=(f"{self._attn[index]}.attn_core",))

    def plan(self) -> P.ModelPlan:
        tied = self.output == "logprobs" and self.lm_head is None
        tp = {f"model.{k}": v for k, v in self._tp_styles(self.model, False).items()}
        if self.output == "logprobs" and self.lm_head is not None:
            tp["lm_head"] = P.VocabHead()  # the fused head is vocab-parallel: no [T, vocab] logits on any rank
        return P.ModelPlan(tp, output=self.output, casts_at_use=False, tied=tied, inputs="decoder_inputs")

    def cut(self, *args, **kwargs):
        raise ValueError(f"pipeline stages of {self.config.model_type}: {HFConfig.LIMITS['pp']}")

    def check_media(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, media: dict) -> None:
        if not self.config.vision:
            return super().check_media(input_ids, cu_seqlens, media)
        check_images(self._vlm, input_ids, cu_seqlens, media)

    def _decode(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels, attention_mask, media=None):
        media = media or {}
        batch = prepare_batch(input_ids, self.config.vocab_size, position_ids, cu_seqlens, max_seqlen, labels,
                              attention_mask)
        self.check_media(batch.input_ids, batch.cu_seqlens, media)
        x, pos = batch.input_ids, batch.position_ids
        if self.config.vision:  # images scattered into the embeddings before CP slices them
            x = merge_images(self._vlm, self.model.embed_tokens(x), x, media)
            pos = mrope_positions(self._vlm, batch.input_ids, pos, batch.cu_seqlens, media)
        x, pos, cu, m = self.decoder_inputs(x, pos, batch.cu_seqlens, batch.max_seqlen)
        m = int(m)
        tokens = dict(inputs_embeds=x[None]) if x.is_floating_point() else dict(input_ids=x[None])
        out = self.model(**tokens, position_ids=pos.unsqueeze(-2), use_cache=False, cu_seq_lens_q=cu,
                         cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
        return out.last_hidden_state[0], [], batch

    def _hf_key(self, name: str) -> str:
        """A name of this module tree as transformers' model names it in memory (`model.language_model.*`)."""
        head, _, rest = name.partition(".")
        return f"{self._hf_prefixes[head]}.{rest}" if head in self._hf_prefixes else name

    def _own_key(self, name: str) -> str:
        for head, prefix in self._hf_prefixes.items():
            if name.startswith(prefix + "."):
                return head + name[len(prefix):]
        return name

    @torch.no_grad()
    def init_weights(self, seed: int = 0, names: set[str] | None = None) -> None:
        """transformers' own init of the whole model, built once on the host from `seed`, each rank keeping its
        slice of every parameter: the values do not depend on the layout (a large model loads a checkpoint)."""
        with torch.device("cpu"):
            state = _seeded(lambda: self.config.build(value=self._value), seed).state_dict()
        # Parameters and persistent buffers (DeepSeek-V3's router bias): `to_empty` left both uninitialized.
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            name = self._hf_key(hf_name(name))
            if name in state and (names is None or name in names):
                copy_full_into(t, state[name].to(t.dtype))
        self.reset_buffers()

    def converted_state(self, path: str) -> dict[str, torch.Tensor]:
        """The full state of an HF folder whose files transformers converts at load (per-expert files into stacked
        experts, ...): read by transformers itself on the host (`hf_io.load_state_into` copies each rank's slice)."""
        extra = {"num_labels": 1} if self._value else {}
        with torch.device("cpu"):
            model = self.config.auto_class(self._value).from_pretrained(path, dtype=torch.float32, **extra)
        return {self._own_key(k): v for k, v in model.state_dict().items()}

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (RoPE frequencies) with transformers' own init, which skips the
        parameters marked `_is_hf_initialized`."""
        init = self.model._init_weights  # a VL model's decoder and tower share one `PreTrainedModel` init
        for module in self.modules():
            if not module._non_persistent_buffers_set:
                continue
            params = list(module.parameters(recurse=False))
            for p in params:
                p._is_hf_initialized = True
            try:
                init(module)
            finally:
                for p in params:
                    del p._is_hf_initialized

    def balanced_moe(self) -> list:
        return []


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class HFCausalLM(_Adapter, CausalLM):
    """A transformers causal LM (any family of `AutoModelForCausalLM` whose layers are attention) with dtllama's
    packed batches, heads and parallel layer; names, config and checkpoints are the family's own."""

    config_class = HFConfig

    @property
    def hf_architecture(self) -> str:
        return self.config.lm_architecture

    def __init__(self, config: HFConfig, *, layers=None, first: bool = True, last: bool = True, stage=None):
        hf = config.build()
        self._adopt(config, hf, layers, first, last, stage)
        out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
        self.lm_head = None if out.weight is inp.weight else out
        self.logprobs_head = LogprobsHead()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight if self.lm_head is None else self.lm_head.weight


class HFValue(_Adapter, ValueModel):
    """A critic on a transformers decoder: `score` (HF's sequence- or token-classification head, `num_labels=1`)
    over every token's last hidden state."""

    config_class = HFConfig

    def __init__(self, config: HFConfig, *, layers=None, first: bool = True, last: bool = True, stage=None):
        hf = config.build(value=True)
        self._adopt(config, hf, layers, first, last, stage)
        self._value = True
        bias = hf.score.bias is not None
        self.score = Linear(config.hidden_size, 1, bias=bias)


__all__ = ["ATTENTION", "DecoderInputs", "HFCausalLM", "HFConfig", "HFValue", "LayerDict", "adapt_decoder",
           "register_attention"]
