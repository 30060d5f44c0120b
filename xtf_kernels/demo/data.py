"""Seeded generator of grade-school math word problems with injected token-level noise.

Every example is a ``prompt`` ("Question: ...\\nAnswer:") and a ``response`` (a space, then
step-by-step sentences ending in "The answer is N."). Fine-tuning examples carry noise whose
exact character spans in the response are recorded as :class:`NoiseSpan`:

* ``filler``: an off-topic conversational sentence inserted between two steps, drawn from the
  same distribution as the pretraining text's conversational domain;
* ``boilerplate``: a stock phrase the base model already knows (it is in the pretraining text);
* ``corrupt``: the result of an intermediate equation replaced by a wrong number (the
  following steps keep the correct value, so only that number is wrong).

Everything is a pure function of the seed (``random.Random(seed)``), so two calls with the same
arguments return identical records.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "NOISE_KINDS",
    "TARGETED_KINDS",
    "noise_shares",
    "FILLER_PHRASES",
    "CHAT_TEMPLATES",
    "CHAT_SLOTS",
    "chat_sentence",
    "chat_words",
    "BOILERPLATE_PHRASES",
    "NoiseSpan",
    "MathExample",
    "NoiseConfig",
    "make_problem",
    "inject_noise",
    "generate_split",
    "DemoData",
    "chat_documents",
    "make_demo_data",
    "write_jsonl",
    "read_jsonl",
]

NOISE_KINDS: tuple[str, ...] = ("filler", "boilerplate", "corrupt")
#: The kinds XTF is designed to catch (KN: boilerplate; TR and RI: filler). Corrupted
#: intermediate results stay in the data and are reported apart.
TARGETED_KINDS: tuple[str, ...] = ("filler", "boilerplate")


def noise_shares(keep, noise) -> dict[str, float]:
    """Shares of the kept tokens that are injected noise: ``all``, each kind of
    :data:`NOISE_KINDS`, and ``targeted`` (:data:`TARGETED_KINDS`).

    Args:
        keep: bool ``[N]`` (NumPy or torch), the kept tokens.
        noise: int ``[N]``, 0 for clean tokens, else the kind's index in :data:`NOISE_KINDS` + 1.
    """
    import numpy as np

    keep = np.asarray(keep, bool).reshape(-1)
    noise = np.asarray(noise).reshape(-1)
    if keep.shape != noise.shape:
        raise ValueError(f"keep, noise: expected one length, got {keep.size} and {noise.size}")
    kept = noise[keep]
    n = max(int(kept.size), 1)
    out = {"all": float((kept > 0).sum() / n)}
    out.update({k: float((kept == i).sum() / n) for i, k in enumerate(NOISE_KINDS, start=1)})
    out["targeted"] = float(sum(out[k] for k in TARGETED_KINDS))
    return out

#: Off-topic conversational sentences: slot templates of the conversational domain. The
#: pretraining corpus holds documents of these sentences (so their tokens get trained
#: embeddings and context), and fine-tuning filler is drawn from the same distribution.
CHAT_TEMPLATES: tuple[str, ...] = (
    "By the way, my {pet} likes to {rest} on the {furniture}.",
    "I wonder if it will {weather} later {when}.",
    "Yesterday I watched a {genre} movie about {topic}.",
    "Remember to {chore} before the {event}.",
    "The {venue} opens again next {day}.",
    "My favorite {thing} is {colour}.",
    "Someone should really fix that {noisy} {appliance}.",
    "{music} music sounds great in the {daytime}.",
    "We could visit the {venue} on {day} if the weather is {nice}.",
    "Honestly, the {food} at that {place} was {taste}.",
)
CHAT_SLOTS: dict[str, tuple[str, ...]] = {
    "pet": ("cat", "dog", "parrot", "hamster", "rabbit", "turtle", "kitten", "puppy", "ferret", "canary"),
    "rest": ("sleep", "nap", "hide", "sit", "stretch"),
    "furniture": ("sofa", "carpet", "balcony", "windowsill", "blanket", "pillow", "armchair", "hammock"),
    "weather": ("rain", "snow", "thunder", "clear up", "drizzle"),
    "when": ("tonight", "tomorrow", "this weekend", "this afternoon"),
    "genre": ("funny", "scary", "romantic", "strange", "quiet"),
    "topic": ("pirates", "dragons", "astronauts", "detectives", "wizards", "penguins", "volcanoes",
              "submarines", "robots", "knights", "dinosaurs", "vampires"),
    "chore": ("water the garden plants", "feed the goldfish", "lock the garage", "call grandma",
              "recycle the bottles"),
    "event": ("concert", "holiday", "picnic", "wedding", "festival"),
    "venue": ("museum", "library", "aquarium", "bakery", "theatre", "gallery", "stadium", "planetarium",
              "botanical garden", "cinema"),
    "day": ("Thursday", "Friday", "Saturday", "Sunday", "Wednesday"),
    "thing": ("color", "season", "flower", "holiday", "song"),
    "colour": ("purple", "orange", "yellow", "turquoise", "crimson", "lavender", "emerald", "magenta",
               "scarlet", "indigo"),
    "noisy": ("noisy", "squeaky", "rattling", "humming", "broken"),
    "appliance": ("fan", "fridge", "heater", "doorbell", "window", "dishwasher", "elevator", "printer",
                  "microwave"),
    "music": ("Jazz", "Rock", "Opera", "Reggae", "Folk", "Blues"),
    "daytime": ("evening", "morning", "night", "rain"),
    "nice": ("sunny", "pleasant", "lovely", "mild"),
    "food": ("soup", "pizza", "salad", "pasta", "dessert", "coffee", "lasagna", "pancakes", "burrito",
             "omelette", "noodles", "cheesecake"),
    "place": ("restaurant", "cafe", "diner", "market"),
    "taste": ("delicious", "terrible", "amazing", "bland", "spicy", "wonderful", "disappointing",
              "unforgettable"),
}
_SLOT = re.compile(r"{(\w+)}")


def chat_sentence(rng: random.Random) -> str:
    """One sentence of the off-topic conversational domain (slot template + slot words)."""
    t = rng.choice(CHAT_TEMPLATES)
    return _SLOT.sub(lambda m: rng.choice(CHAT_SLOTS[m.group(1)]), t)


def chat_words() -> frozenset[str]:
    """Lower-cased words of the conversational domain that never occur in the math problems
    (used to detect filler in generated text)."""
    words = set()
    for t in CHAT_TEMPLATES:
        words.update(re.findall(r"[a-z]+", _SLOT.sub(" ", t).lower()))
    for vals in CHAT_SLOTS.values():
        for v in vals:
            words.update(re.findall(r"[a-z]+", v.lower()))
    math_words = set(w.lower() for w in _NAMES + _ITEMS + BOILERPLATE_PHRASES)
    rng = random.Random(0)
    for t in range(5):
        for _ in range(40):
            q, steps, _, _, _ = make_problem(rng, t)
            math_words.update(re.findall(r"[a-z]+", (q + " " + " ".join(steps) + " " + " ".join(BOILERPLATE_PHRASES)).lower()))
    return frozenset(w for w in words - math_words if len(w) > 3)


#: Kept for compatibility: a few fixed sentences of the conversational domain.
FILLER_PHRASES: tuple[str, ...] = tuple(
    _SLOT.sub(lambda m: CHAT_SLOTS[m.group(1)][0], t) for t in CHAT_TEMPLATES
)

#: Stock phrases that the pretraining text contains, so the base model predicts them well.
BOILERPLATE_PHRASES: tuple[str, ...] = (
    "Let us solve this step by step.",
    "We read the question carefully first.",
    "Here is the solution.",
    "We check each step carefully.",
)

_NAMES = ("Tom", "Mia", "Sam", "Lena", "Ben", "Ava", "Leo", "Zoe", "Max", "Ivy", "Kai", "Eva")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cards", "books", "shells", "coins")


@dataclass(frozen=True)
class NoiseSpan:
    """One injected noise span in a response.

    Attributes:
        kind: one of :data:`NOISE_KINDS`.
        start, end: character offsets ``[start, end)`` of the noisy text in the noisy response.
        original: the clean text this span replaced ("" for inserted phrases).
    """

    kind: str
    start: int
    end: int
    original: str = ""


@dataclass
class MathExample:
    """A problem: ``prompt``, ``response`` (possibly noisy), the ``clean_response``, ``answer``."""

    prompt: str
    response: str
    clean_response: str
    answer: int
    template: int
    noise: list[NoiseSpan] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable form (``noise`` as a list of dicts)."""
        d = asdict(self)
        d["noise"] = [asdict(s) for s in self.noise]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MathExample:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict):
            raise TypeError(f"d: expected a dict, got {type(d).__name__}")
        return cls(
            prompt=d["prompt"], response=d["response"], clean_response=d["clean_response"],
            answer=int(d["answer"]), template=int(d["template"]),
            noise=[NoiseSpan(**s) for s in d.get("noise", [])],
        )


