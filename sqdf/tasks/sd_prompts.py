"""Prompt sets for the sd task: built-in ones by name, or a text file, one prompt a line; a
line may give its own negative prompt after a tab (``prompt<TAB>negative``)."""

from __future__ import annotations

from pathlib import Path

from sqdf.errors import ConfigError

# Common animals, the kind of prompt set DDPO's and SQDF's aesthetic experiments use.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon "
    "fox wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake "
    "turtle frog chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()

# Held out of ``animals`` for evaluation (as the official SQDF code keeps 8 animal prompts
# apart): animals a run on ``animals`` never saw, scored by ``sqdf eval`` and --eval-every.
ANIMALS_HELDOUT = "elephant giraffe penguin owl octopus crab panda koala".split()

VARIED = [
    "a lighthouse on a rocky coast at dusk",
    "a bowl of ramen on a wooden table",
    "an astronaut reading a book in a library",
    "a red bicycle leaning against a brick wall",
    "a snowy mountain village at night",
    "a watercolor painting of a fox in a forest",
    "a steam train crossing a stone bridge",
    "a cup of coffee with latte art",
    "a medieval castle on a hill under storm clouds",
    "a close-up photo of a dew-covered spider web",
    "a child flying a kite on a beach",
    "a futuristic city skyline at sunset",
    "an old man playing chess in a park",
    "a field of sunflowers under a blue sky",
    "a sailboat on a calm lake at sunrise",
    "a cozy reading nook with a cat",
    "a portrait of a woman in renaissance style",
    "a robot watering plants in a greenhouse",
    "a bustling street market in the rain",
    "an owl perched on a branch at night",
    "a vintage car parked in front of a diner",
    "a plate of colorful macarons",
    "a waterfall in a tropical jungle",
    "a pencil sketch of an elephant",
    "a hot air balloon over a desert canyon",
    "a glass of orange juice on a breakfast table",
    "a knight in shining armor riding a horse",
    "a treehouse in an autumn forest",
    "an underwater coral reef with fish",
    "a cabin by a frozen lake with northern lights",
    "a pixel art dragon",
    "a minimalist poster of a mountain range",
]

PROMPT_SETS = {"animals": ANIMALS, "animals-heldout": ANIMALS_HELDOUT, "varied": VARIED}


def load_prompts(spec: str) -> list[str]:
    """A built-in set's prompts, or a file's non-empty lines (without their negatives)."""
    return [p for p, _ in load_prompt_pairs(spec)]


def load_prompt_pairs(spec: str) -> list[tuple[str, str | None]]:
    """(prompt, its own negative prompt or None) for each prompt of a set or file."""
    if spec in PROMPT_SETS:
        return [(p, None) for p in PROMPT_SETS[spec]]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"prompts {spec!r} is neither a built-in set ({', '.join(PROMPT_SETS)}) nor a file"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read prompts file {spec}: {err}") from None
    pairs = []
    for line in lines:
        prompt, tab, negative = line.partition("\t")
        if prompt.strip():
            pairs.append((prompt.strip(), negative.strip() if tab else None))
    if not pairs:
        raise ConfigError(f"prompts file {spec} has no prompts (one prompt a line)")
    return pairs
