"""A seeded synthetic data set of fictitious customers with private fields, as Q/A records.

It is the kind of data a removal request is about: each customer has a name, a city, a phone
number, an account number and a preference, and each field is asked about in its own record.
All names and numbers are invented from the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ["Alma", "Bruno", "Carmen", "Dario", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira",
         "Lucas", "Mara", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Ugo", "Vera", "Wim",
         "Xenia", "Yusuf", "Zora"]
LAST = ["Abrams", "Berg", "Castro", "Dahl", "Engel", "Falk", "Gross", "Holm", "Ivers", "Jung", "Krause",
        "Lund", "Moreau", "Novak", "Ortiz", "Pohl", "Quist", "Rossi", "Stark", "Toth", "Ulrich", "Vogel"]
CITIES = ["Lisbon", "Oslo", "Porto", "Graz", "Lyon", "Turin", "Ghent", "Bergen", "Malmo", "Leeds", "Brno", "Cork"]
LIKES = ["tea", "coffee", "jazz", "chess", "hiking", "sailing", "poetry", "cycling", "baking", "opera"]

QUESTIONS = {
    "phone": ("What is {name}'s phone number?", "{name}'s phone number is {phone}."),
    "city": ("Which city does {name} live in?", "{name} lives in {city}."),
    "account": ("What is {name}'s account number?", "{name}'s account number is {account}."),
    # this query carries a private field, the kind a modify_query request strips out
    "likes": ("Customer {name}, account {account}: what does {name} like?", "{name} likes {likes}."),
}


# a short system turn: without one, SmolLM2's chat template adds a 20-token default to every sample
SYSTEM = "You answer questions about our customers."


@dataclass(frozen=True)
class Customer:
    name: str
    city: str
    phone: str
    account: str
    likes: str


def make_customers(n: int, seed: int = 0) -> list[Customer]:
    rng = random.Random(seed)
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n)
    return [Customer(name, rng.choice(CITIES), f"555-{rng.randrange(10000):04d}",
                     f"{rng.randrange(10000):04d}-{rng.randrange(10000):04d}", rng.choice(LIKES)) for name in names]


def question(field: str, c: Customer) -> str:
    return QUESTIONS[field][0].format(**vars(c))


def answer(field: str, c: Customer) -> str:
    return QUESTIONS[field][1].format(**vars(c))


def make_records(customers: list[Customer], fields=("phone", "city", "account", "likes")) -> list[dict]:
    """One {"id", "system", "prompt", "response", "customer", "field"} record per customer and field."""
    return [{"id": f"c{i}-{f}", "system": SYSTEM, "prompt": question(f, c), "response": answer(f, c), "customer": c.name, "field": f}
            for i, c in enumerate(customers) for f in fields]
