"""
Turns a sharded checkpoint (out_dir/ckpt_sharded/, written by train.py with fsdp=True) into an ordinary
nanoforge checkpoint, for sample.py, evaluation and export. One process; no GPU or torchrun needed, but
memory for the whole model.

$ python consolidate.py out-gpt2                       # -> out-gpt2/ckpt.pt
$ python consolidate.py out-gpt2 --out=gpt2-final.pt
"""
import argparse
import os

from nanoforge import checkpoint, errors
from nanoforge.errors import UserError

errors.friendly_errors()
parser = argparse.ArgumentParser(description="Consolidate a sharded checkpoint into one ckpt.pt.")
parser.add_argument("out_dir", help="the run's out_dir (holding ckpt_sharded/) or the ckpt_sharded folder itself")
parser.add_argument("--out", help="where to write the checkpoint (default: OUT_DIR/ckpt.pt)")
args = parser.parse_args()
folder = args.out_dir if os.path.exists(os.path.join(args.out_dir, "meta.json")) else checkpoint.find_sharded(args.out_dir)
if folder is None:
    raise UserError(f"no sharded checkpoint in {args.out_dir}; train with --fsdp=True, or give the ckpt_sharded folder")
out = args.out or checkpoint.ckpt_path(os.path.dirname(os.path.abspath(folder)))
checkpoint.consolidate(folder, out)
print(f"{folder} -> {out}")
