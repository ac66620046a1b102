"""The arms: named sets of config overrides, read from data (arms.toml beside this file, plus --arms-file).

Arms are data, not code, so that a user adds an arm without touching the runner, and every override is
checked against the config schema (preset_config) when the file is read, before anything runs. An arm whose
objective is a positive control (mgn/config.py OBJECTIVES, `control`) is one: it runs on synthetic data only
and is marked as a control in every table.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from mgn.config import OBJECTIVES, ObjectiveConfig, preset_config

ARMS_FILE = Path(__file__).with_name("arms.toml")


@dataclass(frozen=True)
class Stage:
    overrides: dict  # {section: {field: value}}
    epochs_share: float = 1.0

    @property
    def objective(self) -> str:
        """The objective this stage trains (the config's default where the arm names none)."""
        return self.overrides.get("objective", {}).get("name", ObjectiveConfig().name)


@dataclass(frozen=True)
class Arm:
    name: str
    about: str
    stages: tuple[Stage, ...]
    control: bool = False  # a positive control: trains on the synthetic generator's ground truth
    reachable: bool = True  # a control some method could match (False: a bound, never a share's denominator)


def load_arms(path: str | Path | None = None) -> dict[str, Arm]:
    """The runner's arms (mgn/compare/arms.toml), plus or overridden by the arms of `path` (same format)."""
    tables = tomllib.loads(ARMS_FILE.read_text())
    if path:
        tables |= tomllib.loads(Path(path).read_text())
    arms = {}
    for name, table in tables.items():
        table = dict(table)
        about = table.pop("about", "")
        raw_stages = table.pop("stages", None) or [table]
        stages = []
        for raw in raw_stages:
            raw = dict(raw)
            share = float(raw.pop("epochs_share", 1.0))
            try:
                preset_config("tiny", raw)  # unknown sections, fields and values fail here
            except (ValueError, TypeError) as error:
                raise ValueError(f"arm {name!r} ({path or ARMS_FILE}): {error}") from error
            stages.append(Stage(overrides=raw, epochs_share=share))
        if abs(sum(s.epochs_share for s in stages) - 1.0) > 1e-6:
            raise ValueError(f"arm {name!r}: the stages' epochs_share must add up to 1 (the arm's whole "
                             "budget)")
        names = [stage.objective for stage in stages]
        control = any(OBJECTIVES[name].control for name in names)
        reachable = all(OBJECTIVES[name].reachable for name in names)
        arms[name] = Arm(name, about, tuple(stages), control, reachable)
    if "baseline" not in arms:
        raise ValueError("the arms must include 'baseline': every other arm is compared with it")
    return arms
