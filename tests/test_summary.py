"""The model summary counts the integer weights: the same parameters as the float model, in the bytes they take."""

from __future__ import annotations

import logging

import pytest

from dqt_lightning import Execution, Method, QuantPrecision
from dqt_lightning.train.summary import IntegerWeightModelSummary, IntegerWeightSummary
from tests.conftest import fit, make_model


def _summary(method: Method, execution: Execution | None = None) -> IntegerWeightSummary:
    model = make_model()
    QuantPrecision(method, execution).convert_module(model)
    return IntegerWeightSummary(model, max_depth=1)


def test_integer_weights_count_as_trainable_parameters():
    fp, dqt = _summary(Method(mode="fp")), _summary(Method(mode="dqt"))
    assert dqt.total_parameters == dqt.trainable_parameters == fp.total_parameters
    assert dqt.param_nums == fp.param_nums  # each in the row of the layer that holds it (here: `model`)


@pytest.mark.parametrize(("execution", "bytes_per_level"), [(None, 1.0), (Execution(pack_in_memory=True), 0.25)])
def test_the_model_size_is_what_the_integer_weights_take(execution, bytes_per_level):
    fp, dqt = _summary(Method(mode="fp")), _summary(Method(mode="dqt"), execution)
    levels = 2 * (4 * 32 * 32 + 3 * 32 * 64)  # two blocks of the test model: 4 attention and 3 MLP projections
    floats = fp.total_parameters - levels
    assert dqt.model_size == pytest.approx((4 * floats + bytes_per_level * levels + 4 * 14) / 1e6)
    assert fp.model_size == pytest.approx(4 * fp.total_parameters / 1e6)


def test_a_fit_prints_the_integer_weights(caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.callbacks.model_summary"):
        fit(make_model(), steps=1, callbacks=[IntegerWeightModelSummary()])
    total = make_model()
    total.configure_model()
    assert f"{total.model.num_parameters() / 1e3:.1f} K    Total params" in caplog.text
