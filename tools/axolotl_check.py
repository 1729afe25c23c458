"""Checks an exported Axolotl config (finetune job export --to axolotl) against Axolotl's own
config schema (axolotl.utils.schemas.config.AxolotlInputConfig, the pydantic model `axolotl train`
validates with). Axolotl's package is installed without its dependencies (it pins CUDA-only
packages); the schema needs pydantic, transformers, torch and pillow, so run it with the pyref venv
(tools/pyref-setup.sh) after:

    $PY -m pip install --no-deps --target ~/.cache/finetune/axolotl-0.19.0 axolotl==0.19.0 pillow
    $PY tools/axolotl_check.py ~/.cache/finetune/axolotl-0.19.0 JOB/axolotl.yaml
"""

import sys

import yaml

sys.path.insert(0, sys.argv[1])
from axolotl.utils.schemas.config import AxolotlInputConfig  # noqa: E402

cfg = yaml.safe_load(open(sys.argv[2]))
model = AxolotlInputConfig(**cfg)
print(f"valid Axolotl config: adapter={model.adapter} lora_r={model.lora_r} "
      f"datasets={[d.path for d in model.datasets]} max_steps={model.max_steps}")
