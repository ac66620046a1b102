"""Settings chosen before any guided arm runs: the pilot rule, and seeds from power.

A setting can show a gain only if the baseline leaves room for one and its seed-to-seed spread is small enough
to see it. So the baseline runs alone first, at `pilot_seeds` (>= 5) seeds, and is scored on the validation
split (never the test set): the setting passes when

    ceiling - mean accuracy >= HEADROOM (3 points)   and   SD over seeds <= MAX_SD (1.5 points),

the ceiling being the image-only Bayes rule's accuracy on the same validation samples (mgn/eval/ceiling.py; on
a user's own data, where no ceiling is known, 1.0 stands in: an upper bound, so the rule can only be too
lenient there). Only settings that pass run the other arms, unless --ignore-pilot gives a reason, which the
table then prints.

Seeds from power: with a paired t test (two-sided 5%, 80% power), the minimum detectable effect at n seeds is
found from the noncentral t distribution for the SD of per-seed paired differences. The pilot measures the
baseline alone, so that SD is taken as sqrt(2) x the pilot's SD: two arms each as variable as the baseline and
not correlated. It gives pairing no credit (pairing usually helps), so the seeds it asks for are enough. A
passing setting runs the fewest seeds (at least the pilot's, at most max_seeds) whose MDE is at most TARGET
(1.5 points), or max_seeds where even those cannot reach it (the table then says what they can detect).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mgn.compare.plan import Options, Setting
from mgn.compare.significance import mde

HEADROOM = 0.03  # the baseline must sit this far below the ceiling ...
MAX_SD = 0.015  # ... with at most this SD over seeds
TARGET = 0.015  # the effect the seeds are chosen to detect: the paper's +1.3 to +1.5 points
ALPHA, POWER = 0.05, 0.8
MIN_PILOT_SEEDS = 5
RULE = (f"Pilot rule: the baseline alone at >= {MIN_PILOT_SEEDS} seeds, scored on the validation split, must "
        "sit at "
        f"least {100 * HEADROOM:.0f} points below the image-only ceiling of those samples with an SD over "
        "seeds of at "
        f"most {100 * MAX_SD:.1f} points; only then do the other arms run there.")


@dataclass
class PilotOutcome:
    setting: str
    seeds: list[int]  # the pilot seeds found in the results
    needed: int  # how many the pilot needs
    accuracy: float | None = None  # mean validation accuracy (stored labels; true ones where the data says)
    sd: float | None = None
    ceiling: float | None = None  # validation ceiling (stored labels); None: unknown, 1.0 used
    passed: bool | None = None  # None: the pilot is not complete
    reason: str = ""
    seeds_to_run: int | None = None  # for a passing setting: seeds from power
    mde: float | None = None  # minimum detectable effect at seeds_to_run
    validation_samples: int | None = None
    # the seed-to-seed SD the validation split's size alone gives, were the seeds' errors independent draws on
    # its samples: sqrt(acc (1 - acc) / n), an upper bound on what the split's size explains
    split_sd: float | None = None

    @property
    def paired_sd(self) -> float | None:
        return None if self.sd is None else math.sqrt(2) * self.sd

    @property
    def headroom(self) -> float | None:
        return (None if self.accuracy is None
                else (1.0 if self.ceiling is None else self.ceiling) - self.accuracy)

    def to_dict(self) -> dict:
        return {**asdict(self), "paired_sd": self.paired_sd, "headroom": self.headroom}


def seeds_for(paired_sd: float, minimum: int, maximum: int, target: float = TARGET) -> int:
    """The fewest seeds in [minimum, maximum] whose MDE is at most `target`; `maximum` if none."""
    return next((n for n in range(minimum, maximum + 1) if mde(paired_sd, n) <= target), maximum)


def outcome(rows: list[dict], setting: Setting, ceiling: float | None, options: Options) -> PilotOutcome:
    """The pilot rule on the baseline's results (results.jsonl rows) at the pilot seeds of one setting."""
    pilot = {r["seed"]: r for r in rows if r["setting"] == setting.name and r["arm"] == "baseline"
             and r["seed"] < options.pilot_seeds and "validation" in r}
    result = PilotOutcome(setting.name, sorted(pilot), options.pilot_seeds, ceiling=ceiling)
    if len(pilot) < options.pilot_seeds:
        result.reason = f"pilot incomplete: {len(pilot)} of {options.pilot_seeds} baseline seeds scored"
        return result
    values = [pilot[s]["validation"][setting.judged_role]["accuracy"] for s in sorted(pilot)]
    result.accuracy = float(np.mean(values))
    result.sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    result.validation_samples = pilot[min(pilot)]["validation"].get("samples")
    if result.validation_samples:
        result.split_sd = math.sqrt(result.accuracy * (1 - result.accuracy) / result.validation_samples)
    wanted = options.seeds or (seeds_for(result.paired_sd, options.pilot_seeds, options.max_seeds)
                               if result.sd is not None else options.max_seeds)
    result.seeds_to_run = max(wanted, options.pilot_seeds)
    result.mde = mde(result.paired_sd, result.seeds_to_run) if result.sd is not None else None
    if options.pilot_seeds < MIN_PILOT_SEEDS:
        result.reason = (f"no reading: a pilot needs at least {MIN_PILOT_SEEDS} seeds "
                         f"(--pilot-seeds {options.pilot_seeds})")
        return result
    if setting.synthetic and ceiling is None:
        # nothing runs on it: the ceiling comes with the data, which a run writes first
        result.seeds_to_run = None
        result.reason = ("no reading yet: the data and its ceiling are not written "
                         "(a run without --dry-run writes them)")
        return result
    room, spread = result.headroom >= HEADROOM - 1e-12, result.sd <= MAX_SD + 1e-12
    result.passed = room and spread
    failures = [] if room else [f"only {100 * result.headroom:.1f} points below the ceiling "
                                f"(needs {100 * HEADROOM:.0f})"]
    failures += [] if spread else [f"SD {100 * result.sd:.1f} points (at most {100 * MAX_SD:.1f})"
                                   + split_size_advice(result, setting)]
    result.reason = "passes" if result.passed else "fails: " + " and ".join(failures)
    return result


