"""The attention picture: image beside map, a fixed scale where uniform attention is neutral, labels and
caption."""
import numpy as np
import torch

from mgn.eval.pictures import COLOUR_MAP, AttentionSample, attention_figure, samples_from_batch


def _samples(n: int, attention) -> list[AttentionSample]:
    image = np.zeros((64, 64, 3))
    image[:32, :32] = [0.9, 0.1, 0.1]  # red content in one quadrant
    return [AttentionSample(image, np.asarray(attention, dtype=float), "violent", "violent", "non_violent",
                            "category: Street Cam | focus: top-left") for _ in range(n)]


def _neutral_rgb() -> np.ndarray:
    import matplotlib

    return np.array(matplotlib.colormaps[COLOUR_MAP](0.5)[:3]) * 255


def test_picture_has_two_panels_per_sample_three_samples_a_row():
    one_row = attention_figure(_samples(3, [[0.25, 0.25], [0.25, 0.25]]))
    two_rows = attention_figure(_samples(6, [[0.25, 0.25], [0.25, 0.25]]))
    assert one_row.dtype == np.uint8 and one_row.ndim == 3 and one_row.shape[2] == 3
    assert two_rows.shape[1] == one_row.shape[1] and two_rows.shape[0] > 1.6 * one_row.shape[0]


def test_uniform_attention_is_drawn_in_the_neutral_colour_and_a_hot_spot_is_not():
    neutral = _neutral_rgb()
    flat = attention_figure(_samples(1, [[0.25, 0.25], [0.25, 0.25]]))
    peaked = attention_figure(_samples(1, [[0.85, 0.05], [0.05, 0.05]]))

    def share_of_neutral(picture):
        close = np.abs(picture.astype(float) - neutral).sum(axis=2) < 12
        return close.mean()

    assert share_of_neutral(flat) > share_of_neutral(peaked) + 0.02


def test_samples_from_batch_undo_normalisation_and_name_classes():
    from mgn.data.decode import ModelInputs

    inputs = ModelInputs((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    images = torch.zeros(2, 3, 8, 8)  # normalised zeros = the mean colour
    # the same colour, as a GPU run's batch holds it
    pixels = torch.full((2, 8, 8, 3), 128, dtype=torch.uint8)
    assert np.allclose(inputs.display(pixels, limit=6), 128 / 255)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    samples = samples_from_batch(inputs.display(images, limit=6), torch.full((2, 2, 2), 0.25),
                                 torch.tensor([1, 0]),
                                 logits, logits.flip(1), ["a", "b"], ["non_violent", "violent"])
    assert np.allclose(samples[0].image, 0.5) and samples[0].label == "violent"
    assert (samples[0].teacher, samples[0].student, samples[1].caption) == ("non_violent", "violent", "b")
