"""A real OpenAI-compatible chat-completions endpoint on 127.0.0.1, for the judge and label tests."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    """A real OpenAI-compatible endpoint on 127.0.0.1. Ranking requests: candidates longest-first (ties: lower
    number). Rating requests: the response's length, clamped to 1..10.

    Pairwise requests (Response A / Response B): the longer one, "tie" when equally long.

    mode "ok": answers correctly; "bad_once": the first answer of each conversation is prose, the retry is
    answered; "always_bad": never an answer; "http_error": status 500; "not_chat": JSON that is not a
    chat-completions response; "always_A": pairwise requests always get "A" (pure position bias);
    "bad_compare": pairwise requests get prose, never a verdict (ratings and rankings are answered). `delay` seconds per request; `max_in_flight` counts concurrent requests.
    """

    def __init__(self, mode="ok", delay=0.0):
        self.mode, self.delay, self.requests = mode, delay, []
        self.lock, self.in_flight, self.max_in_flight = threading.Lock(), 0, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay)
                with server.lock:
                    server.in_flight -= 1
                reply = server.reply(body)
                if reply is None:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def reply(self, body: dict) -> dict | None:
        """The JSON body answering one request (None: HTTP 500). Subclasses script other servers."""
        if self.mode == "http_error":
            return None
        first_try = len(body["messages"]) == 2
        pairwise = "\n\nResponse A:\n" in body["messages"][1]["content"]
        if self.mode == "always_bad" or (self.mode == "bad_once" and first_try):
            content = "Candidate one is clearly the best."
        elif self.mode == "always_A" and pairwise:
            content = "A"
        elif self.mode == "bad_compare" and pairwise:
            content = "Both responses have their merits."
        else:
            content = self.answer(body["messages"][1]["content"])
        if self.mode == "not_chat":
            return {"result": content}
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}

    @staticmethod
    def answer(prompt: str) -> str:
        if "\n\nResponse A:\n" in prompt:  # which of two is better
            a, rest = prompt.split("\n\nResponse A:\n", 1)[1].split("\n\nResponse B:\n", 1)
            b = rest.rsplit("\n\nWhich response is better?", 1)[0]
            return "<think>B looks nice</think>The answer is " + ("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")
        if "\n\nResponse:\n" in prompt:  # rate one response
            response = prompt.split("\n\nResponse:\n", 1)[1].rsplit("\n\nRate the response", 1)[0]
            return f"<think>A 1 out of 10 at first sight? No.</think>Rating: {min(10, max(1, len(response)))}"
        cands = {}
        for block in prompt.split("Candidate ")[1:]:
            num, text = block.split(":\n", 1)
            cands[int(num)] = text.rsplit("\n\n", 1)[0] if "\n\nRank all" in text else text.rstrip("\n")
        return f"My ranking: {json.dumps(sorted(cands, key=lambda i: (-len(cands[i]), i)))}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
