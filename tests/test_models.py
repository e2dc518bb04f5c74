"""Embedding models: GeM, the head, the small CNN and timm backbones through the factory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from recallk.config import load_config
from recallk.errors import PretrainedWeightsError, RecallkUsageError
from recallk.models import EmbeddingHead, GeM, SmallCNN, create_model, create_model_from_config, list_backbones


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_unit_norm(embeddings: torch.Tensor) -> None:
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(embeddings)))


# --- GeM and the head -------------------------------------------------------------------------------------------


def test_gem_with_p_1_is_average_pooling():
    x = torch.rand(2, 5, 4, 3) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(-2, -1)))


def test_gem_approaches_max_pooling_for_large_p():
    x = torch.rand(2, 5, 4, 3) + 0.1
    maximum = x.amax(dim=(-2, -1))
    gap_at_3 = (maximum - GeM(p=3.0)(x)).abs().max()
    gap_at_100 = (maximum - GeM(p=100.0)(x)).abs().max()
    assert gap_at_100 < gap_at_3
    torch.testing.assert_close(GeM(p=100.0)(x), maximum, atol=0.05, rtol=0.0)


def test_gem_p_is_learned_or_fixed():
    learned = GeM(p=3.0, learnable=True)
    learned(torch.rand(1, 2, 3, 3)).sum().backward()
    assert learned.p.grad is not None and learned.p.grad.abs() > 0
    fixed = GeM(p=3.0, learnable=False)
    assert list(fixed.parameters()) == [] and "p" in fixed.state_dict()


def test_gem_keeps_bfloat16_inputs_bfloat16():
    assert GeM()(torch.rand(1, 2, 3, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_head_pools_normalises_and_checks_input_rank():
    head = EmbeddingHead(in_features=6, embed_dim=4, pooling="gem")
    out = head(torch.rand(3, 6, 5, 5))
    assert out.shape == (3, 4)
    assert_unit_norm(out)
    with pytest.raises(ValueError, match="4-D"):
        head(torch.rand(3, 6))
    cls_head = EmbeddingHead(in_features=6, embed_dim=4, pooling="cls", layernorm=False)
    assert_unit_norm(cls_head(torch.randn(3, 6)))
    assert isinstance(cls_head.norm, torch.nn.Identity)


# --- small CNN ------------------------------------------------------------------------------------------------------


def test_omniglot_cnn_embeds_grayscale_images():
    model = create_model("omniglot_cnn", embed_dim=16, widths=(8, 16, 32), pooling="avg", layernorm=False)
    assert isinstance(model.backbone, SmallCNN) and len(model.backbone) == 3
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 16)
    assert_unit_norm(out)


def test_small_cnn_never_shrinks_to_zero():
    assert SmallCNN(1, widths=(4,) * 6)(torch.rand(2, 1, 8, 8)).shape == (2, 4, 1, 1)


def test_omniglot_cnn_from_the_recipe_config():
    cfg = load_config(None, ["model.backbone=omniglot_cnn", "model.widths=[4, 8]", "model.embed_dim=8"])
    model = create_model_from_config(cfg.model)
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 8)


def test_omniglot_cnn_loads_a_local_weights_file(tmp_path):
    source = SmallCNN(1, (4, 8))
    torch.save(source.state_dict(), tmp_path / "cnn.pth")
    model = create_model("omniglot_cnn", widths=(4, 8), pretrained_path=tmp_path / "cnn.pth")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    with pytest.raises(PretrainedWeightsError, match="no published pretrained weights"):
        create_model("omniglot_cnn", pretrained=True)


# --- timm backbones -------------------------------------------------------------------------------------------------


def test_resnet18_through_the_factory():
    model = create_model("resnet18", embed_dim=32)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 32) and model.embed_dim == 32
    assert_unit_norm(out)
    assert isinstance(model.head.pool, GeM)
    out.sum().backward()
    assert model.backbone.conv1.weight.grad is not None and model.head.pool.p.grad is not None


def test_freeze_batchnorm_keeps_running_statistics():
    model = create_model("resnet18", embed_dim=8, freeze_batchnorm=True).train()
    before = model.backbone.bn1.running_mean.clone()
    model(torch.rand(2, 3, 32, 32) * 5)
    assert not model.backbone.bn1.training
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)


def test_parameter_groups_scale_the_backbone_rate():
    model = create_model("resnet18", embed_dim=8)
    groups = {g["name"]: g for g in model.parameter_groups(lr=1e-3, backbone_lr_mult=0.1, weight_decay=4e-4)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["head"]["lr"] == pytest.approx(1e-3)
    counted = sum(p.numel() for g in groups.values() for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())


def test_channels_last_gives_the_same_embeddings():
    model = create_model("resnet18", embed_dim=8).eval()
    fast = create_model("resnet18", embed_dim=8, channels_last=True).eval()
    fast.load_state_dict(model.state_dict())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), atol=1e-5, rtol=1e-4)


def test_vit_uses_the_class_token():
    model = create_model("vit_tiny_patch16_224", embed_dim=16, pooling="cls")
    out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 16)
    assert_unit_norm(out)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "vit_tiny_patch16_224", "pooling": "gem"}, "set model.pooling=cls"),
        ({"backbone": "resnet18", "pooling": "cls"}, "class token"),
        ({"backbone": "resnt18"}, "did you mean 'resnet18'"),
        ({"backbone": "resnet18", "pooling": "max"}, "choose one of 'gem', 'avg', 'cls'"),
        ({"backbone": "omniglot_cnn", "pooling": "cls"}, "set model.pooling=avg or gem"),
    ],
)
def test_bad_model_choices_say_how_to_fix(kwargs, match):
    with pytest.raises(RecallkUsageError, match=match):
        create_model(**kwargs)


def test_list_backbones():
    assert list_backbones("omniglot*") == ["omniglot_cnn"]
    assert "resnet50" in list_backbones("resnet5*")


# --- pretrained weights -----------------------------------------------------------------------------------------


def test_local_weights_file_is_loaded_strictly(tmp_path):
    source = timm.create_model("resnet18")  # with its 1000-class classifier, as published weights are
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = create_model("resnet18", pretrained_path=tmp_path / "resnet18.pth")
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key])

    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(PretrainedWeightsError, match="resnet34.pth") as info:
        create_model("resnet18", pretrained_path=tmp_path / "resnet34.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_model("resnet18", pretrained_path=tmp_path / "missing.pth")


def test_local_weights_load_through_timm_and_adapt_a_one_channel_input(tmp_path):
    source = timm.create_model("resnet18")
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")  # a training checkpoint
    model = create_model("resnet18", in_chans=1, pretrained_path=tmp_path / "checkpoint.pth", embed_dim=8)
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight.sum(1, keepdim=True))  # timm's rule
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 8)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=224)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    small = create_model("vit_tiny_patch16_224", pooling="cls", pretrained_path=tmp_path / "vit.pth", embed_dim=8)
    torch.testing.assert_close(small.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_unavailable_pretrained_weights_give_a_clear_error(tmp_path):
    """The real timm download path, with an empty Hugging Face cache and no network allowed."""
    script = textwrap.dedent(
        """
        from recallk.errors import PretrainedWeightsError
        from recallk.models import create_model
        try:
            create_model("resnet18", pretrained=True)
        except PretrainedWeightsError as err:
            print("ERROR:", err)
        else:
            print("LOADED")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    if result.stdout.startswith("LOADED"):
        pytest.skip("pretrained weights were available, so there was no failure to check")
    message = result.stdout.removeprefix("ERROR: ").strip()
    assert "\n" not in message
    assert "could not download pretrained weights for backbone 'resnet18'" in message
    assert "model.pretrained=false" in message and "model.pretrained_path=" in message
    assert str(tmp_path / "hf") in message  # names the cache folder to fill
