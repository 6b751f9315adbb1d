"""Rewards of ppo-and-calibration.md §C and the PPO reward plug-in layer."""

from __future__ import annotations

import sys
import textwrap

import pytest

from radialog_rl.calibration.parsing import parse_confidence
from radialog_rl.calibration.rewards import (
    BUILTIN_REWARDS,
    AccuracyScorerError,
    RewardOutput,
    binary_qa_loglik_reward,
    continuous_loglik_reward,
    get_reward,
    load_reward,
    quadratic_blend_reward,
)
from radialog_rl.errors import ConfigError, DataError, RadialogError

# §C.1 reference values for N = 0..10.
REF_CORRECT = [-3.751, 2.917, 3.921, 4.508, 4.925, 5.248, 5.512, 5.735, 5.928, 6.099, 6.250]
REF_WRONG = [5.000, 4.849, 4.678, 4.485, 4.262, 3.998, 3.675, 3.258, 2.671, 1.667, -5.001]


@pytest.mark.parametrize("n", range(11))
def test_binary_qa_reference_values(n):
    assert round(binary_qa_loglik_reward(n, True), 3) == pytest.approx(REF_CORRECT[n], abs=1e-9)
    assert round(binary_qa_loglik_reward(n, False), 3) == pytest.approx(REF_WRONG[n], abs=1e-9)


def test_binary_qa_granular_scale_matches():
    # 70/100 is the same p as 7/10.
    assert binary_qa_loglik_reward(70, True, scale=100) == pytest.approx(binary_qa_loglik_reward(7, True))


def test_binary_qa_penalty_and_parameters():
    assert binary_qa_loglik_reward(None, True) == -15.0
    assert binary_qa_loglik_reward(5, None) == -15.0
    assert binary_qa_loglik_reward(None, False, penalty=-3.0) == -3.0
    # eps=0.01, no bonus, reward_scale 1, p = 0.5 correct:
    # (ln .5 - ln(.01)/2) / (ln .99 - ln(.01)/2) = (-0.693147 + 2.302585) / (-0.010050 + 2.302585)
    #   = 1.609438 / 2.292535 = 0.702034
    value = binary_qa_loglik_reward(5, True, eps=0.01, correct_bonus=0.0, reward_scale=1.0)
    assert value == pytest.approx(0.702034, abs=1e-6)


def test_binary_qa_rejects_off_scale_confidence():
    with pytest.raises(ValueError):
        binary_qa_loglik_reward(11, True)


# Hand-computed continuous log-likelihood rewards, eps = 0.01, reward_scale 2, s = ln 2:
# R_min = ln .01 = -4.605170, R0 = -ln 2 = -0.693147.
#  conf 7, acc 1:   R = ln .7 = -0.356675
#     shifted  2*(2*(R-Rmin)/(-Rmin) - 1)      = 2*(2*4.248495/4.605170 - 1) = 1.690196
#     centered 2*(R-R0)/(-R0)                   = 2*0.336472/0.693147          = 0.970854
#     tanh     2*tanh((R-R0)/ln2) = 2*tanh(0.485427)                            = 0.901158
#     logistic 2*(2/(1+exp(-0.485427)) - 1)                                     = 0.476114
#  conf 2, acc .7:  R = .7 ln .2 + .3 ln .8 = -1.126607 - 0.066943 = -1.193550 (< R0)
#     shifted  2*(2*3.411621/4.605170 - 1)                                     = 0.963296
#     centered 2*((R-Rmin)/(-R0-Rmin) - 1) = 2*(3.411621/5.298317 - 1)          = -0.712187
#     tanh     2*tanh(-0.500403/0.693147) = 2*tanh(-0.721928)                   = -1.236204
#     logistic 2*(2/(1+exp(0.721928)) - 1)                                      = -0.692126
#  conf 0, acc 0:   p clipped to .01, R = ln .99 = -0.010050
#     shifted  2*(2*4.595120/4.605170 - 1)                                     = 1.991270
#     centered 2*(0.683097/0.693147)                                            = 1.971001
#     tanh     2*tanh(0.985500)                                                 = 1.510874
#     logistic 2*(2/(1+exp(-0.985500)) - 1)                                     = 0.912793
#  conf 10, acc 0:  p clipped to .99, R = ln .01 = R_min
#     shifted -2, centered -2, tanh 2*tanh(-5.643856) = -1.999950,
#     logistic 2*(2/(1+exp(5.643856)) - 1) = -1.985893
CONTINUOUS_CASES = [
    (7, 1.0, {"shifted": 1.690196, "centered": 0.970854, "tanh": 0.901158, "logistic": 0.476114}),
    (2, 0.7, {"shifted": 0.963296, "centered": -0.712187, "tanh": -1.236204, "logistic": -0.692126}),
    (0, 0.0, {"shifted": 1.991270, "centered": 1.971001, "tanh": 1.510874, "logistic": 0.912793}),
    (10, 0.0, {"shifted": -2.0, "centered": -2.0, "tanh": -1.999950, "logistic": -1.985893}),
]


