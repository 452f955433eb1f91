"""MONAI-style transforms for diffusion-model pipelines on 3D medical volumes and their 2D slices.

Array transforms take channel-first tensors (usually MetaTensors from ``LoadImage`` +
``EnsureChannelFirst``); every ``Foo`` has a dictionary version ``Food`` (aliases ``FooD``, ``FooDict``).
Problems with input files raise :class:`InputDataError`, whose message names the file.

Names are resolved lazily (PEP 562): importing MONAI takes seconds, and code that only needs
``transforms.errors`` (the data_prep command line, datalist checks) should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transforms.errors import InputDataError, source_name

if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from transforms.corruptions import (
        CORRUPTIONS,
        SEVERITIES,
        Corrupt,
        CorruptD,
        Corruptd,
        CorruptDict,
        corrupt,
        corruption_grid,
        corruption_seed,
        robust_max,
    )
    from transforms.intensity import (
        MaskedZScore,
        MaskedZScoreD,
        MaskedZScored,
        MaskedZScoreDict,
        PercentileScaleIntensity,
        PercentileScaleIntensityD,
        PercentileScaleIntensityd,
        PercentileScaleIntensityDict,
        quantiles,
    )
    from transforms.labels import (
        AMBIGUOUS,
        SliceClassLabelD,
        SliceClassLabeld,
        SliceClassLabelDict,
        known_class_only,
    )
    from transforms.mask import (
        ForegroundMask,
        ForegroundMaskD,
        ForegroundMaskd,
        ForegroundMaskDict,
        largest_component,
        otsu_threshold,
    )
    from transforms.pipeline import (
        GreyscaleD,
        Greyscaled,
        GreyscaleDict,
        InputCheckedCompose,
        LoadVolumeD,
        LoadVolumed,
        LoadVolumeDict,
        find_input_error,
        slice_loading_transforms,
        volume_loading_transforms,
    )
    from transforms.slicing import (
        SLICE_META_KEYS,
        SlicesToVolume,
        SlicesToVolumeD,
        SlicesToVolumed,
        SlicesToVolumeDict,
        VolumeToSlices,
        VolumeToSlicesD,
        VolumeToSlicesd,
        VolumeToSlicesDict,
        foreground_fraction,
        slice_affine_2d,
        slice_affine_3d,
    )
    from transforms.validate import (
        CheckImage,
        CheckImageD,
        CheckImaged,
        CheckImageDict,
        CheckMaskMatches,
        CheckMaskMatchesD,
        CheckMaskMatchesd,
        CheckMaskMatchesDict,
        check_finite,
        count_nonfinite,
        image_name,
        prepare_mask,
    )

# public name -> submodule that defines it
_LAZY = {
    "CORRUPTIONS": "corruptions",
    "SEVERITIES": "corruptions",
    "Corrupt": "corruptions",
    "CorruptD": "corruptions",
    "Corruptd": "corruptions",
    "CorruptDict": "corruptions",
    "corrupt": "corruptions",
    "corruption_grid": "corruptions",
    "corruption_seed": "corruptions",
    "robust_max": "corruptions",
    "RandSimplexNoise": "simplex",
    "RandSimplexNoiseD": "simplex",
    "RandSimplexNoised": "simplex",
    "RandSimplexNoiseDict": "simplex",
    "simplex_noise": "simplex",
    "simplex_noise_like": "simplex",
    "simplex3": "simplex",
    "simplex3_reference": "simplex",
    "MaskedZScore": "intensity",
    "MaskedZScoreD": "intensity",
    "MaskedZScored": "intensity",
    "MaskedZScoreDict": "intensity",
    "PercentileScaleIntensity": "intensity",
    "PercentileScaleIntensityD": "intensity",
    "PercentileScaleIntensityd": "intensity",
    "PercentileScaleIntensityDict": "intensity",
    "quantiles": "intensity",
    "AMBIGUOUS": "labels",
    "SliceClassLabelD": "labels",
    "SliceClassLabeld": "labels",
    "SliceClassLabelDict": "labels",
    "known_class_only": "labels",
    "ForegroundMask": "mask",
    "ForegroundMaskD": "mask",
    "ForegroundMaskd": "mask",
    "ForegroundMaskDict": "mask",
    "largest_component": "mask",
    "otsu_threshold": "mask",
    "InputCheckedCompose": "pipeline",
    "LoadVolumeD": "pipeline",
    "LoadVolumed": "pipeline",
    "LoadVolumeDict": "pipeline",
    "find_input_error": "pipeline",
    "GreyscaleD": "pipeline",
    "GreyscaleDict": "pipeline",
    "Greyscaled": "pipeline",
    "slice_loading_transforms": "pipeline",
    "volume_loading_transforms": "pipeline",
    "SLICE_META_KEYS": "slicing",
    "SlicesToVolume": "slicing",
    "SlicesToVolumeD": "slicing",
    "SlicesToVolumed": "slicing",
    "SlicesToVolumeDict": "slicing",
    "VolumeToSlices": "slicing",
    "VolumeToSlicesD": "slicing",
    "VolumeToSlicesd": "slicing",
    "VolumeToSlicesDict": "slicing",
    "foreground_fraction": "slicing",
    "slice_affine_2d": "slicing",
    "slice_affine_3d": "slicing",
    "CheckImage": "validate",
    "CheckImageD": "validate",
    "CheckImaged": "validate",
    "CheckImageDict": "validate",
    "CheckMaskMatches": "validate",
    "CheckMaskMatchesD": "validate",
    "CheckMaskMatchesd": "validate",
    "CheckMaskMatchesDict": "validate",
    "check_finite": "validate",
    "count_nonfinite": "validate",
    "image_name": "validate",
    "prepare_mask": "validate",
}

__all__ = [
    "AMBIGUOUS",
    "CORRUPTIONS",
    "SEVERITIES",
    "SLICE_META_KEYS",
    "CheckImage",
    "CheckImageD",
    "CheckImageDict",
    "CheckImaged",
    "CheckMaskMatches",
    "CheckMaskMatchesD",
    "CheckMaskMatchesDict",
    "CheckMaskMatchesd",
    "Corrupt",
    "CorruptD",
    "CorruptDict",
    "Corruptd",
    "ForegroundMask",
    "ForegroundMaskD",
    "ForegroundMaskDict",
    "ForegroundMaskd",
    "GreyscaleD",
    "GreyscaleDict",
    "Greyscaled",
    "InputCheckedCompose",
    "InputDataError",
    "LoadVolumeD",
    "LoadVolumeDict",
    "LoadVolumed",
    "MaskedZScore",
    "MaskedZScoreD",
    "MaskedZScoreDict",
    "MaskedZScored",
    "PercentileScaleIntensity",
    "PercentileScaleIntensityD",
    "PercentileScaleIntensityDict",
    "PercentileScaleIntensityd",
    "RandSimplexNoise",
    "RandSimplexNoiseD",
    "RandSimplexNoiseDict",
    "RandSimplexNoised",
    "SliceClassLabelD",
    "SliceClassLabelDict",
    "SliceClassLabeld",
    "SlicesToVolume",
    "SlicesToVolumeD",
    "SlicesToVolumeDict",
    "SlicesToVolumed",
    "VolumeToSlices",
    "VolumeToSlicesD",
    "VolumeToSlicesDict",
    "VolumeToSlicesd",
    "check_finite",
    "corrupt",
    "corruption_grid",
    "corruption_seed",
    "count_nonfinite",
    "find_input_error",
    "foreground_fraction",
    "image_name",
    "known_class_only",
    "largest_component",
    "otsu_threshold",
    "prepare_mask",
    "quantiles",
    "robust_max",
    "simplex3",
    "simplex3_reference",
    "simplex_noise",
    "simplex_noise_like",
    "slice_affine_2d",
    "slice_affine_3d",
    "slice_loading_transforms",
    "source_name",
    "volume_loading_transforms",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'transforms' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"transforms.{module}"), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
