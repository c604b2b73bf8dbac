"""The general translation model: an NLLB-200 / M2M-100 encoder-decoder Transformer.

Architecture (fairseq ``transformer_24_24`` for the 1.3B preset, HF ``M2M100ForConditionalGeneration``): pre-LN
layers with a final LayerNorm on encoder and decoder, ReLU feed-forward, sinusoidal positions counted from
``padding_idx + 1`` (pads get the zero row), token embeddings scaled by ``sqrt(d_model)``, and one embedding matrix
shared by encoder input, decoder input and output projection.

The module tree mirrors HF's state-dict names (``model.shared.weight``, ``model.encoder.layers.0.self_attn.q_proj``,
``lm_head.weight``), so HF NLLB/M2M-100 folders load with :meth:`TranslationModel.from_pretrained`, fairseq NLLB
checkpoints load after :func:`convert_fairseq_state_dict`, and :meth:`TranslationModel.save_pretrained` writes a
folder that transformers and CTranslate2's ``ct2-transformers-converter`` read unchanged.

Presets (registered model names): ``intern2_mt_tiny``, ``intern2_mt_small`` (d512 6+6, the benchmark model),
``intern2_mt_600m`` (NLLB-200-distilled-600M), ``intern2_mt_1p3b`` (the INTERN 2.0 "intern2-mt-1.3b": NLLB-200-1.3B
dimensions, 1,370,638,336 parameters) and ``intern2_mt_3p3b`` (NLLB-200-3.3B).

Decoding (``model.generate``: greedy, sampling, beam search) lives in :mod:`intern2.models.generation`.

On CPU, float32/bfloat16 inference runs the linear layers through :func:`apply_linear` (oneDNN's matmul, whose
few-row matmuls are up to twice as fast as ``F.linear``'s on AMD CPUs; one-row ones on Intel CPUs as ``addmv``), and a
decoding step's self-attention q/k/v as one matmul (:meth:`Attention.stacked_projection`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear  # what quantize_dynamic makes
from torch.utils.checkpoint import checkpoint

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_checkpoint, read_state_dict
from ..layers import linear, unobserved
from ..registry import register_variant
from .generation import GenerationMixin

__all__ = ["TranslatorConfig", "TranslationModel", "Seq2SeqLMOutput", "DecoderCache",
           "convert_fairseq_state_dict", "TRANSLATOR_VARIANTS",
           "MAX_TRAINED_SOURCE_TOKENS", "resize_embeddings_for_languages"]

# NLLB was trained on sentences of at most 512 tokens (model card); longer inputs degrade or get cut short.
MAX_TRAINED_SOURCE_TOKENS = 512
# The encoder, decoder and output projection share ``model.shared``; HF writes it once and re-ties on load.
TIED_KEYS = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
             "lm_head.weight")
_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass(frozen=True)
class TranslatorConfig:
    """Architecture of one variant; field names and defaults are those of HF's ``M2M100Config``."""

    vocab_size: int = 128112
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2

    def __post_init__(self):
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by {side}_attention_heads={heads}")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; "
                             f"expected one of {sorted(_ACTIVATIONS)}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary "
                                 f"(vocab_size={self.vocab_size})")

    @classmethod
    def from_dict(cls, values: Dict) -> "TranslatorConfig":
        """From an HF ``config.json`` dict; keys that are not architecture fields are ignored."""
        if values.get("tie_word_embeddings") is False:
            raise ValueError("config has tie_word_embeddings=false; NLLB/M2M-100 models share the embedding with "
                             "the output projection and intern2 supports only that layout")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> Dict:
        """``config.json`` content that transformers reads as an ``M2M100ForConditionalGeneration``."""
        return dict(architectures=["M2M100ForConditionalGeneration"], model_type="m2m_100", **self.to_dict(),
                    encoder_layerdrop=0.0, decoder_layerdrop=0.0, tie_word_embeddings=True, is_encoder_decoder=True,
                    use_cache=True)


