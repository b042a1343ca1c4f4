"""The task families of the built-in world, one Task subclass per module, and the registry that lists them.

To add a family: write a Task subclass in a new module here and add an instance to TASKS. Sampling,
generation, the oracle and the manifest all go through this list; nothing else switches on a family name.
"""

from __future__ import annotations

from lmforge.world.tasks.arithmetic import Arithmetic
from lmforge.world.tasks.base import Question, Task, Template, format_prompt
from lmforge.world.tasks.facts import Facts
from lmforge.world.tasks.reverse import Reverse
from lmforge.world.tasks.translate import Translate
from lmforge.world.tasks.uppercase import Uppercase

# Order matters for reproducibility: the sampler draws a family with rng.choices over this list, and a
# prompt is parsed by the first family whose template reads it.
TASKS: list[Task] = [
    Arithmetic(),
    Facts(),
    Translate(),
    Uppercase(),
    Reverse(),
]


def parse_prompt(prompt: str) -> Question:
    """The question a world prompt (format_prompt text) asks; ValueError if no task family wrote it."""
    text = prompt.strip()
    for task in TASKS:
        question = task.parse(text)
        if question is not None:
            return question
    raise ValueError(f"oracle: prompt of no known task family: {prompt!r}")


__all__ = ["TASKS", "Question", "Task", "Template", "format_prompt", "parse_prompt"]
