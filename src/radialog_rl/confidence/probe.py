"""Trained probe: logistic regression on a hidden state, predicting whether a response is correct.

Features (:func:`probe_features`) come from the teacher-forced scoring pass of :mod:`.seqprob`
(prompt ⊕ response, one forward), at a configurable layer and position:

* ``layer``: index into the model's ``hidden_states`` (0 = token embeddings, k = output of decoder
  layer k, -1 (default) = the final-norm output the LM head reads);
* ``position``: ``"last_response"`` (default; the last response token, i.e. the ``</s>`` when the
  model stopped by itself: it has seen the whole answer), ``"last_prompt"`` (the last prompt token,
  before any answer token) or ``"mean_response"`` (mean over the response tokens).

The classifier is scikit-learn's :class:`~sklearn.linear_model.LogisticRegression` after a
:class:`~sklearn.preprocessing.StandardScaler`. :meth:`ConfidenceProbe.train` splits the labelled
samples into train and held-out parts (stratified, seeded), fits one probe per inverse
regularisation strength ``C`` on the train part, keeps the one with the lowest held-out log loss
and reports train and held-out metrics. Labels are correct = accuracy >= 0.5
(:data:`~radialog_rl.calibration.metrics.CORRECTNESS_THRESHOLD`).

Saved as one safetensors file (no pickle): float64 tensors ``coef`` ``[1, H]``, ``intercept``
``[1]``, ``mean`` ``[H]``, ``scale`` ``[H]``, and the feature config, ``C`` and metrics as JSON in
the file's metadata. Loading rebuilds the same scikit-learn objects, so predictions round-trip
exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radialog_rl.calibration.metrics import CORRECTNESS_THRESHOLD, compute_calibration
from radialog_rl.confidence.base import bin_confidence
from radialog_rl.confidence.seqprob import ScoredResponses
from radialog_rl.errors import CheckpointError, ConfigError, DataError

__all__ = ["POSITIONS", "ConfidenceProbe", "ProbeFeatureConfig", "probe_features"]

#: Where the probe reads the hidden state (see the module docstring).
POSITIONS: tuple[str, ...] = ("last_response", "last_prompt", "mean_response")

#: Inverse regularisation strengths tried by :meth:`ConfidenceProbe.train`.
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)

_FORMAT = "radialog-rl-confidence-probe"
_VERSION = "1"


@dataclass(frozen=True)
class ProbeFeatureConfig:
    """Which hidden state the probe reads: ``layer`` (hidden_states index) and ``position``."""

    layer: int = -1
    position: str = "last_response"

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ConfigError(f"probe position must be one of {', '.join(POSITIONS)}, got {self.position!r}")


def probe_features(scored: ScoredResponses, config: ProbeFeatureConfig = ProbeFeatureConfig()) -> torch.Tensor:
    """``[B, hidden]`` float32 features of each row at ``config.position`` (CPU).

    ``scored`` must come from :func:`~radialog_rl.confidence.seqprob.score_responses` with
    ``hidden_layer=config.layer``. Response token t of a row sits at position ``query_length + t``.
    """
    hidden = scored.hidden_states
    if hidden is None:
        raise ConfigError("the scoring pass returned no hidden states; pass hidden_layer to score_responses")
    q = scored.query_length
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if config.position == "last_prompt":
        feats = hidden[:, q - 1]
    elif config.position == "last_response":
        lengths = scored.mask.sum(1).to(hidden.device)
        feats = hidden[rows, q + lengths - 1]
    else:
        mask = scored.mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        feats = (hidden[:, q:] * mask).sum(1) / mask.sum(1).clamp(min=1)
    return feats.float().cpu()


def _labels(accuracies: Sequence[float]) -> np.ndarray:
    return (np.asarray(accuracies, dtype=float) >= CORRECTNESS_THRESHOLD).astype(int)


def _split_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """n, log loss, accuracy of the 0.5 decision and the calibration metrics of the binned output."""
    from sklearn.metrics import log_loss

    report = compute_calibration([bin_confidence(p) for p in probs], labels.astype(float))
    return {
        "n": int(labels.size),
        "log_loss": float(log_loss(labels, probs, labels=[0, 1])) if labels.size else None,
        "accuracy": float(((probs >= 0.5) == labels.astype(bool)).mean()) if labels.size else None,
        "ece": report.to_dict()["ece"], "brier": report.to_dict()["brier"], "auroc": report.auroc,
    }


@dataclass
class ConfidenceProbe:
    """A fitted probe: scaler + logistic regression, the feature config, and its training metrics."""

    scaler: Any  # sklearn.preprocessing.StandardScaler
    classifier: Any  # sklearn.linear_model.LogisticRegression
    features: ProbeFeatureConfig = ProbeFeatureConfig()
    C: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def train(
        cls,
        features: np.ndarray | torch.Tensor,
        accuracies: Sequence[float],
        *,
        feature_config: ProbeFeatureConfig = ProbeFeatureConfig(),
        heldout_fraction: float = 0.2,
        seed: int = 0,
        Cs: Sequence[float] = DEFAULT_CS,
        max_iter: int = 1000,
    ) -> ConfidenceProbe:
        """Fit on ``features [N, H]`` with labels ``accuracy >= 0.5``; choose ``C`` on a held-out split.

        ``heldout_fraction`` 0 fits one probe with the first of ``Cs`` on everything (no selection).

        Raises:
            DataError: fewer than two samples of a class in the train split, or shapes that differ.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        x = np.asarray(features.numpy() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        y = _labels(accuracies)
        if x.ndim != 2 or x.shape[0] != y.size:
            raise DataError(f"probe training needs features [N, H] and N labels; got {x.shape} and {y.size}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ConfigError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
        if not Cs:
            raise ConfigError("the probe needs at least one C value")
        counts = np.bincount(y, minlength=2)
        if counts.min() < 2:
            raise DataError(f"probe training needs at least 2 correct and 2 wrong samples; got "
                            f"{counts[1]} correct and {counts[0]} wrong")
        if heldout_fraction > 0:
            try:  # stratified keeps both classes in both splits ...
                idx_train, idx_held = train_test_split(np.arange(y.size), test_size=heldout_fraction,
                                                       random_state=seed, stratify=y)
            except ValueError:  # ... unless the held-out part is smaller than the number of classes
                idx_train, idx_held = train_test_split(np.arange(y.size), test_size=heldout_fraction,
                                                       random_state=seed)
        else:
            idx_train, idx_held = np.arange(y.size), np.arange(0)
        if len(set(y[idx_train].tolist())) < 2:
            raise DataError("the probe's train split holds one class only; use more labelled samples")
        scaler = StandardScaler().fit(x[idx_train])
        xt = scaler.transform(x[idx_train])
        xh = scaler.transform(x[idx_held]) if idx_held.size else None
        best = None
        for c in Cs if idx_held.size else Cs[:1]:
            clf = LogisticRegression(C=float(c), max_iter=max_iter, random_state=seed).fit(xt, y[idx_train])
            held = _split_metrics(clf.predict_proba(xh)[:, 1], y[idx_held]) if idx_held.size else None
            score = held["log_loss"] if held else 0.0
            if best is None or score < best[0]:
                best = (score, float(c), clf, held)
        _, c, clf, held = best
        metrics = {"train": _split_metrics(clf.predict_proba(xt)[:, 1], y[idx_train]),
                   "heldout": held, "C": c, "Cs": [float(v) for v in Cs], "seed": seed,
                   "heldout_fraction": heldout_fraction}
        return cls(scaler=scaler, classifier=clf, features=feature_config, C=c, metrics=metrics)

    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(correct) ``[N]`` float64 for ``features [N, H]``."""
        x = np.asarray(features.numpy() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.scaler.mean_.shape[0]:
            raise DataError(f"the probe expects features [N, {self.scaler.mean_.shape[0]}], got {x.shape}; "
                            "was it trained on another model?")
        return self.classifier.predict_proba(self.scaler.transform(x))[:, 1]

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe as one ``.safetensors`` file (tensors + JSON metadata); returns the path."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "coef": np.ascontiguousarray(self.classifier.coef_, dtype=np.float64),
            "intercept": np.ascontiguousarray(self.classifier.intercept_, dtype=np.float64),
            "mean": np.ascontiguousarray(self.scaler.mean_, dtype=np.float64),
            "scale": np.ascontiguousarray(self.scaler.scale_, dtype=np.float64),
        }
        meta = {"format": _FORMAT, "version": _VERSION, "features": json.dumps(asdict(self.features)),
                "C": repr(self.C), "metrics": json.dumps(self.metrics)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConfidenceProbe:
        """Read a probe written by :meth:`save` (safetensors only; nothing is unpickled)."""
        from safetensors import SafetensorError, safe_open
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"probe file not found: {path}")
        try:
            with safe_open(str(path), framework="np") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a safetensors probe file ({exc})") from None
        missing = {"coef", "intercept", "mean", "scale"} - set(tensors)
        if meta.get("format") != _FORMAT or missing:
            raise CheckpointError(f"{path}: not a radialog-rl confidence probe "
                                  f"(format {meta.get('format')!r}, missing {sorted(missing)})")
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = tensors["mean"], tensors["scale"]
        scaler.var_ = tensors["scale"] ** 2
        scaler.n_features_in_ = int(tensors["mean"].shape[0])
        c = float(meta.get("C", "1.0"))
        clf = LogisticRegression(C=c)
        clf.coef_, clf.intercept_ = tensors["coef"], tensors["intercept"]
        clf.classes_ = np.array([0, 1])
        clf.n_features_in_ = scaler.n_features_in_
        features = ProbeFeatureConfig(**json.loads(meta.get("features", "{}")))
        return cls(scaler=scaler, classifier=clf, features=features, C=c,
                   metrics=json.loads(meta.get("metrics", "{}")))
