"""Evaluation during training, behind one call: the model being trained scored on the test set by the
evaluation core (mgn/eval/predictions.py), the same code `python evaluate.py` runs; the scores logged
(console, TensorBoard, metrics.csv), the attention picture drawn up to its cap, and the best student
exported."""
from __future__ import annotations

import logging

import torch

from mgn import distributed
from mgn.checkpoint.store import TrainState
from mgn.config import Config
from mgn.data.decode import ModelInputs
from mgn.eval.pictures import attention_figure, samples_from_batch, save_picture
from mgn.eval.predictions import collect, merge
from mgn.io.shard_sets import class_names
from mgn.model.export import export_student
from mgn.model.objectives import Objective
from mgn.train.engine import autocast
from mgn.train.monitor import TensorBoard, report_evaluation

log = logging.getLogger("mgn")


class RunEvaluation:
    """Evaluation during training, behind one call: the model being trained scored on the test set by the
    evaluation core (mgn/eval/predictions.py), logged (console, TensorBoard, metrics.csv), the attention
    picture drawn up to its cap, and the best student exported."""

    def __init__(self, cfg: Config, world: distributed.World, inputs: ModelInputs, tensorboard: TensorBoard,
                 batches):
        self.cfg, self.world, self.inputs, self.tensorboard, self.batches = (cfg, world, inputs, tensorboard,
                                                                             batches)
        self.class_names = class_names(cfg.data.test_shards)
        self.last_student_accuracy: float | None = None

    @torch.no_grad()
    def __call__(self, objective: Objective, state: TrainState) -> dict:
        objective.eval()
        picture = []

        def forward(batch: dict):
            with autocast(self.cfg, self.inputs.device):
                out = objective.predict(**self.inputs(batch))
            if not picture and out.attention is not None:
                picture.append(samples_from_batch(self.inputs.display(batch["image"], limit=6), out.attention,
                                                  batch["label"], out.teacher, out.student,
                                                  batch.get("caption", []),
                                                  self.class_names))
            return out.student, out.teacher

        preds = merge(distributed.gather_objects(collect(self.batches, forward, self.cfg.model.num_classes,
                                                         allow_empty=True)))
        if len(preds.labels) == 0:
            raise RuntimeError(f"no test samples read from data.test_shards={self.cfg.data.test_shards!r}")
        results = self._report(preds, picture[0] if picture else None, state) if self.world.is_main else {}
        results = distributed.gather_objects(results)[0]
        score = results["student"]["accuracy"]
        if score > state.best_metric:
            state.best_metric, state.best_step = score, state.step
            if self.world.is_main:
                export_student(objective.student, self.cfg, self.cfg.paths.student_best)
                log.info("MGN: new best student accuracy %.4f, exported to %s", score,
                         self.cfg.paths.student_best)
        self.last_student_accuracy = score
        self.tensorboard.flush()
        return results

    def _report(self, preds, picture_samples, state: TrainState) -> dict:
        """Rank 0: metrics to the log, TensorBoard and metrics.csv; the attention picture, up to its cap."""
        results = report_evaluation(preds, self.tensorboard, self.cfg.run_dir, state.step, state.epoch)
        if picture_samples is not None and state.attention_grids < self.cfg.train.attention_images:
            state.attention_grids += 1
            picture = attention_figure(picture_samples, f"{self.cfg.train.run_name}, step {state.step}: test "
                                                        f"samples, {self.cfg.objective.name} objective")
            self.tensorboard.image("attention/cross_modality", picture, state.step)
            save_picture(picture, self.cfg.paths.attention_picture(state.step))
        return results
