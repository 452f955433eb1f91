"""Guided DDIM (Wolleb et al. 2022): the DDIM encoding/decoding mechanism, the classifier guidance, the label
order, and the noise-aware classifier's training pieces.

The mechanism tests use networks with known answers instead of trained ones: for data ``x0 ~ N(mu, sigma^2)``
per pixel the optimal noise predictor is linear in ``x_t``, so DDIM is an exact ODE whose discretisation error
can be measured, and a classifier whose log-probability of "healthy" grows with the image mean has a known
direction of guidance.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from engines.anomaly import VolumeAnomalyInferer, setting_key, setting_name
from engines.data import class_weights, healthy_volumes, subset_by_kind
from engines.diffusion import ddim_reversed_step
from engines.guided import (
    GuidedChainFigureHandler,
    GuidedDDIMInferer,
    NoisyClassifierPrepareBatch,
    check_healthy_index,
    class_names_of,
    guided_setting,
    guided_settings,
    parse_guided_setting,
    save_class_names,
    timestep_accuracy_metrics,
)
from tests.engines._toy import GaussianEps

T = 1000
SIZE = 16


class MeanClassifier(nn.Module):
    """Two logits, ``+/- gain * mean(x)``: the class at ``bright_index`` is the bright one."""

    def __init__(self, bright_index: int = 0, gain: float = 20.0) -> None:
        super().__init__()
        self.bright_index, self.gain = bright_index, gain
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(timesteps[0]))
        m = self.gain * x.mean(dim=(1, 2, 3))
        logits = torch.stack([m, -m], dim=1)
        return logits if self.bright_index == 0 else logits.flip(1)


def _images(n: int = 4, seed: int = 0, sigma: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, SIZE, SIZE, generator=g) * sigma


# ---------------------------------------------------------------- DDIM encoding step


@pytest.mark.parametrize("timestep", [0, 30, 500, 880])
def test_ddim_reversed_step_equals_monai_where_expressible(timestep: int) -> None:
    """MONAI's reversed_step moves by T // n; ours with that target must agree (with its x0 clamp)."""
    ddpm = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    ddim = DDIMScheduler(num_train_timesteps=T, schedule="cosine")
    ddim.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    sample, eps = torch.randn(2, 1, SIZE, SIZE, generator=g), torch.randn(2, 1, SIZE, SIZE, generator=g)
    ref, ref_x0 = ddim.reversed_step(eps, timestep, sample)
    nxt, x0 = ddim_reversed_step(ddpm, eps, timestep, timestep + T // 10, sample, clip_range=(-1.0, 1.0))
    assert (nxt - ref).abs().max() <= 1e-5
    assert (x0 - ref_x0).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="next_timestep"):
        ddim_reversed_step(ddpm, eps, 5, 5, sample)
    with pytest.raises(ValueError, match="next_timestep"):
        ddim_reversed_step(ddpm, eps, 5, T, sample)


# ---------------------------------------------------------------- settings and label order


def test_setting_names_round_trip() -> None:
    assert guided_setting(500, 10) == "L500_s10"
    assert guided_setting(250, 2.5) == "L250_s2.5"
    assert parse_guided_setting("L250_s2.5") == (250, 2.5)
    assert guided_settings([250, 500], [0, 10]) == ["L250_s0", "L250_s10", "L500_s0", "L500_s10"]
    with pytest.raises(ValueError, match="L<int>_s<float>"):
        parse_guided_setting("t250")
    with pytest.raises(ValueError, match="at least one"):
        guided_settings([], [1])
    # the shared evaluation keys: noise levels stay ints ("t250"), guided settings keep their names
    assert setting_key("250") == 250 and setting_name(250) == "t250"
    assert setting_key("L500_s10") == "L500_s10" and setting_name("L500_s10") == "L500_s10"


