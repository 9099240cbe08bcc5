"""The probe model's world: coloured shapes pasted on real frames and generated textures, and questions
about them whose answers are known by construction.

Everything is drawn from a seed (``numpy.random.Generator``), so a training set or a test set is the same
on every machine. The tasks were fixed before any model was trained (see the README's fidelity section):

==========  ==============================================  ==============================  ======
task        question                                        answers                         chance
==========  ==============================================  ==============================  ======
colour      What color is the {shape}?                      red green blue yellow           1/4
shape       What shape is the {colour} object?              circle square triangle          1/3
count       How many objects are there?                     0 1 2 3 4                       1/5
presence    Is there a {colour} {shape}?  (a small one)     yes no                          1/2
relation    Is the {c1} object left of / above the {c2}?    yes no                          1/2
scene       What is the background?                         photo stripes checks clouds     1/4
brightness  Is the picture dark or bright?                  dark bright                     1/2
==========  ==============================================  ==============================  ======

Objects never overlap (a gap of at least ``GAP`` pixels), so every count is visible and every answer is
determined: the best possible accuracy of every task is 1. Sizes are mixed: small objects are 14-20 px
on a 224 px image (one to one and a half 14 px patches), medium 24-36 px, large 40-56 px.

Backgrounds: ``photo`` is a random crop of a frame of real footage (the training set and the test set
use different clips: see :mod:`comfy_visionzip.probe.footage`); ``stripes``, ``checks`` and ``clouds`` are
generated with random colours, scales and angles (test textures come from another seed stream than
training textures). A dark picture is its background scaled to at most 35% of its brightness, a bright
one lifted to at least 55%; objects keep their colours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224  # the probe model sees 224 x 224 pixels (16 x 16 patches of 14 px)
GAP = 6  # pixels between any two objects' boxes
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 175, 65), "blue": (45, 85, 230), "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (14, 20), "medium": (24, 36), "large": (40, 56)}
KINDS = ("photo", "stripes", "checks", "clouds")
LIGHT = ("dark", "bright")
COUNTS = ("0", "1", "2", "3", "4")
TASKS = ("colour", "shape", "count", "presence", "relation", "scene", "brightness")
VIDEO_TASKS = ("when", "order")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS, "presence": ("yes", "no"),
    "relation": ("yes", "no"), "scene": KINDS, "brightness": LIGHT,
    "order": tuple(COLOURS),  # of the two colours the question names
}
CHANCE = {task: 1 / len(answers) for task, answers in ANSWERS.items()}
CHANCE["order"] = 1 / 2  # the question names the two candidates


@dataclass(frozen=True)
class Thing:
    """One object: its colour, shape, size class, side in pixels and top-left corner."""

    colour: str
    shape: str
    size: str
    side: int
    x: int
    y: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2


@dataclass
class Scene:
    kind: str  # background kind (KINDS)
    light: str  # dark / bright
    things: list[Thing] = field(default_factory=list)
    source: str = ""  # where the background came from ("bikes.mp4 frame 12", "clouds")


@dataclass(frozen=True)
class Question:
    task: str
    text: str
    answer: str


# ------------------------------------------------------------------------------------------- backgrounds


def _mix(rng: np.random.Generator) -> np.ndarray:
    """A random texture colour, pulled towards grey so that objects stay the most saturated things."""
    c = rng.uniform(0, 255, 3)
    return c * rng.uniform(0.3, 0.7) + 128 * (1 - rng.uniform(0.3, 0.7))


def texture(kind: str, rng: np.random.Generator, width: int = SIZE) -> np.ndarray:
    """A float (SIZE, width, 3) background of a generated kind in 0..255."""
    yy, xx = np.mgrid[0:SIZE, 0:width].astype(np.float32)
    a, b = _mix(rng), _mix(rng)
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(10, 40)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        t = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    elif kind == "checks":
        angle = rng.uniform(0, math.pi / 2)
        cell = rng.uniform(8, 36)
        u = xx * math.cos(angle) + yy * math.sin(angle)
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    elif kind == "clouds":
        t = np.zeros((SIZE, width), np.float32)
        for octave in range(3):
            n = int(rng.integers(3, 7)) * 2 ** octave
            grid = rng.uniform(0, 1, (n, n * width // SIZE)).astype(np.float32)
            up = np.asarray(Image.fromarray(grid).resize((width, SIZE), Image.Resampling.BICUBIC), np.float32)
            t += up / 2 ** octave
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        raise ValueError(f"not a generated background kind: {kind!r}")
    return a * t[..., None] + b * (1 - t[..., None])


def photo_crop(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square-ish crop of a uint8 (H, W, 3) frame, flipped at random, resized to SIZE."""
    h, w = frame.shape[:2]
    side = int(min(h, w) * rng.uniform(0.55, 1.0))
    aspect = rng.uniform(0.8, 1.25)
    ch, cw = min(h, int(side * aspect)), min(w, int(side / aspect))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = frame[y: y + ch, x: x + cw]
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float32)


