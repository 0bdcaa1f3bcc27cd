"""Layer-parallel solves over ``torch.distributed``: every rank holds a shard of the
global batch and ends with the direction of the global batch.

The global batch is the ranks' shards in rank order, ``N = sum_p N_p`` samples; its mean
loss weights rank ``p``'s shard by ``w_p = N_p / N``. What a rank computes for the mean
loss of its own shard is rescaled once: factor rows (``Delta``, the rows of ``K``) by
``sqrt(w_p)`` (the stacked factor is ``F / sqrt(N)``, not ``F / sqrt(N_p)``), the loss
gradient at a block output (``Lambda``) and parameter gradients by ``w_p``.

A step (:func:`solve`), on every rank of the group:

1. *local*: the forward pass and the pullback on the shard (the ordinary problem), and
   what the owners need from it;
2. *agree*: an all-reduce of ``(failed, N_p, signature of the blocks, forward passes)``
   per rank (and of each pass's samples where ``.grad`` sums several). A rank
   whose local work raised makes every rank raise here, and ranks that see different
   networks are refused (then, and only then, they exchange their samples' shapes, to
   name each rank's where those differ; or, where the blocks differ only in their
   parameters' names, shapes or order, those parameters, to name each rank's). Every
   rank then computes the same plan: ``layerwise`` and ``kfac`` give each block to one
   rank by the greedy plan of
   :mod:`riemann_core.ownership` over the modelled solve FLOPs, ``natural`` and ``full``
   every block to rank 0 (their metric couples all blocks: one solve on one rank);
3. *exchange*: ``layerwise``, ``natural``, ``full``: one all-to-all sends each block's
   per-sample rows to its owner (the pulled-back factor rows, the block input and
   ``Lambda`` for Linear and Conv2d blocks; the rows of ``K`` for a materialised kernel),
   and the owner concatenates them into the global batch's; ``kfac``: one all-reduce of
   every block's weighted factors ``w_p Gamma_p`` and ``w_p A_p``, formed dense (a factor
   thinner than it is wide, kept as its rows on one process, is summed as a matrix);
   ``euclidean``: of the gradient. Weighted local gradients ride along where the owner
   cannot form the global one from what it receives;
4. *solve*: each owner runs the method's own solver on its blocks of the global batch,
   with the usual checks;
5. *broadcast*: each rank broadcasts its blocks' directions and a status (the ``P``
   broadcasts are issued asynchronously, then awaited); a failed solve sends status 1,
   and every rank raises.

Every wait has a timeout: a rank that stopped outside the step (an exception in its own
code, a crash) makes the others raise :class:`DistributedError` instead of hanging.
Nothing is written anywhere before every rank holds every direction.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import threading
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import costs
from ._checks import Deferred, DirectionOverflow
from .kronecker import Factor
from .methods import SOLVERS, LayerDiagnostics, Options, Problem, finish, kfac
from .methods.memory import named_when_too_large
from .modules import (
    Block,
    Handler,
    LinearHandler,
    PatchHandler,
    kronecker_handler,
    named_module,
    training,
)
from .ownership import assign
from .passes import check_shares

#: The phases of a step, in order (see the module docstring).
PHASES = ("local", "agree", "exchange", "solve", "broadcast")

#: Bytes of each rank's error message shared when a step fails.
MESSAGE_BYTES = 2048

#: Blocks whose parameters :meth:`_Group.other_parameters` names, at most.
PARAMETERS_NAMED = 3

#: Seconds a rank waits in a collective before it raises (the default).
TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """Another rank of the process group failed, or a collective did not complete in time."""


class DirectionOverflowElsewhere(DistributedError, DirectionOverflow):
    """The directions of blocks other ranks own overflowed, and nothing else failed: a
    :class:`DistributedError` that a preconditioner beside a ``GradScaler`` hands to the
    scaler to skip, as the owners do their own :class:`DirectionOverflow`."""


@dataclass
class Traffic:
    """Bytes one rank sent and received in the collectives of one step, per collective
    (an all-reduce counts its size both ways, a broadcast its size once per receiver,
    sent by its source), and the owner rank of each block."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    owners: tuple[int, ...] = ()

    def add(self, what: str, sent: int, received: int) -> None:
        self.sent[what] = self.sent.get(what, 0) + sent
        self.received[what] = self.received.get(what, 0) + received


class Observer:
    """Sees the distributed steps run inside :func:`observing` (how the measurement layer
    times their phases and counts their FLOPs): :meth:`phase` is entered around each of
    :data:`PHASES`, :meth:`traffic` receives each completed step's :class:`Traffic`."""

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def traffic(self, traffic: Traffic) -> None:
        """Called once a step has succeeded."""


_LOCAL = threading.local()


@contextlib.contextmanager
def observing(observer: Observer):
    """Let ``observer`` see the distributed steps run in this thread inside the block."""
    previous = getattr(_LOCAL, "observer", None)
    _LOCAL.observer = observer
    try:
        yield observer
    finally:
        _LOCAL.observer = previous


def usable(group) -> bool:
    """Whether ``group`` is a process group of an initialised ``torch.distributed``."""
    return dist.is_available() and dist.is_initialized() and isinstance(group, dist.ProcessGroup)


