"""CLIP zero-shot baseline: a tiny random CLIP built here (no download) through evaluate and benchmark."""
import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import benchmark
import evaluate
from mgn.eval.clip import load_clip, read_prompts
from mgn.eval.evaluate import predict_clip, summarize
from tests.conftest import SMALL_VOCAB

PROMPTS = {"non_violent": ["a video game scene"], "violent": ["real blood on the street"]}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from transformers import BertTokenizerFast, CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "vocab.txt").write_text("\n".join(SMALL_VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    config = CLIPConfig(
        text_config={"vocab_size": len(SMALL_VOCAB), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "eos_token_id": SMALL_VOCAB.index("[SEP]"), "bos_token_id": SMALL_VOCAB.index("[CLS]"),
                     "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mgn.data.writer import write_synthetic

    out = tmp_path_factory.mktemp("clip-shards")
    write_synthetic(out, samples=80, image_size=48, seed=0, max_samples=40)
    return str(out / "test-*.tar")


def test_the_prediction_is_the_class_whose_prompt_embedding_is_closest(tiny_clip):
    clip = load_clip(tiny_clip, PROMPTS)
    assert clip.classes.shape == (2, 16)
    chosen = torch.tensor([1, 0, 1, 1])
    clip.image_embedding = lambda pixels: clip.classes[chosen]  # images that *are* a prompt's embedding
    logits = clip(torch.zeros(4, 3, 32, 32))
    assert logits.argmax(-1).tolist() == chosen.tolist()
    similarity = clip.classes @ clip.classes.T
    assert torch.allclose(logits[0], clip.logit_scale * similarity[1])


def test_prompt_files_are_checked(tmp_path):
    assert read_prompts(None)["violent"]
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps({"only one class": ["x"]}))
    with pytest.raises(ValueError, match="at least two classes"):
        read_prompts(bad)


def test_evaluate_clip_metrics_equal_scikit_learns_on_the_same_scores(tiny_clip, shards, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    assert evaluate.main(["--clip", tiny_clip, "--prompts", str(prompts), "--shards", shards,
                          "--out", str(tmp_path / "eval"), "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "CLIP zero-shot" in printed and "CLIP" in printed.splitlines()[2]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    from mgn.eval.clip import clip_batches

    clip = load_clip(tiny_clip, PROMPTS)
    preds = predict_clip(clip, clip_batches(clip, shards, num_workers=0), device=torch.device("cpu"))
    assert report["samples"] == len(preds.labels) == 12
    assert report["student"]["accuracy"] == pytest.approx(skm.accuracy_score(preds.labels,
                                                                             preds.student.argmax(1)))
    assert report["student"]["auroc"] == pytest.approx(skm.roc_auc_score(preds.labels, preds.student[:, 1]))
    assert summarize(preds, None)["student"]["pr_auc"] == pytest.approx(
        skm.average_precision_score(preds.labels, preds.student[:, 1]))
    assert np.allclose(preds.student.sum(1), 1)


def test_benchmark_times_clips_image_tower_beside_the_student(tiny_clip, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--tiny", "--clip", tiny_clip, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert ("CLIP zero-shot (image tower)" in report["models"]
            and report["ratios"]["student_over_clip_p50"] > 0)
    assert "student / CLIP image tower latency" in capsys.readouterr().out


def test_a_missing_model_says_how_to_provide_one(tmp_path, capsys):
    assert evaluate.main(["--clip", str(tmp_path / "nowhere"), "--shards", "x"]) == 2
    assert "hf download openai/clip-vit-base-patch16" in capsys.readouterr().err


def test_the_comparison_table_carries_the_clip_row_with_evaluates_metrics(tiny_clip, shards, tmp_path):
    from mgn.compare import significance, tables
    from mgn.eval.clip import clip_batches
    from mgn.compare.arms import Arm
    from mgn.compare.plan import Setting
    from mgn.compare.report import clip_metrics

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    settings = {"yours/scratch": Setting("yours", "scratch", "unused-train-*.tar", shards, 80)}
    scored = clip_metrics(tiny_clip, settings, str(prompts))["yours/scratch"]
    clip = load_clip(tiny_clip, PROMPTS)
    expected = summarize(predict_clip(clip, clip_batches(clip, shards), device=torch.device("cpu")), None)
    assert scored == pytest.approx({k: expected["student"][k] for k in significance.METRICS})

    start = {"student_sha256": "same", "first_batch_keys": ["k"]}
    rows = [{"setting": "yours/scratch", "arm": "baseline", "seed": s, "train_seconds": 1.0, "start": start,
             "student": {m: 0.5 for m in significance.METRICS}} for s in range(2)]
    references = {"yours/scratch": {"clip": {"model": tiny_clip, **scored,
                                             "student_latency_over_clip": 0.25}}}
    summary = significance.summarize(rows, {"baseline": Arm("baseline", "", ())}, ["yours/scratch"],
                                     references, {})
    table = tables.markdown(summary, "header")
    assert f"Reference: CLIP zero-shot ({tiny_clip}, no training), accuracy {scored['accuracy']:.3f}" in table
    assert "0.250x CLIP's image-tower latency" in table