def lit(background: np.ndarray, light: str, rng: np.random.Generator) -> np.ndarray:
    """Dark: scaled to 15-35% of its brightness; bright: lifted to 55-100%."""
    if light == "dark":
        return background * rng.uniform(0.15, 0.35)
    low = rng.uniform(0.55, 0.7)
    return 255 * low + background * (1 - low)


# ------------------------------------------------------------------------------------------- objects


def draw(image: np.ndarray, things: Sequence[Thing], rng: np.random.Generator) -> np.ndarray:
    """Paste the objects (drawn at 4x and downsampled: antialiased edges) on a float background."""
    out = image.copy()
    for t in things:
        s = 4 * t.side
        mask = Image.new("L", (s, s), 0)
        d = ImageDraw.Draw(mask)
        if t.shape == "circle":
            d.ellipse((0, 0, s - 1, s - 1), fill=255)
        elif t.shape == "square":
            d.rectangle((0, 0, s - 1, s - 1), fill=255)
        else:
            d.polygon([(s / 2, 0), (s - 1, s - 1), (0, s - 1)], fill=255)
        alpha = np.asarray(mask.resize((t.side, t.side), Image.Resampling.BOX), np.float32)[..., None] / 255
        colour = np.clip(np.array(COLOURS[t.colour], np.float32) + rng.uniform(-15, 15, 3), 0, 255)
        region = out[t.y: t.y + t.side, t.x: t.x + t.side]
        out[t.y: t.y + t.side, t.x: t.x + t.side] = region * (1 - alpha) + colour * alpha
    return out


def _free(things: Sequence[Thing], side: int, x: int, y: int) -> bool:
    return all(x + side + GAP <= t.x or t.x + t.side + GAP <= x or y + side + GAP <= t.y or t.y + t.side + GAP <= y
               for t in things)


def place(things: list[Thing], colour: str, shape: str, size: str, rng: np.random.Generator,
          where: tuple[int, int, int, int] | None = None) -> Thing | None:
    """Add an object at a random free place (inside ``where`` = x0, y0, x1, y1 for its centre when given);
    None when 200 tries find no room (the caller draws the scene again)."""
    low, high = SIZES[size]
    for _ in range(200):
        side = int(rng.integers(low, high + 1))
        x0, y0, x1, y1 = where or (0, 0, SIZE, SIZE)
        cx, cy = rng.uniform(max(x0, side / 2 + 1), min(x1, SIZE - side / 2 - 1)), \
            rng.uniform(max(y0, side / 2 + 1), min(y1, SIZE - side / 2 - 1))
        x, y = int(cx - side / 2), int(cy - side / 2)
        if 0 <= x and 0 <= y and x + side <= SIZE and y + side <= SIZE and _free(things, side, x, y):
            thing = Thing(colour, shape, size, side, x, y)
            things.append(thing)
            return thing
    return None


def _size(rng: np.random.Generator) -> str:
    return str(rng.choice(list(SIZES)))


# ------------------------------------------------------------------------------------------- worlds


