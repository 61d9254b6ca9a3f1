"""The training EMA (`adm.train.ema`): the reference's fixed rate, or a warm-up, checked
against a plain float64 recursion."""
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from adm.train.ema import ema_multi_avg_fn


def _run(avg_fn, steps: int):
    """An AveragedModel started at the initial weights (n_averaged = 1, as the training loop
    does), updated after each of `steps` weight changes: (averaged, weights per step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=False)
    ema.n_averaged.fill_(1)
    history = [model.weight.detach().double().clone()]
    for _ in range(steps):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update_parameters(model)
        history.append(model.weight.detach().double().clone())
    return ema.module.weight.detach().double(), history


def test_fixed_rate_is_torchs_ema():
    ours, _ = _run(ema_multi_avg_fn(0.9), 20)
    theirs, _ = _run(get_ema_multi_avg_fn(0.9), 20)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate", [0.9, 0.999])
def test_warmup_follows_tf_num_updates_schedule(rate):
    """Update n uses decay min(rate, (1 + n)/(10 + n)); the average starts at the initial
    weights. Over 300 steps at 0.999 the initial weights keep < 1e-3 of the average (vs 74%)."""
    steps = 300
    ours, history = _run(ema_multi_avg_fn(rate, warmup=True), steps)
    expected, init_share = history[0], 1.0
    for n in range(steps):
        decay = min(rate, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * history[n + 1]
        init_share *= decay
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    if rate == 0.999:
        assert init_share < 1e-3 and 0.999 ** steps > 0.7
    with pytest.raises(ValueError, match="rate 1.0 must be in"):
        ema_multi_avg_fn(1.0)
