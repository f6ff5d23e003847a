"""qrm exports in OpenRLHF's own code (0.11.2): its local reward-model loader and PPO prompt tokenization, and its
remote-reward executor posting to a real `qrm serve` whose policy has another tokenizer.

OpenRLHF pins GPU packages (deepspeed, flash-attn, ray, vllm) and transformers 5.15, so it is installed without them:
`pip install --no-deps openrlhf==0.11.2` (plus aiohttp and pylatexenc, in qrm's `dev` extra). The test skips only when
`openrlhf` is absent. `openrlhf.models.model` imports `deepspeed` and `flash_attn` at module level without using them
for an unpacked reward model on CPU: those two import names (and nothing else) are stubbed while OpenRLHF is
imported. The code that loads the model, tokenizes the prompt, stitches the response ids, computes the reward and
posts to the server is OpenRLHF's."""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import HH_TEST, MINILM, hh_rows

from qrm.data import split_implicit
from qrm.reward_model import RewardModel

GPU_ONLY = ("deepspeed", "flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed")
CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2 + 2?"}], "4"),
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        "Red, like a tomato.",
    ),
    ([{"role": "user", "content": "How do I boil an egg?"}], "Put it in boiling water for eight minutes."),
]


@pytest.fixture(scope="module")
def openrlhf() -> SimpleNamespace:
    """OpenRLHF's reward-model loader, prompt preprocessing and single-turn executor."""
    if importlib.util.find_spec("openrlhf") is None:
        pytest.skip("openrlhf is not installed: pip install --no-deps openrlhf==0.11.2")
    # GPU-only import names, stubbed only when the real package is absent, and only while OpenRLHF is imported. A
    # spec makes transformers' and accelerate's find_spec() checks answer "not available" (no package metadata).
    stubbed, absent = [], {n for n in ("deepspeed", "flash_attn") if importlib.util.find_spec(n) is None}
    for name in GPU_ONLY:
        if name.split(".")[0] in absent:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            module.__path__ = []  # a package, so that its stubbed submodules import
            sys.modules[name] = module
            stubbed.append(name)
    if "flash_attn.bert_padding" in stubbed:
        for attr in ("index_first_axis", "pad_input", "rearrange", "unpad_input"):
            setattr(sys.modules["flash_attn.bert_padding"], attr, None)  # used only with packing_samples=True
        sys.modules["flash_attn.utils.distributed"].all_gather = None
    try:
        from openrlhf.datasets.prompts_dataset import preprocess_data
        from openrlhf.models.model import get_llm_for_sequence_regression
        from openrlhf.utils.agent import SingleTurnAgentExecutor
    finally:
        for name in stubbed:
            del sys.modules[name]
    return SimpleNamespace(
        load=get_llm_for_sequence_regression, preprocess=preprocess_data, Executor=SingleTurnAgentExecutor
    )


class Engine:
    """Stands in for vLLM's engine: "generates" the given response ids (a policy answering, then EOS)."""

    def __init__(self, response_ids: list[int]):
        self.response_ids = response_ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        out = SimpleNamespace(token_ids=list(self.response_ids), text="", finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def rollout(openrlhf, prompt: str, response_ids: list[int], tokenizer, url: str | None = None) -> dict:
    """OpenRLHF's `SingleTurnAgentExecutor.execute`: prompt tokenized with add_special_tokens=False, the response ids
    appended, and (with `url`) the decoded query posted to a remote reward server."""
    executor = openrlhf.Executor(remote_rm_url=url)
    params = SimpleNamespace(max_tokens=64, logprobs=None)
    return asyncio.run(executor.execute(prompt, "", params, 1024, tokenizer, Engine(response_ids)))


def local_rewards(model, sequences: list[list[int]]) -> list[float]:
    """OpenRLHF's reward model forward, one sequence per experience with an all-ones mask, as its PPO loop does."""
    import torch

    with torch.no_grad():
        return [float(model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]) for s in sequences]


