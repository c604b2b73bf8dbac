"""Decoding for the translation model, kept apart from the modeling code as transformers does.

:class:`GenerationMixin` gives :class:`~intern2.models.translator.TranslationModel` its ``generate``. Decoding
follows transformers' ``generate`` semantics token for token (greedy, sampling, beam search with HF's
length-normalised scores), with a key/value cache: self-attention keys/values are written into preallocated buffers,
cross-attention keys/values are computed once per source sentence and shared by its beams, beams are reordered with
``index_select`` and the encoder runs once.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: translator.py imports this module, never the other way round
    from .translator import DecoderCache, TranslatorConfig

__all__ = ["GenerationMixin", "GenerateOutput"]

# transformers' beam search marks impossible candidates with this finite penalty (not -inf); kept for equal scores.
_BEAM_PENALTY = -1.0e9


@dataclass
class GenerateOutput:
    """``generate(..., return_dict_in_generate=True)``: sequences and, for beam search, their final scores
    (sum of token log-probs divided by generated length ** length_penalty, as transformers reports them)."""

    sequences: Tensor
    sequences_scores: Optional[Tensor] = None


# ------------------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class _ScoreRules:
    """transformers' logits processors that generate() supports, applied in transformers' order."""

    eos_token_id: int
    forced_bos_token_id: Optional[int] = None
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    def __call__(self, seqs: Tensor, scores: Tensor) -> Tensor:
        """``seqs`` [N, t]: decoder tokens so far, start token first; ``scores`` [N, V] for token t (edited in
        place)."""
        generated = seqs.shape[1] - 1
        if self.repetition_penalty != 1.0:  # CTRL penalty on every token already in the decoder input
            seen = scores.gather(1, seqs)
            scores.scatter_(1, seqs, torch.where(seen < 0, seen * self.repetition_penalty,
                                                 seen / self.repetition_penalty))
        n = self.no_repeat_ngram_size
        if n and seqs.shape[1] >= n:
            grams = seqs.unfold(1, n, 1)  # [N, windows, n]: every n-gram so far
            last = seqs[:, seqs.shape[1] - n + 1:]  # the n-1 tokens a new n-gram would start with
            hit = (grams[:, :, :-1] == last[:, None]).all(-1)
            rows, cols = hit.nonzero(as_tuple=True)
            scores[rows, grams[rows, cols, -1]] = -math.inf
        if generated < self.min_new_tokens:
            scores[:, self.eos_token_id] = -math.inf
        if self.forced_bos_token_id is not None and generated == 0:
            scores.fill_(-math.inf)
            scores[:, self.forced_bos_token_id] = 0.0
        return scores


@dataclass(frozen=True)
class _Sampler:
    """transformers' sampling warpers (temperature, top-k, top-p) and the draw itself."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_keep: int = 1  # beam sampling keeps at least 2 so some candidate need not end
    generator: Optional[torch.Generator] = None

    def warp(self, scores: Tensor) -> Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = scores.topk(min(max(self.top_k, self.min_keep), scores.shape[-1])).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # the tokens before it already hold top_p of the mass
            drop[:, :self.min_keep] = False
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
        return scores

    def draw(self, scores: Tensor, num: int) -> Tensor:
        return torch.multinomial(scores.softmax(-1), num, generator=self.generator)


