"""`qlora-kernels` / `python -m qlora_kernels`: finetune (the main job), bench, env.

Exit codes: 0 done; 1 the job could not run here, could not read or write a file, or its
result cannot be trusted; 2 an argument it cannot run with. Either way the reason is one
line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import JobArgumentError, JobFailed

EXIT_FAILED = 1
EXIT_BAD_ARGUMENT = 2  # argparse's own code for a usage error


def _env(args: argparse.Namespace) -> int:
    from .env import backends

    print(json.dumps(backends(), indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.markdown:
        from .bench.report import markdown_table

        print(markdown_table(args.markdown))
        return 0
    from .bench import run

    run(args.what, quick=args.quick, out_dir=args.out)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import run

    run(family=args.model, size=args.size, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, device=args.device, out=args.out, only=args.only, isolate=not args.in_process,
        keep_checkpoint=args.keep_checkpoint, vocab=args.vocab, parts=args.parts)
    return 0


def _logging_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="info",
                       help="show the qlora_kernels log at INFO: what patch() did to the model, which backend "
                            "runs each op (--log-level info)")
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="level of the qlora_kernels log on stderr (default warning)")
    common.set_defaults(log_level="warning")  # one default for both options of the same setting
    return common


def _finetune_parser(sub, common: argparse.ArgumentParser) -> None:
    from .finetune import FAMILIES, PARTS, RUN_DEFAULTS, SIZES

    sizes = "\n".join(f"  {k:<6} seq {v['seq_len']}, batch {v['batch_size']}, {v['steps']} steps, lr {v['lr']:g}"
                      for k, v in RUN_DEFAULTS.items())
    p = sub.add_parser(
        "finetune", parents=[common],
        help="QLoRA fine-tuning of a random-init model, stock vs patched, side by side (make demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a random-init Llama / OPT / Bloom from a size preset (no download), save it as bf16,\n"
                    "and fine-tune it twice with the usual QLoRA recipe (bitsandbytes NF4 double quant on load,\n"
                    "prepare_model_for_kbit_training, LoRA r=8 alpha=16 dropout 0.1 on all linear layers):\n"
                    "stock transformers + PEFT + bitsandbytes, then the same plus qlora_kernels.patch(model).\n"
                    "Same seed, same batches (bytes of the Python standard library's sources). Prints tokens/s,\n"
                    "peak memory and losses of both and writes finetune.json + finetune.png to\n"
                    "<out>/finetune-<model>-<size>-<date>/.",
        epilog="size presets: 7b = Llama-2-7B / OPT-6.7B / BLOOM-7b1 shapes (GPU); 1b = TinyLlama-1.1B / OPT-1.3B /\n"
               "BLOOM-1b1 shapes; tiny and small are CPU sizes; test is for the test suite. Defaults per size:\n"
               f"{sizes}")
    p.add_argument("--model", default="llama", choices=FAMILIES, help="model family (default llama)")
    p.add_argument("--size", default="tiny", choices=SIZES, help="size preset (default tiny, for a CPU)")
    p.add_argument("--steps", type=int, help="training steps (default: per size); the first is warm-up, not timed")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: per size)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: per size)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: per size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, LoRA init, data order, dropout")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="runs", help="folder for the run folders (default runs, in the current folder)")
    p.add_argument("--only", default="both", choices=["both", "stock", "patched"], help="train one side only")
    p.add_argument("--in-process", action="store_true",
                   help="train both sides in this process (faster start; CPU peak memory is then not comparable)")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the random-init bf16 checkpoint")
    p.add_argument("--vocab", type=int, metavar="N",
                   help="vocabulary of the model (default 257: the 256 byte values and a pad id). The data stay "
                        "bytes; a real tokenizer's size (Llama-2: 32000) gives the lm_head and the logits their "
                        "real cost")
    p.add_argument("--parts", nargs="?", const="all", metavar="PART[,PART...]",
                   help="the effect of each kernel: train stock, every part on ('patched') and every part on but "
                        f"one ('patched -PART') for each named part (default all: {','.join(PARTS)}), each in its "
                        "own process; tokens/s and peak memory of every configuration")
    p.set_defaults(fn=_finetune)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="qlora-kernels", description=__doc__.split("\n\n")[0],
                                  epilog=__doc__.split("\n\n", 1)[1])
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    common = _logging_options()

    _finetune_parser(sub, common)

    p = sub.add_parser("bench", parents=[common],
                       help="microbenchmarks vs what users run today; writes runs/bench-*.json",
                       description="Check each op against its baseline and time both side by side on one device; "
                                   "writes <out>/bench-<device>[-<suite>]-<date>.json (with the git commit of the "
                                   "measured source) and a PNG.")
    p.add_argument("what", nargs="?", default="all", choices=["nf4", "lora", "attention", "decode", "loss", "all"],
                   help="which suite (default all); decode: NF4Linear at 1 to 16 tokens and generate() tokens/s "
                        "against bf16 and bitsandbytes 4-bit; loss: fused linear + cross-entropy against the "
                        "lm_head + transformers' loss, time and peak memory of a training step")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--out", default="runs", help="folder for the results JSON and PNG (default runs, in the "
                                                 "current folder)")
    p.add_argument("--markdown", metavar="JSON", help="print a results JSON as the README's Markdown table; no run")
    p.set_defaults(fn=_bench)

    p = sub.add_parser("env", parents=[common], help="what was compiled and what is usable here",
                       description="Print (JSON) the compiled CUDA archs, runtime and the backend of each op here.")
    p.set_defaults(fn=_env)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # the library only logs; showing its log is the application's choice, here on stderr
    logger = logging.getLogger("qlora_kernels")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    try:
        return args.fn(args)
    except JobArgumentError as e:
        code, message = EXIT_BAD_ARGUMENT, str(e)
    except JobFailed as e:
        code, message = EXIT_FAILED, str(e)
    except OSError as e:  # a folder that cannot be written, a results file that is not there
        code, message = EXIT_FAILED, f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    finally:  # main() may be called again in this process (tests, scripts)
        logger.removeHandler(handler)
        logger.setLevel(level)
    print(f"qlora-kernels {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