@dataclass
class Seq2SeqLMOutput:
    """What :meth:`TranslationModel.forward` returns (HF names)."""

    logits: Tensor
    loss: Optional[Tensor] = None
    encoder_last_hidden_state: Optional[Tensor] = None


# ------------------------------------------------------------------------------------------------------ layers
def apply_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``; a plain ``nn.Linear`` runs :func:`intern2.layers.linear` (oneDNN for CPU inference): at the
    few rows of a decoding step it streams the weight 1.3-2.2x faster than the MKL gemv/gemm behind ``F.linear``
    (which transformers uses too; measured on the 2-core AMD EPYC of benchmarks/translate.py). The modules stay
    ``nn.Linear`` so ``quantize_dynamic`` finds them; quantized or otherwise replaced modules, and modules that a
    hook watches (their own or a global one), run their own forward."""
    if type(layer) is nn.Linear and unobserved(layer):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


class SinusoidalPositions(nn.Module):
    """fairseq's sinusoidal table: sin in the first half of the columns, cos in the second, row ``padding_idx``
    zero. Non-persistent (not in the state dict), so it is recomputed, never loaded."""

    offset = 2  # rows 0..padding_idx are reserved: the first real token is at position padding_idx + 1

    def __init__(self, num_positions: int, dim: int, padding_idx: int):
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx
        self.register_buffer("weights", self.table(num_positions + self.offset), persistent=False)

    def table(self, rows: int, device: Optional[torch.device] = None) -> Tensor:
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * -(math.log(10000.0) / (half - 1)))
        angles = torch.arange(rows, dtype=torch.float32, device=device)[:, None] * freq[None]
        table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        if self.dim % 2:
            table = F.pad(table, (0, 1))
        table[self.padding_idx] = 0
        return table

    def reset(self, device: Union[str, torch.device] = "cpu") -> None:
        """Recompute the table (after the model was built on the meta device)."""
        self.weights = self.table(self.weights.shape[0], device=device)

    def forward(self, input_ids: Tensor, past_length: int = 0) -> Tensor:
        needed = self.padding_idx + 1 + input_ids.shape[1] + past_length
        if needed > self.weights.shape[0]:  # longer than max_position_embeddings: sinusoids extrapolate
            self.weights = self.table(needed + self.offset, self.weights.device).to(self.weights.dtype)
        real = input_ids.ne(self.padding_idx).int()
        positions = (torch.cumsum(real, dim=1) + past_length) * real + self.padding_idx
        return self.weights.index_select(0, positions.view(-1)).view(*input_ids.shape, -1)


# Attention module -> (its q/k/v packed int8 weights, their stacked projection); outside the module so that
# pickling, deepcopy and state dicts never meet it.
_INT8_STACKED: "weakref.WeakKeyDictionary[nn.Module, Tuple[Tuple[object, ...], Optional[Callable]]]" = \
    weakref.WeakKeyDictionary()


def _stacked_int8(layers: Sequence[nn.Module]) -> Optional[Callable[[Tensor], Tensor]]:
    """One int8 dynamic linear over ``quantize_dynamic``'s per-tensor qint8 modules ``layers`` stacked by output
    row: their int8 values unchanged, each row keeping its module's scale and zero point (a per-channel weight), so
    the output equals the modules' outputs side by side; None for other quantisation schemes."""
    weights = [layer.weight() for layer in layers]
    if any(layer._packed_params.dtype != torch.qint8 or layer.version is None or layer.version < 4
           or w.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric) for layer, w in
           zip(layers, weights)):
        return None
    biases = [layer.bias() for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None

    def per_row(w: Tensor, value: float, dtype: torch.dtype) -> Tensor:
        return torch.full((w.shape[0],), value, dtype=dtype)

    weight = torch._make_per_channel_quantized_tensor(
        torch.cat([w.int_repr() for w in weights]),
        torch.cat([per_row(w, w.q_scale(), torch.double) for w in weights]),
        torch.cat([per_row(w, w.q_zero_point(), torch.long) for w in weights]), 0)
    packed = torch.ops.quantized.linear_prepack(weight, None if biases[0] is None else torch.cat(biases))
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True).to(x.dtype)  # as the modules