def test_check_healthy_index(tmp_path: Path) -> None:
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"labels": ["diseased", "healthy"], "training": []}))
    assert check_healthy_index(dl, 1) == ["diseased", "healthy"]
    with pytest.raises(
        ValueError, match=r"healthy_index 0 .*dl\.json.*\['diseased', 'healthy'\].*set healthy_index to 1"
    ):
        check_healthy_index(dl, 0)
    with pytest.raises(ValueError, match="no class 'healthy'"):
        check_healthy_index({"labels": ["normal", "tumour"]}, 0)
    with pytest.raises(ValueError, match="distinct"):
        class_names_of({"labels": ["healthy", "healthy"]})
    # a datalist without labels has the default order
    assert class_names_of({"training": []}) == ["healthy", "diseased"]
    # the record beside the classifier's weights is checked the same way
    rec = save_class_names(tmp_path / "models" / "classifier_labels.json", dl, 1)
    assert rec == ["diseased", "healthy"]
    saved = json.loads((tmp_path / "models" / "classifier_labels.json").read_text())
    assert saved == {"labels": ["diseased", "healthy"], "healthy_index": 1}
    with pytest.raises(ValueError, match=r"classifier_labels\.json"):
        check_healthy_index(tmp_path / "models" / "classifier_labels.json", 0)
    with pytest.raises(ValueError, match="healthy_index 0"):
        save_class_names(tmp_path / "other.json", dl, 0)
    assert not (tmp_path / "other.json").exists(), "nothing is recorded for a wrong index"


# ---------------------------------------------------------------- the mechanism


def test_timesteps_and_same_timestep_for_unet_and_classifier() -> None:
    """k steps over original indices 0..L-1; the classifier sees exactly the UNet's decoding timesteps."""
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    unet, clf = GaussianEps(sched), MeanClassifier()
    inf = GuidedDDIMInferer(sched, clf, noise_level=500, guidance_scale=5.0, ddim_steps=5)
    assert inf.timesteps(500) == [0, 100, 200, 299, 399, 499]
    assert inf.timesteps(3) == [0, 1, 2]  # capped at one step per index
    inf.reconstruct(_images(2), unet)
    assert unet.calls == [*[0, 100, 200, 299, 399], *[499, 399, 299, 200, 100]]
    # not a re-spaced step number (0..k-1): the original index the UNet received
    assert clf.calls == [499, 399, 299, 200, 100]


def test_unguided_round_trip_reconstructs_and_improves_with_steps() -> None:
    """s = 0: DDIM encode then decode gives the input back; the error falls as the step count rises."""
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    unet = GaussianEps(sched, sigma=0.3)
    x = _images(4, sigma=0.3)
    errors = []
    for k in (2, 5, 20, 100):
        inf = GuidedDDIMInferer(sched, MeanClassifier(), noise_level=600, guidance_scale=0.0, ddim_steps=k)
        out = inf.reconstruct(x, unet)
        # for Gaussian data the DDIM latent is the input scaled toward unit variance (the ODE is linear)
        assert float(out["noisy"].std()) > 1.2 * float(x.std()), "x_L must be an encoding, not the input"
        errors.append(float((out["recon"] - x).abs().mean()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    # first-order scheme: the error shrinks about as 1/k (measured 0.18, 0.10, 0.030, 0.0067)
    assert errors[-1] < 0.05 * float(x.abs().mean()) and errors[0] > 20 * errors[-1], errors
    # the encoding is deterministic: same input, same latent
    inf = GuidedDDIMInferer(sched, MeanClassifier(), noise_level=600, guidance_scale=0.0, ddim_steps=5)
    assert torch.equal(inf.encode(x, unet, 600)["latent"], inf.encode(x, unet, 600)["latent"])


@pytest.mark.parametrize("order", [("healthy", "diseased"), ("diseased", "healthy")])
def test_guidance_pushes_toward_the_configured_healthy_class(order: tuple[str, str], tmp_path: Path) -> None:
    """Whatever the label order in the datalist, guidance raises p(healthy) of the reconstruction; an index
    pointing at the other class pushes the other way (the bug of label-order-blind implementations)."""
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"labels": list(order)}))
    healthy = check_healthy_index(dl, list(order).index("healthy"))
    h = healthy.index("healthy")
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    unet, clf = GaussianEps(sched), MeanClassifier(bright_index=h)  # "healthy" = brighter, in datalist order

    def p_healthy(img: torch.Tensor, index: int) -> float:
        return float(torch.softmax(clf(img, torch.zeros(img.shape[0], dtype=torch.long)), 1)[:, index].mean())

    x = _images(4, seed=5)
    base = GuidedDDIMInferer(sched, clf, 400, 0.0, ddim_steps=10, healthy_index=h).reconstruct(x, unet)[
        "recon"
    ]
    guided = GuidedDDIMInferer(sched, clf, 400, 3.0, ddim_steps=10, healthy_index=h).reconstruct(x, unet)[
        "recon"
    ]
    wrong = GuidedDDIMInferer(sched, clf, 400, 3.0, ddim_steps=10, healthy_index=1 - h).reconstruct(x, unet)[
        "recon"
    ]
    assert p_healthy(guided, h) > p_healthy(base, h) + 0.1  # measured 0.57 -> 0.73
    assert float(guided.mean()) > float(base.mean()) > float(wrong.mean())
    assert p_healthy(wrong, h) < p_healthy(base, h)


