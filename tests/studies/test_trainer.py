"""The training loop shared by ``riemann-bench train`` and ``stability``."""

import pytest
import torch
import torch.nn.functional as F

import riemann_core as rc
from riemann_core.studies.digits import Examples, build_model
from riemann_core.studies.trainer import Config, batches, evaluate, train


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    return Examples(torch.randn(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g))


def test_batches_cover_every_example_once_per_epoch_and_repeat_with_the_seed():
    first = torch.cat([b for b, _ in zip(batches(10, 4, seed=1), range(5))])
    assert sorted(first[:10].tolist()) == list(range(10))  # one epoch, across batch edges
    assert sorted(first[10:20].tolist()) == list(range(10))
    again = torch.cat([b for b, _ in zip(batches(10, 4, seed=1), range(5))])
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="batch size must be between 1 and the 10"):
        next(batches(10, 11, seed=0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "lbfgs", "lr": 0.1}, "unknown method 'lbfgs'"),
        ({"method": "sgd", "lr": 0.0}, "learning rate must be positive"),
        ({"method": "sgd", "lr": float("nan")}, "learning rate must be positive"),
        ({"method": "layerwise", "lr": 0.1}, "needs a positive finite damping"),
        ({"method": "natural", "lr": 0.1, "damping": -1.0}, "needs a positive finite damping"),
        ({"method": "adam", "lr": 0.1, "damping": 0.1}, "takes no damping"),
    ],
)
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_evaluate_is_mean_cross_entropy_and_accuracy(data):
    model = build_model("mlp", 0, torch.device("cpu"), torch.float64)
    data = Examples(data.inputs.double(), data.targets)
    loss, accuracy = evaluate(model, data)
    logits = model(data.inputs)
    assert loss == pytest.approx(F.cross_entropy(logits, data.targets).item(), rel=1e-12)
    assert accuracy == pytest.approx((logits.argmax(1) == data.targets).double().mean().item())


@pytest.mark.parametrize(
    "config",
    [Config("sgd", 0.3), Config("layerwise", 0.3, 0.1), Config("natural", 0.3, 0.01)],
    ids=lambda c: c.method,
)
def test_one_step_is_sgd_along_the_methods_direction(config, data):
    """theta_1 = theta_0 - lr * G^{-1} g on the first batch (G = I for sgd)."""
    cpu = torch.device("cpu")
    data = Examples(data.inputs.double(), data.targets)
    model = build_model("mlp", 0, cpu, torch.float64)
    reference = build_model("mlp", 0, cpu, torch.float64)
    rows = next(batches(len(data), 8, seed=5))
    x, y = data.inputs[rows], data.targets[rows]
    if config.damping is None:
        loss = F.cross_entropy(reference(x), y)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        step = dict(zip([n for n, _ in reference.named_parameters()], grads))
    else:
        step = rc.direction(reference, x, y, method=config.method, damping=config.damping)
    run = train(model, data, config, steps=1, batch_size=8, seed=5, eval_every=1,
                evaluate_on={"train": data})  # fmt: skip
    assert run.status == "ok" and [r["step"] for r in run.records] == [0, 1]
    for (name, p), p0 in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, p0 - config.lr * step[name], rtol=1e-10, atol=1e-12)


