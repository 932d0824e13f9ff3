"""``python -m triserve.backends.llm.kernels``: build the LLM engine's own kernels now (scripts/install.sh
runs it), instead of at the first load of a quantized model; says whether they will run here."""

import logging
import sys

from triserve.backends.llm.kernels import build_directory, load

logging.basicConfig(level=logging.INFO, format="[kernels] %(message)s")
why = load()
if why is None:
    print(f"[kernels] the int4/int8 x int8 VNNI kernels are ready ({build_directory()})")
else:
    print(f"[kernels] the VNNI kernels will not run here: {why}; quantized weights use torch's kernels")
sys.exit(0)
