"""Calibration rewards (``docs/ppo-and-calibration.md`` §C) and the PPO reward plug-in layer.

Scalar rewards (pure functions of one sample; a missing confidence gives the format penalty):

* :func:`binary_qa_loglik_reward` — "Rewarding Doubt" log-likelihood for yes/no answers (§C.1).
* :func:`continuous_loglik_reward` — expected log-likelihood against a report accuracy p* with
  the shapings shifted / centered / tanh / logistic (§C.2).
* :func:`quadratic_blend_reward` — scaled negative (blended) Brier score (§C.3).

PPO plug-in: :func:`get_reward` / :func:`load_reward` build a callable
``reward(samples, responses) -> RewardOutput`` that parses the confidences, obtains each sample's
correctness or accuracy (dataset row fields or a pluggable ``accuracy_scorer``), applies the
optional exploration trick (§B) and returns one score per sample plus the character span of the
confidence statement to optimise.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radialog_rl.calibration.parsing import (
    find_confidence_span,
    parse_confidence,
    parse_truth,
    parse_yes_no,
    replace_confidences,
    strip_confidence,
)
from radialog_rl.errors import ConfigError, DataError, RadialogError

__all__ = [
    "BUILTIN_REWARDS",
    "SHAPINGS",
    "AccuracyScorer",
    "AccuracyScorerError",
    "CalibrationReward",
    "RewardFn",
    "RewardOutput",
    "binary_qa_loglik_reward",
    "continuous_loglik_reward",
    "get_reward",
    "load_reward",
    "quadratic_blend_reward",
    "row_accuracy",
]

logger = logging.getLogger(__name__)

#: ``accuracy_scorer(samples, responses) -> one accuracy in [0, 1] (or None = skip) per sample``.
AccuracyScorer = Callable[[Sequence[Mapping[str, Any]], Sequence[str]], Sequence[float | None]]


class AccuracyScorerError(RadialogError):
    """The accuracy scorer (e.g. a GREEN server) failed or returned unusable values."""


# ---------------------------------------------------------------------------------------------
# Scalar rewards (§C)
# ---------------------------------------------------------------------------------------------


def _probability(confidence: float, scale: int) -> float:
    """Stated confidence -> p = confidence / scale, checking it lies on the scale."""
    if isinstance(confidence, bool) or not 0 <= confidence <= scale:
        raise ValueError(f"confidence must be a number in 0..{scale}, got {confidence!r}")
    return float(confidence) / scale


def _check_accuracy(accuracy: float) -> float:
    if isinstance(accuracy, bool):
        return float(accuracy)
    if not (isinstance(accuracy, (int, float, np.integer, np.floating)) and 0.0 <= accuracy <= 1.0):
        raise DataError(f"accuracy must be a number in [0, 1], got {accuracy!r}")
    return float(accuracy)


def binary_qa_loglik_reward(
    confidence: float | None,
    correct: bool | None,
    scale: int = 10,
    *,
    eps: float = 0.001,
    correct_bonus: float = 0.25,
    reward_scale: float = 5.0,
    penalty: float = -15.0,
) -> float:
    """Rewarding Doubt's binary QA log-likelihood reward (§C.1).

    p = clip(confidence/scale, eps, 1-eps); s = log p if correct else log(1-p);
    MAX = log(1-eps), MIN = log(eps)/2; n = (s - MIN)/(MAX - MIN) (+ correct_bonus if correct);
    reward = reward_scale * n. A missing confidence or answer (None) gives ``penalty``.
    Defaults reproduce the §C reference values (N=10 correct -> 6.250, N=10 wrong -> -5.001).
    """
    if confidence is None or correct is None:
        return float(penalty)
    p = min(max(_probability(confidence, scale), eps), 1.0 - eps)
    s = math.log(p) if correct else math.log(1.0 - p)
    s_max, s_min = math.log(1.0 - eps), math.log(eps) / 2.0
    n = (s - s_min) / (s_max - s_min) + (correct_bonus if correct else 0.0)
    return reward_scale * n


def _shape_shifted(r: float, r_min: float, r0: float, s: float) -> float:
    r_max = 0.0
    return 2.0 * (r - r_min) / (r_max - r_min) - 1.0


def _shape_centered(r: float, r_min: float, r0: float, s: float) -> float:
    # Written exactly as §C.2 states it. Note the lower branch reaches (R0-R_min)/(-R0-R_min) - 1
    # (about -0.26 for eps=0.01) at R0, not 0: the shaping is monotone but jumps at R0.
    if r <= r0:
        return (r - r_min) / (-r0 - r_min) - 1.0
    return (r - r0) / (-r0)


def _shape_tanh(r: float, r_min: float, r0: float, s: float) -> float:
    return math.tanh((r - r0) / s)


def _shape_logistic(r: float, r_min: float, r0: float, s: float) -> float:
    return 2.0 / (1.0 + math.exp(-(r - r0) / s)) - 1.0


#: §C.2 shapings of the expected log-likelihood R: name -> f(R, R_min, R0, s).
SHAPINGS: dict[str, Callable[[float, float, float, float], float]] = {
    "shifted": _shape_shifted,
    "centered": _shape_centered,
    "tanh": _shape_tanh,
    "logistic": _shape_logistic,
}


def continuous_loglik_reward(
    confidence: float | None,
    accuracy: float,
    scale: int = 10,
    shaping: str = "shifted",
    eps: float = 0.01,
    reward_scale: float = 2.0,
    s: float = math.log(2.0),
    *,
    penalty: float | None = None,
) -> float:
    """Continuous log-likelihood reward against an accuracy p* in [0, 1] (§C.2).

    p = clip(confidence/scale, eps, 1-eps); R = p*·log p + (1-p*)·log(1-p); R_min = log eps,
    R0 = -log 2, R_max = 0; reward = reward_scale · shaping(R) with ``shaping`` one of
    :data:`SHAPINGS` (``s`` is the temperature of tanh/logistic). A missing confidence gives
    ``penalty`` (default -3·reward_scale). Published run: shifted, eps=0.01, reward_scale 2.
    """
    if shaping not in SHAPINGS:
        raise ConfigError(f"unknown shaping {shaping!r}; choose one of {sorted(SHAPINGS)}")
    if confidence is None:
        return float(penalty) if penalty is not None else -3.0 * reward_scale
    target = _check_accuracy(accuracy)
    p = min(max(_probability(confidence, scale), eps), 1.0 - eps)
    r = target * math.log(p) + (1.0 - target) * math.log(1.0 - p)
    return reward_scale * SHAPINGS[shaping](r, math.log(eps), -math.log(2.0), s)


def quadratic_blend_reward(
    confidence: float | None,
    accuracy: float,
    scale: int = 10,
    *,
    beta: float = 0.0,
    reward_scale: float = 2.0,
    r_max: float = 0.0,
    penalty: float | None = None,
) -> float:
    """Quadratic blend reward (§C.3).

    d = |p - p*|; penalty_d = d²(1 + beta·d²)/(1 + beta); reward = reward_scale·(r_max - penalty_d).
    A missing confidence gives ``penalty`` (default -3·reward_scale). Published run: beta=0,
    reward_scale 2, r_max 0, i.e. a scaled negative Brier score.
    """
    if confidence is None:
        return float(penalty) if penalty is not None else -3.0 * reward_scale
    d = abs(_probability(confidence, scale) - _check_accuracy(accuracy))
    blended = d * d * (1.0 + beta * d * d) / (1.0 + beta)
    return reward_scale * (r_max - blended)


# ---------------------------------------------------------------------------------------------
# PPO plug-in layer
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardOutput:
    """What a reward callable returns for a batch of ``len(scores)`` samples.

    scores: one task score per sample; None = sample skipped (e.g. the accuracy scorer failed for
        it), which the trainer must drop rather than treat as 0.
    spans: per sample, the character span ``(start, end)`` in the response text to optimise (the
        confidence statement, :func:`~radialog_rl.calibration.parsing.find_confidence_span`), None
        = no statement (optimise the whole response); ``spans=None`` = no span information.
    texts: the response texts the scores refer to when exploration (§B) rewrote confidences,
        else None. When given, the trainer must train on these texts (the spans index them).
    confidences / accuracies: the parsed confidence and the correctness/accuracy used per sample
        (for logging calibration metrics during training); None where missing.
    """

    scores: list[float | None]
    spans: list[tuple[int, int] | None] | None = None
    texts: list[str] | None = None
    confidences: list[int | None] | None = None
    accuracies: list[float | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.scores)
        for name in ("spans", "texts", "confidences", "accuracies"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"RewardOutput.{name} has {len(value)} entries for {n} scores")


#: A reward callable as the PPO trainer uses it.
RewardFn = Callable[[Sequence[Mapping[str, Any]], Sequence[str]], RewardOutput]

#: Built-in reward names -> their scalar function (§C).
BUILTIN_REWARDS: dict[str, Callable[..., float]] = {
    "binary_qa_loglik": binary_qa_loglik_reward,
    "report_loglik": continuous_loglik_reward,
    "quadratic_blend": quadratic_blend_reward,
}
# Rewards whose second argument is a 0/1 correctness rather than an accuracy in [0, 1].
_BINARY_REWARDS = frozenset({"binary_qa_loglik"})

def _truth(value: Any, index: int, key: str) -> bool:
    """A ground-truth yes/no from a row field (:func:`parse_truth`), or a DataError naming it."""
    truth = parse_truth(value)
    if truth is None:
        raise DataError(f"sample {index}: {key!r} must be yes/no, true/false or 0/1, got {value!r}")
    return truth


def row_accuracy(sample: Mapping[str, Any], response: str, index: int = 0) -> tuple[float | None, bool]:
    """``(accuracy, answer_unparsable)`` of one response from its dataset row.

    ``accuracy`` (a number in [0, 1]; None = not scored) and ``correct`` are used as given;
    ``answer`` / ``label`` hold the ground truth of a binary question and are compared with
    :func:`parse_yes_no` of the response; when no yes/no answer can be read the accuracy is None
    and ``answer_unparsable`` is True (the format penalty applies, §C.1).
    """
    if "accuracy" in sample:
        value = sample["accuracy"]
        return (None if value is None else _check_row_accuracy(value, index)), False
    if "correct" in sample:
        value = sample["correct"]
        return (None if value is None else float(_truth(value, index, "correct"))), False
    for key in ("answer", "label"):
        if key in sample:
            truth = _truth(sample[key], index, key)
            predicted = parse_yes_no(response)
            if predicted is None:
                return None, True
            return float(predicted == truth), False
    raise DataError(
        f"sample {index} has no 'accuracy', 'correct', 'answer' or 'label' field and the reward "
        "has no accuracy_scorer; add the ground truth or pass accuracy_scorer="
    )


def _check_row_accuracy(value: Any, index: int) -> float:
    try:
        return _check_accuracy(value)
    except DataError as exc:
        raise DataError(f"sample {index}: {exc}") from None


def _scored_accuracies(
    scorer: AccuracyScorer,
    samples: Sequence[Mapping[str, Any]],
    responses: Sequence[str],
) -> list[float | None]:
    """Call the pluggable scorer; its failures become :class:`AccuracyScorerError`, never 0."""
    name = getattr(scorer, "__name__", type(scorer).__name__)
    try:
        raw = list(scorer(samples, responses))
    except RadialogError:
        raise
    except Exception as exc:
        raise AccuracyScorerError(
            f"accuracy scorer {name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if len(raw) != len(samples):
        raise AccuracyScorerError(
            f"accuracy scorer {name} returned {len(raw)} values for {len(samples)} samples"
        )
    return [_scorer_value(v, i, name) for i, v in enumerate(raw)]


def _scorer_value(value: Any, index: int, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        # NaN is how some scorers signal a failed sample: skip it, loudly.
        logger.warning("accuracy scorer %s returned NaN for sample %d; skipping it", name, index)
        return None
    try:
        return _check_accuracy(value)
    except DataError:
        raise AccuracyScorerError(
            f"accuracy scorer {name} returned {value!r} for sample {index}; expected a number in "
            "[0, 1] or None"
        ) from None


def _check_params(fn: Callable[..., float], params: Mapping[str, Any], name: str) -> None:
    accepted = set(inspect.signature(fn).parameters) - {"confidence", "correct", "accuracy", "scale"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(
            f"reward {name!r} has no parameter(s) {', '.join(unknown)}; it accepts "
            f"{', '.join(sorted(accepted))}"
        )


class CalibrationReward:
    """A built-in §C reward as a PPO reward callable: ``reward(samples, responses) -> RewardOutput``.

    Per sample: the confidence is parsed from the response (after the optional exploration
    rewrite); the correctness/accuracy comes from ``accuracy_scorer`` when given (called with the
    responses stripped of their confidence statement), else from the row (see :func:`row_accuracy`).
    A missing confidence, or an unparsable yes/no answer for binary rows, gets the reward's penalty;
    a present confidence with an unknown accuracy (scorer/row gave None) is skipped (score None).
    """

    def __init__(
        self,
        name: str,
        *,
        scale: int = 10,
        accuracy_scorer: AccuracyScorer | None = None,
        explore_prob: float = 0.0,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        **params: Any,
    ) -> None:
        if name not in BUILTIN_REWARDS:
            raise ConfigError(f"unknown reward {name!r}; built-in rewards: {sorted(BUILTIN_REWARDS)}")
        if not 0.0 <= explore_prob <= 1.0:
            raise ConfigError(f"explore_prob must be in [0, 1], got {explore_prob}")
        self.name = name
        self.fn = BUILTIN_REWARDS[name]
        _check_params(self.fn, params, name)
        self.params = dict(params)
        self.scale = int(scale)
        self.accuracy_scorer = accuracy_scorer
        self.explore_prob = float(explore_prob)
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.binary = name in _BINARY_REWARDS

    def __repr__(self) -> str:
        return (
            f"CalibrationReward({self.name!r}, scale={self.scale}, explore_prob={self.explore_prob}, "
            f"params={self.params})"
        )

    def __call__(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> RewardOutput:
        if len(samples) != len(responses):
            raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
        texts, confidences = self._confidences(responses)
        accuracies, unparsable = self._accuracies(samples, texts)
        scores = [
            self._score(confidences[i], accuracies[i], unparsable[i], i) for i in range(len(texts))
        ]
        return RewardOutput(
            scores=scores,
            spans=[find_confidence_span(t) for t in texts],
            texts=texts if texts != list(responses) else None,
            confidences=confidences,
            accuracies=accuracies,
        )

    def check_sample(self, sample: Mapping[str, Any]) -> None:
        """Raise :class:`DataError` when a dataset row lacks ground truth this reward can read
        (checked for every row before training; with an ``accuracy_scorer`` the scorer decides)."""
        if self.accuracy_scorer is None:
            try:
                row_accuracy(sample, "", 0)
            except DataError as exc:  # the caller names the row by file and line, not batch index
                raise DataError(str(exc).removeprefix("sample 0: ")) from None

    def _confidences(self, responses: Sequence[str]) -> tuple[list[str], list[int | None]]:
        if self.explore_prob > 0.0:
            return replace_confidences(responses, self.explore_prob, self.rng, self.scale)
        return list(responses), [parse_confidence(r, self.scale) for r in responses]

    def _accuracies(
        self, samples: Sequence[Mapping[str, Any]], texts: list[str]
    ) -> tuple[list[float | None], list[bool]]:
        """Per sample: the accuracy (None = unknown) and whether the yes/no answer was unparsable."""
        if self.accuracy_scorer is not None:
            stripped = [strip_confidence(t) for t in texts]
            values = _scored_accuracies(self.accuracy_scorer, samples, stripped)
            return values, [False] * len(values)
        pairs = [row_accuracy(s, t, i) for i, (s, t) in enumerate(zip(samples, texts))]
        return [a for a, _ in pairs], [u for _, u in pairs]

    def _score(
        self, confidence: int | None, accuracy: float | None, unparsable: bool, index: int
    ) -> float | None:
        if confidence is None or unparsable:
            return self._penalty()
        if accuracy is None:
            return None  # accuracy unknown (scorer/row said so): skip, never score as 0
        if not self.binary:
            return self.fn(confidence, accuracy, self.scale, **self.params)
        if accuracy not in (0.0, 1.0):
            raise DataError(f"sample {index}: reward {self.name!r} needs a 0/1 correctness, got {accuracy}")
        return self.fn(confidence, bool(accuracy), self.scale, **self.params)

    def _penalty(self) -> float:
        """The reward's format penalty (its value for a missing confidence)."""
        return self.fn(None, None if self.binary else 0.0, self.scale, **self.params)


