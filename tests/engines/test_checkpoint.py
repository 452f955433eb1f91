"""Atomic checkpoint saving, choosing the newest complete checkpoint, safe loading and exact resume."""

from __future__ import annotations

import logging
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import LrScheduleHandler
from monai.transforms import Compose, RandAffined, RandGaussianNoised

import engines.checkpoint as ckpt_mod
from engines import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    ResumeCheckpointLoader,
    RNGState,
    TimeBudget,
    UnsafeCheckpointError,
    atomic_torch_save,
    find_latest_checkpoint,
    load_checkpoint,
)
from tests.engines._toy import ITERS_PER_EPOCH, make_parts, make_trainer
from transforms.errors import InputDataError


class _Custom:
    """A user class: pickling it stores a reference to code, which weights_only loading refuses."""

    def __init__(self) -> None:
        self.value = 1


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.arange(3)}, path)

    def broken_save(obj: object, f: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))  # old content intact


def test_atomic_save_permissions_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        p = atomic_torch_save({"a": torch.ones(1)}, tmp_path / "sub" / "a.pt")
        assert _mode(p) == 0o666 & ~0o027  # 0o640, not mkstemp's 0o600
    finally:
        os.umask(old)
    p = atomic_torch_save({"a": torch.ones(1)}, tmp_path / "b.pt")
    assert _mode(p) == 0o666 & ~old


def test_atomic_saver_in_trainer(tmp_path: Path) -> None:
    net, opt, _ = make_parts()
    trainer = make_trainer(net, opt, 3)
    save_dict = {"net": net, "opt": opt, "trainer": trainer}
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict=save_dict, save_interval=1, n_saved=None, save_final=True
    )
    for c in (saver._interval_checkpoint, saver._final_checkpoint):
        assert isinstance(c.save_handler, AtomicDiskSaver)
    saver.attach(trainer)
    trainer.run()

    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"checkpoint_epoch={e}.pt" for e in (1, 2, 3)] + [
        f"checkpoint_final_iteration={3 * ITERS_PER_EPOCH}.pt"
    ]
    assert names == sorted(expected)  # nothing else: no .tmp / ignite tmp leftovers
    for e in (1, 2, 3):
        path = tmp_path / f"checkpoint_epoch={e}.pt"
        c = load_checkpoint(path)
        assert set(c) == {"net", "opt", "trainer"}
        assert c["trainer"]["iteration"] == e * ITERS_PER_EPOCH
        assert _mode(path) == ckpt_mod.default_file_mode()
    final = load_checkpoint(tmp_path / expected[-1])
    assert all(torch.equal(final["net"][k], v) for k, v in net.state_dict().items())


def test_atomic_saver_from_bundle_config(tmp_path: Path) -> None:
    """As listed in a bundle's handlers; a fixed final_filename is kept."""
    net, opt, _ = make_parts()
    parser = ConfigParser(
        {
            "saver": {
                "_target_": "engines.AtomicCheckpointSaver",
                "save_dir": str(tmp_path),
                "save_dict": {"net": "@net"},
                "save_final": True,
                "final_filename": "model.pt",
            },
        }
    )
    parser["net"] = net  # a bundle would build it from its own config
    saver = parser.get_parsed_content("saver")
    assert isinstance(saver, AtomicCheckpointSaver)
    make_trainer(net, opt, 1, [saver]).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    state = load_checkpoint(tmp_path / "model.pt")  # single object: saved as its bare state dict
    assert set(state) == set(net.state_dict())


