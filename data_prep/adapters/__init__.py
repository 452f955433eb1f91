"""Dataset adapters: datasets as downloaded → MONAI datalist JSON files (``python -m data_prep <adapter>``).

Each adapter is a function ``adapter(root, out, ...) -> list[Path]`` that recognises one on-disk
layout, splits by subject with a fixed seed (:func:`data_prep.datalist.split_by_subject`) and writes
with :func:`data_prep.datalist.write_datalist` (paths relative to the datalist). Output conventions:

- ``anomaly.json`` (``brats``, ``ixi``, ``fastmri_png``): ``training``/``validation`` hold healthy items
  ``{"image", "subject"}``; ``test`` holds ``{"image", "subject", "kind", "label": lesion mask}``
  (``label`` absent for healthy test items, ``kind`` = ``"healthy"``/``"glioma"``/pathology name);
- ``classification_binary.json``/``classification_multiclass.json`` (``kaggle_tumor``): items
  ``{"image", "label": int, "class_name", "subject"}`` and top-level ``labels``;
- ``studies.json`` (``chexpert``): items ``{"views", "view_names", "labels", "subject", "study"}`` and
  top-level ``findings``;
- ``folder.json`` (``folder``): items ``{"image", "subject"[, "label", "mask", "kind"]}``.

Subject IDs come from the datasets' own pseudonymous folder/file names, or from a hash of the path;
patient-identifying DICOM tags are never read.
"""

from __future__ import annotations

from data_prep.adapters._common import Adapter
from data_prep.adapters.brats import ADAPTER as _BRATS
from data_prep.adapters.brats import brats
from data_prep.adapters.chexpert import ADAPTER as _CHEXPERT
from data_prep.adapters.chexpert import FINDINGS, chexpert, encode_labels
from data_prep.adapters.fastmri_png import ADAPTER as _FASTMRI
from data_prep.adapters.fastmri_png import fastmri_png
from data_prep.adapters.folder import ADAPTER as _FOLDER
from data_prep.adapters.folder import folder
from data_prep.adapters.ixi import ADAPTER as _IXI
from data_prep.adapters.ixi import ixi
from data_prep.adapters.kaggle_tumor import ADAPTER as _KAGGLE
from data_prep.adapters.kaggle_tumor import BINARY_LABELS, MULTICLASS_LABELS, kaggle_tumor

__all__ = [
    "ADAPTERS",
    "BINARY_LABELS",
    "FINDINGS",
    "MULTICLASS_LABELS",
    "Adapter",
    "brats",
    "chexpert",
    "encode_labels",
    "fastmri_png",
    "folder",
    "ixi",
    "kaggle_tumor",
]

#: subcommand name → adapter, in the order ``python -m data_prep --help`` lists them
ADAPTERS: dict[str, Adapter] = {a.name: a for a in (_BRATS, _IXI, _FASTMRI, _KAGGLE, _CHEXPERT, _FOLDER)}