def get_reward(name: str, **params: Any) -> RewardFn:
    """A built-in reward callable by name (§C): "binary_qa_loglik", "report_loglik", "quadratic_blend".

    Keyword options: ``scale`` (10 or 100), ``accuracy_scorer`` (``(samples, responses) ->
    list[float | None]``), ``explore_prob`` (the §B exploration probability q, default 0 = off),
    ``seed`` or ``rng`` (for the exploration draws); every other keyword goes to the scalar reward
    (e.g. ``shaping="tanh"``, ``eps``, ``reward_scale``, ``beta``, ``penalty``).
    """
    return CalibrationReward(name, **params)


def _normalise_output(result: Any, n: int, spec: str) -> RewardOutput:
    """Accept a RewardOutput or a plain list of scores from a user reward function."""
    if isinstance(result, RewardOutput):
        out = result
    elif isinstance(result, (list, tuple, np.ndarray)):
        out = RewardOutput(scores=[None if v is None else float(v) for v in result])
    else:
        raise ConfigError(f"reward {spec} returned {type(result).__name__}; expected RewardOutput or a list")
    if len(out.scores) != n:
        raise ConfigError(f"reward {spec} returned {len(out.scores)} scores for {n} samples")
    return out


def _import_object(spec: str) -> Callable[..., Any]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"reward {spec!r} is neither a built-in name nor 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} of reward {spec!r}: {exc}") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"module {module_name!r} has no attribute {attr_path!r} (reward {spec!r})")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"reward {spec!r} is not callable")
    return obj


def load_reward(spec: str, **params: Any) -> RewardFn:
    """A reward callable from a PPO config string: a built-in name or ``"module:function"``.

    Built-in names go to :func:`get_reward` with ``params``. For ``"module:function"`` the function
    is imported and called as ``function(samples, responses, **params)``; it may return a
    :class:`RewardOutput` or a plain list of scores (None = skip).
    """
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return get_reward(spec, **params)
    fn = _import_object(spec)

    def reward(samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> RewardOutput:
        return _normalise_output(fn(samples, responses, **params), len(samples), spec)

    reward.__name__ = spec
    reward.__qualname__ = spec
    return reward