def test_local_reward_model_gets_training_ids_from_the_shipped_template(
    openrlhf, rm_export, capsys, monkeypatch
) -> None:
    """`get_llm_for_sequence_regression(export, "reward")` on a Llama export: prompts rendered with the export's chat
    template (which writes BOS, since training put BOS first) and tokenized by OpenRLHF give qrm's ids and rewards.
    Raw HH prompts (no template) lack BOS; `--input_template "<s>{}"` puts it back."""
    import openrlhf.utils.utils as orlhf_utils
    import torch

    export = rm_export["out_dir"]
    rm = RewardModel.from_pretrained(export, device="cpu")
    tok = rm.tokenizer
    # OpenRLHF's loader takes param_dtype "bf16" (its default) or "fp16" only. The float32 export is compared in
    # float32 by letting its dtype helper also map "fp32" (the one change; loading and forward stay OpenRLHF's), and
    # once as OpenRLHF runs it by default, in bf16.
    to_dtype = orlhf_utils.convert_to_torch_dtype
    monkeypatch.setattr(orlhf_utils, "convert_to_torch_dtype", lambda d: torch.float32 if d == "fp32" else to_dtype(d))
    model = openrlhf.load(export, "reward", attn_implementation="sdpa", param_dtype="fp32").eval()
    bf16 = openrlhf.load(export, "reward", attn_implementation="sdpa").eval()
    assert model.score.weight.dtype == torch.float32 and bf16.score.weight.dtype == torch.bfloat16
    assert isinstance(model.score, torch.nn.Linear) and model.score.bias is None  # qrm's head, loaded by name

    def response_ids(text: str) -> list[int]:  # what a policy with this tokenizer generates: the text, then EOS
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    # 1. Conversations through OpenRLHF's --apply_chat_template preprocessing (the export's template).
    seqs, want = [], []
    for messages, answer in CONVERSATIONS:
        prompt, _ = openrlhf.preprocess({"input": messages}, None, "input", None, tok.apply_chat_template)
        assert prompt.startswith(tok.bos_token)
        reply = [{"role": "assistant", "content": answer}]
        _, text = rm.render(messages, reply)  # " 4": the completion after the generation prompt
        seqs.append(rollout(openrlhf, prompt, response_ids(text), tok)["observation_tokens"])
        want.append(rm.score(messages, reply))
        assert seqs[-1] == rm.tokenize([messages], [reply])[0]  # one BOS, training's ids
    got = local_rewards(model, seqs)
    template_delta = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert template_delta < 1e-5
    bf16_delta = max(abs(a - b) for a, b in zip(local_rewards(bf16, seqs), want, strict=True))
    assert bf16_delta < 1e-2  # bf16 rounding of the same ids, not other ids
    # 2. Raw HH prompts (no template): OpenRLHF adds no BOS, so the model scores ids it never saw ...
    pairs = [split_implicit(r["chosen"], r["rejected"])[:2] for r in hh_rows(12, HH_TEST)]
    fits = lambda p, c: len(tok(p + c)["input_ids"]) < rm.max_length - 8  # noqa: E731 - qrm cuts nothing
    pairs = [(p[-200:], c[:120]) for p, c in pairs if fits(p[-200:], c[:120])][:6]
    assert len(pairs) >= 4
    want = rm.score_batch([p for p, _ in pairs], [c for _, c in pairs])
    raw = local_rewards(model, [rollout(openrlhf, p, response_ids(c), tok)["observation_tokens"] for p, c in pairs])
    raw_delta = max(abs(a - b) for a, b in zip(raw, want, strict=True))
    assert raw_delta > 1e-3
    # ... and with OpenRLHF's --input_template "<s>{}" the BOS is back, and so are qrm's rewards.
    fixed = []
    for p, c in pairs:
        prompt, _ = openrlhf.preprocess({"input": p}, tok.bos_token + "{}", "input", None, None)
        fixed.append(rollout(openrlhf, prompt, response_ids(c), tok)["observation_tokens"])
    assert fixed == rm.tokenize([p for p, _ in pairs], [c for _, c in pairs])
    fixed_delta = max(abs(a - b) for a, b in zip(local_rewards(model, fixed), want, strict=True))
    assert fixed_delta < 1e-5
    with capsys.disabled():
        print(
            f"\nOpenRLHF local RM (tiny Llama export) vs qrm score: chat template {template_delta:.2g} in fp32, "
            f"{bf16_delta:.2g} in OpenRLHF's default bf16 ({len(CONVERSATIONS)} conversations, rewards spread "
            f"{max(want) - min(want):.3g}), raw HH prompts without BOS {raw_delta:.3g}, "
            f'with --input_template "<s>{{}}" {fixed_delta:.2g} ({len(pairs)} texts)'
        )


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path):
    """`qrm serve` of a MiniLM export whose policy is the tiny Llama (`--policy-tokenizer`)."""
    from test_serve import start_server, wait_ready
    from tiny_exports import seeded_export

    tmp = tmp_path_factory.mktemp("openrlhf-remote")
    export = seeded_export(MINILM, tmp / "minilm-export")
    proc = start_server(export, tmp / "serve.log", "--policy-tokenizer", str(tiny_llama))
    try:
        yield {"url": wait_ready(proc, tmp / "serve.log"), "export": export, "log": tmp / "serve.log"}
    finally:
        proc.kill()
        proc.wait()


