"""The DiT rank layout and its process groups.

One torch.distributed world per DiT replica, ``world = cfg × ring × ulysses × tp``, ranks laid out
in one documented order (tensor parallel innermost, where traffic is heaviest)::

    rank = ((cfg_rank * ring + ring_rank) * ulysses + ulysses_rank) * tp + tp_rank

Worked example, ulysses 2 × cfg 2 (world 4): cfg groups {0,2} {1,3}; ulysses groups {0,1} {2,3};
sp groups = ulysses groups; ranks 0,1 compute the positive branch, 2,3 the negative one.
The sequence-parallel index inside an sp group is ``ring_rank * ulysses + ulysses_rank``, so the
members of one Ulysses group hold neighbouring sequence shards.

Every group is a ``Group``: rank-in-group, size, and the collectives we use, all no-ops at size 1.
Groups are built once per worker (``build_groups``) and passed in; there are no globals.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field


class ParallelConfig(BaseModel):
    """DiT parallel degrees (names as in the DiT serving field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ulysses_degree: int = Field(1, ge=1, description="Ulysses sequence parallel: heads <-> sequence all-to-all.")
    ring_degree: int = Field(1, ge=1, description="Ring attention: K/V blocks passed around a ring.")
    cfg_parallel_size: int = Field(1, ge=1, le=2, description="2: positive and negative CFG branches on two rank sets.")
    tensor_parallel_size: int = Field(1, ge=1, description="Shard attention and MLP linears across ranks.")

    @property
    def world_size(self) -> int:
        return self.cfg_parallel_size * self.ring_degree * self.ulysses_degree * self.tensor_parallel_size

    @property
    def sp_degree(self) -> int:
        return self.ring_degree * self.ulysses_degree

    def describe(self) -> str:
        parts = [
            f"{name} {value}"
            for name, value in (
                ("ulysses", self.ulysses_degree),
                ("ring", self.ring_degree),
                ("cfg", self.cfg_parallel_size),
                ("tp", self.tensor_parallel_size),
            )
            if value > 1
        ]
        return " × ".join(parts) or "single rank"


@dataclasses.dataclass
class Group:
    """One process group seen from one rank.

    Attributes:
        ranks: global ranks of the members, in group order.
        rank: this process's index in ``ranks``.
        pg: the torch process group (``None`` at size 1).
    """

    ranks: tuple[int, ...]
    rank: int
    pg: dist.ProcessGroup | None
    sent: int = 0  # bytes this rank has handed to collectives of this group (benchmarks)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next_rank(self) -> int:
        """Global rank of the next member on the ring."""
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            self.sent += tensor.numel() * tensor.element_size()
            dist.all_reduce(tensor, op=op, group=self.pg)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Equal-shaped tensors of every member, in group order."""
        if self.size == 1:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        self.sent += tensor.numel() * tensor.element_size()
        dist.all_gather(out, tensor.contiguous(), group=self.pg)
        return out

    def all_gather_uneven(self, tensor: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate along ``dim`` the members' shards of (known) sizes ``sizes``."""
        if self.size == 1:
            return tensor
        longest = max(sizes)
        pad = list(tensor.shape)
        pad[dim] = longest - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim) if pad[dim] else tensor
        parts = self.all_gather(padded)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)

    def all_to_all(self, send: Sequence[torch.Tensor], recv_shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Send ``send[j]`` to member j; return what member j sent here (of shape ``recv_shapes[j]``).

        Shapes may differ per member (uneven sequence shards): the chunks travel flattened in one
        ``all_to_all_single`` with split sizes.
        """
        if self.size == 1:
            return [send[0]]
        ref = send[0]
        flat = torch.cat([t.reshape(-1) for t in send])
        recv_numel = [int(torch.Size(s).numel()) for s in recv_shapes]
        out = torch.empty(sum(recv_numel), dtype=ref.dtype, device=ref.device)
        self.sent += (flat.numel() - send[self.rank].numel()) * flat.element_size()  # own chunk stays
        dist.all_to_all_single(out, flat, recv_numel, [t.numel() for t in send], group=self.pg)
        return [piece.view(tuple(shape)) for piece, shape in zip(out.split(recv_numel), recv_shapes)]

    def send_recv(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Pass ``send`` to the next member and fill ``recv`` from the previous one (ring step)."""
        self.sent += send.numel() * send.element_size()
        ops = [
            dist.P2POp(dist.isend, send.contiguous(), self.next_rank, self.pg),
            dist.P2POp(dist.irecv, recv, self.prev_rank, self.pg),
        ]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    def exchange(self, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor]) -> None:
        """Point-to-point with chosen members (by index in the group), no wrap-around: send
        ``send[j]`` to member j and fill ``recv[j]`` from member j, all in one batch (a halo
        exchange between neighbours)."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.ranks[j], self.pg) for j, t in send.items()]
        ops += [dist.P2POp(dist.irecv, t, self.ranks[j], self.pg) for j, t in recv.items()]
        if not ops:
            return
        self.sent += sum(t.numel() * t.element_size() for t in send.values())
        for request in dist.batch_isend_irecv(ops):
            request.wait()


@dataclasses.dataclass
class ParallelGroups:
    """All groups of one rank, built from one ``ParallelConfig``."""

    config: ParallelConfig
    world_rank: int
    tp: Group
    ulysses: Group
    ring: Group
    sp: Group
    cfg: Group
    branch: Group  # the ranks computing one CFG branch together (sp × tp): cache decisions reduce here

    @property
    def sp_rank(self) -> int:
        return self.sp.rank

    def bytes_sent(self) -> int:
        """Bytes this rank has handed to collectives so far (the sp group is the ulysses and ring
        groups' union, so it is not counted twice)."""
        return sum(g.sent for g in (self.tp, self.ulysses, self.ring, self.sp, self.cfg, self.branch) if g.size > 1)

    @classmethod
    def single(cls) -> ParallelGroups:
        one = Group((0,), 0, None)
        return cls(ParallelConfig(), 0, one, one, one, one, one, one)


def layout(config: ParallelConfig) -> dict[str, list[tuple[int, ...]]]:
    """Every group of the layout as lists of global ranks (pure: no torch.distributed needed)."""
    c, r, u, t = config.cfg_parallel_size, config.ring_degree, config.ulysses_degree, config.tensor_parallel_size

    def rank(ci: int, ri: int, ui: int, ti: int) -> int:
        return ((ci * r + ri) * u + ui) * t + ti

    def groups(vary: str) -> list[tuple[int, ...]]:
        dims = {"c": range(c), "r": range(r), "u": range(u), "t": range(t)}
        fixed = [d for d in "crut" if d not in vary]
        out = []
        for values in itertools.product(*(dims[d] for d in fixed)):
            base = dict(zip(fixed, values))
            members = []
            for varying in itertools.product(*(dims[d] for d in vary)):
                idx = {**base, **dict(zip(vary, varying))}
                members.append(rank(idx["c"], idx["r"], idx["u"], idx["t"]))
            out.append(tuple(members))
        return out

    # "ru": ring-major, ulysses-minor: the sp index is ring_rank * ulysses + ulysses_rank.
    return {"tp": groups("t"), "ulysses": groups("u"), "ring": groups("r"), "sp": groups("ru"), "cfg": groups("c"),
            "branch": groups("rut")}


def checked_world_size(expected: int, name: str, layout: str) -> int:
    """The torch.distributed world size (1 without one), refused unless it is ``expected``."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != expected:
        raise ValueError(f"the {name} world has {world} ranks but {layout} needs {expected}")
    return world


def build_groups(config: ParallelConfig) -> ParallelGroups:
    """Create this rank's groups; every rank must call it (``new_group`` is collective)."""
    world = checked_world_size(config.world_size, "DiT", config.describe())
    if world == 1:
        return ParallelGroups.single()
    me = dist.get_rank()
    mine: dict[str, Group] = {}
    for name, all_groups in layout(config).items():
        for ranks in all_groups:
            # new_group is collective: called for every group, in the same order, on every rank.
            pg = dist.new_group(list(ranks)) if len(ranks) > 1 else None
            if me in ranks:
                mine[name] = Group(ranks, ranks.index(me), pg)
    return ParallelGroups(config, me, **mine)
