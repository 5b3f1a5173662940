"""A task config is never in a state its checks refuse."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from napari_lsmfm.tasks.base import TaskConfig, TaskResult


@dataclass
class _Config(TaskConfig):
    tile: tuple[int, int, int] = (8, 8, 8)
    steps: int = 3

    def validate(self) -> None:
        self.tile = tuple(int(t) for t in self.tile)
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def test_assignment_is_validated_and_a_refused_one_changes_nothing():
    cfg = _Config()
    cfg.tile = [4, 5, 6]
    assert cfg.tile == (4, 5, 6)  # normalised as at construction
    with pytest.raises(ValueError, match="at least 1"):
        cfg.steps = 0
    assert cfg.steps == 3
    with pytest.raises(ValueError, match="at least 1"):
        _Config(steps=0)


def test_round_trip_and_replace():
    cfg = _Config(tile=(2, 3, 4))
    data = cfg.to_dict()
    assert data == {"tile": [2, 3, 4], "steps": 3}
    assert _Config.from_dict({**data, "unknown": 1}) == cfg
    assert cfg.replace(steps=5).steps == 5 and cfg.steps == 3


def test_result_geometry_follows_the_region():
    result = TaskResult()
    result.region = (slice(2, 4), slice(0, 8), slice(1, 8))
    geo = result.geometry(scale=(2.0, 1.0, 0.5), translate=(10.0, 0.0, 0.0))
    assert geo == {"scale": (2.0, 1.0, 0.5), "translate": (14.0, 0.0, 0.5)}
