"""Choosing the next token for one sequence from its logits, with that sequence's own options."""

from __future__ import annotations

import torch

from qwen_grpc.engine.types import SamplingParams


class TokenSampler:
    """Per-sequence sampling state: the seeded generator and the ids seen for the penalty.

    Each sequence owns its generator, so a seeded request draws the same random numbers
    whatever else shares its batch.
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: tuple[int, ...], vocab_size: int
    ) -> None:
        self._params = params
        self._generator: torch.Generator | None = None
        if not params.is_greedy:
            self._generator = torch.Generator()
            if params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(params.seed)
        self._seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool)
            self._seen[list(prompt_ids)] = True

    def sample(self, logits: torch.Tensor) -> int:
        """Picks the next token from a 1-D float32 logits row."""
        params = self._params
        if self._seen is not None:
            seen_logits = logits[self._seen]
            logits = logits.clone()
            logits[self._seen] = torch.where(
                seen_logits < 0,
                seen_logits * params.repetition_penalty,
                seen_logits / params.repetition_penalty,
            )
        if params.is_greedy:
            token = int(torch.argmax(logits))
        else:
            token = self._draw(logits / params.temperature)
        if self._seen is not None:
            self._seen[token] = True
        return token

    def _draw(self, logits: torch.Tensor) -> int:
        params = self._params
        if 0 < params.top_k < logits.numel():
            values, indices = torch.topk(logits, params.top_k)
        elif params.top_p < 1.0:
            values, indices = torch.sort(logits, descending=True)
        else:
            probs = torch.softmax(logits, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self._generator))
        probs = torch.softmax(values, dim=-1)
        if params.top_p < 1.0:
            cumulative = torch.cumsum(probs, dim=-1)
            probs = torch.where(cumulative - probs < params.top_p, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs, 1, generator=self._generator)
        return int(indices[choice])
