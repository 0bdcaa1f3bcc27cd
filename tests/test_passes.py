"""The forward passes behind a data-parallel step's ``.grad`` (riemann_core.passes); the
checks on ranks run in tests/test_distributed.py."""

from __future__ import annotations

import weakref
from collections import deque

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from riemann_core import passes
from riemann_core.passes import MAX_PASSES, Differentiated, Passes, check_shares


def test_the_passes_kept_between_two_steps_are_bounded():
    """Found by review: a loop that never called pre.step() (or evaluated with gradients
    enabled) added one record per forward pass for good."""
    kept = Passes()
    for n in range(MAX_PASSES + 44):
        kept.forward_ends([torch.zeros(n + 1, 3)], Differentiated([]), mean_ce=False)
    shapes = kept.shapes()
    assert len(shapes) == MAX_PASSES
    assert shapes[-1] == (MAX_PASSES + 44, 3)  # the last ones


@pytest.mark.parametrize(
    ("sizes", "alike"),
    [
        ([[2, 3], [2, 3]], True),
        ([[2, 4], [3, 6]], True),  # rank 0: 2 of 5, then 4 of 10
        ([[3, 1], [1, 3]], False),
        ([[5], [7]], True),
    ],
)
def test_shares_of_the_passes_must_be_alike(sizes, alike):
    """``sizes[p][k]``: rank p's samples in pass k; rank p's share of each pass must be
    the same (2 of 5 and 4 of 10; not 3 of 4 and 1 of 4)."""
    if alike:
        check_shares(sizes)
    else:
        with pytest.raises(ValueError, match=r"split between the ranks in other proportions"):
            check_shares(sizes)


def _watched_mean(out: torch.Tensor) -> passes._Pass:
    """A pass whose output gradient at ``out`` is read, by its backward pass numbered 0."""
    record = passes._Pass(tuple(out.shape), Differentiated([]), 0)
    record.watch_mean(out, lambda r: 0)
    return record


@pytest.mark.parametrize("chunk", [2**22, 7])
def test_the_output_gradient_is_read_by_chunks_of_rows_alike(chunk, monkeypatch):
    """softmax(z) - R g, read by chunks of rows (a language model's outputs would need two
    more tensors of their size at once): the mean cross-entropy's is a distribution, a
    summed one's reaches (1 - R) softmax(z) below zero, whatever the chunks."""
    monkeypatch.setattr(passes, "CHUNK", chunk)
    torch.manual_seed(0)
    z, y = torch.randn(4, 6, 5, requires_grad=True), torch.randint(0, 5, (4, 6))
    lowest = {}
    for reduction in ("mean", "sum"):
        out = z * 1.0  # a node the hook can sit on
        record = _watched_mean(out)
        F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=reduction).backward()
        assert record.rows == 24
        lowest[reduction] = float(record.backward[0][0])
    p = torch.softmax(z.detach(), -1)
    assert lowest["mean"] >= -passes.tolerance(torch.float32)
    expected = (p - 24 * (p - F.one_hot(y, 5))).amin()  # the summed loss's gradient: p - e_y
    assert lowest["sum"] == pytest.approx(float(expected), rel=1e-5)


