"""The OpenAI-compatible judge against a real local HTTP server: ranking, scoring, retries and failures."""


import pytest

from lmforge.errors import LmforgeError
from lmforge.judges import JudgeConfig, make_judge
from lmforge.judges.openai import OpenAIJudge, judge_prompt, parse_ranking, parse_score
from tests import http_server
from tests.judge_server import JudgeServer


def _user(req) -> str:
    return req["body"]["messages"][1]["content"]


# ---- ranking ---------------------------------------------------------------------------------------------

def test_ranks_via_a_real_server_with_duplicates_ranked_once(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with JudgeServer("ok") as srv:
        judge = make_judge(JudgeConfig(name="openai", url=srv.url, model="judge-1", api_key_env="JUDGE_KEY"))
        assert judge.rank("Name a fruit", ["apple", "a red apple", "apple", "a"]) == [2, 1, 2, 4]
        assert judge.rank("Count to three", ["1 2 3", "1 2"]) == [1, 2]
    assert len(srv.requests) == 2  # one request per prompt: the duplicate "apple" is ranked once
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-1" and req["body"]["temperature"] == 0
    assert _user(req).count("Candidate ") == 3 and "User request:\nName a fruit" in _user(req)


def test_identical_candidates_need_no_request():
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m")  # nothing listens: any request would fail
    assert judge.rank("q", ["same", "same", "same"]) == [1, 1, 1] and judge.rank("q", []) == []


def test_a_later_turn_sends_the_conversation():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "Name a fruit"}]
    with JudgeServer("ok") as srv:
        assert OpenAIJudge(srv.url, "m").rank("Name a fruit", ["pear", "fig"], messages) == [1, 2]
    assert _user(srv.requests[0]).startswith("Conversation so far:\n[user] hi\n[assistant] hello\n[user] Name a fruit")
    assert judge_prompt("q", ["a", "b"]).endswith("Reply with only a JSON list of the candidate numbers 1..2, best "
                                                  "first, each exactly once, e.g. [2, 1].")


def test_retries_a_malformed_ranking_once():
    with JudgeServer("bad_once") as srv:
        assert OpenAIJudge(srv.url + "/chat/completions", "m").rank("Count to three", ["1 2 3", "1 2"]) == [1, 2]
    assert len(srv.requests) == 2 and all(r["path"] == "/v1/chat/completions" for r in srv.requests)
    retry = srv.requests[1]["body"]["messages"]
    assert retry[2] == {"role": "assistant", "content": "Candidate one is clearly the best."}
    assert "JSON list" in retry[3]["content"]


@pytest.mark.parametrize("mode, reason", [("always_bad", "the reply is not a ranking of 1..3: 'Candidate one"),
                                          ("http_error", "HTTP 500 from http://127.0.0.1:"),
                                          ("not_chat", r"http://127.0.0.1:\d+/v1/chat/completions did not return an OpenAI chat-completions")])
def test_ranking_fails_after_one_retry_naming_the_prompt(mode, reason):
    with JudgeServer(mode) as srv, \
            pytest.raises(LmforgeError, match=rf"^judge failed twice on prompt 'Name a fruit': {reason}"):
            OpenAIJudge(srv.url, "m").rank("Name a fruit", ["apple", "a red apple", "apple", "a"])
    assert len(srv.requests) == 2


def test_an_unreachable_endpoint_fails_naming_the_url():
    port = http_server.free_port()  # nothing listens on it
    long_prompt = "Please name " + "a very tasty fruit " * 5
    with pytest.raises(LmforgeError, match=rf"on prompt '{long_prompt[:57]}\.\.\.': cannot reach "
                                           rf"http://127.0.0.1:{port}/v1/chat/completions"):
        OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=5).rank(long_prompt, ["a", "b"])


@pytest.mark.parametrize("reply, n, expected", [
    ("[2, 1, 3]", 3, [2, 1, 3]),
    ("Here is my ranking:\n```json\n[3, 1, 2]\n```", 3, [3, 1, 2]),
    ("<think>maybe [1, 2, 3]</think>Final: [3,2,1]", 3, [3, 2, 1]),
    ('["2", "1"]', 2, [2, 1]),
    ("[1, 1, 2]", 3, None),
    ("[1, 2]", 3, None),
    ("[0, 1, 2]", 3, None),
    ("[1, 2.5, 3]", 3, None),
    ("candidate two is best", 2, None),
    ("", 2, None),
])
def test_parse_ranking(reply, n, expected):
    assert parse_ranking(reply, n) == expected


# ---- scoring ---------------------------------------------------------------------------------------------

def test_scores_one_response_on_a_0_to_100_scale():
    with JudgeServer("ok") as srv:
        judge = OpenAIJudge(srv.url, "m")
        assert judge.score("Name a fruit", "a") == 0.0  # rated 1
        assert judge.score("Name a fruit", "fig") == pytest.approx(200 / 9)  # rated 3
        assert judge.score("Name a fruit", "a red apple") == 100.0  # rated 10
        assert judge.parts("Name a fruit", "fig") == {}
    body = srv.requests[0]["body"]
    assert body["temperature"] == 0 and len(body["messages"]) == 2
    assert "Name a fruit" in _user(srv.requests[0]) and "single integer from 1 to 10" in _user(srv.requests[0])


def test_score_many_runs_workers_requests_at_a_time_in_order():
    responses = ["a" * n for n in range(1, 9)]
    with JudgeServer("ok", delay=0.1) as srv:
        scores = OpenAIJudge(srv.url, "m", workers=4).score_many(["Say a"] * 8, responses)
    assert scores == [pytest.approx((n - 1) / 9 * 100) for n in range(1, 9)]
    assert len(srv.requests) == 8 and 2 <= srv.max_in_flight <= 4


def test_ranking_takes_one_request_not_one_score_per_response():
    with JudgeServer("ok") as srv:
        OpenAIJudge(srv.url, "m").rank("q", ["aa", "b", "ccc"])
    assert len(srv.requests) == 1 and "Candidate 3:" in _user(srv.requests[0])


def test_retries_a_malformed_score_once():
    with JudgeServer("bad_once") as srv:
        assert OpenAIJudge(srv.url, "m").score("Name a fruit", "fig") == pytest.approx(200 / 9)
    retry = srv.requests[1]["body"]["messages"]
    assert retry[2] == {"role": "assistant", "content": "Candidate one is clearly the best."}
    assert retry[3]["content"] == "That is not a valid answer. Reply with only a single integer from 1 to 10."


@pytest.mark.parametrize("mode, reason", [("always_bad", "the reply is not a score from 1 to 10: 'Candidate one"),
                                          ("http_error", "HTTP 500 from")])
def test_scoring_fails_after_one_retry_naming_the_prompt(mode, reason):
    with JudgeServer(mode) as srv, \
            pytest.raises(LmforgeError, match=rf"^judge failed twice on prompt 'Name a fruit': {reason}"):
            OpenAIJudge(srv.url, "m", workers=2).score_many(["Name a fruit"], ["fig"])
    assert len(srv.requests) == 2


@pytest.mark.parametrize("reply, expected", [
    ("7", 7),
    ("Rating: 10", 10),
    ("The answer is correct and brief.\n\n8", 8),
    ("<think>Maybe 2, maybe 3.</think>\n9", 9),
    ("Score: 6.", 6),
    ("8/10", 8),
    ("I give it 4 out of 10", 4),
    ("7.5", None),
    ("0", None),
    ("11", None),
    ("<think>5</think>good", None),
    ("excellent", None),
    ("", None),
    (None, None),
])
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected
