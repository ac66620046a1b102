"""train.py with the tests' fault seam (tests/faults.py) installed from the environment: what the fault tests
launch in its place, alone or under torchrun.

    MGN_INJECT_NAN=4:1 python tests/fault_train.py --preset tiny ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from mgn.cli import run_command  # noqa: E402
from mgn.distributed import detect_world  # noqa: E402
from tests.faults import FaultInjection  # noqa: E402

if __name__ == "__main__":
    faults = FaultInjection.from_environment(detect_world().rank)
    sys.exit(run_command("train.py", lambda: train.main(sys.argv[1:], faults=faults)))