def test_an_empty_shard_leaves_the_user_backward_alone():
    """Found by review: the hook's amin() over zero rows raised inside the user's
    loss.backward(); the empty batch is named at the step, as before."""
    z = torch.zeros(0, 5, requires_grad=True)
    out = z * 1.0
    record = _watched_mean(out)
    F.cross_entropy(out, torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert record.backward[0] == [None, None]


def _read_scale(loss, z, chunk=passes.CHUNK):
    """:func:`passes.hard_scale` of the figures a pass's hook reads from ``loss(out)``."""
    out = z * 1.0
    record = _watched_mean(out)
    loss(out).backward()
    figures = record.backward[0][1]
    return passes.hard_scale(figures.double().tolist(), passes.tolerance(torch.float32))


_Y5 = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(1))
_Y2 = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))
#: losses over 16 rows of 5 classes (2 for the names ending in "two classes"), and the
#: factor c of the mean's gradient each reads as (None: cannot tell, or not of that form)
SCALED = {
    "mean": (lambda out: F.cross_entropy(out, _Y5), 1.0),
    "half the mean": (lambda out: F.cross_entropy(out, _Y5) / 2, 0.5),
    "sum over a global batch of 64": (
        lambda out: F.cross_entropy(out, _Y5, reduction="sum") / 64,
        0.25,
    ),
    "smoothed": (lambda out: F.cross_entropy(out, _Y5, label_smoothing=0.1), None),
    "smoothed, two classes": (lambda out: F.cross_entropy(out, _Y2, label_smoothing=0.1), None),
    "smoothed, two classes, one row": (
        lambda out: F.cross_entropy(out, _Y2[:1], label_smoothing=0.1),
        None,
    ),
    "probability targets": (
        lambda out: F.cross_entropy(out, torch.softmax(torch.ones_like(out).cumsum(-1), -1)),
        None,
    ),
    "half the mean, two classes": (lambda out: F.cross_entropy(out, _Y2) / 2, 0.5),
}


@pytest.mark.parametrize("case", SCALED)
@pytest.mark.parametrize("chunk", [2**22, 3])
def test_a_scaled_mean_is_read_and_smoothing_is_not_taken_for_one(case, chunk, monkeypatch):
    """The factor ``c`` of ``R g = c (softmax(z) - e_y)``, read where the targets are hard:
    a rank's share of the global mean reads ``N_p / N``; label smoothing and probability
    targets, whose ``softmax(z) - R g`` is a distribution too, read as no factor at all,
    also on two classes in one row (found by review: refused as a scaled mean), whatever
    the chunks of rows."""
    monkeypatch.setattr(passes, "CHUNK", chunk)
    loss, expected = SCALED[case]
    rows, classes = 1 if "one row" in case else 16, 2 if "two classes" in case else 5
    z = torch.randn(rows, classes, generator=torch.Generator().manual_seed(3), requires_grad=True)
    c = _read_scale(loss, z)
    assert c == (None if expected is None else pytest.approx(expected, rel=1e-4)), case


@pytest.mark.parametrize(
    ("factors", "refused"),
    [([1.0], False), ([0.5, 0.5], False), ([1.0, 1.0], False), ([0.5], True), ([0.25, 0.25], True)],
)
def test_a_rank_whose_passes_add_up_to_less_than_its_mean_is_refused(factors, refused):
    """Each rank's share of the global mean (``N_p / N`` or ``1 / P`` times its own mean)
    would be weighted by ``N_p / N`` a second time (found by a hunt: 0.5-0.7 off, no
    error): refused where the factors of the passes since the last step add up to less
    than 1; ``loss / K`` over ``K`` micro-batches adds up to 1 and passes."""
    torch.manual_seed(0)
    record, y = Passes(), torch.randint(0, 5, (8,))
    for factor in factors:
        z = torch.randn(8, 5, requires_grad=True)
        out = z * 1.0
        record.forward_ends([out], Differentiated([out]), mean_ce=True)
        (factor * F.cross_entropy(out, y)).backward()
    if refused:
        share = f"{sum(factors):.3g} times the gradient of the mean cross-entropy"
        with pytest.raises(ValueError, match=share):
            record.check_mean()
    else:
        record.check_mean()


def _watched_pass(record, model, x, y, factor=1.0):
    """A forward pass of ``model`` noted by ``record`` (as a data-parallel preconditioner
    notes it), and its mean cross-entropy times ``factor`` differentiated."""
    record.forward_starts(model)
    out = model(x)
    record.forward_ends([out], Differentiated([out]), mean_ce=True, grads_of=model)
    (factor * F.cross_entropy(out, y)).backward()