def test_guidance_gradient_is_grad_log_p() -> None:
    sched = DDPMScheduler(num_train_timesteps=T)
    clf = MeanClassifier(gain=2.0)
    inf = GuidedDDIMInferer(sched, clf, 10, 1.0, healthy_index=0)
    x = _images(2)
    grad, p = inf.guidance_gradient(x, 7)
    # log p0 = log sigmoid(2 m - (-2 m)) = log sigmoid(4 m), m = mean(x); d/dx = 4 (1 - p0) / n_pixels
    m = x.mean(dim=(1, 2, 3))
    p0 = torch.sigmoid(4 * 2.0 / 2.0 * m)  # logits are +-2m: difference 4m
    assert torch.allclose(p, p0, atol=1e-6)
    expected = (4 * (1 - p0) / (SIZE * SIZE)).view(-1, 1, 1, 1).expand_as(x)
    assert torch.allclose(grad, expected, atol=1e-7)
    assert clf.calls == [7]


def test_anomaly_map_and_settings_share_encodings() -> None:
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    unet, clf = GaussianEps(sched), MeanClassifier()
    inf = GuidedDDIMInferer(sched, clf, 200, 1.0, ddim_steps=4)
    x = torch.zeros(1, 2, 4, 4)
    recon = torch.zeros(1, 2, 4, 4)
    recon[0, 0, 1, 1], recon[0, 1, 1, 1] = 0.5, -0.25
    amap = inf.anomaly_map(x, recon, brain_mask=torch.ones(1, 1, 4, 4))
    assert amap.shape == (1, 1, 4, 4) and float(amap[0, 0, 1, 1]) == 0.75 and float(amap.sum()) == 0.75
    with pytest.raises(ValueError, match="must match"):
        inf.anomaly_map(x, recon[:, :1])
    # three settings over two levels: each level is encoded once (4 calls), each setting decoded (4 calls)
    unet.calls.clear()
    out = inf.reconstruct_settings(_images(2), unet, ["L100_s0", "L100_s2", "L300_s0"])
    assert list(out) == ["L100_s0", "L100_s2", "L300_s0"]
    assert len(unet.calls) == 2 * 4 + 3 * 4
    # same as one-at-a-time reconstruction
    single = inf.reconstruct(_images(2), unet, t_start="L100_s2")["recon"]
    assert torch.allclose(out["L100_s2"], single)
    assert inf.setting(300) == (300, 1.0) and inf.setting(None) == (200, 1.0)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        inf.setting("L1001_s1")


def test_volume_inferer_runs_the_guided_sweep() -> None:
    """The shared volume inferer keys guided maps by setting name and restores the volume's geometry."""
    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    unet, clf = GaussianEps(sched), MeanClassifier()
    inf = GuidedDDIMInferer(sched, clf, 100, 1.0, ddim_steps=3)
    vol = torch.full((1, 1, 12, 10, 5), -1.0)
    vol[0, 0, 2:10, 2:8, :] = torch.linspace(-0.5, 0.5, 5)
    vi = VolumeAnomalyInferer(inf, ["L100_s0", "L100_s4"], image_size=16, axis=2, batch_size=3)
    out = vi(vol, unet)
    assert set(out["maps"]) == {"L100_s0", "L100_s4"}
    for m in out["maps"].values():
        assert m.shape == (1, 1, 12, 10, 5)
    # guidance toward "bright = healthy" changes the brain more than plain reconstruction does
    assert float(out["maps"]["L100_s4"].sum()) > float(out["maps"]["L100_s0"].sum())


