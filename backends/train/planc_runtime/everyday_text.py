"""Everyday English sentences generated from a small grammar written for planc.

The offline prose on a machine (docstrings, help topics, package documentation) is technical; a
sentence encoder distilled only on it copies its teacher well on such text and worse on the
plain language of a search query or a chat message. This grammar fills that gap with text the
project writes itself: people, places, objects and errands of daily life, in statements,
questions, requests and reports. No sentence is copied from anywhere; a seed picks the words.

`sentences(count, seed)` returns distinct sentences, the same on every machine.
"""

from __future__ import annotations

import random

PEOPLE = [
    "my neighbor", "the teacher", "an old woman", "our manager", "the doctor", "my sister", "his father",
    "the waiter", "a tourist", "two students", "the nurse", "my best friend", "the new intern", "a farmer",
    "the children", "her grandmother", "the landlord", "a police officer", "the cashier", "my brother",
    "the coach", "a customer", "the pilot", "our guide", "the baker", "the mechanic", "my roommate",
    "the librarian", "the chef", "my uncle", "the engineer", "a couple", "our dentist", "the mail carrier",
    "a stranger", "the painter", "my aunt",
]
ANIMALS = [
    "the dog", "the horse", "a bird", "a puppy", "the cow", "a squirrel", "the kitten",
    "a rabbit", "the goat", "a fox", "the parrot", "a deer", "the sheep", "a bee",
]
OBJECTS = [
    "the keys", "a bicycle", "an umbrella", "the groceries", "a letter", "the car", "a sandwich",
    "the tickets", "a map", "the phone", "a cup of tea", "the report", "a birthday cake", "the window",
    "a new jacket", "the dishes", "a package", "the lawn mower", "the photos", "a backpack",
    "the invoice", "a bottle of water", "the printer", "a pair of shoes", "the garden hose", "a book",
    "the television", "a basket of apples", "the spreadsheet", "a warm blanket", "the fridge", ]
