"""The built-in synthetic image data: deterministic, split without overlap, balanced over the question types,
drawn as described, and written in both chat formats."""

import base64
import json

import numpy as np

from lmforge.data.shapes import (
    ANSWERABLE,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    TYPES,
    WORDS,
    main,
    make_conversations,
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


def test_every_question_asks_all_an_image_answers_without_giving_answers_away():
    conversations = make_conversations(90, held_out=False, seed=3)
    assert [[s.question for s in c] for c in conversations] == [
        [s.question for s in c] for c in make_conversations(90, held_out=False, seed=3)]
    assert [c[0].scene.kind for c in conversations] == ["object", "count", "word"] * 30
    assert not any(c[0].scene.held_out for c in conversations)
    assert all(c[0].scene.held_out for c in make_conversations(9, held_out=True, seed=3))
    orders = set()
    for conversation in conversations:
        scene = conversation[0].scene
        assert sorted(s.type for s in conversation) == sorted(ANSWERABLE[scene.kind])
        orders.add(tuple(s.type for s in conversation))
        for i, sample in enumerate(conversation):
            assert sample.scene == scene and sample.answer in ANSWERS[sample.type]
            assert sample.question.endswith(" Answer with a single word.") and "  " not in sample.question
            for later in conversation[i + 1:]:  # no question names what a later one asks for
                if later.type in ("colour", "shape"):
                    assert later.answer not in sample.question.lower(), (sample, later)
    assert len(orders) > 6  # the turns come in every order


def test_every_question_files(tmp_path):
    plain = write_shapes(tmp_path / "a", train=6, test=5, image_size=32)
    paths = write_shapes(tmp_path / "b", train=6, test=5, image_size=32, every_question=True)
    for name in ("llava_test", "openai_test"):  # the held-out questions do not change
        assert paths[name].read_bytes() == plain[name].read_bytes()
    llava = [json.loads(line) for line in paths["llava_train"].read_text().splitlines()]
    openai = [json.loads(line) for line in paths["openai_train"].read_text().splitlines()]
    assert [len(r["types"]) for r in llava] == [3, 3, 1, 3, 3, 1]
    for record, chat in zip(llava, openai):
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(record["types"])
        assert [t["value"] for t in turns[1::2]] == record["answers"] == chat["answers"]
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        first, *rest = chat["messages"][0::2]
        assert first["content"][0]["image_url"]["url"] == record["image"]
        assert [m["content"] for m in rest] == [t["value"] for t in turns[2::2]]
    assert len(paths["llava_captions"].read_text().splitlines()) == 6