def test_training_is_deterministic_given_the_seed(data):
    def final(seed):
        model = build_model("mlp", seed, torch.device("cpu"), torch.float32)
        run = train(model, data, Config("layerwise-sampled", 0.1, 0.1), steps=6, batch_size=8,
                    seed=seed, eval_every=3, evaluate_on={"train": data})  # fmt: skip
        return [{k: v for k, v in r.items() if k != "time_s"} for r in run.records], model

    (records_a, model_a), (records_b, model_b) = final(1), final(1)
    assert records_a == records_b
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    records_c, _ = final(2)
    assert records_c != records_a


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_a_seed_gives_one_network_whatever_the_default_dtype(name):
    """The initial weights are drawn in float32 whatever torch's default dtype (a float64
    default drew others, and a script re-running a study's pair trained another network)."""
    cpu = torch.device("cpu")
    reference = build_model(name, 3, cpu, torch.float64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model(name, 3, cpu, torch.float64)
    finally:
        torch.set_default_dtype(default)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.dtype == torch.float64 and torch.equal(p, q)


@pytest.mark.parametrize("config", [Config("sgd", 1e36), Config("layerwise", 1e36, 1e-3)],
                         ids=["sgd", "layerwise"])  # fmt: skip
def test_a_run_that_blows_up_stops_with_status_diverged(config, data):
    model = build_model("mlp", 0, torch.device("cpu"), torch.float32)
    run = train(model, data, config, steps=20, batch_size=8, seed=0, eval_every=1,
                evaluate_on={"train": data})  # fmt: skip
    assert run.status == "diverged"
    assert run.records[-1]["step"] < 20
    # the reason is kept (found by review: blank in every diverged row of tuning.csv)
    assert f"at step {run.records[-1]['step']}" in run.reason
    assert "NaN or inf" in run.reason or "times its initial" in run.reason


class NaNGradient(torch.nn.Module):
    """A finite loss whose gradient is NaN: ``0 * sqrt(0)`` on the way back."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 5), torch.nn.Linear(5, 10)

    def forward(self, x):
        h = self.a(x)
        h = h + 0 * torch.sqrt((h - h.detach()).pow(2).sum(1, keepdim=True))
        return self.b(torch.tanh(h))


@pytest.mark.parametrize(
    "config",
    [Config("sgd", 0.1), Config("layerwise", 0.1, 1e-2), Config("kfac", 0.1, 1e-2)],
    ids=lambda c: c.method,
)
def test_a_nan_gradient_at_a_finite_loss_stops_with_status_diverged(config, data):
    """As SGD's run does (the NaN reaches the parameters), a preconditioned run whose
    pre.backward refuses a non-finite gradient stops as diverged, the study goes on
    (before: the ValueError ended the study, found by review)."""
    torch.manual_seed(0)
    run = train(NaNGradient(), data, config, steps=3, batch_size=8, seed=0, eval_every=1,
                evaluate_on={"train": data})  # fmt: skip
    assert run.status == "diverged" and run.records[-1]["step"] < 3


def test_time_counts_only_training_steps(data, monkeypatch):
    from riemann_core.studies import trainer

    # a fake clock: each reading advances it by 1 ms, each evaluation by 100 s
    clock = [0.0]

    def perf_counter():
        clock[0] += 1e-3
        return clock[0]

    def slow_evaluate(model, examples):
        clock[0] += 100.0
        return evaluate(model, examples)

    monkeypatch.setattr(trainer.time, "perf_counter", perf_counter)
    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    model = build_model("mlp", 0, torch.device("cpu"), torch.float32)
    run = train(model, data, Config("sgd", 0.1), steps=4, batch_size=8, seed=0, eval_every=1,
                evaluate_on={"train": data})  # fmt: skip
    times = [r["time_s"] for r in run.records]
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))
    assert times[-1] < 1.0  # five evaluations took 500 s of the clock; none is training time
    assert [r["examples"] for r in run.records] == [0, 8, 16, 24, 32]


def test_a_metric_that_cannot_be_factorised_ends_the_run_not_the_study(data, monkeypatch):
    def failing_backward(self, loss):
        raise rc.SolveError("the damped metric could not be factorised")

    monkeypatch.setattr(rc.RiemannianPreconditioner, "backward", failing_backward)
    model = build_model("mlp", 0, torch.device("cpu"), torch.float32)
    run = train(model, data, Config("natural", 0.1, 0.1), steps=4, batch_size=8, seed=0,
                eval_every=1, evaluate_on={"train": data})  # fmt: skip
    assert run.status == "solver failed" and "could not be factorised" in run.reason
    assert [r["step"] for r in run.records] == [0]


def test_a_real_error_in_the_preconditioner_is_not_hidden(data, monkeypatch):
    def buggy_backward(self, loss):
        raise ValueError("shape mismatch")

    monkeypatch.setattr(rc.RiemannianPreconditioner, "backward", buggy_backward)
    model = build_model("mlp", 0, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        train(model, data, Config("layerwise", 0.1, 0.1), steps=2, batch_size=8, seed=0,
              eval_every=1, evaluate_on={"train": data})  # fmt: skip


@pytest.mark.parametrize("method", ["layerwise-sampled", "kfac", "kfac-default"])
def test_training_runs_on_every_available_device(device, method, data):
    """On CUDA (when present) the data, model and Fisher-sampling generator live on the
    device; the batch order is drawn on the CPU, so it matches the CPU run's."""
    on_device = Examples(data.inputs.to(device), data.targets.to(device))
    model = build_model("mlp", 0, torch.device(device), torch.float32)
    run = train(model, on_device, Config(method, 0.1, 0.1), steps=6, batch_size=8, seed=0,
                eval_every=3, evaluate_on={"train": on_device})  # fmt: skip
    assert run.status == "ok"
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    assert run.records[-1]["train_loss"] < run.records[0]["train_loss"]
