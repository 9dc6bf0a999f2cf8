"""Train, evaluate and inspect every model of flax_attention with one trainer.

    python train.py                                   # reference: BiGRU + attention on IMDB, 3 epochs
    python train.py --model transformer               # Transformer-encoder classifier (IMDB)
    python train.py --model translate                 # Transformer, Multi30k de->en, SentencePiece, sacreBLEU
    python train.py --model translate --source_lang en --target_lang de
    python train.py --model seq2seq --task reverse    # encoder-decoder on a synthetic task
    python train.py --model lm                        # decoder-only LM on IMDB train + unsupervised reviews
    python train.py --mesh data=2,fsdp=4              # jax.jit on a device mesh instead of pmap
    python train.py --model translate --help          # every flag of that model, with its default
    python train.py predict --workdir checkpoints/bigru "A wonderful, moving film."
    python train.py translate --workdir checkpoints/translate_de_en "Ein Hund rennt über die Wiese."
    python train.py visualize --workdir checkpoints/bigru --num_examples 5
    python train.py generate --workdir checkpoints/lm --prompt "This movie was" --num_samples 3 --top_p 0.9
    python train.py ensemble --workdir checkpoints/lm_clf --workdir checkpoints/lm_clf_all --split test
    python train.py embed --out imdb_vectors.txt      # skip-gram vectors from IMDB train + unsupervised
    python train.py --embeddings imdb_vectors.txt --workdir checkpoints/bigru_vectors

Re-running the same command resumes from the latest checkpoint in --workdir
(same data order, same step). Data: TFDS under TFDS_DATA_DIR (``imdb_reviews``,
``multi30k``). The loop lives in flax_attention.training; this file is the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

COMMANDS = ("predict", "translate", "visualize", "embed", "generate", "ensemble")


def _embed_parser() -> argparse.ArgumentParser:
    from flax_attention.embed.skipgram import SkipGramConfig
    from flax_attention.training.config import add_config_flags

    p = argparse.ArgumentParser(prog="train.py embed", description="Learns skip-gram word vectors (Mikolov et al. "
                                "2013) from IMDB's train + unsupervised reviews (never the test split) and writes "
                                "them as a word2vec text file for `train.py --embeddings`.")
    p.add_argument("--out", required=True, help="the vector file to write")
    p.add_argument("--workdir", default="checkpoints/embed", help="vocabulary and encoded-review cache")
    p.add_argument("--vocab_size", type=int, default=10_000, help="as the classifier's --vocab_size")
    add_config_flags(p, {"skip-gram": SkipGramConfig})
    return p


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py generate", description="Continues prompts with a --model lm "
                                "workdir's best checkpoint (KV-cached sampling, one jitted loop).")
    p.add_argument("--workdir", required=True, help="directory written by `train.py --model lm`")
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue (repeat the flag for several prompts; \"\" starts a review from nothing)")
    p.add_argument("--num_samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; 1 = the model's distribution")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="tokens to add (default: fill the model's max_length after the longest prompt)")
    p.add_argument("--seed", type=int, default=0, help="sampling key (a fixed seed repeats the output)")
    return p


def _ensemble_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py ensemble", description="Averages the probabilities of IMDB "
                                "classifier workdirs (each at the checkpoint its run selected) and prints the "
                                "accuracy of every member and of the ensemble.")
    p.add_argument("--workdir", action="append", required=True,
                   help="a classifier workdir trained with --valid_examples N (repeat: two or more, the same N)")
    p.add_argument("--split", default="validation", choices=("validation", "test"),
                   help="choose the members on validation; read test once, for the ensemble you report")
    p.add_argument("--batch_size", type=int, default=128, help="reviews per forward pass")
    p.add_argument("--out", default=None, help="also append the result as one JSON line to this file")
    return p


def _inspect_parser(command: str) -> argparse.ArgumentParser:
    if command == "embed":
        return _embed_parser()
    if command == "generate":
        return _generate_parser()
    if command == "ensemble":
        return _ensemble_parser()
    p = argparse.ArgumentParser(prog=f"train.py {command}")
    p.add_argument("--workdir", required=True, help="directory written by `train.py`")
    if command in ("predict", "translate"):
        p.add_argument("texts", nargs="+", help="review text(s) to classify, or sentence(s) to translate "
                       "(synthetic seq2seq tasks: symbol indices such as \"3 1 4\")")
        p.add_argument("--html" if command == "predict" else "--out", dest="out", default=None,
                       help="classifiers: also write an HTML page here; seq2seq: folder of the heatmap PNGs "
                            "(default: WORKDIR/heatmaps)")
    else:
        p.add_argument("--num_examples", type=int, default=5, help="random test examples to show")
        p.add_argument("--seed", type=int, default=0, help="picks the examples")
        p.add_argument("--html", dest="out", default=None, help="output page (default: WORKDIR/attention.html); "
                       "for seq2seq workdirs, the folder of the heatmap PNGs (default: WORKDIR/heatmaps)")
    return p


def default_workdir(task, configs) -> str:
    if task.name == "translate":
        d = configs["data"]
        return str(Path("checkpoints") / f"translate_{d.source_lang}_{d.target_lang}")
    if task.name == "seq2seq":
        return str(Path("checkpoints") / f"seq2seq_{configs['data'].task}")
    return str(Path("checkpoints") / task.name)


def parse_args(argv: Sequence[str]):
    from flax_attention.training.config import TrainConfig, add_config_flags, build_configs
    from flax_attention.training.registry import REGISTRY, get_task

    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        return argv[0], _inspect_parser(argv[0]).parse_args(argv[1:]), None, None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="bigru")
    task = get_task(pre.parse_known_args(argv)[0].model)
    sections = {**task.config_classes, "train": TrainConfig}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bigru", choices=sorted(REGISTRY),
                   help="bigru: BiGRU + additive attention (IMDB); transformer: Transformer-encoder classifier "
                        "(IMDB); translate: encoder-decoder Transformer on a TFDS translation dataset "
                        "(Multi30k); seq2seq: the same on a synthetic --task; lm: decoder-only language model "
                        "(IMDB reviews). `--model M --help` lists M's flags.")
    p.add_argument("--workdir", default=None, help="checkpoints, vocabulary, metrics, TensorBoard events "
                   "(default: checkpoints/<model>, checkpoints/translate_<src>_<tgt>, checkpoints/seq2seq_<task>)")
    g = p.add_argument_group("devices and processes (one process per host; see flax_attention.training.distributed)")
    g.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (or $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num_processes", type=int, default=None, help="total processes (or $JAX_NUM_PROCESSES)")
    g.add_argument("--process_id", type=int, default=None, help="this process, 0..n-1 (or $JAX_PROCESS_ID)")
    g.add_argument("--mesh", default=None, help="train with jax.jit on a device mesh instead of pmap, e.g. "
                   "data=2,fsdp=4 or data=2,seq=4 (sizes multiply to the device count): batch over data x fsdp, "
                   "parameters and optimizer state over fsdp, sequences over seq (seq=4:zigzag or "
                   "seq=4:ulysses pick the context-parallel method; default ring; see "
                   "flax_attention.training.mesh); checkpoints resume on either path")
    add_config_flags(p, sections, task.flag_defaults)
    args = p.parse_args(argv)
    configs = build_configs(sections, args)  # bad values fail before processes connect
    if args.mesh:
        from flax_attention.training.mesh import parse_mesh
        parse_mesh(args.mesh)
    args.workdir = args.workdir or default_workdir(task, configs)
    return "train", args, task, configs


def main(argv: Optional[Sequence[str]] = None) -> int:
    from flax_attention.data.tfds_source import DataUnavailableError
    from flax_attention.training import inspector
    from flax_attention.training.bookkeeping import DivergenceError, StopRequested, maybe_initialize_distributed
    from flax_attention.training.checkpointing import IncompatibleWorkdirError
    from flax_attention.training.loop import train_and_evaluate

    try:
        command, args, task, configs = parse_args(sys.argv[1:] if argv is None else argv)
        if command in ("predict", "translate", "visualize"):
            from flax_attention.training.lm import refuse_lm_workdir

            refuse_lm_workdir(args.workdir, command)
        if command == "predict":
            inspector.predict(args.workdir, args.texts, args.out)
        elif command == "translate":
            inspector.translate(args.workdir, args.texts, args.out)
        elif command == "visualize":
            inspector.visualize(args.workdir, args.num_examples, args.seed, args.out)
        elif command == "embed":
            embed(args)
        elif command == "ensemble":
            from flax_attention.training.ensemble import ensemble

            ensemble(args.workdir, args.split, args.batch_size, args.out)
        elif command == "generate":
            from flax_attention.training.lm import generate_texts  # checks the flags before loading anything

            generate_texts(args.workdir, args.prompt, num_samples=args.num_samples, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
        else:
            maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
            train_and_evaluate(task, configs, args.workdir, mesh=args.mesh)
    except (ValueError, FileNotFoundError, DataUnavailableError, IncompatibleWorkdirError) as e:
        return _fail(str(e), 2)
    except DivergenceError as e:
        return _fail(str(e), 3)
    except OSError as e:  # disk full, permissions, ...: one line naming the file
        return _fail(f"{type(e).__name__}: {e}", 2)
    except StopRequested as e:  # 128 + SIGTERM, what a scheduler expects from a preempted job
        return _fail(str(e), 143, prefix="stopped")
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume from the last checkpoint.", 130)
    return 0


def embed(args) -> None:
    from flax_attention.data.imdb import IMDBConfig
    from flax_attention.embed.imdb_vectors import learn_imdb_vectors
    from flax_attention.embed.skipgram import SkipGramConfig
    from flax_attention.training.config import build_configs

    config = build_configs({"skipgram": SkipGramConfig}, args)["skipgram"]
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    print(learn_imdb_vectors(args.workdir, args.out, IMDBConfig(vocab_size=args.vocab_size), config).summary())


def _fail(message: str, code: int, prefix: str = "error") -> int:
    """One ``error:`` line on stderr (after closing progress bars) and the exit code."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
