"""The expert fleet's own state, without Ray: what it tells its fronts and Serve when its load fails."""

from __future__ import annotations

import pytest

from cluster.testing import tiny_config, write_random_checkpoint
from experts import fleet
from experts.checkpoint import SwitchCheckpoint
from experts.placement import PlacementConfig


def test_a_fleet_whose_load_failed_says_so_to_its_fronts_and_to_serve(tmp_path, monkeypatch):
    """The fronts get the load's error (and report it, rather than 'loading' for good), and Serve's health check
    fails, so that Serve starts a new fleet, which tries again."""
    write_random_checkpoint(tmp_path, tiny_config(num_experts=4))

    def no_room(placement):
        raise RuntimeError("no node has room for the expert actors")

    monkeypatch.setattr(fleet, "actor_cpus", no_room)
    failed = fleet.ExpertFleet(SwitchCheckpoint.open(tmp_path), PlacementConfig(experts_per_actor=2), "float32")
    with pytest.raises(RuntimeError, match="no node has room"):
        failed.actors(wait_s=30)
    with pytest.raises(RuntimeError, match="no node has room"):
        failed.check_health()