@dataclass(frozen=True)
class NoiseConfig:
    """Per-example probabilities of each noise kind (independent draws).

    Attributes:
        filler: probability of inserting one off-topic phrase between two steps.
        boilerplate: probability of starting the response with a stock phrase.
        corrupt: probability of corrupting one intermediate result.
    """

    filler: float = 0.5
    boilerplate: float = 0.5
    corrupt: float = 0.3

    def __post_init__(self) -> None:
        for k in NOISE_KINDS:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{k}: expected a probability in [0, 1], got {v!r}")


def make_problem(rng: random.Random, template: int | None = None, n_templates: int = 5) -> tuple[str, list[str], list[tuple[int, int]], int, int]:
    """Draw one clean problem.

    Args:
        rng: the random source.
        template: template index in ``[0, n_templates)`` (None: drawn uniformly).
        n_templates: templates to draw from (at most 5).

    Returns:
        ``(question, steps, results, answer, template)`` where ``steps`` are the solution
        sentences (the last is "The answer is N."), and ``results`` lists, for each intermediate
        equation, ``(step index, value)`` of its result (the corruptible numbers).
    """
    if not isinstance(n_templates, int) or not 1 <= n_templates <= 5:
        raise ValueError(f"n_templates: expected an int in [1, 5], got {n_templates!r}")
    t = rng.randrange(n_templates) if template is None else template
    if not isinstance(t, int) or not 0 <= t < 5:
        raise ValueError(f"template: expected an int in [0, 5), got {template!r}")
    name = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    if t == 0:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. How many {item} does {name} have now?"
        s1, s2 = a + b, a + b - c
        steps = [f"{name} starts with {a} {item}.", f"After buying, {a} + {b} = {s1}.",
                 f"After giving away, {s1} - {c} = {s2}.", f"The answer is {s2}."]
        return q, steps, [(1, s1), (2, s2)], s2, t
    if t == 1:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        q = f"A box holds {a} {item}. {name} has {b} boxes and {c} loose {item}. How many {item} does {name} have?"
        s1, s2 = a * b, a * b + c
        steps = [f"The boxes hold {b} * {a} = {s1} {item}.", f"With the loose ones, {s1} + {c} = {s2}.",
                 f"The answer is {s2}."]
        return q, steps, [(0, s1), (1, s2)], s2, t
    if t == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 5)
        c = a * b + rng.randint(1, 9)
        q = f"One pack of {item} costs {a} dollars. {name} buys {b} packs and pays with {c} dollars. How much change does {name} get?"
        s1, s2 = a * b, c - a * b
        steps = [f"The packs cost {b} * {a} = {s1} dollars.", f"The change is {c} - {s1} = {s2} dollars.",
                 f"The answer is {s2}."]
        return q, steps, [(0, s1), (1, s2)], s2, t
    if t == 3:
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        q = f"On Monday {name} collects {a} {item}. On Tuesday {name} collects {b} more than on Monday. How many {item} does {name} collect in total?"
        s1, s2 = a + b, a + a + b
        steps = [f"On Tuesday {name} collects {a} + {b} = {s1}.", f"In total, {a} + {s1} = {s2}.",
                 f"The answer is {s2}."]
        return q, steps, [(0, s1), (1, s2)], s2, t
    a, b, c = rng.randint(2, 9), rng.randint(2, 5), rng.randint(1, 9)
    n = a * b
    q = f"{name} shares {n} {item} equally among {b} friends and then gives each friend {c} more. How many {item} does each friend get?"
    s1, s2 = n // b, n // b + c
    steps = [f"Each friend first gets {n} / {b} = {s1}.", f"Then each friend has {s1} + {c} = {s2}.",
             f"The answer is {s2}."]
    return q, steps, [(0, s1), (1, s2)], s2, t


