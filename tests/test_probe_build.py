"""The probe model's world and its training code, without the real weights: scenes are deterministic and their
answers true, training prompts are the pack's own, packing several questions on one image changes no logit, and
a tiny build goes end to end into a checkpoint the real loader and `ask` accept."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from comfy_visionzip import Chat, GenerationConfig, load_vlm
from comfy_visionzip.__main__ import main
from comfy_visionzip.adapter import read_adapter
from comfy_visionzip.probe import fidelity, scenes, train
from comfy_visionzip.testing.tiny import CHAT_TEMPLATE, save_checkpoint


def _photos(n: int = 6, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"noise {i}", rng.integers(0, 255, (90 + 10 * i, 160, 3), dtype=np.uint8)) for i in range(n)]


def test_scenes_are_the_same_from_the_same_seed_and_differ_from_another():
    a, b, c = (scenes.World(_photos(), s) for s in (3, 3, 4))
    for task in scenes.TASKS:
        (sa, qa), (sb, qb) = a.item(task), b.item(task)
        assert qa == qb and sa.things == sb.things
        assert np.array_equal(a.make(sa), b.make(sb))
    assert [c.item(t)[1] for t in scenes.TASKS] != [a.item(t)[1] for t in scenes.TASKS]


def test_test_items_have_balanced_answers_and_true_labels():
    world = scenes.World(_photos(), 0)
    for task in scenes.TASKS:
        answers = []
        for _ in range(300):
            scene, q = world.item(task)
            answers.append(q.answer)
            things = scene.things
            for i, s in enumerate(things):  # never overlapping: every object is visible and countable
                for t in things[i + 1:]:
                    assert (s.x + s.side + scenes.GAP <= t.x or t.x + t.side + scenes.GAP <= s.x
                            or s.y + s.side + scenes.GAP <= t.y or t.y + t.side + scenes.GAP <= s.y)
            if task == "count":
                assert q.answer == str(len(things))
            if task == "colour":
                shape = q.text.split()[-1].rstrip("?")
                assert [t.colour for t in things if t.shape == shape] == [q.answer]
            if task == "shape":
                colour = q.text.split()[4]
                assert [t.shape for t in things if t.colour == colour] == [q.answer]
            if task == "presence":
                colour, shape = q.text.rstrip("?").split()[-2:]
                found = [t for t in things if (t.colour, t.shape) == (colour, shape)]
                assert (q.answer == "yes") == bool(found) and all(t.size == "small" for t in found)
            if task == "relation":
                words = q.text.rstrip("?").split()
                x = next(t for t in things if t.colour == words[2])
                y = next(t for t in things if t.colour == words[-2])
                axis = 0 if "left" in words else 1
                assert (q.answer == "yes") == (x.centre[axis] < y.centre[axis])
                assert abs(x.centre[axis] - y.centre[axis]) >= 28
        counts = {a: answers.count(a) for a in scenes.ANSWERS[task]}
        assert set(answers) == set(scenes.ANSWERS[task]), task
        expected = len(answers) / len(counts)
        assert all(abs(n - expected) < 0.35 * expected for n in counts.values()), (task, counts)


def test_training_questions_are_true_for_their_scene():
    world = scenes.World(_photos(), 1)
    for _ in range(100):
        scene, questions = world.training_scene()
        by_text = {q.text: q.answer for q in questions}
        assert by_text["How many objects are there?"] == str(len(scene.things))
        assert by_text["What is the background?"] == scene.kind
        for q in questions:
            if q.task == "relation":
                words = q.text.rstrip("?").split()
                x = next(t for t in scene.things if t.colour == words[2])
                y = next(t for t in scene.things if t.colour == words[-2])
                axis = 0 if "left" in words else 1
                assert (q.answer == "yes") == (x.centre[axis] < y.centre[axis])
            if q.task == "presence":
                colour, shape = q.text.rstrip("?").split()[-2:]
                assert (q.answer == "yes") == any((t.colour, t.shape) == (colour, shape) for t in scene.things)


def test_every_question_and_answer_is_in_the_probe_vocabulary():
    tok = train.make_probe_tokenizer()
    world = scenes.World(_photos(), 2)
    for task in scenes.TASKS:
        for _ in range(20):
            _scene, q = world.item(task)
            ids = tok(q.text + " " + q.answer, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, q


def test_lattice_cells_cut_the_grid_into_the_asked_number_of_near_square_cells():
    for cells in (4, 8, 13):
        lattice = fidelity.lattice_cells(16, 16, cells)
        assert sorted(set(lattice.tolist())) == list(range(cells))
        sizes = torch.bincount(lattice)
        assert sizes.min() >= 0.4 * sizes.max()


def test_parse_takes_the_first_word():
    assert fidelity.parse(" Red.") == "red"
    assert fidelity.parse("3 objects") == "3"
    assert fidelity.parse("") == ""


@pytest.fixture(scope="module")
def tiny_tower(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tower")
    torch.manual_seed(0)
    config = tf.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=224)
    tf.Dinov2Model(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(train.PREPROCESSOR))
    return str(folder)


TINY = train.Settings(train_images=48, val_per_task=2, epochs=1, batch=8, hidden=32, layers=2, heads=2,
                      intermediate=64)


def test_packed_questions_give_the_logits_of_separate_prompts(tiny_tower, tmp_path):
    tok = train.make_probe_tokenizer()
    model = train.make_model(tiny_tower, tok, TINY)
    save_checkpoint(tmp_path / "m", model, tok, train.PREPROCESSOR, chat_template=CHAT_TEMPLATE)
    vlm = load_vlm(tmp_path / "m", dtype="float32")
    encoder = vlm.video_encoder()
    world = scenes.World(_photos(), 0)
    scene, questions = world.training_scene()
    image = world.make(scene)
    video = train.one_image_video(vlm, encoder, image)
    prompts = train.Prompts(Chat(vlm, video))
    features = train.encode_images(encoder, [image])
    assert torch.allclose(features.float(), video.tokens.float(), atol=2e-3)
    still = (0.0, 5.0, 10.0)
    items = [prompts.item((0,), (0.0,), questions[:4]), prompts.item((0, 0, 0), still, questions[1:3])]
    batch = train.pack(prompts, items)
    model = vlm.model
    with torch.no_grad():
        packed = train.forward_packed(model, video.tokens.float(), batch)
        for k, q in enumerate(questions[:4]):
            chat = Chat(vlm, video)
            ids = chat._ids([{"role": "user", "text": q.text}])
            assert ids == prompts.prefix + list(prompts.suffix(q.text))  # training prompts are the pack's own
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            embeds[0, prompts.image_positions] = chat.visual
            alone = model(inputs_embeds=embeds).logits[0, -1]
            assert torch.allclose(packed[2 * k], alone, atol=1e-4)
        # three frames of a still video at 0, 5 and 10 s: the frames' labels and placeholders as Chat renders them
        prefix, visual = prompts.prefix_for(still)
        assert len(visual) == 3 * 256 and len(prefix) > 3 * 256 + 3 * 5
        for k, q in enumerate(questions[1:3]):
            ids = prefix + list(prompts.suffix(q.text))
            assert ids == prompts.ids(still, q.text)
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            embeds[0, visual] = train._part(model, "multi_modal_projector")(video.tokens.float()).repeat(3, 1, 1) \
                .flatten(0, 1)
            alone = model(inputs_embeds=embeds).logits[0, -1]
            assert torch.allclose(packed[8 + 2 * k], alone, atol=1e-4)
    # the loss sees only the answers and their ends of turn
    assert batch["target"].tolist() == [t for item in items for _task, _s, a in item.questions
                                        for t in (a, prompts.eos)]


def test_a_tiny_build_is_a_checkpoint_the_loader_and_ask_accept(tiny_tower, tmp_path, clip_factory, capsys):
    folder = train.build_probe(cache=tmp_path, settings=TINY, tower=tiny_tower, photos=_photos())
    assert folder == str(train.probe_folder(tmp_path)) and train.find_probe(tmp_path) == folder
    record = json.loads((tmp_path / train.FOLDER / "PROBE.json").read_text())
    assert record["format"] == train.FORMAT and record["settings"]["train_images"] == 48
    # one folder for the whole supported range: transformers 4.x cannot name 5.x's "TokenizersBackend"
    assert json.loads((tmp_path / train.FOLDER / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert set(record["validation"]["per_task"]) == set(scenes.TASKS) | set(scenes.VIDEO_TASKS)
    assert not [p for p in tmp_path.glob(".visionzip-probe-*") if p.is_dir()]  # no staging folder left behind
    assert len(list(tmp_path.glob(".visionzip-probe-*-features-*.safetensors"))) == 1  # the tower's features, kept
    vlm = load_vlm(folder, dtype="float32")
    assert vlm.family.model_type == "llava" and vlm.video_encoder().tokens_per_image == 257
    world = scenes.World(_photos(), 9)
    scene, q = world.item("colour")
    video = train.one_image_video(vlm, vlm.video_encoder(), world.make(scene))
    text = Chat(vlm, video).ask(q.text, GenerationConfig(max_new_tokens=2))
    assert isinstance(text, str)
    # built again: reused, not retrained; trained again with other training settings: the features are reused
    assert train.build_probe(cache=tmp_path, settings=TINY, tower=tiny_tower, photos=_photos()) == folder
    said = []
    other = dataclasses.replace(TINY, lr=1e-3)
    train.build_probe(cache=tmp_path, settings=other, tower=tiny_tower, photos=_photos(), force=True, say=said.append)
    assert any("reused from" in line for line in said) and not any("encoding" in line for line in said)
    clip = clip_factory("probe.mp4", frames=4)
    assert main(["ask", clip, "What is the background?", "--model", folder, "--max-new-tokens", "2",
                 "--frames", "2"]) == 0
    assert "visual tokens in the prompt" in capsys.readouterr().out
    # the folder carries the probe's question forms, and tune-projector asks the teacher those by default
    prompts = (Path(folder) / "prompts.txt").read_text().splitlines()
    assert prompts == list(scenes.question_forms()) and len(prompts) == 20
    assert "How many objects are there?" in prompts and all(p.endswith("?") for p in prompts)
    (Path(folder) / "prompts.txt").unlink()
    assert train.build_probe(cache=tmp_path, settings=other, tower=tiny_tower, photos=_photos()) == folder
    assert (Path(folder) / "prompts.txt").read_text().splitlines() == prompts  # an older build gets it on reuse
    out = tmp_path / "probe-adapter.safetensors"
    assert main(["tune-projector", folder, clip, "--tokens-per-frame", "8", "--steps", "1", "--frames-per-video",
                 "1", "--answer-tokens", "2", "--out", str(out)]) == 0
    assert "prompts: the 20 in the model's prompts.txt" in capsys.readouterr().out
    assert read_adapter(out).data["prompts"] == prompts


def test_slideshow_video_questions_are_true_for_their_frames():
    world = scenes.World(_photos(), 5)
    made = [world.training_scene()[0] for _ in range(300)]
    shows = train.Slideshows(made)
    tok = train.make_probe_tokenizer()

    class FakePrompts:  # the answer ids are the words themselves here
        def item(self, frames, times, questions):
            return train.Item(frames, times, tuple((q.task, (), q) for q in questions))

    rng = np.random.default_rng(0)
    seen = {"when": 0, "order": 0}
    for _ in range(200):
        count = int(rng.integers(4, 11))
        item = shows.item(FakePrompts(), count, rng)
        assert len(item.frames) == len(item.times) == count
        assert list(item.times) == sorted(item.times) and len(set(item.times)) == count
        things = [made[f].things for f in item.frames]
        assert all(len(ts) <= 1 for ts in things)  # empty frames, and events of one object each
        shown = [(ts[0].colour, ts[0].shape) if ts else None for ts in things]
        events = [c for c in dict.fromkeys(shown) if c is not None]
        assert 1 <= len(events) <= 3
        for combo in events:  # each event is one run of the same picture, apart from the other
            run = [k for k, c in enumerate(shown) if c == combo]
            assert run == list(range(run[0], run[-1] + 1)) and len({item.frames[k] for k in run}) == 1
            assert 1 <= len(run) <= 3
            assert run[0] == 0 or shown[run[0] - 1] is None
        assert len({c for c, _s in events}) == len({s for _c, s in events}) == len(events)
        for task, _suffix, q in item.questions:
            seen[task] += 1
            assert tok.unk_token_id not in tok(q.answer)["input_ids"]
            if task == "when":
                colour, shape = q.text.split()[3:5]
                assert q.answer == str(int(item.times[shown.index((colour, shape))]))
            else:
                words = q.text.replace(",", "").rstrip("?").split()
                c1, c2 = words[4], words[8]
                first = {c[0]: k for k, c in reversed(list(enumerate(shown))) if c is not None}
                assert {c1, c2} <= set(first) and c1 != c2 and q.answer == min((c1, c2), key=first.get)
        asked = [t for t, _s, _q in item.questions]
        assert asked.count("when") == len(events) and asked.count("order") == len(events) * (len(events) - 1) // 2
    assert seen["when"] > 300 and seen["order"] > 200


def test_patch_words_name_the_patches_an_object_covers():
    thing = scenes.Thing("red", "square", "medium", 28, 14, 28)  # exactly patches (2..3, 1..2)
    words = train.patch_words(scenes.Scene("clouds", "dark", [thing]), {"red": 7}, {"square": 9})
    colour, shape = words.view(2, 16, 16)
    assert (colour == 7).nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]
    assert (shape[colour == 7] == 9).all() and (shape[colour != 7] == -100).all()
    small = scenes.Thing("blue", "circle", "small", 14, 20, 20)  # covers parts of four patches, none by half
    named = train.patch_words(scenes.Scene("clouds", "dark", [small]), {"blue": 1}, {"circle": 2}).view(2, 16, 16)
    assert (named[0] == 1).nonzero().tolist() == [[1, 1]] and named[1, 1, 1] == 2  # its centre's patch


def test_the_video_oracle_shows_both_events_in_eight_frames():
    items = fidelity.video_items(200, 4, seed=3)
    for item in items:
        picked = fidelity.frames_showing(item, 8)
        assert picked == sorted(set(picked)) and len(picked) == 8
        assert all(0 <= t < fidelity.VIDEO_SECONDS for t in picked)
        for event in item.events:
            assert any(event.covers(t) for t in picked)
        plain = fidelity.full_frames(8)
        assert len(set(picked) - set(plain)) <= 2  # only the frames nearest the events moved
