"""Training checkpoints: Orbax CheckpointManager steps (async, `keep` most recent) holding the train state
(parameters, optimizer state), the data iterator's state, and integrity data.

Integrity: at save, each array's fingerprint (a position-weighted sum of its raw bits, modulo 2^32, in which every
element has an odd weight, so a changed element always changes it) and whether it is all finite, computed on the
devices in one pass (sharded and multi-host states alike). Restoring recomputes them and refuses a checkpoint whose
arrays differ or hold NaN/Inf. Errors are one sentence naming the step, what is wrong and the way out:
`train.resume_from=previous` or a step number resumes from an earlier checkpoint explicitly.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from nemojax.convert.hf import CheckpointError
from nemojax.fs import storage_reason

_WEIGHT = 0x9E3779B1                                  # odd: (2i + 1) * odd is odd, a unit modulo 2^32


def _bits(a: jax.Array) -> jax.Array:
    """The raw bits of a as uint32 words (one per element up to 4 bytes, two for 8-byte elements)."""
    if a.dtype.itemsize < 4:
        return jax.lax.bitcast_convert_type(a, {1: jnp.uint8, 2: jnp.uint16}[a.dtype.itemsize]).reshape(-1).astype(
            jnp.uint32)
    return jax.lax.bitcast_convert_type(a, jnp.uint32).reshape(-1)


@jax.jit
def _fingerprints(tree):
    def one(a):
        bits = _bits(a)
        weights = (2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1) * jnp.uint32(_WEIGHT)
        finite = jnp.all(jnp.isfinite(a)) if jnp.issubdtype(a.dtype, jnp.inexact) else jnp.bool_(True)
        return jnp.sum(bits * weights, dtype=jnp.uint32), finite

    return jax.tree.map(one, tree)


def fingerprints(tree) -> dict[str, list]:
    """{array path: [fingerprint, all finite]} of a pytree of arrays."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_fingerprints(tree)), is_leaf=lambda x: isinstance(
        x, tuple))[0]
    return {jax.tree_util.keystr(path): [int(h), bool(f)] for path, (h, f) in flat}


def _shapes(tree) -> dict[str, tuple]:
    """{path: shape} with every key as a string (Orbax stores list indices as strings)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(v.shape) for path, v in flat}


class Checkpoints:
    def __init__(self, directory: str, keep: int):
        self.directory = directory
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "integrity": ocp.JsonCheckpointHandler()}
        self.mgr = ocp.CheckpointManager(os.path.join(directory, "checkpoints"), item_handlers=handlers,
                                         options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                              enable_async_checkpointing=True,
                                                                              cleanup_tmp_directories=True))
        self.finite: dict[int, bool] = {}             # step -> its values were finite (saved or verified here)

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def save(self, step: int, state, data_state: dict) -> None:
        prints = fingerprints(state)
        self.finite[step] = all(finite for _, finite in prints.values())
        saved = self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(data_state),
                                                            integrity=ocp.args.JsonSave({"arrays": prints})))
        if not saved:                                 # Orbax skips a step at or below the latest it holds
            raise CheckpointError(f"Orbax did not save step {step} in {self.directory} (it holds "
                                  f"{self.steps()})")

    def choose(self, resume_from: str) -> Optional[int]:
        """The step train.resume_from names among the saved ones: latest, previous (the one before the latest)
        or a step number. None: no checkpoint (a fresh run)."""
        steps = self.steps()
        if resume_from == "latest":
            return steps[-1] if steps else None
        if resume_from == "previous":
            if len(steps) < 2:
                raise CheckpointError(f"train.resume_from=previous needs two checkpoints in {self.directory}; "
                                      f"saved steps: {steps or 'none'}")
            return steps[-2]
        if not resume_from.isdigit() or int(resume_from) not in steps:
            raise CheckpointError(f"train.resume_from={resume_from!r}: expected latest, previous or one of the saved "
                                  f"steps {steps} in {self.directory}")
        return int(resume_from)

    def set_aside_after(self, step: int) -> list[int]:
        """Moves the steps after `step` (resuming from an earlier one) to checkpoints-set-aside/ beside the
        checkpoints, where Orbax no longer sees them: kept for inspection, and new steps can be saved."""
        later = [s for s in self.steps() if s > step]
        if not later:
            return later
        aside = epath.Path(self.directory) / "checkpoints-set-aside"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for s in later:
                (self.mgr.directory / str(s)).rename(aside / f"{s}-{stamp}")
            print(f"nemojax train: resuming from step {step}; later checkpoints {later} moved to {aside}",
                  file=sys.stderr)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("nemojax_set_aside")
        self.mgr.reload()
        return later

    def restore(self, step: int, target) -> tuple[dict, dict]:
        """(state, data state) of `step`, restored into the structure, shapes and shardings of `target`."""
        steps = self.steps()
        earlier = [s for s in steps if s < step]
        if earlier:
            name = "previous" if step == steps[-1] else str(earlier[-1])
            way_out = f"resume from an earlier one with train.resume_from={name} or a step number (saved: {steps})"
        else:
            way_out = f"no earlier checkpoint is kept (saved: {steps}); move {self.directory} away to start afresh"

        def unreadable(e: Exception) -> CheckpointError:
            return CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read "
                                   f"({storage_reason(e)}); {way_out}")

        try:
            saved = _shapes(self.mgr.item_metadata(step)["state"].tree)
        except Exception as e:
            raise unreadable(e) from e
        wanted = _shapes(target)
        if saved != wanted:
            differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds a different model or optimizer "
                                  f"({len(differ)} arrays differ, e.g. {differ[0]}: saved {saved.get(differ[0])}, "
                                  f"this run {wanted.get(differ[0])}); train with the config it was saved with, or "
                                  f"use another train.ckpt_dir")
        items = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        if (self.mgr.directory / str(step) / "integrity").exists():     # absent in older checkpoints (also gs://)
            items["integrity"] = ocp.args.JsonRestore()
        try:
            restored = self.mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise unreadable(e) from e
        now = fingerprints(restored.state)
        saved_prints = restored["integrity"]["arrays"] if "integrity" in items else now
        bad = sorted(k for k in now if now[k][0] != saved_prints.get(k, [None])[0])
        nonfinite = sorted(k for k, (_, finite) in now.items() if not finite)
        if bad or nonfinite:
            self.finite[step] = False
            what = (f"{len(bad)} arrays differ from what was saved (e.g. {bad[0]})" if bad else
                    f"{len(nonfinite)} arrays hold NaN or Inf (e.g. {nonfinite[0]})")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: {what}; {way_out}")
        self.finite[step] = True
        return restored.state, dict(restored.data)

    def last_good(self) -> Optional[int]:
        """The latest kept step whose values were finite when saved or verified in this process and whose save
        has finished: Orbax lists a step as soon as its asynchronous save starts, also when that save then fails,
        so a step counts only once its directory is finalized on disk."""
        kept = set(self.steps())
        return max((s for s, ok in self.finite.items() if ok and s in kept and self._finalized(s)), default=None)

    def _finalized(self, step: int) -> bool:
        path = self.mgr.directory / str(step)
        return path.exists() and ocp.step.is_path_finalized(path)

    def check_for_errors(self) -> None:
        """Raises the error of a finished asynchronous save that failed."""
        self.mgr.check_for_errors()

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()