def test_find_latest_checkpoint(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    good = {"w": torch.ones(2)}
    e10 = atomic_torch_save(good, tmp_path / "checkpoint_epoch=10.pt")
    e9 = atomic_torch_save(good, tmp_path / "checkpoint_epoch=9.pt")
    os.utime(e10, (1_000, 1_000))  # epoch=9 has the newer mtime: the number must win, not the mtime
    # a crash mid-save: bigger number, newest mtime, but truncated
    _truncated_copy(e10, tmp_path / "checkpoint_epoch=11.pt")
    # temp files of an interrupted atomic save (ours, and Ignite's NamedTemporaryFile)
    (tmp_path / ".checkpoint_epoch=12.pt.abc123.tmp").write_bytes(e9.read_bytes())
    (tmp_path / "tmpa1b2c3d4").write_bytes(e9.read_bytes())
    assert find_latest_checkpoint(tmp_path) == e10
    assert find_latest_checkpoint(tmp_path, pattern="*") == e10

    # names without a step number: newest mtime
    other = tmp_path / "best"
    old = atomic_torch_save(good, other / "net_key_metric=0.9.pt")
    new = atomic_torch_save(good, other / "net_key_metric=0.8.pt")
    os.utime(old, (1_000, 1_000))
    assert find_latest_checkpoint(other) == new
    # a stepped file is preferred to unstepped ones
    it = atomic_torch_save(good, other / "checkpoint_final_iteration=100.pt")
    os.utime(it, (500, 500))
    assert find_latest_checkpoint(other) == it


def test_load_checkpoint_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"net": {"w": torch.ones(1)}, "extra": _Custom()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused for safety") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    assert "_Custom" in str(e.value)


def test_load_checkpoint_corrupt_and_missing(tmp_path: Path) -> None:
    good = atomic_torch_save({"w": torch.ones(4)}, tmp_path / "good.pt")
    bad = _truncated_copy(good, tmp_path / "bad.pt")
    with pytest.raises(InputDataError, match="truncated or corrupt") as e:
        load_checkpoint(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(InputDataError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def _train(max_epochs: int, ckpt_dir: Path, resume: bool | None) -> tuple:
    """Train the toy net; resume=None attaches no loader. Handler order: loader first, then the
    lr scheduler, then the saver (so a checkpoint holds the scheduler state after this epoch's step)."""
    net, opt, sched = make_parts(seed=0)
    trainer = make_trainer(net, opt, max_epochs)
    save_dict = {"net": net, "opt": opt, "sched": sched, "trainer": trainer}
    if resume is not None:
        ResumeCheckpointLoader(load_dir=ckpt_dir, load_dict=save_dict, resume=resume).attach(trainer)
    LrScheduleHandler(sched, print_lr=False).attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), save_dict, save_interval=1, n_saved=2).attach(trainer)
    start = {}

    @trainer.on(Events.STARTED)
    def _started(engine) -> None:  # runs after the loader (attached earlier)
        start["epoch"], start["iteration"] = engine.state.epoch, engine.state.iteration

    trainer.run()
    return net, opt, trainer, start


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    ref_net, ref_opt, ref_trainer, _ = _train(4, tmp_path / "ref", resume=None)

    run_dir = tmp_path / "run"
    _, _, first, _ = _train(2, run_dir, resume=True)  # empty folder: starts fresh
    assert first.state.epoch == 2
    assert find_latest_checkpoint(run_dir).name == "checkpoint_epoch=2.pt"

    net, opt, trainer, start = _train(4, run_dir, resume=True)
    assert start == {"epoch": 2, "iteration": 2 * ITERS_PER_EPOCH}  # restored before training
    assert trainer.state.epoch == 4
    assert trainer.state.iteration == ref_trainer.state.iteration == 4 * ITERS_PER_EPOCH
    # equal only if weights, momentum buffers and the scheduler's epoch count were all restored
    for (k, a), b in zip(net.state_dict().items(), ref_net.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-7), k
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    # a new saver does not know the files of the earlier run: n_saved=2 rotates within each run only
    assert sorted(p.name for p in run_dir.iterdir()) == [f"checkpoint_epoch={e}.pt" for e in (1, 2, 3, 4)]


def test_resume_disabled_starts_fresh(tmp_path: Path) -> None:
    _train(2, tmp_path, resume=True)
    _, _, trainer, start = _train(3, tmp_path, resume=False)
    assert start == {"epoch": 0, "iteration": 0}
    assert trainer.state.iteration == 3 * ITERS_PER_EPOCH


def test_resume_from_unsafe_checkpoint_names_file(tmp_path: Path) -> None:
    net, opt, _ = make_parts()
    path = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"net": net.state_dict(), "x": _Custom()}, path)
    trainer = make_trainer(net, opt, 2)
    ResumeCheckpointLoader(tmp_path, {"net": net}).attach(trainer)
    with pytest.raises(UnsafeCheckpointError, match="refused") as e:
        trainer.run()
    assert str(path) in str(e.value)


