#!/usr/bin/env bash
# Install everything the project needs into the current Python environment (a venv is a good idea).
# torch goes first: deepspeed compiles against the installed torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet --no-build-isolation -r requirements.txt
python -c "import torch, deepspeed, timm, transformers, webdataset, submitit; print('MGN: installed torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__)"
