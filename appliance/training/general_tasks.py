"""Short general tasks for rehearsal: the kinds of general ability the forgetting check probes, with other items.

Self-rehearsal (replay.self_rehearsal) keeps the adapter close to the base on the long chats the base writes
itself. What fine-tuning flips most is elsewhere: the first greedy token of a short, constrained answer ("Answer
with the number only", "yes or no", "name three..."), which those chats rarely contain. These prompts cover such
tasks, kind by kind (arithmetic, facts, language, definitions, lists, yes/no, translation, sentiment, format,
comparison), with numbers, places and words chosen apart from the probes'. Training never sees their answers as
targets: the base answers them and the adapter is held to the base's whole next-token distribution there (the
rehearsal KL), so they keep what the base does, right or wrong, rather than teaching anything.

None is a forgetting probe: every prompt that overlaps one (forgetting.overlaps_probe) is dropped, and a fast test
checks that none asks a probe's question of the probe's own item (the same opening words and the same rest). The
probes then measure whether keeping these carried over to items training never saw.
"""

from __future__ import annotations

import random

from .forgetting import overlaps_probe

_ADD = ((4, 5), (8, 1), (7, 9), (12, 15), (40, 30), (25, 25), (9, 9), (14, 6), (60, 20), (3, 8), (11, 11),
        (200, 300), (16, 4), (5, 5))
_SUB = ((9, 4), (20, 5), (15, 8), (50, 25), (12, 6), (100, 40), (8, 3), (30, 12))
_MUL = ((5, 6), (7, 3), (9, 2), (4, 4), (8, 5), (6, 6), (3, 3), (10, 5))
_HALF = (8, 20, 50, 30, 14, 200, 64)
_COUNTRIES = ("Italy", "Spain", "Canada", "Portugal", "Norway", "Kenya", "Peru", "Sweden", "India", "Mexico",
              "Australia", "Ireland", "Poland", "Turkey")  # none of them a probe's country
_FACT_QUESTIONS = (
    "How many days are in a week?", "How many months are in a year?", "How many minutes are in an hour?",
    "How many legs does a spider have?", "How many legs does a dog have?", "What is the freezing point of water?",
    "Which planet is closest to the Sun?", "What is the largest planet in our solar system?",
    "Who wrote Hamlet?", "What do bees make?", "What is the hardest natural material?",
    "Which animal is known as the king of the jungle?", "How many continents are there?",
    "What is the longest river in Africa?", "Which organ pumps blood around the body?",
    "What do caterpillars turn into?", "How many sides does a square have?", "What is the largest desert on Earth?",
    "Which instrument has black and white keys?", "What is the boiling point of water in Fahrenheit?",
)
_PLURALS = ("tooth", "goose", "man", "box", "leaf", "baby", "knife", "person", "sheep", "bus")
_OPPOSITES = ("big", "light", "early", "wet", "full", "tall", "heavy", "loud", "rich", "clean", "hard", "near")
_NOUN_OR_VERB = (("She sings every morning", "sings"), ("The book is on the table", "book"),
                 ("We swim in the lake", "swim"), ("The river is long", "river"))
_DEFINE = ("a bridge", "a pilot", "a museum", "a river", "a baker", "a planet", "a dictionary", "a garden",
           "an engineer", "a clock", "a forest", "a nurse", "a market", "a bicycle", "an island")
_LISTS = ("Name three fruits.", "Name three musical instruments.", "List three vegetables.",
          "Name three planets.", "Name three sports.", "List the first five months of the year.",
          "Name three countries in Asia.", "Name three kinds of weather.", "List three things found in a kitchen.",
          "Name three shapes.", "List four parts of the body.")
_YES_NO = ("Is ice cold?", "Do fish live in water?", "Is the Sun a star?", "Can dogs fly?", "Is snow hot?",
           "Is 5 less than 8?", "Is 30 smaller than 3?", "Do birds have feathers?", "Is grass usually green?",
           "Can a car talk?", "Is a week longer than a day?", "Do people need sleep?", "Is salt sweet?",
           "Is an ant bigger than a horse?")
_TRANSLATE = (("French", "good night"), ("Spanish", "good morning"), ("German", "please"), ("Italian", "goodbye"),
              ("French", "water"), ("Spanish", "friend"), ("German", "yes"), ("Portuguese", "good evening"))
_REVIEWS = ("The food was cold and the waiter was rude.", "Great service, I will come back again.",
            "This phone broke after two days.", "The hotel room was clean and the staff were lovely.",
            "I waited an hour and nobody helped me.", "Brilliant book, I could not put it down.",
            "The film was boring and far too long.", "Lovely weather and a perfect walk.")
_SUMMARIES = ("The train was late because of snow on the tracks, so the school trip started an hour later.",
              "The shop will close early on Friday for a staff training day.",
              "Our team won the match after scoring twice in the last ten minutes.")
_REPEAT = ("The dog ran across the park.", "It is raining today.", "Please close the door.",
           "Birds sing in the morning.", "We will meet at noon.")
_STARTS = ("Yesterday", "Tomorrow", "Music", "Every", "My")
_COMPARE = ((4, 11), (15, 6), (2, 20), (33, 8), (5, 1), (12, 21))


def general_tasks(seed: int = 0) -> list[str]:
    """Every short task prompt, in a fixed shuffled order (the rehearsal draws a few a step, in turn)."""
    prompts = [f"What is {a} + {b}? Answer with the number only." for a, b in _ADD]
    prompts += [f"What is {a} minus {b}? Answer with the number only." for a, b in _SUB]
    prompts += [f"What is {a} times {b}? Answer with the number only." for a, b in _MUL]
    prompts += [f"What is half of {n}? Answer with the number only." for n in _HALF]
    prompts += [f"What is {a} plus {b}?" for a, b in _ADD[:6]]
    for country in _COUNTRIES:
        prompts += [f"What is the capital of {country}?", f"What is the currency of {country}?",
                    f"What language is mainly spoken in {country}?"]
    prompts += list(_FACT_QUESTIONS)
    prompts += [f"What is the plural of '{w}'?" for w in _PLURALS]
    prompts += [f"What is the opposite of '{w}'?" for w in _OPPOSITES]
    prompts += [f"In the sentence '{s}', is '{w}' a noun or a verb?" for s, w in _NOUN_OR_VERB]
    prompts += [f"In one sentence, what is {w}?" for w in _DEFINE]
    prompts += list(_LISTS)
    prompts += [f"{q} Answer yes or no." for q in _YES_NO] + list(_YES_NO[:6])
    prompts += [f"Translate to {lang}: '{w}'" for lang, w in _TRANSLATE]
    prompts += [f"Is this review positive or negative? '{r}'" for r in _REVIEWS]
    prompts += [f"Summarize in a few words: '{s}'" for s in _SUMMARIES]
    prompts += [f"Repeat this sentence exactly: {s}" for s in _REPEAT]
    prompts += [f"Write one sentence that starts with the word '{w}'." for w in _STARTS]
    prompts += [f"Which number is bigger, {a} or {b}?" for a, b in _COMPARE]
    prompts += [f"Which is smaller, {a} or {b}?" for a, b in _COMPARE]
    prompts = [p for p in dict.fromkeys(prompts) if not overlaps_probe(p)]
    random.Random(seed).shuffle(prompts)
    return prompts
