"""The ``hybrid-lm`` console script: one entry point, one module per subcommand.

Each subcommand lives next to the code it drives and exposes ``configure(parser)`` and
``main(args) -> int``. Only the chosen module is imported, so ``hybrid-lm data ...`` never
pays for DeepSpeed's import and a broken optional dependency cannot break unrelated commands.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("hybrid_lm.data.cli", "build WebDataset shards from a corpus, inspect them"),
    "train": ("hybrid_lm.train.cli", "train a model from a YAML/TOML config with dotted overrides"),
    "eval": ("hybrid_lm.train.eval_cli", "evaluate a checkpoint on validation shards"),
    "plan": ("hybrid_lm.train.plan_cli", "memory per GPU and step time of a config on N GPUs; fails if it does not fit"),
    "plot": ("hybrid_lm.train.plot", "draw the loss curves of a run directory to PNG"),
    "export": ("hybrid_lm.export.cli", "export a training checkpoint to a Hugging Face folder"),
    "import": ("hybrid_lm.export.import_cli", "import a Hugging Face Llama/Mamba2 folder as a checkpoint"),
    "recursive": ("hybrid_lm.train.recursive_cli", "convert a pretrained model into a looped (relaxed recursive) one"),
    "run": ("hybrid_lm.launch.main_job", "the main job: build shards, train, evaluate and export"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-lm",
        description="Pretraining stack for hybrid long-context language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_level_parser().parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"hybrid-lm {name}", description=help_text)
    module.configure(parser)
    try:
        # options may come between positionals (`run CONFIG --artifacts DIR key=value`)
        args = parser.parse_intermixed_args(rest)
    except TypeError:  # argparse cannot intermix with sub-subcommands (`data build ...`)
        args = parser.parse_args(rest)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