class World:
    """Makes scenes and questions from one seed, on the given photo frames (uint8 arrays)."""

    def __init__(self, photos: Sequence[tuple[str, np.ndarray]], seed: int) -> None:
        if not photos:
            raise ValueError("no photo frames to draw backgrounds from")
        self.photos = list(photos)
        self.rng = np.random.default_rng(seed)

    def background(self, kind: str, light: str) -> tuple[np.ndarray, str]:
        rng = self.rng
        if kind == "photo":
            name, frame = self.photos[int(rng.integers(len(self.photos)))]
            base, source = photo_crop(frame, rng), name
        else:
            base, source = texture(kind, rng), kind
        return lit(base, light, rng), source

    def render(self, scene: Scene, base: np.ndarray) -> np.ndarray:
        return np.clip(draw(base, scene.things, self.rng) + 0.5, 0, 255).astype(np.uint8)

    def _scene(self, objects: Sequence[tuple[str, str, str]], kind: str | None = None,
               light: str | None = None) -> Scene | None:
        rng = self.rng
        scene = Scene(kind or str(rng.choice(KINDS)), light or str(rng.choice(LIGHT)))
        for colour, shape, size in objects:
            if place(scene.things, colour, shape, size, rng) is None:
                return None
        return scene

    def random_objects(self, n: int) -> list[tuple[str, str, str]]:
        rng = self.rng
        return [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), _size(rng)) for _ in range(n)]

    # -- test items: the answer is drawn first (balanced labels), the scene is made to fit it

    def item(self, task: str) -> tuple[Scene, Question]:
        """One scene made for one question of ``task``, its answer drawn uniformly from the task's answers."""
        while True:
            made = getattr(self, f"_item_{task}")()
            if made is not None:
                return made

    def _item_colour(self) -> tuple[Scene, Question] | None:
        rng = self.rng
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        others = [s for s in SHAPES if s != shape]
        objects = [(colour, shape, _size(rng))] + [(str(rng.choice(list(COLOURS))), str(rng.choice(others)),
                                                     _size(rng)) for _ in range(int(rng.integers(0, 3)))]
        scene = self._scene(objects)
        return None if scene is None else (scene, Question("colour", f"What color is the {shape}?", colour))

    def _item_shape(self) -> tuple[Scene, Question] | None:
        rng = self.rng
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        others = [c for c in COLOURS if c != colour]
        objects = [(colour, shape, _size(rng))] + [(str(rng.choice(others)), str(rng.choice(SHAPES)), _size(rng))
                                                   for _ in range(int(rng.integers(0, 3)))]
        scene = self._scene(objects)
        return None if scene is None else (scene, Question("shape", f"What shape is the {colour} object?", shape))

    def _item_count(self) -> tuple[Scene, Question] | None:
        n = int(self.rng.integers(0, 5))
        scene = self._scene(self.random_objects(n))
        return None if scene is None else (scene, Question("count", "How many objects are there?", str(n)))

    def _item_presence(self) -> tuple[Scene, Question] | None:
        rng = self.rng
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        yes = bool(rng.uniform() < 0.5)
        objects = [(colour, shape, "small")] if yes else []
        # distractors: never the asked pair; when the answer is no, one shares its colour or its shape
        near = [(c, s) for c in COLOURS for s in SHAPES if (c == colour) != (s == shape)]
        far = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)]
        if not yes:
            c, s = near[int(rng.integers(len(near)))]
            objects.append((c, s, "small"))
        for _ in range(int(rng.integers(0, 3))):
            c, s = far[int(rng.integers(len(far)))]
            objects.append((c, s, _size(rng)))
        rng.shuffle(objects)
        scene = self._scene(objects)
        text = f"Is there a {colour} {shape}?"
        return None if scene is None else (scene, Question("presence", text, "yes" if yes else "no"))

    def _item_relation(self) -> tuple[Scene, Question] | None:
        rng = self.rng
        c1, c2, c3 = (str(c) for c in rng.permutation(list(COLOURS))[:3])
        axis = str(rng.choice(["left of", "above"]))
        scene = Scene(str(rng.choice(KINDS)), str(rng.choice(LIGHT)))
        # the first object in the first half of the axis, the second in the second half: centres >= 28 px apart
        half = SIZE // 2
        first = (0, 0, half - 14, SIZE) if axis == "left of" else (0, 0, SIZE, half - 14)
        second = (half + 14, 0, SIZE, SIZE) if axis == "left of" else (0, half + 14, SIZE, SIZE)
        a = place(scene.things, c1, str(rng.choice(SHAPES)), _size(rng), rng, first)
        b = place(scene.things, c2, str(rng.choice(SHAPES)), _size(rng), rng, second)
        if a is None or b is None:
            return None
        if rng.uniform() < 0.5 and place(scene.things, c3, str(rng.choice(SHAPES)), _size(rng), rng) is None:
            return None
        yes = bool(rng.uniform() < 0.5)
        x, y = (c1, c2) if yes else (c2, c1)
        return scene, Question("relation", f"Is the {x} object {axis} the {y} object?", "yes" if yes else "no")

    def _item_scene(self) -> tuple[Scene, Question] | None:
        kind = str(self.rng.choice(KINDS))
        scene = self._scene(self.random_objects(int(self.rng.integers(0, 4))), kind=kind)
        return None if scene is None else (scene, Question("scene", "What is the background?", kind))

    def _item_brightness(self) -> tuple[Scene, Question] | None:
        light = str(self.rng.choice(LIGHT))
        scene = self._scene(self.random_objects(int(self.rng.integers(0, 4))), light=light)
        return None if scene is None else (scene, Question("brightness", "Is the picture dark or bright?", light))

    # -- training scenes: a random scene and every question it answers

    def training_scene(self) -> tuple[Scene, list[Question]]:
        """A random scene (0-4 objects) and the questions it determines (several per task)."""
        rng = self.rng
        while True:
            scene = self._scene(self.random_objects(int(rng.integers(0, 5))))
            if scene is not None:
                break
        return scene, questions_about(scene, rng)

    def make(self, scene: Scene) -> np.ndarray:
        base, scene.source = self.background(scene.kind, scene.light)
        return self.render(scene, base)


