"""`qrm serve`: real server processes on 127.0.0.1, real HTTP clients, rewards checked against offline scoring."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import HH_TEST, hh_rows

from qrm.data import split_implicit

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "QRM_SERVE_TEST_KEY", "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 65536


@pytest.fixture(scope="module")
def export(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small `*ForSequenceClassification` export: the tiny Llama with a seeded score head, saved whole."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("serve") / "export"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def start_server(model: Path, log: Path, *flags: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qrm.cli", "serve", "--model", str(model), "--port", "0", *flags]
    # One torch thread: the test process and the other server share the cores.
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """The URL from the startup line, once /health answers."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(r"qrm serve: (http://127\.0\.0\.1:\d+) ", log.read_text())
        if m and httpx.get(m.group(1) + "/health").status_code == 200:
            return m.group(1)
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"server not ready in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def servers(export: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two servers started together: `main` (API key, small limits) and `drain` (a 4 s batching wait, so requests
    are still in flight when SIGTERM arrives)."""
    tmp = tmp_path_factory.mktemp("serve-logs")
    procs = {
        "main": start_server(
            export, tmp / "main.log", "--api-key-env", KEY_ENV, "--max-texts", "100",
            "--max-body-bytes", str(MAX_BODY), "--max-wait-ms", "10", "--max-padding", "1", env={KEY_ENV: KEY},
        ),
        "drain": start_server(export, tmp / "drain.log", "--max-wait-ms", "4000", "--max-batch-size", "256"),
    }  # fmt: skip
    try:
        urls = {name: wait_ready(proc, tmp / f"{name}.log") for name, proc in procs.items()}
        yield {"urls": urls, "procs": procs, "logs": {n: tmp / f"{n}.log" for n in procs}}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def offline(export: Path):
    from qrm.reward_model import RewardModel

    return RewardModel.from_pretrained(export, device="cpu")


@pytest.fixture(scope="module")
def texts() -> list[tuple[str, str]]:
    """(prompt, response) pairs of many lengths (about 10 to 130 tokens) from HH-RLHF."""
    out = []
    for row in hh_rows(24, HH_TEST):
        p, c, r = split_implicit(row["chosen"], row["rejected"])
        out += [(p[-300:], c[:200]), (p[-300:], r[:200])]
    return out


def post_all(url: str, jobs: list[tuple[str, dict]], headers: dict) -> list[httpx.Response]:
    """Send every (path, body) at once from one asyncio client: all requests are in flight together."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in jobs))

    return asyncio.run(run())


def query_of(offline, prompt: str, response: str) -> str:
    """What OpenRLHF sends: prompt + response ids decoded with special tokens kept (here qrm's own ids: <s>…</s>)."""
    return offline.tokenizer.decode(offline.tokenize([prompt], [response])[0], skip_special_tokens=False)


def test_concurrent_requests_are_batched_and_equal_offline_scoring(servers, offline, texts) -> None:
    url = servers["urls"]["main"]
    before = httpx.get(url + "/health").json()
    jobs, expected = [], []
    for i in range(80):  # 1 to 3 texts per request, of mixed lengths, half /score and half /get_reward
        picked = [texts[(i * 7 + k * 13) % len(texts)] for k in range(1 + i % 3)]
        if i % 2:
            jobs.append(("/score", {"prompts": [p for p, _ in picked], "responses": [r for _, r in picked]}))
        else:
            queries = [query_of(offline, p, r) for p, r in picked]
            jobs.append(
                ("/get_reward", {"query": queries, "prompts": [p for p, _ in picked], "labels": [None] * len(picked)})
            )
        expected.append(picked)
    responses = post_all(url, jobs, AUTH)
    reference = dict(zip(texts, offline.score_batch([p for p, _ in texts], [r for _, r in texts]), strict=True))
    for resp, picked in zip(responses, expected, strict=True):
        assert resp.status_code == 200, resp.text
        got = resp.json()["rewards"]
        assert len(got) == len(picked)
        for reward, pair in zip(got, picked, strict=True):
            assert abs(reward - reference[pair]) < 1e-5, (reward, reference[pair])
    after = httpx.get(url + "/health").json()
    n_texts = sum(len(p) for p in expected)
    assert after["texts"] - before["texts"] == n_texts
    # Dynamic batching happened: fewer forward passes than texts, some of them several requests wide.
    assert after["batches"] - before["batches"] < n_texts / 2
    assert after["largest_batch"] > 3
    assert after["in_flight"] == 0 and after["queued_texts"] == 0


