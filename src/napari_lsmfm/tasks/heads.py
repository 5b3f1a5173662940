"""Task heads on top of the foundation (the saved-model format is in
:mod:`napari_lsmfm.engine.store`).

Heads:
- :class:`VoxelHead`: a per-voxel MLP on feature vectors (segmentation: on the cached
  features in quick mode, on the finetuned backbone's in full mode); input
  standardisation is part of the module, so the saved weights are self-contained.
- :class:`ForestHead`: a random forest on the same feature vectors (quick mode's
  "forest" candidate), saved as arrays.
- :class:`DenseHead`: a small conv head on the foundation's dense output (the
  deblurring network's, trained end to end with the backbone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["DenseHead", "ForestHead", "VoxelHead", "tree_class"]


class VoxelHead(nn.Module):
    """Per-voxel classifier: standardise, then an MLP; (N, C_in) -> (N, n_out) logits."""

    def __init__(
        self, in_channels: int, n_out: int, hidden: int = 32, depth: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.n_out = int(n_out)
        self.hidden = int(hidden)
        self.depth = int(depth)
        self.dropout = float(dropout)
        self.register_buffer("mean", torch.zeros(self.in_channels))
        self.register_buffer("std", torch.ones(self.in_channels))
        # dropout on the inputs: no single (possibly uninformative) feature is relied upon
        layers: list[nn.Module] = [nn.Dropout(self.dropout)] if self.dropout > 0 else []
        width = self.in_channels
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        layers.append(nn.Linear(width, self.n_out))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def from_saved(cls, settings: Mapping[str, Any], state: Mapping[str, Any]) -> VoxelHead:
        """A head from its saved :meth:`settings` and state dict."""
        head = cls(settings["in_channels"], settings["n_out"], settings["hidden"],
                   settings.get("depth", 2), settings.get("dropout", 0.0))
        head.load_state_dict(state)
        return head

    def set_standardization(self, samples: torch.Tensor) -> None:
        """Per-channel mean and std from training vectors (N, C_in)."""
        with torch.no_grad():
            self.mean.copy_(samples.mean(0))
            self.std.copy_(samples.std(0).clamp_min(1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)

    def settings(self) -> dict:
        return {"in_channels": self.in_channels, "n_out": self.n_out, "hidden": self.hidden,
                "depth": self.depth, "dropout": self.dropout}


class DenseHead(nn.Module):
    """Conv head: (B, C_in, z, y, x) -> (B, n_out, z, y, x) logits; two 1x1x1 convs (the
    backbone supplies the spatial context; a 3x3x3 conv here would cost more than it)."""

    def __init__(self, in_channels: int, n_out: int, hidden: int = 32) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.n_out = int(n_out)
        self.hidden = int(hidden)
        self.net = nn.Sequential(
            nn.Conv3d(self.in_channels, self.hidden, 1),
            nn.ReLU(),
            nn.Conv3d(self.hidden, self.n_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def settings(self) -> dict:
        return {"in_channels": self.in_channels, "n_out": self.n_out, "hidden": self.hidden}


class ForestHead:
    """Per-voxel random forest on feature vectors (N, C_in) -> (N, n_out) probabilities;
    scikit-learn trains it, the trees are kept as plain arrays, so it saves to
    safetensors like the other heads (no pickle) and predicts with scikit-learn's own
    tree code after loading.

    ``in_channels``, ``n_out`` and :meth:`settings` / :meth:`state_dict` /
    :meth:`from_saved` as :class:`VoxelHead`; :meth:`probabilities` instead of forward.
    """

    _NODE_FIELDS = ("left_child", "right_child", "feature", "threshold", "impurity",
                    "n_node_samples", "weighted_n_node_samples")

    def __init__(self, in_channels: int, n_out: int, n_estimators: int = 40,
                 max_depth: int | None = 12, min_samples_leaf: int = 1, seed: int = 0) -> None:
        self.in_channels = int(in_channels)
        self.n_out = int(n_out)
        self.n_estimators = int(n_estimators)
        self.max_depth = None if max_depth is None else int(max_depth)
        self.min_samples_leaf = int(min_samples_leaf)
        self.seed = int(seed)
        self.trees: list[Any] = []  # sklearn.tree._tree.Tree, one per estimator
        self.depths: list[int] = []

    def fit(self, samples: Any, targets: Any) -> ForestHead:
        """Train on ``samples`` (N, C) float32 with class indices ``targets`` (N,) in
        [0, n_out); classes absent from ``targets`` get probability 0."""
        import numpy as np

        try:
            from sklearn.ensemble import RandomForestClassifier
        except ImportError as err:  # pragma: no cover - scikit-learn is a core dependency
            raise ImportError("the forest head needs scikit-learn: pip install scikit-learn"
                              ) from err
        forest = RandomForestClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf, random_state=self.seed, n_jobs=1,
        ).fit(np.asarray(samples, np.float32), np.asarray(targets))
        present = forest.classes_.astype(int)
        self.trees, self.depths = [], []
        for est in forest.estimators_:
            state = est.tree_.__getstate__()
            values = np.zeros((state["node_count"], 1, self.n_out), np.float64)
            values[:, 0, present] = state["values"][:, 0, : len(present)]
            self.trees.append(self._tree(state["nodes"], values, int(state["max_depth"])))
            self.depths.append(int(state["max_depth"]))
        return self

    def _tree(self, nodes: Any, values: Any, depth: int) -> Any:
        import numpy as np

        tree = tree_class()(self.in_channels, np.array([self.n_out], dtype=np.intp), 1)
        dtype = tree.__getstate__()["nodes"].dtype
        full = np.zeros(len(nodes), dtype)
        for name in dtype.names:
            if name in nodes.dtype.names:
                full[name] = nodes[name]
        values = np.ascontiguousarray(values, np.float64)
        tree.__setstate__({"max_depth": depth, "node_count": len(nodes), "nodes": full,
                           "values": values})
        return tree

    def probabilities(self, x: Any) -> Any:
        """Mean class probabilities of the trees: (N, n_out) float32 for (N, C) input."""
        import numpy as np

        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros((len(x), self.n_out), np.float64)
        for tree in self.trees:
            p = tree.predict(x).reshape(len(x), -1)[:, : self.n_out]
            out += p / np.maximum(p.sum(1, keepdims=True), 1e-12)
        return (out / max(len(self.trees), 1)).astype(np.float32)

    def settings(self) -> dict:
        return {"kind": "forest", "in_channels": self.in_channels, "n_out": self.n_out,
                "n_estimators": self.n_estimators, "max_depth": self.max_depth,
                "min_samples_leaf": self.min_samples_leaf, "seed": self.seed,
                "depths": list(self.depths)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trees as flat tensors: per node field (all trees concatenated), the
        values (nodes, n_out) and the node count of each tree."""
        import numpy as np

        states = [t.__getstate__() for t in self.trees]
        out = {f"nodes.{name}": torch.from_numpy(np.ascontiguousarray(
            np.concatenate([s["nodes"][name] for s in states])))
            for name in self._NODE_FIELDS}
        out["values"] = torch.from_numpy(np.concatenate([s["values"][:, 0] for s in states]))
        out["node_counts"] = torch.tensor([s["node_count"] for s in states], dtype=torch.int64)
        return out

    @classmethod
    def from_saved(cls, settings: Mapping[str, Any], state: Mapping[str, Any]) -> ForestHead:
        """A forest from its saved :meth:`settings` and :meth:`state_dict`."""
        import numpy as np

        head = cls(settings["in_channels"], settings["n_out"], settings["n_estimators"],
                   settings["max_depth"], settings.get("min_samples_leaf", 1),
                   settings.get("seed", 0))
        counts = state["node_counts"].numpy()
        fields = {name: state[f"nodes.{name}"].numpy() for name in cls._NODE_FIELDS}
        values = state["values"].numpy()
        dtype = np.dtype([(name, fields[name].dtype) for name in cls._NODE_FIELDS])
        start = 0
        for count, depth in zip(counts, settings["depths"], strict=True):
            nodes = np.zeros(int(count), dtype)
            for name in cls._NODE_FIELDS:
                nodes[name] = fields[name][start : start + count]
            head.trees.append(head._tree(nodes, values[start : start + count, None],
                                         int(depth)))
            head.depths.append(int(depth))
            start += int(count)
        return head

    def to(self, *_args: Any, **_kwargs: Any) -> ForestHead:
        return self  # numpy on the CPU wherever the foundation is

    def eval(self) -> ForestHead:
        return self


def tree_class() -> type:
    """scikit-learn's compiled tree type (what ``DecisionTreeClassifier.tree_`` is), found
    through the public estimator; trees are rebuilt from arrays with its pickle state."""
    global _TREE
    if _TREE is None:
        from sklearn.tree import DecisionTreeClassifier

        _TREE = type(DecisionTreeClassifier().fit([[0.0], [1.0]], [0, 1]).tree_)
    return _TREE


_TREE: type | None = None