def test_a_grad_changed_between_passes_is_refused_until_zeroed():
    """A ``.grad`` changed after a backward pass is refused at the step, also where another
    pass followed; after ``zero_grad()`` (either form) the next passes step again (found by
    review: one such refusal refused every later step)."""
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,))
    named = list(model.named_parameters())
    record = Passes()
    _watched_pass(record, model, x, y)
    record.check_grads_kept(named)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.raises(ValueError, match="changed after the backward pass"):
        record.check_grads_kept(named)
    _watched_pass(record, model, x, y)
    with pytest.raises(ValueError, match="changed between two backward passes"):
        record.check_grads_kept(named)
    for set_to_none in (True, False):
        model.zero_grad(set_to_none=set_to_none)
        _watched_pass(record, model, x, y)
        record.check_grads_kept(named)


def test_a_grad_written_where_none_was_is_a_change():
    """Found by review: a ``.grad`` that was ``None`` when the backward pass through the
    outputs ended (``torch.autograd.grad``), written and clipped since, was taken as the
    shard's gradient."""
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,))
    record = Passes()
    out = model(x)
    record.forward_ends([out], Differentiated([out]), mean_ce=True, grads_of=model)
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    with pytest.raises(ValueError, match=r"\['weight', 'bias'\] changed after the backward pass"):
        record.check_grads_kept(list(model.named_parameters()))


def test_the_share_is_not_read_where_it_cannot_be_told(monkeypatch):
    """Not refused where the factors cannot be told from a share (found by review): in
    half precision, whose rounding lets label smoothing's ratios read as one factor
    (bfloat16 smoothing over 2 micro-batches read 0.93); and past :data:`MAX_PASSES`
    passes, the first ones no longer kept (loss / 300 over 300 passes read 0.85)."""
    figures = [8.0, 8.0, 0.05, 0.5, 0.46, 0.5]  # ratios within bfloat16's rounding
    assert passes.hard_scale(figures, passes.tolerance(torch.bfloat16)) is None
    assert passes.hard_scale(figures, passes.tolerance(torch.float16)) is None
    assert passes.hard_scale(figures, 1e-4) is None  # (float32: they differ)
    monkeypatch.setattr(passes, "MAX_PASSES", 4)
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,))
    for K, refused in ((4, False), (6, False), (3, True)):
        record = Passes()
        record._passes = deque(maxlen=4)
        for _ in range(K):
            _watched_pass(record, model, x, y, factor=1 / K if not refused else 1 / (2 * K))
        if refused:
            with pytest.raises(ValueError, match="times the gradient of the mean"):
                record.check_mean()
        else:
            record.check_mean()
        model.zero_grad()
        if K == 6:  # a zeroing drops the passes: the next ones are read again
            _watched_pass(record, model, x, y, factor=0.5)
            with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
                record.check_mean()
            model.zero_grad()


def test_evaluations_pushed_out_leave_the_share_read(monkeypatch):
    """Found by review: forward passes with gradients enabled and no backward (an
    evaluation loop), pushed out past :data:`MAX_PASSES`, turned the share's check off
    for the next step (0.5 off with no error). Only a pass a gradient came back through
    counts."""
    monkeypatch.setattr(passes, "MAX_PASSES", 4)
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,))
    record = Passes()
    record._passes = deque(maxlen=4)
    for _ in range(6):  # evaluations
        record.forward_starts(model)
        out = model(x)
        record.forward_ends([out], Differentiated([out]), mean_ce=True, grads_of=model)
    _watched_pass(record, model, x, y, factor=0.5)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()


