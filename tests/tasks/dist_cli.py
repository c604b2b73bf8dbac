"""`python dist_cli.py RESULT_PREFIX intern2-arguments...` under torchrun: runs the CLI in each rank and writes
what that rank printed to RESULT_PREFIX.rank<RANK>.out."""
import contextlib
import os
import sys

import torch

from intern2 import cli

torch.set_num_threads(1)
prefix, argv = sys.argv[1], sys.argv[2:]
with open(f"{prefix}.rank{os.environ['RANK']}.out", "w") as out, contextlib.redirect_stdout(out):
    code = cli.main(argv)
sys.exit(code)
