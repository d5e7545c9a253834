"""Short general instructions, so the draft also learns the target's everyday answers.

No instruction data set can be had offline, so prompts are composed from templates and
topics; the answers are the target's own, which is what the draft has to predict anyway.
"""

from __future__ import annotations

import random

_TOPICS = (
    "the moon", "photosynthesis", "a robot dog", "the ocean", "gravity", "rain", "volcanoes",
    "the internet", "coffee", "bicycles", "music", "the sun", "trees", "batteries", "bees",
    "a city park", "winter", "mountains", "the heart", "electricity", "friendship", "clouds",
    "chess", "bread", "rivers", "airplanes", "the alphabet", "a library", "cats", "the weather",
)
_TASKS = (
    "stay focused while studying", "make a cup of tea", "plant a tree", "learn to swim",
    "sleep better", "save money", "write a letter", "keep a room tidy", "start running",
    "cook rice", "learn a new language", "fix a flat tyre",
)
_TEMPLATES = (
    "What is {topic}?",
    "Explain {topic} in one sentence.",
    "Tell me a fun fact about {topic}.",
    "Write a short poem about {topic}.",
    "Describe {topic} to a child.",
    "Why is {topic} important?",
    "How do I {task}?",
    "Give me two tips to {task}.",
    "What should I know before I {task}?",
    "Hello! How are you today?",
    "What is {a} plus {b}?",
    "Name three colours.",
)


def sample_general_prompt(rng: random.Random) -> str:
    """One general instruction drawn from the templates."""
    template = rng.choice(_TEMPLATES)
    return template.format(topic=rng.choice(_TOPICS), task=rng.choice(_TASKS),
                           a=rng.randint(2, 50), b=rng.randint(2, 50))
