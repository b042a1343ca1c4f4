"""The oracle judge gives exactly the built-in world's oracle ranks, scores and score parts."""

import itertools
import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.judges import JudgeConfig, make_judge, ranks_from_scores
from lmforge.judges.oracle import OracleJudge
from lmforge.world import flawed_response, ideal_response, oracle_breakdown, oracle_rank, oracle_score

ENTITIES = ["apple", "banana", "horse", "dog", "cat", "cow", "lion", "duck", "whale", "bee", "hammer", "car"]
ADJECTIVES = ["red", "yellow", "big", "small", "new", "hot", "good"]
NOUNS = ["apple", "dog", "car", "book", "cup", "tree", "horse", "bag"]


def world_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts in the built-in world's templates, every task family, English and Chinese."""
    rng = random.Random(seed)

    def arithmetic():
        a, b, op = rng.randint(1, 50), rng.randint(1, 50), rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        return rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Solve\n{a} {op} {b}",
                           f"计算 {a} {op} {b}"])

    def facts():
        e = rng.choice(ENTITIES)
        return rng.choice([f"What color is the {e}?", f"Is the {e} big or small?", f"What kind of thing is the {e}?"])

    def translate():
        return rng.choice(["Translate into Chinese\n{}", "Translate into Chinese: {}", "翻译成中文\n{}"]).format(
            f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}")

    def uppercase():
        return f"Write '{rng.choice(NOUNS)}' in uppercase."

    def reverse():
        return "Reverse the word order\n" + " ".join(rng.sample(NOUNS, rng.choice([3, 4])))

    return [rng.choice([arithmetic, facts, translate, uppercase, reverse])() for _ in range(n)]


def candidates(prompt: str, rng: random.Random) -> list[str]:
    """Every flaw combination, the ideal answer twice (a tie), a truncated and an empty answer, shuffled."""
    ideal = ideal_response(prompt)
    cands = [flawed_response(prompt, impolite=i, verbose=v, wrong=w, rng=random.Random(rng.random()))
             for i, v, w in itertools.product([False, True], repeat=3)]
    cands += [ideal, ideal[: len(ideal) // 3], ""]
    rng.shuffle(cands)
    return cands


def test_oracle_ranks_equal_the_world_oracle_over_many_prompts():
    judge, rng = OracleJudge(), random.Random(1)
    prompts = world_prompts(300)
    ties = 0
    for prompt in prompts:
        cands = candidates(prompt, rng)
        ranks = judge.rank(prompt, cands)
        assert ranks == list(oracle_rank(prompt, cands)) and all(type(r) is int for r in ranks)
        scores = [judge.score(prompt, c) for c in cands]
        assert ranks == ranks_from_scores(scores)  # consistent with its own scores
        ties += len(set(ranks)) < len(ranks)
    assert ties == len(prompts)  # the duplicated ideal answer always ties


def test_oracle_score_and_parts():
    judge, rng = make_judge(JudgeConfig(name="oracle")), random.Random(2)
    for prompt in world_prompts(100, seed=3):
        assert judge.score(prompt, ideal_response(prompt)) == 100.0
        for c in candidates(prompt, rng):
            s, parts = judge.score(prompt, c), judge.parts(prompt, c)
            assert s == oracle_score(prompt, c)
            assert set(parts) == {"correctness", "politeness", "concision"}
            assert sum(parts.values()) == pytest.approx(s, abs=1e-3)
            assert parts == {k: oracle_breakdown(prompt, c)[k] for k in parts}
    wrong = flawed_response("What is 12 + 7?", wrong=True)
    assert judge.parts("What is 12 + 7?", wrong)["correctness"] == 0.0
    assert judge.score_many(["What is 12 + 7?"] * 2, ["12 + 7 = 19.", wrong]) == [100.0, oracle_score("What is 12 + 7?", wrong)]


@pytest.mark.parametrize("call", [
    lambda j: j.rank("Write a poem", ["a", "b"]),
    lambda j: j.score("Write a poem", "a"),
    lambda j: j.parts("Write a poem", "a"),
])
def test_prompts_outside_the_world_are_refused_with_a_hint(call):
    with pytest.raises(LmforgeError, match=r"no known task family.*'Write a poem'.*the oracle judges only the "
                                           r"built-in world's prompts.*another judge.*openai"):
        call(OracleJudge())