def test_zeros_filled_in_for_an_unused_layer_are_its_gradient():
    """Found by review: ``p.grad = torch.zeros_like(p)`` for a layer no pass used (as some
    loops do before stepping) was refused as a change; it is the gradient of every rank.
    Anything else written there is a change."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 3)})
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    record = Passes()
    out = model["used"](x)
    record.forward_ends([out], Differentiated([out]), mean_ce=True, grads_of=model)
    F.cross_entropy(out, y).backward()
    for p in model["unused"].parameters():
        p.grad = torch.zeros_like(p)
    named = list(model.named_parameters())
    record.check_grads_kept(named)
    model["unused"].bias.grad[0] = 1.0
    with pytest.raises(ValueError, match=r"\['unused.bias'\] changed after the backward pass"):
        record.check_grads_kept(named)


def _noted_pass(record, model, x):
    """A forward pass of ``model`` noted by ``record``, not differentiated yet."""
    record.forward_starts(model)
    out = model(x)
    record.forward_ends([out], Differentiated([out]), mean_ce=True, grads_of=model)
    return out


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_zeroing_between_the_forward_and_the_backward_pass_drops_the_passes_before(
    set_to_none,
):
    """Found by a hunt: ``opt.zero_grad()`` between ``model(x)`` and ``loss.backward()``
    (the tutorials' order) was not seen, so a skipped iteration's pass still counted: its
    share was added to the next one's (0.5 + 0.5 of the mean passed, 0.5 off) and its
    split compared. Read as a backward pass first reaches a recorded output."""
    model, x, y = _linear()
    record = Passes()
    _watched_pass(record, model, x, y, factor=0.5)  # an iteration skipped: no step
    out = _noted_pass(record, model, x)
    model.zero_grad(set_to_none=set_to_none)
    (0.5 * F.cross_entropy(out, y)).backward()
    assert record.shapes() == ((6, 3),)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()


def test_a_loss_over_two_passes_after_a_zeroing_keeps_both():
    """Found by review of an earlier reading of that zeroing (as each backward pass reached
    an output): of a loss over two recorded passes (siamese), the second output reached
    dropped the first (0.42 off, silent). The running backward pass's passes stay; the
    skipped iteration's goes."""
    model, x, y = _linear()
    record = Passes()
    _watched_pass(record, model, x, y, factor=0.5)  # skipped
    a, b = _noted_pass(record, model, x), _noted_pass(record, model, x[:3])
    model.zero_grad()
    (0.5 * F.cross_entropy(a, y) + 0.5 * F.cross_entropy(b, y[:3])).backward()
    assert record.shapes() == ((6, 3), (3, 3))
    record.check_mean()  # 0.5 + 0.5 of the mean: a whole one
    record.check_grads_kept(list(model.named_parameters()))


def test_micro_batches_accumulated_without_zeroing_all_count():
    """Accumulation: each micro-batch's backward pass adds to ``.grad``, none is an edit."""
    model, x, y = _linear()
    record = Passes()
    model.zero_grad()
    for rows in (slice(0, 3), slice(3, 6)):
        _watched_pass(record, model, x[rows], y[rows], factor=0.5)
    assert record.shapes() == ((3, 3), (3, 3))
    record.check_mean()
    record.check_grads_kept(list(model.named_parameters()))


def test_a_backward_pass_that_leaves_grad_alone_counts_for_nothing():
    """Found by review: ``torch.autograd.grad(loss, out)`` before ``loss.backward()``
    counted as a backward pass, so half the mean read as a whole one (0.5 + 0.5, 0.5 off,
    silent)."""
    model, x, y = _linear()
    record = Passes()
    out = _noted_pass(record, model, x)
    loss = 0.5 * F.cross_entropy(out, y)
    torch.autograd.grad(loss, out, retain_graph=True)
    assert record.shapes() == ()
    loss.backward()
    assert record.shapes() == ((6, 3),)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_zeroing_between_two_backward_passes_through_one_output_keeps_the_last(set_to_none):
    """Found by review: ``loss.backward(retain_graph=True); opt.zero_grad();
    loss.backward()`` kept both backward passes' factors (0.5 + 0.5 read as 1, silent)."""
    model, x, y = _linear()
    record = Passes()
    out = _noted_pass(record, model, x)
    loss = 0.5 * F.cross_entropy(out, y)
    loss.backward(retain_graph=True)
    model.zero_grad(set_to_none=set_to_none)
    loss.backward()
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()


def test_zeroings_past_the_bound_are_read_not_lost(monkeypatch):
    """The zeroings noted between two steps are bounded (:data:`MAX_PASSES`): a full record
    is read (one host read) before the next is noted, so an early zeroing still drops the
    passes before it."""
    monkeypatch.setattr(passes, "MAX_PASSES", 4)
    model, x, y = _linear()
    record = Passes()
    _watched_pass(record, model, x, y)
    model.zero_grad(set_to_none=False)  # noted as zeros at the next pass's start
    for _ in range(3):  # accumulated: each start notes a .grad that is not zero
        _watched_pass(record, model, x, y)
    assert record.shapes() == ((6, 3),) * 3


def test_a_pass_recomputed_inside_the_backward_pass_is_none():
    """Found by review: a checkpoint of the whole model recomputes its forward pass inside
    the backward pass, whose zeroing (every ``.grad`` None then) dropped the running
    backward pass: half the mean read as nothing to check (0.5 off, silent)."""
    model, x, y = _linear()
    record = Passes()
    out = checkpoint(lambda x: _noted_pass(record, model, x), x, use_reentrant=False)
    (0.5 * F.cross_entropy(out, y)).backward()
    assert record.shapes() == ((6, 3),)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()


class _Early(torch.nn.Module):
    """A model two of whose parameters' gradients a backward pass may accumulate before it
    reaches the output: an auxiliary head evaluated after the output (its logits kept on
    the module, weighted in the loss) and a parameter the loss uses alone."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = (
            torch.nn.Linear(4, 8),
            torch.nn.Linear(8, 3),
            torch.nn.Linear(8, 3),
        )
        self.prior = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits = self.head(h)
        self.aux_logits = self.aux(h)
        return logits


#: losses whose backward pass accumulates into a parameter before it reaches the output
EARLY = {
    "an auxiliary head after the output": lambda m, out, y: (
        F.cross_entropy(out, y) + 0.3 * F.cross_entropy(m.aux_logits, y)
    ),
    "a parameter in the loss only": lambda m, out, y: (
        F.cross_entropy(out, y) + 1e-3 * (m.prior - 1).pow(2).sum()
    ),
}


def _early():
    torch.manual_seed(0)
    return _Early(), torch.randn(6, 4), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("case", EARLY)
def test_a_zeroing_is_read_before_a_parameter_reached_first_accumulates(case, set_to_none):
    """Found by review: where a backward pass accumulates a parameter's gradient before it
    reaches the recorded output, the zeroing between ``model(x)`` and ``loss.backward()``
    was read after that accumulation, as not zeroed, so a skipped iteration's pass still
    counted (0.5 + 0.5 of the mean read as a whole one, silent). Each parameter is read
    before the backward pass first accumulates into it."""
    loss, (model, x, y) = EARLY[case], _early()
    record = Passes()
    out = _noted_pass(record, model, x)
    (0.5 * loss(model, out, y)).backward()  # an iteration skipped: no step
    out = _noted_pass(record, model, x)
    model.zero_grad(set_to_none=set_to_none)
    (0.5 * loss(model, out, y)).backward()
    assert record.shapes() == ((6, 3),)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()


@pytest.mark.parametrize(
    "split", ["a regulariser's own backward", "ten of them", "backward(inputs=...)"]
)
def test_a_zeroing_before_a_backward_pass_that_reaches_no_output_is_read(split):
    """Found by review: a backward pass that reaches no recorded output (a regulariser's
    own ``backward()``, or the part of a loss split by ``backward(inputs=...)`` that stops
    before the output) between the zeroing and ``loss.backward()`` accumulated into its
    parameters first, so the zeroing read as not done and a skipped iteration's pass
    counted (0.5 + 0.5 of the mean read as a whole one, silent). Its notes of ``.grad``
    before it count, the first of each parameter's however many follow (a first version
    kept the notes of the last 8 backward passes); between micro-batches with no zeroing,
    both passes still count."""
    model, x, y = _early()

    def regulariser():
        return 1e-3 * (model.prior - 1).pow(2).sum()

    def backward(out, rows):
        loss = 0.5 * F.cross_entropy(out, y[rows])
        if split == "backward(inputs=...)":
            total = loss + regulariser()
            total.backward(inputs=[model.prior], retain_graph=True)
            total.backward(inputs=[p for n, p in model.named_parameters() if n != "prior"])
        else:
            for _ in range(10 if split == "ten of them" else 1):
                regulariser().backward()
            loss.backward()

    record = Passes()
    backward(_noted_pass(record, model, x), slice(None))  # an iteration skipped: no step
    out = _noted_pass(record, model, x)
    model.zero_grad()
    backward(out, slice(None))
    assert record.shapes() == ((6, 3),)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()
    record.clear()
    model.zero_grad()
    for rows in (slice(0, 3), slice(3, 6)):
        backward(_noted_pass(record, model, x[rows]), rows)
    assert record.shapes() == ((3, 3), (3, 3))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_zeroing_after_a_backward_pass_that_reaches_no_output_is_read(set_to_none):
    """Found by review of the test above's change: a regulariser's own backward pass after
    ``model(x)`` and before the zeroing noted each ``.grad`` first, as it held the skipped
    iteration's gradient, and the zeroing after it was not read (the skipped pass counted,
    0.5 + 1 read, silent). A later note of the parameter, or its ``.grad`` as the backward
    pass through the output arrives, reads it; micro-batches after it still both count."""
    model, x, y = _early()

    def regulariser():
        return 1e-3 * sum(p.pow(2).sum() for p in model.parameters())

    record = Passes()
    F.cross_entropy(_noted_pass(record, model, x), y).backward()  # skipped: no step
    out = _noted_pass(record, model, x)
    regulariser().backward()
    model.zero_grad(set_to_none=set_to_none)
    (0.5 * F.cross_entropy(out, y)).backward()
    assert record.shapes() == ((6, 3),)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()
    record.clear()
    for rows in (slice(0, 3), slice(3, 6)):
        out = _noted_pass(record, model, x[rows])
        regulariser().backward()
        (0.5 * F.cross_entropy(out, y[rows])).backward()
    assert record.shapes() == ((3, 3), (3, 3))
    record.check_mean()


@pytest.mark.parametrize("case", EARLY)
def test_passes_through_a_parameter_reached_first_count_where_nothing_was_zeroed(case):
    """Micro-batches accumulated without a zeroing all count, also where the backward pass
    reaches a parameter before the output; of a loss over two passes after a zeroing, both
    count; of two backward passes through one output with a zeroing between, the last."""
    loss, (model, x, y) = EARLY[case], _early()
    record = Passes()
    for rows in (slice(0, 3), slice(3, 6)):
        out = _noted_pass(record, model, x[rows])
        (0.5 * loss(model, out, y[rows])).backward()
    assert record.shapes() == ((3, 3), (3, 3))
    record.check_mean()
    record.check_grads_kept(list(model.named_parameters()))
    a = _noted_pass(record, model, x)
    of_a = loss(model, a, y)  # (the auxiliary head's of this pass)
    b = _noted_pass(record, model, x[:3])
    model.zero_grad()
    (0.5 * of_a + 0.5 * F.cross_entropy(b, y[:3])).backward()
    assert record.shapes() == ((6, 3), (3, 3))
    record.check_mean()
    record = Passes()
    out = _noted_pass(record, model, x)
    total = 0.5 * loss(model, out, y)
    total.backward(retain_graph=True)
    model.zero_grad()
    total.backward()
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()


def test_the_parameters_hooks_hold_nothing_and_come_off():
    """The hook on each trainable parameter changes no gradient, is not taken for a hook
    of the user's, holds the parameter weakly (one replaced in the model is freed) and
    comes off with ``remove()``."""
    model, x, y = _early()
    aux, prior = EARLY.values()
    loss = lambda m, out, y: aux(m, out, y) + prior(m, out, y)  # noqa: E731
    record = Passes()
    for _ in range(2):  # a skipped iteration, then a zeroing inside the next
        out = _noted_pass(record, model, x)
        model.zero_grad()
        loss(model, out, y).backward()
    hooked = [p.grad.clone() for p in model.parameters()]
    assert all(p._backward_hooks for p in model.parameters())
    assert not any(passes.user_hooks_on(p) for p in model.parameters())
    record.remove()  # no empty hook dict left: autograd would still call into it
    assert all(p._backward_hooks is None for p in model.parameters())
    model.zero_grad()
    loss(model, model(x), y).backward()
    for g, p in zip(hooked, model.parameters(), strict=True):
        assert torch.equal(g, p.grad)
    record = Passes()
    _noted_pass(record, model, x)
    replaced = weakref.ref(model.aux.weight)
    model.aux = torch.nn.Linear(8, 3)
    loss(model, _noted_pass(record, model, x), y).backward()
    assert replaced() is None


def test_a_zeroing_before_a_torch_autograd_grad_through_the_output_is_read():
    """Found by review: a ``torch.autograd.grad`` through the output between the zeroing
    and ``loss.backward()`` (a gradient-norm probe) noted the zeroed ``.grad`` at its end,
    so the backward pass after saw nothing move: a skipped iteration's pass still counted
    (0.5 + 0.5 of the mean read as a whole one, silent)."""
    loss, (model, x, y) = EARLY["an auxiliary head after the output"], _early()
    for probe in ([model.head.weight], list(model.parameters())):
        record = Passes()
        (0.5 * loss(model, _noted_pass(record, model, x), y)).backward()  # skipped
        out = _noted_pass(record, model, x)
        total = 0.5 * loss(model, out, y)
        model.zero_grad()
        torch.autograd.grad(total, probe, retain_graph=True, allow_unused=True)
        total.backward()
        assert record.shapes() == ((6, 3),)
        with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
            record.check_mean()


class _CheckpointedHead(_Early):
    """The auxiliary head (evaluated after the output) under a reentrant checkpoint: its
    parameters accumulate in a backward pass of its own, run inside the loss's."""

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits = self.head(h)
        self.aux_logits = checkpoint(self.aux, h, use_reentrant=True)
        return logits


