"""The shared training loop: learning happens, runs are reproducible, checkpoints resume exactly."""

import pytest
import torch
from torch import nn

from sdlearn.train import History, native_bf16, resolve_precision, train


def regression_data(step):
    """A fixed linear regression problem; batch drawn deterministically from the step."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_model():
    torch.manual_seed(123)
    return nn.Linear(4, 1)


def test_loss_falls_and_history_is_complete():
    history = train(make_model(), mse, regression_data, steps=200, lr=0.05, progress=False)
    assert len(history.losses) == 200
    assert history.losses[-1] < 0.01 * history.losses[0]
    assert history.seconds > 0


def test_same_seed_same_run():
    a = train(make_model(), mse, regression_data, steps=30, lr=0.05, progress=False)
    b = train(make_model(), mse, regression_data, steps=30, lr=0.05, progress=False)
    assert a.losses == b.losses


def test_iterable_data_is_cycled():
    batches = [regression_data(i) for i in range(3)]
    history = train(make_model(), mse, batches, steps=10, lr=0.05, progress=False)
    assert len(history.losses) == 10


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    reference = make_model()
    ref_history = train(reference, mse, regression_data, steps=30, lr=0.05, progress=False)

    ckpt = tmp_path / "run.pt"
    model = make_model()
    train(model, mse, regression_data, steps=15, lr=0.05, checkpoint=ckpt, progress=False)
    # A new process would rebuild the model; resuming continues from step 15 to 30.
    model = make_model()
    history = train(model, mse, regression_data, steps=30, lr=0.05, checkpoint=ckpt, resume=True, progress=False)
    assert len(history.losses) == 30
    assert history.losses == pytest.approx(ref_history.losses, rel=1e-6)
    assert torch.allclose(model.weight, reference.weight, atol=1e-7)


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    ckpt = tmp_path / "run.pt"
    train(make_model(), mse, regression_data, steps=3, checkpoint=ckpt, progress=False)
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        train(make_model(), mse, regression_data, steps=3, checkpoint=ckpt, progress=False)
    assert ckpt.read_bytes() == before


def test_samples_are_collected():
    history = train(make_model(), mse, regression_data, steps=10, sample_every=5,
                    sample_fn=lambda model, step: model.weight.detach().clone(), progress=False)
    assert [s for s, _ in history.samples] == [5, 10]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(steps=0), "steps must be at least 1"),
        (dict(steps=5, sample_every=2), "sample_fn"),
        (dict(steps=5, resume=True), "checkpoint path"),
        (dict(steps=5, lr_schedule="linear"), "cosine"),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        train(make_model(), mse, regression_data, progress=False, **kwargs)


def test_diverging_loss_is_reported():
    with pytest.raises(FloatingPointError, match="learning rate"):
        train(make_model(), lambda m, b: m(b[0]).sum() * float("inf"), regression_data, steps=2, progress=False)


def test_history_plot_and_smoothing():
    h = History(losses=[4.0, 2.0, 0.0])
    assert h.smoothed(window=2) == [4.0, 3.0, 1.0]
    assert h.plot() is not None


def test_auto_precision_uses_bf16_only_where_it_is_native(monkeypatch):
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    assert resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")
    monkeypatch.setattr("sdlearn.train.native_bf16", lambda device_type="cpu": False)
    assert resolve_precision("auto") == "fp32"
    with pytest.warns(UserWarning, match="without native bfloat16"):
        assert resolve_precision("bf16") == "bf16"
    monkeypatch.setattr("sdlearn.train.native_bf16", lambda device_type="cpu": True)
    assert resolve_precision("auto") == "bf16"
