"""train.focus: a pair's denoising errors weighted toward the positions where its two images differ. By hand on
two positions; the weights average 1 per pair; focus 0 is the paper's error exactly; the margin scales with the
weight on the differing positions, and at focus 1 the agreeing ones drop out of the preferred image's error."""
import pytest
import torch

from safealign.training import LOSSES
from safealign.training.step import preference_step
from safealign.training.terms import difference_weights, per_sample_error, weighted_error


def test_difference_weights_by_hand() -> None:
    # one pair, one channel, two positions: |x_w - x_l| = [2, 0], mean 1; focus 0.5 -> 0.5 + 0.5 * [2, 0]
    x_w, x_l = torch.tensor([[[[3.0, 1.0]]]]), torch.tensor([[[[1.0, 1.0]]]])
    w = difference_weights(x_w, x_l, 0.5)
    assert w.shape == (1, 1, 1, 2) and w.flatten().tolist() == pytest.approx([1.5, 0.5])
    # channels are summed: two channels differing by 1 each weigh as one differing by 2
    two = difference_weights(torch.tensor([[[[2.0, 1.0]], [[2.0, 1.0]]]]), torch.ones(1, 2, 1, 2), 0.5)
    assert two.flatten().tolist() == pytest.approx([1.5, 0.5])
    assert difference_weights(x_w, x_l, 0.0).flatten().tolist() == [1.0, 1.0]


def test_weighted_error_by_hand_and_weights_average_one() -> None:
    pred, target = torch.tensor([[[[1.0, 2.0]]]]), torch.zeros(1, 1, 1, 2)
    assert weighted_error(pred, target, torch.tensor([[[[1.5, 0.5]]]])).item() == pytest.approx((1.5 + 2.0) / 2)
    g = torch.Generator().manual_seed(0)
    x_w, x_l = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    for focus in (0.3, 1.0):
        assert difference_weights(x_w, x_l, focus).flatten(1).mean(1).tolist() == pytest.approx([1.0] * 3)
    assert weighted_error(x_w, x_l, torch.ones(3, 1, 5, 5)).tolist() == pytest.approx(per_sample_error(x_w, x_l).tolist())


class Stub:
    """A family whose prediction is the noisy input plus a learned offset: enough to run preference_step."""

    num_train_timesteps = 10
    device = torch.device("cpu")

    def __init__(self, offset: torch.Tensor) -> None:
        self.offset, self.on = offset, True

    def add_noise(self, x0, noise, t):
        return x0 + 0.1 * noise

    def target(self, x0, noise, t):
        return x0

    def predict(self, x_t, t, cond):
        return 0.5 * x_t + (self.offset if self.on else 0)  # knows the image only half: errors differ by side

    def adapters_disabled(self):  # the reference: no offset
        import contextlib

        @contextlib.contextmanager
        def off():
            self.on = False
            yield
            self.on = True
        return off()


def test_focus_scales_the_margin_by_the_differing_area_and_drops_agreeing_positions_from_err_w() -> None:
    """Positions where a pair's images agree add the same error to both sides, so the preference margin never
    depends on them; what focus changes is their share of the mean: a pair differing at one of two positions has
    its margin doubled at focus 1 (a per-pair beta inversely proportional to the differing area), and its
    preferred image's error (the supervised term's) no longer counts the agreeing position."""
    x_w = torch.zeros(2, 1, 1, 2)
    x_l = torch.zeros(2, 1, 1, 2)
    x_l[:, :, :, 0] = 1.0  # the pair differs at position 0 only
    cond = {"encoder_hidden_states": torch.zeros(2, 1, 1)}
    loss = LOSSES.get("dpo")

    def step(offset: torch.Tensor, focus: float | None):
        extra = {} if focus is None else {"focus": focus}
        return preference_step(Stub(offset), x_w, x_l, cond, loss, 5.0, torch.Generator().manual_seed(0), **extra)

    here, there = torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    here[..., 0], there[..., 1] = 0.3, 0.3
    assert step(here, 0.0).margin == step(here, None).margin and step(here, 0.0).loss == step(here, None).loss
    assert abs(step(here, 0.0).margin) > 1e-3
    assert step(here, 1.0).margin == pytest.approx(2 * step(here, 0.0).margin, rel=1e-5)
    assert step(there, 0.0).margin == pytest.approx(0.0, abs=1e-6)
    assert step(there, 0.0).err_w != pytest.approx(step(torch.zeros(1, 1, 1, 2), 0.0).err_w, abs=1e-4)
    assert step(there, 1.0).err_w == pytest.approx(step(torch.zeros(1, 1, 1, 2), 1.0).err_w, abs=1e-7)