def _result_match(step: str, value: int) -> re.Match | None:
    """The last ``= value`` in a step (group 1 = the number), not followed by another digit."""
    ms = list(re.finditer(rf"= ({value})(?!\d)", step))
    return ms[-1] if ms else None


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def inject_noise(rng: random.Random, steps: Sequence[str], results: Sequence[tuple[int, int]], cfg: NoiseConfig) -> tuple[str, str, list[NoiseSpan]]:
    """Build the clean and the noisy response from solution steps, recording every noise span.

    Args:
        rng: the random source.
        steps: solution sentences (the last one states the answer and is never corrupted).
        results: ``(step index, value)`` of intermediate results (from :func:`make_problem`).
        cfg: noise probabilities.

    Returns:
        ``(clean_response, noisy_response, spans)``; both responses start with a space, and
        each span's ``[start, end)`` indexes the noisy response. Inserted phrases span their
        leading space, so removing the spans of kind filler/boilerplate and putting back
        ``original`` for corrupt spans gives the clean response exactly.
    """
    if not isinstance(cfg, NoiseConfig):
        raise TypeError(f"cfg: expected a NoiseConfig, got {type(cfg).__name__}")
    steps = list(steps)
    if not steps:
        raise ValueError("steps: expected at least one step")
    # pieces: (text, kind or None, original)
    pieces: list[tuple[str, str | None, str]] = []
    corrupt_at: tuple[int, int] | None = None
    inter = [(i, v) for i, v in results if i < len(steps) - 1 and _result_match(steps[i], v)]
    if inter and rng.random() < cfg.corrupt:
        corrupt_at = rng.choice(inter)
    filler_after = rng.randrange(len(steps) - 1) if len(steps) > 1 and rng.random() < cfg.filler else None
    if rng.random() < cfg.boilerplate:
        pieces.append((" " + rng.choice(BOILERPLATE_PHRASES), "boilerplate", ""))
    for i, s in enumerate(steps):
        if corrupt_at is not None and corrupt_at[0] == i:
            v = corrupt_at[1]
            wrong = v + rng.choice([-3, -2, -1, 1, 2, 3])
            if wrong < 0:
                wrong = v + rng.randint(1, 3)
            m = _result_match(s, v)
            pieces.append((" " + s[: m.start(1)], None, ""))
            pieces.append((str(wrong), "corrupt", str(v)))
            pieces.append((s[m.end(1) :], None, ""))
        else:
            pieces.append((" " + s, None, ""))
        if filler_after == i:
            pieces.append((" " + chat_sentence(rng), "filler", ""))
    noisy, spans, pos = [], [], 0
    for text, kind, orig in pieces:
        if kind is not None:
            spans.append(NoiseSpan(kind, pos, pos + len(text), orig))
        noisy.append(text)
        pos += len(text)
    clean = "".join(" " + s for s in steps)
    return clean, "".join(noisy), spans