def test_remote_reward_with_another_policy_tokenizer(openrlhf, minilm_server, tiny_llama, capsys) -> None:
    """OpenRLHF's executor with a Llama policy posts `<s>prompt response</s>` (decoded with the policy's specials) to
    `qrm serve` of a MiniLM export: with `--policy-tokenizer` the rewards equal `qrm score`'s; without, `<s>` and
    `</s>` are scored as words."""
    from transformers import AutoTokenizer

    from qrm.policy_text import openrlhf_inputs
    from qrm.reward_model import score_ids

    policy = AutoTokenizer.from_pretrained(tiny_llama)
    rm = RewardModel.from_pretrained(minilm_server["export"], device="cpu")
    pairs = [split_implicit(r["chosen"], r["rejected"])[:2] for r in hh_rows(4, HH_TEST)]
    pairs = [(p[-300:], c[:200]) for p, c in pairs]
    url = minilm_server["url"] + "/get_reward"
    outs = []
    for p, c in pairs:  # a Llama chat template writes the BOS into the prompt text; the policy ends with EOS
        ids = policy(c, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
        outs.append(rollout(openrlhf, policy.bos_token + p, ids, policy, url=url))
    # One query per request, as OpenRLHF sends it: the answer's lists hold one value each.
    assert all(len(o["reward"]) == 1 and len(o["scores"]) == 1 for o in outs), outs
    got = [o["reward"][0] for o in outs]
    assert [o["extra_logs"]["qrm_prompt_split"] for o in outs] == [[1.0]] * len(pairs)
    want = rm.score_batch([p for p, _ in pairs], [c for _, c in pairs])
    delta = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert delta < 1e-5
    # The same queries without the policy's tokenizer: the MiniLM reads "<s>" and "</s>" as words.
    queries = [policy.decode(o["observation_tokens"], skip_special_tokens=False) for o in outs]
    assert all(q.startswith("<s>") and q.endswith("</s>") for q in queries)
    ids, _, _ = openrlhf_inputs(rm.tokenizer, queries, [policy.bos_token + p for p, _ in pairs], rm.max_length)
    as_words = score_ids(rm.model, ids, rm.tokenizer.pad_token_id)
    words_delta = max(abs(a - b) for a, b in zip(as_words, want, strict=True))
    assert words_delta > 1e-5
    spread = max(want) - min(want)
    # The same encoder export as OpenRLHF's local reward model: its class has no `classifier`, and `score` is new.
    local = openrlhf.load(str(minilm_server["export"]), "reward", attn_implementation="eager")
    names = set(local.state_dict())
    assert "score.weight" in names and not any(n.startswith("classifier") for n in names)
    with capsys.disabled():
        print(
            f"\nOpenRLHF remote RM, Llama policy -> MiniLM qrm serve: --policy-tokenizer {delta:.2g}, without "
            f"{words_delta:.3g} (reward spread {spread:.3g}, {len(pairs)} texts)"
        )
