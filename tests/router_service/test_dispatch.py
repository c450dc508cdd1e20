"""Dispatch without Ray: which actor each token goes to."""

from __future__ import annotations

import torch

from router_service.dispatch import ExpertDispatcher


def test_dispatcher_deals_a_replicated_experts_tokens_round_robin():
    owners = {("encoder", 1): {0: [0], 1: [1, 2], 2: [2]}}
    dispatcher = ExpertDispatcher([], owners, num_experts=3)
    expert = torch.tensor([1, 0, 1, 1, 2, 1, 0])
    assert dispatcher.owner(("encoder", 1), expert).tolist() == [1, 0, 2, 1, 2, 2, 0]
