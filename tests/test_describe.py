"""LLM description generation against a real local HTTP server speaking chat-completions."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bifta_core.io.description_generation import (
    DescribeConfig,
    clean_descriptors,
    clean_sentences,
    fill_question,
    generate_label_set,
    is_on_topic,
    load_classes,
    normalize_key,
)
from bifta_core.errors import BiftaUserError, ConfigError, LabelSetError
from bifta_core.io.llm import ChatClient, ChatRequest, LLMError, parse_retry_after, retry_delay
from jobs import describe as describe_cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "descriptions"
SECRET = "sk-test-SECRET-0123456789"


@dataclass
class Reply:
    """What the fake server sends for one request."""

    status: int = 200
    body: bytes | dict | None = None  # None: a normal completion built from the prompt
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    contents: list[str] | None = None  # texts for the choices of a normal completion


# script(class name, index of this request among that class's requests, request body) -> Reply
Script = Callable[[str, int, dict], Reply | None]


class FakeLLM:
    """State of the fake chat-completions server: scripted replies and a request log."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.classes: list[str] = []
        self.script: Script | None = None
        self.honour_n = True
        self.lock = threading.Lock()
        self.bodies: list[dict] = []
        self.auth_headers: list[str | None] = []
        self.per_class: Counter[str] = Counter()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.bodies)

    def class_of(self, body: dict) -> str:
        prompt = body["messages"][-1]["content"].casefold()
        # Longest first so that "hose" never shadows "garden hose".
        for name in sorted(self.classes, key=len, reverse=True):
            if name.casefold().replace("_", " ") in prompt:
                return name
        return "?"

    def reply_for(self, body: dict, auth: str | None) -> tuple[Reply, int]:
        """The scripted reply and a serial number unique to this request."""
        cls = self.class_of(body)
        with self.lock:
            self.bodies.append(body)
            self.auth_headers.append(auth)
            serial = len(self.bodies)
            nth = self.per_class[cls]
            self.per_class[cls] += 1
        reply = self.script(cls, nth, body) if self.script else None
        return reply or Reply(), serial

    def completion(self, body: dict, reply: Reply, serial: int) -> dict:
        n = int(body.get("n", 1)) if self.honour_n else 1
        cls = self.class_of(body)
        if reply.contents is not None:
            texts = reply.contents[:n] if len(reply.contents) >= n else reply.contents
        elif "visual features" in body["messages"][-1]["content"]:
            texts = [f"Key features:\n- {cls} shape\n- Bright colour\n- metal handle {serial}"] * n
        else:
            texts = [f"A photo of a {cls}, variant {serial}-{k}." for k in range(n)]
        return {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": "stop",
                }
                for i, t in enumerate(texts)
            ],
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        fake: FakeLLM = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions"
        reply, serial = fake.reply_for(body, self.headers.get("Authorization"))
        if reply.delay:
            time.sleep(reply.delay)
        payload = reply.body if reply.body is not None else fake.completion(body, reply, serial)
        raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        # A client that timed out closes its socket; the late write then fails. Expected.
        pass


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL", "XDG_CACHE_HOME", "BIFTA_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def llm() -> FakeLLM:
    server = _Server(("127.0.0.1", 0), _Handler)
    fake = FakeLLM(f"http://127.0.0.1:{server.server_address[1]}/v1")
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


SMALL = DescribeConfig(
    questions=("What does a {} look like?", "A caption of an image of a {}:"),
    answers_per_question=2,
    progress_every=1,
)


def make_client(llm: FakeLLM, cache: Path | None = None, **kw: object) -> ChatClient:
    opts: dict[str, object] = {
        "model": "test-model",
        "timeout_s": 2.0,
        "max_retries": 3,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.01,
        "max_concurrency": 4,
        "cache_dir": cache,
        "seed": 0,
    }
    opts.update(kw)
    return ChatClient(llm.url, **opts)  # type: ignore[arg-type]


def run_set(llm: FakeLLM, tmp_path: Path, classes: list, **kw: object):
    llm.classes = [c if isinstance(c, str) else c[0] for c in classes]
    config = kw.pop("config", SMALL)
    client = make_client(llm, **kw)
    report = generate_label_set(classes, client, tmp_path / "out", config)  # type: ignore[arg-type]
    return report, tmp_path / "out"


