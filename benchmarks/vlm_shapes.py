"""A vision-language model trained from scratch on the built-in shapes data (issue 21), against a text-only model
given the same questions, by held-out accuracy per question type (exact match of the greedy one-word answer).

1. the data: `lmforge shapes --every-question` (--train images, each asked every question it can answer in
   one conversation, with a caption; --test held-out images with one question each, a fifth of each type;
   --one-question: one question per training image, as before), and a 512-token tokenizer trained on its text
2. the vision model: `tiny-llava` fresh, with --align-steps first `lmforge vlm --stage align` on the captions
   (only the projector), then `--stage sft` on the questions (--sft-steps, or as many as --sft-minutes of training hold:
   the projector and the language model; the vision tower too with --train-vision-tower)
3. the text-only model: the same `tiny-llava` (the same seed), `--stage sft` for as many steps as the vision
   model's SFT took, on the same questions with the image removed from every record (so the language model
   answers from the question alone: what the questions' wording and the answers' frequencies give away); with
   --more-sft-steps, both models go on for that many steps more (a second run from the first's final model, a
   new schedule)
4. both answer the held-out questions greedily (the text-only model without the image); chance is 1 / the
   number of possible answers of each type (colour 6, shape 5, position 5, count 4, word 16)

    .venv/bin/python -P benchmarks/vlm_shapes.py [--train 12000 --sft-steps 8000 --sft-minutes 14 --threads 2]

The last line printed is one JSON object; "ratio" = the vision model's mean accuracy over the five types / the
text-only model's. A run directory under --out that has a final model is reused, not trained again (its
seconds then count 0 in "train_seconds").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from lmforge.data.formats import Record
from lmforge.data.shapes import COLOURS, POSITIONS, SHAPES, TYPES, WORDS, write_shapes
from lmforge.data.vlm import ImageChatDataset, image_conversation
from lmforge.model.llava import expand_image_tokens
from lmforge.settings import parse_args_or_raise
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train import vlm
from lmforge.vision.checkpoint import load_llava
from lmforge.vision.image import ImageProcessorConfig, normalise

CHOICES = {"colour": len(COLOURS), "shape": len(SHAPES), "position": len(POSITIONS), "count": 4, "word": len(WORDS)}


def run_stage(args: list[str], run_dir: Path) -> tuple[Path, float | None, float, int]:
    """(final model dir, last logged training loss, seconds, steps) of `lmforge vlm ARGS`; a finished run is
    reused (no loss, 0 seconds)."""
    args = [*args, "--train.run-dir", str(run_dir), "--train.progress", "false", "--train.eval-every", "0"]
    print(" ".join(["lmforge", "vlm", *args]), flush=True)
    if (run_dir / "final").exists():
        steps = json.loads((run_dir / "final.json").read_text()).get("step", 0) if (
            run_dir / "final.json").is_file() else 0
        return run_dir / "final", None, 0.0, steps
    started = time.perf_counter()
    result = vlm.run(parse_args_or_raise(vlm.VLMConfig, args))
    return result.model_dir, result.history[-1]["loss"], time.perf_counter() - started, result.steps


def without_images(source: Path, out: Path) -> Path:
    """The LLaVA records of `source` with the image taken out (no `image`, no `<image>` line)."""
    rows = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        record.pop("image")
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "")
        rows.append(json.dumps(record))
    out.write_text("\n".join(rows) + "\n")
    return out


@torch.no_grad()
def answers(model_dir: Path, test_file: Path, with_images: bool, max_new_tokens: int = 6) -> list[str]:
    """Greedy replies to the first user turn of each record of `test_file` (the prompts batched by length)."""
    model = load_llava(model_dir).eval()
    tokenizer = Tokenizer.from_dir(model_dir)
    cfg = model.config
    processor = ImageProcessorConfig(size=cfg.vision.image_size)
    dataset = ImageChatDataset(str(test_file), tokenizer, cfg.image_token_index, cfg.image_seq_length,
                               cfg.vision.image_size)
    images = [sample.images for sample in dataset]  # the resized images, in record order
    prompts = []
    for number, line in enumerate(test_file.read_text().splitlines(), 1):
        messages, _ = image_conversation(Record(json.loads(line), str(test_file), number))
        user = messages[:1] if with_images else [{**messages[0], "content": messages[0]["content"].replace(
            "<image>\n", "")}]
        ids, _ = tokenizer.encode_chat(user, add_generation_prompt=True)
        prompts.append(expand_image_tokens(ids, cfg))
    stops = {tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")}
    replies: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(index)
    for group in by_length.values():
        for start in range(0, len(group), 32):
            rows = group[start:start + 32]
            ids = torch.tensor([prompts[i] for i in rows])
            pixels = normalise([images[i][0] for i in rows], processor) if with_images else None
            done = torch.zeros(len(rows), dtype=torch.bool)
            for _ in range(max_new_tokens):
                token = model(ids, pixels).logits[:, -1].argmax(-1)
                for row, (i, t) in enumerate(zip(rows, token.tolist())):
                    if not done[row]:
                        if t in stops:
                            done[row] = True
                        else:
                            replies[i].append(t)
                if done.all():
                    break
                ids = torch.cat([ids, token[:, None]], dim=1)
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]


def contact_sheet(images: list[Path], out: Path, per_row: int = 5, scale: int = 2, gap: int = 4) -> Path:
    """The images in rows of `per_row`, each `scale` times its size, `gap` grey pixels between them."""
    tiles = [Image.open(path).convert("RGB") for path in images]
    side = tiles[0].width * scale
    rows = -(-len(tiles) // per_row)
    sheet = Image.new("RGB", (per_row * (side + gap) - gap, rows * (side + gap) - gap), (90, 90, 90))
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((side, side), Image.Resampling.NEAREST),
                    ((i % per_row) * (side + gap), (i // per_row) * (side + gap)))
    sheet.save(out)
    return out


def accuracy(replies: list[str], records: list[dict]) -> dict[str, float]:
    """Exact match (case and a final full stop ignored) per question type."""
    scores: dict[str, list[bool]] = {t: [] for t in TYPES}
    for reply, record in zip(replies, records):
        scores[record["type"]].append(reply.lower().rstrip(".") == record["answer"].lower())
    return {t: round(sum(s) / max(len(s), 1), 3) for t, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-vlm-shapes-every")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--one-question", action="store_true",
                        help="one question per training image (without: every question it can answer)")
    parser.add_argument("--align-steps", type=int, default=0,
                        help="LLaVA's projector alignment on the captions first (0: none, SFT from the fresh preset)")
    parser.add_argument("--sft-steps", type=int, default=600, help="the vision model's SFT steps (the most, with "
                                                                   "--sft-minutes)")
    parser.add_argument("--sft-minutes", type=float, default=None,
                        help="stop the vision model's SFT after this many minutes of training (its schedule fitted "
                             "to them); --sft-steps should then be larger than what they hold")
    parser.add_argument("--more-sft-steps", type=int, default=0,
                        help="then a second SFT run of both models from their first's final model (a new schedule)")
    parser.add_argument("--train-vision-tower", choices=("true", "false"), default="false",
                        help="SFT trains the vision tower too")
    parser.add_argument("--lr", default="1e-3", help="the SFT runs' peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=3, help="samples printed per question type")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    files = write_shapes(out / "shapes", args.train, args.test, every_question=not args.one_question)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        corpus = out / "corpus.txt"
        corpus.write_text("".join(files[name].read_text() for name in ("llava_train", "llava_captions")))
        train_tokenizer([str(corpus)], vocab_size=512, out_dir=out / "tokenizer", show_progress=False)
    common = ["--model", "tiny-llava", "--batch-size", str(args.batch_size), "--train.save-every", "0",
              "--train.precision", args.precision]

    start = ["--tokenizer", str(out / "tokenizer")]  # the preset, fresh
    align_loss, align_s = None, 0.0
    if args.align_steps:
        align, align_loss, align_s, _ = run_stage(
            [*common, *start, "--stage", "align", "--data", str(files["llava_captions"]), "--train.steps",
             str(args.align_steps), "--train.optim.lr", "1e-3"], out / "align")
        start = ["--model", str(align)]
    sft = ["--stage", "sft", "--train.optim.lr", args.lr, "--train.optim.warmup-steps", "30"]
    budget = ["--train.max-minutes", str(args.sft_minutes)] if args.sft_minutes else []
    vision, vision_loss, vision_s, vision_steps = run_stage(
        [*common, *sft, "--train.steps", str(args.sft_steps), *budget, "--data",
         str(files["llava_train"]), "--train-vision-tower", args.train_vision_tower, *start], out / "sft")
    text_data = without_images(files["llava_train"], out / "text_train.jsonl")
    text, text_loss, text_s, _ = run_stage(
        [*common, *sft, "--train.steps", str(vision_steps), "--tokenizer", str(out / "tokenizer"), "--data",
         str(text_data)], out / "text-only")

    if args.more_sft_steps:
        more = ["--stage", "sft", "--train.steps", str(args.more_sft_steps), "--train.optim.lr", args.lr,
                "--train.optim.warmup-steps", "0"]
        vision, vision_loss, more_s, _ = run_stage(
            [*common, *more, "--model", str(vision), "--data", str(files["llava_train"]), "--train-vision-tower",
             args.train_vision_tower], out / "sft-more")
        vision_s += more_s
        text, text_loss, more_s, _ = run_stage([*common, *more, "--model", str(text), "--data", str(text_data)],
                                               out / "text-only-more")
        text_s += more_s

    records = [json.loads(line) for line in files["llava_test"].read_text().splitlines()]
    started = time.perf_counter()
    vision_replies = answers(vision, files["llava_test"], with_images=True)
    text_replies = answers(text, files["llava_test"], with_images=False)
    eval_s = time.perf_counter() - started
    vision_acc, text_acc = accuracy(vision_replies, records), accuracy(text_replies, records)
    chance = {t: round(1 / CHOICES[t], 3) for t in TYPES}
    print(f"{'type':10s} {'vision':>7s} {'text':>7s} {'chance':>7s}")
    for t in TYPES:
        print(f"{t:10s} {vision_acc[t]:7.3f} {text_acc[t]:7.3f} {chance[t]:7.3f}")
    print(f"samples, the first {args.samples} of each type (image, question, answer, vision model's reply, "
          "text-only model's reply):")
    shown, sheet = {t: 0 for t in TYPES}, []
    for record, v, s in zip(records, vision_replies, text_replies):
        if shown[record["type"]] < args.samples:
            shown[record["type"]] += 1
            sheet.append(out / "shapes" / record["image"])
            question = record["conversations"][0]["value"].split("\n", 1)[1]
            print(f"  {len(sheet)}. {record['image']}  {question!r}  {record['answer']!r}  {v!r}  {s!r}")
    print(f"those images side by side, twice their size: {contact_sheet(sheet, out / 'samples.png')}")
    mean = lambda acc: sum(acc.values()) / len(acc)
    print(json.dumps({
        "vision_accuracy": vision_acc, "text_only_accuracy": text_acc, "chance": chance,
        "vision_mean": round(mean(vision_acc), 3), "text_only_mean": round(mean(text_acc), 3),
        "chance_mean": round(mean(chance), 3), "sft_steps": vision_steps,
        "train_seconds": {"align": round(align_s), "vision_sft": round(vision_s), "text_sft": round(text_s),
                          "vision_total": round(align_s + vision_s)},
        "final_train_loss": {"align": align_loss, "vision_sft": vision_loss, "text_sft": text_loss},
        "eval_seconds": round(eval_s), "ratio": round(mean(vision_acc) / max(mean(text_acc), 1e-9), 3)}))


if __name__ == "__main__":
    main()
