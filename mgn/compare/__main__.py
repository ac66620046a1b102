"""`python -m mgn.compare --run-cell SPEC RESULT | --train-config JSON`: the runner's child processes.

Internal: mgn/compare/cell.py starts these and documents them; users run compare.py.
"""
import sys

from mgn.compare.cell import main

if __name__ == "__main__":
    sys.exit(main())