def test_inferer_argument_errors() -> None:
    sched = DDPMScheduler(num_train_timesteps=T)
    clf = MeanClassifier()
    with pytest.raises(ValueError, match="noise level"):
        GuidedDDIMInferer(sched, clf, noise_level=0)
    with pytest.raises(ValueError, match="ddim_steps"):
        GuidedDDIMInferer(sched, clf, ddim_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        GuidedDDIMInferer(sched, clf, guidance_scale=-1)
    with pytest.raises(ValueError, match="median"):
        GuidedDDIMInferer(sched, clf, median=2)
    with pytest.raises(ValueError, match="epsilon"):
        GuidedDDIMInferer(DDPMScheduler(num_train_timesteps=T, prediction_type="sample"), clf)


def test_chain_figures_are_written(tmp_path: Path) -> None:
    from PIL import Image

    sched = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    unet, clf = GaussianEps(sched), MeanClassifier()
    inf = GuidedDDIMInferer(sched, clf, 300, 2.0, ddim_steps=4)
    handler = GuidedChainFigureHandler(inf, tmp_path, setting="L300_s2", image_size=16, max_subjects=1)

    class _Engine:
        network = nn.Conv2d(1, 1, 1)  # only its device is read; the UNet is called through `network`
        state = type("S", (), {})()

    eng = _Engine()
    eng.network = unet
    unet.register_parameter("p", nn.Parameter(torch.zeros(1)))
    image = torch.full((1, 1, 12, 12, 6), -1.0)
    image[0, 0, 3:9, 3:9] = 0.2
    lesion = torch.zeros(1, 1, 12, 12, 6)
    lesion[0, 0, 4:6, 4:6, 4] = 1
    eng.state.batch = {"image": image, "label": lesion, "subject": ["sub-x"]}
    eng.state.iteration = 1
    handler._draw(eng)
    assert [p.name for p in handler.written] == ["chain_sub-x.png", "chain_sub-x.gif"]
    gif = Image.open(tmp_path / "figures" / "chain_sub-x.gif")
    assert gif.n_frames == 2 * 4 + 1, "the input, every encoding step and every decoding step is a frame"
    assert Image.open(tmp_path / "figures" / "chain_sub-x.png").size[0] > 400
    handler._draw(eng)  # max_subjects reached: nothing more
    assert len(handler.written) == 2


# ---------------------------------------------------------------- classifier training pieces


def test_noisy_classifier_prepare_batch() -> None:
    sched = DDPMScheduler(num_train_timesteps=T)
    x = _images(3)
    batch = {"image": x, "class_label": torch.tensor([0, 1, 1])}
    torch.manual_seed(0)
    xt, y, args, kw = NoisyClassifierPrepareBatch(sched, max_timestep=50)(batch)
    assert xt.shape == x.shape and y.tolist() == [0, 1, 1] and args == ()
    assert kw["timesteps"].shape == (3,) and int(kw["timesteps"].max()) < 50
    # validation: every image at every grid t, grid-major, the same noise every call
    val = NoisyClassifierPrepareBatch(sched, timestep_grid=[0, 999], seed=4)
    a, ya, _, ka = val(batch)
    b, _, _, _ = val(batch)
    assert a.shape == (6, 1, SIZE, SIZE) and torch.equal(a, b)
    assert ka["timesteps"].tolist() == [0, 0, 0, 999, 999, 999] and ya.tolist() == [0, 1, 1] * 2
    # t = 0 is nearly the image, t = 999 nearly pure noise
    assert float((a[:3] - x).abs().mean()) < 0.05 < float((a[3:] - x).abs().mean())
    with pytest.raises(KeyError, match="class_label"):
        val({"image": x})
    with pytest.raises(ValueError, match="timestep_grid"):
        NoisyClassifierPrepareBatch(sched, timestep_grid=[T])


def test_timestep_accuracy_metrics_score_each_grid_block() -> None:
    metrics = timestep_accuracy_metrics([10, 20])
    assert list(metrics) == ["val_acc_t10", "val_acc_t20"]
    # batch of 2 images at 2 timesteps: block t10 all right, block t20 half right
    pred = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])
    label = torch.tensor([0, 1, 0, 1])
    for m in metrics.values():
        m.reset()
        m.update(m._output_transform({"pred": pred, "label": label}))
    assert metrics["val_acc_t10"].compute() == 1.0
    assert metrics["val_acc_t20"].compute() == 0.5