def split_size_advice(result: PilotOutcome, setting: Setting) -> str:
    """What the validation split's size alone could explain of a spread too large, and, on a user's shards
    where it explains much of it, the size of split that could judge (a split of 100 samples adds about 4
    points of seed-to-seed noise at 75% accuracy; 1,000 about 1.4)."""
    if result.split_sd is None:
        return ""
    text = (f", of which its {result.validation_samples} validation samples alone can explain up to "
            f"{100 * result.split_sd:.1f}")
    if not setting.synthetic and result.split_sd > MAX_SD / 2:
        needed = math.ceil(result.accuracy * (1 - result.accuracy) / (MAX_SD / 2) ** 2)
        text += f": pass --validation-shards holding at least {needed} samples"
    return text


def decide(outcomes: dict[str, PilotOutcome], options: Options) -> dict[str, int]:
    """Setting -> seeds, for every setting whose arms run: those that pass, or every complete pilot with
    --ignore-pilot (a setting whose pilot is incomplete never runs its arms)."""
    return {name: o.seeds_to_run for name, o in outcomes.items()
            if o.seeds_to_run and (o.passed or options.ignore_pilot)}


def describe(outcomes: dict[str, PilotOutcome], options: Options) -> str:
    """The rule and each setting's outcome, as printed before the arms run and in the table."""
    lines = [RULE]
    for name, o in outcomes.items():
        lines.append(f"  {name:<22} {line(o)}")
        if not o.passed and o.seeds_to_run and options.ignore_pilot:
            lines.append(f"  {'':<22} runs its arms anyway: --ignore-pilot {options.ignore_pilot!r}")
    return "\n".join(lines)


def line(o: PilotOutcome) -> str:
    if o.accuracy is None:
        return o.reason
    ceiling = f"ceiling {o.ceiling:.3f}" if o.ceiling is not None else "ceiling unknown (1.0 used)"
    spread = f" +/- {100 * o.sd:.1f} points" if o.sd is not None else ""
    text = (f"baseline {o.accuracy:.3f}{spread} over seeds {o.seeds[0]}-{o.seeds[-1]} (validation), "
            f"{ceiling}, "
            f"{100 * o.headroom:.1f} points below: {o.reason}")
    if o.seeds_to_run and o.mde is not None:
        text += (f"; minimum detectable effect at {o.seeds_to_run} seeds {100 * o.mde:.1f} points (80% "
                 "power, "
                 f"paired SD taken as sqrt(2) x {100 * o.sd:.1f})")
    return text