@pytest.mark.parametrize(("conf", "acc", "expected"), CONTINUOUS_CASES)
@pytest.mark.parametrize("shaping", ["shifted", "centered", "tanh", "logistic"])
def test_continuous_loglik_hand_values(conf, acc, expected, shaping):
    value = continuous_loglik_reward(conf, acc, shaping=shaping)
    assert value == pytest.approx(expected[shaping], abs=1e-6)


def test_continuous_loglik_penalty_scale_and_options():
    assert continuous_loglik_reward(None, 0.5) == -6.0  # -3 * reward_scale 2
    assert continuous_loglik_reward(None, 0.5, reward_scale=1.0) == -3.0
    assert continuous_loglik_reward(None, 0.5, penalty=-1.5) == -1.5
    # reward_scale multiplies the shaped value: half of 1.690196
    assert continuous_loglik_reward(7, 1.0, reward_scale=1.0) == pytest.approx(0.845098, abs=1e-6)
    # granular scale: 70/100 = 7/10
    assert continuous_loglik_reward(70, 1.0, scale=100) == pytest.approx(1.690196, abs=1e-6)
    # tanh with s = 1: R - R0 = ln .7 + ln 2 = ln 1.4, tanh(ln 1.4) = (1.96-1)/(1.96+1) = 0.324324
    assert continuous_loglik_reward(7, 1.0, shaping="tanh", s=1.0) == pytest.approx(0.648649, abs=1e-6)
    with pytest.raises(ConfigError):
        continuous_loglik_reward(7, 1.0, shaping="cubic")
    with pytest.raises(DataError):
        continuous_loglik_reward(7, 1.5)


def test_continuous_shifted_bounds():
    # Certain and right approaches +scale: p clipped to .99, R = ln .99 -> 1.991270 (as conf 0, acc 0);
    # certain and wrong hits -scale.
    assert continuous_loglik_reward(10, 1.0) == pytest.approx(1.991270, abs=1e-6)
    assert continuous_loglik_reward(0, 1.0) == pytest.approx(-2.0)


def test_quadratic_blend_hand_values():
    # d = |.7 - .4| = .3, d^2 = .09; beta 0 -> 2*(0 - .09) = -0.18
    assert quadratic_blend_reward(7, 0.4) == pytest.approx(-0.18)
    # beta 1: d^2 (1 + beta d^2)/(1 + beta) = .09*(1 + .09)/2 = .04905 -> -0.0981
    assert quadratic_blend_reward(7, 0.4, beta=1.0) == pytest.approx(-0.0981)
    # r_max 1, reward_scale 1: 1 - .09 = .91
    assert quadratic_blend_reward(7, 0.4, r_max=1.0, reward_scale=1.0) == pytest.approx(0.91)
    assert quadratic_blend_reward(4, 0.4) == pytest.approx(0.0)
    assert quadratic_blend_reward(None, 0.4) == -6.0
    assert quadratic_blend_reward(None, 0.4, penalty=-1.0) == -1.0
    # granular: 25/100 vs .75 -> d = .5 -> 2*(-.25) = -0.5
    assert quadratic_blend_reward(25, 0.75, scale=100) == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------