# ------------------------------------------------------------------------------------------------------ mixin
class GenerationMixin:
    """``generate`` for an encoder-decoder translation model (inherited by
    :class:`~intern2.models.translator.TranslationModel`).

    Contract: the model class provides

    * ``config``: ``pad_token_id``, ``eos_token_id``, ``decoder_start_token_id``, ``vocab_size`` and
      ``max_position_embeddings`` (a :class:`~intern2.models.translator.TranslatorConfig`);
    * ``max_source_tokens``: the longest source the model was trained on; longer ones warn (None: no check);
    * ``_prepare_cache(input_ids, attention_mask, max_length)``: runs the encoder once and returns the decoder's
      key/value cache for ``max_length`` decoder positions (a :class:`~intern2.models.translator.DecoderCache`: it
      has ``device`` and ``reorder(rows)``, which beam search calls to reorder the hypotheses);
    * ``_decode_step(tokens, cache)``: the output-projection logits [N, V] (model dtype) for the token after
      ``tokens`` [N, 1], one decoder call that appends their keys/values to ``cache``.
    """

    config: TranslatorConfig
    max_source_tokens: Optional[int] = None

    def _prepare_cache(self, input_ids: Tensor, attention_mask: Tensor, max_length: int) -> DecoderCache:
        raise NotImplementedError

    def _decode_step(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def generate(
            self,
            input_ids: Tensor,
            attention_mask: Optional[Tensor] = None,
            forced_bos_token_id: Optional[int] = None,
            max_new_tokens: Optional[int] = None,
            min_new_tokens: int = 0,
            num_beams: int = 1,
            num_return_sequences: int = 1,
            length_penalty: float = 1.0,
            early_stopping: Union[bool, str] = False,
            no_repeat_ngram_size: int = 0,
            repetition_penalty: float = 1.0,
            do_sample: bool = False,
            temperature: float = 1.0,
            top_k: int = 50,
            top_p: float = 1.0,
            generator: Optional[torch.Generator] = None,
            return_dict_in_generate: bool = False,
            stop: Optional[Callable[[], None]] = None,
    ) -> Union[Tensor, GenerateOutput]:
        """Translate a batch of source token ids with transformers' ``generate`` semantics.

        Args:
            input_ids: [B, S] NLLB layout ``[src_lang, tokens..., eos]``, right- or left-padded.
            attention_mask: [B, S], 1 for real tokens; default: ``input_ids != pad``.
            forced_bos_token_id: the target-language token, forced as first generated token (NLLB/M2M-100
                answer in an arbitrary language without it, so leaving it out warns).
            max_new_tokens: default ``min(2 * source length + 10, max_position_embeddings)`` for each source row
                (its unpadded length), long enough for any sane translation, never a fixed 20/200 that truncates;
                a row's budget is its own, so its translation does not depend on what else is in the batch.
            min_new_tokens: EOS is forbidden until this many tokens (the forced one included) exist.
            num_beams, num_return_sequences, length_penalty, early_stopping (True, False or "never"): beam search;
                scores are sum log-prob / generated_length ** length_penalty.
            no_repeat_ngram_size, repetition_penalty: against repetition loops (e.g. 3 and 1.2).
            do_sample, temperature, top_k, top_p, generator: sampling (also with beams, as transformers does).
            return_dict_in_generate: return :class:`GenerateOutput` (sequences + beam scores).
            stop: called before every decoding step; it raises to abandon the work (a deadline, a cancelled
                request, a server shutting down).

        Returns:
            [B * num_return_sequences, 1 + generated] token ids starting with the decoder start token, padded
            with ``pad_token_id`` after EOS.
        """
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.long, torch.int):
            raise TypeError(f"input_ids: expected a tensor of integer token ids, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or not input_ids.numel():
            raise ValueError(f"input_ids: expected [batch, length] token ids, got shape {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size:
            raise ValueError(f"input_ids: ids from {int(input_ids.min())} to {int(input_ids.max())}, expected "
                             f"0 to {cfg.vocab_size - 1} (vocab_size)")
        counts = dict(num_beams=num_beams, num_return_sequences=num_return_sequences, min_new_tokens=min_new_tokens,
                      no_repeat_ngram_size=no_repeat_ngram_size, top_k=top_k,
                      **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}))
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        # Sinusoidal positions extrapolate past max_position_embeddings, but not without end: the cache is
        # allocated for every position at the first step.
        longest = 4 * cfg.max_position_embeddings
        if max_new_tokens is not None and not 1 <= max_new_tokens <= longest:
            raise ValueError(f"max_new_tokens: expected 1 to {longest} (4 x max_position_embeddings), "
                             f"got {max_new_tokens}")
        for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty),
                            ("length_penalty", length_penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if attention_mask is None:
            attention_mask = input_ids.ne(cfg.pad_token_id)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"{tuple(input_ids.shape)}")
        if forced_bos_token_id is None:
            warnings.warn("generate() without forced_bos_token_id: NLLB/M2M-100 models need the target-language "
                          "token forced or they may translate into the wrong language", stacklevel=3)
        elif isinstance(forced_bos_token_id, bool) or not isinstance(forced_bos_token_id, int) \
                or not 0 <= forced_bos_token_id < cfg.vocab_size:
            raise ValueError(f"forced_bos_token_id={forced_bos_token_id} is outside the vocabulary "
                             f"(vocab_size={cfg.vocab_size})")
        if num_beams < 1 or num_return_sequences < 1 or (num_beams > 1 and num_return_sequences > num_beams):
            raise ValueError(f"need num_beams >= 1 and 1 <= num_return_sequences (<= num_beams with beam search), "
                             f"got num_beams={num_beams}, num_return_sequences={num_return_sequences}")
        if num_beams == 1 and num_return_sequences > 1 and not do_sample:
            raise ValueError("greedy decoding returns one sequence per input; use num_beams or do_sample for more")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping: expected True, False or 'never', got {early_stopping!r}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")

        source_lengths = attention_mask.sum(1)
        source_length = int(source_lengths.max())
        if self.max_source_tokens is not None and source_length > self.max_source_tokens:
            warnings.warn(f"source has {source_length} tokens; NLLB models are trained on at most "
                          f"{self.max_source_tokens} and translate long inputs poorly or only in part: split the "
                          f"text into sentences (intern2.pipelines.translation.translate_in_sentences)", stacklevel=3)
        if max_new_tokens is None:
            budgets = (2 * source_lengths + 10).clamp(max=cfg.max_position_embeddings)
        else:
            budgets = torch.full_like(source_lengths, max_new_tokens)
        budgets = budgets.to(device=input_ids.device, dtype=torch.long)
        max_new_tokens = int(budgets.max())
        rules = _ScoreRules(cfg.eos_token_id, forced_bos_token_id, min_new_tokens, no_repeat_ngram_size,
                            repetition_penalty)
        sampler = _Sampler(temperature, top_k, top_p, 2 if num_beams > 1 else 1, generator) if do_sample else None

        rows = num_beams if num_beams > 1 else num_return_sequences  # decoder rows per source
        cache = self._prepare_cache(input_ids, attention_mask, max_length=max_new_tokens + 1)
        if num_beams > 1:
            sequences, scores = self._beam_search(cache, input_ids.shape[0], num_beams, budgets, rules,
                                                  sampler, length_penalty, early_stopping, num_return_sequences, stop)
        else:
            sequences, scores = self._greedy_or_sample(cache, budgets.repeat_interleave(rows), rules, sampler,
                                                       stop), None
        return GenerateOutput(sequences, scores) if return_dict_in_generate else sequences

    def _next_scores(self, tokens: Tensor, cache: DecoderCache) -> Tensor:
        """float32 logits [N, V] for the token after ``tokens`` [N, 1]."""
        return self._decode_step(tokens, cache).float()

    def _greedy_or_sample(self, cache: DecoderCache, budgets: Tensor, rules: _ScoreRules,
                          sampler: Optional[_Sampler], stop: Optional[Callable[[], None]] = None) -> Tensor:
        """Greedy or sampled decoding of each row up to EOS or its budget of new tokens (``budgets`` [rows])."""
        cfg = self.config
        device = cache.device
        seqs = torch.full((len(budgets), 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
        done = torch.zeros(len(budgets), dtype=torch.bool, device=device)
        for step in range(1, int(budgets.max()) + 1):
            if stop is not None:
                stop()
            scores = rules(seqs, self._next_scores(seqs[:, -1:], cache))
            token = sampler.draw(sampler.warp(scores), 1)[:, 0] if sampler else scores.argmax(-1)
            token = token.masked_fill(done, cfg.pad_token_id)  # finished rows only pad
            seqs = torch.cat([seqs, token[:, None]], dim=1)
            done |= (token == cfg.eos_token_id) | (budgets <= step)
            if done.all():
                break
        return seqs

    def _beam_search(self, cache: DecoderCache, batch: int, beams: int, budgets: Tensor, rules: _ScoreRules,
                     sampler: Optional[_Sampler], length_penalty: float, early_stopping: Union[bool, str],
                     num_return: int, stop: Optional[Callable[[], None]] = None) -> Tuple[Tensor, Tensor]:
        """transformers' vectorised beam search: each step keeps 2 * beams candidates per source, the best
        ``beams`` that do not end go on, the ones among the first ``beams`` that end (EOS or the source's budget of
        new tokens, ``budgets`` [batch]) compete for the ``beams`` finished slots by length-normalised score."""
        cfg = self.config
        device = cache.device
        keep, total = 2 * beams, int(budgets.max()) + 1
        budgets = budgets[:, None]
        running = torch.full((batch, beams, total), cfg.pad_token_id, dtype=torch.long, device=device)
        running[:, :, 0] = cfg.decoder_start_token_id
        running_scores = torch.zeros(batch, beams, device=device)
        running_scores[:, 1:] = _BEAM_PENALTY  # the beams start identical: only the first may expand
        finished = running.clone()
        finished_scores = torch.full((batch, beams), _BEAM_PENALTY, device=device)
        finished_length = torch.zeros(batch, beams, dtype=torch.long, device=device)
        is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
        first = torch.arange(keep, device=device) < beams
        offsets = torch.arange(batch, device=device)[:, None] * beams

        def take(x: Tensor, index: Tensor) -> Tensor:
            return x.gather(1, index[..., None].expand(-1, -1, total) if x.dim() == 3 else index)

        for t in range(1, total):  # t tokens exist; choose token t
            if stop is not None:
                stop()
            scores = self._next_scores(running[:, :, t - 1].reshape(-1, 1), cache).log_softmax(-1)
            scores = rules(running[:, :, :t].reshape(batch * beams, t), scores)
            if sampler:
                scores = sampler.warp(scores)
            vocab = scores.shape[-1]
            total_scores = (scores.view(batch, beams, vocab) + running_scores[..., None]).view(batch, -1)
            if sampler:
                index = sampler.draw(total_scores, keep)
                top = total_scores.gather(1, index)
            else:
                top, index = total_scores.topk(keep)
            origin = index // vocab
            candidates = take(running, origin)
            candidates[:, :, t] = index % vocab
            ends = (candidates[:, :, t] == cfg.eos_token_id) | (budgets == t)

            going_on = top + ends.float() * _BEAM_PENALTY
            pick = going_on.topk(beams).indices
            running, running_scores = take(candidates, pick), going_on.gather(1, pick)

            ended = ends & first
            score = top / t ** length_penalty
            score = score + (is_finished.all(1, keepdim=True) & (early_stopping is True)).float() * _BEAM_PENALTY
            score = score + (~improvable).float() * _BEAM_PENALTY
            score = score + (~ended).float() * _BEAM_PENALTY
            merged_scores = torch.cat([finished_scores, score], 1)
            best = merged_scores.topk(beams).indices
            finished_scores = merged_scores.gather(1, best)
            finished = take(torch.cat([finished, candidates], 1), best)
            is_finished = take(torch.cat([is_finished, ended], 1), best)
            finished_length = take(torch.cat([finished_length, torch.full_like(ended, t, dtype=torch.long)], 1), best)

            # Can a running beam still beat the worst finished one? ("never" assumes it may grow to the limit.)
            best_length = budgets if early_stopping == "never" and length_penalty > 0 else t
            worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, _BEAM_PENALTY)
            improvable &= (running_scores[:, :1] / best_length ** length_penalty > worst).any(1, keepdim=True)
            improvable &= budgets > t  # a source at its budget has ended all its beams: nothing may join later
            if not improvable.any() or (early_stopping is True and is_finished.all()) or ends.all():
                break
            cache.reorder((take(origin, pick) + offsets).view(-1))

        length = 1 + int(finished_length[:, :num_return].max())
        return finished[:, :num_return, :length].flatten(0, 1), finished_scores[:, :num_return].flatten()
