"""LightGBM: the model practitioners would pick instead, and the peer to beat."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from finance.models.base import CreditModel, FitData, register_model


@dataclass
class LightGBMConfig:
    learning_rate: float = 0.03  # slow and early-stopped: the usual recipe for credit tables
    num_leaves: int = 31  # LightGBM's default; deeper trees overfit 20-100k-row credit sets
    min_child_samples: int = 100  # leaves of >= 100 applicants keep the scores stable
    feature_fraction: float = 0.5  # hundreds of correlated aggregates: sample half per tree
    bagging_fraction: float = 0.8
    lambda_l2: float = 5.0
    max_rounds: int = 3000
    early_stopping_rounds: int = 150  # on the validation AUC
    # One thread: on a shared 2-core machine OpenMP's spin-waiting made 2 threads 7x slower than 1.
    threads: int = 1
    # Reason-code attributions: "path" (Saabas: each split's change of the node value goes to its
    # feature; exact in sum, O(depth) per tree) or "shap" (LightGBM's exact TreeSHAP). TreeSHAP cost
    # 3.3 ms per applicant on 173 trees x 369 features here, too slow for a batch of a million.
    attribution: str = "path"

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"LightGBMConfig: {message}")

        if not 0 < self.learning_rate <= 1:
            fail(f"learning_rate must lie in (0, 1], got {self.learning_rate!r}")
        for name in ("num_leaves", "min_child_samples", "max_rounds", "early_stopping_rounds", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_leaves < 2:
            fail(f"num_leaves must be >= 2, got {self.num_leaves}")
        for name in ("feature_fraction", "bagging_fraction"):
            if not 0 < getattr(self, name) <= 1:
                fail(f"{name} must lie in (0, 1], got {getattr(self, name)!r}")
        if not self.lambda_l2 >= 0:
            fail(f"lambda_l2 must be >= 0, got {self.lambda_l2!r}")
        if self.attribution not in ("path", "shap"):
            fail(f"attribution must be 'path' or 'shap', got {self.attribution!r}")


@register_model("lightgbm")
class LightGBMModel(CreditModel):
    """Gradient-boosted trees. Contributions (log-odds): path attributions or TreeSHAP (config.attribution)."""

    config_class = LightGBMConfig

    def _params(self) -> dict[str, Any]:
        c = self.config_
        return {"objective": "binary", "metric": "auc", "learning_rate": c.learning_rate, "num_leaves": c.num_leaves,
                "min_child_samples": c.min_child_samples, "feature_fraction": c.feature_fraction,
                "bagging_fraction": c.bagging_fraction, "bagging_freq": 1, "lambda_l2": c.lambda_l2,
                "num_threads": c.threads, "seed": self.seed, "verbose": -1, "deterministic": True,
                "force_row_wise": True}

    def _fit(self, X: FitData, y: np.ndarray, sample_weight: np.ndarray | None, X_valid: FitData | None,
             y_valid: np.ndarray | None) -> None:
        names = [_safe(n) for n in self.features_]
        dtrain = lgb.Dataset(X.X, y, weight=sample_weight, feature_name=names, free_raw_data=False)
        dvalid = lgb.Dataset(X_valid.X, y_valid, reference=dtrain)
        self.booster_ = lgb.train(self._params(), dtrain, num_boost_round=self.config_.max_rounds, valid_sets=[dvalid],
                                  callbacks=[lgb.early_stopping(self.config_.early_stopping_rounds, verbose=False)])
        self.best_iteration_ = int(self.booster_.best_iteration or self.booster_.current_iteration())
        self.paths_ = self._path_tables()
        self.ragged_ = self._ragged_paths()

    def _path_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per tree and leaf, the (feature, value change) of each split on the root-to-leaf path.

        Returns feature (trees, leaves, depth) int32 (-1 = padding), delta (same shape) float64 and
        the trees' root values (trees,). A loop over tree nodes, done once per fitted model.
        """
        trees = self.booster_.dump_model(num_iteration=self.best_iteration_)["tree_info"]
        paths: list[dict[int, list[tuple[int, float]]]] = []
        roots = np.zeros(len(trees))
        for t, info in enumerate(trees):
            leaves: dict[int, list[tuple[int, float]]] = {}
            root = info["tree_structure"]
            roots[t] = root.get("internal_value", root.get("leaf_value", 0.0))
            stack = [(root, [])]
            while stack:
                node, path = stack.pop()
                if "leaf_index" in node or "split_feature" not in node:
                    leaves[node.get("leaf_index", 0)] = path
                    continue
                for side in ("left_child", "right_child"):
                    child = node[side]
                    value = child.get("internal_value", child.get("leaf_value"))
                    stack.append((child, [*path, (node["split_feature"], value - node["internal_value"])]))
            paths.append(leaves)
        max_leaves = max(max(p) + 1 for p in paths)
        depth = max(1, max(len(v) for p in paths for v in p.values()))
        feature = np.full((len(trees), max_leaves, depth), -1, dtype=np.int32)
        delta = np.zeros((len(trees), max_leaves, depth))
        for t, leaves in enumerate(paths):
            for leaf, path in leaves.items():
                for d, (f, change) in enumerate(path):
                    feature[t, leaf, d], delta[t, leaf, d] = f, change
        return feature, delta, roots

    def _ragged_paths(self) -> tuple[np.ndarray, ...]:
        """The path tables as one ragged list over (tree, leaf), so that a row's entries are gathered
        tree by tree, depth by depth (the order bincount then sums them in) without the padding to
        the deepest leaf. Returns length and first entry per (tree, leaf) (trees * leaves,), the
        entries' feature and delta, and each tree's first (tree, leaf) id (1, trees)."""
        feature, delta, _ = self.paths_
        present = feature >= 0  # (trees, leaves, depth)
        length = present.sum(-1).ravel()
        first = np.concatenate([[0], np.cumsum(length)[:-1]])
        return length, first, feature[present], delta[present], (np.arange(feature.shape[0]) * feature.shape[1])[None]

    def predict_proba(self, X: FitData | np.ndarray) -> np.ndarray:
        data = self._input(X)
        pd_ = self.booster_.predict(data.X, num_iteration=self.best_iteration_, num_threads=self.config_.threads)
        return np.column_stack([1 - pd_, pd_])

    def contributions(self, X: FitData | np.ndarray) -> np.ndarray:
        data = self._input(X)
        if self.config_.attribution == "shap":
            contrib = self.booster_.predict(data.X, num_iteration=self.best_iteration_, pred_contrib=True,
                                            num_threads=self.config_.threads)
            return contrib[:, :-1]  # last column is the expected value
        leaves = self.booster_.predict(data.X, num_iteration=self.best_iteration_, pred_leaf=True,
                                       num_threads=self.config_.threads)  # (n, trees)
        leaves = leaves.reshape(len(data), -1)
        length, first, flat_feature, flat_delta, tree_base = self.ragged_
        n_features = len(self.features_)
        out = np.zeros((len(data), n_features))
        for start in range(0, len(data), 4096):  # blocks keep the gathered entries small
            leaf = tree_base + leaves[start:start + 4096]  # (b, trees) ids of the leaves reached
            count = length[leaf]
            flat_count = count.ravel()
            skip = np.repeat(first[leaf.ravel()] - (np.cumsum(flat_count) - flat_count), flat_count)
            entry = skip + np.arange(len(skip))  # positions in the ragged list, row by row
            rows = np.repeat(np.arange(len(leaf)), count.sum(1))
            out[start:start + len(leaf)] = np.bincount(rows * n_features + flat_feature[entry],
                                                       weights=flat_delta[entry],
                                                       minlength=len(leaf) * n_features).reshape(len(leaf), -1)
        return out

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.booster_.save_model(str(directory / "lightgbm.txt"), num_iteration=self.best_iteration_)
        (directory / "lightgbm.json").write_text(json.dumps({"config": asdict(self.config_),
                                                             "best_iteration": self.best_iteration_}))

    @classmethod
    def load(cls, directory: Path, *, feature_names: list[str], dataset: str) -> LightGBMModel:
        meta = json.loads((directory / "lightgbm.json").read_text())
        model = cls._restored(config=LightGBMConfig(**meta["config"]), feature_names=feature_names, dataset=dataset)
        model.booster_ = lgb.Booster(model_file=str(directory / "lightgbm.txt"))
        model.best_iteration_ = meta["best_iteration"]
        model.paths_ = model._path_tables()
        model.ragged_ = model._ragged_paths()
        return model

    def summary(self) -> dict[str, Any]:
        return {"trees": self.best_iteration_}

    def export_onnx(self, path: Path) -> Path:
        """ONNX of the booster at the feature-matrix level: input `features` (batch, F) float32,
        outputs `label` and `probabilities` (batch, 2) (zipmap off, so a plain tensor)."""
        import onnx
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType

        from core.onnx_export import OPSET

        features = [("features", FloatTensorType([None, len(self.features_)]))]
        # onnxmltools' LightGBM converter stops at opset 15.
        proto = onnxmltools.convert_lightgbm(self.booster_, initial_types=features, zipmap=False,
                                             target_opset=min(OPSET, 15))
        proto.producer_name = "moeworks"
        onnx.checker.check_model(proto, full_check=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        return path


def _safe(name: str) -> str:
    """LightGBM rejects some characters in feature names (e.g. ':' or ',')."""
    return "".join(ch if ch.isalnum() or ch in "_=-" else "_" for ch in name)
