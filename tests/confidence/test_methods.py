"""Hand-computed checks of the confidence methods on the tiny release (radialog_rl.confidence).

Every number is recomputed here from a manual, unpadded forward of one sample (prompt tokens
written out, image passed as pixels), and compared with the batched, left-padded library path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radialog_rl.calibration.parsing import strip_confidence
from radialog_rl.confidence.base import bin_confidence, check_methods
from radialog_rl.confidence.estimate import EstimateConfig, estimate_confidence, probe_training_data, train_probe
from radialog_rl.confidence.probe import ConfidenceProbe, ProbeFeatureConfig, probe_features
from radialog_rl.confidence.ptrue import PTrueConfig, answer_token_ids, resolve_yes_no_ids
from radialog_rl.confidence.samples import load_labelled_jsonl, sample_accuracy
from radialog_rl.confidence.seqprob import SeqProbConfig, score_responses
from radialog_rl.data.images import load_chest_xray
from radialog_rl.data.prompts import build_prompt
from radialog_rl.errors import CheckpointError, ConfigError, DataError
from radialog_rl.generation import encode_image_features, generate
from radialog_rl.loading.tokenizer import tokenizer_image_token

GIVEN = range(6)  # samples with a given response (conftest.ROWS)
CONFIG = EstimateConfig(batch_size=8, max_new_tokens=6)


def _image(model, sample) -> torch.Tensor:
    crop = model.config.image_size
    return load_chest_xray(sample.image, resize=round(crop * 512 / 448), crop=crop)[None]


def _manual_logits(model, prompt: str, sample, extra_ids=()) -> tuple[torch.Tensor, int]:
    """Unpadded forward of ``prompt`` (+ ``extra_ids``) with the sample's image: ``(logits [T', V],
    expanded prompt length)``."""
    ids = tokenizer_image_token(prompt, model.tokenizer) + list(extra_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), images=_image(model, sample)).logits[0]
    prompt_len = len(ids) - len(extra_ids) - 1 + model.config.num_image_tokens
    assert logits.shape[0] == prompt_len + len(extra_ids)
    return logits, prompt_len


def _response_ids(model, sample) -> list[int]:
    """Given response + </s>, or the greedy generation (as the library scores it)."""
    tok = model.tokenizer
    if sample.response is not None:
        return tok(sample.response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return generate(model, tok, [build_prompt(sample.prompt)], _image(model, sample),
                    max_new_tokens=CONFIG.max_new_tokens)[0].token_ids


@pytest.fixture(scope="module")
def probe(tiny_model_fp32, samples) -> ConfidenceProbe:
    return train_probe(tiny_model_fp32, None, samples, config=CONFIG, heldout_fraction=0.0)


@pytest.fixture(scope="module")
def batched(tiny_model_fp32, samples, probe):
    return estimate_confidence(tiny_model_fp32, None, samples, "all", probe=probe, config=CONFIG)


# -- samples and labels -----------------------------------------------------------------------------

def test_labels_follow_the_yes_no_answer(samples, batched):
    assert [s.answer for s in samples] == [True, True, False, False, True, False, True, False]
    accs = [r.accuracy for r in batched["verbalized"]]
    assert accs[:6] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    for s, r in zip(samples, batched["verbalized"]):
        assert r.accuracy == sample_accuracy(s, r.response)
    assert sample_accuracy(samples[0], "There is no clear answer here") is None


def test_bad_rows_are_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "prompt": "q", "answer": "maybe"}\n'
                    '{"image": "a.png", "prompt": "q"}\n{"image": "a.png", "prompt": "q", "accuracy": 2}\n')
    with pytest.raises(DataError, match=r"3 bad row\(s\).*line 1.*maybe.*line 2.*needs a label.*line 3"):
        load_labelled_jsonl(path)
    with pytest.raises(DataError, match="not found"):
        load_labelled_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_labelled_jsonl(tmp_path / "empty.jsonl")


def test_binning_and_method_names():
    assert [bin_confidence(p) for p in (0.0, 0.04, 0.05, 0.449, 0.95, 1.0, None)] == [0, 0, 1, 4, 10, 10, None]
    assert check_methods("all") == ("verbalized", "ptrue", "seqprob", "probe")
    assert check_methods("seqprob,ptrue") == ("ptrue", "seqprob")
    with pytest.raises(ConfigError, match="unknown"):
        check_methods("entropy")


# -- verbalized -------------------------------------------------------------------------------------

def test_verbalized_is_the_stated_confidence(batched):
    rows = batched["verbalized"]
    assert [r.probability for r in rows[:6]] == [0.8, 0.3, 0.9, 0.2, None, 0.6]
    assert [r.confidence for r in rows[:6]] == [8, 3, 9, 2, None, 6]


# -- P(True) ----------------------------------------------------------------------------------------

def test_yes_no_ids_handle_sentencepiece_space_variants(tiny_tokenizer):
    class Vocab:  # LLaMA's real ids: both "▁Yes" and "Yes" are single tokens
        unk_token_id = 0
        pieces = {"▁Yes": 3869, "Yes": 8241, "▁No": 1939, "No": 3782}

        def convert_tokens_to_ids(self, piece):
            return self.pieces.get(piece, 0)

        def convert_ids_to_tokens(self, i):
            return {v: k for k, v in self.pieces.items()}.get(i, "<unk>")

    assert resolve_yes_no_ids(Vocab(), PTrueConfig()) == ([3869, 8241], [1939, 3782])
    # The tiny vocabulary: "no" is a token with and without the space; "Yes" is not one token.
    tok = tiny_tokenizer
    assert answer_token_ids(tok, "no") == [tok.convert_tokens_to_ids("▁no"), tok.convert_tokens_to_ids("no")]
    assert answer_token_ids(tok, "Yes") == [tok.convert_tokens_to_ids("Y")]
    with pytest.raises(ConfigError, match="share"):
        resolve_yes_no_ids(tok, PTrueConfig(yes_words=("no",), no_words=("no",)))


@pytest.mark.parametrize("words", [(("Yes",), ("No",)), (("Yes",), ("no",))])
def test_ptrue_is_the_softmax_over_yes_and_no_logits(tiny_model_fp32, samples, words):
    model, tok = tiny_model_fp32, tiny_model_fp32.tokenizer
    config = EstimateConfig(batch_size=8, max_new_tokens=6, ptrue=PTrueConfig(yes_words=words[0], no_words=words[1]))
    got = estimate_confidence(model, None, samples, "ptrue", config=config)["ptrue"]
    yes_ids, no_ids = resolve_yes_no_ids(tok, config.ptrue)
    for sample, result in zip(samples, got):
        message = (f"{sample.prompt}\nProposed answer: {strip_confidence(result.response)}\n"
                   "Is the proposed answer correct? Answer Yes or No.")
        logits, _ = _manual_logits(model, build_prompt(message), sample)
        last = logits[-1].double()
        if len(no_ids) == 1:  # one token each: the softmax over the two logits
            expected = torch.softmax(last[[yes_ids[0], no_ids[0]]], 0)[0]
        else:  # "▁no" and "no": both variants' mass against Yes
            e = last.exp()
            expected = e[yes_ids].sum() / (e[yes_ids].sum() + e[no_ids].sum())
        assert result.probability == pytest.approx(float(expected), abs=1e-5)
        assert result.confidence == bin_confidence(result.probability)


# -- sequence probability ---------------------------------------------------------------------------

@pytest.mark.parametrize("seq", [SeqProbConfig(), SeqProbConfig("product"), SeqProbConfig(include_eos=False)])
def test_seqprob_is_the_sum_of_chosen_token_logprobs(tiny_model_fp32, samples, seq):
    model = tiny_model_fp32
    got = estimate_confidence(model, None, samples, "seqprob",
                              config=EstimateConfig(batch_size=8, max_new_tokens=6, seqprob=seq))["seqprob"]
    eos = model.tokenizer.eos_token_id
    for sample, result in zip(samples, got):
        response = _response_ids(model, sample)
        logits, start = _manual_logits(model, build_prompt(sample.prompt), sample, response)
        logp = torch.log_softmax(logits.double(), -1)
        # logit t predicts token t+1: response token k is predicted at position start - 1 + k.
        chosen = [float(logp[start - 1 + k, t]) for k, t in enumerate(response)]
        if not seq.include_eos and response[-1] == eos:
            chosen = chosen[:-1]
        total = sum(chosen)
        expected = np.exp(total / len(chosen)) if seq.reduction == "mean" else np.exp(total)
        assert result.probability == pytest.approx(expected, rel=1e-4, abs=1e-9)
        assert result.extra["num_tokens"] == len(response)


def test_scoring_pass_masks_exactly_the_response(tiny_model_fp32, samples):
    model, tok = tiny_model_fp32, tiny_model_fp32.tokenizer
    chosen = [samples[i] for i in (0, 2, 5)]
    prompts = [build_prompt(s.prompt) for s in chosen]
    responses = [_response_ids(model, s) for s in chosen]
    feats = encode_image_features(model, torch.cat([_image(model, s) for s in chosen]))
    scored = score_responses(model, tok, prompts, responses, feats)
    assert scored.mask.sum(1).tolist() == [len(r) for r in responses]
    for b, r in enumerate(responses):
        assert scored.response_ids[b, : len(r)].tolist() == r
        assert (scored.logprobs[b, len(r):] == 0).all() and (scored.logprobs[b, : len(r)] < 0).all()


# -- probe ------------------------------------------------------------------------------------------

def _hook_output(module):
    captured = []
    handle = module.register_forward_hook(
        lambda m, a, out: captured.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    return captured, handle


@pytest.mark.parametrize("layer,position", [(-1, "last_response"), (1, "last_response"), (-1, "last_prompt"),
                                            (0, "mean_response")])
def test_probe_features_are_the_hidden_state_at_the_documented_position(tiny_model_fp32, samples, layer, position):
    model, tok = tiny_model_fp32, tiny_model_fp32.tokenizer
    chosen = list(samples[:6])
    prompts = [build_prompt(s.prompt) for s in chosen]
    responses = [_response_ids(model, s) for s in chosen]
    feats = encode_image_features(model, torch.cat([_image(model, s) for s in chosen]))
    # hidden_states[-1] is the final norm's output, [k] the output of decoder layer k, [0] the embeddings.
    module = {-1: model.model.norm, 1: model.model.layers[0], 0: model.model.layers[0]}[layer]
    captured, handle = _hook_output(module) if layer != 0 else ([], None)
    pre = []
    if layer == 0:  # the embeddings are the first decoder layer's input
        handle = module.register_forward_pre_hook(lambda m, args, kwargs: pre.append(
            (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True)
    try:
        scored = score_responses(model, tok, prompts, responses, feats, hidden_layer=layer)
    finally:
        handle.remove()
    states = captured[0] if captured else pre[0]
    got = probe_features(scored, ProbeFeatureConfig(layer=layer, position=position))
    q = scored.query_length
    for b, r in enumerate(responses):
        if position == "last_response":
            expected = states[b, q + len(r) - 1]
        elif position == "last_prompt":
            expected = states[b, q - 1]
        else:
            expected = states[b, q : q + len(r)].mean(0)
        torch.testing.assert_close(got[b], expected.float(), rtol=0, atol=1e-6)
    if position == "last_response" and layer == -1:
        # And the same state as the last token of an unpadded single-sample forward.
        for b, (s, r) in enumerate(zip(chosen, responses)):
            ids = tokenizer_image_token(prompts[b], tok) + r
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), images=_image(model, s), output_hidden_states=True)
            torch.testing.assert_close(got[b], out.hidden_states[-1][0, -1], rtol=1e-4, atol=1e-5)


def test_probe_save_load_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    acc = (x[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(float)
    probe = ConfidenceProbe.train(x, acc, feature_config=ProbeFeatureConfig(layer=1, position="last_prompt"),
                                  heldout_fraction=0.25, seed=3)
    assert probe.metrics["train"]["n"] == 30 and probe.metrics["heldout"]["n"] == 10
    assert probe.C in probe.metrics["Cs"]
    path = probe.save(tmp_path / "probe.safetensors")
    loaded = ConfidenceProbe.load(path)
    assert np.array_equal(loaded.predict(x), probe.predict(x))
    assert np.array_equal(loaded.classifier.coef_, probe.classifier.coef_)
    assert np.array_equal(loaded.classifier.intercept_, probe.classifier.intercept_)
    assert (loaded.features, loaded.C, loaded.metrics) == (probe.features, probe.C, probe.metrics)
    # Nothing but tensors and JSON in the file (safetensors cannot hold code).
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        assert sorted(fh.keys()) == ["coef", "intercept", "mean", "scale"]
    (tmp_path / "junk.safetensors").write_bytes(b"not a probe")
    with pytest.raises(CheckpointError):
        ConfidenceProbe.load(tmp_path / "junk.safetensors")
    with pytest.raises(DataError, match="features"):
        loaded.predict(x[:, :8])


def test_probe_needs_both_classes():
    with pytest.raises(DataError, match="2 correct and 2 wrong"):
        ConfidenceProbe.train(np.zeros((5, 3)), [1, 1, 1, 1, 0], heldout_fraction=0.0)


def test_probe_predictions_use_the_trained_features(tiny_model_fp32, samples, probe, batched):
    feats, accs, kept = probe_training_data(tiny_model_fp32, None, samples, config=CONFIG)
    assert kept == [0, 1, 2, 3, 4, 5]  # the generated gibberish has no yes/no answer
    expected = probe.predict(feats)
    got = [r.probability for r in batched["probe"]]
    np.testing.assert_allclose(got[:6], expected, atol=1e-6)
    assert probe.metrics["heldout"] is None and probe.metrics["train"]["n"] == 6


def test_probe_method_needs_a_probe(tiny_model_fp32, samples):
    with pytest.raises(ConfigError, match="trained probe"):
        estimate_confidence(tiny_model_fp32, None, samples, "probe")


# -- batching ---------------------------------------------------------------------------------------

def test_batch_equals_one_at_a_time_for_every_method(tiny_model_fp32, samples, probe, batched):
    one = estimate_confidence(tiny_model_fp32, None, samples, "all", probe=probe,
                              config=EstimateConfig(batch_size=1, max_new_tokens=6))
    three = estimate_confidence(tiny_model_fp32, None, samples, "all", probe=probe,
                                config=EstimateConfig(batch_size=3, max_new_tokens=6))
    for method in batched:
        for other in (one, three):
            assert [r.response for r in other[method]] == [r.response for r in batched[method]]
            assert [r.accuracy for r in other[method]] == [r.accuracy for r in batched[method]]
            a = [r.probability for r in batched[method]]
            b = [r.probability for r in other[method]]
            assert [x is None for x in a] == [x is None for x in b], method
            np.testing.assert_allclose([x for x in a if x is not None], [x for x in b if x is not None],
                                       rtol=1e-4, atol=1e-6, err_msg=method)


def test_each_image_goes_through_the_tower_once(tiny_model_fp32, samples, probe):
    calls = []
    handle = tiny_model_fp32.model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        estimate_confidence(tiny_model_fp32, None, samples, "all", probe=probe,
                            config=EstimateConfig(batch_size=3, max_new_tokens=6))
    finally:
        handle.remove()
    assert calls == [3, 3, 2]


def test_ptrue_prompt_shows_the_answer_without_confidence():
    from radialog_rl.calibration.prompts import qa_prompt
    from radialog_rl.confidence.ptrue import ptrue_prompts

    question = qa_prompt("Edema")
    [prompt] = ptrue_prompts([question], ['Yes {"confidence": 7}'])
    assert prompt == build_prompt("<image>. Is there evidence of pulmonary edema in this chest X-ray?\n"
                                  "Proposed answer: Yes\nIs the proposed answer correct? Answer Yes or No.")
    [own] = ptrue_prompts([question], ["No"], template="Q: {question} A: {answer}. Right? <image>",
                          chat_template=False)
    assert own == "Q: Is there evidence of pulmonary edema in this chest X-ray? A: No. Right? <image>"


def test_prompts_use_the_given_system_prompt():
    """--system-prompt: the template's system text is what the model was trained with."""
    from radialog_rl.confidence.ptrue import ptrue_prompts
    from radialog_rl.data.prompts import SYSTEM_PROMPT

    default = ptrue_prompts(["<image>\nIs there edema?"], ["yes"])[0]
    bare = ptrue_prompts(["<image>\nIs there edema?"], ["yes"], system="")[0]
    assert default.startswith(SYSTEM_PROMPT) and bare.startswith(" USER: ") and SYSTEM_PROMPT not in bare
    assert default[len(SYSTEM_PROMPT):] == bare


def test_confidence_decoding_is_token_or_value():
    from radialog_rl.confidence.estimate import EstimateConfig

    assert EstimateConfig(confidence_decoding="value").confidence_decoding == "value"
    with pytest.raises(ConfigError, match="'token' or 'value'"):
        EstimateConfig(confidence_decoding="values")