def test_get_reward_openrlhf_payload_with_special_tokens(servers, offline, texts) -> None:
    url = servers["urls"]["main"]
    bos, eos = offline.tokenizer.bos_token, offline.tokenizer.eos_token
    (p1, r1), (p2, r2) = texts[0], texts[5]
    queries = [
        query_of(offline, p1, r1),  # <s>prompt response</s>, as OpenRLHF decodes it
        p1 + r1,  # no special tokens at all
        bos + bos + p1 + r1 + eos + eos,  # doubled by a chat template that writes BOS as text
        bos + p2 + r2,  # generation cut before EOS
        bos + p2 + r2 + eos,  # its prompt is not given below: scored as one text
    ]
    prompts = [p1, p1, bos + p1, p2, "something else"]
    body = {"query": queries, "prompts": prompts, "labels": ["a", None, 3, {"x": 1}, []]}
    resp = httpx.post(url + "/get_reward", json=body, headers={"X-API-Key": KEY})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert set(out) == {"rewards", "scores", "extra_logs"} and out["rewards"] == out["scores"]
    want = offline.score_batch([p1, p1, p1, p2, ""], [r1, r1, r1, r2, p2 + r2])
    assert max(abs(a - b) for a, b in zip(out["rewards"], want, strict=True)) < 1e-5
    logs = out["extra_logs"]
    assert logs["qrm_prompt_split"] == [1.0, 1.0, 1.0, 1.0, 0.0]
    ids = offline.tokenize([p1, p2, ""], [r1, r2, p2 + r2])
    assert logs["qrm_tokens"] == [float(len(ids[0]))] * 3 + [float(len(ids[1])), float(len(ids[2]))]
    assert ids[0][0] == offline.tokenizer.bos_token_id and ids[0][1] != ids[0][0]  # one BOS, not two
    assert logs["qrm_truncated"] == [0.0] * 5
    # Without prompts (OpenRLHF's own serve_rm reads only `query`) every query is one text.
    resp = httpx.post(url + "/get_reward", json={"query": queries[:1]}, headers=AUTH)
    assert abs(resp.json()["rewards"][0] - offline.score("", p1 + r1)) < 1e-5