def test_a_head_reached_first_under_a_reentrant_checkpoint_is_read_before_it():
    """Found by review: a reentrant checkpoint's backward pass is a graph task of its own,
    so its parameters' notes were kept apart from the loss's backward pass and the
    zeroing missed (the skipped pass counted, silent); and one run after the output was
    reached (a checkpointed body) read every parameter for nothing, once per backward."""
    torch.manual_seed(0)
    model, x, y = _CheckpointedHead(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss = EARLY["an auxiliary head after the output"]
    record = Passes()
    (0.5 * loss(model, _noted_pass(record, model, x), y)).backward()  # skipped
    out = _noted_pass(record, model, x)
    model.zero_grad()
    (0.5 * loss(model, out, y)).backward()
    assert record.shapes() == ((6, 3),)
    with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
        record.check_mean()

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(checkpoint(self.body, x, use_reentrant=True).tanh())

    model, record, read = Body(), Passes(), []
    x = x.requires_grad_()
    original = record._before
    record._before = lambda p: (read.append(p), original(p))
    for rows in (slice(0, 3), slice(3, 6)):
        (0.5 * F.cross_entropy(_noted_pass(record, model, x[rows]), y[rows])).backward()
    assert record.shapes() == ((3, 3), (3, 3)) and not read


def test_the_hooks_are_dropped_silently_where_tensors_are_pickled():
    """Found by review: torch.multiprocessing's reduction of a parameter warned of the
    hook (one warning per parameter); it is marked unserializable, as torch's own are."""
    import warnings

    from torch.multiprocessing.reductions import reduce_tensor

    model, x, _ = _early()
    record = Passes()
    _noted_pass(record, model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reduce_tensor(model.head.weight)


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_a_retry_after_a_backward_pass_that_raised_past_the_output_is_read(factor):
    """Found by review: an exception raised inside a backward pass after it reached the
    recorded output (a NaN check in a gradient hook of the body) dropped the callback
    queued on it, so the pass stayed under way; a retry of ``backward`` on the retained
    graph after ``zero_grad()`` then noted nothing before the output (the auxiliary head's
    parameters read as a reentrant checkpoint's inside it) and the failed pass counted:
    0.5 + 0.5 of the mean read as a whole one, silent. The pass's end is now also read
    when the engine frees what was queued on it."""
    loss, (model, x, y) = EARLY["an auxiliary head after the output"], _early()
    record = Passes()
    out = _noted_pass(record, model, x)
    total = factor * loss(model, out, y)
    raised = []

    def nan_check(grad):
        if not raised:
            raised.append(True)
            raise FloatingPointError("a NaN check")

    handle = model.body.weight.register_hook(nan_check)
    with pytest.raises(FloatingPointError):
        total.backward(retain_graph=True)
    handle.remove()
    model.zero_grad()
    total.backward()
    if factor == 1:
        record.check_mean()
    else:
        with pytest.raises(ValueError, match="0.5 times the gradient of the mean"):
            record.check_mean()


def test_pre_backward_s_own_backward_passes_are_not_walked(monkeypatch):
    """``pre.backward(loss)`` writes ``.grad`` itself: its own backward passes through the
    output are not read for a parameter's gradient (the walk over the parameters took 4%
    of a small network's step), and a ``loss.backward()`` after a refused one still is."""
    import riemann_core as rc

    walks = []
    walk = passes._takes_a_parameter_gradient
    monkeypatch.setattr(passes, "_takes_a_parameter_gradient", lambda m: walks.append(1) or walk(m))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pre = rc.RiemannianPreconditioner(model, damping=1e-2, output_metric="sampled")
    for _ in range(3):  # the first call probes, the next are fused
        model.zero_grad()
        pre.backward(F.cross_entropy(model(x), y))
    assert walks == []
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)

    def refused(*args, **kwargs):
        raise RuntimeError("refused before its backward pass")

    monkeypatch.setattr(pre, "_fused", refused)
    with pytest.raises(RuntimeError, match="refused before its backward pass"):
        pre.backward(loss)
    loss.backward()
    assert walks == [1]  # read: the step takes it as the pass's gradient
    pre.step()


def test_the_reading_of_what_an_accumulation_adds_onto_is_zero_only_for_zeros():
    """Found by review: ``vector_norm(grad, inf)`` took 20x as long as ``torch.aminmax`` on
    the CPU (5% of a 784-1024-1024-10 step zeroed in place). Its replacement reads both
    zero only where every entry is zero (``-0.0`` too), NaN where one is NaN, and reads
    complex and empty ``.grad``."""
    from riemann_core.passes import _extremes

    def zero(g):
        return all(bool(r.eq(0)) for r in _extremes(g))

    assert zero(torch.zeros(3, 4)) and zero(torch.tensor([0.0, -0.0])) and zero(torch.zeros(0))
    assert zero(torch.zeros(2, dtype=torch.complex64))
    for g in (torch.tensor([0.0, -1e-45]), torch.tensor([0.0, 3.0]), torch.tensor([-float("inf")])):
        assert not zero(g)
    assert not zero(torch.tensor([0.0, 1e-3j]))
    assert any(bool(r.isnan()) for r in _extremes(torch.tensor([0.0, float("nan")])))


def test_the_parameters_a_backward_pass_that_raised_reached_are_not_kept():
    """Found by review: the parameters a backward pass accumulated into since a direction,
    to be read again at its end (:class:`~riemann_core.passes._Ended`, queued on it), stayed
    noted where the pass raised before its end, whose queued callbacks never run: one list
    a failed pass, for as long as no step came. Dropped as the engine frees the callback;
    the next step reads its own passes."""
    import riemann_core as rc

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pre = rc.RiemannianPreconditioner(model, damping=1e-2)
    F.cross_entropy(model(x), y).backward()
    pre.step()

    def nan_check(grad):
        raise FloatingPointError("a NaN check")

    def checked(module, inputs, out):
        out.register_hook(nan_check)

    model.zero_grad(set_to_none=False)
    handle = model[0].register_forward_hook(checked)
    for _ in range(3):  # past the head, which accumulates first
        with pytest.raises(FloatingPointError):
            F.cross_entropy(model(x), y).backward()
    handle.remove()
    assert not pre._accumulations._ending
    model.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    pre.step()