def questions_about(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """Every kind of question ``scene`` determines (relations only for pairs far enough apart)."""
    things = scene.things
    out = [Question("count", "How many objects are there?", str(len(things))),
           Question("scene", "What is the background?", scene.kind),
           Question("brightness", "Is the picture dark or bright?", scene.light)]
    for shape in SHAPES:
        same = [t for t in things if t.shape == shape]
        if len(same) == 1:
            out.append(Question("colour", f"What color is the {shape}?", same[0].colour))
    for colour in COLOURS:
        same = [t for t in things if t.colour == colour]
        if len(same) == 1:
            out.append(Question("shape", f"What shape is the {colour} object?", same[0].shape))
    present = {(t.colour, t.shape) for t in things}
    if things:
        t = things[int(rng.integers(len(things)))]
        out.append(Question("presence", f"Is there a {t.colour} {t.shape}?", "yes"))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    c, s = absent[int(rng.integers(len(absent)))]
    out.append(Question("presence", f"Is there a {c} {s}?", "no"))
    unique = [t for t in things if sum(u.colour == t.colour for u in things) == 1]
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            (ax, ay), (bx, by) = a.centre, b.centre
            for axis, d in (("left of", bx - ax), ("above", by - ay)):
                if abs(d) >= 28:
                    x, y = (a, b) if rng.uniform() < 0.5 else (b, a)
                    before = (d > 0) == (x is a)
                    out.append(Question("relation", f"Is the {x.colour} object {axis} the {y.colour} object?",
                                        "yes" if before else "no"))
    return out


def question_forms(seed: int = 31_337) -> tuple[str, ...]:
    """Questions of every form the probe knows, without answers (20 of them): what projector tuning asks the teacher
    about unlabeled pictures (the probe folder's prompts.txt)."""
    rng = np.random.default_rng(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    out = [f"What color is the {s}?" for s in shapes] + [f"What shape is the {c} object?" for c in colours]
    out += ["How many objects are there?", "What is the background?", "Is the picture dark or bright?"]
    pairs = [(c, s) for c in colours for s in shapes]
    out += [f"Is there a {c} {s}?" for c, s in (pairs[i] for i in rng.permutation(len(pairs))[:6])]
    for axis in ("left of", "above"):
        for _ in range(2):
            a, b = (str(x) for x in rng.permutation(colours)[:2])
            out.append(f"Is the {a} object {axis} the {b} object?")
    return tuple(out)


def when_question(colour: str, shape: str) -> str:
    return f"When does the {colour} {shape} appear?"


def order_question(first: str, second: str) -> str:
    return f"Which comes first, the {first} object or the {second} object?"


def vocabulary() -> list[str]:
    """Every word the questions and answers use (the probe tokenizer's vocabulary adds the template's)."""
    words = {"What", "color", "is", "the", "?", "shape", "object", "How", "many", "objects", "are", "there", "Is",
             "a", "left", "of", "above", "background", "picture", "dark", "or", "bright", "When", "does", "appear",
             "Which", "comes", "first", ","}
    for answers in ANSWERS.values():
        words.update(answers)
    words.update(COLOURS)
    words.update(SHAPES)
    return sorted(words)
