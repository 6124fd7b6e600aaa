"""The causal LM of a mixture-of-experts family: router statistics on its output, the load-balance loss of a
pipeline stage's MoE layers, and the hook point where TP / CP sum those statistics over token shards.

A family's config names `num_experts_per_tok`, `router_aux_loss_coef` and `moe_layers`; its MoE layers report
their routing (`moe.Routing`) as the decoder layers' aux outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtllama.models.blocks import CausalLM, CausalLMOutput, TokenSum
from dtllama.models.moe import RouterStats, router_stats


@dataclass
class MoECausalLMOutput(CausalLMOutput):
    router_stats: RouterStats | None = None


class MoECausalLM(CausalLM):
    """Causal LM whose output adds `router_stats` over the batch's real tokens. `token_sum` sums the router
    statistics over the ranks holding other token shards of the same sequences (TP's sequence parallel, Ulysses
    register the sums), so the load-balance loss is that of all tokens."""

    output_class = MoECausalLMOutput
    token_sums = ("token_sum",)

    def _build_head(self, last: bool) -> None:
        super()._build_head(last)
        self.token_sum = TokenSum()

    def _stats(self, aux: list) -> RouterStats | None:
        c = self.config
        return router_stats(aux, c.num_experts_per_tok, c.router_aux_loss_coef, self.token_sum)

    def stage_aux_loss(self, aux: list) -> torch.Tensor | None:
        """This stage's MoE layers' share of the load-balance loss (a mean over all MoE layers of the model)."""
        stats = self._stats(aux)
        return None if stats.aux_loss is None else stats.aux_loss * (len(aux) / len(self.config.moe_layers))

    def aux_outputs(self, aux: list) -> dict:
        return {"router_stats": self._stats(aux)}


__all__ = ["MoECausalLM", "MoECausalLMOutput"]