def check_group(group) -> None:
    """A usable process group, or an error naming the fix."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group needs torch.distributed initialised on every rank: call "
            "torch.distributed.init_process_group(...) first (docs/distributed.md)"
        )
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            "this rank is not a member of process_group (torch.distributed.new_group(ranks) "
            "returns GroupMember.NON_GROUP_MEMBER on the ranks it leaves out): make the "
            "RiemannianPreconditioner, or call rc.direction, on the group's ranks only"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(group).__name__}"
        )


#: the longest wait a collective may take, about 31 years, within ``timedelta``'s range
#: (found by a hunt: an infinite or huge timeout passed the check and raised torch's
#: OverflowError at the first wait of every rank)
MAX_TIMEOUT = 1e9


def valid_timeout(timeout) -> bool:
    return (
        not isinstance(timeout, bool)
        and isinstance(timeout, (int, float))
        and 0 < timeout <= MAX_TIMEOUT
    )


def check_timeout(timeout) -> None:
    if not valid_timeout(timeout):
        raise ValueError(
            f"timeout must be a positive number of seconds, at most {MAX_TIMEOUT:g} (a "
            f"finite wait; 1e9 s is about 31 years), got {timeout!r}"
        )


#: What a rank failed in, as :meth:`_Group.fail` names it to the others.
IN_STEP = "its forward pass, pullback or checks"
IN_MAKING = "the making of its RiemannianPreconditioner"

#: The agreement's count of forward passes from a rank making its preconditioner: a rank
#: met there by another's step is told so (found by review: a preconditioner made again
#: on one rank was refused as "different numbers of forward passes")
MAKING = -1


@contextlib.contextmanager
def share_failure(group, timeout: float, *, meet: Callable[[], str] | None = None):
    """Around a caller's own checks before :func:`solve` (``group`` ``None``: nothing):
    an error raised inside meets the other ranks at the agreement of the step, where
    this rank raises it and every other rank a :class:`DistributedError` naming it (a
    bad ``timeout`` among them: the default's is waited then; a ``group`` that is not a
    usable process group: nothing, :func:`check_group` names it).

    ``meet``: around checks every rank runs at this point and that no step follows (a
    preconditioner's constructor): every rank meets the others here, its checks passed
    or not, and all raise here where one failed, or where the choices ``meet()`` returns
    once the checks passed (:func:`choices`) differ between ranks, naming each rank's.
    Met at the first step's agreement instead, the refused rank's all-reduce was answered
    by whatever collective the others ran first (found by a hunt: DistributedDataParallel's
    gradient all-reduce, or a loss summed for a log, aborted a rank in gloo, or summed the
    agreement's bits into the logged values silently, and no rank saw the refusal)."""
    if group is None or not usable(group):
        yield
        return
    net = functools.partial(_Group, group, timeout if valid_timeout(timeout) else TIMEOUT)
    try:
        yield
    except BaseException as err:  # a KeyboardInterrupt too (found by a hunt: the others
        # waited out the timeout, then blamed the process group)
        net().agree(err, 0, 0, None, choices=None if meet is None else "")
        raise
    if meet is not None:
        net().agree(None, 0, 0, None, choices=meet())


def choices(method: str, opts: Options, scaled: bool, wrapped: bool) -> str:
    """What every rank's preconditioner must share, ``key=value`` joined by ``"; "``: the
    method and :data:`SHARED_OPTIONS` (also checked at every step), whether a GradScaler
    is enabled (``scaled``: a step whose ``.grad`` overflowed is the scaler's to skip with
    no collective, where a rank without one refuses it at the agreement, which the
    others' next collective answers; found by review: gloo aborted a rank at the next
    step's gradient all-reduce) and whether the model is ``DistributedDataParallel``
    (``wrapped``: its ``.grad`` is taken as the global gradient)."""
    options = [f"{k}={_shown(getattr(opts, k))}" for k in SHARED_OPTIONS]
    chosen = [
        f"method={method!r}",
        *options,
        f"grad_scaler={'enabled' if scaled else 'none or disabled'}",
        f"DistributedDataParallel={wrapped}",
    ]
    return "; ".join(chosen)


def _shown(value) -> str:
    """An option as the ranks compare it: a custom output metric by its name."""
    return getattr(value, "__qualname__", type(value).__name__) if callable(value) else repr(value)


def _differing(texts: list[str]) -> str:
    """Each :func:`choices` entry that differs between the ranks' ``texts``, with its
    value on each rank (every entry's where none differs, as a text cut short may)."""
    entries = [dict(item.partition("=")[::2] for item in text.split("; ")) for text in texts]
    keys = [k for k in entries[0] if len({e.get(k) for e in entries}) > 1] or list(entries[0])
    named = []
    for key in keys:
        ranks: dict[str | None, list[int]] = {}
        for q, entry in enumerate(entries):
            ranks.setdefault(entry.get(key), []).append(q)
        named.append(
            f"{key} "
            + ", ".join(
                f"{value} on rank{'s' * (len(qs) > 1)} {', '.join(map(str, qs))}"
                for value, qs in ranks.items()
            )
        )
    return "; ".join(named)


# ------------------------------------------------------------------------ the group


class _Group:
    """The process group as a step uses it: its rank and size, the device of its
    collectives (CUDA for NCCL, the host otherwise), a timeout on every wait, and the
    bytes counted."""

    def __init__(self, group, timeout: float):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        nccl = "nccl" in str(dist.get_backend(group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self.device = self.device or torch.device("cpu")
        self.timeout = timeout
        self.traffic = Traffic()

    def _wait(self, works: list, what: str) -> None:
        for work in works:
            try:
                done = work.wait(timeout=timedelta(seconds=self.timeout))
            except RuntimeError as err:
                raise self._stalled(what, err) from err
            if done is False:
                raise self._stalled(what, "timed out")

    def _stalled(self, what: str, cause) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.world} waited for the {what}, which did not complete "
            f"within {self.timeout:g} s or failed ({cause}). Another rank stopped outside the "
            "preconditioner (an exception in its own code, a crash) or calls it a different "
            "number of times; .grad is left as it was. The process group cannot be trusted "
            "after this: restart the job"
        )

    def all_reduce(self, tensor: Tensor, what: str) -> Tensor:
        """The sum over ranks of ``tensor`` (moved to the collectives' device)."""
        if self.world == 1:
            return tensor
        buffer = tensor.to(self.device)
        size = buffer.numel() * buffer.element_size()
        self.traffic.add(what, size, size)
        self._wait([dist.all_reduce(buffer, group=self.group, async_op=True)], what)
        return buffer.to(tensor.device)

    def all_to_all(
        self, source: Tensor, send: list[int], receive: list[int], what: str
    ) -> list[Tensor]:
        """The first ``send[0]`` elements of ``source`` go to rank 0, the next ``send[1]``
        to rank 1, ...; returns what each rank sent here, ``receive[q]`` from rank ``q``."""
        if self.world == 1:
            return [source]
        moved = source.to(self.device)
        target = moved.new_empty(sum(receive))
        item = moved.element_size()
        self.traffic.add(
            what,
            sum(n for q, n in enumerate(send) if q != self.rank) * item,
            sum(n for q, n in enumerate(receive) if q != self.rank) * item,
        )
        work = dist.all_to_all_single(target, moved, receive, send, group=self.group, async_op=True)
        self._wait([work], what)
        return list(target.to(source.device).split(receive))

    def broadcast_all(self, buffers: list[Tensor], what: str) -> list[Tensor]:
        """Rank ``q`` sends ``buffers[q]`` to every rank: all ``P`` broadcasts in flight
        at once; the others' buffers only give sizes and dtype."""
        if self.world == 1:
            return buffers
        moved = [b.to(self.device) for b in buffers]
        works = [
            dist.broadcast(
                b, src=dist.get_global_rank(self.group, q), group=self.group, async_op=True
            )
            for q, b in enumerate(moved)
        ]
        item = moved[0].element_size()
        own = moved[self.rank].numel()
        others = sum(b.numel() for q, b in enumerate(moved) if q != self.rank)
        self.traffic.add(what, (self.world - 1) * own * item, others * item)
        self._wait(works, what)
        return [b.to(buffers[0].device) for b in moved]

    def agree(
        self,
        failure: BaseException | None,
        samples: int,
        signature: int,
        params: list | None,
        constants: list | None = None,
        passes: tuple[tuple[int, ...], ...] = (),
        choices: str | None = None,
        listing: list[tuple[str, tuple[str, ...]]] | None = None,
    ) -> list[int]:
        """Every rank's batch size, once every rank finished its local work, sees the same
        blocks, holds the same ``params`` and ``constants`` (by :func:`_checksum`) and
        ``.grad`` summed over as many forward ``passes`` (their output shapes, samples
        first: ranks whose samples differ in shape are refused naming each rank's); a
        rank that failed makes every rank raise. ``choices``: the ranks make
        their preconditioners (:func:`share_failure`'s meeting) with these
        :func:`choices` (``""`` where this rank failed), which must be every rank's; a
        rank that runs a step or ``rc.direction`` there is refused on every rank.
        ``listing``: each block's parameters (:func:`_parameters`), whose names, shapes and
        order the high bits of ``signature`` sign: ranks that differ only there are
        refused naming each rank's (:meth:`other_parameters`)."""
        if self.world == 1:
            if failure is not None:
                raise failure
            return [samples]
        making = choices is not None
        if making:
            signature, passes = zlib.crc32(choices.encode()), ()
        count = MAKING if making else len(passes)
        table = torch.zeros(self.world, costs.AGREEMENT_SLOTS, dtype=torch.int64)
        constants = constants or []
        if params and failure is None:  # the float64 checksums' bits: a sum with the other
            # ranks' zeros keeps them
            try:
                sums = _checksum(params) + _constant_sums(constants, _chunks(params))
                table[self.rank, 4:] = sums.view(torch.int64)
            except BaseException as err:  # (an allocation that failed: found by a hunt, the
                # others waited out the timeout)
                failure = err
        table[self.rank, :4] = torch.tensor([failure is not None, samples, signature, count])
        what = "meeting of the ranks making their RiemannianPreconditioner"
        with _own_interrupt(failure):
            table = self.all_reduce(table, what if making else "agreement")
        rows = table.tolist()
        failed = [q for q, row in enumerate(rows) if row[0]]
        if failed:
            where = {q: IN_MAKING if rows[q][3] == MAKING else IN_STEP for q in failed}
            self.fail(failure, failed, where)
        made = [q for q, row in enumerate(rows) if row[3] == MAKING]
        if made and len(made) < self.world:
            others = [q for q in range(self.world) if q not in made]
            raise ValueError(
                f"ranks {made} of {self.world} made a RiemannianPreconditioner where ranks "
                f"{others} ran a step or rc.direction: making one with a process_group is a "
                "collective, every rank of the group makes its own at the same point"
            )
        if making and len({row[2] for row in rows}) > 1:
            raise ValueError(
                "the ranks made their RiemannianPreconditioner with different choices ("
                f"{_differing(self.texts(choices, 'choices'))}): every rank of the group "
                "must make its own with the same method, options, GradScaler (enabled on "
                "every rank or none) and model (DistributedDataParallel on every rank or none)"
            )
        if len({row[3] for row in rows}) > 1:
            raise ValueError(
                f"the ranks' .grad hold the gradients of different numbers of forward passes "
                f"since the last step ({[row[3] for row in rows]}): every rank must run as "
                "many micro-batches, each split between the ranks alike, before pre.step()"
            )
        if len({row[2] for row in rows}) > 1:
            low = (1 << PARAMETER_BITS) - 1
            if not making and len({row[2] & low for row in rows}) == 1:  # (every rank alike)
                self.other_parameters(listing or [])
            # each rank's shapes travel only now, every rank here alike (one table): the
            # agreement's fixed int64 slots hold no shapes of any number of passes and
            # dimensions, and a step that agrees pays nothing for them
            shapes = self.texts(_per_sample(passes), "shapes of the samples")
            # (a text cut at MESSAGE_BYTES may hide where it differs: none named then)
            whole = all(len(shape.encode()) < MESSAGE_BYTES for shape in shapes)
            if whole and len(set(shapes)) > 1:
                ranks: dict[str, list[int]] = {}
                for q, shape in enumerate(shapes):
                    ranks.setdefault(shape, []).append(q)
                named = "; ".join(
                    f"{shape} on rank{'s' * (len(qs) > 1)} {', '.join(map(str, qs))}"
                    for shape, qs in ranks.items()
                )
                raise ValueError(
                    "the ranks' samples differ in shape (a sample's part of each forward "
                    f"pass's output, or of rc.direction's targets: {named}): every rank must "
                    "run on samples of one shape (e.g. sequences padded to one length)"
                )
            raise ValueError(
                "the ranks see different blocks or options (other modules called, modules "
                "of another type or with other settings, samples of other shapes, "
                "parameters of another dtype, modules in another training mode, another "
                "method, damping, output metric or solve option, or a .grad set to None on "
                "some ranks only): every rank must run the same network, in the "
                "same mode, on samples of one shape, with the same options and the same "
                "parameters holding a .grad"
            )
        if params:
            sums = table[:, 4:].cpu().contiguous().view(torch.float64)
            # the rounding of a float64 sum of n products in any order (other hardware)
            # stays below 2 n eps of the sum of their magnitudes
            n = sum(p.numel() for p in params + constants)
            tolerance = 2 * n * torch.finfo(torch.float64).eps * float(sums[:, 1].max())
            if not (sums - sums[0]).abs().max() <= tolerance:  # (NaN: not alike)
                raise ValueError(
                    "the ranks hold different parameters or buffers (weighted sums of their "
                    "entries, frozen parameters and the buffers of modules in evaluation mode "
                    "or that the forward pass left alone included, and under "
                    "DistributedDataParallel the .grad it averaged: "
                    f"{[f'{s:.12g}' for s in sums[:, 0].tolist()]}): every rank must start "
                    "from the same weights (seed the model's initialisation alike, or "
                    "broadcast rank 0's state, as DistributedDataParallel does when it "
                    "wraps the model) and take the same steps; a .grad that differs means "
                    "DistributedDataParallel's reduction did not complete (a trainable "
                    "parameter the forward pass did not use: pass "
                    "find_unused_parameters=True) or a .grad changed on some ranks since"
                )
        return [row[1] for row in rows]

    def other_parameters(self, listing: list[tuple[str, tuple[str, ...]]]) -> None:
        """Refuse, on every rank alike, ranks whose blocks agree but for their parameters'
        names, shapes or order (``listing``, :func:`_parameters`: the same blocks on every
        rank, which the rest of the signature signs), naming each rank's parameters of the
        first few blocks that differ: two all-reduces, run only where they differ (each
        block's CRC-32, then those blocks' parameters as text)."""
        table = torch.zeros(self.world, len(listing), dtype=torch.int64)
        if listing:
            table[self.rank] = torch.tensor([zlib.crc32(repr(ps).encode()) for _, ps in listing])
        columns = self.all_reduce(table, "signatures of the blocks' parameters").T.tolist()
        differ = [i for i, column in enumerate(columns) if len(set(column)) > 1]
        if not differ:  # (a CRC-32 that collided: named as the blocks that differ)
            return
        shown = differ[:PARAMETERS_NAMED]
        texts = self.texts("\n".join(", ".join(listing[i][1]) for i in shown), "parameters")
        lines = [text.split("\n") for text in texts]
        whole = all(
            len(text.encode()) < MESSAGE_BYTES and len(ls) == len(shown)
            for text, ls in zip(texts, lines, strict=True)
        )
        named = []
        for k, i in enumerate(shown):
            if whole:
                ranks: dict[str, list[int]] = {}
                for q, ls in enumerate(lines):
                    ranks.setdefault(f"[{ls[k]}]", []).append(q)
                entries = list(ranks.items())
            else:  # (cut short: this rank's own, the others' told apart by their CRC-32)
                alike = [q for q in range(self.world) if columns[i][q] == columns[i][self.rank]]
                others = [q for q in range(self.world) if q not in alike]
                entries = [(f"[{', '.join(listing[i][1])}]", alike), ("others", others)]
            named.append(
                f"{named_module(listing[i][0])}: "
                + "; ".join(
                    f"{value} on rank{'s' * (len(qs) > 1)} {', '.join(map(str, qs))}"
                    for value, qs in entries
                )
            )
        left = len(differ) - len(shown)
        more = f"; and {left} more module{'s' * (left > 1)}" if left else ""
        raise ValueError(
            "the ranks' modules hold parameters of other names or shapes, or the same in "
            f"another order ({'; '.join(named)}{more}): the ranks would sum one parameter's "
            "gradient with another's and write each direction to another parameter. Every "
            "rank must build the same network, each module registering the same parameters "
            "in the same order (not, e.g., in the order of a set, or one that depends on "
            "the rank: loading the weights by name, load_state_dict, does not change that "
            "order). .grad is left as it was on every rank"
        )

    def texts(self, own: str, what: str) -> list[str]:
        """Every rank's text in rank order, this rank's being ``own``, each cut to its
        first :data:`MESSAGE_BYTES` bytes of UTF-8: one all-reduce. A character UTF-8
        cannot encode (a lone surrogate, which a parameter's name may hold) is sent as its
        escape, ``\\ud800`` (found by review: the rank holding it raised UnicodeEncodeError
        before the all-reduce, and the others' all-reduce was answered by its next
        collective, or timed out)."""
        table = torch.zeros(self.world, MESSAGE_BYTES, dtype=torch.uint8)
        encoded = own.encode(errors="backslashreplace")[:MESSAGE_BYTES]
        if encoded:
            table[self.rank, : len(encoded)] = torch.frombuffer(
                bytearray(encoded), dtype=torch.uint8
            )
        table = self.all_reduce(table, what)
        return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in table]

    def fail(self, failure: BaseException | None, failed: list[int], where: dict[int, str]) -> None:
        """Every rank knows that the ``failed`` ranks raised (each in what ``where`` names:
        a step, or the making of its preconditioner): they share their messages, the failed
        ranks raise their own error, the others a :class:`DistributedError`.
        Where every failed rank's error is a :class:`DirectionOverflow` (beside a
        GradScaler, the scaler's to skip), the others raise
        :class:`DirectionOverflowElsewhere`, so that all skip alike; where another error
        came too, an owner's overflow is raised as a :class:`DistributedError` naming it,
        so that all raise alike (found by review: one rank skipped, one raised)."""
        own = "" if failure is None else f"{type(failure).__name__}: {failure}"
        with _own_interrupt(failure):
            texts = self.texts(own, "error messages")
        messages = {r: texts[r] for r in failed}
        overflows = all(m.startswith(f"{DirectionOverflow.__name__}:") for m in messages.values())
        if failure is not None and (overflows or not isinstance(failure, DirectionOverflow)):
            raise failure
        first = next(r for r in failed if r != self.rank and not (
            messages[r].startswith(f"{DirectionOverflow.__name__}:") and not overflows
        ))  # fmt: skip
        others = [r for r in failed if r != first]
        also = f" (and ranks {others})" if others else ""
        error = DirectionOverflowElsewhere if overflows else DistributedError
        raise error(
            f"rank {first}{also} of {self.world} failed in {where[first]}: {messages[first]}. "
            "Every rank raises; .grad is left as it was on every rank"
        ) from failure


@contextlib.contextmanager
def _own_interrupt(failure: BaseException | None):
    """Around a meeting that carries this rank's ``failure``: where the others never come
    (busy elsewhere, or gone), a ``KeyboardInterrupt``, ``SystemExit`` or other exception
    that is not an :class:`Exception` is raised as itself, not as the
    :class:`DistributedError` of the meeting that failed (found by review: a Ctrl-C on a
    rank whose peers never met it came out as a DistributedError after the timeout, past
    a caller's ``except KeyboardInterrupt``)."""
    try:
        yield
    except DistributedError as stalled:
        if failure is not None and not isinstance(failure, Exception):
            raise failure from stalled
        raise


def _per_sample(passes: tuple[tuple[int, ...], ...]) -> str:
    """The shape of a sample in each pass, as the agreement's refusal names it: ``(4, 3)``
    for one pass, ``[(4, 3), (2, 3)]`` for several, a run of passes alike once with their
    count: ``[(4, 3) x255, (2, 3)]`` (found by review: 256 passes of (1000, 3) outran
    :data:`MESSAGE_BYTES`, and ranks that differed in the last were named as alike)."""
    shapes = [tuple(shape[1:]) for shape in passes]
    if len(shapes) == 1:
        return str(shapes[0])
    runs = [(shape, len(list(alike))) for shape, alike in itertools.groupby(shapes)]
    return "[" + ", ".join(f"{shape}{f' x{n}' * (n > 1)}" for shape, n in runs) + "]"


# ------------------------------------------------------------------- a block's share


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``flat`` cut into tensors shaped like ``like``."""
    pieces = flat.split([t.numel() for t in like])
    return [c.view(t.shape) for c, t in zip(pieces, like, strict=True)]


@dataclass
class _Share:
    """What this rank contributes to one block, before weighting: ``rows``, per-sample
    pieces (``N_p x k``) each with the power of ``w_p`` that rescales it to the global
    batch; ``summed``, tensors weighted by ``w_p`` and summed over the ranks; and for
    ``kfac`` the block's Kronecker kernel and its parts (:func:`kfac.parts_of`)."""

    rows: list[tuple[Tensor, float]]
    summed: list[Tensor]
    kronecker: PatchHandler | None = None
    parts: list[kfac.Part] = field(default_factory=list)

    @property
    def widths(self) -> list[int]:
        return [t.shape[1] for t, _ in self.rows]

    @property
    def layout(self) -> tuple[int, int]:
        """Numbers per sample, and summed numbers."""
        return sum(self.widths), sum(t.numel() for t in self.summed)

    def numel(self, samples: int) -> int:
        """Numbers this share packs for ``samples`` samples."""
        width, summed = self.layout
        return samples * width + summed

    def pack(self, out: Tensor, weight: float) -> None:
        """Write the rows (sample-major) and the summed part, weighted, into ``out``."""
        width, _ = self.layout
        samples = self.rows[0][0].shape[0] if self.rows else 0
        rows, start = out[: samples * width].view(samples, width), 0
        for t, power in self.rows:
            torch.mul(t, weight**power, out=rows[:, start : start + t.shape[1]])
            start += t.shape[1]
        offset = samples * width
        for t in self.summed:
            torch.mul(t.reshape(-1), weight, out=out[offset : offset + t.numel()])
            offset += t.numel()


@dataclass
class _Received:
    """One block on its owner: every rank's rows (``N x width``, in rank order) and the
    summed tensors, shaped like the share's."""

    rows: Tensor | None
    summed: list[Tensor]

    def pieces(self, share: _Share) -> list[Tensor]:
        return list(self.rows.split(share.widths, 1))


def _share(problem: Problem, i: int, method: str, opts: Options, global_gradient: bool) -> _Share:
    """What block ``i``'s owner needs from this rank (module docstring, step 3)."""
    # every rank's gradient is summed unless DistributedDataParallel averaged it already
    sum_gradient = not (problem.given and global_gradient)

    def gradient() -> list[Tensor]:
        return list(problem.gradient_of(i)) if sum_gradient else []

    if method == "euclidean":
        return _Share([], gradient())
    h = problem.handlers[i]
    if method == "kfac":  # Gamma = D^T D, and A = R^T R where a part has an input factor
        kh = kronecker_handler(h)
        parts = kfac.parts_of(kh, opts.kfac_bias)
        D, R = kh.kronecker_rows(ones=kh.with_bias and len(parts) == 1)
        factors = [D.T @ D] + ([R.T @ R] if any(not p.bias_only for p in parts) else [])
        return _Share([], [*factors, *gradient()], kh, parts)
    N_p = h.N
    if not isinstance(h, PatchHandler):  # a materialised kernel: K's rows, sample-major
        K = h.K().view(h.r, N_p, -1).transpose(0, 1).reshape(N_p, -1)
        return _Share([(K, 0.5)], gradient())
    rows = [
        (h.delta.transpose(0, 1).reshape(N_p, -1), 0.5),
        (h.block.input.to(h.dtype).reshape(N_p, -1), 0),
    ]
    if problem.given:
        return _Share(rows, gradient())
    # Lambda: the owner forms the gradient from it, as the single process does
    return _Share(rows + [(h.block.output_grad.to(h.dtype).reshape(N_p, -1), 1)], [])


def _owner_handler(h: Handler, got: _Received, share: _Share, given: bool) -> Handler:
    """The block's kernel on the global batch from the ranks' rows, in ``h``'s dtype."""
    pieces = [p.to(h.dtype) for p in got.pieces(share)]
    N = pieces[0].shape[0]
    if not isinstance(h, PatchHandler):
        K = pieces[0].reshape(N, h.r, -1).transpose(0, 1).reshape(h.r * N, -1)
        gradient = None if given else [g.to(h.dtype) for g in got.summed]
        return _Materialised(h.block, K, h.r, gradient)
    out_shape, in_shape = h.delta.shape[2:], h.block.input.shape[1:]
    b = h.block
    block = Block(
        name=b.name,
        module=b.module,
        param_names=b.param_names,
        params=b.params,
        inputs=(pieces[1].reshape((N,) + in_shape),),
        output=None,
        delta=pieces[0].reshape((N, h.r) + out_shape).transpose(0, 1).contiguous(),
        output_grad=None if given else pieces[2].reshape((N,) + out_shape),
    )
    return type(h)(block)


class _Materialised(Handler):
    """A block's kernel from ``K`` itself (``d x n_a``, rows probe-major), gathered over
    the ranks, with the global gradient when the owner cannot form it from ``K``."""

    def __init__(self, block: Block, K: Tensor, r: int, gradient: list[Tensor] | None):
        self.block = block
        self._K = K
        self.r, self.N, self.d = r, K.shape[0] // r, K.shape[0]
        self._gradient = gradient

    @property
    def dtype(self) -> torch.dtype:
        return self._K.dtype

    @property
    def device(self) -> torch.device:
        return self._K.device

    def to(self, dtype: torch.dtype) -> Handler:
        gradient = None if self._gradient is None else [g.to(dtype) for g in self._gradient]
        return _Materialised(self.block, self._K.to(dtype), self.r, gradient)

    def compress_rows(self) -> None:
        """The rows arrive compressed where the method allows it."""

    def gradient(self) -> list[Tensor]:
        return self._gradient

    def gradient_from_output(self, lam: Tensor) -> list[Tensor]:
        raise TypeError("a gathered kernel has no block output; use gradient()")

    def K(self) -> Tensor:
        return self._K

    def K_mv(self, v: list[Tensor]) -> Tensor:
        return self._K @ _flat(v)

    def K_tmv(self, t: Tensor) -> list[Tensor]:
        return _unflat(self._K.T @ t, self.block.params)


def _kronecker_solves(problem: Problem, factors: list[list[Tensor]], opts: Options):
    """K-FAC's solve of each block of ``problem`` from the global batch's summed dense
    factors ``[Gamma, A]`` (``[Gamma]`` where no part has an input factor)."""
    modules = []
    for h, (gamma, *A) in zip(problem.handlers, factors, strict=True):
        name = h.block.name
        gamma = Factor(matrix=gamma, what=f"K-FAC output factor Gamma of {named_module(name)}")
        A = [Factor(matrix=a, what=f"K-FAC input factor A of {named_module(name)}") for a in A]
        parts = kfac.parts_of(h, opts.kfac_bias)
        modules.append((parts, gamma, {p.name: A[0] for p in parts if not p.bias_only}))
    blocks = kfac.damped_modules(modules, opts)  # those of one order together, as kfac.solve
    return [
        kfac.fresh_solve(h, i, problem.gradient_of(i), opts, (gamma, inputs), b)
        for i, (h, (_, gamma, inputs), b) in enumerate(
            zip(problem.handlers, modules, blocks, strict=True)
        )
    ]


def _samples(problem: Problem) -> int:
    """The shard's batch size."""
    if problem.handlers:
        return problem.handlers[0].N
    block = problem.blocks[0]
    return (block.calls[0] if block.calls else block).output.shape[0]


#: The options every rank's solve must share (a rank's diagnostics, probe and generator
#: are its own); a custom output metric by its name.
SHARED_OPTIONS = (
    "damping", "loss", "output_metric", "samples", "kernel", "solve_dtype", "refine",
    "kfac_damping", "kfac_bias",
)  # fmt: skip


def buffer_versions(model: nn.Module | None) -> dict[int, tuple[Tensor, int]]:
    """Each floating buffer of ``model``'s modules in training mode and its version, by
    ``id``: taken before the forward pass, they tell :func:`model_state` which of those
    buffers the pass left alone (held, so that a buffer the pass replaced by a new tensor
    cannot pass for it at a reused ``id``)."""
    if model is None:
        return {}
    return {
        id(b): (b, b._version)
        for m in model.modules()
        if training(m)
        for b in m._buffers.values()
        if b is not None and b.is_floating_point()
    }


def model_state(
    model: nn.Module | None,
    before: dict[int, tuple[Tensor, int]] | None = None,
    found: dict[int, Tensor] | None = None,
) -> tuple[list[Tensor], tuple[tuple, ...]]:
    """What every rank's copy of ``model`` must hold alike beyond the blocks' parameters:
    its frozen parameters and the floating buffers of its modules in evaluation mode
    (running statistics, which a module in training mode updates from its own shard), and
    of those in training mode the buffers the forward pass left alone (``before``:
    :func:`buffer_versions` then; a constant scale or mask set apart on one rank was
    accepted, found by a hunt: 0.58 off the single process), and
    every module's type, settings (``extra_repr``: a dropout's ``p``, a slope, a
    BatchNorm's ``eps``; not where it prints a tensor, a buffer's values: an observer's
    ``min_val``, updated from its own shard, refused every step, found by review) and
    training flag. Found by review: a frozen layer scaled on one rank, or BatchNorm statistics that
    differed, were accepted (0.68 and 2.7 relative error against the single process), as
    was dropout left in training mode on one rank only; found by a hunt: Tanh on one rank
    and ReLU on the other (0.8, K-FAC 1.65).

    ``found``: ``{id(buffer): its value}`` where the forward pass whose metric is taken
    found another value than the buffer holds now (:meth:`BufferStart.as_found`: a
    preconditioner's recorded pass updated it from its own shard); such buffers, and the
    settings that print them, are compared as that pass found them, under
    DistributedDataParallel rank 0's on every rank (found by a hunt: a running normaliser
    and an observer, their values as each rank's pass left them, were refused at every
    step)."""
    if model is None:
        return [], ()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before, found = before or {}, found or {}
    buffers = [
        found.get(id(b), b)
        for m in model.modules()
        for b in m._buffers.values()
        if b is not None
        and b.is_floating_point()
        and (not training(m) or _left_alone(b, before.get(id(b))))
    ]
    settings = [_settings(m, found) for m in model.modules()]
    modules = tuple(
        (type(m).__qualname__, "" if "tensor(" in s else s, training(m))
        for m, s in zip(model.modules(), settings, strict=True)
    )
    return frozen + buffers, modules


def _settings(module: nn.Module, found: dict[int, Tensor]) -> str:
    """``module.extra_repr()``, with its buffers in ``found`` as found there."""
    own = {n: b for n, b in module._buffers.items() if b is not None and id(b) in found}
    for name, b in own.items():
        module._buffers[name] = found[id(b)]
    try:
        return module.extra_repr()
    finally:
        for name, b in own.items():
            module._buffers[name] = b


def _left_alone(buffer: Tensor, before: tuple[Tensor, int] | None) -> bool:
    return before is not None and before[0] is buffer and before[1] == buffer._version


def _parameters(problem: Problem) -> list[tuple[str, tuple[str, ...]]]:
    """Each block's name and its parameters' names and shapes, in the block's order (the
    order in which every rank packs, and writes, the block's parameters)."""
    return [
        (
            b.name,
            tuple(
                f"{n} ({'x'.join(map(str, p.shape))})"
                for n, p in zip(b.param_names, b.params, strict=True)
            ),
        )
        for b in problem.blocks
    ]


#: The bits of a signature (:func:`_signature`) above the rest's CRC-32: its parameters'.
PARAMETER_BITS = 32


def _signature(
    problem: Problem,
    shares: list[_Share],
    method: str,
    opts: Options,
    absent: tuple[str, ...],
    modules: tuple[tuple, ...] = (),
    parameters: list[tuple[str, tuple[str, ...]]] | None = None,
) -> int:
    """A checksum of the blocks, what each rank sends for them, the options of the solve,
    the parameters without a ``.grad`` and the ``modules`` (:func:`model_state`; equal on
    every rank that runs the same network on samples of one shape with the same options:
    an owner solves with its own, and every rank writes the directions of the same
    parameters): their CRC-32 in the low 32 bits, and above it 31 bits of the CRC-32 of
    each block's ``parameters`` (:func:`_parameters`), so that ranks whose blocks differ
    only in their parameters' names, shapes or order are told apart in the one agreement
    (found by review: a module whose two parameters of one shape were registered in the
    other order on one rank was accepted where they held equal values, zero-initialised:
    the ranks summed one's gradient with the other's, 2.5-2.7 off the single process,
    and wrote each direction to another parameter per rank; with unequal values it was
    refused as weights that differ, though each rank's were the same by name)."""
    blocks = [(b.name, b.n_params, [str(p.dtype) for p in b.params]) for b in problem.blocks]
    kinds = [type(h).__name__ for h in problem.handlers]
    layouts = [s.layout for s in shares]
    options = [_shown(getattr(opts, k)) for k in SHARED_OPTIONS]
    signed = (method, problem.given, blocks, kinds, layouts, options, sorted(absent), modules)
    parameters = _parameters(problem) if parameters is None else parameters
    named = zlib.crc32(repr(parameters).encode()) & 0x7FFFFFFF  # (an int64 stays positive)
    return zlib.crc32(repr(signed).encode()) | named << PARAMETER_BITS


#: Entries of a parameter :func:`_checksum` converts to float64 at a time.
CHECKSUM_CHUNK = 2**20


def _fractions(n: int, step: float, device=None) -> Tensor:
    """``1 + frac(i step)`` for ``i < n`` in float64: weights in ``[1, 2)`` that differ
    from index to index (exact elementwise arithmetic: alike on every device)."""
    return 1 + torch.frac(torch.arange(n, dtype=torch.float64, device=device) * step)


@functools.cache
def _position_weights(device: torch.device) -> Tensor:
    return _fractions(CHECKSUM_CHUNK, (5**0.5 - 1) / 2, device)


_PHI = (1 + 5**0.5) / 2


def _chunks(params: list[Tensor]) -> int:
    return sum(-(-p.numel() // CHECKSUM_CHUNK) for p in params)


def _checksum(params: list[Tensor], first_chunk: int = 0, finite: bool = False) -> Tensor:
    """``[sum_i w_i p_i, sum_i w_i |p_i|]`` over the entries of ``params`` in order, in
    float64, cut in chunks of :data:`CHECKSUM_CHUNK` (the float64 copies stay small beside
    the parameters), numbered from ``first_chunk``; ``w_i`` is a weight of the position in
    the chunk times one of the chunk (:func:`_fractions`, steps the fractions of the golden
    ratio and of sqrt 2), so that two swapped entries change the first sum. ``finite``:
    NaN and inf entries (a -inf mask) count as markers, which the sums keep finite."""
    last = first_chunk + _chunks(params)
    scales = _fractions(last, 2**0.5 - 1)[first_chunk:].tolist()
    sums: dict[torch.device, Tensor] = {}
    k = 0
    for p in params:
        flat = p.detach().reshape(-1)
        for start in range(0, flat.numel(), CHECKSUM_CHUNK):
            piece = flat[start : start + CHECKSUM_CHUNK].double()
            if finite:
                # (markers no buffer holds by chance: inf and 1.0 were taken alike)
                piece = torch.nan_to_num(piece, nan=_PHI, posinf=math.e, neginf=-math.pi)
            weight = _position_weights(piece.device)[: piece.numel()]
            acc = sums.setdefault(piece.device, piece.new_zeros(2))
            acc[0] += scales[k] * torch.dot(weight, piece)
            acc[1] += scales[k] * torch.dot(weight, piece.abs())
            k += 1
    return sum((acc.cpu() for acc in sums.values()), torch.zeros(2, dtype=torch.float64))


#: Checksums of the constants of the last few models (:func:`_constant_sums`): each with
#: weak references to its tensors, their versions and addresses, a sample of their
#: entries, and the first chunk.
_CONSTANT_SUMS: list[tuple[tuple, tuple, Tensor, int, Tensor]] = []


def _constant_sums(constants: list[Tensor], first_chunk: int) -> Tensor:
    """:func:`_checksum` of ``constants`` (:func:`model_state`), kept while every one is the
    same tensor, at the same version and address, with the same :func:`_sample` of its
    entries (found by review: summing a frozen 2048 x 2048 layer at every step made a
    data-parallel step 2-3x slower). The tensors are held weakly and compared by identity
    (keyed by id and address, a buffer replaced by a new tensor where a freed one lay read
    the old sums: identical ranks refused 15-30 steps in 40), and sampled: ``p.data = t``
    keeps the tensor and its version, and the allocator often gives ``t`` the address of
    the last one (stale sums at 34-37 steps of 40). A write into a tensor through
    ``.data`` that misses every sampled entry is not summed again."""
    if any(t.is_inference() for t in constants):  # no version counter to keep them by
        return _checksum(constants, first_chunk, finite=True)
    versions = tuple((t._version, t.data_ptr()) for t in constants)
    sample = _sample(constants)
    for refs, kept_versions, kept_sample, kept_first, sums in _CONSTANT_SUMS:
        if (
            kept_first == first_chunk
            and kept_versions == versions
            and len(refs) == len(constants)
            and all(r() is t for r, t in zip(refs, constants, strict=True))
            and torch.equal(kept_sample, sample)
        ):
            return sums
    sums = _checksum(constants, first_chunk, finite=True)
    _CONSTANT_SUMS[:] = _CONSTANT_SUMS[-7:] + [
        (tuple(weakref.ref(t) for t in constants), versions, sample, first_chunk, sums)
    ]
    return sums


#: Entries of each constant :func:`_sample` reads, evenly spaced.
SAMPLED_ENTRIES = 64


def _sample(constants: list[Tensor]) -> Tensor:
    """:data:`SAMPLED_ENTRIES` evenly spaced entries of each of ``constants``, on the host in
    float64, NaN as a marker (one transfer per device)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in constants:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_ENTRIES)
        by_device.setdefault(flat.device, []).append(flat[::step][:SAMPLED_ENTRIES].double())
    pieces = [torch.cat(p).cpu() for p in by_device.values()]
    return torch.nan_to_num(torch.cat(pieces), nan=_PHI) if pieces else torch.zeros(0)


def _common(dtypes) -> torch.dtype:
    """The dtype every one of ``dtypes`` converts to exactly."""
    dtypes = list(dtypes)
    common = dtypes[0]
    for dtype in dtypes[1:]:
        common = torch.promote_types(common, dtype)
    return common


def _param_dtype(problem: Problem) -> torch.dtype:
    return _common(p.dtype for b in problem.blocks for p in b.params)


# ------------------------------------------------------------------------- the plan


def _block_cost(method: str, opts: Options, h: Handler, share: _Share, N: int) -> float:
    """Modelled FLOPs of a block's solve on the global batch of ``N`` samples."""
    if method == "kfac":
        kh = share.kronecker
        variant = dict(kfac_damping=opts.kfac_damping, kfac_bias=opts.kfac_bias)
        f_in, f_out = kh.P, kh.f_out
        return costs.block_solve_flops("kfac", f_in, f_out, N, kh.r, kh.with_bias, None, **variant)
    if isinstance(h, LinearHandler) and h.factored_gradient:  # device None: ranks plan alike
        return costs.block_solve_flops("layerwise", h.P, h.f_out, N, h.r, h.with_bias, None)
    return costs.generic_block_solve_flops(h.block.n_params, h.r * N)


def plan(
    problem: Problem, shares: list[_Share], method: str, opts: Options, N: int, world: int
) -> list[int]:
    """The owner of each block: the greedy plan over :func:`_block_cost` for
    ``layerwise`` and ``kfac``, rank 0 for every other method."""
    if method not in costs.BLOCKWISE:
        return [0] * len(problem.blocks)
    work = [
        _block_cost(method, opts, h, s, N) for h, s in zip(problem.handlers, shares, strict=True)
    ]
    return assign(work, world)


# ------------------------------------------------------------------------- the step


def solve(
    build: Callable[[], Problem],
    method: str,
    opts: Options,
    checks: Deferred,
    group,
    *,
    timeout: float,
    global_gradient: bool = False,
    absent: tuple[str, ...] = (),
    passes: tuple[tuple[int, ...], ...] = (),
    model: nn.Module | None = None,
    found: dict[int, Tensor] | None = None,
) -> tuple[dict[str, Tensor], list[LayerDiagnostics]]:
    """The direction of the global batch on every rank of ``group`` (module docstring).

    ``build()`` makes this rank's problem on its shard (``checks`` holds the caller's
    checks still to be read). ``global_gradient``: a given gradient is already the
    global batch's on every rank (DistributedDataParallel averaged it); ``absent``: the
    parameters without a ``.grad`` here (the same on every rank, or every rank raises);
    ``passes``: the output shape of each forward pass whose gradients the given gradient
    sums, its samples first (a preconditioner's; every rank must have split them alike,
    :func:`riemann_core.passes.check_shares`, with samples of the same shape);
    ``model``: the network, whose state beyond the blocks must agree too
    (:func:`model_state`, with its buffers as ``found``). Returns
    ``({name: direction}, diagnostics)``: every block parameter's direction, in the
    parameter's dtype, and the diagnostics of the blocks this rank solved.
    """
    observer = getattr(_LOCAL, "observer", None) or Observer()
    net = _Group(group, timeout)
    alone = net.world == 1  # the shard is the global batch: the single-process solve
    versions = buffer_versions(model)
    with observer.phase("local"):
        failure, problem, shares = _local(build, method, opts, checks, global_gradient, alone)
    with observer.phase("agree"):
        # whatever raises on this rank before the agreement (a KeyboardInterrupt, an
        # allocation that failed) is carried by it (found by a hunt: the others waited out
        # the timeout at the agreement, or at the all-to-all, then blamed the process group)
        signature, params, constants, samples, outgoing = 0, None, None, 0, None
        listing = None
        try:
            constants, modules = model_state(model, versions, found)
            shapes = tuple(shape[1:] for shape in passes)  # (rows per sample, e.g. tokens)
            if problem is not None:
                listing = _parameters(problem)
                signature = _signature(
                    problem, shares, method, opts, absent, (*modules, shapes), listing
                )
                params = [p for b in problem.blocks for p in b.params]
                if global_gradient and problem.given:  # DDP's average: alike everywhere
                    # (found by a hunt: a parameter forward left unused held DDP's reduction
                    # back, and each rank's own .grad was taken for the average, 0.87 off)
                    params += [
                        g for i in range(len(problem.blocks)) for g in problem.gradient_of(i)
                    ]
                # the shard's samples: the output's first dimension where the caller knows
                # it (found by a hunt: euclidean read the first block's output, whose first
                # dimension need not be the batch, a Linear on (T, N, f) or a position
                # embedding of (T, E), and every rank weighted its gradient 1 / P: 0.96-1.8
                # off on shards of 3 and 1)
                samples = passes[-1][0] if passes else _samples(problem)
                if not alone:  # what this rank sends: its size is this rank's own
                    outgoing = _outgoing(problem, shares, samples)
        except BaseException as err:
            failure = failure or err
        if failure is not None:
            signature, params, constants = 0, None, None
        sizes = net.agree(failure, samples, signature, params, constants, passes, listing=listing)
        N = sum(sizes)
        if len(passes) > 1:  # micro-batches: each rank's share of each, on every rank
            table = torch.zeros(net.world, len(passes), dtype=torch.int64)
            table[net.rank] = torch.tensor([shape[0] for shape in passes])
            check_shares(net.all_reduce(table, "micro-batch sizes").tolist(), global_gradient)
        if global_gradient and problem.given and len(set(sizes)) > 1:  # on every rank
            raise ValueError(
                f"DistributedDataParallel averaged the ranks' gradients with equal weights, "
                f"but the shards hold {sizes} samples, and the global batch's mean loss "
                "weights shard p by N_p / N: give every rank as many samples (e.g. "
                "DistributedSampler(..., drop_last=True)), or pass the model itself, not "
                "wrapped, and the preconditioner combines the shards' gradients by weight"
            )
        owners = (
            [0] * len(problem.blocks)
            if alone
            else plan(problem, shares, method, opts, N, net.world)
        )
        net.traffic.owners = tuple(owners)
    with observer.phase("exchange"):
        arrived = None if alone else _exchange(net, shares, method, owners, sizes, outgoing)
        outgoing = None  # (not held through the solve: found by review, 26% more live bytes)
    if method == "euclidean":  # the direction is the global gradient
        if alone:
            directions = problem.gradient
        else:
            received = _received(shares, method, owners, sizes, net.rank, arrived)
            directions = [got.summed or problem.gradient_of(i) for i, got in enumerate(received)]
        observer.traffic(net.traffic)
        return _by_name(problem, range(len(problem.blocks)), directions), []
    mine = [i for i, owner in enumerate(owners) if owner == net.rank]
    with observer.phase("solve"):
        failure, solved, diagnostics = None, [], []
        try:  # any error, a KeyboardInterrupt too, meets the others at the broadcast
            if mine:
                if alone:
                    owned, factors = problem, None
                else:
                    received = _received(shares, method, owners, sizes, net.rank, arrived)
                    arrived = None  # (received holds what the solve needs of it)
                    owned, factors = _owned(problem, shares, method, mine, received, N)
                with named_when_too_large(owned, method):
                    solves = (
                        _kronecker_solves(owned, factors, opts)
                        if method == "kfac" and not alone
                        else SOLVERS[method].solve(owned, opts)
                    )
                    solved, diagnostics = finish(owned, solves, opts, Deferred(), method)
        except BaseException as err:
            failure = err
    with observer.phase("broadcast"):
        directions = _broadcast(net, problem, owners, solved, failure)
    observer.traffic(net.traffic)
    return directions, diagnostics


def _local(build, method: str, opts: Options, checks: Deferred, global_gradient: bool, alone):
    """This rank's problem and shares (none when ``alone``), or the error that stopped
    them."""
    try:
        problem = build()
        if method == "layerwise" and not alone:
            for h in problem.handlers:
                h.compress_rows()  # fewer rows to send; the owner's QR then has nothing to do
        blocks = [] if alone else range(len(problem.blocks))
        shares = [_share(problem, i, method, opts, global_gradient) for i in blocks]
        for h in problem.handlers:
            for ok, explain in h.deferred_checks():
                checks.require(ok, explain)
        checks.run()
    except BaseException as err:  # (a KeyboardInterrupt in the model's code too: shared)
        return err, None, None
    return None, problem, shares


def _outgoing(problem: Problem, shares, samples: int) -> Tensor:
    """The buffer for what this rank sends in the exchange, its shares of ``samples``
    samples: made before the agreement, so that an allocation that fails meets the
    others there."""
    dtype = _common([_param_dtype(problem)] + [h.dtype for h in problem.handlers])
    device = problem.blocks[0].params[0].device
    return torch.empty(sum(s.numel(samples) for s in shares), dtype=dtype, device=device)


def _order(shares, owners, samples: int) -> tuple[list[int], list[int]]:
    """This rank's shares in the order of their owners, and the length of each."""
    order = sorted(range(len(shares)), key=lambda i: owners[i])
    return order, [shares[i].numel(samples) for i in order]


def _exchange(net: _Group, shares, method, owners, sizes, buffer: Tensor) -> list[Tensor]:
    """This rank's shares, weighted, packed into ``buffer`` (:func:`_outgoing`) and sent
    to their owners: what each rank sent here, or for ``kfac`` and ``euclidean`` the sum
    over the ranks (:func:`_received` takes it apart)."""
    weight = sizes[net.rank] / sum(sizes)
    order, lengths = _order(shares, owners, sizes[net.rank])
    for i, part in zip(order, buffer.split(lengths), strict=True):
        shares[i].pack(part, weight)
    if method in ("kfac", "euclidean"):
        return [net.all_reduce(buffer, "all-reduce of factors and gradients")]
    mine = [i for i in order if owners[i] == net.rank]
    send = [sum(n for i, n in zip(order, lengths) if owners[i] == q) for q in range(net.world)]
    receive = [sum(shares[i].numel(n) for i in mine) for n in sizes]
    return net.all_to_all(buffer, send, receive, "all-to-all of rows to owners")


def _received(shares, method, owners, sizes, rank: int, arrived) -> list[_Received | None]:
    """Per block, what its owner received (``None`` for the others' blocks); for
    ``kfac`` and ``euclidean``, every block's summed tensors. Run by an owner in its
    solve, so that an error here meets the others at the broadcast."""
    order, lengths = _order(shares, owners, sizes[rank])
    if method in ("kfac", "euclidean"):
        parts = dict(zip(order, arrived[0].split(lengths), strict=True))
        return [_Received(None, _unflat(parts[i], s.summed)) for i, s in enumerate(shares)]
    mine = [i for i in order if owners[i] == rank]
    expected = [[shares[i].numel(n) for i in mine] for n in sizes]
    received: list[_Received | None] = [None] * len(shares)
    per_block = zip(*[b.split(e) for b, e in zip(arrived, expected, strict=True)])
    for i, per_rank in zip(mine, per_block, strict=True):
        width = shares[i].layout[0]
        rows = [p[: n * width].view(n, width) for p, n in zip(per_rank, sizes, strict=True)]
        summed = sum(p[n * width :] for p, n in zip(per_rank, sizes, strict=True))
        received[i] = _Received(torch.cat(rows), _unflat(summed, shares[i].summed))
    return received


def _owned(
    problem: Problem, shares, method: str, mine: list[int], received, N: int
) -> tuple[Problem, list[list[Tensor]]]:
    """The problem of this rank's blocks on the global batch of ``N`` samples, and for
    ``kfac`` each block's summed factors."""
    handlers, summed, factors = [], [], []
    for i in mine:
        h, share, got = problem.handlers[i], shares[i], received[i]
        parts = [t.to(h.dtype) for t in got.summed]
        if method == "kfac":
            kh = copy.copy(share.kronecker)  # the factors are the global batch's
            kh.N, kh.d = N, kh.r * N
            handlers.append(kh)
            n_factors = 1 + any(not p.bias_only for p in share.parts)
            factors.append(parts[:n_factors])
            parts = parts[n_factors:]
        else:
            handlers.append(_owner_handler(h, got, share, problem.given))
        summed.append(parts)
    blocks = [problem.blocks[i] for i in mine]
    if method != "kfac" and not problem.given:  # the gradient from Lambda, as on one rank
        return Problem(blocks, handlers, data_dtype=problem.data_dtype), factors
    # the ranks' weighted gradients, or the given one DistributedDataParallel averaged
    gradient = [parts or problem.gradient_of(i) for i, parts in zip(mine, summed, strict=True)]
    return Problem(blocks, handlers, gradient, problem.data_dtype), factors


def _broadcast(net: _Group, problem: Problem, owners, solved, failure) -> dict[str, Tensor]:
    """Every block's direction from its owner; a failed owner makes every rank raise."""
    dtype = _param_dtype(problem)
    device = problem.blocks[0].params[0].device
    blocks = [[i for i, o in enumerate(owners) if o == q] for q in range(net.world)]
    sizes = [sum(problem.blocks[i].n_params for i in ids) for ids in blocks]
    buffers = [torch.empty(1 + n, dtype=dtype, device=device) for n in sizes]
    own = buffers[net.rank]  # status, then this rank's directions
    try:  # (an error here, a KeyboardInterrupt too, is this rank's status)
        if failure is None and sizes[net.rank]:
            torch.cat([x.reshape(-1).to(dtype) for xs in solved for x in xs], out=own[1:])
    except BaseException as err:
        failure = err
    if failure is not None:
        own[1:].zero_()
    own[:1].fill_(float(failure is not None))
    buffers = net.broadcast_all(buffers, "broadcast of directions")
    statuses = torch.stack([b[0] for b in buffers]).tolist()  # one host sync
    failed = [q for q, status in enumerate(statuses) if status]
    if failed:  # (found by a hunt: named as failed "in h", a letter of this text)
        net.fail(failure, failed, dict.fromkeys(failed, "the solve of its blocks"))
    order = [i for ids in blocks for i in ids]
    flat = torch.cat([b[1:] for b in buffers]).split([problem.blocks[i].n_params for i in order])
    directions = [_unflat(x, problem.blocks[i].params) for i, x in zip(order, flat, strict=True)]
    return _by_name(problem, order, directions)


def _by_name(problem: Problem, blocks, directions) -> dict[str, Tensor]:
    """``{parameter name: direction}`` in each parameter's dtype."""
    return {
        name: x.to(p.dtype)
        for i, xs in zip(blocks, directions, strict=True)
        for name, p, x in zip(
            problem.blocks[i].param_names, problem.blocks[i].params, xs, strict=True
        )
    }
