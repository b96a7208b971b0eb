"""Built-in synthetic image data: shapes, colours, counts, positions and printed words, with captions and
questions whose answers are known, for training and testing a small vision-language model from scratch.

    lmforge shapes --out runs/shapes [--train 5000 --test 500 --image-size 64 --seed 0 --inline]
                   [--every-question]

Each image is drawn with Pillow from a `Scene` (a seeded random draw; nothing is downloaded; words use
Pillow's built-in font) and asked one question of one of five types, in turn:
    colour      "What colour is the triangle?"          red | green | blue | yellow | purple | orange
    shape       "What shape is in the image?"           circle | square | triangle | diamond | star
    position    "Where is the red triangle?"            left | right | top | bottom | center
    count       "How many squares are there?"           1 | 2 | 3 | 4  (same shape and colour, on a 3x3 grid)
    word        "What word is written in the image?"    one of WORDS, printed in black
Answers are a single word (LLaVA-1.5's short-answer style), so a reply is scored by exact match; each
record also carries its `type` and `answer`. Every image has a caption too ("A red triangle on the left."),
for the first stage of LLaVA's recipe, aligning the projector on image-caption pairs.

With --every-question, each training image is asked every question it can answer, in one conversation (a
turn each, in a random order: an object's colour, shape and position; a group's count, colour and shape; a
word), the three kinds of image in turn, with `types` and `answers` lists: several answers per drawing, for
a model learning from scratch. A question never names what a later turn asks for ("Where is the shape?",
not "Where is the red triangle?", before the colour and shape turns), so no answer is given away in the
text. The held-out images stay one question each, as without the flag.

The split is by the scene itself, as data/arithmetic.py splits problems: a scene is held out when the hash of
its full description (kind, shape, colour, places, sizes, offsets, word) says so, one in HELD_OUT_EVERY, so
no held-out image is ever drawn for training, whatever the seed or the counts. Held-out scenes share their
kinds of content with training (a held-out image is a new drawing, not a new colour or word).

Written to --out, image paths relative to it:
    images/train/00000.png ...  images/test/00000.png ...
    llava_train.jsonl, llava_test.jsonl, llava_captions.jsonl     LLaVA's format: {"id", "image",
        "conversations": [{"from": "human", "value": "<image>\\nQUESTION"}, {"from": "gpt", "value": ANSWER}]}
    openai_train.jsonl, openai_test.jsonl, openai_captions.jsonl  OpenAI's chat format, the image a content
        part {"type": "image_url", "image_url": {"url": PATH}} (with --inline a data:image/png;base64 URL)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lmforge.files import write_jsonl_files
from lmforge.settings import parse_args

HELD_OUT_EVERY = 10
TYPES = ("colour", "shape", "position", "count", "word")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20),
           "purple": (140, 60, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
POSITIONS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
             "center": (0.5, 0.5)}
WORDS = ("cat", "dog", "sun", "box", "cup", "hat", "pen", "car", "bus", "map", "egg", "key", "owl", "pig", "fox",
         "bed")
BACKGROUNDS = ((255, 255, 255), (244, 244, 244), (250, 247, 238), (238, 244, 250))
NUMBERS = ("one", "two", "three", "four")
SUPERSAMPLE = 4  # drawn 4x larger, then shrunk: smooth edges at any size

QUESTIONS = {
    "colour": ("What colour is the {shape}?", "What is the colour of the shape?", "Which colour is the {shape} in "
               "the picture?"),
    "shape": ("What shape is in the image?", "What shape is the {colour} object?", "Name the shape in the picture."),
    "position": ("Where is the {colour} {shape}?", "Where in the image is the {shape}?",
                 "Is the {shape} on the left, right, top, bottom or in the center?"),
    "count": ("How many {shape}s are there?", "How many {colour} {shape}s are in the image?", "Count the {shape}s."),
    "word": ("What word is written in the image?", "What does the text say?", "Read the word in the picture."),
}
SHORT_ANSWER = "Answer with a single word."
CAPTION_REQUESTS = ("Describe the image briefly.", "Give a short caption of the image.", "What is in the picture?")


@dataclass(frozen=True)
class Scene:
    """What one image shows. Places are fractions of the image side, so a scene draws at any size."""
    kind: str  # "object" (one shape), "count" (1-4 alike), "word"
    background: int  # index into BACKGROUNDS
    shape: str = ""
    colour: str = ""
    position: str = ""  # an object's place, one of POSITIONS
    centers: tuple[tuple[float, float], ...] = ()  # where each shape is drawn
    radius: float = 0.0
    word: str = ""

    @property
    def held_out(self) -> bool:
        spec = json.dumps(asdict(self), sort_keys=True)
        return int.from_bytes(hashlib.sha256(spec.encode()).digest()[:8], "big") % HELD_OUT_EVERY == 0

    def caption(self) -> str:
        if self.kind == "word":
            return f'The word "{self.word}" written in black.'
        if self.kind == "count":
            n = len(self.centers)
            return f"{NUMBERS[n - 1].capitalize()} {self.colour} {self.shape}{'s' if n > 1 else ''}."
        place = "in the center" if self.position == "center" else f"at the {self.position}" if self.position in (
            "top", "bottom") else f"on the {self.position}"
        return f"A {self.colour} {self.shape} {place}."


def _jitter(rng: random.Random, amount: float) -> float:
    return round(rng.uniform(-amount, amount), 3)


def make_scene(rng: random.Random, question_type: str) -> Scene:
    """A random scene that can answer a question of `question_type`."""
    background = rng.randrange(len(BACKGROUNDS))
    if question_type == "word":
        center = (round(0.5 + _jitter(rng, 0.08), 3), round(0.5 + _jitter(rng, 0.12), 3))
        return Scene("word", background, centers=(center,), word=rng.choice(WORDS))
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    if question_type == "count":
        cells = rng.sample(range(9), rng.randint(1, 4))  # a 3x3 grid: shapes never overlap
        centers = tuple((round((1 + 2 * (c % 3)) / 6 + _jitter(rng, 0.03), 3),
                         round((1 + 2 * (c // 3)) / 6 + _jitter(rng, 0.03), 3)) for c in sorted(cells))
        return Scene("count", background, shape, colour, centers=centers, radius=round(rng.uniform(0.09, 0.12), 3))
    position = rng.choice(list(POSITIONS))
    x, y = POSITIONS[position]
    center = (round(x + _jitter(rng, 0.04), 3), round(y + _jitter(rng, 0.04), 3))
    return Scene("object", background, shape, colour, position, (center,), round(rng.uniform(0.12, 0.17), 3))


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A polygon's corners (every shape but the circle)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    # A five-pointed star: outer and inner corners alternate, the first pointing up.
    return [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
             cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as a size x size RGB image (deterministic for a given Pillow)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    if scene.kind == "word":
        font = ImageFont.load_default(size=round(big * 0.3))
        (x, y), = scene.centers
        draw.text((x * big, y * big), scene.word, fill=(0, 0, 0), font=font, anchor="mm")
    else:
        r = scene.radius * big
        for x, y in scene.centers:
            if scene.shape == "circle":
                draw.ellipse((x * big - r, y * big - r, x * big + r, y * big + r), fill=COLOURS[scene.colour])
            else:
                draw.polygon(_outline(scene.shape, x * big, y * big, r), fill=COLOURS[scene.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


@dataclass
class Sample:
    scene: Scene
    type: str
    question: str
    answer: str


def answer(scene: Scene, question_type: str) -> str:
    """The one-word answer to a question of `question_type` about `scene`."""
    return {"colour": scene.colour, "shape": scene.shape, "position": scene.position,
            "count": str(len(scene.centers)), "word": scene.word}[question_type]


def ask(scene: Scene, question_type: str, rng: random.Random) -> Sample:
    """One question of `question_type` about `scene`, with its one-word answer."""
    question = rng.choice(QUESTIONS[question_type]).format(shape=scene.shape, colour=scene.colour)
    return Sample(scene, question_type, f"{question} {SHORT_ANSWER}", answer(scene, question_type))


# What each kind of image can answer (a group of alike shapes: its count, and their colour and shape).
ANSWERABLE = {"object": ("colour", "shape", "position"), "count": ("count", "colour", "shape"), "word": ("word",)}


def ask_every_question(scene: Scene, rng: random.Random) -> list[Sample]:
    """Every question `scene` can answer, in a random order, each worded without the attributes a later
    question asks for (the shape named "shape", the colour left out), so no question gives away an answer."""
    types = list(ANSWERABLE[scene.kind])
    rng.shuffle(types)
    samples = []
    for i, question_type in enumerate(types):
        later = set(types[i + 1:])
        template = rng.choice(QUESTIONS[question_type])
        question = " ".join(template.format(shape="shape" if "shape" in later else scene.shape,
                                            colour="" if "colour" in later else scene.colour).split())
        samples.append(Sample(scene, question_type, f"{question} {SHORT_ANSWER}", answer(scene, question_type)))
    return samples


def make_conversations(count: int, held_out: bool, seed: int = 0) -> list[list[Sample]]:
    """`count` images of one split, the kinds (object, count, word) in turn, each with every question it can
    answer (ask_every_question), in a seeded order."""
    rng = random.Random(f"{seed}-shapes-every-question-{'test' if held_out else 'train'}")
    kinds = ("position", "count", "word")  # a question type that draws each kind of scene
    conversations = []
    while len(conversations) < count:
        scene = make_scene(rng, kinds[len(conversations) % len(kinds)])
        if scene.held_out == held_out:
            conversations.append(ask_every_question(scene, rng))
    return conversations


def make_samples(count: int, held_out: bool, seed: int = 0) -> list[Sample]:
    """`count` samples of one split, the question types in turn (so each is a fifth), in a seeded order."""
    rng = random.Random(f"{seed}-shapes-{'test' if held_out else 'train'}")
    samples = []
    while len(samples) < count:
        question_type = TYPES[len(samples) % len(TYPES)]
        scene = make_scene(rng, question_type)
        if scene.held_out == held_out:
            samples.append(ask(scene, question_type, rng))
    return samples


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def records(record_id: str, image: str, url: str, exchanges: list[tuple[str, str]], extra: dict
            ) -> tuple[dict, dict]:
    """A conversation about one image, (question, answer) turns with the image in the first question, as a
    LLaVA record and an OpenAI chat record."""
    conversations, messages = [], []
    for i, (question, answer) in enumerate(exchanges):
        conversations += [{"from": "human", "value": f"<image>\n{question}" if i == 0 else question},
                          {"from": "gpt", "value": answer}]
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        messages += [{"role": "user", "content": content if i == 0 else question},
                     {"role": "assistant", "content": answer}]
    return ({"id": record_id, "image": image, "conversations": conversations, **extra},
            {"id": record_id, "messages": messages, **extra})


def write_shapes(out: str | Path, train: int = 5000, test: int = 500, image_size: int = 64, seed: int = 0,
                 inline: bool = False, every_question: bool = False) -> dict[str, Path]:
    """Write the images and JSONL files (see the module docstring) to `out`; returns the files by name."""
    out = Path(out)
    rows: dict[str, list[dict]] = {name: [] for name in (
        "llava_train", "llava_test", "llava_captions", "openai_train", "openai_test", "openai_captions")}
    caption_rng = random.Random(f"{seed}-captions")
    train_split = make_conversations(train, False, seed) if every_question else [
        [s] for s in make_samples(train, False, seed)]
    for split, conversations in (("train", train_split), ("test", [[s] for s in make_samples(test, True, seed)])):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, samples in enumerate(conversations):
            scene = samples[0].scene
            png = _png(render(scene, image_size))
            path = f"images/{split}/{i:05d}.png"
            (out / path).write_bytes(png)
            url = f"data:image/png;base64,{base64.b64encode(png).decode()}" if inline else path
            extra = ({"types": [s.type for s in samples], "answers": [s.answer for s in samples]}
                     if split == "train" and every_question else {"type": samples[0].type, "answer": samples[0].answer})
            llava, openai = records(f"{split}-{i:05d}", path, url, [(s.question, s.answer) for s in samples], extra)
            rows[f"llava_{split}"].append(llava)
            rows[f"openai_{split}"].append(openai)
            if split == "train":
                llava, openai = records(f"caption-{i:05d}", path, url,
                                        [(caption_rng.choice(CAPTION_REQUESTS), scene.caption())], {})
                rows["llava_captions"].append(llava)
                rows["openai_captions"].append(openai)
    return write_jsonl_files(out, rows)


@dataclass
class ShapesConfig:
    out: str = field(default="runs/shapes", metadata={"help": "directory for the images and JSONL files"})
    train: int = field(default=5000, metadata={"help": "training images (each with a question and a caption)",
                                               "min": 0})
    test: int = field(default=500, metadata={"help": "held-out images (never drawn for training)", "min": 0})
    image_size: int = field(default=64, metadata={"help": "side of the square images, in pixels", "min": 16,
                                                  "max": 1024})
    seed: int = field(default=0, metadata={"help": "the generator's seed"})
    inline: bool = field(default=False, metadata={
        "help": "OpenAI files carry each image as a data:image/png;base64 URL rather than its path"})
    every_question: bool = field(default=False, metadata={
        "help": "each training image asked every question it can answer, in one conversation (the held-out "
                "images: one question each still)"})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(ShapesConfig, argv, prog="lmforge shapes",
                     description="Write the built-in synthetic image data (shapes, colours, counts, positions, "
                                 "words) with questions and captions, as LLaVA and OpenAI chat JSONL.")
    paths = write_shapes(cfg.out, cfg.train, cfg.test, cfg.image_size, cfg.seed, cfg.inline,
                         cfg.every_question)
    for name, path in paths.items():
        print(f"{name:16s} {len(path.read_text(encoding='utf-8').splitlines()):6d} records -> {path}")
    return 0
