"""diffusion_mae's engine pieces: prepare-batch, losses, embeddings, the probe handler, weights loading,
the evaluation and the inference (engines/study.py, engines/study_eval.py), on constructed studies."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engines.study import (
    LinearProbeHandler,
    MaskedPatchLoss,
    StudyPrepareBatch,
    findings_of,
    load_encoder_weights,
    masked_patch_mse,
    study_embeddings,
)
from engines.study_eval import StudyEvaluation, StudyInference, study_id
from networks.study_vit import MAEDecoder, StudyClassifier, StudyMAE, StudyViTEncoder
from transforms import InputDataError
from transforms.study import collate_studies

FINDINGS = ["a", "b"]


class _SignalEncoder(nn.Module):
    """Embeds a study as the mean intensity of its views (+ noise dims): finding 'a' is linearly readable."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_size = 3
        self.dropout = nn.Dropout(0.5)

    def forward(self, views: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        m = view_mask.float()[..., None, None, None]
        mean = (views * m).sum((1, 2, 3, 4)) / (m.sum((1, 2, 3, 4)) * views[0, 0].numel())
        g = torch.Generator().manual_seed(int(views.shape[0]))
        return torch.stack([mean, torch.randn(views.shape[0], generator=g), torch.zeros_like(mean)], 1)


def _loader(n: int, seed: int, batch: int = 4) -> list[dict]:
    """Studies of 1-3 views whose intensity level carries finding 'a'; 'b' is masked (-1) for half of them."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        a = float(i % 2)
        v = int(rng.integers(1, 4))
        views = torch.full((v, 1, 8, 8), a + float(rng.normal(0, 0.2)))
        b = -1.0 if i % 4 == 0 else float(rng.integers(0, 2))
        items.append({"views": views, "labels": torch.tensor([a, b]), "study": f"s{seed}_{i}"})
    return [collate_studies(items[k : k + batch]) for k in range(0, n, batch)]


def test_prepare_batch_and_patch_loss() -> None:
    batch = _loader(4, 0)[0]
    views, labels, args, kwargs = StudyPrepareBatch()(batch, "cpu")
    assert views.shape[:2] == kwargs["view_mask"].shape and labels is None and args == ()
    _, labels, _, _ = StudyPrepareBatch(with_labels=True)(batch, "cpu")
    assert labels.shape == (4, 2) and labels.dtype == torch.float32
    # the loss reads the masked patches only: visible-patch errors do not count
    target = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])
    out = {"pred": pred, "target": target, "mask": torch.tensor([[True, True, False, False]])}
    assert float(masked_patch_mse(out)) == pytest.approx((1.0 + 2.0) / 2)
    assert float(MaskedPatchLoss()(out, None)) == pytest.approx(1.5)


def test_study_embeddings_restore_the_training_mode() -> None:
    enc = _SignalEncoder().train()
    out = study_embeddings(enc, _loader(6, 0), "cpu")
    assert enc.training and out["features"].shape == (6, 3) and out["labels"].shape == (6, 2)
    assert out["studies"] == [f"s0_{i}" for i in range(6)]


def test_probe_handler_curve_csv_and_known_auroc(tmp_path: Path) -> None:
    from ignite.engine import Engine

    h = LinearProbeHandler(
        _SignalEncoder(),
        _loader(40, 1),
        _loader(20, 2),
        FINDINGS,
        interval=2,
        output_dir=tmp_path,
        probe_epochs=200,
    )
    engine = Engine(lambda e, b: None)
    h.attach(engine)
    engine.run([0], max_epochs=5)
    # epoch 0 (untrained), every 2 epochs, and the last epoch (5, not a multiple of 2)
    assert [r["epoch"] for r in h.history] == [0.0, 2.0, 4.0, 5.0]
    rows = list(csv.DictReader(open(tmp_path / "probe_curve.csv")))
    assert [float(r["epoch"]) for r in rows] == [0.0, 2.0, 4.0, 5.0]
    # finding 'a' is the sign of the first feature: a perfect probe on the validation studies
    assert float(rows[-1]["probe_auroc/a"]) == 1.0
    assert float(rows[-1]["probe_n_pos/a"]) == 10.0
    with pytest.raises(ValueError, match="interval must be >= 1"):
        LinearProbeHandler(_SignalEncoder(), [], [], FINDINGS, interval=0)


def _tiny_mae(scheme: str = "mae") -> StudyMAE:
    enc = StudyViTEncoder(img_size=8, patch_size=4, hidden_size=8, mlp_dim=16, num_layers=1, num_heads=2)
    return StudyMAE(enc, MAEDecoder(4, 16, 8, 8, 16, 1, 2), scheme)


def test_load_encoder_weights_from_pretraining_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae = _tiny_mae()
    torch.save({"model": mae.state_dict()}, tmp_path / "pretrain_mae.pt")
    enc = StudyViTEncoder(img_size=8, patch_size=4, hidden_size=8, mlp_dim=16, num_layers=1, num_heads=2)
    load_encoder_weights(enc, tmp_path / "pretrain_mae.pt")
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, mae.encoder.state_dict()[k])
    with pytest.raises(InputDataError, match=r"nothing\.pt: checkpoint file does not exist; pretrain it"):
        load_encoder_weights(enc, tmp_path / "nothing.pt", hint="pretrain it")
    torch.save({"model": {"head.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(InputDataError, match=r"other\.pt: no 'encoder\.\*' weights"):
        load_encoder_weights(enc, tmp_path / "other.pt")
    wide = StudyViTEncoder(img_size=8, patch_size=4, hidden_size=16, mlp_dim=16, num_layers=1, num_heads=2)
    with pytest.raises(InputDataError, match="do not fit the configured encoder"):
        load_encoder_weights(wide, tmp_path / "pretrain_mae.pt")


def test_findings_of(tmp_path: Path) -> None:
    assert findings_of({"findings": ["x", "y"]}) == ["x", "y"]
    bad = tmp_path / "studies.json"
    bad.write_text(json.dumps({"training": []}))
    with pytest.raises(
        InputDataError, match=r"studies\.json: a studies datalist needs a top-level 'findings'"
    ):
        findings_of(bad)
    with pytest.raises(InputDataError, match="duplicate"):
        findings_of({"findings": ["x", "x"]})


def _views_loader(n: int, seed: int, batch: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = [
        {
            "views": torch.randn(1 + i % 3, 1, 8, 8, generator=g),
            "labels": torch.tensor([float(i % 2), float((i // 2) % 2)]),
            "view_names": ["ax"] * (1 + i % 3),
            "view_paths": [f"/data/patient_{seed}_{i}_view{k}.nii.gz" for k in range(1 + i % 3)],
        }
        for i in range(n)
    ]
    return [collate_studies(items[k : k + batch]) for k in range(0, n, batch)]


def test_evaluation_tables_use_the_test_split(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = {"mae": _tiny_mae()}
    classifier = StudyClassifier(models["mae"].encoder, 2)
    test_loader = _views_loader(12, 7)
    ev = StudyEvaluation(
        ["mae"],
        load_pretrained=lambda s: models[s],
        load_classifier=lambda s: classifier,
        make_encoder=lambda: StudyViTEncoder(
            img_size=8, patch_size=4, hidden_size=8, mlp_dim=16, num_layers=1, num_heads=2
        ),
        train_loader=_views_loader(16, 3),
        test_loader=test_loader,
        figure_loader=[{k: v[:1] for k, v in b.items()} for b in test_loader],
        findings=FINDINGS,
        output_dir=tmp_path,
        probe_epochs=20,
        figure_studies=1,
    )
    res = ev.run()
    assert set(res) == {"mae", "random_init"} and set(res["mae"]) == {"probe", "finetune"}
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert {(r["scheme"], r["protocol"]) for r in rows} == {
        ("mae", "probe"),
        ("mae", "finetune"),
        ("random_init", "probe"),
    }
    # 12 test studies, 6 positive for each finding: the counts come from the test split
    assert {float(r["positives"]) for r in rows if r["finding"] != "mean"} == {6.0}
    # the fine-tuning row equals the metrics of the classifier's own probabilities on the test studies
    from engines.probe import multilabel_metrics

    out = study_embeddings(classifier.encoder, test_loader, classifier=classifier)
    assert res["mae"]["finetune"]["mean_auroc"] == pytest.approx(
        multilabel_metrics(out["probs"], out["labels"], FINDINGS)["mean_auroc"]
    )
    assert (tmp_path / "figures" / "reconstruction_0.png").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mae"]["probe"]["mean_auroc"] == pytest.approx(res["mae"]["probe"]["mean_auroc"])
    # bootstrap: each (scheme, protocol) brackets its point; the study's two questions are paired differences
    for scheme, protocol in (("mae", "probe"), ("mae", "finetune"), ("random_init", "probe")):
        m = res[scheme][protocol]
        assert m["mean_auroc_ci_low"] <= m["mean_auroc"] <= m["mean_auroc_ci_high"]
    intervals = json.loads((tmp_path / "intervals.json").read_text())
    assert set(intervals["differences"]) == {"mae/probe-random_init/probe", "mae/finetune-mae/probe"}
    d = intervals["differences"]["mae/probe-random_init/probe"]["mean_auroc"]
    assert d["point"] == pytest.approx(
        res["mae"]["probe"]["mean_auroc"] - res["random_init"]["probe"]["mean_auroc"]
    )
    assert "[" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="unknown protocols"):
        StudyEvaluation(["mae"], None, None, None, [], [], FINDINGS, tmp_path, protocols=["zero_shot"])
    with pytest.raises(ValueError, match="schemes must be"):
        StudyEvaluation(["vae"], None, None, None, [], [], FINDINGS, tmp_path)


def test_inference_outputs_carry_no_file_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = StudyClassifier(
        StudyViTEncoder(img_size=8, patch_size=4, hidden_size=8, mlp_dim=16, num_layers=1, num_heads=2), 2
    )
    recs = StudyInference(clf, _views_loader(5, 9), FINDINGS, tmp_path).run()
    assert len(recs) == 5
    for r in recs:
        assert set(r["findings"]) == set(FINDINGS) and all(0 <= p <= 1 for p in r["findings"].values())
        assert np.load(tmp_path / r["embedding_file"]).shape == (8,)
    assert recs[0]["study_id"] == study_id([f"/data/patient_9_0_view{k}.nii.gz" for k in range(1)])
    text = (
        "".join(p.read_text() for p in tmp_path.glob("*.json")) + (tmp_path / "predictions.csv").read_text()
    )
    assert "patient" not in text
