"""The built-in synthetic image data: deterministic, split without overlap, balanced over the question types,
drawn as described, and written in both chat formats."""

import base64
import json

import numpy as np

from lmforge.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    TYPES,
    WORDS,
    main,
    make_samples,
    render,
    write_shapes,
)
from lmforge.vision.image import read_image, read_image_url

ANSWERS = {"colour": set(COLOURS), "shape": set(SHAPES), "position": set(POSITIONS), "count": {"1", "2", "3", "4"},
           "word": set(WORDS)}


def test_samples_are_seeded_split_and_balanced():
    train, test = make_samples(200, held_out=False, seed=1), make_samples(50, held_out=True, seed=1)
    assert [s.question for s in train] == [s.question for s in make_samples(200, held_out=False, seed=1)]
    assert not any(s.scene.held_out for s in train) and all(s.scene.held_out for s in test)
    assert not {s.scene for s in train} & {s.scene for s in test}
    for samples in (train, test):
        assert [s.type for s in samples] == [TYPES[i % 5] for i in range(len(samples))]
        assert all(s.answer in ANSWERS[s.type] for s in samples)
    assert {s.answer for s in train if s.type == "count"} == ANSWERS["count"]


def foreground(image, scene):
    pixels = np.asarray(image, dtype=np.int32)
    return np.abs(pixels - np.array(BACKGROUNDS[scene.background])).sum(-1) > 60


def test_images_show_what_the_answers_say():
    for sample in make_samples(60, held_out=False, seed=2):
        scene, image = sample.scene, render(sample.scene, 64)
        assert image.size == (64, 64) and image.mode == "RGB"
        mask = foreground(image, scene)
        assert mask.sum() > 20, sample
        if scene.kind == "word":
            assert np.asarray(image)[mask].mean() < 110  # black letters
            continue
        median = np.median(np.asarray(image)[mask], axis=0)  # the edges are blended with the background
        nearest = min(COLOURS, key=lambda c: np.abs(median - np.array(COLOURS[c])).sum())
        assert nearest == scene.colour, sample  # the colour named
        if scene.kind == "object":
            ys, xs = np.nonzero(mask)
            x, y = POSITIONS[scene.position]
            assert abs(xs.mean() / 64 - x) < 0.1 and abs(ys.mean() / 64 - y) < 0.1, sample  # the place named
        else:  # each shape's centre is covered, and the shapes are apart
            for x, y in scene.centers:
                assert mask[int(y * 64), int(x * 64)], sample


def test_files_in_both_formats(tmp_path):
    paths = write_shapes(tmp_path / "a", train=12, test=6, image_size=48, seed=0, inline=True)
    again = write_shapes(tmp_path / "b", train=12, test=6, image_size=48, seed=0, inline=True)
    for name, path in paths.items():
        assert path.read_bytes() == again[name].read_bytes(), name  # deterministic, PNG bytes included
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert [len(rows[n]) for n in ("llava_train", "llava_test", "llava_captions", "openai_captions")] == [12, 6, 12, 12]
    for llava, openai in zip(rows["llava_train"] + rows["llava_test"], rows["openai_train"] + rows["openai_test"]):
        human, gpt = llava["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert gpt["value"] == llava["answer"] == openai["answer"] and llava["type"] in TYPES
        user, assistant = openai["messages"]
        image_part, text_part = user["content"]
        assert text_part == {"type": "text", "text": human["value"].removeprefix("<image>\n")}
        assert assistant == {"role": "assistant", "content": gpt["value"]}
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == (tmp_path / "a" / llava["image"]).read_bytes()
        assert read_image_url(url).tobytes() == read_image_url(llava["image"], tmp_path / "a").tobytes()
    assert rows["llava_captions"][0]["conversations"][1]["value"].endswith(".")


def test_command(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--train", "5", "--test", "5"]) == 0
    assert "openai_test" in capsys.readouterr().out
    first = json.loads((tmp_path / "openai_train.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"][0]["image_url"]["url"] == "images/train/00000.png"
    assert read_image(tmp_path / "images" / "train" / "00000.png").size == (64, 64)