class Attention(nn.Module):
    """Multi-head attention with HF's projection names; keys/values are projected separately so the decoder can
    cache them."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, T, E] -> [B, H, T, E/H]

    def keys_values(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self._heads(apply_linear(self.k_proj, x)), self._heads(apply_linear(self.v_proj, x))

    def stacked_projection(self) -> Optional[Callable[[Tensor], Tensor]]:
        """The q, k and v projections as one [3E, E] projection (weights and biases stacked), for
        :meth:`queries_keys_values`; None where they cannot be (a hooked or otherwise replaced module, or biases on
        some projections only). After ``quantize_dynamic`` the three int8 weights are stacked as they are, one scale
        per output row: the one int8 matmul gives exactly the three modules' outputs."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if not unobserved(*layers):
            return None
        if all(type(layer) is nn.Linear for layer in layers):
            biases = [layer.bias for layer in layers]
            if all(b is None for b in biases):
                return functools.partial(linear, weight=torch.cat([layer.weight for layer in layers]))
            if any(b is None for b in biases):
                return None
            return functools.partial(linear, weight=torch.cat([layer.weight for layer in layers]),
                                     bias=torch.cat(biases))
        if all(type(layer) is DynamicQuantizedLinear for layer in layers):
            # Packing costs ~4 ms a layer, most of a short generate call: kept while the three packed weights are
            # the same objects (set_weight_bias or loading a state dict replaces them).
            packed = tuple(layer._packed_params._packed_params for layer in layers)
            kept = _INT8_STACKED.get(self)
            if kept is None or any(a is not b for a, b in zip(kept[0], packed)):
                kept = _INT8_STACKED[self] = (packed, _stacked_int8(layers))
            return kept[1]
        return None

    def queries_keys_values(self, x: Tensor, stacked: Optional[Callable[[Tensor], Tensor]] = None
                            ) -> Tuple[Tensor, Tensor, Tensor]:
        """Query, key and value heads of ``x`` (self-attention); with ``stacked`` (:meth:`stacked_projection`) as
        one matmul: a batch-1 decoding step's three one-row matmuls over 1/3 of the weight each stream it slower
        than one over all of it (``intern2_mt_small`` on an AMD EPYC: +2% tokens/s at 1 thread, +10% at 2; in int8
        the three calls take 69 µs, the stacked one 22 µs at 2 threads)."""
        if stacked is None:
            return (self._heads(apply_linear(self.q_proj, x)), *self.keys_values(x))
        q, k, v = stacked(x).chunk(3, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def attend(self, x: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor] = None,
               is_causal: bool = False) -> Tensor:
        """Queries from ``x`` [N, T, E] over ``keys``/``values`` [B, H, S, E/H] (see :meth:`attend_heads`)."""
        return self.attend_heads(self._heads(apply_linear(self.q_proj, x)), keys, values, mask, is_causal)

    def attend_heads(self, q: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor] = None,
                     is_causal: bool = False) -> Tensor:
        """Query heads ``q`` [N, H, T, E/H] over ``keys``/``values`` [B, H, S, E/H], projected out; when N = B * G
        (beams or returned samples of one source), the G rows of a source are folded into its query length, so
        they share one copy of its cross-attention keys/values."""
        groups = q.shape[0] // keys.shape[0]
        if groups > 1:
            q = q.unflatten(0, (-1, groups)).transpose(1, 2).flatten(2, 3)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        if groups > 1:
            out = out.unflatten(2, (groups, -1)).transpose(1, 2).flatten(0, 1)
        return apply_linear(self.out_proj, out.transpose(1, 2).flatten(2))