def _load(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- end to end


def test_writes_label_set_in_shared_format(llm: FakeLLM, tmp_path: Path) -> None:
    classes = ["laptop stand", ["crème brûlée", "burnt cream"], "garden_hose"]
    report, out = run_set(llm, tmp_path, classes)

    assert _load(out / "classes.json") == classes
    cupl = _load(out / "cupl.json")
    clip_d = _load(out / "clip-d.json")
    names = ["laptop stand", "crème brûlée", "garden_hose"]
    assert list(cupl) == names and list(clip_d) == names
    for name in names:
        assert len(cupl[name]) == 4  # 2 questions x 2 answers, all distinct and on topic
        assert all(isinstance(s, str) and s.strip() == s for s in cupl[name])
        assert clip_d[name][:2] == [f"{name} shape", "bright colour"]
    # Same layout as the published sets: UTF-8 text (not \u escapes), two-space indent.
    text = (out / "cupl.json").read_text(encoding="utf-8")
    assert "crème brûlée" in text and "\\u" not in text and text.startswith('{\n  "')
    assert report.empty_classes == [] and report.failed_samples == 0
    rep = _load(out / "describe-report.json")
    assert rep["n_classes"] == 3 and rep["classes"]["laptop stand"]["sentences"] == 4
    # Prompts: class name with underscores as spaces, "an" before a vowel.
    prompts = {b["messages"][-1]["content"] for b in llm.bodies}
    assert "What does a garden hose look like?" in prompts
    assert "A caption of an image of a crème brûlée:" in prompts
    assert all(b["model"] == "test-model" and "n" not in b for b in llm.bodies)

    if SHARED.is_dir():
        shared = _load(SHARED / "dtd" / "cupl.json")
        assert isinstance(shared, dict) and isinstance(cupl, dict)
        assert {type(v) for v in shared.values()} == {type(v) for v in cupl.values()} == {list}
        assert isinstance(_load(SHARED / "dtd" / "classes.json"), list)


def test_answers_are_cleaned(llm: FakeLLM, tmp_path: Path) -> None:
    def script(cls: str, nth: int, body: dict) -> Reply | None:
        if "visual features" in body["messages"][-1]["content"]:
            text = "Features:\n1. Metal frame.\n2. Adjustable height\n3. metal frame"
        else:
            text = (
                "Here are some captions:\n"
                '1. "A silver laptop stand on a desk."\n'
                "2) **Laptop stand** holding a laptop\n"
                "- 'A sunny beach at noon.'\n"
                "   \n"
            )
        return Reply(contents=[text])

    llm.script = script
    config = DescribeConfig(questions=("What does a {} look like?",), answers_per_question=2)
    _, out = run_set(llm, tmp_path, ["laptop stand"], config=config)
    assert _load(out / "cupl.json") == {
        "laptop stand": ["A silver laptop stand on a desk.", "Laptop stand holding a laptop"]
    }
    assert _load(out / "clip-d.json") == {"laptop stand": ["metal frame", "adjustable height"]}
    rep = _load(out / "describe-report.json")["classes"]["laptop stand"]
    assert rep["dropped"] == {"off_topic": 2, "duplicate": 2}


@pytest.mark.parametrize(
    "bad",
    [b"this is not json {", {"object": "chat.completion"}, {"choices": []}],
    ids=["non-json", "no-choices", "empty-choices"],
)
def test_malformed_response_is_retried(llm: FakeLLM, tmp_path: Path, bad: bytes | dict) -> None:
    llm.script = lambda cls, nth, body: Reply(body=bad) if nth == 0 else None
    report, out = run_set(llm, tmp_path, ["espresso machine"], config=_one_question())
    assert report.classes[0].errors == []
    assert len(_load(out / "cupl.json")["espresso machine"]) == 2
    assert llm.count == 3  # 2 answers + 1 retry


def test_malformed_forever_is_reported_and_run_continues(llm: FakeLLM, tmp_path: Path) -> None:
    def script(cls: str, nth: int, body: dict) -> Reply | None:
        return Reply(body=b"<html>oops</html>") if cls == "espresso machine" else None

    llm.script = script
    report, out = run_set(
        llm, tmp_path, ["espresso machine", "laptop stand"], config=_one_question(),
        max_malformed_retries=1,
    )
    assert report.empty_classes == ["espresso machine"]
    bad = report.classes[0]
    assert len(bad.errors) == 2 and all("malformed response" in e for e in bad.errors)
    assert "oops" in bad.errors[0]  # the server's text is quoted to help debugging
    assert _load(out / "cupl.json")["espresso machine"] == []
    assert len(_load(out / "cupl.json")["laptop stand"]) == 2
    assert llm.per_class["espresso machine"] == 4  # 2 samples x (1 try + 1 retry)


def test_429_honours_retry_after(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = lambda cls, nth, body: (
        Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "0.05"})
        if nth == 0
        else None
    )
    start = time.monotonic()
    # A huge backoff base: only the honoured Retry-After keeps this test fast.
    report, out = run_set(
        llm, tmp_path, ["garden hose"], config=_one_question(samples=1),
        backoff_base_s=30.0, backoff_max_s=30.0, max_concurrency=1,
    )
    elapsed = time.monotonic() - start
    assert 0.05 <= elapsed < 5.0
    assert report.classes[0].errors == [] and llm.count == 2
    assert len(_load(out / "cupl.json")["garden hose"]) == 1