# Plug-in layer
# ---------------------------------------------------------------------------------------------


def test_builtin_names():
    assert set(BUILTIN_REWARDS) == {"binary_qa_loglik", "report_loglik", "quadratic_blend"}


def test_binary_qa_reward_callable():
    reward = get_reward("binary_qa_loglik")
    samples = [{"answer": "yes"}, {"answer": False}, {"label": 1}, {"answer": "yes"}, {"label": "no"}]
    responses = [
        'Yes {"confidence": 10}',  # correct, certain -> 6.250
        'Yes {"confidence": 10}',  # wrong, certain -> -5.001
        'I am not sure {"confidence": 5}',  # unparsable answer -> -15
        "Yes",  # no confidence -> -15
        'No, nothing. {"confidence": 7}',  # correct, 7 -> 5.735
    ]
    out = reward(samples, responses)
    assert isinstance(out, RewardOutput)
    assert [round(s, 3) for s in out.scores] == [6.25, -5.001, -15.0, -15.0, 5.735]
    assert out.spans[0] == (4, 22)  # 'Yes ' then the 18-character statement
    assert out.spans[3] is None
    assert out.texts is None  # no exploration
    assert out.confidences == [10, 10, 5, None, 7]
    assert out.accuracies == [1.0, 0.0, None, 1.0, 1.0]


def test_report_reward_uses_row_accuracy_and_skips_unknown():
    reward = get_reward("report_loglik", shaping="shifted")
    samples = [{"accuracy": 1.0}, {"accuracy": None}, {"accuracy": None}, {"accuracy": 0.7}]
    responses = [
        'Normal chest. {"confidence": 7}',
        'Edema. {"confidence": 3}',  # accuracy unknown -> skipped
        "Edema.",  # no confidence -> penalty even without accuracy
        'Small effusion. {"confidence": 2}',
    ]
    out = reward(samples, responses)
    assert out.scores[0] == pytest.approx(1.690196, abs=1e-6)
    assert out.scores[1] is None
    assert out.scores[2] == -6.0
    assert out.scores[3] == pytest.approx(0.963296, abs=1e-6)


def test_quadratic_blend_on_binary_rows():
    # correct answer stated 7 -> d = .3 -> -0.18; wrong answer stated 7 -> d = .7 -> -0.98
    out = get_reward("quadratic_blend")(
        [{"answer": "yes"}, {"answer": "no"}], ['Yes {"confidence": 7}', 'Yes {"confidence": 7}']
    )
    assert out.scores == pytest.approx([-0.18, -0.98])


def test_accuracy_scorer_plugged_in():
    seen = {}

    def green(samples, responses):
        seen["responses"] = list(responses)
        return [1.0, None]

    reward = get_reward("report_loglik", accuracy_scorer=green)
    out = reward([{}, {}], ['Normal chest. {"confidence": 7}', 'Edema. {"confidence": 2}'])
    assert out.scores[0] == pytest.approx(1.690196, abs=1e-6)
    assert out.scores[1] is None  # scorer said "unknown": skipped, not accuracy 0
    # the scorer sees the report without the confidence statement
    assert seen["responses"] == ["Normal chest.", "Edema."]


def test_failing_scorer_is_a_radialog_error():
    def down(samples, responses):
        raise ConnectionError("GREEN server at localhost:8000 refused the connection")

    reward = get_reward("report_loglik", accuracy_scorer=down)
    with pytest.raises(AccuracyScorerError, match="down failed: ConnectionError: GREEN server") as info:
        reward([{}], ['x {"confidence": 5}'])
    assert isinstance(info.value, RadialogError)


