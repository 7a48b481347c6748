"""Write the DPO demo data: prefer a concise answer over a rambling one with the same content.

    python data/demo/make_preference_demo.py   # rewrites preference_train.jsonl (168) and preference_val.jsonl (32)

Each record is a plain preference pair::

    {"prompt": "What is the capital of Norway?",
     "chosen": "The capital of Norway is Oslo.",
     "rejected": "Oh, what a wonderful question! ... The capital of Norway is Oslo. I hope this helps ..."}

Both answers state the same (correct) fact; only the style differs, so what DPO must learn is the
style: drop the padding. The questions come from five small families of facts (capitals, sums,
opposites, legs, colours); the held-out file asks questions that never occur in training, so its
reward accuracy measures the preference, not memorised pairs. Seeded and standard-library only:
the files are reproducible byte for byte.
"""

from __future__ import annotations

import json
import os
import random

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Vietnam", "Hanoi"), ("Finland", "Helsinki"),
    ("Cuba", "Havana"), ("Russia", "Moscow"), ("China", "Beijing"), ("Australia", "Canberra"),
    ("Thailand", "Bangkok"), ("Sweden", "Stockholm"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Argentina", "Buenos Aires"), ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Belgium", "Brussels"),
]
OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("old", "young"), ("wet", "dry"), ("hard", "soft"),
    ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("high", "low"), ("push", "pull"),
]
LEGS = [("spider", 8), ("dog", 4), ("bird", 2), ("ant", 6), ("cat", 4), ("horse", 4), ("chicken", 2), ("bee", 6),
        ("cow", 4), ("duck", 2), ("beetle", 6), ("sheep", 4), ("scorpion", 8), ("goat", 4), ("penguin", 2)]
COLOURS = [("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"), ("coal", "black"),
           ("a ripe tomato", "red"), ("the clear daytime sky", "blue"), ("a lemon", "yellow"), ("milk", "white"),
           ("a carrot", "orange"), ("chocolate", "brown"), ("a ripe strawberry", "red"), ("an emerald", "green")]

OPENERS = [
    "Oh, what a wonderful question, and I'm so glad you asked it!",
    "Well, that is a really interesting thing to wonder about, so let me think about it carefully.",
    "Great question! This is something a lot of people are curious about, and it deserves a proper answer.",
    "Hmm, let me take a moment here, because I want to make sure I explain this as clearly as I possibly can.",
    "Thank you so much for asking! Before I answer, I should say that I always enjoy questions like this one.",
    "Ah, I love this kind of question. Let me walk you through it step by step, just to be thorough.",
    "So, to answer your question, we first need to think about it a little bit, and then it becomes clear.",
    "Absolutely, I can help with that! It's a fun one, and honestly there's quite a lot one could say about it.",
]
CLOSERS = [
    "I hope this helps, and please don't hesitate to ask me anything else you might be wondering about!",
    "Let me know if you would like me to go into even more detail, because there is always more to say.",
    "Isn't that fascinating? There's so much to learn about the world, and I'm always happy to help.",
    "Feel free to ask follow-up questions at any time, as I'm here to help with whatever you need!",
    "In summary, that's the answer, and I really hope my long explanation made it nice and clear for you.",
    "Anyway, that's about it! Thanks again for such a thoughtful question, it was a pleasure to answer.",
]


def questions() -> list[tuple[str, str]]:
    """(question, concise correct answer) for every fact in the tables, plus some sums."""
    out = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS]
    out += [(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in OPPOSITES]
    out += [(f"How many legs does a {x} have?", f"A {x} has {n} legs.") for x, n in LEGS]
    out += [(f"What colour is {x}?", f"{x[0].upper() + x[1:]} is {c}.") for x, c in COLOURS]
    rng = random.Random(7)
    pairs = sorted({(rng.randint(2, 60), rng.randint(2, 40)) for _ in range(130)})[:125]
    out += [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.") for a, b in pairs]
    return out


def rambling(answer: str, rng: random.Random) -> str:
    """The same answer between a filler opening and a filler closing sentence."""
    return f"{rng.choice(OPENERS)} {answer} {rng.choice(CLOSERS)}"


def main() -> None:
    rng = random.Random(0)
    items = questions()
    rng.shuffle(items)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, chunk in (("preference_train.jsonl", items[:168]), ("preference_val.jsonl", items[168:200])):
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            for question, answer in chunk:
                record = {"prompt": question, "chosen": answer, "rejected": rambling(answer, rng)}
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