def test_500_then_success(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = lambda cls, nth, body: Reply(status=500, body=b"boom") if nth < 2 else None
    report, out = run_set(llm, tmp_path, ["garden hose"], config=_one_question(samples=1))
    assert report.classes[0].errors == [] and llm.count == 3
    assert len(_load(out / "cupl.json")["garden hose"]) == 1


def test_timeout_then_success(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = lambda cls, nth, body: Reply(delay=1.5) if nth == 0 else None
    start = time.monotonic()
    report, out = run_set(
        llm, tmp_path, ["garden hose"], config=_one_question(samples=1), timeout_s=0.25
    )
    assert time.monotonic() - start < 1.4  # did not wait for the slow answer
    assert report.classes[0].errors == [] and llm.count == 2
    assert len(_load(out / "cupl.json")["garden hose"]) == 1


def test_retries_exhausted_is_reported(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = lambda cls, nth, body: Reply(status=503) if cls == "garden hose" else None
    report, _ = run_set(
        llm, tmp_path, ["garden hose", "laptop stand"], config=_one_question(samples=1),
        max_retries=2,
    )
    assert report.empty_classes == ["garden hose"]
    assert "HTTP 503" in report.classes[0].errors[0] and "3 attempts" in report.classes[0].errors[0]
    assert llm.per_class["garden hose"] == 3


def test_off_topic_class_is_reported_and_run_continues(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = lambda cls, nth, body: (
        Reply(contents=["A sunny day at the beach."]) if cls == "quantum flux capacitor" else None
    )
    report, out = run_set(llm, tmp_path, ["quantum flux capacitor", "laptop stand"])
    assert report.empty_classes == ["quantum flux capacitor"]
    assert report.classes[0].dropped["off_topic"] == 4
    cupl = _load(out / "cupl.json")
    assert cupl["quantum flux capacitor"] == [] and len(cupl["laptop stand"]) == 4
    rep = _load(out / "describe-report.json")
    assert rep["empty_classes"] == ["quantum flux capacitor"]


def test_cache_makes_rerun_free(llm: FakeLLM, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    report1, out = run_set(llm, tmp_path, ["laptop stand", "garden hose"], cache=cache)
    first = llm.count
    assert first == 10 and report1.http_requests == 10
    first_cupl = _load(out / "cupl.json")

    report2, out = run_set(llm, tmp_path, ["laptop stand", "garden hose"], cache=cache)
    assert llm.count == first  # no request at all
    assert report2.http_requests == 0 and report2.cache_hits == 10
    assert _load(out / "cupl.json") == first_cupl
    # Entries are complete JSON files; no temporary files are left behind.
    files = list(cache.rglob("*"))
    assert all(not f.name.startswith(".") for f in files)
    assert all(isinstance(_load(f), dict) for f in files if f.is_file())


def test_n_per_request_with_servers_that_ignore_n(llm: FakeLLM, tmp_path: Path) -> None:
    config = _one_question(samples=3)
    _, out = run_set(llm, tmp_path, ["laptop stand"], config=config, n_per_request=3)
    assert llm.count == 1 and llm.bodies[0]["n"] == 3
    assert len(_load(out / "cupl.json")["laptop stand"]) == 3

    llm.honour_n = False
    llm.bodies.clear()
    _, out = run_set(llm, tmp_path / "b", ["laptop stand"], config=config, n_per_request=3)
    assert [b.get("n", 1) for b in llm.bodies] == [3, 2, 1]
    assert len(_load(out / "cupl.json")["laptop stand"]) == 3


def test_merge_with_published_sentences(llm: FakeLLM, tmp_path: Path) -> None:
    published = tmp_path / "published.json"
    old = ["A laptop stand made of wood.", "a photo of a laptop stand, variant 1-0."]
    published.write_text(json.dumps({"Laptop_Stand": old, "unknown": ["x"]}), encoding="utf-8")
    config = DescribeConfig(
        questions=("What does a {} look like?",), answers_per_question=2, merge_with=(published,)
    )
    report, out = run_set(llm, tmp_path, ["laptop stand"], config=config)
    sentences = _load(out / "cupl.json")["laptop stand"]
    assert sentences[:2] == old
    assert len({normalize_key(s) for s in sentences}) == len(sentences)
    assert report.classes[0].merged == 2 and report.merge_unmatched == ["unknown"]


def test_api_key_is_sent_but_never_leaks(
    llm: FakeLLM, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A transient failure exercises the retry/warning log paths too.
    llm.script = lambda cls, nth, body: Reply(status=502) if nth == 0 else None
    report, out = run_set(llm, tmp_path, ["laptop stand"], config=_one_question(), api_key=SECRET)
    assert llm.auth_headers and set(llm.auth_headers) == {f"Bearer {SECRET}"}
    assert report.classes[0].errors == []

    # A server that echoes the key in its error body: the run stops, the key stays hidden.
    llm.script = lambda cls, nth, body: Reply(
        status=401, body={"error": {"message": f"Incorrect API key provided: {SECRET}"}}
    )
    client = make_client(llm, api_key=SECRET)
    with pytest.raises(LLMError) as info:
        generate_label_set(["laptop stand"], client, tmp_path / "out2", SMALL)
    assert "HTTP 401" in str(info.value) and "***" in str(info.value)
    for text in (str(info.value), repr(info.value), repr(client), caplog.text):
        assert SECRET not in text
    assert SECRET not in (out / "describe-report.json").read_text(encoding="utf-8")


def test_no_key_sends_no_authorization(llm: FakeLLM, tmp_path: Path) -> None:
    run_set(llm, tmp_path, ["laptop stand"], config=_one_question(samples=1))
    assert llm.auth_headers == [None]


def test_fatal_404_and_repeated_failures_stop_the_run(llm: FakeLLM, tmp_path: Path) -> None:
    llm.script = lambda cls, nth, body: Reply(status=404, body={"error": "model not found"})
    with pytest.raises(LLMError, match="HTTP 404"):
        run_set(llm, tmp_path, ["laptop stand", "garden hose"])
    assert llm.count <= 4  # stopped early instead of trying every prompt

    llm.script = lambda cls, nth, body: Reply(status=500)
    llm.bodies.clear()
    with pytest.raises(LLMError, match="in a row failed"):
        run_set(
            llm, tmp_path, ["laptop stand", "garden hose"], max_retries=0,
            abort_after_failures=3, max_concurrency=1,
        )
    assert llm.count == 3


def test_connection_refused_is_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ChatClient(
        f"http://127.0.0.1:{port}/v1", "m", timeout_s=0.5, max_retries=1, backoff_base_s=0.001,
        abort_after_failures=0,
    )
    res = client.complete(ChatRequest(({"role": "user", "content": "hi"},), "x", samples=1))
    assert res.completions == [] and "connection failed" in res.errors[0]


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(llm: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("laptop stand\n\ngarden hose\n", encoding="utf-8")
    questions = tmp_path / "q.txt"
    questions.write_text("# comment\nWhat does a {} look like?\n", encoding="utf-8")
    llm.classes = ["laptop stand", "garden hose"]
    monkeypatch.setenv("OPENAI_BASE_URL", llm.url)
    argv = [
        "--classes", str(classes), "--out", str(tmp_path / "out"), "--llm-model", "m",
        "--questions-file", str(questions), "--answers-per-question", "2", "--no-descriptors",
        "--cache-dir", str(tmp_path / "cache"), "--category-hint", "a type of product",
        "--concurrency", "2", "--timeout", "2",
    ]
    assert describe_cli.main(argv) == 0
    assert _load(tmp_path / "out" / "classes.json") == ["laptop stand", "garden hose"]
    assert not (tmp_path / "out" / "clip-d.json").exists()
    assert llm.bodies[0]["messages"][-1]["content"].endswith("(a type of product) look like?")


def test_cli_missing_classes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    rc = describe_cli.main(
        ["--classes", str(missing), "--out", str(tmp_path / "o"), "--base-url", "http://x/v1"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and str(missing) in err
    assert "Traceback" not in err


def test_cli_missing_base_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    classes = tmp_path / "classes.json"
    classes.write_text('["laptop stand"]', encoding="utf-8")
    rc = describe_cli.main(["--classes", str(classes), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "--base-url" in err and "OPENAI_BASE_URL" in err


def test_cli_bad_classes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    classes = tmp_path / "classes.json"
    classes.write_text('{"a": 1}', encoding="utf-8")
    rc = describe_cli.main(
        ["--classes", str(classes), "--out", str(tmp_path / "o"), "--base-url", "http://x/v1"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "list" in err


# ----------------------------------------------------------------------------- pure parts


def test_user_errors_are_typed() -> None:
    with pytest.raises(ConfigError, match="--llm-model"):
        ChatClient("http://localhost:1/v1")
    with pytest.raises(ConfigError, match="http"):
        ChatClient("localhost:1/v1", "m")
    with pytest.raises(ConfigError, match="exactly one"):
        DescribeConfig(questions=("no placeholder",))
    with pytest.raises(LabelSetError):
        generate_label_set([], make_client(FakeLLM("http://127.0.0.1:1/v1")), "/tmp/unused")
    assert issubclass(LLMError, BiftaUserError)


def test_load_classes_forms(tmp_path: Path) -> None:
    (tmp_path / "classes.json").write_text('["a b", ["c", "d"]]', encoding="utf-8")
    assert load_classes(tmp_path) == ["a b", ["c", "d"]]
    (tmp_path / "bad.json").write_text('["a", ""]', encoding="utf-8")
    with pytest.raises(LabelSetError, match="entry 1"):
        load_classes(tmp_path / "bad.json")


def test_retry_after_parsing_and_cap() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    kw = {"base_s": 1.0, "max_s": 8.0, "retry_after_max_s": 10.0}
    assert retry_delay(0, 3600.0, **kw) == 10.0
    assert all(4.0 <= retry_delay(3, None, **kw) <= 8.0 for _ in range(20))
    assert all(4.0 <= retry_delay(9, None, **kw) <= 8.0 for _ in range(20))


def test_fill_question_and_topic() -> None:
    assert fill_question("What does a {} look like?", "owl") == "What does an owl look like?"
    assert fill_question("A {}, {hint}.", "mouse", "a computer part") == "A mouse, a computer part."
    assert is_on_topic("Two black-footed albatrosses", ["Black_footed_Albatross"])
    assert is_on_topic("Puppies playing", ["puppy"])
    assert not is_on_topic("A category of things", ["cat"])
    assert clean_descriptors(["Features:\n- Long bill.\n- NASA logo", "- long bill"]).kept == [
        "long bill",
        "NASA logo",
    ]


_text = st.text(alphabet=st.sampled_from(list("ab lxy.\n-1)\"'*")), max_size=60)


@settings(max_examples=60, deadline=None)
@given(
    answers=st.lists(_text, max_size=8), max_chars=st.integers(5, 40), max_count=st.integers(1, 5)
)
def test_clean_sentences_invariants(answers: list[str], max_chars: int, max_count: int) -> None:
    names = ["lax", "by"]
    res = clean_sentences(answers, names, max_chars=max_chars, max_count=max_count)
    assert len(res.kept) <= max_count
    assert len({normalize_key(s) for s in res.kept}) == len(res.kept)
    for s in res.kept:
        assert s and len(s) <= max_chars and "\n" not in s and s == s.strip()
        assert is_on_topic(s, names)
    # Cleaning is idempotent on its own output.
    again = clean_sentences(res.kept, names, max_chars=max_chars, max_count=max_count)
    assert again.kept == res.kept


def _one_question(samples: int = 2) -> DescribeConfig:
    return DescribeConfig(
        questions=("What does a {} look like?",), answers_per_question=samples, descriptors=False
    )