def test_score_conversations_render_as_training(servers, offline, tmp_path) -> None:
    from conftest import write_jsonl

    from qrm.config import DataArguments
    from qrm.data import build_pairs, load_rows

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a reward model?"}]
    chosen = [{"role": "assistant", "content": "A model that scores responses."}]
    rejected = [{"role": "assistant", "content": "No idea."}]
    data = write_jsonl(tmp_path / "conv.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    rows, where = load_rows(str(data))
    pairs, _ = build_pairs(
        rows, DataArguments(dataset=str(data), dataset_format="conversational"), where, offline.tokenizer
    )
    want = offline.score_batch([pairs[0]["prompt"]] * 2, [pairs[0]["chosen"], pairs[0]["rejected"]])
    body = {"conversations": [prompt + chosen, prompt + rejected]}
    got = httpx.post(servers["urls"]["main"] + "/score", json=body, headers=AUTH).json()["rewards"]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    body = {"prompts": [prompt, prompt], "responses": [chosen, "No idea."]}  # message lists, or a plain string
    got = httpx.post(servers["urls"]["main"] + "/score", json=body, headers=AUTH).json()["rewards"]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5


def test_api_key_required(servers) -> None:
    url = servers["urls"]["main"]
    body = {"query": ["hello"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": KEY}):
        resp = httpx.post(url + "/get_reward", json=body, headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["field"] == "Authorization" and resp.headers["www-authenticate"] == "Bearer"
        assert KEY not in resp.text
    # Refused before the body is read: a malformed body without the key is still 401.
    assert httpx.post(url + "/score", content=b"{oops", headers={"content-type": "application/json"}).status_code == 401
    assert httpx.post(url + "/get_reward", json=body, headers=AUTH).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    assert KEY not in servers["logs"]["main"].read_text()


BAD_REQUESTS = [
    ("/get_reward", b'{"query": ["a", ', 400, "body"),  # malformed JSON
    ("/get_reward", b"[1, 2]", 422, "body"),  # not an object
    ("/get_reward", {}, 422, "query"),  # missing
    ("/get_reward", {"query": "a string"}, 422, "query"),
    ("/get_reward", {"query": ["ok", 3]}, 422, "query[1]"),
    ("/get_reward", {"query": []}, 422, "query"),  # empty list
    ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 422, "prompts"),  # mismatched lengths
    ("/get_reward", {"query": ["a"], "labels": [1, 2]}, 422, "labels"),
    ("/get_reward", {"query": ["x"] * 101}, 413, "query"),  # --max-texts 100
    ("/get_reward", {"query": ["x" * (MAX_BODY + 1)]}, 413, "body"),  # --max-body-bytes
    ("/score", {"prompts": ["a"]}, 422, "responses"),
    ("/score", {"prompts": ["a", "b"], "responses": ["c"]}, 422, "responses"),
    ("/score", {"prompts": [], "responses": []}, 422, "prompts"),
    ("/score", {"prompts": ["a"], "responses": [None]}, 422, "responses[0]"),
    ("/score", {"prompt": ["a"], "responses": ["b"]}, 422, "prompt"),  # unknown field (typo)
    ("/score", {"prompts": ["a"] * 101, "responses": ["b"] * 101}, 413, "prompts"),
    ("/score", {"conversations": [[{"role": "user", "content": "hi"}]]}, 422, "conversations[0]"),
    ("/score", {"conversations": [[{"role": "user"}]]}, 422, "conversations[0][0].content"),
    ("/score", {"conversations": [[{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]]}, 422, "conversations[0]"),
    ("/score", {"prompts": ["a"], "responses": ["b"], "conversations": [[]]}, 422, "conversations"),
]  # fmt: skip


def test_bad_requests_get_4xx_naming_the_field(servers) -> None:
    url = servers["urls"]["main"]
    with httpx.Client(base_url=url, headers=AUTH) as client:
        for path, body, status, field in BAD_REQUESTS:
            if isinstance(body, bytes):
                resp = client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                resp = client.post(path, json=body)
            assert resp.status_code == status, (path, body, resp.text)
            err = resp.json()
            assert err["field"] == field, (body, err)
            assert field in err["detail"], err
        chunked = client.post("/get_reward", content=iter([b'{"query": ["', b"y" * MAX_BODY, b'"]}']))
        assert chunked.status_code == 413 and chunked.json()["field"] == "body"  # no content-length to trust
        assert client.get("/nope").status_code == 404
        assert client.get("/score").status_code == 405
        assert client.post("/get_reward", json={"query": ["still alive"]}).status_code == 200
    assert servers["procs"]["main"].poll() is None
    assert "/get_reward" in httpx.get(url + "/openapi.json").json()["paths"]
    assert httpx.get(url + "/docs").status_code == 200


def test_sigterm_drains_in_flight_requests(servers, offline, texts) -> None:
    url, proc = servers["urls"]["drain"], servers["procs"]["drain"]
    jobs = [("/score", {"prompts": [p], "responses": [r]}) for p, r in texts[:12]]
    results: list = []
    sender = threading.Thread(target=lambda: results.extend(post_all(url, jobs, {})))
    sender.start()
    end = time.monotonic() + 30
    with httpx.Client(base_url=url) as client:
        while client.get("/health").json()["in_flight"] < len(jobs):  # all sent, held by the 4 s batching wait
            assert time.monotonic() < end
            time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    sender.join(60)
    assert proc.wait(60) == 0
    want = offline.score_batch([p for p, _ in texts[:12]], [r for _, r in texts[:12]])
    assert [r.status_code for r in results] == [200] * len(jobs)
    got = [r.json()["rewards"][0] for r in results]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    assert "stopped by SIGTERM" in servers["logs"]["drain"].read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_bad_model_path_refused_before_loading(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, needle in (
        (["--model", str(tmp_path / "missing")], "no such directory"),
        (["--model", str(tmp_path)], "neither config.json"),
        (["--model", str(tmp_path), "--api-key-env", "QRM_SURELY_UNSET_VAR"], None),
        (["--model", str(tmp_path), "--policy-tokenizer", str(tmp_path / "no-tok")], "--policy-tokenizer"),
    ):
        if needle is None:
            (tmp_path / "config.json").write_text("{}")
            needle = "QRM_SURELY_UNSET_VAR"
        proc = subprocess.run(
            [sys.executable, "-m", "qrm.cli", "serve", *argv], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qrm serve: error:") and needle in lines[0], proc.stderr


def test_openrlhf_inputs_strip_bert_specials(minilm_tokenizer) -> None:
    """[CLS] … [SEP] in a query (an encoder reward model) are not doubled: ids equal `qrm score`'s."""
    from qrm.reward_model import tokenize_responses
    from qrm.serve import openrlhf_inputs

    tok = minilm_tokenizer
    prompt, response = "how do i bake bread?", " mix flour, water and yeast, then bake it."
    want = tokenize_responses(tok, [prompt], [response], 128)[0]
    query = tok.decode(want, skip_special_tokens=False)
    assert query.startswith("[CLS]") and query.endswith("[SEP]")
    ids, split, cut = openrlhf_inputs(tok, [query, query, prompt + response], [prompt, "other", prompt], 128)
    assert ids == [want, want, want] and split == [True, False, True] and cut == [False] * 3
    long_query = tok.decode(tokenize_responses(tok, [prompt * 20], [response], 512)[0], skip_special_tokens=False)
    long_ids, _, cut = openrlhf_inputs(tok, [long_query], None, 64)
    assert len(long_ids[0]) == 64 and cut == [True]
    assert long_ids[0][0] == tok.cls_token_id and long_ids[0].count(tok.cls_token_id) == 1
    assert long_ids[0][-1] == tok.sep_token_id and long_ids[0][-2] != tok.sep_token_id


def test_policy_special_tokens_are_removed_before_scoring(minilm_tokenizer, tiny_llama) -> None:
    """A Llama policy's `<s>`/`</s>` in a query for a MiniLM reward model (which would read them as words) are removed:
    the ids equal `qrm score`'s; its own [CLS]/[SEP] are still handled as before."""
    from transformers import AutoTokenizer

    from qrm.policy_text import PolicySpecials, openrlhf_inputs
    from qrm.reward_model import tokenize_responses

    tok, policy = minilm_tokenizer, PolicySpecials(AutoTokenizer.from_pretrained(tiny_llama), minilm_tokenizer)
    assert {"<s>", "</s>", "<pad>", "<unk>"} <= set(policy.texts) and "[CLS]" not in policy.texts
    prompt, response = "\n\nHuman: how do i bake bread?\n\nAssistant:", " mix flour, water and yeast."
    want = tokenize_responses(tok, [prompt], [response], 128)[0]
    queries = ["<s>" + prompt + response + "</s>", "<s> " + prompt + response + "</s></s>", prompt + response]
    ids, split, _ = openrlhf_inputs(tok, queries, ["<s>" + prompt, prompt, prompt], 128, policy)
    assert ids == [want] * 3 and split == [True] * 3
    words, _, _ = openrlhf_inputs(tok, queries[:1], ["<s>" + prompt], 128)  # without: "<s>" scored as words
    assert words[0] != want
    assert policy([[{"role": "user", "content": "hi</s>"}], "a</s>"]) == [[{"role": "user", "content": "hi"}], "a"]