def test_resume_checkpoint_not_matching_names_file(tmp_path: Path) -> None:
    net, opt, _ = make_parts()
    path = atomic_torch_save(
        {"net": {"bogus": torch.ones(1)}, "opt": opt.state_dict()}, tmp_path / "c_epoch=1.pt"
    )
    trainer = make_trainer(net, opt, 2)
    ResumeCheckpointLoader(tmp_path, {"net": net, "opt": opt}).attach(trainer)
    with pytest.raises(RuntimeError, match="does not fit") as e:
        trainer.run()
    assert str(path) in str(e.value)


def test_resume_strict_shape_false_loads_matching_layers(tmp_path: Path) -> None:
    """Transfer to a net with another head: matching layers are loaded (MONAI 1.6's own loader
    copies from the whole checkpoint dict here and so loads nothing)."""
    src, _, _ = make_parts(seed=1)
    atomic_torch_save({"net": src.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    torch.manual_seed(5)
    dst = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    head = dst[2].weight.detach().clone()
    trainer = make_trainer(dst, torch.optim.SGD(dst.parameters(), lr=0.1), 1)
    loader = ResumeCheckpointLoader(tmp_path, {"net": dst}, strict_shape=False)
    loader.attach(trainer)
    loader(trainer)
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[0].bias, src[0].bias)
    assert torch.equal(dst[2].weight, head)  # shape differs: kept


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global RNG is what RNGState saves
    torch.manual_seed(seed)


def _augmentation() -> Compose:
    return Compose(
        [
            RandAffined(keys="image", prob=0.5, rotate_range=0.3, translate_range=(1, 1)),
            RandGaussianNoised(keys="image", prob=0.5),
        ]
    )


def _draws(aug: Compose, image: torch.Tensor) -> list:
    """Values from every generator RNGState covers (with the Gaussian caches of random and NumPy in use)."""
    return [
        random.random(),
        random.gauss(0.0, 1.0),
        float(np.random.rand()),  # noqa: NPY002
        float(np.random.standard_normal()),  # noqa: NPY002
        torch.rand(4).tolist(),
        aug({"image": image.clone()})["image"].tolist(),
    ]


def test_rng_state_round_trip_loads_weights_only(tmp_path: Path) -> None:
    aug = _augmentation()
    aug.set_random_state(7)  # as MONAI's DataLoader seeds a dataset's transforms
    owners = ckpt_mod._randomizable_owners({"dataset": [aug]})
    # the Compose, both transforms and the array transforms inside them draw from their own generators
    assert aug in owners and aug.transforms[0] in owners and aug.transforms[0].rand_affine in owners
    assert len(owners) == len({id(o) for o in owners})

    _seed_all(1)
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian in random's state ...
    np.random.standard_normal()  # noqa: NPY002 - ... and in NumPy's (has_gauss=1)
    image = torch.rand(1, 8, 8)
    path = atomic_torch_save({"rng": RNGState(aug).state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    expected = _draws(aug, image)

    _seed_all(99)
    aug.set_random_state(99)
    assert _draws(aug, image) != expected
    state = load_checkpoint(path)["rng"]  # torch.load(weights_only=True): no ndarray, no pickled class
    RNGState(aug).load_state_dict(state)  # a second instance, as the loader's load_dict holds its own
    assert _draws(aug, image) == expected
    if not torch.cuda.is_available():
        assert state["cuda"] == [] and state["cuda_current"] == -1


def test_rng_state_malformed_and_other_config() -> None:
    with pytest.raises(ValueError, match="malformed"):
        RNGState().load_state_dict({"python": {}})
    aug = _augmentation()
    state = RNGState().state_dict()  # saved without transforms
    before = aug.transforms[1].R.get_state()[1].copy()
    RNGState(aug).load_state_dict(state)  # global generators restored; transforms left as they are (warning)
    assert np.array_equal(aug.transforms[1].R.get_state()[1], before)


def _shuffled_run(max_epochs: int, ckpt_dir: Path, with_rng: bool = True) -> list[tuple]:
    """A trainer over a shuffling DataLoader whose step draws from torch, random and NumPy; it resumes from
    ``ckpt_dir`` and saves there every epoch. Returns (iteration, batch, draws) of every iteration run."""
    _seed_all(0)  # as the bundles' set_determinism at every start, resumed or not
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True)
    seen: list[tuple] = []

    def step(engine: Engine, batch: torch.Tensor) -> None:
        draws = (torch.rand(1).item(), random.random(), float(np.random.rand()))  # noqa: NPY002
        seen.append((engine.state.iteration, batch.tolist(), draws))

    trainer = Engine(step)
    objs: dict = {"trainer": trainer, "rng": RNGState()} if with_rng else {"trainer": trainer}
    ResumeCheckpointLoader(ckpt_dir, objs).attach(trainer)
    AtomicCheckpointSaver(str(ckpt_dir), objs, save_interval=1, n_saved=2).attach(trainer)
    trainer.run(loader, max_epochs=max_epochs)
    return seen


def test_resume_restores_shuffle_order_and_random_draws(tmp_path: Path) -> None:
    ref = _shuffled_run(3, tmp_path / "ref")
    assert [b for _, b, _ in ref[:4]] != [b for _, b, _ in ref[4:8]]  # the order changes between epochs

    _shuffled_run(2, tmp_path / "run")
    assert "rng" in load_checkpoint(tmp_path / "run" / "checkpoint_epoch=2.pt")
    resumed = _shuffled_run(3, tmp_path / "run")
    assert resumed == ref[8:]  # epoch 3: same iterations, same batches, same random numbers

    # without the RNG state the resumed epoch replays the seeded start instead (what this test guards against)
    _shuffled_run(2, tmp_path / "no_rng", with_rng=False)
    assert _shuffled_run(3, tmp_path / "no_rng", with_rng=False) != ref[8:]


def test_resume_old_checkpoint_without_rng_or_budget_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoints written before RNG states and budget time were saved still resume, with warnings."""
    net, opt, _ = make_parts()
    old_trainer = make_trainer(net, opt, 1)
    AtomicCheckpointSaver(str(tmp_path), {"net": net, "trainer": old_trainer}, save_interval=1).attach(
        old_trainer
    )
    old_trainer.run()
    assert set(load_checkpoint(tmp_path / "checkpoint_epoch=1.pt")["trainer"]) == {
        "epoch_length",
        "iteration",
        "max_epochs",
    }

    trainer = make_trainer(net, opt, 2, [TimeBudget(10.0)])
    loader = ResumeCheckpointLoader(tmp_path, {"net": net, "trainer": trainer, "rng": RNGState()})
    loader.attach(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.run()
    assert trainer.state.iteration == 2 * ITERS_PER_EPOCH  # resumed at epoch 1, not restarted
    assert "has no 'rng' entry" in caplog.text
    assert "budget_elapsed_seconds" in caplog.text


def test_rng_state_cuda_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA generators (faked: no GPU needed): all devices are saved; on loading, all are restored and the
    current device gets the state of the device current at saving (DDP: rank r's cuda:r continues from the
    saving rank's cuda:0, as it would have in the uninterrupted run, every rank being seeded alike)."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    restored: dict[int, torch.Tensor] = {}
    current = {"device": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(int(device), s))
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda ss: [restored.__setitem__(i, s) for i, s in enumerate(ss)]
    )

    saved = RNGState().state_dict()
    assert saved["cuda_current"] == 0 and [int(s[0]) for s in saved["cuda"]] == [0, 1, 2]
    current["device"] = 2  # the loading process trains on cuda:2
    RNGState().load_state_dict(saved)
    assert {d: int(s[0]) for d, s in restored.items()} == {0: 0, 1: 1, 2: 0}