def test_class_weights_subsets_and_healthy_volumes(tmp_path: Path) -> None:
    import nibabel as nib

    class _DS:
        slices = [{"class_label": c} for c in (0, 0, 0, 1)]

    w = class_weights(_DS(), 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_weights(type("D", (), {"slices": [{"class_label": 2}]})(), 2)

    items = [
        {"subject": f"s{i}", "kind": k} for i, k in enumerate(["healthy"] * 4 + ["glioma", "meningioma"])
    ]
    assert [it["subject"] for it in subset_by_kind(items, 3)] == ["s0", "s4", "s5"]
    assert subset_by_kind(items, None) == items

    empty, lesion = tmp_path / "empty.nii.gz", tmp_path / "lesion.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), empty)
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[1, 1, 1] = 1
    nib.save(nib.Nifti1Image(arr, np.eye(4)), lesion)
    vols = [
        {"subject": "a", "kind": "healthy"},
        {"subject": "b", "kind": "glioma"},
        {"subject": "c", "label": str(empty)},
        {"subject": "d", "label": str(lesion)},
        {"subject": "e"},
    ]
    assert [v["subject"] for v in healthy_volumes(vols)] == ["a", "c", "e"]
    with pytest.raises(ValueError, match="no healthy volume"):
        healthy_volumes([vols[1], vols[3]])


# ---------------------------------------------------------------- class-conditional option


def test_class_conditional_training_pieces_pass_class_labels() -> None:
    from monai.inferers import DiffusionInferer

    from engines.diffusion import ClassConditionalDiffusionInferer, SimplexDiffusionPrepareBatch

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kwargs: dict = {}

        def forward(self, x, timesteps, context=None, class_labels=None):
            self.kwargs = {"timesteps": timesteps, "class_labels": class_labels}
            return x * 2

    sched = DDPMScheduler(num_train_timesteps=T)
    batch = {"image": _images(3), "class_label": torch.tensor([1, 0, 1])}
    prep = SimplexDiffusionPrepareBatch(T, noise_type="gaussian", class_key="class_label")
    images, target, args, kw = prep(batch)
    assert kw["class_labels"].tolist() == [1, 0, 1] and torch.equal(target, kw["noise"])
    spy = Spy()
    out = ClassConditionalDiffusionInferer(sched)(images, spy, *args, **kw)
    assert spy.kwargs["class_labels"].tolist() == [1, 0, 1]
    noisy = sched.add_noise(images, kw["noise"], kw["timesteps"])
    assert torch.allclose(out, noisy * 2)
    # without class labels it is MONAI's DiffusionInferer
    kw.pop("class_labels")
    ref = DiffusionInferer(sched)(images, spy, **kw)
    assert torch.equal(ClassConditionalDiffusionInferer(sched)(images, spy, **kw), ref)
    assert spy.kwargs["class_labels"] is None
    with pytest.raises(KeyError, match="class_label"):
        prep({"image": _images(2)})
    # the guided inferer conditions every UNet call on the healthy class
    calls: list = []

    def unet(x, t, class_labels=None):
        calls.append(class_labels)
        return torch.zeros_like(x)

    GuidedDDIMInferer(
        sched, MeanClassifier(), 50, 1.0, ddim_steps=2, healthy_index=1, class_conditional=True
    )(_images(2), unet)
    assert len(calls) == 4 and all(c.tolist() == [1, 1] for c in calls)


def test_ddim_scheduler_and_training_scheduler_give_the_same_chain() -> None:
    """The bundle samples with a DDIMScheduler built with the training DDPMScheduler's schedule: same alphas,
    so the same reconstruction."""
    ddpm = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    ddim = DDIMScheduler(num_train_timesteps=T, schedule="cosine", clip_sample=True)
    assert torch.equal(ddpm.alphas_cumprod, ddim.alphas_cumprod)
    unet, clf = GaussianEps(ddpm), MeanClassifier()
    x = _images(2)
    a = GuidedDDIMInferer(ddpm, clf, 300, 2.0, ddim_steps=4).reconstruct(x, unet)["recon"]
    b = GuidedDDIMInferer(ddim, clf, 300, 2.0, ddim_steps=4).reconstruct(x, unet)["recon"]
    assert torch.equal(a, b)
