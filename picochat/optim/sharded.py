"""Sharded training state for the AdamW + Muon pair across torch.distributed ranks.

Unsharded, every rank keeps the whole fp32 optimiser state, runs Newton-Schulz on every
matrix and all-reduces a second copy of every gradient. Here, in a world of W > 1, each rank
keeps 1/W of the optimiser state and each gradient is reduced straight to the rank(s) that
own it (ZeRO-2's reduce-scatter); full gradients still live through the backward, since
micro-batches accumulate into them, and all but the owned part are freed before the step:

- AdamW parameters (wte, lm_head) are cut into W equal flat slices starting at multiples of
  SLICE_ALIGN elements (the last ones shorter, or empty); rank r keeps AdamW state for slice r
  of each and updates only that slice.
- Muon matrices stay whole, because Newton-Schulz needs the whole matrix. Largest first,
  each goes to the rank with the fewest matrix elements so far; only that owner keeps its
  state (the momentum buffer, and NorMuon's second moment) and orthogonalises it.

One step:
1. While the step's last micro-batch runs backward, a post-accumulate-grad hook on every
   parameter starts its reduction as soon as its gradient is final (reduce-scatter for an
   AdamW parameter, reduce to the owner for a matrix), so communication overlaps the rest
   of the backward. Every rank starts them in one fixed order, as collectives require: a
   hook that fires early waits for the ones before it. Earlier micro-batches accumulate
   locally. (A model compiled whole has one backward node whose end makes every gradient
   final at once, so there the reductions start together, after the backward.)
2. `ShardedGradients.wait()`, before the step: starts whatever is left (a parameter with no
   gradient counts as zero), waits, divides the sums by W, keeps the gradient this rank owns
   and frees the rest.
3. Each optimiser updates what this rank owns; then the parameters are made whole again by
   an all-gather of the AdamW slices and a broadcast of each matrix from its owner.

Each rank runs the unsharded optimisers' own kernels on its part, so the updates equal the
unsharded ones up to the order in which a collective sums across ranks. `--grad-reduce-dtype
bf16` halves the reduction traffic (the sum is then rounded to bf16), and a rank drops an fp32
gradient it does not own as soon as its bf16 copy is on the way. In a world of 1,
`shard_optimizers` returns the optimisers untouched: no hooks, no collectives.

Checkpoints: `state_dict()` is collective and returns, on rank 0, the full state in exactly the
format of the unsharded torch optimiser, gathered one tensor at a time into host memory;
`load_state_dict()` takes such a full state and keeps this rank's part. So a checkpoint does not
depend on the world size that wrote it: saved at 8 ranks, it loads at 4, or at 1 into the plain
optimisers. Chosen over per-rank shard files plus a layout file because it keeps one checkpoint
format and needs no reassembly code; the price is that rank 0 holds the whole optimiser state
in host memory while it saves (8.6 GB at d32) and every rank reads the whole file on resume.

Why not FSDP2 (`torch.distributed.fsdp.fully_shard`, which does run on gloo): it shards every
matrix by rows, so Muon would need one more all-gather of each gradient before Newton-Schulz;
it turns parameters into DTensors that checkpoints, evals and the inference engine would all
have to unwrap; and it also shards the parameters (ZeRO-3), which costs an all-gather per
micro-batch in forward and again in backward, for memory the presets do not need (see
docs/LOG.md for the per-GPU arithmetic).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from picochat.errors import ConfigError, DataError
from picochat.optim.muon import Muon, muon_state_shape

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# Slices start at a multiple of this many elements. torch's CPU kernels run a vector body (with fused
# multiply-adds) over whole multiples of the vector width from a tensor's first element and a scalar loop
# over the rest; slices aligned past any vector width (16 fp32 lanes x 2 on AVX-512) round every element
# as the whole tensor does, so on 2 ranks the sharded update is bit-identical to the all-reduced one.
SLICE_ALIGN = 64


def slice_chunk(numel: int, world: int) -> int:
    """Elements per rank's slice: ceil(numel / world), rounded up to a multiple of SLICE_ALIGN."""
    return -(-numel // (world * SLICE_ALIGN)) * SLICE_ALIGN


def slice_bounds(numel: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s slice when `numel` elements are cut into `world` slices of slice_chunk elements."""
    chunk = slice_chunk(numel, world)
    return min(rank * chunk, numel), min((rank + 1) * chunk, numel)


def assign_owners(numels: list[int], world: int) -> list[int]:
    """Owner rank of each matrix: largest first, each to the rank with the fewest elements so far."""
    load, owners = [0] * world, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += numels[i]
    return owners


class _Shard:
    """What ShardedAdamW and ShardedMuon share: the parameters of the optimiser they wrap, its groups
    and state (`inner`: the optimiser that updates what this rank owns), and the reduction check."""

    def __init__(self, optimizer: torch.optim.Optimizer, world: int, rank: int,
                 reduce_dtype: torch.dtype) -> None:
        self.world, self.rank, self.reduce_dtype = world, rank, reduce_dtype
        self.params: list[nn.Parameter] = [p for g in optimizer.param_groups for p in g["params"]]
        self.inner = optimizer
        self.gradients: ShardedGradients | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def _check_grad_reduced(self) -> None:
        if self.gradients is None or not self.gradients.reduced:
            raise RuntimeError("call ShardedGradients.wait() after the last backward and before the "
                               "optimiser step")


class ShardedAdamW(_Shard):
    """torch AdamW over this rank's flat slice of each parameter (views into the real parameters)."""

    def __init__(self, full: torch.optim.AdamW, world: int, rank: int, reduce_dtype: torch.dtype) -> None:
        super().__init__(full, world, rank, reduce_dtype)
        self.chunks = [slice_chunk(p.numel(), world) for p in self.params]
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError(f"ShardedAdamW needs contiguous parameters, got strides {p.stride()}")
        # Each slice is a view that shares storage with its parameter: updating it updates p.
        groups = [{**g, "params": [p.detach().view(-1)[slice(*slice_bounds(p.numel(), world, rank))]
                                   for p in g["params"]]} for g in full.param_groups]
        self.slices: list[torch.Tensor] = [v for g in groups for v in g["params"]]
        self.inner = torch.optim.AdamW(groups, fused=full.defaults.get("fused"))

    def start_reduce(self, i: int) -> tuple:
        """Launch the reduce-scatter of parameter i's gradient; returns what finish_reduce needs."""
        p, chunk = self.params[i], self.chunks[i]
        flat = p.grad.reshape(-1)
        if flat.dtype != self.reduce_dtype or flat.numel() != chunk * self.world:
            padded = flat.new_zeros(chunk * self.world, dtype=self.reduce_dtype)
            padded[: flat.numel()].copy_(flat)
            flat = padded
            p.grad = None  # the copy is sent; the result lands in `out`
        out = flat.new_empty(chunk)
        return dist.reduce_scatter_single(out, flat, op=dist.ReduceOp.SUM, async_op=True), out, flat

    def finish_reduce(self, i: int, pending: tuple) -> None:
        work, out, _ = pending
        work.wait()
        own = self.slices[i]
        own.grad = out[: own.numel()].to(own.dtype).div_(self.world)  # SUM then divide: gloo has no AVG
        self.params[i].grad = None  # the full gradient is no longer needed on this rank

    def owned_grads(self) -> list[torch.Tensor]:
        return [s.grad for s in self.slices if s.grad is not None]

    @torch.no_grad()
    def step(self) -> None:
        self._check_grad_reduced()
        for p, own in zip(self.params, self.slices):
            if own.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                raise RuntimeError("a parameter's storage was replaced after the optimisers were built (e.g. by "
                                   "model.to()); ShardedAdamW's slices no longer point into it")
        self.inner.step()
        for s in self.slices:
            s.grad = None
        pending = []
        for p, own, chunk in zip(self.params, self.slices, self.chunks):
            full = p.detach().view(-1)
            send = F.pad(own, (0, chunk - own.numel()))  # this rank's slice, zero-padded to the chunk
            out = full if full.numel() == chunk * self.world else full.new_empty(chunk * self.world)
            pending.append((dist.all_gather_single(out, send, async_op=True), out, full, send))
        for work, out, full, _ in pending:
            work.wait()
            if out is not full:
                full.copy_(out[: full.numel()])

    def state_dict(self) -> dict | None:
        """Collective. The full AdamW state (unsharded format) on rank 0, None on the other ranks."""
        local = self.inner.state_dict()
        full_state: dict[int, dict] = {}
        for i, (p, chunk) in enumerate(zip(self.params, self.chunks)):
            entry = {}
            for key, value in sorted(local["state"].get(i, {}).items()):
                if torch.is_tensor(value) and value.ndim > 0:  # sliced like the parameter
                    out = value.new_empty(chunk * self.world)
                    dist.all_gather_single(out, F.pad(value, (0, chunk - value.numel())))
                    value = out[: p.numel()].view(p.shape)
                entry[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
            if entry:
                full_state[i] = entry
        return {"state": full_state, "param_groups": local["param_groups"]} if self.rank == 0 else None

    def load_state_dict(self, full: dict) -> None:
        """Keep this rank's slice of a full (unsharded-format) AdamW state."""
        state = {}
        for i, entry in full["state"].items():
            p = self.params[i]
            lo, hi = slice_bounds(p.numel(), self.world, self.rank)
            mine = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.ndim > 0:
                    if value.shape != p.shape:
                        raise DataError(f"optimiser state {key!r} of AdamW parameter {i} has shape "
                                        f"{tuple(value.shape)}, the model's is {tuple(p.shape)}; "
                                        "the checkpoint is from another model")
                    value = value.reshape(-1)[lo:hi].clone()
                mine[key] = value
            state[i] = mine
        self.inner.load_state_dict({"state": state, "param_groups": full["param_groups"]})


class ShardedMuon(_Shard):
    """Muon where each rank owns whole matrices: it alone keeps their momentum and orthogonalises them."""

    def __init__(self, muon: Muon, world: int, rank: int, reduce_dtype: torch.dtype) -> None:
        super().__init__(muon, world, rank, reduce_dtype)
        self.owners = assign_owners([p.numel() for p in self.params], world)

    def start_reduce(self, i: int) -> tuple:
        """Launch the reduction of matrix i's gradient onto its owner."""
        p = self.params[i]
        buf = p.grad if p.grad.dtype == self.reduce_dtype else p.grad.to(self.reduce_dtype)
        if buf is not p.grad and self.owners[i] != self.rank:
            p.grad = None  # a non-owner only sends: the copy is all it needs
        return dist.reduce(buf, dst=self.owners[i], op=dist.ReduceOp.SUM, async_op=True), buf

    def finish_reduce(self, i: int, pending: tuple) -> None:
        work, buf = pending
        work.wait()
        p = self.params[i]
        if self.owners[i] != self.rank:
            p.grad = None  # Muon.step skips a matrix without a gradient: only owners update
            return
        if buf is not p.grad:
            p.grad.copy_(buf)
        p.grad.div_(self.world)

    def owned_grads(self) -> list[torch.Tensor]:
        return [p.grad for p, o in zip(self.params, self.owners) if o == self.rank and p.grad is not None]

    @torch.no_grad()
    def step(self) -> None:
        self._check_grad_reduced()
        self.inner.step()
        works = [dist.broadcast(p.detach(), src=o, async_op=True) for p, o in zip(self.params, self.owners)]
        for work in works:
            work.wait()

    def state_dict(self) -> dict | None:
        """Collective. The full Muon state (unsharded format) on rank 0, None on the other ranks."""
        local = self.inner.state_dict()
        # Only owners know what their matrices' state holds: share its description first (a tensor as a
        # meta tensor: its shape and dtype, no data).
        mine = {i: {k: v.to("meta") if torch.is_tensor(v) else v for k, v in s.items()}
                for i, s in local["state"].items()}
        described: list[Any] = [None] * self.world
        dist.all_gather_object(described, mine)
        full_state: dict[int, dict] = {}
        for i, owner in enumerate(self.owners):
            entry = {}
            for key, desc in sorted(described[owner].get(i, {}).items()):
                if torch.is_tensor(desc):
                    value = (local["state"][i][key] if owner == self.rank
                             else torch.empty(desc.shape, dtype=desc.dtype, device=self.params[i].device))
                    dist.broadcast(value, src=owner)
                    desc = value.detach().cpu().clone()
                entry[key] = desc
            if entry:
                full_state[i] = entry
        return {"state": full_state, "param_groups": local["param_groups"]} if self.rank == 0 else None

    def load_state_dict(self, full: dict) -> None:
        """Keep the state of the matrices this rank owns from a full (unsharded-format) Muon state."""
        for i, entry in full["state"].items():
            for key, value in entry.items():
                expected = muon_state_shape(key, tuple(self.params[i].shape))
                if torch.is_tensor(value) and tuple(value.shape) != expected:
                    raise DataError(f"optimiser state {key!r} of Muon matrix {i} has shape {tuple(value.shape)}, "
                                    f"this model's is {expected}; the checkpoint is from another model")
        state = {i: entry for i, entry in full["state"].items() if self.owners[i] == self.rank}
        self.inner.load_state_dict({"state": state, "param_groups": full["param_groups"]})


class ShardedGradients:
    """Reduces every gradient to the rank(s) that own it, overlapping with the step's last backward."""

    def __init__(self, model: nn.Module, shards: list[ShardedAdamW | ShardedMuon]) -> None:
        where = {id(p): (shard, i) for shard in shards for i, p in enumerate(shard.params)}
        params = [p for p in model.parameters() if p.requires_grad]
        untrained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in where]
        if untrained or len(where) != len(params):
            raise RuntimeError(f"the optimisers must cover exactly the model's parameters (not covered: {untrained})")
        # Launch order: the reverse of definition order, roughly the order backward finishes them.
        ordered = list(reversed(params))
        self._order = [where[id(p)] for p in ordered]
        self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, k))
                       for k, p in enumerate(ordered)]
        self.shards, self.reduced, self._armed = shards, False, False
        self._reset()

    def _reset(self) -> None:
        self._ready = [False] * len(self._order)
        self._pending: list[tuple | None] = [None] * len(self._order)
        self.started = 0  # reductions launched this step, in order

    def arm(self) -> None:
        """The next backward is the step's last: start each reduction as soon as its gradient is final."""
        self._armed = True

    def _on_grad(self, k: int, _param: torch.Tensor) -> None:
        self.reduced = False  # a backward is accumulating: the next step needs a new reduction
        if not self._armed:
            return
        self._ready[k] = True
        while self.started < len(self._order) and self._ready[self.started]:
            self._start_next()

    def _start_next(self) -> None:
        shard, i = self._order[self.started]
        p = shard.params[i]
        if p.grad is None:  # no gradient on this rank: it counts as zero
            p.grad = torch.zeros_like(p)
        self._pending[self.started] = shard.start_reduce(i)
        self.started += 1

    @torch.no_grad()
    def wait(self) -> None:
        """Finish every reduction: afterwards each rank holds the averaged gradient of what it owns."""
        while self.started < len(self._order):
            self._start_next()
        for (shard, i), pending in zip(self._order, self._pending):
            shard.finish_reduce(i, pending)
        self._armed = False
        self._reset()
        self.reduced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the owned gradients so that the global gradient norm is at most max_norm; returns the norm."""
        grads = [g for shard in self.shards for g in shard.owned_grads()]
        squares = torch.zeros((), dtype=torch.float32, device=self.shards[0].params[0].device)
        for g in grads:
            squares += g.float().pow(2).sum()
        dist.all_reduce(squares)
        norm = squares.sqrt()
        if grads:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()


class LocalGradients:
    """A world of 1: the accumulated gradients are already the step's; nothing to reduce."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def arm(self) -> None:
        """Nothing to arm: no reduction is started during the backward."""

    def wait(self) -> None:
        """Nothing to wait for: no reduction was started."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)


def shard_optimizers(model: nn.Module, optimizers: list, rank: int, world_size: int,
                     reduce_dtype: str = "fp32") -> tuple[ShardedGradients | LocalGradients, list]:
    """(gradients, optimizers) for the loop: sharded in a world > 1, the given ones unchanged in a world of 1.

    The loop calls `gradients.arm()` before the last micro-batch's backward, `gradients.wait()`
    after it, then steps the optimisers.
    """
    if reduce_dtype not in REDUCE_DTYPES:
        raise ConfigError(f"--grad-reduce-dtype {reduce_dtype!r} is unknown; choose one of {', '.join(REDUCE_DTYPES)}")
    if world_size == 1:
        return LocalGradients(model), optimizers
    dtype = REDUCE_DTYPES[reduce_dtype]
    shards: list[ShardedAdamW | ShardedMuon] = []
    for opt in optimizers:
        if not isinstance(opt, (Muon, torch.optim.AdamW)):
            raise TypeError(f"cannot shard a {type(opt).__name__}; only torch AdamW and Muon")
        shards.append((ShardedMuon if isinstance(opt, Muon) else ShardedAdamW)(opt, world_size, rank, dtype))
    gradients = ShardedGradients(model, shards)
    for shard in shards:
        shard.gradients = gradients
    return gradients, shards