class _Layer(nn.Module):
    """What encoder and decoder layers share: the pre-LN feed-forward sub-block."""

    def _init_feed_forward(self, cfg: TranslatorConfig, ffn_dim: int) -> None:
        self.fc1 = nn.Linear(cfg.d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def _drop(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p, True) if p and self.training else x  # eval: not even a call (decoding steps are short)

    def _feed_forward(self, x: Tensor) -> Tensor:
        h = self._drop(self.act(apply_linear(self.fc1, self.final_layer_norm(x))), self.activation_dropout)
        return x + self._drop(apply_linear(self.fc2, h), self.dropout)


class EncoderLayer(_Layer):
    def __init__(self, cfg: TranslatorConfig):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.encoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self._init_feed_forward(cfg, cfg.encoder_ffn_dim)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        h = self.self_attn_layer_norm(x)
        x = x + self._drop(self.self_attn.attend(h, *self.self_attn.keys_values(h), mask=mask), self.dropout)
        return self._feed_forward(x)


class DecoderLayer(_Layer):
    def __init__(self, cfg: TranslatorConfig):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.encoder_attn = Attention(cfg.d_model, cfg.decoder_attention_heads, cfg.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self._init_feed_forward(cfg, cfg.decoder_ffn_dim)

    def forward(self, x: Tensor, memory: Optional[Tensor], memory_mask: Optional[Tensor],
                cache: Optional["DecoderCache"] = None, index: int = 0) -> Tensor:
        """``memory``: encoder output (teacher forcing); with ``cache``, its precomputed keys/values are used."""
        memory_kv = cache.memory[index] if cache is not None else self.encoder_attn.keys_values(memory)
        h = self.self_attn_layer_norm(x)
        if cache is None:
            queries, keys, values = self.self_attn.queries_keys_values(h)
        else:
            queries, keys, values = self.self_attn.queries_keys_values(h, cache.stacked[index])
            keys, values = cache.extend(index, keys, values)
        # Without a cache queries and keys cover the same positions; with one, a single new token sees all.
        attn = self.self_attn.attend_heads(queries, keys, values, is_causal=x.shape[1] > 1)
        x = x + self._drop(attn, self.dropout)
        h = self.encoder_attn_layer_norm(x)
        x = x + self._drop(self.encoder_attn.attend(h, *memory_kv, mask=memory_mask), self.dropout)
        return self._feed_forward(x)


class DecoderCache:
    """What the decoder reuses between generation steps.

    ``memory``: per layer, the cross-attention keys/values of the encoder output, computed once ([B, H, S, E/H],
    one copy per source even when it has several beams); ``memory_mask``: the source key mask, None when no source
    is padded; ``stacked``: per layer, the self-attention's stacked q/k/v projection
    (:meth:`Attention.stacked_projection`; built per ``generate`` call, so it never outlives a weight change) or
    None. Self-attention keys/values are written into buffers of ``max_length`` positions allocated at the first
    step. Tokens after the first call are fed one at a time.
    """

    def __init__(self, memory: List[Tuple[Tensor, Tensor]], memory_mask: Optional[Tensor], max_length: int,
                 stacked: Optional[List[Optional[Callable[[Tensor], Tensor]]]] = None):
        self.memory, self.memory_mask, self.max_length = memory, memory_mask, max_length
        self.stacked = stacked if stacked is not None else [None] * len(memory)
        self.keys: List[Optional[Tensor]] = [None] * len(memory)
        self.values: List[Optional[Tensor]] = [None] * len(memory)
        self.length = 0  # positions already cached

    @property
    def device(self) -> torch.device:
        return self.memory[0][0].device

    def extend(self, index: int, keys: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
        """Store layer ``index``'s new keys/values; the cached ones up to and including them."""
        if self.keys[index] is None:
            shape = (keys.shape[0], keys.shape[1], self.max_length, keys.shape[3])
            self.keys[index] = keys.new_empty(shape)
            self.values[index] = values.new_empty(shape)
        end = self.length + keys.shape[2]
        self.keys[index][:, :, self.length:end] = keys
        self.values[index][:, :, self.length:end] = values
        return self.keys[index][:, :, :end], self.values[index][:, :, :end]

    def reorder(self, rows: Tensor) -> None:
        """Beam search: row i continues the hypothesis that was row ``rows[i]``."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[:, :, :self.length] = buffer[:, :, :self.length].index_select(0, rows)


class TranslatorEncoder(nn.Module):
    def __init__(self, cfg: TranslatorConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.dropout = cfg.dropout
        self.embed_tokens = embed_tokens
        self.embed_positions = SinusoidalPositions(cfg.max_position_embeddings, cfg.d_model, cfg.pad_token_id)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.grad_checkpointing = False

    def embed(self, input_ids: Tensor) -> Tensor:
        """Input of the first layer: scaled token embeddings + positions."""
        return self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(input_ids)

    def forward(self, input_ids: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask``: bool [B, 1, 1, S], True where a key may be attended (see :func:`_key_mask`)."""
        x = F.dropout(self.embed(input_ids), self.dropout, self.training)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return self.layer_norm(x)


class TranslatorDecoder(nn.Module):
    def __init__(self, cfg: TranslatorConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.dropout = cfg.dropout
        self.embed_tokens = embed_tokens
        self.embed_positions = SinusoidalPositions(cfg.max_position_embeddings, cfg.d_model, cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.grad_checkpointing = False

    def forward(self, input_ids: Tensor, memory: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                cache: Optional[DecoderCache] = None) -> Tensor:
        """Teacher forcing with ``memory`` (encoder output), or one generation step with ``cache``."""
        past = cache.length if cache is not None else 0
        x = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(input_ids, past)
        x = F.dropout(x, self.dropout, self.training)
        if cache is not None:
            memory_mask = cache.memory_mask
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, memory, memory_mask, use_reentrant=False)
            else:
                x = layer(x, memory, memory_mask, cache, i)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.layer_norm(x)


class EncoderDecoder(nn.Module):
    """HF's ``M2M100Model``: the shared embedding, encoder and decoder (``model.*`` in the state dict)."""

    def __init__(self, cfg: TranslatorConfig):
        super().__init__()
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.encoder = TranslatorEncoder(cfg, self.shared)
        self.decoder = TranslatorDecoder(cfg, self.shared)


def _key_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """[B, S] 1/0 padding mask -> bool [B, 1, 1, S] for scaled_dot_product_attention."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


# ------------------------------------------------------------------------------------------------------ model
class TranslationModel(nn.Module, GenerationMixin):
    """NLLB/M2M-100 encoder-decoder with HF's ``M2M100ForConditionalGeneration`` state-dict names and API;
    ``generate`` comes from :class:`~intern2.models.generation.GenerationMixin`."""

    max_source_tokens = MAX_TRAINED_SOURCE_TOKENS

    def __init__(self, config: TranslatorConfig):
        super().__init__()
        self.config = config
        self.model = EncoderDecoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.pretrained_cfg: Dict = {}
        self.init_weights()
        self.tie_weights()

    # ----------------------------------------------------------------------------------------- weights
    def init_weights(self) -> None:
        """HF's initialisation: normal(0, init_std) weights, zero biases, zero padding row, unit LayerNorms."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.shared.weight

    def checkpoint_filter(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Adapt a checkpoint to this model (used by :func:`intern2.load_checkpoint` and :meth:`from_pretrained`).

        fairseq layouts are converted; the position tables some old HF files carry are dropped (they are
        recomputed); the tied names missing from HF files that store the embedding once are filled in; an
        embedding whose row count differs from ``vocab_size`` is a clear error.
        """
        if "decoder.embed_tokens.weight" in state_dict and not any(k.startswith("model.") for k in state_dict):
            state_dict = convert_fairseq_state_dict(state_dict)
        state = {k: v for k, v in state_dict.items() if not k.endswith("embed_positions.weights")}
        shared = _shared_embedding({k: state[k] for k in TIED_KEYS if k in state}, "checkpoint")
        if shared.shape[0] != self.config.vocab_size:
            raise ValueError(f"checkpoint embedding has {shared.shape[0]} rows but the model has vocab_size="
                             f"{self.config.vocab_size}; build the model with vocab_size={shared.shape[0]} "
                             f"(keep every checkpoint row: token ids index them directly)")
        state.update((k, shared) for k in TIED_KEYS)
        return state

    def export_config(self) -> Dict:
        """Everything :func:`intern2.from_pretrained` needs to rebuild this model."""
        return self.config.to_dict()

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "TranslationModel":
        """Load an HF M2M100/NLLB folder (config.json + model.safetensors, pytorch_model.bin or their sharded
        forms; pickles are read with ``weights_only=True``) or one written by :meth:`save_pretrained`.

        The model is built on the meta device and takes the checkpoint tensors as they are (no random init, no
        second copy); ``dtype`` defaults to the checkpoint's. Returned in eval mode.
        """
        folder = Path(folder)
        state, values = _read_hf_folder(folder)
        if values.get("model_type", "m2m_100") != "m2m_100":
            raise ValueError(f"{folder / CONFIG_NAME}: model_type {values['model_type']!r} is not an NLLB/M2M-100 "
                             f"dense model (expected 'm2m_100')")
        with torch.device("meta"):
            model = cls(TranslatorConfig.from_dict(values))
        try:
            state = model.checkpoint_filter(state)
            model.load_state_dict(state, strict=True, assign=True)
        except ValueError as exc:  # checkpoint_filter's own message, for this folder's weights
            raise ValueError(f"{folder}: {exc}") from None
        except RuntimeError as exc:
            raise ValueError(f"{folder}: weights do not fit {CONFIG_NAME}: {exc}") from None
        model.tie_weights()
        for module in model.modules():
            if isinstance(module, SinusoidalPositions):
                module.reset()
        return model.to(device=device, dtype=dtype or model.model.shared.weight.dtype).eval()

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (atomically) in HF's layout: transformers loads the
        folder as ``M2M100ForConditionalGeneration`` and CTranslate2's ``ct2-transformers-converter`` converts it.
        The shared embedding is stored once, as HF does."""
        from safetensors.torch import save_file
        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k not in TIED_KEYS[1:]}
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = json.dumps(self.config.to_hf_dict(), indent=2)
        atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config))
        return folder

    def quantize_dynamic(self, inplace: bool = False) -> "TranslationModel":
        """int8 dynamic quantisation of every Linear (int8 weights, per-batch activation scales) for CPU
        inference: ~4x smaller Linear weights and faster matmuls. The output projection becomes its own int8
        copy (the fp32 embedding stays), so the result is for inference only and cannot be saved in HF layout."""
        if any(p.device.type != "cpu" for p in self.parameters()):
            raise ValueError("quantize_dynamic: int8 dynamic quantisation runs on CPU; move the model to CPU first")
        from torch.ao.quantization import quantize_dynamic
        with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao, which is not a dependency
            warnings.simplefilter("ignore")
            return quantize_dynamic(self, {nn.Linear}, dtype=torch.qint8, inplace=inplace).eval()

    # ----------------------------------------------------------------------------------------- timm surface
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.encoder.grad_checkpointing = self.model.decoder.grad_checkpointing = enable

    def fsdp_units(self) -> List[nn.Module]:
        """Modules to wrap with FSDP2 ``fully_shard`` one by one (every layer; the shared embedding stays at
        the root so its tying survives)."""
        return [*self.model.encoder.layers, *self.model.decoder.layers]

    # ----------------------------------------------------------------------------------------- forward
    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Encoder output [B, S, d_model] (after the final LayerNorm)."""
        return self.model.encoder(input_ids, _key_mask(attention_mask))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                label_smoothing: float = 0.0) -> Seq2SeqLMOutput:
        """Teacher-forced logits [B, T, V]; with ``labels`` (-100 = ignored) also the mean token cross-entropy
        (float32). Without ``decoder_input_ids`` they are the labels shifted right behind the start token."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs decoder_input_ids or labels")
            decoder_input_ids = self._shift_right(labels)
        memory = self.encode(input_ids, attention_mask)
        hidden = self.model.decoder(decoder_input_ids, memory, _key_mask(attention_mask))
        logits = apply_linear(self.lm_head, hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   label_smoothing=label_smoothing)
        return Seq2SeqLMOutput(logits=logits, loss=loss, encoder_last_hidden_state=memory)

    def _shift_right(self, labels: Tensor) -> Tensor:
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    # ----------------------------------------------------------------------------------------- generation hooks
    def _prepare_cache(self, input_ids: Tensor, attention_mask: Tensor, max_length: int) -> DecoderCache:
        """Run the encoder once; the cache of its cross-attention keys/values (see :class:`GenerationMixin`)."""
        # Without padding attention needs no mask, and SDPA skips turning one into an additive mask at every call.
        key_mask = None if bool(attention_mask.all()) else _key_mask(attention_mask)
        memory = self.model.encoder(input_ids, key_mask)
        layers = self.model.decoder.layers
        return DecoderCache([layer.encoder_attn.keys_values(memory) for layer in layers], key_mask,
                            max_length=max_length, stacked=[layer.self_attn.stacked_projection() for layer in layers])

    def _decode_step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """Logits [N, V] for the token after ``tokens`` [N, 1]; their keys/values are appended to ``cache``."""
        return apply_linear(self.lm_head, self.model.decoder(tokens, cache=cache)[:, -1])


# ------------------------------------------------------------------------------------------------------ checkpoints
def _shared_embedding(candidates: Dict[str, Tensor], where: str) -> Tensor:
    """The one embedding matrix behind several tied names; differing shapes or values are an error."""
    if not candidates:
        raise ValueError(f"{where} has no embedding; expected one of {list(TIED_KEYS)}")
    (first_name, first), *rest = candidates.items()
    for name, tensor in rest:
        if tensor.shape != first.shape:
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)} but {first_name} has "
                             f"{tuple(first.shape)}; the vocabularies differ and one shared embedding is needed")
        if tensor.data_ptr() != first.data_ptr() and not torch.equal(tensor, first):
            raise ValueError(f"{where}: {name} differs from {first_name}; intern2's translator needs one embedding "
                             f"shared by encoder, decoder and output projection")
    return first


