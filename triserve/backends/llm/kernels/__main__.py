"""``python -m triserve.backends.llm.kernels``: build the LLM engine's own kernel now (scripts/install.sh
runs it), instead of at the first load of an int4 model; says whether it will run here."""

import logging
import sys

from triserve.backends.llm.kernels import build_directory, load

logging.basicConfig(level=logging.INFO, format="[kernels] %(message)s")
why = load()
if why is None:
    print(f"[kernels] the int4 x int8 VNNI kernel is ready ({build_directory()})")
else:
    print(f"[kernels] the int4 x int8 VNNI kernel will not run here: {why}; int4 weights use torch's kernel")
sys.exit(0)
