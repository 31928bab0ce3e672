"""One shard of a knowledge table: the rows of one id range and everything done to them.

A `Shard` implements `interface.ShardHandle`. The gRPC server wraps one; the
in-process `Table` calls it directly. This module holds the versions a shard
serves and its API: each call validates (`validation`), takes the state of the
version asked for, and runs the job's module on it: `search`, `step` (gradients,
barrier, optimizer; `balancing` within it), `appends`; `state` initialises, loads and
saves a version.

Concurrency. The data of one version is a `ShardState` with its own lock; every
read and write of that version holds it, so a reader never sees half an
optimizer step. The shard holds one serving state and, during a hot swap, a
prepared one and retiring ones. `_vlock` guards that table of versions and
the in-flight count per state; `release_version` makes a retiring state
unreachable, then waits until it has no request in flight.

Versions. A state's version is its label (`labels`): the published version it was loaded
from or last published as (the table relabels it after a snapshot's publish,
`relabel_version`), or an unpublished label given before a swap reloads its number; a
fresh shard serves version 0. A request names the version it expects (0 = whatever is
serving) and is answered by the serving, a retiring or a prepared state of that label,
else it gets StaleVersion; a shard never loads a number it holds. Gradients accumulated
on a state that is flipped away before its end_step are dropped with it: swap between steps.

Leases (`leases`). A read of several pieces pins its version (`lease_version`); a
release keeps a leased state alive, reachable only through its leases, until they
are released or expire (at most one such retired state, bounded waits, revocation). A
request naming a lease is answered by the state it pins, under the label asked, or not at all.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Mapping, Sequence

import torch

from . import errors, kernels, labels, persistence, search, snapshots
from . import validation as check
from .appends import append_rows
from .host_rows import gather_rows
from .row_requests import check_k, fetched_rows, readout_rows, record_readout_usage
from .leases import VersionLeases
from .config import TableConfig
from .limits import Limits
from .interface import SearchResult, ShardDescription, ShardInfo, SideQuery, TagFilter, UsageStats
from .optimizer import OptimizerConfig, RowOptimizer
from .state import ShardState, init_state, load_state, state_attrs, state_tensors, state_to_data
from .step import BarrierTimeout, barrier, check_finite_rows, replace_optimizer

__all__ = ["Shard", "BarrierTimeout"]

class Shard:
    """Owns global rows [row_start, row_end) of a table. Implements ShardHandle."""

    def __init__(self, config: TableConfig, shard_id: int = 0, row_range: tuple[int, int] | None = None):
        """A fresh shard with the config's initialisation. row_range defaults to
        the config's partition (config.shard_ranges()[shard_id])."""
        lo, hi = row_range if row_range is not None else config.shard_ranges()[shard_id]
        self._start(shard_id, init_state(config, shard_id, lo, hi))

    @classmethod
    def load(cls, store_root: str, version: int, shard_id: int, device: str | None = None,
             pin_memory: bool | None = None) -> "Shard":
        """A shard serving its subgroup of a published version (on `device`, default the
        one it was published from; pin_memory: host rows page-locked, default as published)."""
        self = cls.__new__(cls)
        self._start(shard_id, load_state(store_root, version, shard_id, device, pin_memory))
        self.store_root = str(store_root)
        return self

    def _start(self, shard_id: int, serving: ShardState) -> None:
        self.shard_id = shard_id
        self.store_root: str | None = None   # where it was loaded from (a server confines admin paths there)
        self.limits = Limits()               # the bounds of store_service/limits.py (a server sets its own)
        self._vlock = threading.Lock()
        self._vcond = threading.Condition(self._vlock)
        self._serving = serving
        # where this shard serves from; a swap of a GPU shard stages the new version on the
        # host (None: when home is a GPU), so the GPU never holds two full copies
        self._home = serving.device
        # host rows stay page-locked (or not) across swaps, whatever the version was published with
        self._home_pinned = bool(serving.config.pin_memory)
        self.stage_swaps_on_host: bool | None = None
        self._staged: dict[int, torch.device] = {}   # id(state) -> device it settles on
        self._pending: dict[int, ShardState] = {}
        self._retiring: list[ShardState] = []
        self.leases = VersionLeases(self._vcond, on_drop=self._settle)

    @property
    def device(self) -> torch.device:
        """Where the serving version's rows live (a hot swap keeps the device)."""
        return self._serving.device

    # -- versions and in-flight accounting ----------------------------------

    @contextlib.contextmanager
    def _use(self, version: int, lease: str = ""):
        check.integer("version", version, 0)
        with self._vlock:
            st = self._resolve(version, lease)
            st.inflight += 1
        try:
            yield st
        finally:
            with self._vlock:
                st.inflight -= 1
                self._vcond.notify_all()

    def _resolve(self, version: int, lease: str = "") -> ShardState:
        if lease:   # the pinned state itself: its number may name another state by now (labels)
            leased = self.leases.find(version, lease)
            if leased is None:   # the read starts again with a new lease (the client's retry)
                raise errors.StaleVersion(version, self._serving.version,
                                          f"the read's lease lapsed (it lives {self.leases.policy.ttl_s:g} s "
                                          f"from its grant) or its version was relabelled")
            return leased
        if version == 0 or version == self._serving.version:
            return self._serving
        for st in reversed(self._retiring):
            if st.version == version:
                return st
        if version in self._pending:
            return self._pending[version]
        raise errors.StaleVersion(version, self._serving.version)

    def lease_version(self, version: int = 0, *, holder: str = "", ttl_s: float = 30.0) -> tuple[str, int]:
        """Pin `version` (0: the serving one) for a read of several pieces -> (lease, version).
        Name the lease in each piece (`fetch(..., lease=)`) and release it at the end."""
        check.integer("version", version, 0)
        with self._vlock:
            st = self._resolve(version)
            return self.leases.grant(st, holder, ttl_s).id, st.version

    def release_lease(self, lease: str) -> None:
        with self._vlock:
            dropped = self.leases.release(lease)
        if dropped:
            self._settle()

    def drop_leases(self, holder: str) -> None:
        """Every lease of `holder` (a caller that went away)."""
        with self._vlock:
            dropped = self.leases.drop_holder(holder)
        if dropped:
            self._settle()

    def prepare_version(self, store_root: str, version: int) -> None:
        check.integer("version", version, 1, labels.UNPUBLISHED)
        with self._vlock:
            labels.check_not_held([self._serving, *self._retiring], version, self.shard_id)
        stage = self.stage_swaps_on_host
        if stage is None:
            stage = self._home.type == "cuda"
        if stage:
            st = load_state(store_root, version, self.shard_id, "cpu", pin_memory=False)
        else:
            st = load_state(store_root, version, self.shard_id, str(self._home), self._home_pinned)
        with self._vlock:   # again: a relabel or swap may have run while it loaded
            labels.check_not_held([self._serving, *self._retiring], version, self.shard_id)
            self._pending[version] = st
            if stage:
                self._staged[id(st)] = self._home

    def flip_version(self, version: int) -> None:
        with self._vlock:
            if version not in self._pending:
                raise errors.NotFound(f"version {version} is not prepared on shard {self.shard_id}")
            self._retiring.append(self._serving)
            self._serving = self._pending.pop(version)

    def release_version(self, version: int, timeout_s: float = 60.0) -> None:
        """Drop retiring (and prepared, never flipped) states of `version` once no
        request is in flight on them. Never touches the serving state; a version
        the shard does not hold is a no-op."""
        with self._vcond:
            unflipped = self._pending.pop(version, None)
            if unflipped is not None:
                self._staged.pop(id(unflipped), None)
                self.leases.forget(unflipped)
            del unflipped
            # Unreachable from now on (new requests for it get StaleVersion), so
            # steady traffic from stale clients cannot hold the drain open.
            going = [s for s in self._retiring if s.version == version]
            self._retiring = [s for s in self._retiring if s.version != version]
            # Leased ones stay (retired, reached only through their leases; within the bound):
            # the rest is drained and dropped.
            self.leases.retire(going)
            gone = {id(s) for s in going}   # none of them serves again
            self._staged = {k: d for k, d in self._staged.items() if k not in gone}
            going = [s for s in going if not any(s is r for r in self.leases.retired)]
            drained = self._vcond.wait_for(lambda: all(s.inflight == 0 for s in going), timeout_s)
            if drained:
                for s in going:
                    s.drop_data()   # freed now, even while a finished request's frame still holds s
            del going
            if not drained:
                raise errors.FailedPrecondition(f"version {version}: requests still in flight after "
                                                f"{timeout_s}s; dropped anyway")
        self._settle()

    def relabel_version(self, version: int, new_version: int) -> int:
        """The states held under label `version` take `new_version` (`labels.relabel`) -> how
        many. Requests naming `version` get StaleVersion from then on (their table refreshes)."""
        check.integer("version", version, 0)
        check.integer("new_version", new_version, 1)
        with self._vlock:
            return labels.relabel(self._serving, [*self._retiring, *self.leases.retired],
                                  self._pending.values(), version, new_version, self.shard_id)

    def _settle(self) -> None:
        """Move a serving version staged on the host to its device, once no older version is
        held (so the device never holds both). Requests wait on the state's lock meanwhile:
        none fails, and every answer still comes from this one version."""
        with self._vlock:
            st = self._serving
            target = self._staged.get(id(st))
            if target is None or self._retiring or self.leases.retired:
                return
        with st.lock:
            if self._staged.get(id(st)) is not target:
                return
            self._move(st, target)
            with self._vlock:
                self._staged.pop(id(st), None)

    @staticmethod
    def _move(st: ShardState, device: torch.device) -> None:
        st.move_to(device)

    # -- describe ------------------------------------------------------------

    def describe(self) -> ShardDescription:
        with self._use(0) as st, st.lock:
            return ShardDescription(
                info=ShardInfo(self.shard_id, st.row_start, st.row_end, st.version, st.step,
                               tag_rows=st.tag_rows(), partition_rows=st.partition_rows()),
                d_k=st.config.d_k, d_v=st.config.d_v, value_dtype=st.config.value_dtype,
                segments=st.segments)

    def health(self) -> bool:
        return True

    def memory(self) -> dict:
        """Where the serving version's rows live and the bytes it holds (`ShardState.memory`):
        device, pinned, rows, value_bytes, key_bytes, optimizer, optimizer_bytes,
        optimizer_over_values."""
        with self._use(0) as st, st.lock:
            return st.memory()

    # -- data plane ----------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int, *, tags: Sequence[str] = (), where: TagFilter | None = None,
               side: SideQuery | None = None, want_keys: bool = False, version: int = 0) -> SearchResult:
        """queries [B, d_k] fp32 -> top-k over the partition-0 rows whose keys this shard
        holds, padded with PAD_ID / -inf where it holds fewer than k selectable rows, with
        the rows' `tags`, only rows passing `where`; with `side`, the side query's best rows
        (`SearchResult.side`, padded likewise); with want_keys the rows' keys (else None).
        k above the table's row count is an error."""
        tags = check.tag_names(tags)
        where, side = check.tag_filter(where), check.side_query(side)
        with self._use(version) as st, st.lock:
            check.tensor("queries", queries, torch.float32, (None, st.config.d_k))
            check_k(st, k)
            if side is not None:
                check_k(st, side.k, "side.k")
            q = queries.to(st.device)
            res = search.top_k(st, q, k, tags, where, want_keys)
            if side is not None:
                res.side = search.side_k(st, q, side, tags, where)
            return res

    def fetch(self, ids: torch.Tensor, *, hits: torch.Tensor | None = None,
              weight_sum: torch.Tensor | None = None, version: int = 0, lease: str = "") -> torch.Tensor:
        """ids [M] int64 (owned or PAD) -> values [M, d_v] in the value dtype (0 at PAD).
        hits [M] int64 >= 0 and weight_sum [M] float64, both or neither: a fetch-mode
        training readout's use of the rows (entries with weight > 0, summed weights),
        recorded as a pushdown readout records its own (usage, this step's balancing load).
        lease: one of `lease_version` on `version`, which reaches it after a swap retired it."""
        with self._use(version, lease) as st, st.lock:
            local = fetched_rows(st, ids, hits, weight_sum, self.limits)
            # host rows answer a GPU caller on its device (host_rows.py); else on the shard's
            out = gather_rows(st.values, local.clamp_min(0), ids.device if st.device.type == "cpu" else st.device,
                              pad=local < 0)
            return out

    def fetch_into(self, ids: torch.Tensor, out: torch.Tensor, *, hits: torch.Tensor | None = None,
                   weight_sum: torch.Tensor | None = None, version: int = 0, lease: str = "") -> tuple[int, int]:
        """`fetch` with the rows written straight into `out` [M, d_v] (a staging buffer another
        process reads: the value dtype or one they convert to, any device), all under the
        version's lock, so `out` holds one version at one step -> (version, step) read."""
        with self._use(version, lease) as st, st.lock:
            if out.shape != (ids.shape[0], st.config.d_v) or not out.is_contiguous():
                raise errors.InvalidArgument("out", f"expected a contiguous [{ids.shape[0]}, {st.config.d_v}] "
                                                    f"buffer, got {list(out.shape)}")
            local = fetched_rows(st, ids, hits, weight_sum, self.limits)
            if out.dtype == st.values.dtype and out.device == st.device:
                torch.index_select(st.values, 0, local.clamp_min(0), out=out)   # the one copy
            else:
                out.copy_(st.values[local.clamp_min(0)])
            out.masked_fill_((local < 0).unsqueeze(1).to(out.device), 0)
            return st.version, st.step

    def readout(self, ids: torch.Tensor, weights: torch.Tensor, *, version: int = 0, lease: str = "") -> torch.Tensor:
        """ids [T, k] (owned or PAD), weights [T, k] fp32 -> [T, d_v] fp32 partial readout."""
        with self._use(version, lease) as st, st.lock:
            local, w = check.at_once(lambda defer: readout_rows(st, ids, weights, self.limits, defer))
            out = kernels.readout_weighted(st.values, local, w)
            record_readout_usage(st, local, w)
            return out

    def readout_backward(self, ids: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor, *,
                         request_id: str = "", version: int = 0) -> torch.Tensor:
        """grad_out [T, d_v] fp32 -> grad of weights [T, k] fp32; accumulates row
        gradients w_j * grad_out for end_step (once per request_id)."""
        with self._use(version) as st, st.lock:
            lim = self.limits

            def checks(defer):
                rows_w = readout_rows(st, ids, weights, lim, defer)
                check.tensor("grad_out", grad_out, torch.float32, (ids.shape[0], st.config.d_v), defer)
                check.magnitude("grad_out", grad_out, lim.max_grad_abs, "max_grad_abs", defer)
                return rows_w
            local, w = check.at_once(checks)
            grad_w, rows, row_grads = kernels.readout_weighted_backward(
                st.values, local, w, grad_out.to(st.device))
            # the row gradients (weights x grad_out, summed) obey the bound of sent ones
            check.magnitude("grad_out", row_grads, lim.max_grad_abs, "max_grad_abs (of weights x grad_out)")
            if not st.mark_seen(request_id):
                st.pending_grad_bytes = check.pending_grads(st.pending_grad_bytes, row_grads, lim)
                st.row_grads.append((rows, row_grads))   # the kernels' rows: sorted and unique
            return grad_w

    def accumulate_value_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                               request_id: str = "", version: int = 0) -> None:
        """Row gradients computed by the caller (fetch mode): ids [M] (owned or PAD; repeats
        are summed), grads [M, d_v] fp32. Accumulated as readout_backward's are, for end_step
        (once per request_id)."""
        with self._use(version) as st, st.lock:
            check.tensor("ids", ids, torch.int64, (None,))
            check.tensor("grads", grads, torch.float32, (ids.shape[0], st.config.d_v))
            check.magnitude("grads", grads, self.limits.max_grad_abs, "max_grad_abs")
            check.ids_in_range("ids", ids, st.row_start, st.row_end, allow_pad=True)
            local = st.local(ids)
            keep = local >= 0
            pending = check.pending_grads(st.pending_grad_bytes, grads[keep.to(grads.device)], self.limits)
            if st.mark_seen(request_id):
                return
            if bool(keep.any()):
                st.pending_grad_bytes = pending
                st.row_grads.append((local[keep], grads.to(st.device)[keep]))
                st.row_grads_sorted = False   # a caller's ids: in any order, repeats allowed

    def accumulate_key_grads(self, ids: torch.Tensor, grads: torch.Tensor, *,
                             request_id: str = "", version: int = 0) -> None:
        """ids [M] (owned flat rows or PAD), grads [M, d_k] fp32."""
        with self._use(version) as st, st.lock:
            check.tensor("ids", ids, torch.int64, (None,))
            check.tensor("grads", grads, torch.float32, (ids.shape[0], st.config.d_k))
            check.magnitude("grads", grads, self.limits.max_grad_abs, "max_grad_abs")
            check.ids_in_range("ids", ids, st.row_start, st.row_end, allow_pad=True)
            local = st.local(ids)
            keep = local >= 0
            pos = st.flat_pos[local[keep]]
            if bool((pos < 0).any()):
                bad = int(ids.to(st.device)[keep][pos < 0][0])
                raise errors.InvalidArgument("ids", f"id {bad} is a product-key row; key gradients are for flat rows")
            kept = grads.to(st.device)[keep]
            pending = check.pending_grads(st.pending_grad_bytes, kept, self.limits)
            if not st.mark_seen(request_id) and pos.numel():
                st.pending_grad_bytes = pending
                st.key_grads.append((pos, kept))

    def end_step(self, step: int, *, worker: int = 0, num_workers: int = 1,
                 request_id: str = "", timeout_s: float = 60.0, active: Callable[[], bool] | None = None) -> int:
        """Step barrier. Applies the accumulated gradients once all num_workers
        workers have arrived for `step` (the first arrival fixes that count); every caller
        waits until then and gets the new step (step + 1). A call for a step already
        applied (a retry) returns at once. A step whose result would be non-finite is
        refused (errors.StepRefused), its gradients dropped. active: for servers, whether
        the caller is still there (one that went away is withdrawn from the barrier)."""
        check.integer("step", step, 0)
        check.integer("num_workers", num_workers, 1)
        check.integer("worker", worker, 0, num_workers)
        timeout_s = check.barrier_timeout(timeout_s, self.limits)
        with self._use(0) as st, st.cond:
            return barrier(st, step, worker, num_workers, request_id, timeout_s, active or (lambda: True))

    # -- control plane -------------------------------------------------------

    def add_rows(self, values: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tags: Mapping[str, torch.Tensor] | None = None, partition: torch.Tensor | int = 0
                 ) -> torch.Tensor:
        """Append rows (values [M, d_v], keys [M, d_k], optional selection bias [M],
        default 0, tags name -> [M] int64 >= -1, default unset, partition [M] int64 >= 0
        or one int, default 0) to the table's last flat segment; only the shard holding
        the table's last rows may. -> ids [M]."""
        with self._use(0) as st, st.lock:
            cfg = st.config
            check.tensor("values", values, (torch.float32, st.values.dtype), (None, cfg.d_v))
            m = values.shape[0]
            check.tensor("keys", keys, torch.float32, (m, cfg.d_k))
            if bias is not None:
                check.tensor("bias", bias, torch.float32, (m,))
            tags = check.row_tags(tags, m)
            check.tag_count(list(st.tags), list(tags))
            partition = check.row_partition(partition, m)
            if not st.is_last:
                raise errors.FailedPrecondition(
                    f"add_rows: shard {self.shard_id} owns [{st.row_start}, {st.row_end}), not the table's "
                    f"last rows (table ends at {st.segments[-1].row_end})")
            dev = st.device
            return append_rows(st, values.to(dev), keys.to(dev), None if bias is None else bias.to(dev),
                               {name: t.to(dev) for name, t in tags.items()},
                               partition.to(dev) if isinstance(partition, torch.Tensor) else partition)

    def set_optimizer(self, optimizer: OptimizerConfig, *, bias_step: float | None = None) -> RowOptimizer:
        """Use `optimizer` (kind, lr, key_lr, betas, eps) and, when given, `bias_step`
        from the next end_step on; returns the settings it replaced."""
        check.row_optimizer(optimizer, bias_step)
        with self._use(0) as st, st.lock:
            return replace_optimizer(st, optimizer, bias_step)

    def set_frozen(self, ids: torch.Tensor, frozen: bool = True) -> None:
        self._set_mask("frozen", ids, frozen)

    def set_ablated(self, ids: torch.Tensor, ablated: bool = True) -> None:
        self._set_mask("ablated", ids, ablated)

    def _set_mask(self, name: str, ids: torch.Tensor, flag: bool) -> None:
        check.flag(name, flag)
        with self._use(0) as st, st.lock:
            check.tensor("ids", ids, torch.int64, (None,))
            check.ids_in_range("ids", ids, st.row_start, st.row_end, allow_pad=False)
            getattr(st, name)[st.local(ids)] = flag
            st.mark_rows(st.local(ids))
            if name == "frozen":
                st.frozen_changed()
            if name == "ablated" and st.faiss is not None:
                st.faiss.invalidate()

    def usage(self) -> UsageStats:
        """Usage of this shard's rows [row_start, row_end) (CPU tensors)."""
        with self._use(0) as st, st.lock:
            return UsageStats(st.hits.cpu().clone(), st.weight_sum.cpu().clone(),
                              st.frozen.cpu().clone(), st.ablated.cpu().clone())

    def write_snapshot(self, version_dir: str, version: int, *, full: bool = False) -> None:
        """Write this shard's subgroup of a (staged) version: the rows changed since the
        version this state was loaded from or last published as (a delta, `snapshots`), or
        the whole state where `full` or no delta can serve. Gradients not yet applied by
        end_step are not part of a snapshot: take it between steps."""
        check.integer("version", version, 1)
        check.flag("full", full)
        with self._use(0) as st:
            with st.lock:   # the rows are copied to the host under it, their writes already running
                check_finite_rows(st)             # never publish a non-finite value or key
                data = snapshots.take(st, state_tensors(st), state_attrs(st, version), version_dir, full)
                write = persistence.start_shard(version_dir, data, keep_content_id=True)
            write.finish()

    # -- for tests and tools -------------------------------------------------

    @property
    def serving_version(self) -> int:
        return self._serving.version

    def held_versions(self) -> dict[str, list[int]]:
        with self._vlock:
            return {"serving": [self._serving.version], "pending": sorted(self._pending),
                    "retiring": [s.version for s in self._retiring],
                    "retired": [s.version for s in self.leases.retired], "leased": self.leases.versions()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every persisted tensor of the serving state (for tests)."""
        with self._use(0) as st, st.lock:
            data = state_to_data(st, st.version)
        return {k: torch.from_numpy(v.copy()) for k, v in data.arrays.items()}
