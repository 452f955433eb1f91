"""Crash-safe checkpoints: atomic saving with normal permissions, safe loading and resuming.

MONAI's ``CheckpointSaver`` builds Ignite ``DiskSaver(atomic=False)`` because Ignite's atomic mode
writes through ``tempfile`` (mode 0600) and afterwards only adds group/other *read* bits, ignoring
the umask. A crash or a full disk during a non-atomic save leaves a truncated ``.pt`` under the final
name, which a later resume would pick. Here every save goes to a temporary file in the same folder,
is fsynced, gets ``0o666 & ~umask`` (what ``open()`` would have given) and is then renamed over the
destination, so a checkpoint name only ever points to a complete file.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import types
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.utils import copy_model_state

from data_prep.atomic import atomic_path, default_file_mode, fsync_dir
from transforms.errors import InputDataError

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "RNGState",
    "ResumeCheckpointLoader",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "default_file_mode",
    "find_latest_checkpoint",
    "load_checkpoint",
    "load_weights",
]

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(InputDataError):
    """A checkpoint that needs arbitrary code (pickled classes/functions) to load; it is refused."""


def atomic_torch_save(
    obj: Any, path: str | os.PathLike, save_fn: Callable[..., Any] | None = None, **kwargs: Any
) -> Path:
    """``torch.save`` that never leaves a partial file under ``path``.

    The object is written to a temporary file (``.<name>.<random>.tmp``) in the destination folder,
    flushed and fsynced, given the permissions a normally created file would have
    (``0o666 & ~umask``, not ``tempfile``'s 0600) and renamed over ``path`` with ``os.replace``.

    Args:
        obj: what to save (usually a dict of state dicts).
        path: destination file; its folder is created if missing.
        save_fn: the serialiser, called as ``save_fn(obj, file_object, **kwargs)``; default ``torch.save``.
        kwargs: extra arguments for ``save_fn``.

    Returns:
        The destination as a ``Path``.

    Raises:
        Exception: whatever serialisation or writing raised; the temporary file is removed and an
            existing file at ``path`` is left unchanged.
    """
    path = Path(path)
    # looked up at call time (not bound at import) so tests and callers can substitute torch.save
    save = torch.save if save_fn is None else save_fn
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save(obj, f, **kwargs)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return path


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` writing through :func:`atomic_torch_save`, optionally to a fixed filename.

    Args:
        dirname: folder of the checkpoints (created if missing; need not be empty).
        filename: a fixed file name overriding the name Ignite generates (as MONAI's saver allows
            for ``final_filename`` / ``key_metric_filename``).
        kwargs: extra ``torch.save`` arguments.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False, **kwargs)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        if func is not torch.save:
            # torch_xla's xm.save must be entered by every process; keep Ignite's own handling there
            super()._save_func(checkpoint, path, func)
            return
        atomic_torch_save(checkpoint, path, save_fn=func, **self.kwargs)

    def remove(self, filename: str) -> None:
        """Delete an old checkpoint (Ignite's ``n_saved`` rotation); a file already gone is fine.

        Args:
            filename: the name Ignite generated (replaced by the fixed name when one is set).
        """
        from ignite import distributed as idist

        if idist.get_rank() == self.save_on_rank:
            (self.dirname / (self.filename or filename)).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` whose every checkpoint is written atomically.

    Same arguments and behaviour as MONAI's saver (file names such as ``checkpoint_epoch=3.pt``,
    ``checkpoint_final_iteration=100.pt``, ``checkpoint_key_metric=0.9.pt``); only the writing
    differs: see :class:`AtomicDiskSaver`. Usable from a bundle config as
    ``{"_target_": "engines.AtomicCheckpointSaver", ...}``.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: name → object with ``state_dict()`` (network, optimizer, lr scheduler, trainer...).
            Include the trainer, optimizer and scheduler to be able to resume.
        name: logger name; default: the engine's logger.
        file_prefix: prefix of the file names.
        save_final: save when the run completes or raises.
        final_filename: fixed name of the final checkpoint.
        save_key_metric: save when the key metric improves.
        key_metric_name: metric name in ``engine.state.metrics`` (default ``engine.state.key_metric_name``).
        key_metric_n_saved: how many best checkpoints to keep.
        key_metric_filename: fixed name of the best checkpoint (requires ``key_metric_n_saved=1``).
        key_metric_save_state: also save the saver's own ranking (``checkpointer`` key).
        key_metric_greater_or_equal: an equal score replaces the saved best.
        key_metric_negative_sign: negate the metric (for error-like metrics).
        epoch_level: ``save_interval`` counts epochs (``True``) or iterations.
        save_interval: save every N epochs/iterations; 0 disables.
        n_saved: keep the latest N interval checkpoints; ``None`` keeps all.

    Raises:
        TypeError: if MONAI's saver internals changed so that a save handler cannot be replaced
            (better to fail than to silently write non-atomically).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        name: str | None = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: str | None = None,
        key_metric_save_state: bool = False,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 0,
        n_saved: int | None = None,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            name=name,
            file_prefix=file_prefix,
            save_final=save_final,
            final_filename=final_filename,
            save_key_metric=save_key_metric,
            key_metric_name=key_metric_name,
            key_metric_n_saved=key_metric_n_saved,
            key_metric_filename=key_metric_filename,
            key_metric_save_state=key_metric_save_state,
            key_metric_greater_or_equal=key_metric_greater_or_equal,
            key_metric_negative_sign=key_metric_negative_sign,
            epoch_level=epoch_level,
            save_interval=save_interval,
            n_saved=n_saved,
        )
        # MONAI creates one Ignite Checkpoint per saving mode, each with its own non-atomic
        # DiskSaver subclass; swap each for an atomic one, keeping its folder and fixed filename
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is None:
                continue
            old = getattr(ckpt, "save_handler", None)
            if not isinstance(old, DiskSaver):
                raise TypeError(
                    f"AtomicCheckpointSaver: unexpected save handler {type(old)!r} in MONAI's CheckpointSaver; "
                    "cannot make it atomic."
                )
            ckpt.save_handler = AtomicDiskSaver(
                dirname=old.dirname, filename=getattr(old, "filename", None), **old.kwargs
            )


# "epoch=12" / "iteration=400" / "final_iteration=400" as Ignite writes them into file names
_STEP_RE = re.compile(r"(epoch|iteration)=(\d+)")
# tempfile names: ours (".name.xxxx.tmp") and Ignite's NamedTemporaryFile ("tmpab12_cd")
_IGNITE_TMP_RE = re.compile(r"^tmp[A-Za-z0-9_]{6,}$")


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") or name.endswith(".tmp") or bool(_IGNITE_TMP_RE.match(name))


def _is_complete_zip(path: Path) -> bool:
    # torch.save writes a zip; a truncated write loses the central directory at the end, which
    # opening the archive reads (cheap: the tensors themselves are not read)
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) > 0
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def find_latest_checkpoint(dirpath: str | os.PathLike, pattern: str = "*.pt") -> Path | None:
    """The newest complete checkpoint in a folder.

    Ranking: files whose names carry Ignite's step (``epoch=N`` or ``iteration=N``, including
    ``final_iteration=N``) rank by that number (so ``epoch=10`` beats ``epoch=9`` whatever their
    mtimes). Epochs and iterations cannot be compared, so when both kinds are present the best of
    each kind competes by modification time. Files without a step (e.g. ``key_metric=0.91``) are
    used only when no stepped file is usable, newest mtime first. Temporary files are skipped, and
    so is any file that is not a complete zip archive (a truncated save, or the legacy non-zip
    ``torch.save`` format), with a warning.

    Args:
        dirpath: the folder to search (not recursive).
        pattern: glob of checkpoint names.

    Returns:
        The chosen file, or ``None`` when the folder is missing or has no usable checkpoint.
    """
    folder = Path(dirpath)
    if not folder.is_dir():
        return None
    stepped: dict[str, list[tuple[int, float, Path]]] = {}
    unstepped: list[tuple[float, Path]] = []
    for p in folder.glob(pattern):
        if _is_temp_name(p.name) or not p.is_file():
            continue
        mtime = p.stat().st_mtime
        steps = _STEP_RE.findall(p.name)
        if steps:
            kind, num = steps[-1]
            stepped.setdefault(kind, []).append((int(num), mtime, p))
        else:
            unstepped.append((mtime, p))

    def first_complete(ordered: list[Path]) -> Path | None:
        for p in ordered:
            if _is_complete_zip(p):
                return p
            logger.warning("skipping checkpoint %s: not a complete torch.save archive (truncated?)", p)
        return None

    # the best complete file of each step kind, then the newest of those
    best: list[tuple[float, Path]] = []
    for items in stepped.values():
        p = first_complete([q for _, _, q in sorted(items, key=lambda t: (t[0], t[1]), reverse=True)])
        if p is not None:
            best.append((p.stat().st_mtime, p))
    if best:
        return max(best, key=lambda t: t[0])[1]
    return first_complete([p for _, p in sorted(unstepped, key=lambda t: t[0], reverse=True)])


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``, refusing files that carry code.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (default ``"cpu"``: load anywhere, move later).

    Returns:
        The checkpoint dict (name → state dict, or a single state dict).

    Raises:
        UnsafeCheckpointError: the file pickles classes or functions (code); loading it would run
            that code, so it is refused. The message names the file and the offending global.
        InputDataError: the file is missing, truncated/corrupt, or does not hold a dict. The
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError("checkpoint file does not exist", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        what = (
            f"it references {m.group(1)}"
            if m
            else "it contains objects other than tensors and plain containers"
        )
        raise UnsafeCheckpointError(
            f"checkpoint carries pickled code ({what}); it is refused for safety (loading it would execute that "
            "code). Re-save only the state_dict()s of trusted objects.",
            path,
        ) from e
    except Exception as e:  # torch raises RuntimeError/KeyError/EOFError... for damaged files
        raise InputDataError(
            f"cannot read checkpoint, the file is truncated or corrupt ({type(e).__name__}: {e})", path
        ) from e
    if not isinstance(ckpt, Mapping):
        raise InputDataError(
            f"checkpoint holds a {type(ckpt).__name__}, expected a dict of state dicts", path
        )
    return dict(ckpt)


def load_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    map_location: Any = "cpu",
    key: str = "model",
    hint: str = "",
) -> torch.nn.Module:
    """Load a network's weights from a checkpoint (a final ``{key: state_dict}`` file or a bare state dict).

    Args:
        network: the network to fill (weights copied in place, strictly: every key must match).
        path: the checkpoint.
        map_location: where tensors are loaded.
        key: the entry holding the state dict in a full checkpoint; a file without it is taken as the state
            dict itself (Ignite saves a one-object checkpoint that way).
        hint: appended to the missing-file message (e.g. which config trains this network).

    Returns:
        ``network`` in eval mode.

    Raises:
        InputDataError: naming the file: missing, unreadable, or weights that do not fit the network (another
            architecture or class count).
        UnsafeCheckpointError: the file carries pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError("checkpoint file does not exist" + (f"; {hint}" if hint else ""), path)
    ckpt = load_checkpoint(path, map_location)
    state = ckpt[key] if isinstance(ckpt.get(key), Mapping) else ckpt
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InputDataError(
            f"weights do not fit {type(network).__name__} (another architecture, latent size or class count?): "
            + " ".join(first[:3])[:500],
            path,
        ) from e
    return network.eval()


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    # np.random.RandomState.get_state(): ("MT19937", uint32[624] key, pos, has_gauss, cached_gaussian); the
    # ndarray would make torch.load(weights_only=True) refuse the file, so the key travels as an int64 tensor
    name, key, pos, has_gauss, cached = state
    return {
        "name": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_dict(d: Mapping[str, Any]) -> tuple:
    key = torch.as_tensor(d["key"]).cpu().numpy().astype(np.uint32)
    return (str(d["name"]), key, int(d["pos"]), int(d["has_gauss"]), float(d["cached_gaussian"]))


# leaves of the object walk in RNGState: values that cannot hold a Randomizable (tensors and arrays are the
# bulk of a cached dataset; skipping them keeps the walk to the containers)
_LEAVES = (
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
    torch.Tensor,
    np.ndarray,
    np.generic,
    torch.nn.Module,
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
)


def _randomizable_owners(root: Any) -> list[Any]:
    """Every object reachable from ``root`` that owns a NumPy ``RandomState`` as ``.R`` (MONAI ``Randomizable``).

    The walk goes through lists, tuples, mappings' values and objects' ``__dict__`` (not sets: unordered), as
    ``monai.data.utils.set_rnd`` does, but also into randomizable objects, whose nested transforms (e.g.
    ``RandAffined.rand_affine``) draw from their own ``R``. It is depth first in insertion order, so the same
    config gives the same list in every run. Each object is listed once.
    """
    owners: list[Any] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Mapping):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            children = list(obj)
        else:
            if isinstance(getattr(obj, "R", None), np.random.RandomState):
                owners.append(obj)
            attrs = getattr(obj, "__dict__", None)
            children = list(attrs.values()) if isinstance(attrs, dict) else []
        stack.extend(reversed(children))  # reversed: pop() then visits them in their own order
    return owners


class RNGState:
    """The state of the random number generators a training draws from, as a checkpointable object.

    Put it in both the ``save_dict`` of the checkpoint saver and the ``load_dict`` of
    :class:`ResumeCheckpointLoader` (e.g. ``"rng": {"_target_": "engines.RNGState", "randomizable":
    "@train#dataset"}``): a resumed run then draws the same shuffle order, diffusion timesteps, noise and
    augmentations as a run that was never stopped. Saved: Python's ``random``, NumPy's global RNG, torch's CPU
    RNG, every CUDA device's RNG (when CUDA is available) and the own NumPy ``RandomState`` (``.R``) of each
    MONAI ``Randomizable`` reachable from ``randomizable``: with ``num_workers=0`` MONAI's ``DataLoader`` seeds
    the dataset's random transforms once, at construction, and they then advance their own generators, which
    the global states do not include. (With workers, the transforms are reseeded in every epoch from torch's
    RNG, which is saved.) The DataLoader's shuffle order is drawn from torch's RNG when an epoch's iterator is
    created, so the state saved at the end of epoch ``k`` reproduces the order of epoch ``k + 1``.

    The state dict holds only tensors, numbers, strings and plain containers, so the checkpoint loads with
    ``torch.load(weights_only=True)``.

    Under DDP every rank is seeded alike (``set_determinism``) and only rank 0 saves; on loading, every rank's
    *current* CUDA device gets the state the saving rank had on *its* current device, which is what each
    rank's own device would have held in a run that was not stopped.

    Args:
        randomizable: an object (dataset, transform, data loader, or a list of them) whose MONAI
            ``Randomizable`` parts have their generators saved too; ``None``: global generators only.
    """

    def __init__(self, randomizable: Any = None) -> None:
        self.randomizable = randomizable
        self._owners: list[Any] | None = None

    def _randomizables(self) -> list[Any]:
        # the structure of a dataset does not change during a run; the walk (cheap, but linear in the number
        # of cached items) is done once. Each owner's .R is read at every call: set_random_state replaces it.
        if self._owners is None:
            self._owners = [] if self.randomizable is None else _randomizable_owners(self.randomizable)
        return self._owners

    def state_dict(self) -> dict[str, Any]:
        """The current states.

        Returns:
            ``{"python", "numpy", "torch", "cuda", "cuda_current", "randomizable"}``: Python's state as an int64
            tensor with its version and Gaussian cache, NumPy states as dicts, torch states as uint8 tensors
            (``cuda``: one per device, empty without CUDA; ``cuda_current``: the current device, -1 without
            CUDA).
        """
        version, internal, gauss_next = random.getstate()
        cuda = torch.cuda.is_available()
        return {
            "python": {
                "version": int(version),
                "internal": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
            # the legacy global RNG is the state to save: MONAI and user code draw from np.random.*
            "numpy": _numpy_state_to_dict(np.random.get_state()),  # noqa: NPY002
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if cuda else [],
            "cuda_current": torch.cuda.current_device() if cuda else -1,
            "randomizable": [_numpy_state_to_dict(o.R.get_state()) for o in self._randomizables()],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the states saved by :meth:`state_dict`.

        CUDA states are restored for the devices present (a warning when the counts differ, e.g. a checkpoint
        of a CPU run on a GPU machine: the CUDA generators then keep their seeded state). Transform states are
        restored only when the number of randomizable objects matches (another config: warning, left as
        seeded).

        Args:
            state_dict: a dict from :meth:`state_dict`, possibly loaded from a checkpoint.

        Raises:
            ValueError: when an entry is missing or malformed (names it).
        """
        try:
            py = state_dict["python"]
            internal = tuple(int(v) for v in torch.as_tensor(py["internal"]).tolist())
            gauss = py["gauss_next"]
            python_state = (int(py["version"]), internal, None if gauss is None else float(gauss))
            numpy_state = _numpy_state_from_dict(state_dict["numpy"])
            torch_state = torch.as_tensor(state_dict["torch"], dtype=torch.uint8).cpu()
            cuda_states = [torch.as_tensor(s, dtype=torch.uint8).cpu() for s in state_dict.get("cuda", [])]
            cuda_current = int(state_dict.get("cuda_current", -1))
            transform_states = [_numpy_state_from_dict(d) for d in state_dict.get("randomizable", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"RNGState: malformed state dict ({type(e).__name__}: {e})") from e
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
        torch.set_rng_state(torch_state)
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            if len(cuda_states) != n:
                logger.warning(
                    "RNGState: the checkpoint has %d CUDA RNG state(s), this machine %d devices; restoring the "
                    "first %d",
                    len(cuda_states),
                    n,
                    min(n, len(cuda_states)),
                )
            torch.cuda.set_rng_state_all(cuda_states[:n])
            if 0 <= cuda_current < len(cuda_states):
                torch.cuda.set_rng_state(cuda_states[cuda_current], torch.cuda.current_device())
        elif cuda_states:
            logger.warning(
                "RNGState: the checkpoint has CUDA RNG states but CUDA is not available; not restored"
            )
        owners = self._randomizables()
        if len(transform_states) != len(owners):
            logger.warning(
                "RNGState: the checkpoint has %d transform RNG state(s), the objects given hold %d randomizable "
                "parts (another config?); transform generators not restored",
                len(transform_states),
                len(owners),
            )
            return
        for owner, st in zip(owners, transform_states, strict=True):
            owner.R.set_state(st)


class ResumeCheckpointLoader(CheckpointLoader):
    """Resume from the newest checkpoint in a folder, or start fresh when there is none.

    At ``attach`` time the folder is searched with :func:`find_latest_checkpoint`; the file found is
    loaded (with :func:`load_checkpoint`, i.e. ``weights_only=True``) into ``load_dict`` when the
    engine starts. To resume training, ``load_dict`` must hold the trainer, optimizer and lr
    scheduler as they were saved, this handler must be the *first* in the trainer's handler list
    (so the others see the restored epoch), and ``max_epochs`` must be at least the saved epoch.
    Usable from a bundle config as ``{"_target_": "engines.ResumeCheckpointLoader", ...}``.

    Args:
        load_dir: the folder the checkpoints are saved in (may be missing or empty).
        load_dict: name → object with ``load_state_dict`` (same keys as the saver's ``save_dict``).
        resume: when ``False`` nothing is loaded.
        pattern: glob of checkpoint names in ``load_dir``.
        name: logger name; default: the engine's logger.
        map_location: passed to ``torch.load``; default ``"cpu"`` (``load_state_dict`` moves the
            values to the devices of the parameters).
        strict: require the checkpoint's keys to match the objects' state dicts.
        strict_shape: when ``False``, skip network layers whose shapes differ (and non-network items).

    Raises:
        UnsafeCheckpointError, InputDataError: at engine start, for a checkpoint that carries code
            or cannot be read (message names the file).
        RuntimeError: at engine start, when the checkpoint does not fit ``load_dict`` (names the file).
        ValueError: at engine start, when the saved epoch exceeds ``max_epochs``.
    """

    def __init__(
        self,
        load_dir: str | os.PathLike,
        load_dict: dict,
        resume: bool = True,
        pattern: str = "*.pt",
        name: str | None = None,
        map_location: Any = "cpu",
        strict: bool = True,
        strict_shape: bool = True,
    ) -> None:
        # the parent wants a path; the real one is only known at attach time
        super().__init__(
            load_path=os.fspath(load_dir),
            load_dict=load_dict,
            name=name,
            map_location=map_location,
            strict=strict,
            strict_shape=strict_shape,
        )
        self.load_dir = Path(load_dir)
        self.resume = bool(resume)
        self.pattern = pattern
        self.checkpoint_path: Path | None = None

    def attach(self, engine: Engine) -> None:
        """Find the checkpoint and, if there is one and ``resume`` is set, load it at ``STARTED``.

        Args:
            engine: the Ignite engine (usually the trainer).
        """
        if self._name is None:
            self.logger = engine.logger
        if not self.resume:
            self.logger.info("resume disabled: no checkpoint loaded, starting fresh")
            return
        self.checkpoint_path = find_latest_checkpoint(self.load_dir, self.pattern)
        if self.checkpoint_path is None:
            self.logger.info(f"no checkpoint in {self.load_dir}, starting fresh")
            return
        self.load_path = os.fspath(self.checkpoint_path)
        self.logger.info(f"will resume from {self.load_path}")
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Load the checkpoint into ``load_dict`` (the logic of MONAI's loader, with a safe, checked load).

        Args:
            engine: the engine being started.
        """
        # MONAI's __call__ calls torch.load itself; it is reproduced here so that loading goes
        # through load_checkpoint's checks and error messages
        checkpoint = load_checkpoint(self.load_path, map_location=self.map_location)
        k, _ = next(iter(self.load_dict.items()))
        # single object and checkpoint is directly its state_dict
        if len(self.load_dict) == 1 and k not in checkpoint:
            checkpoint = {k: checkpoint}
        load_dict = dict(self.load_dict)
        if not self.strict_shape:
            for key, obj in list(load_dict.items()):
                if isinstance(obj, torch.nn.Module):
                    # copy from the object's own entry: MONAI 1.6 passes the whole checkpoint here,
                    # whose "key.layer" names match nothing, so no weight would be loaded
                    checkpoint[key] = copy_model_state(obj, checkpoint.get(key, {}), inplace=False)[0]
                else:
                    logger.warning("strict_shape=False: loading networks only, skipping %r", key)
                    load_dict.pop(key)
        for key, obj in list(load_dict.items()):
            if key in checkpoint:
                if isinstance(obj, Engine) and isinstance(checkpoint[key], Mapping):
                    checkpoint[key] = self._fill_user_keys(obj, checkpoint[key])
            elif isinstance(obj, RNGState):
                # checkpoints written before the RNG state was saved: resume all else; only the random
                # draws (shuffle order, noise, augmentation) then differ from an uninterrupted run
                self.logger.warning(
                    f"{self.load_path} has no {key!r} entry (saved before RNG states were checkpointed): "
                    "resuming without restoring the random generators"
                )
                load_dict.pop(key)
        # keep the engine's max_epochs: the saved state carries the old run's value
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=load_dict, checkpoint=checkpoint, strict=self.strict)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RuntimeError(f"{self.load_path}: checkpoint does not fit the objects to load ({e})") from e
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"{self.load_path}: the checkpoint is at epoch {engine.state.epoch}, beyond max_epochs="
                f"{prior_max_epochs}; raise max_epochs to continue training."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(
            f"Restored all variables from {self.load_path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})"
        )

    def _fill_user_keys(self, engine: Engine, saved: Mapping) -> Mapping:
        """Default the engine's ``state_dict_user_keys`` that a checkpoint lacks to their current values.

        Ignite refuses a state dict without every registered user key; a key registered by a newer handler
        (e.g. the elapsed time of :class:`engines.TimeBudget`) must not make older checkpoints unusable.
        """
        missing = [k for k in engine.state_dict_user_keys if k not in saved]
        if not missing:
            return saved
        self.logger.warning(
            f"{self.load_path}: the engine state lacks {missing} (an older checkpoint); keeping their current values"
        )
        return {**saved, **{k: getattr(engine.state, k, None) for k in missing}}
