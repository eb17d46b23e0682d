"""The `picochat` command line: one subcommand per pipeline stage.

Each command lives in its own module, which defines `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so
`picochat --help` stays instant (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from picochat.errors import UserError

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("picochat.data.commands", "get pretraining text: download FineWeb-Edu shards or build the offline corpus"),
    "tok-train": ("picochat.tokenizer.commands_train", "train the BPE tokenizer on the train shards"),
    "tok-eval": ("picochat.tokenizer.commands_eval", "compare compression (bytes/token) with GPT-2 and GPT-4"),
    "base-eval": ("picochat.eval.core_command", "CORE score of a base checkpoint (22 few-shot tasks, DCLM protocol)"),
    "base-train": ("picochat.train.base_train", "pretrain the GPT on the text shards (Muon + AdamW)"),
    "base-loss": ("picochat.eval.base_loss", "train/val bits-per-byte of a base checkpoint, plus greedy samples"),
    "mid-train": ("picochat.train.mid_train", "mid-train a base model on chat, tool use and multiple choice (packed)"),
    "sft": ("picochat.train.sft", "supervised fine-tuning on padded conversations (assistant tokens only)"),
    "rl": ("picochat.train.rl", "reinforcement learning on math word problems (GRPO-style, calculator tool live)"),
    "chat-eval": ("picochat.eval.chat_eval", "MMLU, ARC, GSM8K, HumanEval, SpellingBee accuracy and ChatCORE of a chat checkpoint"),
    "chat-probe": ("picochat.eval.chat_probe", "30 everyday prompts with the chat defaults: task-format echo, repeats, dictionary words"),
    "plan": ("picochat.plan", "will a run fit on a GPU, how long will it take, what will it cost (memory per term)"),
    "speedrun": ("picochat.speedrun", "the whole pipeline in one command: data -> ... -> SFT -> report (resumable)"),
    "chat": ("picochat.chat_cli", "chat with a checkpoint in the terminal (streaming, /help for commands)"),
    "serve": ("picochat.serve.commands", "web chat UI and OpenAI-compatible API on 127.0.0.1 (FastAPI + uvicorn)"),
    "export": ("picochat.export.command", "write a checkpoint as a Hugging Face transformers model (nanochat type)"),
    "report": ("picochat.report.command", "markdown report card of a run: environment, every stage's metrics, plots"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="picochat", description="Build your own ChatGPT-style model: "
                                     "tokenizer -> pretraining -> mid -> SFT -> RL -> eval -> chat.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    # Parse once to find the command, then let the command's module add its flags.
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; run `picochat --help` to list commands")
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"picochat {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return code
    except BrokenPipeError:  # whoever read the output left (`picochat plan | head`): stop without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as e:
        # An error every rank of a distributed run raises together is printed once per node.
        if not getattr(e, "all_ranks", False) or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
