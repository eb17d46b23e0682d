"""`picochat export`: write a checkpoint in another framework's format.

    picochat export --format hf                         # most trained stage (rl > sft > mid > base)
    picochat export --format hf --stage sft --tag d20 --out ~/models/picochat-d20
    picochat export --format hf --dtype bfloat16        # half the size on disk

`--format hf` writes a Hugging Face transformers directory (see picochat/export/hf.py): of the
native `nanochat` model type for the classic architecture, else transformers remote code (the model
code travels in the directory; loading needs trust_remote_code=True). Default destination
$PICOCHAT_HOME/export/hf/<stage>-<tag>-step<N>. Load it with:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR)  # remote code: add trust_remote_code=True
    tok = AutoTokenizer.from_pretrained(DIR)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt")
"""

from __future__ import annotations

import argparse
from pathlib import Path

from picochat.checkpoint import load_checkpoint_dir
from picochat.config import add_checkpoint_arguments
from picochat.export.hf import export_hf, needs_remote_code
from picochat.infer.loading import resolve_checkpoint
from picochat.runtime import home

FORMATS = ("hf",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="hf", help="hf: Hugging Face transformers (default)")
    add_checkpoint_arguments(p)
    p.add_argument("--out", default=None,
                   help="output directory (default $PICOCHAT_HOME/export/hf/<stage>-<tag>-step<N>)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the exported weights (default float32, the master weights)")


def run(args: argparse.Namespace) -> int:
    path = resolve_checkpoint(args.stage, args.tag, args.step)
    model, tokenizer, meta = load_checkpoint_dir(path, "cpu")
    # The directory names the step (checkpoints/<stage>/<tag>/step_<N>); meta.json may lack it.
    stage, tag, step = path.parent.parent.name, path.parent.name, int(path.name.removeprefix("step_"))
    out = Path(args.out) if args.out else home() / "export" / "hf" / f"{stage}-{tag}-step{step}"
    source = {"checkpoint": str(path), "stage": stage, "tag": tag, "step": step,
              "tokenizer_hash": tokenizer.hash, "metrics": meta.get("metrics", {})}
    out = export_hf(model, tokenizer, out, dtype=args.dtype, source=source)  # the directory written (~ expanded)
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    options = model.config.non_classic()
    kind = f"transformers remote code, for {', '.join(options)}" if options else "native nanochat"
    print(f"exported {path} ({model.num_params():,} params, {args.dtype}, {size_mb:.1f} MB, {kind}) -> {out}")
    trust = ", trust_remote_code=True" if needs_remote_code(model.config) else ""
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(out)!r}{trust})")
    return 0
