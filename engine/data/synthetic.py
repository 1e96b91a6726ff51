"""Synthetic HHH-style comparison groups, learnable by a tiny byte-level model.

    generate("train.jsonl", groups=3000, seed=0)
    rankpm generate --out train.jsonl --groups 3000 --seed 0

Each group is one Human/Assistant context (1-2 turns) from one of three sources and K
responses ranked by a quality score that is a sum of clear lexical features:

    helpful   "How do I <task>?"          answers the task +3, changes the subject -1,
                                          vague non-answer 0, refuses a harmless request -1
    honest    "What is <fact>?"           hedged answer +3, admits not knowing +1,
                                          asserts a (false) answer with certainty -2
    harmless  "How can I <harm>?"         refuses +3, deflects 0, complies -3
    any       polite opener +1, rude opener -2, closing offer +0.5

Ranks are dense by descending quality (rank 0 = best); equal qualities tie. The same
(seed, groups, k_min, k_max) always writes the same file. Contexts are ~60-150 bytes and
responses ~40-120 bytes, so byte-level sequences stay well under 256 tokens.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS = [("boil an egg", "the egg", "water"), ("fix a flat tyre", "the tyre", "patch"),
         ("water a cactus", "the cactus", "soil"), ("sharpen a knife", "the blade", "stone"),
         ("bake bread", "the dough", "oven"), ("learn to swim", "the stroke", "pool"),
         ("clean a laptop", "the keyboard", "cloth"), ("plan a trip", "the route", "map"),
         ("save money", "the budget", "account"), ("write a cover letter", "the letter", "draft")]
STEPS = ["First, get {obj} ready, then use the {tool} slowly.", "Start by checking {obj}; the {tool} helps a lot.",
         "Put {obj} next to the {tool} and go step by step.", "Use a good {tool} and keep an eye on {obj}."]
FACTS = [("the capital of Peru", "Lima", "Quito"), ("the boiling point of water", "100 C", "70 C"),
         ("the largest planet", "Jupiter", "Mars"), ("the author of Hamlet", "Shakespeare", "Dickens"),
         ("the speed of sound", "about 343 m/s", "about 30 m/s"), ("the tallest mountain", "Everest", "Fuji"),
         ("the chemical symbol for gold", "Au", "Ag"), ("the longest river", "the Nile", "the Thames")]
HARMS = ["pick my neighbour's lock", "poison a dog", "hack my ex's email", "steal a car",
         "make a fake ID", "shoplift without getting caught", "cheat on a tax return"]
COMPLY = ["Here is how: get a {tool} and do it at night so nobody sees.",
          "Easy. Buy a cheap {tool} online and follow these steps quietly.",
          "Do it like this: use a {tool} and hide the evidence after."]
HARM_TOOLS = ["wire", "crowbar", "script", "chemical", "printer"]
REFUSE = ["I can't help with that; it could hurt someone.", "I won't help with this, as it is harmful and illegal.",
          "Sorry, I can't assist with that. It could cause real harm."]
DEFLECT = ["Maybe ask someone else about that.", "That is not something I think about much."]
VAGUE = ["It depends on a lot of things, hard to say.", "There are many ways, it varies."]
OFF_TOPIC = ["Anyway, {other} is more fun to talk about.", "Speaking of something else, try to {other} instead."]
HEDGED = ["I believe it is {right}, but you may want to double-check.", "I think it is {right}, if I remember well."]
UNSURE = ["I'm not sure, sorry. I don't want to guess.", "I don't know that one for certain."]
FALSE = ["It is definitely {wrong}, no doubt about it.", "Obviously {wrong}. Everyone knows that for sure."]
POLITE = ["Sure, happy to help!", "Good question."]
RUDE = ["Ugh, whatever.", "What a dumb question."]
CLOSING = ["Hope that helps.", "Ask if you need more."]
WARMUPS = [("Hi there.", "Hello! How can I help?"), ("Can I ask you something?", "Of course, go ahead.")]


def _context(rng: random.Random, question: str) -> tuple[str, int]:
    text, turns = "", 1
    if rng.random() < 0.4:  # a short earlier exchange: two-turn dialogues
        human, assistant = rng.choice(WARMUPS)
        text, turns = f"\n\nHuman: {human}\n\nAssistant: {assistant}", 2
    return f"{text}\n\nHuman: {question}\n\nAssistant:", turns


def _body(rng: random.Random, source: str, topic) -> tuple[str, float]:
    if source == "helpful":
        task, obj, tool = topic
        kind = rng.choices(["answer", "off", "vague", "refuse"], weights=[3, 2, 1, 1])[0]
        if kind == "answer":
            return rng.choice(STEPS).format(obj=obj, tool=tool), 3.0
        if kind == "off":
            other = rng.choice([t for t in TASKS if t != topic])[0]
            return rng.choice(OFF_TOPIC).format(other=other), -1.0
        if kind == "vague":
            return rng.choice(VAGUE), 0.0
        return rng.choice(REFUSE), -1.0
    if source == "honest":
        _, right, wrong = topic
        kind = rng.choices(["hedged", "unsure", "false"], weights=[2, 1, 2])[0]
        if kind == "hedged":
            return rng.choice(HEDGED).format(right=right), 3.0
        if kind == "unsure":
            return rng.choice(UNSURE), 1.0
        return rng.choice(FALSE).format(wrong=wrong), -2.0
    kind = rng.choices(["refuse", "deflect", "comply"], weights=[2, 1, 2])[0]
    if kind == "refuse":
        return rng.choice(REFUSE), 3.0
    if kind == "deflect":
        return rng.choice(DEFLECT), 0.0
    return rng.choice(COMPLY).format(tool=rng.choice(HARM_TOOLS)), -3.0


def _response(rng: random.Random, source: str, topic) -> tuple[str, float]:
    body, quality = _body(rng, source, topic)
    parts = [body]
    tone = rng.random()
    if tone < 0.25:
        parts.insert(0, rng.choice(POLITE)); quality += 1.0
    elif tone < 0.4:
        parts.insert(0, rng.choice(RUDE)); quality -= 2.0
    if rng.random() < 0.3:
        parts.append(rng.choice(CLOSING)); quality += 0.5
    return " " + " ".join(parts), quality


def dense_ranks(qualities: list[float]) -> list[int]:
    """Rank 0 for the best quality; equal qualities share a rank."""
    levels = sorted(set(qualities), reverse=True)
    return [levels.index(q) for q in qualities]


def make_group(rng: random.Random, index: int, k: int) -> dict:
    source = rng.choice(["helpful", "honest", "harmless"])
    if source == "helpful":
        topic = rng.choice(TASKS)
        question = f"How do I {topic[0]}?"
    elif source == "honest":
        topic = rng.choice(FACTS)
        question = f"What is {topic[0]}?"
    else:
        topic = None
        question = f"How can I {rng.choice(HARMS)}?"
    prompt, turns = _context(rng, question)
    responses, qualities = [], []
    for _ in range(k):
        text, quality = _response(rng, source, topic)
        responses.append(text); qualities.append(quality)
    for _ in range(100):  # at least two distinct qualities, or the group forms no pair
        if len(set(qualities)) > 1:
            break
        responses[-1], qualities[-1] = _response(rng, source, topic)
    return {"id": f"hhh-{index}", "prompt": prompt, "responses": responses, "ranks": dense_ranks(qualities),
            "source": source, "turns": turns}


# Neutral small talk that lengthens a dialogue without changing which response is better
# (HH-RLHF's conversations run to hundreds of tokens before the compared turn).
CHAT_HUMAN = ["I have been thinking about my weekend plans and I am not sure yet what to do.",
              "My friend told me about a new cafe in town, have you heard of good places like that?",
              "It rained all morning here, so I stayed inside and read a book about old ships.",
              "I started learning to cook last month and it is going better than I expected.",
              "We are planning a family dinner and everyone wants something different to eat."]
CHAT_ASSISTANT = ["That sounds like a nice way to spend some time, and there are many options to consider.",
                  "It is always good to hear recommendations from friends, they know what you like.",
                  "Rainy days can be relaxing, and a good book makes the hours pass quickly.",
                  "Practice helps a lot, and simple recipes are a great place to start.",
                  "Finding something everyone enjoys can be tricky, a few shared dishes often work."]
FILLER = ["Let me add a little more detail here.", "This is a common situation for many people.",
          "There are a few things worth keeping in mind.", "It may take a bit of time to get used to it.",
          "Many people find this approach works well for them."]


def lengthen(group: dict, rng: random.Random, context_words: tuple[int, int], response_words: tuple[int, int]) -> dict:
    """Earlier small-talk turns before the question and neutral sentences after each response,
    up to word counts drawn from the given ranges; ranks are unchanged."""
    target = rng.randint(*context_words)
    earlier = ""
    while len((earlier + group["prompt"]).split()) < target:
        earlier += f"\n\nHuman: {rng.choice(CHAT_HUMAN)}\n\nAssistant: {rng.choice(CHAT_ASSISTANT)}"
    responses = []
    for text in group["responses"]:
        goal = rng.randint(*response_words)
        while len(text.split()) < goal:
            text += " " + rng.choice(FILLER)
        responses.append(text)
    turns = group["turns"] + earlier.count("\n\nHuman:")
    return dict(group, prompt=earlier + group["prompt"], responses=responses, turns=turns)


def generate(path: str | Path, *, groups: int, seed: int, k_min: int = 2, k_max: int = 4,
             context_words: tuple[int, int] | None = None, response_words: tuple[int, int] = (0, 0)) -> Path:
    """Write ``groups`` ranked-list rows (JSON Lines) to ``path``; deterministic by seed.

    ``context_words``: lengthen each dialogue with earlier turns to a word count drawn from
    the range (and each response to one drawn from ``response_words``), for HH-shaped data."""
    if groups < 1:
        raise ValueError(f"groups={groups}: expected a positive integer")
    if not 2 <= k_min <= k_max:
        raise ValueError(f"k_min={k_min}, k_max={k_max}: expected 2 <= k_min <= k_max")
    rng = random.Random(f"rankpm-synthetic-{seed}")

    def rows():
        for i in range(groups):
            group = make_group(rng, i, rng.randint(k_min, k_max))
            yield group if context_words is None else lengthen(group, rng, context_words, response_words)

    return _write_jsonl(path, rows())


def generate_text(path: str | Path, *, rows: int, seed: int,
                  context_words: tuple[int, int] | None = None) -> Path:
    """Write ``rows`` plain-text rows ``{"text": dialogue}`` (a corpus for ``rankpm cache-logits``):
    each a group's dialogue ended by its best response; deterministic by seed."""
    if rows < 1:
        raise ValueError(f"rows={rows}: expected a positive integer")
    rng = random.Random(f"rankpm-synthetic-text-{seed}")

    def texts():
        for i in range(rows):
            group = make_group(rng, i, 2)
            if context_words is not None:
                group = lengthen(group, rng, context_words, (0, 0))
            best = group["responses"][group["ranks"].index(min(group["ranks"]))]
            yield {"id": group["id"], "text": group["prompt"] + best}

    return _write_jsonl(path, texts())


def _write_jsonl(path: str | Path, rows) -> Path:
    """Stream ``rows`` to ``path`` through a temporary unique to this process, then rename it into
    place: a reader never sees a half-written file, two writers never share a temporary."""
    from rankpm.engine.io import temporary_sibling

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, help="the JSON Lines file to write")
    parser.add_argument("--text", action="store_true",
                        help="write plain-text dialogues {\"text\": ...} (a corpus for cache-logits), one per group")
    parser.add_argument("--groups", type=int, default=1000, help="comparison groups (with --text: texts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k-min", type=int, default=2, help="fewest responses per group")
    parser.add_argument("--k-max", type=int, default=4, help="most responses per group")
    return parser


def run_generate(args: argparse.Namespace) -> int:
    if args.text:
        path = generate_text(args.out, rows=args.groups, seed=args.seed)
        print(json.dumps({"out": str(path), "texts": args.groups, "seed": args.seed}), flush=True)
        return 0
    path = generate(args.out, groups=args.groups, seed=args.seed, k_min=args.k_min, k_max=args.k_max)
    print(json.dumps({"out": str(path), "groups": args.groups, "seed": args.seed}), flush=True)
    return 0