PLACES = [
    "at the park", "in the kitchen", "at the station", "in the office", "at the market",
    "near the river", "in the garden", "at the airport", "in the library", "at the stadium",
    "in the living room", "at the hospital", "behind the school", "on the balcony",
    "at the bakery", "in the parking lot", "at the gym", "in the classroom", "on the farm",
    "at the hotel", "in the hallway", "at the bank", "on the bridge", "in the forest", "at the cafe",
]
TIMES = [
    "this morning", "last night", "yesterday", "every weekend", "after lunch", "before dinner", "on Monday",
    "at noon", "this afternoon", "last summer", "every day", "in the evening", "tomorrow", "next week",
    "during the storm", "after work", "early today", "on her birthday", "late at night", "over the holidays",
]
#: (base, past, -ing) forms of verbs that take an object.
TRANSITIVE = [
    ("carry", "carried", "carrying"), ("fix", "fixed", "fixing"), ("wash", "washed", "washing"),
    ("find", "found", "finding"), ("lose", "lost", "losing"), ("buy", "bought", "buying"),
    ("sell", "sold", "selling"), ("paint", "painted", "painting"), ("open", "opened", "opening"),
    ("clean", "cleaned", "cleaning"), ("bring", "brought", "bringing"), ("drop", "dropped", "dropping"),
    ("borrow", "borrowed", "borrowing"), ("return", "returned", "returning"), ("check", "checked", "checking"),
    ("move", "moved", "moving"), ("order", "ordered", "ordering"), ("share", "shared", "sharing"),
    ("pack", "packed", "packing"), ("deliver", "delivered", "delivering"), ("repair", "repaired", "repairing"),
    ("forget", "forgot", "forgetting"), ("watch", "watched", "watching"), ("hold", "held", "holding"),
]
#: (base, past, -ing) forms of verbs without an object.
INTRANSITIVE = [
    ("run", "ran", "running"), ("sleep", "slept", "sleeping"), ("laugh", "laughed", "laughing"),
    ("wait", "waited", "waiting"), ("sing", "sang", "singing"), ("cry", "cried", "crying"),
    ("dance", "danced", "dancing"), ("swim", "swam", "swimming"), ("rest", "rested", "resting"),
    ("work", "worked", "working"), ("walk", "walked", "walking"), ("cook", "cooked", "cooking"),
    ("shout", "shouted", "shouting"), ("play", "played", "playing"), ("read", "read", "reading"),
    ("study", "studied", "studying"), ("travel", "traveled", "traveling"), ("complain", "complained", "complaining"),
]
ADJECTIVES = [
    "broken", "expensive", "quiet", "crowded", "cold", "delicious", "late", "heavy", "bright", "noisy",
    "empty", "wet", "cheap", "tired", "busy", "clean", "dirty", "warm", "strange", "beautiful", "slow", "new",
    "old", "useful", "dangerous", "comfortable", "boring", "friendly", "fresh", "difficult",
]
GOODS = [
    "bread", "rent", "electricity", "train tickets", "fresh fruit", "used cars",
    "concert tickets", "milk", "houses in the city", "airline fares", "vegetables", "phone plans",
]
CHANGES = [
    "fell a little", "doubled", "stayed the same", "rose again", "dropped quickly",
    "climbed steadily", "went down",
]
PERIODS = ["last year", "over the summer", "in recent weeks", "since the spring", "this quarter"]
WEATHER = [
    "it rained all day", "the snow kept falling", "the wind was strong", "the sun finally came out",
    "a storm knocked out the power", "the fog was thick", "it was unusually hot", "the roads were icy",
]
FEELINGS = [
    "happy", "worried", "angry", "surprised", "nervous", "relieved", "excited", "sad", "proud", "bored",
]
FOODS = [
    "soup", "pasta", "a salad", "rice and beans", "pancakes", "apple pie", "fresh bread", "grilled cheese",
    "an omelet", "noodles", "chocolate cookies", "roast chicken", "lemon cake", "vegetable curry", "tacos",
]
HEALTH = [
    "has a terrible headache", "caught a cold", "broke an arm while skiing", "needs more sleep",
    "feels much better today", "is allergic to peanuts", "twisted an ankle", "has a fever",
    "stopped eating sugar",
]
DEVICES = [
    "phone", "tablet", "printer", "router", "television", "camera", "smart watch", "desktop", "headphones",
]
TROUBLES = [
    "keeps freezing", "will not charge", "crashes every time I open it", "makes a strange noise",
    "is running very slowly", "lost all my photos", "shows a blank screen", "disconnects every few minutes",
]
TRAVEL = [
    "the train was delayed by an hour", "our flight was canceled", "the hotel room was tiny",
    "we missed the last ferry", "the highway was closed for repairs", "the taxi never arrived",
    "the museum was closed on Sunday", "our luggage ended up in another city",
]
WORK = [
    "finished the project early", "missed the deadline again", "asked for a raise", "wrote the proposal",
    "called the client back", "organized the team meeting", "started a new job", "quit after two weeks",
    "trained the new staff", "answered emails all morning",
]
REASONS = [
    "it was too late", "the store was closed", "nobody asked", "the weather was bad", "there was no time",
    "it cost too much", "the line was too long", "everyone was tired",
]
CONTESTS = [
    "chess tournament", "spelling contest", "soccer match", "school election", "cooking competition",
    "tennis final",
]
EVENTS = [
    "the meeting", "the wedding", "the game", "the concert", "the exam", "the party", "the trip",
    "the interview", "the flight", "the holidays", "the deadline", "the race",
]


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _sentence(rng: random.Random) -> str:
    """One sentence from one of the grammar's patterns."""
    c = rng.choice
    who, thing, where, when = c(PEOPLE + ANIMALS[:4]), c(OBJECTS), c(PLACES), c(TIMES)
    tv, iv, adj, event = c(TRANSITIVE), c(INTRANSITIVE), c(ADJECTIVES), c(EVENTS)
    patterns = [
        lambda: f"{_capital(who)} {tv[1]} {thing} {where} {when}.",
        lambda: f"{_capital(who)} is {tv[2]} {thing} {where}.",
        lambda: f"{_capital(c(ANIMALS))} is {iv[2]} {where}.",
        lambda: f"{_capital(when)}, {who} {iv[1]} {where}.",
        lambda: f"Could you {tv[0]} {thing} before {event}?",
        lambda: f"Why did {who} {tv[0]} {thing} {when}?",
        lambda: f"How do I {tv[0]} {thing} if it is {adj}?",
        lambda: f"The price of {c(GOODS)} {c(CHANGES)} {c(PERIODS)}.",
        lambda: f"{_capital(who)} felt {c(FEELINGS)} because {c(WEATHER)}.",
        lambda: f"{_capital(thing)} was too {adj} to {tv[0]}, so {who} {iv[1]} instead.",
        lambda: f"I think {who} will {tv[0]} {thing} after {event}.",
        lambda: f"We {iv[1]} {where} until {c(WEATHER)}.",
        lambda: f"{_capital(who)} and {c(PEOPLE)} {iv[1]} together {when}.",
        lambda: f"Please remember to {tv[0]} {thing} {when}.",
        lambda: f"{_capital(who)} said that {thing} is {adj} and should not be used.",
        lambda: f"Nobody expected {event} to be so {adj}.",
        lambda: f"{_capital(c(WEATHER))}, so {who} stayed home and {iv[1]}.",
        lambda: f"Have you seen {thing}? I left it {where} {when}.",
        lambda: f"After {event}, {who} was too {c(FEELINGS)} to {iv[0]}.",
        lambda: f"{_capital(who)} {tv[1]} {thing} and then {iv[1]} {where}.",
        lambda: f"{_capital(c(PEOPLE))} {c(HEALTH)}.",
        lambda: f"My {c(DEVICES)} {c(TROUBLES)}, what should I do?",
        lambda: f"Since the last update, the {c(DEVICES)} {c(TROUBLES)}.",
        lambda: f"We had {c(FOODS)} for dinner and it was {adj}.",
        lambda: f"{_capital(c(PEOPLE))} cooked {c(FOODS)} for everyone {when}.",
        lambda: f"{_capital(c(TRAVEL))}, so {who} {iv[1]} {where}.",
        lambda: f"At work, {c(PEOPLE)} {c(WORK)}.",
        lambda: f"{_capital(c(PEOPLE))} did not {tv[0]} {thing} because {c(REASONS)}.",
        lambda: f"{_capital(c(PEOPLE))} is looking for {thing} but cannot find it anywhere.",
        lambda: f"Do you know where {c(PEOPLE)} put {thing}?",
        lambda: f"{_capital(c(PEOPLE))} {c(['won', 'lost'])} the {c(CONTESTS)} {when}.",
        lambda: f"It takes about {c(['five', 'ten', 'twenty', 'forty'])} minutes to get {where} from here.",
        lambda: f"I would like to {tv[0]} {thing}, please.",
        lambda: f"Is it true that {c(TRAVEL)}?",
    ]
    return c(patterns)()


def sentences(count: int = 30_000, seed: int = 0) -> list[str]:
    """`count` distinct generated sentences (fewer if the grammar runs dry), seeded."""
    rng, seen, found = random.Random(seed), set(), []
    for _ in range(count * 20):
        sentence = _sentence(rng)
        if sentence not in seen:
            seen.add(sentence)
            found.append(sentence)
            if len(found) == count:
                break
    return found
