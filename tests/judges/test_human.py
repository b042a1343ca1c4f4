"""The human judge's bookkeeping: ranks from the page's order, stable ids, leases between labellers, durable
appends, resume, a torn last line, skips, and inter-labeller agreement against hand-computed values."""

import json

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.judges.human import Item, LabelSession, agreement, item_ids, pairwise_agreement, ranks_from_groups
from lmforge.preferences import kendall_tau


def _items(n=3, k=3):
    ids = item_ids([(f"prompt {i}", [f"answer {i}.{j}" for j in range(k)]) for i in range(n)])
    return [Item(ids[i], f"prompt {i}", [f"answer {i}.{j}" for j in range(k)]) for i in range(n)]


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_ranks_from_the_pages_order_with_ties():
    assert ranks_from_groups([[2], [0, 3], [1]], 4) == [2, 4, 1, 2]
    assert ranks_from_groups([[1], [0]], 2) == [2, 1]
    assert ranks_from_groups([[0, 1, 2]], 3) == [1, 1, 1]
    for bad in ([[0], [0, 1]], [[0], [1]], [[0], [], [1, 2]], [[0, 1, 2, 3]]):
        with pytest.raises(ValueError):
            ranks_from_groups(bad, 3)


def test_item_ids_are_stable_and_distinct_for_repeated_records():
    recs = [("a", ["x", "y"]), ("b", ["x", "y"]), ("a", ["x", "y"])]
    ids = item_ids(recs)
    assert ids == item_ids(recs) and len(set(ids)) == 3 and ids[2] == ids[0] + "#2"


def test_a_prompt_goes_to_one_labeller_at_a_time_and_to_n_labellers(tmp_path):
    s = LabelSession(_items(2), tmp_path / "ranked.jsonl", labelers=2)
    a1, b1 = s.next_task("ana"), s.next_task("bo")
    assert a1["id"] != b1["id"]  # leased: bo gets the second prompt while ana holds the first
    assert s.next_task("ana")["id"] == a1["id"]  # a reload gives ana the same prompt, in the same order
    assert [c["key"] for c in s.next_task("ana")["candidates"]] == [c["key"] for c in a1["candidates"]]
    assert sorted(c["key"] for c in a1["candidates"]) == [0, 1, 2]
    assert s.submit("ana", a1["id"], [[2], [0, 1]], comment=" too long ")
    assert not s.submit("ana", a1["id"], [[0], [1], [2]])  # a resubmission is kept once
    assert s.next_task("ana") is None  # bo holds the other prompt; ana has ranked hers
    s.submit("bo", b1["id"], [[0], [1], [2]])
    assert s.next_task("bo")["id"] == a1["id"]  # the second ranking of ana's prompt is bo's
    rows = _lines(tmp_path / "ranked.jsonl")
    assert len(rows) == 2 and rows[0]["labeler"] == "ana" and rows[0]["comment"] == "too long"
    assert [c["rank"] for c in rows[0]["choices"]] == [2, 2, 1]
    assert [c["text"] for c in rows[0]["choices"]] == ["answer 0.0", "answer 0.1", "answer 0.2"]
    assert s.progress() == {"done": 2, "total": 4, "skipped": 0, "per_labeler": {"ana": 1, "bo": 1}}


def test_a_lapsed_lease_frees_the_prompt(tmp_path):
    s = LabelSession(_items(1), tmp_path / "r.jsonl", lease_seconds=0.5)
    first = s.next_task("ana")
    assert s.next_task("bo") is None  # held by ana
    import time
    time.sleep(0.6)
    assert s.next_task("bo")["id"] == first["id"]


def test_restart_resumes_and_drops_a_torn_last_line(tmp_path):
    out = tmp_path / "ranked.jsonl"
    items = _items(3)
    s = LabelSession(items, out)
    t = s.next_task("ana")
    s.submit("ana", t["id"], [[0], [1], [2]])
    s.skip("ana", s.next_task("ana")["id"])
    with open(out, "a", encoding="utf-8") as f:  # a crash in the middle of writing the next record
        f.write('{"input": "prompt 2", "choi')
    s2 = LabelSession(items, out)
    assert len(_lines(out)) == 1  # the torn line (never acknowledged) is gone, the acknowledged one kept
    assert s2.next_task("ana")["id"] == items[2].id  # done and skipped prompts are not offered again
    assert s2.progress()["done"] == 1 and s2.progress()["skipped"] == 1
    assert s2.next_task("bo")["id"] == items[1].id  # ana's skip leaves the prompt to someone else


def test_an_output_that_is_not_a_labelling_file_is_refused(tmp_path):
    out = tmp_path / "other.jsonl"
    out.write_text('{"input": "x", "choices": []}\n')
    with pytest.raises(LmforgeError, match="other.jsonl:1"):
        LabelSession(_items(1), out)


def test_pairwise_agreement_and_kendall_tau_hand_computed():
    # pairs (0,1) (0,2) (1,2): a orders 0<1, 0<2, 1<2; b orders 0<1, 0>2, 1>2 -> 1 of 3 agree
    assert pairwise_agreement([1, 2, 3], [2, 3, 1]) == pytest.approx(1 / 3)
    assert pairwise_agreement([1, 1, 2], [1, 1, 3]) == 1.0  # a tie agrees with a tie
    assert pairwise_agreement([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    recs = [{"id": "p", "input": "q", "labeler": "ana", "choices": [{"text": t, "rank": r} for t, r in zip("xyz", (1, 2, 3))]},
            {"id": "p", "input": "q", "labeler": "bo", "choices": [{"text": t, "rank": r} for t, r in zip("xyz", (2, 3, 1))]},
            {"id": "s", "input": "q2", "labeler": "ana", "choices": [{"text": t, "rank": r} for t, r in zip("xy", (1, 2))]}]
    a = agreement(recs)
    assert a["prompts"] == 1 and a["labeler_pairs"] == 1
    assert a["pairwise_agreement"] == pytest.approx(1 / 3)
    assert a["kendall_tau_b"] == pytest.approx(kendall_tau([1, 2, 3], [2, 3, 1])) == pytest.approx(-1 / 3)


def test_agreement_cli(tmp_path, capsys):
    s = LabelSession(_items(2), tmp_path / "ranked.jsonl", labelers=2)
    for who, order in (("ana", [[0], [1], [2]]), ("bo", [[0], [2], [1]])):
        for _ in range(2):
            t = s.next_task(who)
            s.submit(who, t["id"], order)
    assert main(["label", "agreement", str(tmp_path / "ranked.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "2 prompts ranked by 2+ labellers" in out and "pairwise agreement 66.7%" in out and "0.333" in out
    (tmp_path / "bad.jsonl").write_text('{"input": "x", "choices": [{"text": "a", "rank": 1}]}\n')
    assert main(["label", "agreement", str(tmp_path / "bad.jsonl")]) != 0
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_bad_input_is_one_line_before_any_page(tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"input": "a", "candidates": ["x", "y"]}\n{"input": "b", "candidates": ["only"]}\n')
    assert main(["label", "--judge", "human", "--input", str(one), "--out", str(tmp_path / "o.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "one.jsonl:2" in err and "at least 2 candidates" in err and len(err.strip().splitlines()) == 1
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"input": "a", "candidates": ["x", "y"]}\n')
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["label", "--judge", "human", "--input", str(ok), "--out", str(blocker / "o.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "o.jsonl" in err and "cannot write" in err and len(err.strip().splitlines()) == 1
