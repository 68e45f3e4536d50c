"""Compute T5 embeddings for an upstream-layout dataset: `metas/<name>.txt` -> `t5_xxl/<name>.pickle`.

The drop-in for upstream's `python -m scripts.get_t5_embeddings`: the prompt is the text file's content stripped of
surrounding whitespace; each pickle holds a Python list with one float16 numpy array `[n_tokens, 1024]` (real tokens,
EOS counted), exactly the upstream format. Existing pickles are kept unless `--overwrite`. Every file is written to a
temporary name and renamed, so an interrupted run leaves no half-written pickle; rerunning continues where it stopped.
Empty prompts and files that are not UTF-8 are reported and skipped; the command then exits with status 1.

Commands:
  # GPU (real t5-11b folder, the upstream location):
  python -m data_tools.compute_t5 --dataset_path datasets/my_robot --t5 checkpoints/google-t5/t5-11b
  # CPU, tiny random T5 (tests and the demo; the embeddings mean nothing):
  python -m data_tools.compute_t5 --dataset_path /tmp/demo_dataset --t5 tiny --device cpu
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from toolkit.encoders.t5 import T5TextEncoder, save_upstream_pickle

DEFAULT_T5 = "checkpoints/google-t5/t5-11b"
METAS_FOLDER = "metas"
EMBEDDINGS_FOLDER = "t5_xxl"


@dataclass
class _Plan:
    """What to do with each prompt file, decided before the encoder is loaded."""

    todo: list[tuple[Path, str]] = field(default_factory=list)
    """(pickle path, prompt) pairs to encode."""
    skipped: list[Path] = field(default_factory=list)
    """Pickles that already exist (kept without --overwrite)."""
    bad: list[str] = field(default_factory=list)
    """One message per unusable prompt file."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.compute_t5",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset_path", required=True, type=Path, help="dataset folder holding metas/*.txt; t5_xxl/ is written here"
    )
    parser.add_argument(
        "--t5",
        default=DEFAULT_T5,
        help=f"local T5 folder (google-t5/t5-11b: config, weights, tokenizer) or `tiny` (default: {DEFAULT_T5})",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per encoder call (default: 8)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="where T5 runs (default: cuda when available)"
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute pickles that already exist")
    return parser


def plan_dataset(dataset_path: Path, overwrite: bool) -> _Plan:
    """Read every `metas/*.txt` (sorted) and decide: encode, skip (pickle exists) or report as bad."""
    plan = _Plan()
    output_folder = dataset_path / EMBEDDINGS_FOLDER
    for meta_path in sorted((dataset_path / METAS_FOLDER).glob("*.txt")):
        pickle_path = output_folder / f"{meta_path.stem}.pickle"
        if pickle_path.exists() and not overwrite:
            plan.skipped.append(pickle_path)
            continue
        try:
            prompt = meta_path.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError as error:
            plan.bad.append(f"{meta_path}: not UTF-8 ({error}); re-save it as UTF-8 text")
            continue
        if not prompt:
            plan.bad.append(f"{meta_path}: empty prompt; write the clip's description into it")
            continue
        plan.todo.append((pickle_path, prompt))
    return plan


def encode_plan(plan: _Plan, encoder: T5TextEncoder, batch_size: int) -> None:
    """Write one pickle per planned prompt, a batch at a time (so progress survives an interruption)."""
    starts = range(0, len(plan.todo), batch_size)
    for start in tqdm(starts, desc="T5 embeddings", unit="batch", disable=len(starts) <= 1):
        batch = plan.todo[start : start + batch_size]
        arrays = encoder.encode([prompt for _, prompt in batch], batch_size=batch_size, progress=False)
        for (pickle_path, _), array in zip(batch, arrays):
            save_upstream_pickle(pickle_path, array)


def main(argv: list[str] | None = None) -> int:
    """Compute missing T5 pickles; 0 when every prompt file was usable, 1 when some were bad, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    # 1. Check the arguments and the dataset layout before loading anything.
    if args.batch_size < 1:
        print(f"--batch_size={args.batch_size}: must be a positive integer, e.g. 8", file=sys.stderr)
        return 2
    metas = args.dataset_path / METAS_FOLDER
    if not metas.is_dir():
        print(
            f"--dataset_path={args.dataset_path}: no {METAS_FOLDER}/ folder at {metas}; the dataset must hold "
            f"{METAS_FOLDER}/<name>.txt prompt files (the upstream layout)",
            file=sys.stderr,
        )
        return 2
    print(
        f"compute_t5: dataset_path={args.dataset_path} t5={args.t5} batch_size={args.batch_size} "
        f"device={args.device or 'auto'} overwrite={args.overwrite}"
    )
    # 2. Decide per file; the encoder loads only when there is something to encode.
    plan = plan_dataset(args.dataset_path, args.overwrite)
    if not (plan.todo or plan.skipped or plan.bad):
        print(f"--dataset_path={args.dataset_path}: {metas} holds no *.txt prompt files", file=sys.stderr)
        return 2
    if plan.todo:
        try:
            encoder = T5TextEncoder.load(args.t5, device=args.device)
        except (FileNotFoundError, ValueError) as error:
            print(f"--t5={args.t5}: {error}", file=sys.stderr)
            return 2
        encode_plan(plan, encoder, args.batch_size)
    # 3. Report.
    for message in plan.bad:
        print(f"bad prompt file: {message}", file=sys.stderr)
    print(
        f"compute_t5: wrote {len(plan.todo)}, kept {len(plan.skipped)} existing, {len(plan.bad)} bad "
        f"-> {args.dataset_path / EMBEDDINGS_FOLDER}"
    )
    return 1 if plan.bad else 0


if __name__ == "__main__":
    sys.exit(main())