def convert_fairseq_state_dict(state_dict: Dict[str, Tensor], vocab_size: Optional[int] = None) -> Dict[str, Tensor]:
    """fairseq NLLB/M2M-100 state dict (the ``model`` entry of checkpoint.pt) -> HF names for this model.

    A pure rename (``encoder.layers.0...`` -> ``model.encoder.layers.0...``; ``decoder.embed_tokens`` /
    ``encoder.embed_tokens`` / ``decoder.output_projection`` -> the four tied names) that drops fairseq's
    bookkeeping (``*.version``, ``*._float_tensor``) and keeps every embedding row: the checkpoint's 256,206 rows are
    the vocabulary (NLLB's dict.txt gives only 256,203 entries; never rebuild it from there). With ``vocab_size``,
    a different row count is a clear error.
    """
    out: Dict[str, Tensor] = {}
    embeddings: Dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith((".version", "._float_tensor")):
            continue
        if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
            embeddings[key] = value
        elif key.startswith(("encoder.", "decoder.")):
            out[f"model.{key}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"fairseq checkpoint: {len(unknown)} keys outside encoder./decoder.: {unknown[:8]}")
    shared = _shared_embedding(embeddings, "fairseq checkpoint")
    if vocab_size is not None and shared.shape[0] != vocab_size:
        raise ValueError(f"fairseq checkpoint embedding has {shared.shape[0]} rows, expected vocab_size="
                         f"{vocab_size}; use vocab_size={shared.shape[0]} (NLLB-200: 256206 rows for 255,997 pieces "
                         f"+ 4 specials + 202 languages + <mask> + 2 unused)")
    out.update((k, shared) for k in TIED_KEYS)
    return out


def _read_hf_folder(folder: Path) -> Tuple[Dict[str, Tensor], Dict]:
    """(state dict, config) of an HF folder, including sharded ones (``*.index.json`` + shards)."""
    for index_name in (f"{WEIGHTS_NAME}.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            if not (folder / CONFIG_NAME).exists():
                raise ValueError(f"checkpoint folder {folder} has no {CONFIG_NAME}")
            state: Dict[str, Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(read_state_dict(folder / shard))
            return state, json.loads((folder / CONFIG_NAME).read_text())
    return read_checkpoint(folder)


@torch.no_grad()
def resize_embeddings_for_languages(model: TranslationModel, new_ids: Sequence[int],
                                    init_from: Optional[int] = None) -> TranslationModel:
    """Give the language tokens ``new_ids`` (from ``NllbTokenizer.add_languages``) embedding rows, in place.

    Rows are only appended (no existing id moves), the output projection stays tied to the grown embedding, and
    ``model.config.vocab_size`` follows. Every row in ``new_ids`` is initialised, also one that already existed
    unused (NLLB-200's rows after <mask>): from row ``init_from`` (e.g. the token of a related language, so the
    new language starts as "like French") or else from the mean embedding. Resize before building the optimizer.
    """
    shared = model.model.shared
    old_rows = shared.num_embeddings
    if not new_ids:
        return model
    if min(new_ids) <= model.config.eos_token_id:
        raise ValueError(f"new_ids {sorted(new_ids)[:4]} include special-token ids; expected language-token ids")
    if init_from is not None and not 0 <= init_from < old_rows:
        raise ValueError(f"init_from={init_from} is not a row of the embedding ({old_rows} rows)")
    source = (shared.weight[init_from] if init_from is not None else shared.weight.mean(0)).clone()
    rows = max(old_rows, max(new_ids) + 1)
    weight = shared.weight
    if rows > old_rows:  # rows between the old end and a new id (ids of other added tokens) start at the mean
        grown = weight.new_empty(rows, weight.shape[1])
        grown[:old_rows] = weight
        grown[old_rows:] = weight.mean(0)
        weight = nn.Parameter(grown, requires_grad=shared.weight.requires_grad)
    weight[list(new_ids)] = source
    shared.weight, shared.num_embeddings = weight, rows
    model.lm_head.out_features = rows
    model.config = dataclasses.replace(model.config, vocab_size=rows)
    model.tie_weights()
    return model


# ------------------------------------------------------------------------------------------------------ long text
# A sentence ends at . ! ? … followed by whitespace, right after a CJK/Devanagari/Arabic full stop, or at a line
# break. Abbreviations ("Dr. Smith") are split too: harmless for translation, which only needs short pieces.
# ------------------------------------------------------------------------------------------------------ variants
_NLLB = dict(vocab_size=256206, d_model=1024, encoder_attention_heads=16, decoder_attention_heads=16,
             max_position_embeddings=1024)
# The architecture of each preset; its pretrained tags (the NLLB-200 HF folders) are in intern2.weights.
TRANSLATOR_VARIANTS: Dict[str, TranslatorConfig] = {
    # Built-in demo / test sizes; vocab_size follows the tokenizer trained for them (override it).
    "intern2_mt_tiny": TranslatorConfig(vocab_size=8192, d_model=128, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=512,
                                        decoder_ffn_dim=512, max_position_embeddings=256),
    "intern2_mt_small": TranslatorConfig(vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6,
                                         encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                                         decoder_ffn_dim=2048),
    "intern2_mt_600m": TranslatorConfig(**_NLLB, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=4096,
                                        decoder_ffn_dim=4096),
    "intern2_mt_1p3b": TranslatorConfig(**_NLLB, encoder_layers=24, decoder_layers=24, encoder_ffn_dim=8192,
                                        decoder_ffn_dim=8192),
    "intern2_mt_3p3b": TranslatorConfig(**{**_NLLB, "d_model": 2048}, encoder_layers=24, decoder_layers=24,
                                        encoder_ffn_dim=8192, decoder_ffn_dim=8192),
}


for _name, _config in TRANSLATOR_VARIANTS.items():
    register_variant(_name, lambda kwargs, _config=_config: TranslationModel(dataclasses.replace(_config, **kwargs)),
                     f"{_name} translation model; kwargs override TranslatorConfig fields.")
