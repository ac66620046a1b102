"""One typed config: presets, CLI overrides, validation with the offending flag named, save/load."""
import argparse

import pytest

from mgn.config import PRESETS, Config, add_config_args, config_from_args


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_defaults_are_the_papers_settings():
    cfg = Config()
    assert (cfg.model.seq_len, cfg.model.fusion_dim, cfg.model.image_model) == (121, 1024, "mobileone_s4")
    assert cfg.model.text_model == "distilbert-base-uncased" and cfg.model.image_pretrained == ""


def test_preset_then_flags_override_in_order():
    cfg = parse("--preset", "tiny", "--train.epochs", "7", "--model.freeze_text", "false",
                "--objective.name", "baseline")
    assert cfg.train.epochs == 7 and cfg.model.freeze_text is False and cfg.objective.name == "baseline"
    assert cfg.model.image_model == PRESETS["tiny"]["model"]["image_model"]


def test_config_file_round_trip(tmp_path):
    cfg = parse("--preset", "demo", "--train.seed", "3")
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg
    assert parse("--preset", "tiny", "--config", str(tmp_path / "config.json")) == cfg


@pytest.mark.parametrize("argv,message", [
    (["--objective.name", "teacher"], "objective.name='teacher'"),
    (["--model.attention", "cross"], "model.attention='cross'"),
    (["--train.zero_stage", "3"], "train.zero_stage=3"),
    (["--model.image_model", "resnet_nope"], "model.image_model='resnet_nope'"),
    (["--model.seq_len", "50"], "model.seq_len=50 is not a perfect square"),
    (["--model.fusion_dim", "30", "--model.attention_heads", "4"], "divisible"),
    (["--train.log_every", "0"], "train.log_every=0 must be >= 1"),
    (["--train.ckpt_every", "-1"], "train.ckpt_every=-1 must be >= 0"),
    (["--train.resume", "auto"], "train.resume=auto continues a named run: also pass --train.run_name"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(*argv)


def test_unknown_keys_in_a_config_file_are_rejected(tmp_path):
    (tmp_path / "bad.json").write_text('{"model": {"sequence_length": 64}}')
    with pytest.raises(ValueError, match="sequence_length"):
        parse("--config", str(tmp_path / "bad.json"))


def test_zero_means_never_for_periodic_checkpoints_and_keep_all():
    cfg = parse("--train.ckpt_every", "0", "--train.keep_last", "0", "--train.resume", "auto",
                "--train.run_name", "a")
    assert (cfg.train.ckpt_every, cfg.train.keep_last, cfg.train.resume) == (0, 0, "auto")


def test_help_is_fast_and_shows_the_presets_defaults_descriptions_and_choices():
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--help"], cwd=root,
                            capture_output=True,
                            text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and elapsed < 10, elapsed  # torch & co. are not imported before parsing
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "defaults of --preset tiny" in text
    assert "Default: 'mobileone_s0'" in text and "Default: 64" in text  # the tiny preset's, not the paper's
    assert ("{baseline,guided,distill,tram,attention_transfer,oracle_attention,oracle_caption,oracle_teacher}"
            in "".join(text.split()))
    assert "{token,pool}" in text
    assert "cross-modality map" in text  # a description, from the dataclass field
