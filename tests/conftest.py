import os
import shutil
import sys
from pathlib import Path

# Without a GPU the Triton kernels run in Triton's interpreter. The flag must be set before anything imports triton
# (transformers and vLLM do), so it is set here, before pytest collects any test module.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests import opd, eval, flops, kernels, embedded
