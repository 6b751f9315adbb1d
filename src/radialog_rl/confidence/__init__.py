"""Confidence estimation from a model: verbalized confidence and three baselines (issue 16).

One interface for four methods, each giving a probability in [0, 1] per sample and its 0..10 bin:

* ``verbalized`` (:mod:`.verbalized`): the ``{"confidence": N}`` the model states in its response;
* ``ptrue`` (:mod:`.ptrue`): the model asked whether its own answer is correct, P("Yes") vs P("No");
* ``seqprob`` (:mod:`.seqprob`): the response's length-normalised likelihood under the model;
* ``probe`` (:mod:`.probe`): a logistic-regression probe on a hidden state, trained on labelled data.

:func:`~radialog_rl.confidence.estimate.estimate_confidence` runs them on labelled image+text
samples (:mod:`.samples`); :mod:`.table` builds the comparison table with the calibration metrics
of :mod:`radialog_rl.calibration.metrics`.
"""
