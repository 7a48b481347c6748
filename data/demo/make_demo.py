"""Write the demo fine-tuning data: extract a person's name, age and city as JSON.

    python data/demo/make_demo.py        # rewrites train.jsonl (600) and val.jsonl (60) next to it

Each record is in the instruct format::

    {"instruction": "Extract the person's name, age and city as JSON.",
     "input": "Maria, 34, recently moved to Lisbon.",
     "output": "{\"name\": \"Maria\", \"age\": 34, \"city\": \"Lisbon\"}"}

The output is a terse, fixed format a 135M instruct model does not produce zero-shot (it chats
or writes markdown) but picks up within ~100 LoRA steps, so a short run shows a clear change.
Validation uses names and cities that never appear in training, so it measures the skill and not
memorised pairs. Seeded and standard-library only: the files are reproducible byte for byte.
"""

from __future__ import annotations

import json
import os
import random

INSTRUCTION = "Extract the person's name, age and city as JSON."

NAMES = [
    "Maria", "Tom", "Aisha", "Lukas", "Sofia", "Kenji", "Amara", "Diego", "Elena", "Omar",
    "Priya", "Jonas", "Chloe", "Mateo", "Ingrid", "Kwame", "Yuki", "Fatima", "Liam", "Noor",
    "Hannah", "Ravi", "Lucia", "Andrei", "Mei", "Samuel", "Zara", "Felix", "Leila", "Oscar",
    "Nadia", "Pablo", "Greta", "Tariq", "Emma", "Hugo", "Ayumi", "Carlos", "Freya", "Malik",
    "Isabel", "Sven", "Amelia", "Rafael", "Chen", "Olga", "Victor", "Anika", "Bruno", "Layla",
    "Marco", "Sana", "Erik", "Julia", "Kofi", "Clara", "Hassan", "Mila", "Theo", "Rosa",
]
CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Kyoto", "Toronto", "Madrid", "Berlin", "Lima", "Cairo", "Dublin",
    "Seoul", "Vienna", "Accra", "Bogota", "Helsinki", "Mumbai", "Prague", "Santiago", "Hanoi", "Zurich",
    "Melbourne", "Warsaw", "Marseille", "Denver", "Porto", "Krakow", "Quito", "Tunis", "Osaka", "Glasgow",
    "Montreal", "Athens", "Lagos", "Boston", "Bergen", "Seville",
]
TEMPLATES = [
    "{name}, {age}, recently moved to {city}.",
    "In {city} lives a {age}-year-old named {name}.",
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}: {age}, based in {city}.",
    "My neighbour {name} turned {age} last week and grew up in {city}.",
    "At {age}, {name} opened a small bakery in {city}.",
    "{name} ({age}) works as a nurse in {city}.",
    "The new intern, {name}, is {age} and commutes from {city}.",
    "Born and raised in {city}, {name} is now {age}.",
    "{city} has been home to {name} since childhood, and {name} is {age} today.",
    "Yesterday I met {name}, a {age} year old teacher from {city}.",
    "{name} from {city} just celebrated turning {age}.",
]

# Held-out split: the last names/cities in each list are used only for validation.
VAL_NAMES, VAL_CITIES = 12, 8


def make_records(names: list[str], cities: list[str], n: int, rng: random.Random) -> list[dict]:
    """``n`` records drawn from ``names`` × ``cities`` × ages 18-79 × the sentence templates."""
    records = []
    for _ in range(n):
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 79)
        sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
        output = json.dumps({"name": name, "age": age, "city": city})  # {"name": "Maria", "age": 34, ...}
        records.append({"instruction": INSTRUCTION, "input": sentence, "output": output})
    return records


def main(out_dir: str | None = None, n_train: int = 600, n_val: int = 60, seed: int = 0) -> None:
    """Write train.jsonl and val.jsonl into ``out_dir`` (default: this file's folder)."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(seed)
    splits = {
        "train.jsonl": make_records(NAMES[:-VAL_NAMES], CITIES[:-VAL_CITIES], n_train, rng),
        "val.jsonl": make_records(NAMES[-VAL_NAMES:], CITIES[-VAL_CITIES:], n_val, rng),
    }
    for filename, records in splits.items():
        with open(os.path.join(out_dir, filename), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