@pytest.mark.parametrize(
    ("values", "match"),
    [([0.5], "returned 1 values for 2 samples"), ([0.5, 1.7], "returned 1.7 for sample 1")],
)
def test_bad_scorer_outputs(values, match):
    reward = get_reward("quadratic_blend", accuracy_scorer=lambda s, r: values)
    with pytest.raises(AccuracyScorerError, match=match):
        reward([{}, {}], ['{"confidence": 5}', '{"confidence": 5}'])


def test_nan_from_scorer_is_skipped():
    reward = get_reward("quadratic_blend", accuracy_scorer=lambda s, r: [float("nan")])
    assert reward([{}], ['{"confidence": 5}']).scores == [None]


def test_rows_without_truth_and_without_scorer():
    with pytest.raises(DataError, match="sample 0 has no 'accuracy'"):
        get_reward("report_loglik")([{"report": "x"}], ['{"confidence": 5}'])
    with pytest.raises(DataError, match="sample 0"):
        get_reward("binary_qa_loglik")([{"answer": "maybe"}], ['Yes {"confidence": 5}'])
    with pytest.raises(DataError, match="0/1 correctness"):
        get_reward("binary_qa_loglik")([{"accuracy": 0.4}], ['Yes {"confidence": 5}'])


def test_exploration_rewrites_confidences_and_scores_them():
    reward = get_reward("binary_qa_loglik", explore_prob=1.0, seed=0)
    responses = ['Yes {"confidence": 9}', 'No {"confidence": 1}', "Yes"]
    samples = [{"answer": "yes"}, {"answer": "yes"}, {"answer": "yes"}]
    out = reward(samples, responses)
    assert out.texts is not None
    assert out.texts[2] == "Yes"
    for i, (old, expected_correct) in enumerate([(9, True), (1, False)]):
        new = parse_confidence(out.texts[i])
        assert new != old and out.confidences[i] == new
        assert out.scores[i] == pytest.approx(binary_qa_loglik_reward(new, expected_correct))
        start, end = out.spans[i]
        assert out.texts[i][start:end] == f'{{"confidence": {new}}}'
    assert out.scores[2] == -15.0
    # same seed, same rewrites
    again = get_reward("binary_qa_loglik", explore_prob=1.0, seed=0)(samples, responses)
    assert again.texts == out.texts


def test_get_reward_validates_names_and_params():
    with pytest.raises(ConfigError, match="unknown reward"):
        get_reward("accuracy")
    with pytest.raises(ConfigError, match="no parameter"):
        get_reward("quadratic_blend", shaping="tanh")
    with pytest.raises(ConfigError):
        get_reward("report_loglik", explore_prob=2.0)
    with pytest.raises(ValueError):
        get_reward("report_loglik")([{}], [])


def test_reward_output_length_check():
    with pytest.raises(ValueError):
        RewardOutput(scores=[1.0, 2.0], spans=[None])


def test_load_reward_builtin_and_import(tmp_path, monkeypatch):
    builtin = load_reward("quadratic_blend", beta=1.0)
    assert builtin([{"accuracy": 0.4}], ['{"confidence": 7}']).scores == pytest.approx([-0.0981])

    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_reward(samples, responses, bonus=0.0):
                return [len(r) + bonus if r else None for r in responses]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        custom = load_reward("my_rewards:length_reward", bonus=0.5)
        out = custom([{}, {}], ["abcd", ""])
        assert isinstance(out, RewardOutput)
        assert out.scores == [4.5, None]
        with pytest.raises(ConfigError, match="no attribute"):
            load_reward("my_rewards:missing")
    finally:
        sys.modules.pop("my_rewards", None)
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_reward("not_a_reward")
