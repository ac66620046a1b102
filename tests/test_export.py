"""The deployable student: fused MobileOne + head, one self-describing file, same outputs."""
import copy
import json

import pytest
import torch

from mgn.config import Config, ModelConfig
from mgn.checkpoint.read import read_student
from mgn.model.export import export_student, fuse_student, unfused_modules
from mgn.model.networks import ImageClassifier
from tests.conftest import calibrate_batchnorm


@pytest.fixture(scope="module")
def student_and_config():
    cfg = Config(model=ModelConfig(image_model="mobileone_s0", image_size=64, num_classes=3))
    torch.manual_seed(0)
    student = ImageClassifier(cfg.model)
    calibrate_batchnorm(student, image_size=64)
    return student, cfg


def test_fusion_removes_batchnorm_and_branches_and_keeps_outputs(student_and_config):
    student, _ = student_and_config
    assert unfused_modules(student)  # the training-time model has BN and multi-branch blocks
    fused = fuse_student(student)
    assert unfused_modules(fused) == []
    x = torch.rand(4, 3, 64, 64) * 4 - 2
    with torch.no_grad():
        reference, output = student(x), fused(x)
    assert reference.abs().max() > 0.1  # calibrated BN: logits of a sane size, so 1e-4 means something
    # 1e-4 absolute plus 1e-4 relative: fp32 rounding through ~20 fused convs is ~1e-5 of the logit scale.
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)
    assert student.training is False and any(unfused_modules(student))  # the original is untouched


def test_a_student_trained_with_syncbatchnorm_exports_like_the_plain_one(student_and_config, tmp_path):
    """Multi-GPU training converts BatchNorm to SyncBatchNorm; the artifact must not care."""
    import timm

    student, cfg = student_and_config
    synced = timm.layers.convert_sync_batchnorm(copy.deepcopy(student))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    x = torch.rand(4, 3, 64, 64) * 4 - 2
    with torch.no_grad():
        torch.testing.assert_close(fuse_student(synced)(x), fuse_student(student)(x), rtol=0, atol=0)
    with torch.no_grad():
        exported = read_student(export_student(synced, cfg, tmp_path, formats=("safetensors",)))[0](x)
    torch.testing.assert_close(exported, fuse_student(student)(x), rtol=1e-5, atol=1e-5)
    # the trained model is untouched
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())


def test_artifact_round_trip_carries_config_and_matches(student_and_config, tmp_path):
    student, cfg = student_and_config
    path = export_student(student, cfg, tmp_path)
    assert path.name == "student.safetensors" and (tmp_path / "student.onnx").exists()
    assert (tmp_path / "student.pt2").exists() and not list(tmp_path.glob(".tmp-*"))
    for artifact in (path, tmp_path / "student.pt2"):  # the deployable weights, and the torch.export program
        module, loaded_cfg, meta = read_student(artifact)
        assert loaded_cfg == cfg
        assert meta["fused"] is True and meta["num_classes"] == 3 and meta["input"] == [3, 64, 64]
        for batch in (1, 5):  # dynamic batch dimension
            x = torch.rand(batch, 3, 64, 64) * 4 - 2
            with torch.no_grad():
                torch.testing.assert_close(module(x), student(x), rtol=1e-4, atol=1e-4)


def test_onnx_copy_matches(student_and_config, tmp_path):
    onnx = pytest.importorskip("onnx")
    student, cfg = student_and_config
    export_student(student, cfg, tmp_path)
    model = onnx.load(str(tmp_path / "student.onnx"))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_loading_a_foreign_file_is_a_clear_error(tmp_path):
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.export.save(program, tmp_path / "other.pt2")
    with pytest.raises(ValueError, match="not an MGN student artifact"):
        read_student(tmp_path / "other.pt2")
    assert json.loads(Config().to_json())["model"]["seq_len"] == 121
