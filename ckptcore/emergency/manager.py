"""The emergency checkpoint manager: a fast local tier per process, a persistent tier, peer replicas.

Saving (every process, the same calls, like any collective):

* local tier, every ``local_every`` steps: each process snapshots its *view* (the regions
  its devices hold, see :mod:`ckptcore.emergency.views`) and returns; its background writer
  then sends the regions its ``replicas`` peers lack to them over the replica channel
  (:mod:`ckptcore.emergency.channel`), takes the regions its own predecessors sent, and
  commits one local step holding its own view and the views it keeps for its peers
  (:mod:`ckptcore.emergency.local_tier`), with no other process taking part, and applies the
  local retention. A replica that does not arrive within ``Options.replica_timeout`` is left
  out of that step (logged): the step still holds the process's own view;
* persistent tier, every ``persistent_every`` steps: an ordinary
  :class:`ckptcore.CheckpointManager` (collective, asynchronous, with its own engine), so
  neither tier waits for the other.

Resuming: :meth:`CheckpointManager.latest_step` gathers every process's list of valid
local steps (this run, this job size, this process) and the primary picks the newest step
whose every process's view is held somewhere (by itself, else by a peer), compared with the
newest persistent step; every process gets the same answer. :meth:`restore` then hands each
missing view over from the peer holding it (over the channel; the others read nothing twice),
checks that the target has the saved mesh and process layout, and has every process read
its own view locally. Any failure there (a replica failing its checksums...) is agreed on,
and the step comes from the persistent tier if it holds it, else an
:class:`EmergencyRestoreError` names the processes and the step. Nothing depends on clocks:
steps are compared by number, retention counts steps.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from ckptcore import storage
from ckptcore.checkpointers import background
from ckptcore.checkpointers.engine import AsyncSaveEngine
from ckptcore.emergency import views
from ckptcore.emergency.channel import Channel, ChannelError, open_channel
from ckptcore.emergency.local_tier import OWN_ITEM, LocalStep, LocalTier, replica_item
from ckptcore.emergency.options import EmergencyRestoreError, Options, RestoreInfo
from ckptcore.errors import (
    CheckpointerClosedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    ProcessFailedError,
    StorageError,
)
from ckptcore.io.plans import PreparedSave
from ckptcore.io.restore import open_committed, restore_location
from ckptcore.manager.manager import CheckpointManager as PersistentManager
from ckptcore.manager.options import CheckpointManagerOptions
from ckptcore.parallel.coordinator import allgather
from ckptcore.parallel.current import current_coordinator

log = logging.getLogger("ckptcore.emergency")

RUN_FILE = "ckptcore_emergency_run.json"


class CheckpointManager:
    """Two tiers of checkpoints for one training run; create and call it on every process.

    :param local_directory: this process's own directory (fast local disk, lost with the host).
    :param persistent_directory: the shared directory (a bucket...) every process names alike.
    :param options: :class:`ckptcore.emergency.Options`.
    """

    def __init__(
        self, local_directory: str | os.PathLike[str], persistent_directory: str | os.PathLike[str],
        options: Options | None = None,
    ) -> None:
        self._options = options or Options()
        self._coordinator = current_coordinator()
        self._me, self._size = self._coordinator.process, self._coordinator.size
        self._replicas = min(self._options.replicas, self._size - 1)
        self._persistent_url = str(persistent_directory)
        self._name = f"emergency:{self._persistent_url}"
        self._persistent: PersistentManager | None = None
        self._persistent_error = ""
        self._open_persistent()
        run_id = self._options.run_id or self._coordinator.agree(f"{self._name}:run-id", self._read_run_id)
        self._local = LocalTier(str(local_directory), process=self._me, processes=self._size, run_id=run_id,
                                storage_options=None)
        self._run_id = run_id
        self._channel: Channel | None = (
            open_channel(self._coordinator, self._name, self._options.replica_address,
                         self._options.replica_timeout) if self._replicas else None
        )
        self._saves = self._restores = 0  # collective calls: the n-th is the n-th on every process
        self._engine = AsyncSaveEngine("ckptcore-emergency-local", timeout=self._options.save_timeout)
        self._restored_step: int | None = None
        self._closed = False
        self.last_restore_info: RestoreInfo | None = None

    # -- the persistent tier -------------------------------------------------------------

    def _open_persistent(self) -> None:
        o = self._options
        fields: dict[str, Any] = {
            "max_to_keep": o.persistent_max_to_keep, "save_interval_steps": o.persistent_every,
            "save_timeout": o.save_timeout, "array_format": o.array_format, **dict(o.persistent_options),
        }
        try:
            self._persistent = PersistentManager(
                self._persistent_url, CheckpointManagerOptions(**fields), storage_options=o.storage_options
            )
            self._persistent_error = ""
        except (StorageError, ProcessFailedError, CheckpointTimeoutError) as exc:
            self._persistent, self._persistent_error = None, f"{type(exc).__name__}: {exc}"
            log.warning("the persistent tier %s is unreachable (%s): only the local tier is used until it is back",
                        self._persistent_url, exc)

    def _read_run_id(self) -> str | None:
        """On the primary: the run's id, created once in the persistent directory (``None`` if unreachable)."""
        if self._persistent is None:
            return None
        try:
            root = storage.resolve(self._persistent_url, self._options.storage_options)
            raw = storage.read_file(root, RUN_FILE)
            if raw is not None:
                return str(json.loads(raw)["run_id"])
            run_id = uuid.uuid4().hex
            root.fs.pipe_file(f"{root.path.rstrip('/')}/{RUN_FILE}", json.dumps({"run_id": run_id}).encode())
            return run_id
        except (OSError, ValueError, KeyError, CheckpointError) as exc:
            log.warning("could not read the run id in %s (%s): local steps are not checked against it",
                        self._persistent_url, exc)
            return None

    # -- saving --------------------------------------------------------------------------

    def should_save_local(self, step: int) -> bool:
        return step % self._options.local_every == 0

    def should_save_persistent(self, step: int) -> bool:
        return step % self._options.persistent_every == 0

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Save ``step`` to the tiers it is due for (``force``: to both); False when none.

        Returns once the local tier's snapshot is taken and the persistent tier's save is
        queued; background errors of either tier surface at the next call.
        """
        self._check_open()
        saved = False
        if force or self.should_save_local(step):
            self._save_local(step, state)
            saved = True
        if self._persistent is not None and (force or self.should_save_persistent(step)):
            saved = self._persistent.save(step, state, force=force) or saved
        return saved

    def _save_local(self, step: int, state: Any) -> None:
        self._engine.raise_errors()
        self._engine.make_room(0)  # one local step in flight
        self._engine.raise_errors()
        view, snap = self._engine.snapshot(lambda copy: views.prepare_view(state, copy, self._size))
        self._saves += 1
        seq = self._saves

        def write() -> None:
            held: dict[int, tuple[str, PreparedSave]] = {self._me: (OWN_ITEM, view.prepared)}
            held.update(self._exchange_replicas(view, step, seq))
            self._local.write(step, held, fingerprint=view.fingerprint, format=self._options.array_format,
                              before_commit=background.check_deadline)
            self._apply_local_retention(step)

        self._engine.submit(write, snap, nbytes=view.prepared.nbytes, key=self._local.root.url,
                            description=f"local step {step} of process {self._me}")

    def _exchange_replicas(self, view: views.View, step: int, seq: int) -> dict[int, tuple[str, PreparedSave]]:
        """In the background: send this view's regions to the peers keeping them; the views kept here."""
        channel = self._channel
        if channel is None:
            return {}
        timeout = self._options.replica_timeout
        unsent: list[str] = []

        def send() -> None:
            for shift in range(1, self._replicas + 1):
                holder = (self._me + shift) % self._size
                try:
                    channel.send(holder, "replica", seq, step, views.replica_parts(view, holder),
                                 meta={"fingerprint": view.fingerprint}, timeout=timeout)
                except ChannelError as exc:
                    unsent.append(str(exc))

        sender = threading.Thread(target=send, name=f"ckptcore-replicas-{self._me}-out", daemon=True)
        sender.start()
        held: dict[int, tuple[str, PreparedSave]] = {}
        for shift in range(1, self._replicas + 1):
            source = (self._me - shift) % self._size
            why = ""
            message = channel.receive("replica", seq, source, timeout)
            if message is None:
                why = f"it did not arrive within {timeout} s"
            elif message.step != step or message.meta.get("fingerprint") != view.fingerprint:
                why = f"it is of step {message.step} on another mesh or process layout"
            else:
                try:
                    held[source] = (replica_item(source), views.peer_view(view, source,
                                                                          views.replica_rows(view, message.parts)))
                except (ValueError, TypeError, CheckpointError) as exc:
                    why = f"it is damaged ({exc})"
            if why:
                log.warning("local step %d of process %d is saved without its replica of process %d: %s",
                            step, self._me, source, why)
        sender.join()
        channel.discard("replica", seq)
        for problem in unsent:
            log.warning("local step %d: %s; that peer saves step %d without this process's replica",
                        step, problem, step)
        return held

    def _apply_local_retention(self, just_saved: int) -> None:
        steps = sorted(self._local.steps())
        newest_persistent = max(self._persistent.all_steps(), default=None) if self._persistent else None
        protected = {just_saved, *([self._restored_step] if self._restored_step is not None else [])}
        # Older than the newest persistent step first: such a step is never the one to resume from.
        doomed = [s for s in steps if newest_persistent is not None and s < newest_persistent]
        kept = [s for s in steps if s not in doomed]
        doomed += kept[: max(0, len(kept) - self._options.local_max_to_keep)]
        for step in doomed:
            if step not in protected:
                self._local.delete(step)
        if self._restored_step is not None and just_saved > self._restored_step:
            self._restored_step = None

    # -- which step --------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest step every process can restore, from any tier (the same on every process)."""
        self._check_open()
        return self._plan(None)["step"]  # type: ignore[no-any-return]

    def local_steps(self) -> list[int]:
        """This process's valid local steps (its own view or a peer's), ascending."""
        return sorted(self._local.steps())

    def persistent_steps(self) -> list[int]:
        return self._persistent.all_steps() if self._persistent is not None else []

    def _plan(self, wanted: int | None) -> dict[str, Any]:
        op = self._coordinator.operation(f"{self._name}:plan", "the choice of an emergency step")
        entries = self._local.steps()
        mine = {str(s): {str(p): fp for p, fp in e.views.items()} for s, e in entries.items()}
        gathered = op.gather("local", mine)
        persistent = self.persistent_steps()
        return dict(op.broadcast("plan", lambda: self._decide(gathered or [], persistent, wanted)))

    def _decide(self, gathered: list[dict[str, dict[str, str]]], persistent: list[int], wanted: int | None) -> dict[str, Any]:
        """On the primary: the step and tier to restore (see the module's docstring)."""
        reasons: list[str] = []
        local: dict[int, dict[str, Any]] = {}
        for step in sorted({int(s) for g in gathered for s in g}, reverse=True):
            holders: dict[int, list[int]] = {}
            prints = set()
            for q, held in enumerate(gathered):
                for p, fp in held.get(str(step), {}).items():
                    holders.setdefault(int(p), []).append(q)
                    prints.add(fp)
            missing = [p for p in range(self._size) if p not in holders]
            if len(prints) > 1:
                reasons.append(f"local step {step}: the processes' views were saved on different meshes")
            elif missing:
                reasons.append(f"local step {step}: no surviving copy of the shards of process(es) {missing}")
            else:
                sources = {str(p): (p if p in qs else min(qs)) for p, qs in holders.items()}
                local[step] = {"sources": sources, "fingerprint": prints.pop()}
        if wanted is not None:
            if wanted in local:
                return {"step": wanted, "tier": "local", **local[wanted], "reason": _why_local(local[wanted])}
            if wanted in persistent:
                why = "; ".join(r for r in reasons if r.startswith(f"local step {wanted}:")) or f"no local step {wanted}"
                return {"step": wanted, "tier": "persistent", "reason": why}
            return {"step": None, "reason": "; ".join(reasons) or f"step {wanted} is in no tier"}
        best_local = max(local, default=None)
        best_persistent = max(persistent, default=None)
        if best_local is not None and (best_persistent is None or best_local >= best_persistent):
            return {"step": best_local, "tier": "local", **local[best_local], "reason": _why_local(local[best_local])}
        if best_persistent is not None:
            why = f"the newest persistent step {best_persistent} is newer than every complete local step"
            skipped = "; ".join(r for r in reasons if int(r.split()[2].rstrip(":")) > best_persistent)
            return {"step": best_persistent, "tier": "persistent", "reason": why + (f" ({skipped})" if skipped else "")}
        return {"step": None, "reason": "; ".join(reasons) or "no step in any tier"}

    # -- restoring ---------------------------------------------------------------------

    def restore(self, step: int | None = None, target: Any = None) -> Any:
        """Restore ``step`` (default: :meth:`latest_step`) onto ``target``; every process calls it.

        A target with the saved mesh and process layout is read from the local tiers (each
        process its own view; a process that lost it gets it from its peer first); any
        other target, or none, from the persistent tier. :attr:`last_restore_info` says
        which tier served it and why.
        """
        self._check_open()
        started = time.monotonic()
        plan = self._plan(step)
        if plan["step"] is None:
            what = "any step" if step is None else f"step {step}"
            if self._persistent is None:  # it may hold the step: say why it could not be asked
                raise EmergencyRestoreError(
                    f"no local tier holds {what} that every process can restore ({plan['reason']}), and the "
                    f"persistent tier {self._persistent_url} (process {self._me}) is unreachable: "
                    f"{self._persistent_error}"
                )
            raise CheckpointNotFoundError(f"no tier holds {what} that every process can restore: {plan['reason']}")
        step = int(plan["step"])
        tier, reason = plan["tier"], plan["reason"]
        sources = {int(p): int(q) for p, q in plan.get("sources", {}).items()}
        op = self._coordinator.operation(f"{self._name}:restore", f"the restore of emergency step {step}")
        if tier == "local":
            expected = plan["fingerprint"]
            fp = views.target_fingerprint(target, self._size) if target is not None else None
            if target is None and expected == views.digest([], self._size):
                fp = expected  # no jax.Array leaves: nothing depends on the mesh
            same = allgather(op, "mesh", fp == expected)
            if not all(same):
                differ = [p for p, ok in enumerate(same) if not ok]
                tier = "persistent"
                reason = (f"local step {step} was saved on another mesh or process layout than the target's "
                          f"(processes {differ}" + (": no target given)" if target is None else ")"))
        if tier == "local":
            result, failures = self._restore_local(op, step, target, sources)
            if not failures:
                self._restored_step = step
                self.last_restore_info = RestoreInfo(
                    step, "local", reason,
                    {p: ("local" if q == p else f"replica on process {q}") for p, q in sorted(sources.items())},
                    time.monotonic() - started,
                )
                log.info("emergency restore of step %d from the local tiers: %s", step, reason)
                return result
            if step not in self.persistent_steps():
                raise EmergencyRestoreError(
                    f"step {step} cannot be restored: {'; '.join(failures)}; the persistent tier "
                    f"{self._persistent_url} does not hold it. Call latest_step() again: the damaged copies were "
                    "dropped from the local tiers"
                )
            tier, reason = "persistent", f"the local tiers failed ({'; '.join(failures)})"
        result = self._restore_persistent(step, target)
        self.last_restore_info = RestoreInfo(step, "persistent", reason, dict.fromkeys(range(self._size), "persistent"),
                                             time.monotonic() - started)
        log.info("emergency restore of step %d from the persistent tier: %s", step, reason)
        return result

    def _restore_local(self, op: Any, step: int, target: Any, sources: dict[int, int]) -> tuple[Any, list[str]]:
        me = self._me
        problem = ""
        entries = self._local.steps()
        self._restores += 1
        for p, q in sorted(sources.items()):
            if p != q and me in (p, q):  # always: the other end waits for this one
                why = self._hand_over(entries, step, p, q)
                problem = problem or why
        result = None
        if not problem:
            try:
                entry: LocalStep = self._local.steps()[step]
                location, doc = open_committed(self._local.root.child(entry.name).child(OWN_ITEM).url)
                result = restore_location(location, doc, target)
            except KeyError:
                problem = f"process {me} holds no local step {step}"
            except CheckpointError as exc:
                source = sources.get(me, me)
                where = "its local tier" if source == me else f"the replica process {source} held"
                problem = f"process {me}, step {step}, from {where}: {type(exc).__name__}: {exc}"
                self._local.delete(step)  # never reported again
                log.warning("emergency restore: %s; the local copy is dropped", problem)
        failures = [p for p in allgather(op, "outcome", problem) if p]
        return result, failures

    def _hand_over(self, entries: dict[int, LocalStep], step: int, p: int, q: int) -> str:
        """Process ``q`` sends the view of ``p`` it keeps; ``p`` commits it locally. What went wrong, or ""."""
        channel, timeout, seq = self._channel, self._options.replica_timeout, self._restores
        if channel is None:
            return f"process {p} needs its replica from process {q} at step {step}, but this job keeps no replicas"
        if self._me == q:
            files: list[tuple[str, bytes]] = []
            error = ""
            try:
                entry = entries[step]
                files = self._local.view_files(entry, p)
                fingerprint = entry.views[p]
            except (CheckpointError, KeyError) as exc:
                fingerprint, error = "", f"process {q} could not read its replica of process {p} at step {step}: {exc}"
            try:
                channel.send(p, "handover", seq, step, files, meta={"fingerprint": fingerprint, "error": error},
                             timeout=timeout)
            except ChannelError as exc:
                error = error or str(exc)
            return error
        message = channel.receive("handover", seq, q, timeout)
        if message is None or message.step != step:
            return f"process {p} did not get its replica from process {q} at step {step} within {timeout} s"
        if message.meta.get("error"):
            return f"process {p} did not get its replica from process {q}: {message.meta['error']}"
        try:
            self._local.adopt(step, message.parts, str(message.meta.get("fingerprint", "")), q)
        except CheckpointError as exc:
            return f"process {p} could not keep the replica process {q} sent at step {step}: {exc}"
        return ""

    def _restore_persistent(self, step: int, target: Any) -> Any:
        if self._persistent is None:
            self._open_persistent()  # collective, like the restore
        if self._persistent is None:
            raise EmergencyRestoreError(
                f"step {step} must come from the persistent tier {self._persistent_url} (process {self._me}), "
                f"which is unreachable: {self._persistent_error}"
            )
        try:
            return self._persistent.restore(step, target=target)
        except StorageError as exc:
            raise EmergencyRestoreError(
                f"process {self._me} could not restore step {step} from the persistent tier {self._persistent_url}: {exc}"
            ) from exc

    # -- the rest ----------------------------------------------------------------------

    def reached_preemption(self, step: int) -> bool:
        """Whether every process must save ``step`` now (see :meth:`ckptcore.CheckpointManager.reached_preemption`)."""
        return self._coordinator.reached_preemption(step)

    def wait_until_finished(self) -> None:
        """Wait for both tiers' background saves; raise their errors."""
        self._engine.wait()
        if self._persistent is not None:
            self._persistent.wait_until_finished()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._engine.close()
        finally:
            if self._channel is not None:
                self._channel.close()
            if self._persistent is not None:
                self._persistent.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointerClosedError("this emergency CheckpointManager is closed")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _why_local(plan: dict[str, Any]) -> str:
    handed = sorted(int(p) for p, q in plan["sources"].items() if int(p) != int(q))
    if not handed:
        return "every process holds its own shards locally"
    return f"process(es) {handed} lost their local shards: a peer's replica is handed over"
