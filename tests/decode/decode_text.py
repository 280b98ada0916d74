"""Generated text for the decoder tests: seeded sentences over a small code-flavoured vocabulary.

A module of its own (not conftest) so test files can import it: `from conftest import ...`
picks whichever folder's conftest pytest loaded first.
"""

from __future__ import annotations

import random

WORDS = (
    "the a model token cache layer graph export run fast small byte text code list def return "
    "import class value key query head batch step print data file open read write loop"
).split()


def generated_text(lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(lines)]
