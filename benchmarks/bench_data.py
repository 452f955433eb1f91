"""Slices per second served by anoddpm_simplex's training data pipeline: cached volumes against re-loading.

The pipeline is the bundle's own (``bundles/anoddpm_simplex/configs/train.json``: ``slice_pipeline`` = volume
loading, orientation, percentile scaling, ``VolumeToSlicesd`` with the brain-fraction filter, ``Resized``,
``SpatialPadd``; then ``train#augmentation`` per slice), run over the T1w volumes of a demo cohort. An epoch
serves every slice once, augmented, in batches of the config's ``batch_size``. Three ways:

* ``Dataset``: MONAI's plain ``Dataset`` over the volumes, loading and slicing every volume again every epoch
  (the naive way, and the reference of the ratios);
* ``CacheDataset``: MONAI's ``CacheDataset`` over the volumes, which caches the output of the deterministic
  transforms (each volume's list of prepared slices) and runs only the augmentation per epoch;
* ``SliceDataset`` (what the bundle trains with): ``engines.SliceDataset`` keeps the prepared slices as
  independent items, so MONAI's ``DataLoader`` shuffles and batches slices across volumes (``shuffle``,
  ``drop_last`` and ``num_workers`` from the config).

The one-off cost of filling a cache is reported apart. Usage::

    python benchmarks/bench_data.py [--cohort DIR] [--subjects 8] [--repeats 5] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Transform

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._bundles import build_cohort, bundle_parser  # noqa: E402

__all__ = ["measure_pipeline", "volume_items"]


def volume_items(cohort: str | Path, datalist: str = "anomaly_supervised_t1w.json") -> list[dict[str, str]]:
    """Every T1w volume of the cohort with its brain mask (all sections of the datalist, each volume once).

    Args:
        cohort: the demo cohort folder.
        datalist: the datalist file in ``datalists/``.

    Returns:
        Items ``{"image", "brain_mask"}``.
    """
    from data_prep.datalist import load_datalist

    path = str(Path(cohort) / "datalists" / datalist)
    seen: dict[str, dict[str, str]] = {}
    for section in ("training", "validation", "test"):
        for it in load_datalist(path, section, required_keys=("image", "brain_mask")):
            seen.setdefault(str(it["image"]), {"image": it["image"], "brain_mask": it["brain_mask"]})
    return list(seen.values())


class _Deterministic(Transform):
    """A deterministic pipeline (a ``Compose``) seen by ``CacheDataset`` as one non-random transform."""

    def __init__(self, pipeline: Callable[[Any], Any]) -> None:
        self.pipeline = pipeline

    def __call__(self, data: Any) -> Any:
        return self.pipeline(data)


def _volume_epoch(dataset: Any, batch_size: int) -> Callable[[], int]:
    """An epoch over a dataset of volumes (each item a list of slices), re-batched into slice batches as a
    slice loader would serve them; returns the number of slices served."""
    from monai.data import DataLoader, list_data_collate

    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0, collate_fn=lambda b: b[0])

    def epoch() -> int:
        pending: list[dict[str, Any]] = []
        served = 0
        for slices in loader:
            pending.extend(slices)
            while len(pending) >= batch_size:
                list_data_collate(pending[:batch_size])
                pending = pending[batch_size:]
                served += batch_size
        return served  # the remainder is dropped, as drop_last does

    return epoch


def _loader_epoch(loader: Iterable[Any]) -> Callable[[], int]:
    def epoch() -> int:
        return sum(int(batch["image"].shape[0]) for batch in loader)

    return epoch


def measure_pipeline(
    cohort: str | Path,
    repeats: int = 5,
    batch_size: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Slices/s of the three ways (see the module docstring), each the median over ``repeats`` epochs.

    Args:
        cohort: the demo cohort folder.
        repeats: timed epochs per way (the plain ``Dataset`` is warmed up by one untimed epoch too).
        batch_size: slices per batch (default: the config's ``batch_size``).
        threads: torch intra-op threads (default: unchanged).

    Returns:
        ``{"volumes", "slices", "batch", "rows": [{"way", "slices_per_s", "epoch_s", "cache_s", "ratio"}]}``
        where ``ratio`` is slices/s over the plain ``Dataset``'s.
    """
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from engines import SliceDataset

    if threads:
        torch.set_num_threads(threads)
    set_determinism(seed=0)
    parser = bundle_parser("anoddpm_simplex", ["train.json"], "cpu", cohort)
    bs = int(batch_size or parser.get_parsed_content("batch_size"))
    num_workers = int(parser.get_parsed_content("num_workers"))
    slice_pipeline = parser.get_parsed_content("slice_pipeline")
    augmentation = parser.get_parsed_content("train#augmentation")
    drop_keys = parser.get_parsed_content("train#dataset#drop_keys")
    items = volume_items(cohort)
    # CacheDataset caches up to the first random transform of its top-level list, and a nested Compose counts as
    # random (Compose is Randomizable; the bundle's InputCheckedCompose is not flattened): the deterministic
    # pipeline goes in as one non-random transform, so its output (the volume's prepared slices) is cached
    full = Compose([_Deterministic(slice_pipeline), augmentation]).flatten()

    rows: list[dict[str, Any]] = []

    def timed(way: str, epoch: Callable[[], int], cache_s: float | None, warmup: int) -> None:
        for _ in range(warmup):
            epoch()
        times, served = [], 0
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            served = epoch()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append(
            {"way": way, "slices_per_s": served / med, "epoch_s": med, "cache_s": cache_s, "slices": served}
        )
        print(f"  data {way}: {served / med:.0f} slices/s", flush=True)

    timed("Dataset (re-load every epoch)", _volume_epoch(Dataset(items, transform=full), bs), None, warmup=1)

    t0 = time.perf_counter()
    cached = CacheDataset(items, transform=full, progress=False)
    cache_s = time.perf_counter() - t0
    timed("CacheDataset (cached volumes)", _volume_epoch(cached, bs), cache_s, warmup=0)

    t0 = time.perf_counter()
    slices = SliceDataset(items, volume_transform=slice_pipeline, transform=augmentation, drop_keys=drop_keys)
    cache_s = time.perf_counter() - t0
    loader = DataLoader(slices, batch_size=bs, shuffle=True, drop_last=True, num_workers=num_workers)
    timed("SliceDataset + DataLoader (the bundle's)", _loader_epoch(loader), cache_s, warmup=0)

    ref = rows[0]["slices_per_s"]
    for r in rows:
        r["ratio"] = r["slices_per_s"] / ref
    return {
        "volumes": len(items),
        "slices": len(slices),
        "batch": bs,
        "num_workers": num_workers,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print the rows as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", type=Path, default=None, help="demo cohort folder (built if missing)")
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        cohort = build_cohort(a.cohort or Path(tmp) / "cohort", a.subjects)
        out = measure_pipeline(cohort, a.repeats, a.batch, a.threads)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