def generate_split(seed: int, n: int, *, noise: NoiseConfig | None = None, n_templates: int = 5, templates: Sequence[int] | None = None) -> list[MathExample]:
    """``n`` examples from ``random.Random(seed)``; ``noise=None`` gives clean examples.

    Args:
        seed: generator seed (same seed and arguments -> identical examples).
        n: number of examples (>= 0).
        noise: noise probabilities, or None for a clean split.
        n_templates: templates drawn uniformly from ``[0, n_templates)`` (ignored with ``templates``).
        templates: explicit template indices to draw from.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if templates is not None and (not templates or not all(isinstance(t, int) and 0 <= t < 5 for t in templates)):
        raise ValueError(f"templates: expected a non-empty list of ints in [0, 5), got {templates!r}")
    rng = random.Random(seed)
    off = NoiseConfig(0.0, 0.0, 0.0)
    out = []
    for _ in range(n):
        t = rng.choice(list(templates)) if templates is not None else rng.randrange(n_templates)
        q, steps, results, ans, t = make_problem(rng, t)
        clean, noisy, spans = inject_noise(rng, steps, results, noise or off)
        out.append(MathExample(_prompt(q), noisy, clean, ans, t, spans))
    return out


@dataclass
class DemoData:
    """The demo's splits.

    Attributes:
        pretrain_texts: raw text for pretraining, two domains: clean math problems of
            ``pretrain_templates`` (half with a boilerplate phrase in front of the solution) and
            documents of the off-topic conversational domain (:func:`chat_sentence`).
        finetune: noisy fine-tuning split (all templates) with recorded noise.
        reference: small clean split (all templates) used to train the SLM / Token Cleaning
            reference model.
        validation: clean held-out split (all templates) for design choices.
        test: clean held-out split (all templates) for the reported numbers.
    """

    pretrain_texts: list[str]
    finetune: list[MathExample]
    reference: list[MathExample]
    validation: list[MathExample]
    test: list[MathExample]


def chat_documents(seed: int, n: int, sentences: tuple[int, int] = (2, 4)) -> list[str]:
    """``n`` documents of the conversational domain, each ``sentences`` (min, max) sentences."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    rng = random.Random(seed)
    return [" ".join(chat_sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(n)]


def make_demo_data(seed: int, *, n_pretrain: int, n_finetune: int, n_reference: int, n_test: int,
                   n_validation: int | None = None, chat_fraction: float = 0.3,
                   noise: NoiseConfig | None = None, pretrain_templates: Sequence[int] = (0, 1, 2)) -> DemoData:
    """All splits of one demo run, deterministic in ``seed`` (splits use derived seeds).

    Pretraining text: ``round(n_pretrain * (1 - chat_fraction))`` math documents ("prompt +
    response" of clean problems of ``pretrain_templates``, half with a boilerplate phrase in
    front of the solution) and the rest conversational documents, shuffled. The other
    templates are first seen in fine-tuning. ``n_validation`` defaults to ``n_test``.
    """
    n_validation = n_test if n_validation is None else n_validation
    for name, v in (("n_pretrain", n_pretrain), ("n_finetune", n_finetune), ("n_reference", n_reference),
                    ("n_test", n_test), ("n_validation", n_validation)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if isinstance(chat_fraction, bool) or not isinstance(chat_fraction, (int, float)) or not 0.0 <= chat_fraction < 1.0:
        raise ValueError(f"chat_fraction: expected a number in [0, 1), got {chat_fraction!r}")
    noise = noise or NoiseConfig()
    n_chat = int(round(n_pretrain * chat_fraction))
    pre = generate_split(seed * 1000 + 1, n_pretrain - n_chat, noise=NoiseConfig(0.0, 0.5, 0.0),
                         templates=list(pretrain_templates))
    texts = [e.prompt + e.response for e in pre] + chat_documents(seed * 1000 + 6, n_chat)
    random.Random(seed * 1000 + 7).shuffle(texts)
    return DemoData(
        pretrain_texts=texts,
        finetune=generate_split(seed * 1000 + 2, n_finetune, noise=noise),
        reference=generate_split(seed * 1000 + 3, n_reference),
        validation=generate_split(seed * 1000 + 5, n_validation),
        test=generate_split(seed * 1000 + 4, n_test),
    )


def write_jsonl(examples: Sequence[MathExample], path: str | Path) -> Path:
    """Write examples as JSONL (one :meth:`MathExample.to_dict` per line); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for e in examples:
            if not isinstance(e, MathExample):
                raise TypeError(f"examples: expected MathExample items, got {type(e).__name__}")
            f.write(json.dumps(e.to_dict()) + "\n")
    return p


def read_jsonl(path: str | Path) -> list[MathExample]:
    """Read examples written by :func:`write_jsonl`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: {p} does not exist")
    with open(p, encoding="utf-8") as f:
        return [MathExample.from_dict(json.loads(line)) for line in f if line.strip()]
