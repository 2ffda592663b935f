import numpy as np
import pytest

from serving.errors import InputError
from serving.postprocess import LabelDecoder, softmax


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]], np.float32))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[0], [0.5, 0.5])


def test_labels_and_probabilities():
    labels, probs = LabelDecoder(["neg", "pos"])(np.array([[2.0, 1.0], [0.0, 3.0]], np.float32))
    assert labels.shape == (2, 1) and labels.dtype == object
    assert [x[0] for x in labels] == [b"neg", b"pos"]
    assert probs.dtype == np.float32 and probs.shape == (2, 2)


def test_predictions_map_every_label():
    (p,) = LabelDecoder(["a", "b", "c"]).predictions(np.array([[0.0, 1.0, 0.0]], np.float32))
    assert p.label == "b" and set(p.probabilities) == {"a", "b", "c"}


@pytest.mark.parametrize(
    "logits", [np.zeros((2, 3), np.float32), np.zeros((2,), np.float32), np.array([[np.nan, 0.0]], np.float32)]
)
def test_bad_logits_are_input_errors(logits):
    with pytest.raises(InputError):
        LabelDecoder(["neg", "pos"])(logits)
